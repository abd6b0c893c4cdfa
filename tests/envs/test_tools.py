"""Tools (grpo/envs/tools.py): both call forms read, every bad call a message to the model, tools in
the sandbox by default, hostile tool calls contained, nothing left running, even when the trainer is
SIGKILLed in the middle of a call."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from grpo.envs.base import EnvError, build_env
from grpo.envs.tools import ToolEnv, function_schema, parse_calls
from grpo.sandbox import reaper
from tests.conftest import ROOT, pids_with, proc_table
from tests.envs.sample_tools import multiply
from tests.sandbox.test_sandbox_reaping import BATCH, descendants, wait_until_clean


def fenced(code: str) -> dict:
    return {"role": "assistant", "content": f"Let me compute.\n```python\n{code}\n```"}


def hermes(obj) -> dict:
    body = obj if isinstance(obj, str) else json.dumps(obj)
    return {"role": "assistant", "content": f"<tool_call>\n{body}\n</tool_call>"}


def test_both_forms_are_read_in_order():
    text = ('first <tool_call>{"name": "python", "arguments": {"code": "print(1)"}}</tool_call> then\n'
            '```python\nprint(2)\n``` and <tool_call>{"name": "f", "arguments": "{\\"a\\": 3}"}</tool_call>')
    calls = parse_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("python", {"code": "print(1)"}, None), ("python", {"code": "print(2)\n"}, None), ("f", {"a": 3}, None)]
    assert parse_calls("no call here, just \\boxed{4}") == []


@pytest.mark.parametrize("message, says", [
    (hermes('{"name": "python", "arguments": {"code": '), "not valid JSON"),
    (hermes({"arguments": {"code": "print(1)"}}), '{"name": ..., "arguments": {...}}'),
    (hermes({"name": "python", "arguments": [1, 2]}), "must be a JSON object"),
    ({"role": "assistant", "content": "<tool_call>{\"name\": \"python\""}, "not closed"),
    ({"role": "assistant", "content": "```python\nprint(1)\n"}, "not closed by ```"),
    (hermes({"name": "shell", "arguments": {"cmd": "ls"}}), "no tool named 'shell'"),
    (hermes({"name": "python", "arguments": {"code": "print(1)", "timeout": 99}}), "python takes one argument"),
    (hermes({"name": "python", "arguments": {"code": 7}}), "python takes one argument"),
])
def test_a_malformed_call_is_a_message_not_a_crash(message, says):
    env = ToolEnv()
    state = env.reset(None)
    turn = env.step(state, message)
    assert not turn.done and turn.tool_calls == 1 and turn.tool_errors == 1
    assert turn.messages[0]["role"] == "tool" and says in turn.messages[0]["content"]


def test_an_answer_ends_and_the_cap_refuses_further_calls():
    env = ToolEnv(max_tool_calls=1)
    state = env.reset(None)
    assert env.step(state, {"role": "assistant", "content": "\\boxed{12}"}).reason == "answered"
    ok = env.step(state, fenced("print(6 * 7)"))
    assert ok.messages[0]["content"] == "42\n" and ok.tool_errors == 0 and not ok.done
    capped = env.step(state, fenced("print(1)"))
    assert capped.done and capped.reason == "tool_cap" and capped.messages == [] and capped.tool_calls == 0


def test_program_errors_and_timeouts_come_back_as_text():
    env = ToolEnv(tools=[{"name": "python", "time": 1}])
    state = env.reset(None)
    err = env.step(state, fenced("1 / 0")).messages[0]["content"]
    assert err.endswith("ZeroDivisionError: division by zero")
    t0 = time.monotonic()
    slow = env.step(state, fenced("while True: pass"))
    assert slow.messages[0]["content"] == "error: timed out" and slow.tool_errors == 1
    assert time.monotonic() - t0 < 5


def test_function_tools_in_the_sandbox_and_in_process():
    assert function_schema(multiply) == {"type": "function", "function": {
        "name": "multiply", "description": "Multiply two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}}
    sandboxed = ToolEnv(tools=[{"_target_": "tests.envs.sample_tools:where_am_i"},
                               {"_target_": "tests.envs.sample_tools:multiply"}])
    state = sandboxed.reset(None)
    # in the sandbox: its working directory is the sandbox's /tmp and the host's /work is not there
    here = sandboxed.step(state, hermes({"name": "where_am_i", "arguments": {}})).messages[0]["content"]
    assert here == "/tmp False\n"
    assert sandboxed.step(state, hermes({"name": "multiply", "arguments": {"a": 12, "b": 34}})).messages[0]["content"] == "408\n"
    bad = sandboxed.step(state, hermes({"name": "multiply", "arguments": {"a": 1, "c": 2}})).messages[0]["content"]
    assert bad == "error: multiply takes no argument 'c'"
    local = ToolEnv(tools=[{"_target_": "tests.envs.sample_tools:where_am_i", "in_process": True}])
    assert local.step(local.reset(None), hermes({"name": "where_am_i", "arguments": {}})).messages[0]["content"] \
        == f"{os.getcwd()} True"
    assert [t["function"]["name"] for t in sandboxed.tools] == ["where_am_i", "multiply"]


def test_environment_specs():
    assert build_env(None) is None and build_env("single") is None
    assert isinstance(build_env({"name": "tools", "max_tool_calls": 3}), ToolEnv)
    with pytest.raises(EnvError, match="unknown environment 'chess'"):
        build_env("chess")
    with pytest.raises(EnvError, match="bad option"):
        build_env({"name": "tools", "max_calls": 3})
    with pytest.raises(EnvError, match="the built-in tool is `python`"):
        build_env({"name": "tools", "tools": ["bash"]})


def test_hostile_tool_calls_are_contained_and_leave_nothing(tmp_path):
    """The sandbox's attack batch (tests/sandbox/test_sandbox_reaping.py), sent as tool calls."""
    secret = tmp_path / "host_file"
    env = ToolEnv(tools=[{"name": "python", "time": 1.5, "output_bytes": 64 << 10}], max_tool_calls=100)
    state = env.reset(None)
    me = os.getpid()
    before = set(proc_table())
    for name, src, expected in BATCH:
        turn = env.step(state, fenced(textwrap.dedent(src).strip()))
        text = turn.messages[0]["content"]
        if expected == "timeout":
            assert text.endswith("error: timed out"), name
        if expected == "output_limit":
            assert text.endswith("[output cut]") and len(text) < (64 << 10) + 100, name
    write = env.step(state, fenced(f"open({str(secret)!r}, 'w').write('x')")).messages[0]["content"]
    assert "No such file or directory" in write and not secret.exists()

    def left():
        table = proc_table()
        helper = reaper.helper_pid()
        below = descendants(helper, table) if helper else set()
        return below | (descendants(me, table) - {helper} - before)

    assert wait_until_clean(left) == set()


