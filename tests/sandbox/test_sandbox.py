"""Hostile programs against the sandbox: each must be contained, leave the host untouched and
leave no process behind."""

from __future__ import annotations

import os
import socket
import subprocess
import textwrap
import threading
import time
import uuid

import pytest

from grpo.sandbox import Limits, Sandbox, run

FAST = Limits(wall_time=3, cpu_time=3, memory_mb=256, max_procs=16)


def prog(src: str) -> str:
    return textwrap.dedent(src)


def leftovers(token: str) -> list[int]:
    """Host pids whose command line carries ``token`` (the programs tag their children)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def assert_no_leftovers(token: str) -> None:
    # The kernel tears the namespace down asynchronously; give it a moment.
    deadline = time.time() + 3
    while leftovers(token) and time.time() < deadline:
        time.sleep(0.05)
    assert leftovers(token) == []


def spawn_tagged(token: str, how: str = "") -> str:
    """Source that starts a sleeping child carrying ``token`` in its argv."""
    return f"""
import os, subprocess, sys
subprocess.Popen(["/usr/bin/python3", "-c", "import time, signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)", "{token}"], {how})
"""


def test_hello_and_stdin():
    r = run("import sys; print(sys.stdin.read().upper())", "abc")
    assert r.status == "ok" and r.exit_code == 0 and r.stdout == b"ABC\n"


def test_busy_loop_times_out():
    t = time.monotonic()
    r = run("while True: pass", limits=Limits(wall_time=5, cpu_time=1))
    assert r.status == "timeout"
    assert time.monotonic() - t < 4


def test_sleep_hits_wall_time():
    r = run("import time; time.sleep(30)", limits=Limits(wall_time=1, cpu_time=1))
    assert r.status == "timeout" and 0.9 < r.wall_time < 3


def test_sigterm_ignored_and_tree_killed():
    token = uuid.uuid4().hex
    src = spawn_tagged(token) + "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n"
    r = run(src, limits=Limits(wall_time=1.5, cpu_time=1))
    assert r.status == "timeout"
    assert_no_leftovers(token)


def test_detached_and_double_forked_children_die_with_the_run():
    token = uuid.uuid4().hex
    src = prog(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/usr/bin/python3", ["python3", "-c", "import time; time.sleep(60)", "{token}"])
            os._exit(0)
        """) + spawn_tagged(token, "start_new_session=True") + "print('parent done')\n"
    r = run(src, limits=FAST)
    assert r.status == "ok" and b"parent done" in r.stdout
    assert_no_leftovers(token)


def test_fork_bomb_is_bounded():
    token = uuid.uuid4().hex
    src = prog(f"""
        import os, sys
        n = 0
        for _ in range(200):
            try:
                if os.fork() == 0:
                    os.execv("/usr/bin/python3", ["python3", "-c", "import time; time.sleep(60)", "{token}"])
                n += 1
            except OSError:
                break
        print(n)
        """)
    r = run(src, limits=Limits(wall_time=5, cpu_time=5, max_procs=10))
    assert r.status == "ok"
    assert int(r.stdout) < 10  # the process limit held
    assert_no_leftovers(token)


def test_thread_bomb_is_bounded():
    src = prog("""
        import threading, time
        n = 0
        try:
            for _ in range(1000):
                threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
                n += 1
        except RuntimeError:
            pass
        print(n, flush=True)
        import os; os._exit(0)
        """)
    r = run(src, limits=Limits(wall_time=5, cpu_time=5, max_procs=10))
    assert r.status == "ok" and int(r.stdout) < 10


def test_kill_everything_and_parent_does_not_reach_host():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        src = prog(f"""
            import os, signal
            for pid in (-1, 1, os.getppid(), {victim.pid}, {os.getpid()}):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError as e:
                    print(pid, type(e).__name__)
            print("alive")
            """)
        r = run(src, limits=FAST)
        assert r.status == "ok" and b"alive" in r.stdout
        assert victim.poll() is None  # the host process was not signalled
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("src", [
    "x = bytearray(8 << 30)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))",
])
def test_memory_bombs_fail_inside(src):
    r = run(src, limits=FAST)
    assert r.status == "error" and b"MemoryError" in r.stderr


def test_cannot_raise_its_own_limits():
    src = prog("""
        import resource
        for res in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_NPROC, resource.RLIMIT_NOFILE):
            try:
                resource.setrlimit(res, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                print("raised", res)
            except (ValueError, OSError):
                pass
        print(resource.getrlimit(resource.RLIMIT_NPROC))
        """)
    r = run(src, limits=FAST)
    assert r.status == "ok" and b"raised" not in r.stdout and b"(16, 16)" in r.stdout


def test_output_flood_is_capped():
    r = run("while True: print('x' * 10000)", limits=Limits(wall_time=5, stdout_bytes=100_000))
    assert r.status == "output_limit" and r.stdout_truncated and len(r.stdout) <= 100_000


def test_stderr_flood_is_truncated():
    r = run("import sys\nfor _ in range(1000): sys.stderr.write('e' * 1000)\nprint('ok')",
            limits=Limits(wall_time=5, stderr_bytes=10_000))
    assert r.status == "ok" and r.stderr_truncated and len(r.stderr) == 10_000 and r.stdout == b"ok\n"


