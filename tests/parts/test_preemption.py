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


def rank_pid(token: str, rank: int) -> int:
    """The pid of the worker with RANK=rank among the processes whose command line holds `token`
    (torchrun's launcher has no RANK in its environment)."""
    for pid in pids_with(token):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no rank {rank} among the processes of {token}")


@pytest.mark.slow
def test_a_sigstopped_rank_is_named_and_the_job_ends_at_the_collective_timeout(tiny_model_dir, tmp_path):
    """Before: a SIGSTOPped rank left the other blocked in its next collective for PyTorch's 30 min,
    saying nothing. Now rank 0 names the silent rank and where it waits after
    parallel.silent_rank_warn_s (3 s here), and the job ends after parallel.collective_timeout_s
    (20 s here) with nothing left running."""
    run = tmp_path / "run"
    p = start(command(tiny_model_dir, run, "trainer.max_steps=100000", "parallel.collective_timeout_s=20",
                      "parallel.silent_rank_warn_s=3"), run, torchrun=True)
    stopped = rank_pid(str(run), 1)
    t0 = time.time()
    os.kill(stopped, signal.SIGSTOP)
    try:
        out, err = p.communicate(timeout=240)
    finally:
        try:
            os.kill(stopped, signal.SIGKILL)
        except ProcessLookupError:
            pass
    took = time.time() - t0
    assert p.returncode != 0
    named = [x for x in err.splitlines() if "rank 1 has not answered for" in x]
    assert len(named) == 1, err[-3000:]  # once, by rank 0 (the lowest live rank), not once per beat
    assert named[0].startswith("grpo: rank 0: rank 1 has not answered for ")
    assert " while this rank is at step " in named[0] or " while this rank is at the " in named[0]
    assert "parallel.collective_timeout_s=20 s" in named[0]
    # the wait ends at the timeout (20 s), not PyTorch's 30 min: the rest is the launcher's teardown
    assert 20 <= took < 200, took
    ranks_gone(str(run), 60)
    gave_up = [x for x in err.splitlines() if x.startswith("grpo train: error (rank 0): a collective gave up")]
    # one line, not gloo's traceback (torchrun's own ChildFailedError report follows, as for any failed rank)
    assert len(gave_up) == 1 and f"{ROOT}/grpo/" not in err, err[-3000:]


class Beating:
    """A fake peer rank in a thread: beats its counter in the store every 0.2 s while `on`."""

    def __init__(self, store, key):
        import threading as th

        self.store, self.key, self.on, self.done = store, key, th.Event(), th.Event()
        th.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.done.is_set():
            if self.on.is_set():
                self.store.add(self.key, 1)
            time.sleep(0.2)


def said(capsys, about):
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("grpo: rank ") and f"rank {about} " in x]


def store():
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def test_silent_ranks_names_the_silent_one_once_and_its_return(capsys):
    """SilentRanks against a real TCP store on loopback: rank 0 watching, rank 1 a thread that beats,
    stops for 5 s (after_s 2: named once, not once per beat), then beats again (its return named)."""
    from grpo.parts.distributed import SilentRanks

    st = store()
    watch = SilentRanks(0, 2, after_s=2.0, timeout_s=99, where=lambda: "step 7", store=st)
    peer = Beating(st, watch.prefix + "1")
    try:
        peer.on.set()
        time.sleep(1.0)
        peer.on.clear()
        time.sleep(5.0)
        peer.on.set()
        time.sleep(1.5)
    finally:
        peer.done.set()
        watch.close()
    lines = said(capsys, 1)
    assert len(lines) == 2, lines
    assert lines[0].startswith("grpo: rank 0: rank 1 has not answered for ")
    assert "while this rank is at step 7;" in lines[0] and "parallel.collective_timeout_s=99 s" in lines[0]
    assert lines[1].startswith("grpo: rank 0: rank 1 answers again after ")


def test_silent_ranks_the_lowest_live_rank_speaks_both_ways(capsys):
    """Rank 0 silent, then back: rank 1 (the lowest still beating) names it both times; rank 2
    says nothing."""
    from grpo.parts.distributed import SilentRanks

    st = store()
    one = SilentRanks(1, 3, after_s=2.0, timeout_s=99, where=lambda: "step 2", store=st)
    two = SilentRanks(2, 3, after_s=2.0, timeout_s=99, where=lambda: "step 2", store=st)
    zero = Beating(st, one.prefix + "0")
    time.sleep(4.0)
    zero.on.set()
    time.sleep(1.5)
    zero.done.set()
    one.close(), two.close()
    lines = said(capsys, 0)
    assert len(lines) == 2, lines
    assert lines[0].startswith("grpo: rank 1: rank 0 has not answered for ")
    assert lines[1].startswith("grpo: rank 1: rank 0 answers again after ")


def test_a_rank_that_closed_its_watch_is_not_silent(capsys):
    """At a run's end the ranks close their watches at different moments (rank 0 may spend
    minutes closing wandb or an engine): a rank that said goodbye is never named."""
    from grpo.parts.distributed import SilentRanks

    st = store()
    zero = SilentRanks(0, 2, after_s=1.0, timeout_s=99, where=lambda: "the end", store=st)
    one = SilentRanks(1, 2, after_s=1.0, timeout_s=99, where=lambda: "the end", store=st)
    time.sleep(1.0)
    one.close()
    time.sleep(3.0)  # three times after_s
    zero.close()
    assert said(capsys, 1) == []


def test_only_a_collective_s_timeout_is_reported_as_one():
    """The CLI turns a collective's timeout into one line; any other error that says "timed out" (a
    rollout server's connection, a sandbox call) keeps its traceback."""
    from grpo.parts.distributed import collective_timed_out

    gloo = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
            "20000ms for recv operation to complete")  # what the SIGSTOP test above gets from torch 2.13
    assert collective_timed_out(RuntimeError(gloo))
    assert not collective_timed_out(RuntimeError("rollout server http://h:1: not reachable ([Errno 110] Connection timed out)"))
    assert not collective_timed_out(TimeoutError("timed out"))
