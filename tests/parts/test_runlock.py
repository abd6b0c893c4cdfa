"""One writer per run dir (grpo/parts/runlock.py): a second start is refused with one line naming the
first's PID, touching nothing; the lock goes when its process does, however it ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from grpo.parts import runlock
from tests.conftest import ROOT, run_grpo

HOLD = """
import sys, time
from grpo.parts import runlock
runlock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def holder(run_dir):
    """Another process holding run_dir's lock, as a running trainer does."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stdout.readline().strip() == "held"
    return p


def snapshot(d):
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(d.rglob("*"))}


def try_lock(run_dir) -> subprocess.CompletedProcess:
    code = "import sys; from grpo.parts import runlock; runlock.acquire(sys.argv[1]); print('took it')"
    return subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_a_second_start_is_one_line_naming_the_holder_and_touches_nothing(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    first = holder(run)
    try:
        before = snapshot(run)
        p = run_grpo("train", f"model.path={tiny_model_dir}", "trainer.resume=true", f"hydra.run.dir={run}",
                     timeout=120)
        assert p.returncode == 2, p.stderr[-3000:]
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"grpo train: error: {run} is in use by another run "
                                                       f"(pid {first.pid})"), p.stderr[-3000:]
        assert snapshot(run) == before  # no config.yaml, no log, nothing rewritten
        # a fresh start in that dir: the same line (not "already holds a run"), and the dir stays
        p = run_grpo("train", f"model.path={tiny_model_dir}", f"hydra.run.dir={run}", timeout=120)
        assert p.returncode == 2 and f"(pid {first.pid})" in p.stderr and snapshot(run) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel let go of the lock with its holder: the next process takes it
    assert try_lock(run).stdout.strip() == "took it"


def test_a_run_holds_its_dir_until_it_is_closed(tiny_model_dir, tmp_path):
    from tests.parts.test_run import toy_run

    run, _ = toy_run(tiny_model_dir, tmp_path, 1, evals=[])
    with run:
        refused = try_lock(tmp_path)
        assert refused.returncode == 1 and f"in use by another run (pid {os.getpid()})" in refused.stderr
        assert runlock.acquire(tmp_path) is False  # this process holds it: let through, still held
        for step in run.steps():
            step.done({"loss": 0.0})
        run.finish()
    assert try_lock(tmp_path).stdout.strip() == "took it"


def test_a_held_lock_whose_holder_ended_says_so(tmp_path):
    """A forked child keeps its parent's lock after the parent is gone: the line says what holds it."""
    code = ("import os, sys, time; from grpo.parts import runlock; runlock.acquire(sys.argv[1]);\n"
            "if os.fork() == 0:\n    time.sleep(120)\nelse:\n    print(os.getpid(), flush=True)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
    parent = int(p.stdout.readline())
    p.wait()
    try:
        with pytest.raises(runlock.RunDirBusy, match=rf"\(pid {parent}, which has ended; a process it started"):
            runlock.acquire(tmp_path)
    finally:
        os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.slow
def test_two_trainers_resumed_in_one_run_dir_do_not_interleave(tiny_model_dir, tmp_path):
    """The issue's case: two `trainer.resume=true` starts. The second is refused while the first
    trains on, and the first logs every step once. The first has far more steps than it can take
    while the second starts (a tiny model takes ~10 steps a second on an idle machine: 28 steps
    ended before the second process was up), and SIGTERM then ends it after a saved step."""
    from tests.commands.test_train_e2e import TOY

    common = [f"model.path={tiny_model_dir}", "logger=jsonl", "trainer.prompts_per_step=4", "algorithm.group_size=4",
              "rollout.max_new_tokens=6", "trainer.eval_size=8", "task.eval_size=8", TOY, "trainer.eval_every=0",
              "trainer.save_every=2", f"hydra.run.dir={tmp_path}"]
    assert run_grpo("train", *common, "trainer.max_steps=2").returncode == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.Popen([sys.executable, "-m", "grpo", "train", *common, "trainer.max_steps=100000",
                              "trainer.resume=true"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:  # until it trains: a step past the checkpoint
            steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if x]
            if max(steps) > 2:
                break
            time.sleep(0.2)
        second = run_grpo("train", *common, "trainer.max_steps=30", "trainer.resume=true", timeout=120)
        assert first.poll() is None, "the first run ended before the second started: give it more steps"
        assert second.returncode == 2 and f"(pid {first.pid})" in second.stderr.strip().splitlines()[-1]
        first.send_signal(signal.SIGTERM)  # preempted: it finishes its step, saves and exits 0
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps[-1] > 2 and steps == list(range(1, steps[-1] + 1))


@pytest.mark.slow
def test_under_torchrun_every_rank_refuses_with_one_line(tiny_model_dir, tmp_path):
    """Rank 0 holds the lock for the launch: refused, every rank stops and rank 0 alone says why
    (torchrun then reports its failed child as it does for any error)."""
    run = tmp_path / "run"
    run.mkdir()
    first = holder(run)
    try:
        before = snapshot(run)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "grpo", "train", f"model.path={tiny_model_dir}", "trainer.resume=true",
                            f"hydra.run.dir={run}"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        ours = [x for x in (p.stdout + p.stderr).splitlines() if x.startswith("grpo train: error")]
        assert p.returncode != 0 and len(ours) == 1 and f"(pid {first.pid})" in ours[0], p.stderr[-3000:]
        assert snapshot(run) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
