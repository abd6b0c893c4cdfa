"""The run skeleton (grpo/parts/run.py) on its own: the rhythm of evaluations, logs and checkpoints,
resume, closing, and the summary, with a tiny real model and a loop that does no learning."""

import json

import pytest
import torch

from grpo.parts import checkpoint
from grpo.parts.config import LoggerConfig
from grpo.parts.modeling import load_model
from grpo.parts.run import Run


class Part:
    """A part the run must close (an engine, a reward source)."""

    def __init__(self):
        self.closed = 0

    def close(self):
        self.closed += 1


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def toy_run(model_dir, run_dir, max_steps, resume=False, evals=None, parts=()):
    """A Run whose loop counts its data, and whose evaluation scores step / 10."""
    run = Run("toy", run_dir, {"toy": True}, max_steps=max_steps, seed=0, resume=resume, eval_every=2,
              save_every=3, keep_checkpoints=2, log_every=2, log_first=True, logger=LoggerConfig())
    run.own(*parts)
    run.tokenizer(str(model_dir))
    model = load_model(str(model_dir))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    progress = run.restore({"model": (model, opt)}, progress={"data_pos": 0})
    run.evaluate_with(lambda: (evals.append(run.step) or {"eval/reward/mean": run.step / 10}, []))
    return run, progress


def test_the_rhythm_of_a_run_and_its_resume(tiny_model_dir, tmp_path, capsys):
    evals, part = [], Part()
    run, progress = toy_run(tiny_model_dir, tmp_path, 5, evals=evals, parts=(part, part))
    with run:
        for step in run.steps():
            assert step.index == run.step  # 0-based: the steps done before this one
            progress["data_pos"] += 4
            step.done({"loss": float(step.index)}, bar={"loss": "x"})
        summary = run.finish(lambda first, last: [f"eval: {first['eval/reward/mean']} -> {last['eval/reward/mean']}"])
    assert part.closed == 1  # owned twice, closed once
    # eval_every=2 over 5 steps: before step 1, after steps 2 and 4, and after the last (5)
    assert evals == [0, 2, 4, 5]
    got = records(tmp_path)
    # log_every=2 with log_first: steps 1, 2, 4 and the last; each step's record before its evaluation
    assert [(r["step"], "loss" in r) for r in got] == [(0, False), (1, True), (2, True), (2, False), (4, True),
                                                      (4, False), (5, True), (5, False)]
    # save_every=3: step 3 and the last; keep_checkpoints=2 keeps both
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000003", "step_000005"]
    assert checkpoint.load_state(tmp_path / "checkpoints" / "step_000005")["data_pos"] == 5 * 4
    assert summary["steps"] == 5 and summary["checkpoint"] == str(tmp_path / "checkpoints" / "step_000005")
    assert summary["first_eval"]["eval/reward/mean"] == 0.0 and summary["last_eval"]["eval/reward/mean"] == 0.5
    out = capsys.readouterr().out
    assert "done after 5 steps" in out and "eval: 0.0 -> 0.5" in out and f"run dir:     {tmp_path}" in out

    # Resumed to 7 steps: the progress and the step come back; the first evaluation is the run's own
    # (from metrics.jsonl, not a new one); step 6 (every 2) and 7 (the last) evaluate.
    evals = []
    run, progress = toy_run(tiny_model_dir, tmp_path, 7, resume=True, evals=evals)
    with run:
        assert run.step == 5 and progress == {"data_pos": 20}
        assert [step.index for step in run.steps() if step.done({"loss": 0.0}) is None] == [5, 6]
        summary = run.finish()
    assert evals == [6, 7]
    assert summary["first_eval"]["eval/reward/mean"] == 0.0 and summary["last_eval"]["eval/reward/mean"] == 0.7
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == [1, 2, 4, 5, 6, 7]


