"""The sandbox HTTP service, its client and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from grpo.sandbox.client import SandboxClient, SandboxServiceError
from grpo.sandbox.server import SandboxServer
from grpo.verifiers.code import CodeVerifier

ROOT = str(__import__("tests.conftest", fromlist=["ROOT"]).ROOT)


@pytest.fixture(scope="module")
def server():
    srv = SandboxServer("127.0.0.1", 0, workers=2, max_queue=2, max_body=64 << 10)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_run_over_http_and_survive_crashes(server):
    c = SandboxClient(server.url)
    assert c.run("print(input() * 2)", "ab").stdout == b"abab\n"
    assert c.run("import ctypes; ctypes.string_at(0)").status == "signal"
    assert c.run("while True: pass", limits={"wall_time": 1, "cpu_time": 1}).status == "timeout"
    assert c.health()["ok"] is True and c.run("print(1)").status == "ok"


def test_verifier_through_the_service(server):
    v = CodeVerifier(sandbox=SandboxClient(server.url), parallelism=4)
    tests = {"call": {"fn_name": "f", "cases": [{"args": [2], "expected": 4}]}}
    s = v.score(["def f(x):\n    return x * 2", "def f(x):\n    return 4\nexit(0)"], [{"tests": tests}] * 2)
    assert [x.reward for x in s] == [1.0, 0.0]


def test_verifier_config_names_the_services_by_url(server):
    # What a multi-node config writes: task.verifiers=[{name: code, sandbox: [URL, ...]}].
    from grpo.verifiers.compose import RewardFunction

    tests = {"call": {"fn_name": "f", "cases": [{"args": [2], "expected": 4}]}}
    with RewardFunction([{"name": "code", "sandbox": [server.url, server.url]}]) as fn:
        rewards, _, metrics = fn(["def f(x):\n    return x * 2", "def f(x):\n    return 0"], [{"tests": tests}] * 2)
    assert rewards == [1.0, 0.0] and metrics["verifier/code/errors"] == 0
    # a service that does not answer is refused when the verifier is built, naming its URL
    with pytest.raises(ValueError, match="sandbox service http://127.0.0.1:9 does not answer"):
        CodeVerifier(sandbox="http://127.0.0.1:9")


def test_a_service_that_stops_answering_is_a_verifier_error_not_failed_tests(server):
    v = CodeVerifier(sandbox=server.url, parallelism=2)
    v.sandbox = SandboxClient("http://127.0.0.1:9", retries=1)  # the fleet went away after the start
    tests = {"call": {"fn_name": "f", "cases": [{"args": [2], "expected": 4}]}}
    with pytest.raises(SandboxServiceError):
        v.score(["def f(x):\n    return x * 2"], [{"tests": tests}])


def test_oversized_and_bad_requests_rejected(server):
    c = SandboxClient(server.url, retries=0)
    with pytest.raises(SandboxServiceError, match="413"):
        c.run("#" * (100 << 10))
    with pytest.raises(SandboxServiceError, match="400"):
        c.run("print(1)", limits={"wall_time": 10_000})
    req = urllib.request.Request(server.url + "/run", data=b"not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400


def test_queue_is_bounded(server):
    # 2 running + 2 queued fit; the others must be turned away at once with 503.
    c = SandboxClient(server.url, retries=0)
    codes = []

    def one():
        try:
            c.run("import time; time.sleep(1.5)", limits={"wall_time": 3})
            codes.append(200)
        except SandboxServiceError as e:
            codes.append(503 if "503" in str(e) else str(e))

    ts = [threading.Thread(target=one) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert codes.count(200) >= 2 and codes.count(503) >= 2 and len(codes) == 8


def test_cli_run(tmp_path):
    prog = tmp_path / "p.py"
    prog.write_text("import sys\nprint(sys.stdin.read()[::-1])\nsys.exit(4)")
    inp = tmp_path / "in.txt"
    inp.write_text("abc")
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-m", "sandbox", "run", str(prog), "--stdin", str(inp), "--json"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 4
    out = json.loads(p.stdout)
    assert out["stdout"] == "cba\n" and out["status"] == "error" and out["exit_code"] == 4


@pytest.mark.slow
def test_cli_serve(tmp_path):
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.Popen([sys.executable, "-m", "sandbox", "serve", "--host", "127.0.0.1", "--port", str(port)],
                         env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert "sandbox service on" in p.stdout.readline()
        c = SandboxClient(f"http://127.0.0.1:{port}")
        assert c.run("print(6 * 7)").stdout == b"42\n"
    finally:
        p.terminate()
        p.wait(timeout=10)