# The tag reaches the worker in its environment, not its argv: only the sandboxed child carries it.
WORKER = """
import os
from grpo.envs.tools import ToolEnv
env = ToolEnv(tools=[{"name": "python", "time": 60}])
print("calling", flush=True)
env.step(env.reset(None), {"role": "assistant", "content": "```python\\nimport subprocess, time\\n"
         "subprocess.Popen(['/usr/bin/python3', '-c', 'import time; time.sleep(60)', sys.argv[1]])\\n"
         "time.sleep(60)\\n```".replace("sys.argv[1]", repr(os.environ["TAG"]))})
"""


def test_sigkill_during_a_tool_call_leaves_no_sandbox_process():
    tag = f"tooltag-{uuid.uuid4().hex}"
    p = subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), TAG=tag),
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "calling"
        deadline = time.monotonic() + 20
        while not pids_with(tag) and time.monotonic() < deadline:  # the tool's child is running
            time.sleep(0.05)
        assert pids_with(tag), "the tool call never started"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        deadline = time.monotonic() + 5
        while pids_with(tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids_with(tag) == []
    finally:
        if p.poll() is None:
            p.kill()


def test_tools_run_on_the_sandbox_service(tmp_path):
    """`sandbox: URL` sends the python tool's and sandboxed functions' runs to `grpo sandbox serve`."""
    import threading

    from grpo.sandbox.server import SandboxServer

    srv = SandboxServer("127.0.0.1", 0, workers=2, max_queue=4, max_body=64 << 10)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        env = build_env({"name": "tools", "sandbox": srv.url,
                         "tools": ["python", {"_target_": "tests.envs.sample_tools:multiply"}]})
        state = env.reset(None)
        assert env.step(state, fenced("print(6 * 7)")).messages[0]["content"] == "42\n"
        turn = env.step(state, hermes({"name": "multiply", "arguments": {"a": 5, "b": 6}}))
        assert turn.messages[0]["content"] == "30\n" and turn.tool_errors == 0
    finally:
        srv.shutdown()
        srv.server_close()
    # a service that no longer answers: the call is an error message, not a crash
    failed = env.step(state, fenced("print(1)"))
    assert failed.tool_errors == 1 and failed.messages[0]["content"].startswith("error: the tool failed")
