"""vLLM's processes end with the trainer, also when the trainer is killed (SIGTERM or SIGKILL: no
`close()`, no atexit), not only when it closes the engine. See EngineWatchdog in grpo/parts/rollout/vllm.py.

Two real engine starts (about 20 s each on CPU) plus a check of the watchdog on stand-in processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, proc_table

pytest.importorskip("vllm", reason="vllm is not installed: `make setup-vllm` installs it (CI does)")

pytestmark = pytest.mark.slow

ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


def descendants(root: int) -> dict[int, tuple[int, str, str, int]]:
    table = proc_table()
    out, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, row in table.items():
            if row[0] == parent and pid not in out:
                out[pid] = row
                todo.append(pid)
    return out


def survivors(procs: dict[int, tuple], timeout: float) -> list[tuple[int, str]]:
    """The processes of `procs` still running (a zombie has ended) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        table = proc_table()
        left = [(pid, row[2]) for pid, row in procs.items()
                if pid in table and table[pid][3] == row[3] and table[pid][1] not in "ZX"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def kill_leftovers(procs: dict[int, tuple]) -> None:
    table = proc_table()
    for pid, row in procs.items():
        if pid in table and table[pid][3] == row[3]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def start_trainer(script: str, args: list[str], log: Path, timeout: float = 600) -> subprocess.Popen:
    """Run `script` until it prints READY (its output goes to `log`)."""
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in ENV.items()}, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-c", script, *args], stdout=out, stderr=subprocess.STDOUT,
                             cwd=ROOT, env=env)
    deadline = time.monotonic() + timeout
    while b"READY" not in log.read_bytes():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            p.wait()
            pytest.fail(f"the trainer did not get ready:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)
    return p


TRAINER = textwrap.dedent("""
    import sys, time
    from grpo.parts.modeling import load_model, load_tokenizer
    from grpo.parts.rollout.vllm import VLLMEngine

    if __name__ == "__main__":
        path = sys.argv[1]
        engine = VLLMEngine(load_model(path), load_tokenizer(path), path, "float32", "cpu", kv_cache_gib=0.0625,
                            max_num_seqs=8, max_model_len=256)
        print("READY", flush=True)
        time.sleep(600)
    """)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_engine_processes_end_with_a_killed_trainer(tiny_model_dir, tmp_path, sig):
    trainer = start_trainer(TRAINER, [str(tiny_model_dir)], tmp_path / "trainer.log")
    procs = descendants(trainer.pid)
    try:
        # vLLM's engine runs in processes of its own (VLLM::EngineCore, VLLM::Worker), next to the watchdog.
        assert len(procs) >= 2, procs
        trainer.send_signal(sig)
        trainer.wait()
        assert survivors(procs, timeout=15) == []
    finally:
        trainer.kill()
        trainer.wait()
        kill_leftovers(procs)


STAND_IN = textwrap.dedent("""
    import subprocess, sys, time
    from grpo.parts.rollout.vllm import EngineWatchdog

    # An "engine" that ignores SIGTERM and has a child of its own, started after the watchdog.
    ENGINE = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    if __name__ == "__main__":
        mode = sys.argv[1]
        before = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # not the engine's
        wd = EngineWatchdog(grace=1.0)
        engine = subprocess.Popen([sys.executable, "-c", ENGINE if mode != "close" else "import time; time.sleep(60)"])
        if mode == "starting":  # killed while the engine starts: the watchdog has to find it itself
            time.sleep(1.5)
        else:
            time.sleep(0.5)
            wd.engine_started()
        if mode == "close":  # the engine shuts down, then the trainer closes the watchdog
            engine.kill()
            engine.wait()
            wd.close()
            print("CLOSED", wd.proc.returncode, flush=True)
        print("READY", before.pid, flush=True)
        time.sleep(60)
    """)


@pytest.mark.parametrize("mode", ["started", "starting", "close"])
def test_watchdog_on_stand_in_processes(tmp_path, mode):
    log = tmp_path / "trainer.log"
    trainer = start_trainer(STAND_IN, [mode], log, timeout=120)
    procs = descendants(trainer.pid)
    before = int(log.read_text().split("READY")[1].split()[0])
    try:
        others = {pid: row for pid, row in procs.items() if pid != before}
        if mode == "close":  # the watchdog said goodbye and was reaped
            assert "CLOSED 0" in log.read_text() and others == {}
        else:  # the engine, its child and the watchdog
            assert len(others) == 3, others
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        # The engine ignores SIGTERM: it and its child are SIGKILLed after the grace period.
        assert survivors(others, timeout=10) == []
        assert survivors({before: procs[before]}, timeout=0) != []  # what was there before is left alone
    finally:
        trainer.kill()
        trainer.wait()
        kill_leftovers(procs)
