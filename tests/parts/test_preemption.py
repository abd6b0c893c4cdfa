"""Preemption (grpo/parts/run.py, _StopRequest): SIGTERM finishes the step, saves, and exits 0 with
one line; under torchrun every rank together, and ranks orphaned by a SIGKILLed launcher do the same
instead of training on."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from grpo.parts import checkpoint
from tests.conftest import ROOT, pids_with


def command(model_dir, run_dir, *extra):
    from tests.commands.test_train_e2e import TOY

    return ["-m", "grpo", "train", f"model.path={model_dir}", "logger=jsonl", "trainer.prompts_per_step=4",
            "algorithm.group_size=4", "rollout.max_new_tokens=6", "trainer.eval_size=8", "task.eval_size=8", TOY,
            "trainer.eval_every=0", "trainer.save_every=0", f"hydra.run.dir={run_dir}", *extra]


def steps(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip() and "loss" in x]


def start(args, run_dir, torchrun=False):
    """Start a long run and wait until it has trained two steps (into the steps, past the start-up)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [
        sys.executable]
    cmd = launcher + args  # args: -m grpo train ..., which torchrun takes as python does
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while len(steps(run_dir)) < 2:
        assert p.poll() is None and time.time() < deadline, p.stderr.read()[-3000:] if p.poll() is not None else ""
        time.sleep(0.2)
    return p


def stopped_line(out: str) -> str:
    lines = [x for x in out.splitlines() if x.startswith("grpo train: stopped by")]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


def assert_saved_where_it_stopped(run_dir, line, why):
    done = steps(run_dir)
    n = done[-1]
    assert done == list(range(1, n + 1))  # every step logged once, the last one too
    ckpt = run_dir / "checkpoints" / f"step_{n:06d}"
    assert line == (f"grpo train: stopped by {why} after step {n} of 200; checkpoint: {ckpt}; "
                    f"continue with trainer.resume=true hydra.run.dir={run_dir}")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert checkpoint.damaged_file(ckpt) is None and checkpoint.load_state(ckpt)["step"] == n
    return n


def test_sigterm_finishes_the_step_saves_and_exits_0(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    p = start(command(tiny_model_dir, run, "trainer.max_steps=200"), run)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    n = assert_saved_where_it_stopped(run, stopped_line(out), "SIGTERM")
    # and it continues from there
    r = subprocess.run([sys.executable, *command(tiny_model_dir, run, f"trainer.max_steps={n + 1}",
                                                 "trainer.resume=true")],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert steps(run) == list(range(1, n + 2))


def ranks_gone(token: str, within: float) -> float:
    t0 = time.time()
    while pids_with(token):
        assert time.time() - t0 < within, f"ranks still running after {within} s"
        time.sleep(0.2)
    return time.time() - t0


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_together_after_a_save(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    p = start(command(tiny_model_dir, run, "trainer.max_steps=200"), run, torchrun=True)
    p.send_signal(signal.SIGTERM)  # torchrun passes it to every rank
    out, err = p.communicate(timeout=120)
    assert "grpo train: error" not in err and "inline_container" not in err
    assert_saved_where_it_stopped(run, stopped_line(out), "SIGTERM")
    ranks_gone(str(run), 30)


@pytest.mark.slow
def test_ranks_orphaned_by_a_sigkilled_torchrun_save_and_stop(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    p = start(command(tiny_model_dir, run, "trainer.max_steps=200"), run, torchrun=True)
    p.send_signal(signal.SIGKILL)
    out, _ = p.communicate(timeout=60)  # the ranks' stdout is the launcher's pipe, which they still hold
    ranks_gone(str(run), 60)
    assert_saved_where_it_stopped(run, stopped_line(out), "the end of its launcher (torchrun)")
