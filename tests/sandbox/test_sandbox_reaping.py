"""Every process a sandbox run starts is reaped, whatever the program does, also when the process
using the sandbox is a subreaper or PID 1 (``docker run`` without ``--init``), which the kernel
hands every orphan of its subtree to.

bwrap's outer process exits without waiting for the sandbox's init, which used to be left as a
``[bwrap] <defunct>`` zombie re-parented to PID 1, one per run. The runs are now started by a helper
process that is a subreaper and reaps everything below it (sandbox/reaper.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from grpo.sandbox import Limits, Sandbox, reaper
from tests.conftest import ROOT, pids_with, proc_table

FAST = Limits(wall_time=1.5, cpu_time=1, memory_mb=256, max_procs=12)

# A child that ignores SIGTERM and sleeps, as an argv literal for the programs below.
_SLEEPER = repr(["/usr/bin/python3", "-c",
                 "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])

# (name, program, expected status): normal, timed out (sleeping, spinning), a fork bomb held by
# the process limit, setsid + double fork, SIGTERM ignored with children, an output flood, a
# crash, and children left running when the program exits.
BATCH = [
    ("hello", "print('hi')", "ok"),
    ("sleep", "import time; time.sleep(30)", "timeout"),
    ("spin", "while True: pass", "timeout"),
    ("fork_bomb", textwrap.dedent(f"""
        import os, time
        n = 0
        while True:
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                os.execv("/usr/bin/python3", {_SLEEPER})
            n += 1
        print(n)
        """), "ok"),
    ("double_fork", textwrap.dedent(f"""
        import os
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/usr/bin/python3", {_SLEEPER})
            os._exit(0)
        os.wait()
        print("parent done")
        """), "ok"),
    ("sigterm_ignored", textwrap.dedent(f"""
        import os, signal, subprocess, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen({_SLEEPER}, start_new_session=True)
        time.sleep(60)
        """), "timeout"),
    ("flood", "while True: print('x' * 4096)", "output_limit"),
    ("segfault", "import ctypes; ctypes.string_at(0)", "signal"),
    ("leaves_children", textwrap.dedent(f"""
        import subprocess
        for _ in range(3):
            subprocess.Popen({_SLEEPER})
        print("bye")
        """), "ok"),
]


def descendants(root: int, table: dict) -> set[int]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        for pid in kids.get(todo.pop(), ()):
            if pid not in out:
                out.add(pid)
                todo.append(pid)
    return out


def run_batch(sb: Sandbox, threads: int, rounds: int = 1) -> list[tuple[str, str]]:
    jobs = BATCH * rounds
    lim = Limits(**{**FAST.__dict__, "stdout_bytes": 64 << 10})
    with ThreadPoolExecutor(threads) as ex:
        results = list(ex.map(lambda job: sb.run(job[1], limits=lim), jobs))
    return [(name, r.status) for (name, _, _), r in zip(jobs, results)]


class Watcher:
    """Records (pid, start time) of every process seen below the sandbox helper while it runs."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            helper = reaper.helper_pid()
            if helper is not None:
                table = proc_table()
                self.seen |= {(pid, table[pid][3]) for pid in descendants(helper, table) if pid in table}
            self._stop.wait(0.01)

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def wait_until_clean(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        problems = check()
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.05)


@pytest.mark.parametrize("threads", [1, 4])
def test_no_process_of_a_batch_is_left_running_or_zombie(threads):
    sb = Sandbox()
    sb.check()
    me = os.getpid()
    before = proc_table()
    old_zombies = {pid for pid, (_, state, *_r) in before.items() if state == "Z"}
    with Watcher() as w:
        statuses = run_batch(sb, threads)
    assert statuses == [(name, expected) for name, _, expected in BATCH]
    helper = reaper.helper_pid()
    assert helper is not None
    assert len({pid for pid, _ in w.seen}) >= 2 * len(BATCH)  # bwrap, its init, the programs...

    def problems():
        table = proc_table()
        left = {}
        # Below the helper: nothing once the runs are over.
        for pid in descendants(helper, table):
            left[pid] = ("below the helper",) + table[pid]
        # Below this process: the helper only (other tests' processes were there before).
        for pid in descendants(me, table) - descendants(helper, table) - {helper} - set(before):
            left[pid] = ("below the test",) + table[pid]
        # No zombie of ours, and none that we saw, wherever it was re-parented (PID 1...).
        for pid, (ppid, state, comm, start) in table.items():
            if state == "Z" and pid not in old_zombies and (ppid == me or (pid, start) in w.seen):
                left[pid] = ("zombie",) + table[pid]
        # Nothing we saw still exists, in any state.
        for pid, start in w.seen:
            if pid in table and table[pid][3] == start:
                left[pid] = ("still there",) + table[pid]
        return left

    assert wait_until_clean(problems) == {}


def test_nothing_of_a_run_is_left_when_it_returns():
    """The helper reports a run's end only once it has reaped the run's bwrap and init: no wait."""
    sb = Sandbox()
    sb.check()
    for name, src, expected in BATCH:
        assert sb.run(src, limits=FAST).status == expected, name
        table = proc_table()
        assert [(pid, table[pid][1:3]) for pid in descendants(reaper.helper_pid(), table)] == [], name