def test_filling_the_disk_is_bounded_and_host_untouched():
    before = os.statvfs("/tmp").f_bfree
    src = prog("""
        import os
        total = 0
        for i in range(1000):
            try:
                with open(f"/tmp/fill{i}", "wb") as f:
                    for _ in range(64):
                        f.write(b"x" * (1 << 20)); total += 1 << 20
            except OSError as e:
                if e.errno != 27:  # EFBIG: the file-size limit; go on with a new file
                    print("stopped", e.errno); break
        print(total >> 20)
        for d in ("/", "/usr", "/box", "/etc"):
            try:
                open(os.path.join(d, "evil"), "w").write("x"); print("wrote", d)
            except OSError:
                pass
        """)
    r = run(src, limits=Limits(wall_time=10, file_size_mb=8, tmp_size_mb=32))
    assert r.status == "ok", r.stderr
    assert b"wrote" not in r.stdout and b"stopped 28" in r.stdout  # ENOSPC: the tmpfs cap
    assert int(r.stdout.split()[-1]) <= 40
    assert os.statvfs("/tmp").f_bfree > before - 2560  # host /tmp did not lose the writes


def test_descriptor_exhaustion_is_bounded():
    r = run("fs = []\ntry:\n    while True: fs.append(open('/dev/null'))\nexcept OSError as e:\n    print(len(fs), e.errno)",
            limits=Limits(open_files=32))
    assert r.status == "ok" and int(r.stdout.split()[0]) < 32


def test_host_files_invisible_and_untouchable(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    home_secret = os.path.expanduser("~")
    src = prog(f"""
        import os
        for p in ({str(secret)!r}, {home_secret!r}, "/work", "/root", "/home", "/etc/shadow", "/old_root"):
            print(p, os.path.exists(p))
        for p in ({str(secret)!r}, "/usr/bin/python3"):
            try:
                os.remove(p); print("removed", p)
            except OSError:
                pass
        print(open("/etc/passwd").read())
        """)
    r = run(src, limits=FAST)
    assert r.status == "ok"
    out = r.stdout.decode()
    assert "True" not in out and "removed" not in out
    with open("/etc/passwd") as f:
        host_passwd = f.read()
    assert host_passwd not in out and "sandbox:x:65534" in out
    assert secret.read_text() == "TOPSECRET" and os.path.exists("/usr/bin/python3")


def test_environment_and_proc_environ_hold_no_host_secrets(monkeypatch):
    monkeypatch.setenv("GRPO_TEST_SECRET", "s3cr3t-value")
    src = prog("""
        import os, glob
        print(dict(os.environ))
        for p in glob.glob("/proc/*/environ") + glob.glob("/proc/*/cmdline"):
            try:
                print(open(p, "rb").read())
            except OSError:
                pass
        print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
        """)
    r = run(src, limits=FAST)
    assert r.status == "ok" and b"s3cr3t-value" not in r.stdout
    pids = eval(r.stdout.decode().strip().splitlines()[-1])
    assert max(pids) < 10  # its own PID namespace: only the sandbox's processes


def test_no_state_survives_between_runs():
    r1 = run("open('/tmp/state', 'w').write('left over'); print('ok')", limits=FAST)
    r2 = run("import os; print(os.path.exists('/tmp/state'), os.listdir('/tmp'))", limits=FAST)
    assert r1.stdout == b"ok\n" and r2.stdout.startswith(b"False")


def test_no_network_not_even_host_loopback():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    accepted = []
    srv.settimeout(3)

    def accept():
        try:
            accepted.append(srv.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        src = prog(f"""
            import socket
            for addr in (("127.0.0.1", {port}), ("1.1.1.1", 80)):
                try:
                    socket.create_connection(addr, timeout=1); print("connected", addr)
                except OSError as e:
                    print("refused", addr)
            """)
        r = run(src, limits=FAST)
        assert r.status == "ok" and b"connected" not in r.stdout
    finally:
        t.join()
        srv.close()
    assert accepted == []


def test_ctypes_syscalls_gain_nothing():
    src = prog("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        print("setuid", libc.setuid(0), "unshare", libc.unshare(0x10000000), "mount",
              libc.mount(b"none", b"/usr", b"tmpfs", 0, None), "kill", libc.kill(-1, 9))
        print(os.getuid(), open("/proc/self/status").read().split("CapEff:")[1].split()[0])
        """)
    r = run(src, limits=FAST)
    assert r.status == "ok", r.stderr
    line1, line2 = r.stdout.decode().splitlines()
    assert line1.startswith("setuid -1 unshare -1 mount -1")
    assert line2.split()[1] == "0000000000000000"  # no capabilities


def test_segfault_is_reported():
    r = run("import ctypes; ctypes.string_at(0)", limits=FAST)
    assert r.status == "signal" and r.signal == 11


def test_exit_codes_and_limits_reported():
    r = run("import sys; print('x'); sys.exit(3)")
    assert (r.status, r.exit_code, r.stdout) == ("error", 3, b"x\n")
    assert r.max_rss_kb and r.max_rss_kb > 1000 and r.cpu_time is not None


def test_bad_limits_rejected():
    with pytest.raises(ValueError):
        Limits.from_dict({"wall_time": -1})
    with pytest.raises(ValueError):
        Limits.from_dict({"nope": 1})


def test_missing_bwrap_gives_a_clear_error():
    from grpo.sandbox import SandboxUnavailable
    sb = Sandbox(bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        sb.run("print(1)")


@pytest.mark.slow
def test_parallel_runs_are_isolated_and_fast():
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as ex:
        rs = list(ex.map(lambda i: run(f"print({i} * 2)", limits=FAST), range(60)))
    assert [r.stdout for r in rs] == [f"{i * 2}\n".encode() for i in range(60)]