def test_a_failing_loop_still_closes_what_the_run_built(tiny_model_dir, tmp_path):
    part = Part()
    with pytest.raises(ZeroDivisionError):
        run, _ = toy_run(tiny_model_dir, tmp_path, 3, evals=[], parts=(part,))
        with run:
            for step in run.steps():
                1 / 0
    assert part.closed == 1


def test_a_step_must_say_it_is_done(tiny_model_dir, tmp_path):
    run, _ = toy_run(tiny_model_dir, tmp_path, 2, evals=[])
    with run, pytest.raises(RuntimeError, match="without step.done"):
        for step in run.steps():
            pass


def test_steps_need_what_the_checkpoints_hold(tmp_path):
    with Run("toy", tmp_path, {}, max_steps=1, seed=0, resume=False, logger=LoggerConfig()) as run:
        with pytest.raises(RuntimeError, match="restore"):
            next(run.steps())


def test_a_part_that_fails_to_close_does_not_keep_the_others_open(tiny_model_dir, tmp_path):
    class Broken(Part):
        def close(self):
            super().close()
            raise OSError("cannot close")

    first, broken, last = Part(), Broken(), Part()
    run, _ = toy_run(tiny_model_dir, tmp_path, 1, evals=[], parts=(first, broken, last))
    with pytest.raises(OSError, match="cannot close"):
        run.close()
    assert (first.closed, broken.closed, last.closed) == (1, 1, 1)
    run.close()  # once only
    assert last.closed == 1


def test_the_loop_s_own_error_is_not_hidden_by_a_part_that_fails_to_close(tiny_model_dir, tmp_path, caplog):
    class Broken(Part):
        def close(self):
            super().close()
            raise OSError("cannot close")

    run, _ = toy_run(tiny_model_dir, tmp_path, 1, evals=[], parts=(Broken(),))
    with pytest.raises(ZeroDivisionError):  # not the OSError: that one is logged
        with run:
            1 / 0
    assert "cannot close" in caplog.text


def test_a_closed_run_lets_go_of_its_models(tiny_model_dir, tmp_path):
    """The evaluation closure refers back to the run (a reference cycle): closing must let go of the
    models, or a sharded one would outlive the process group it holds until interpreter exit."""
    import gc
    import weakref

    gc.disable()  # only reference counting frees anything here: a cycle would keep the model
    try:
        run, _ = toy_run(tiny_model_dir, tmp_path, 1, evals=[])
        model = weakref.ref(run._models["model"][0])
        with run:
            for step in run.steps():
                step.done({"loss": 0.0})
        del run
        assert model() is None
    finally:
        gc.enable()


def test_the_verifiers_workers_start_when_the_run_builds_its_rewards(tiny_model_dir, tmp_path, monkeypatch):
    # The math verifier's pool starts lazily on its first comparison; a trainer's first step that
    # needed it paid for the workers' imports (0.5-0.9 s of sympy and math-verify in bench_async's
    # runs). Run.rewards starts them at build, not waiting for them: the workers are processes of
    # this one before any completion is scored.
    import os

    from grpo.parts.config import VerifierConfig

    monkeypatch.setenv("GRPO_VERIFIER_WARMUP", "1")  # the default (tests/conftest.py sets 0 for the others)
    run = Run("toy", tmp_path / "run", {"toy": True}, max_steps=1, seed=0, resume=False, eval_every=0,
              save_every=0, keep_checkpoints=1, log_every=1, log_first=True, logger=LoggerConfig())
    with run:
        run.tokenizer(str(tiny_model_dir))
        rewards, verifiers, _ = run.rewards({"verifiers": ["math"]}, VerifierConfig())
        (entry,) = verifiers.fn.entries
        pids = entry.verifier._pool.pids()  # the pool exists: started, not left to the first map
        assert len(pids) == entry.verifier.num_workers
        assert all(os.path.exists(f"/proc/{p}") for p in pids)
    assert not any(os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read().lower()
                   for p in pids)  # and the run closes them