CHILD = r"""
import ctypes, json, os, sys, time
sys.path.insert(0, sys.argv[1])
from tests.conftest import proc_table
from tests.sandbox.test_sandbox_reaping import descendants, run_batch
from grpo.sandbox import Sandbox, reaper

# Like PID 1 of a container: every orphan below us is re-parented to us.
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
me = os.getpid()
statuses = run_batch(Sandbox(), threads=4, rounds=2)

def state():
    table = proc_table()
    helper = reaper.helper_pid()
    return {"zombies": [[pid, table[pid][2]] for pid in table if table[pid][0] == me and table[pid][1] == "Z"],
            "others": [[pid, table[pid][2]] for pid in descendants(me, table) if pid != helper]}

deadline = time.monotonic() + 5
while (s := state()) != {"zombies": [], "others": []} and time.monotonic() < deadline:
    time.sleep(0.05)
helper = reaper.helper_pid()
reaper.shutdown()  # as at exit: the helper ends and is reaped
time.sleep(0.2)
table = proc_table()
print(json.dumps({"statuses": statuses, "during": s, "helper": helper,
                  "after_shutdown": sorted(descendants(me, table)),
                  "zombies_after": [pid for pid in table if table[pid][0] == me and table[pid][1] == "Z"]}))
"""


def test_a_subreaper_parent_is_left_no_zombie():
    """Runs the batch from a process that is a subreaper, as a trainer that is PID 1 is."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert [tuple(s) for s in res["statuses"]] == [(name, expected) for name, _, expected in BATCH] * 2
    assert res["during"] == {"zombies": [], "others": []}
    assert res["helper"] is not None
    assert res["after_shutdown"] == [] and res["zombies_after"] == []


def test_killing_the_host_kills_its_sandboxes():
    """SIGKILL the process using the sandbox mid-run: the helper kills and reaps the run, then exits."""
    token = uuid.uuid4().hex
    src = textwrap.dedent(f"""
        import sys, threading, time
        sys.path.insert(0, {str(ROOT)!r})
        from grpo.sandbox import Limits, Sandbox, reaper
        sb = Sandbox()
        sb.check()
        # The token is put together in the sandbox, so that only the sandbox's sleeper carries it.
        prog = ("import subprocess, time; subprocess.Popen(['/usr/bin/python3', '-c', 'import time; "
                "time.sleep(60)', '{token[:16]}' + '{token[16:]}']); time.sleep(60)")
        threading.Thread(target=sb.run, args=(prog,), kwargs=dict(limits=Limits(wall_time=60, cpu_time=5))).start()
        print(reaper.helper_pid(), flush=True)
        time.sleep(60)
        """)
    host = subprocess.Popen([sys.executable, "-c", src], stdout=subprocess.PIPE, text=True)
    try:
        helper = int(host.stdout.readline())

        def tagged():
            return pids_with(token)

        deadline = time.monotonic() + 20
        while not tagged() and time.monotonic() < deadline:  # wait for the run to get going
            time.sleep(0.05)
        assert tagged()
        host.send_signal(signal.SIGKILL)
        host.wait()

        def left():
            table = proc_table()
            return tagged() + ([helper] if helper in table and table[helper][1] != "Z" else [])

        assert wait_until_clean(left) == []
    finally:
        host.kill()
        host.wait()


def test_a_killed_helper_is_replaced():
    sb = Sandbox()
    assert sb.run("print(1)", limits=FAST).stdout == b"1\n"
    helper = reaper.helper_pid()
    os.kill(helper, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while reaper.helper_pid() == helper and time.monotonic() < deadline:
        time.sleep(0.02)
    r = sb.run("print(2)", limits=FAST)
    assert r.status == "ok" and r.stdout == b"2\n"
    assert reaper.helper_pid() not in (None, helper)


def test_descriptors_reach_the_program_under_their_numbers():
    """The helper maps stdin, the output pipes, the files, the channel and the secret onto the
    numbers the argv names, and nothing else of it (its sockets, other runs' descriptors) leaks in."""
    src = textwrap.dedent("""
        import os, sys
        print(sys.stdin.read(), open("/box/data.txt").read(), os.read(int(os.environ["GRPO_SECRET_FD"]), 100).decode())
        os.write(int(os.environ["GRPO_CHANNEL_FD"]), b"chan")
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds[int(fd)] = os.readlink(f"/proc/self/fd/{fd}").split(":")[0]
            except OSError:
                pass  # the listing's own descriptor
        print(sorted(fds.items()))
        """)
    sb = Sandbox()
    with ThreadPoolExecutor(4) as ex:  # other runs' descriptors pass through the helper meanwhile
        rs = list(ex.map(lambda _: sb.run(src, "in", FAST, files={"data.txt": "file"}, channel=True,
                                          secret_in=b"secret"), range(8)))
    for r in rs:
        assert r.status == "ok", r.stderr
        first, fds = r.stdout.decode().splitlines()
        assert first == "in file secret" and r.channel == b"chan"
        fds = dict(eval(fds))
        # stdin (a memfd), stdout, stderr, and the channel, stats and secret pipes: nothing else.
        assert fds.pop(0) == "/memfd" and sorted(fds.values()) == ["pipe"] * 5, fds


FORK = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from grpo.sandbox import Sandbox, reaper
sb = Sandbox()
assert sb.run("print(1)").stdout == b"1\n"
parent_helper = reaper.helper_pid()
pid = os.fork()
if pid == 0:  # the child gets a helper of its own, the parent keeps its
    r = sb.run("print(2)")
    ok = r.stdout == b"2\n" and reaper.helper_pid() not in (None, parent_helper)
    reaper.shutdown()
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0
assert sb.run("print(3)").stdout == b"3\n" and reaper.helper_pid() == parent_helper
print("ok")
"""


def test_a_forked_child_gets_its_own_helper():
    out = subprocess.run([sys.executable, "-c", FORK, str(ROOT)], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
