"""Short real training runs on a tiny config-built model (CPU, seconds each)."""

import json

import pytest
import torch

from grpo.cli import compose_config
from grpo.commands.train import train
from tests.conftest import assert_resumed_exactly, run_grpo, run_interrupted, run_killed

pytestmark = pytest.mark.slow
TOY = "task.verifiers=[{_target_: tests.toy_verifiers.DigitFraction}]"


def cfg_for(model_dir, *overrides):
    return compose_config("train", [
        f"model.path={model_dir}", "logger=jsonl", "trainer.prompts_per_step=4", "algorithm.group_size=4",
        "rollout.max_new_tokens=6", "trainer.eval_size=8", "task.eval_size=8", TOY, *overrides])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_metrics_and_a_loadable_checkpoint(tiny_model_dir, tmp_path):
    summary = train(cfg_for(tiny_model_dir, "trainer.max_steps=3", "trainer.eval_every=2", "trainer.save_every=0",
                            "algorithm.beta=0.1", "algorithm.epochs=2"), tmp_path)
    recs = read_metrics(tmp_path)
    train_recs = [r for r in recs if "reward/mean" in r]
    eval_recs = [r for r in recs if "eval/reward/mean" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3]
    assert [r["step"] for r in eval_recs] == [0, 2, 3]  # before training, every 2 steps, after the last
    for key in ("loss", "kl", "time/step", "reward/digit_fraction/mean", "clip/frac", "entropy", "grad_norm",
                "rollout/logprob_abs_diff/max", "groups/zero_std_frac"):
        assert key in train_recs[0], key
    # The hf engine samples from the trainer's own module: its log-probs agree with the trainer's.
    assert all(r["rollout/logprob_abs_diff/max"] < 1e-4 for r in train_recs)
    # beta > 0 and a changed policy after step 1: the k3 KL of step 2+ is positive.
    assert train_recs[-1]["kl"] > 0
    ckpt = tmp_path / "checkpoints" / "step_000003"
    assert summary["checkpoint"] == str(ckpt)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000003"
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    assert loaded.config.head_dim == 64
    assert not list(tmp_path.glob("checkpoints/.tmp*"))  # no half-written checkpoint left behind


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    common = ["trainer.eval_every=0", "trainer.save_every=2", "optim.lr=1e-2", "algorithm.beta=0.05"]
    full, part, (whole, resumed) = run_interrupted(train, lambda *o: cfg_for(tiny_model_dir, *o, *common), tmp_path, 4, 2)
    # The resumed run's summary starts from the run's first evaluation (step 0, made before the
    # stop), not from its own: the same as the uninterrupted run's, both ends.
    assert resumed["first_eval"]["step"] == 0
    same = [k for k in whole["first_eval"] if not k.startswith("time/")]
    assert same and all(resumed["first_eval"][k] == whole["first_eval"][k] for k in same)
    assert resumed["last_eval"]["eval/reward/mean"] == whole["last_eval"]["eval/reward/mean"]
    assert sorted(r["step"] for r in read_metrics(part) if "loss" in r) == [1, 2, 3, 4]  # no duplicated or missing steps
    assert_resumed_exactly(full, part, (3, 4), ("reward/mean", "loss", "grad_norm", "kl", "completion/len_mean"), 4)


def test_tis_with_a_matching_engine_changes_nothing(tiny_model_dir, tmp_path):
    # The hf engine samples from the trainer's own module, so p_trainer / p_engine = 1 (to 1e-6) and
    # truncated importance sampling must leave the loss and the update as they are.
    common = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0", "optim.lr=1e-2"]
    train(cfg_for(tiny_model_dir, *common), tmp_path / "off")
    train(cfg_for(tiny_model_dir, *common, "algorithm.tis_cap=2.0"), tmp_path / "on")
    off = [r for r in read_metrics(tmp_path / "off") if "loss" in r]
    on = [r for r in read_metrics(tmp_path / "on") if "loss" in r]
    for a, b in zip(off, on):
        assert a["reward/mean"] == b["reward/mean"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_a_raising_verifier_costs_samples_not_the_run(tiny_model_dir, tmp_path):
    train(cfg_for(tiny_model_dir, "trainer.max_steps=2", "trainer.eval_every=0",
                  "task.verifiers=[{_target_: tests.toy_verifiers.RaisesOnOdd}]"), tmp_path)
    recs = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert len(recs) == 2
    errors = sum(r["verifier/raises_on_odd/errors"] for r in recs)
    # Rows with an odd first operand raise (reward 0); the others get 1, so the mean is the even share.
    assert 0 < errors < 2 * 16
    for r in recs:
        assert r["reward/mean"] == pytest.approx(1 - r["verifier/raises_on_odd/errors"] / 16)


def test_wandb_logger_writes_offline_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    cfg = cfg_for(tiny_model_dir, "trainer.max_steps=1", "trainer.eval_every=0")
    cfg["logger"] = compose_config("train", ["logger=wandb"])["logger"]
    train(cfg, tmp_path / "run")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert any("reward/mean" in r for r in read_metrics(tmp_path / "run"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["task=nope"], "task=nope: no such option; task is one of"),
        (["trainer.max_stepz=3"], "trainer.max_stepz: no such key; did you mean trainer.max_steps?"),
        (["model.path=/does/not/exist"], "model.path='/does/not/exist': no such directory"),
        (["task.verifiers=[nope]"], "unknown verifier 'nope'"),
        (["algorithm.loss_agg=sum"], "algorithm.loss_agg='sum': use one of"),
        (["trainer.prompts_per_step=0"], "trainer.prompts_per_step=0: must be a whole number >= 1"),
        (["algorithm.beta=abc"], "algorithm.beta='abc': must be a number >= 0"),
        (["rollout.temperature=0"], "rollout.temperature=0 makes the G samples of a prompt identical"),
        # RLOO divided by a group std gave advantages of 1e6 in NeMo-RL (#1518): refused, not made up
        (["algorithm.adv_estimator=rloo", "algorithm.adv_scale=group"],
         "algorithm.adv_scale=group applies to adv_estimator=grpo only"),
        (["algorithm.loss=cispo", "algorithm.is_level=sequence"], "algorithm.loss=cispo weights tokens"),
        (["algorithm.overlong_cache=5000"], "algorithm.overlong_cache=5000 is more than the budget"),
        (["algorithm.mismatch=token", "algorithm.mismatch_low=2", "algorithm.mismatch_high=2"],
         "algorithm.mismatch_low=2.0 must be below algorithm.mismatch_high=2.0"),
        (["algorithm.adv_estimator=ppo"], "algorithm.adv_estimator='ppo': use one of"),
        # off-policy rollouts: the behaviour weight already corrects the engine's mismatch
        (["rollout.max_staleness=1", "algorithm.tis_cap=2"], "leave algorithm.tis_cap=0 and algorithm.mismatch=none"),
        (["rollout.max_staleness=1", "algorithm.dynamic_sampling=true"], "with algorithm.dynamic_sampling is not"),
        (["rollout.max_staleness=1", "algorithm.behav_cap=0.5"], "algorithm.behav_cap=0.5: must be a number >= 1"),
    ],
)
def test_bad_config_stops_before_training_with_one_clear_message(args, message, tmp_path):
    r = run_grpo("train", f"hydra.run.dir={tmp_path / 'run'}", "logger=jsonl", *args, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("grpo train: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # a command that cannot start leaves no run dir


def test_dynamic_sampling_killed_while_oversampling_resumes_bit_exact(tiny_model_dir, tmp_path):
    # About half the groups have equal rewards (DigitFractionEvenOnly: 0 for odd first operands), so
    # steps take a second rollout and carry the extra kept groups; the checkpoint after step 3 holds
    # some. The killed run gets SIGKILL inside step 5's second rollout (the verifier's 11th call:
    # the step-0 evaluation, then steps 1..4's 2 + 2 + 2 + 1 rollouts, then step 5's first); resumed,
    # it must train on the checkpoint's buffer and land on the uninterrupted run's weights.
    common = ["trainer.eval_every=0", "trainer.save_every=3", "optim.lr=1e-2", "algorithm.dynamic_sampling=true",
              "trainer.max_steps=5", "task.verifiers=[{_target_: tests.toy_verifiers.DigitFractionEvenOnlyKilled}]"]
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg_for(tiny_model_dir, *common), full)
    a = {r["step"]: r for r in read_metrics(full) if "loss" in r}
    assert [a[s]["dapo/gen_batches"] for s in sorted(a)] == [2, 2, 2, 1, 2]  # what the call count above assumes
    assert a[3]["dapo/buffer"] > 0 and all(a[s]["dapo/kept_groups"] == 4 for s in a)

    overrides = ["model.path=" + str(tiny_model_dir), "logger=jsonl", "trainer.prompts_per_step=4", "algorithm.group_size=4",
                 "rollout.max_new_tokens=6", "trainer.eval_size=8", "task.eval_size=8", *common]
    run_killed(11, "train", f"hydra.run.dir={part}", *overrides)
    assert sorted(r["step"] for r in read_metrics(part) if "loss" in r) == [1, 2, 3, 4]  # died inside step 5
    assert not (part / "checkpoints/step_000004").exists()

    train(cfg_for(tiny_model_dir, *common, "trainer.resume=true"), part)
    assert_resumed_exactly(full, part, (4, 5), ("reward/mean", "loss", "grad_norm", "dapo/buffer", "dapo/gen_batches"), 5)


def test_dynamic_sampling_that_keeps_nothing_warns_and_goes_on(tiny_model_dir, tmp_path, caplog):
    # The untrained model never writes a boxed right answer: every reward is 0, every group is
    # dropped. Each step tries max_gen_batches = 2 rollouts (16 prompts of data), warns, and skips
    # its update: the weights stay the initial ones and the run ends normally.
    from safetensors.torch import load_file

    summary = train(cfg_for(tiny_model_dir, "trainer.max_steps=2", "trainer.eval_every=0", "algorithm.dynamic_sampling=true",
                            "algorithm.max_gen_batches=2", "task.verifiers=[{_target_: tests.toy_verifiers.BoxedExact}]"),
                    tmp_path)
    recs = [r for r in read_metrics(tmp_path) if "dapo/kept_groups" in r]
    assert [(r["dapo/gen_batches"], r["dapo/kept_groups"]) for r in recs] == [(2.0, 0.0), (2.0, 0.0)]
    assert summary["steps"] == 2
    assert sum("0 of 4 groups had differing rewards after 2 rollouts" in m for m in caplog.messages) == 2
    w0, w1 = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "checkpoints/step_000002/model/model.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_file_task_row_without_answer_is_reported(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n{"prompt": "What is 2 + 2?"}\n')
    r = run_grpo("train", f"hydra.run.dir={tmp_path / 'run'}", "logger=jsonl", "task=file", f"task.path={data}", timeout=120)
    assert r.returncode == 2
    assert f"{data}: line 2: missing field 'answer'" in r.stderr
    assert not (tmp_path / "run").exists()


def test_terminal_output_refused_start_and_verbose(tiny_model_dir, tmp_path, monkeypatch):
    """One short run as a user sees it: one bar and the summary, nothing from the libraries (it is in
    train.log); a second start in the same run dir is refused without touching it; -v brings the
    libraries' output back."""
    monkeypatch.delenv("WANDB_MODE", raising=False)  # logger=wandb as by default: offline, no key
    monkeypatch.setenv("HOME", str(tmp_path))
    run = tmp_path / "run"
    args = ["train", f"hydra.run.dir={run}", f"model.path={tiny_model_dir}", "trainer.prompts_per_step=4",
            "algorithm.group_size=4", "trainer.eval_size=4", "rollout.max_new_tokens=6", TOY]
    r = run_grpo(*args, "trainer.max_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[1] == "done after 1 steps"
    bar = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert bar and all(ln.startswith("grpo: ") for ln in bar), bar  # only the progress bar's frames
    assert (run / "train.log").exists() and list((run / "wandb").glob("offline-run-*"))
    record = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (run / ".hydra").iterdir()}
    assert sorted(record) == ["config.yaml", "overrides.yaml"]

    r = run_grpo(*args, "trainer.max_steps=2", "trainer.seed=5")  # no resume: refused, nothing touched
    assert r.returncode == 2 and r.stderr.strip() == (
        f"grpo train: error: {run} already holds a run: continue it with trainer.resume=true, "
        "or start a new one in another hydra.run.dir")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (run / ".hydra").iterdir()} == record

    r = run_grpo("-v", *args, "trainer.max_steps=2", "trainer.resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wandb:" in r.stderr and "Loading weights" in r.stderr
    assert "resumed from" in r.stderr  # the project's INFO records too


def test_run_dir_reuse_resume_after_a_torn_line_and_checkpoint_pruning(tiny_model_dir, tmp_path):
    from grpo.parts.config import ConfigError

    common = ["trainer.eval_every=0", "trainer.save_every=1", "trainer.keep_checkpoints=2"]
    train(cfg_for(tiny_model_dir, "trainer.max_steps=3", *common), tmp_path)
    # keep 2: step 1 pruned, steps 2 and 3 kept
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000002", "step_000003"]
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg_for(tiny_model_dir, "trainer.max_steps=3", *common), tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "reward/me')  # a line torn by a kill
    # Resume from step 2 with keep 1: the checkpoint just written must survive, whatever is newer.
    train(cfg_for(tiny_model_dir, "trainer.max_steps=3", f"trainer.resume={tmp_path / 'checkpoints/step_000002'}",
                  "trainer.eval_every=0", "trainer.save_every=1", "trainer.keep_checkpoints=1"), tmp_path)
    steps = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3]
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "checkpoints" / latest / "state.pt").exists()


def test_dropout_is_off_in_the_policy(tiny_model_dir, tmp_path):
    # With attention dropout 0.5 left on, the trainer's log-probs would be noisy; the engine samples
    # without dropout, so the gap stays at float noise only if the trainer turned it off.
    import shutil

    from transformers import AutoConfig

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.attention_dropout = 0.5
    cfg.save_pretrained(model_dir)
    train(cfg_for(model_dir, "trainer.max_steps=1", "trainer.eval_every=0"), tmp_path / "run")
    rec = [r for r in read_metrics(tmp_path / "run") if "loss" in r][0]
    assert rec["rollout/logprob_abs_diff/max"] < 1e-4


def test_a_reward_model_is_a_reward_source_and_the_verifiers_only_measure(tiny_model_dir, tiny_rm_dir, tmp_path):
    rm_dir = tiny_rm_dir
    run = tmp_path / "run"
    train(cfg_for(tiny_model_dir, "trainer.max_steps=2", "trainer.eval_every=0", f"reward_model.path={rm_dir}",
                  "reward_model.scale=0.5"), run)
    recs = read_metrics(run)
    steps = [r for r in recs if "reward/mean" in r]
    evals = [r for r in recs if "eval/reward/mean" in r]
    # The training reward is sigmoid(score / 0.5) of the reward model: its mean is the logged
    # reward/rm/mean, and the toy verifier (weight 0) never reaches it.
    assert all(r["reward/mean"] == pytest.approx(r["reward/rm/mean"]) for r in steps)
    assert all("reward/digit_fraction/mean" not in r for r in steps)
    # Evaluation measures with the task's verifier and reports the reward model's score beside it.
    assert all("eval/reward/digit_fraction/mean" in r and "eval/rm_score" in r for r in evals)


def test_a_reward_model_alone_trains_and_evaluates(tiny_model_dir, tiny_rm_dir, tmp_path):
    rm_dir = tiny_rm_dir
    run = tmp_path / "run"
    train(cfg_for(tiny_model_dir, "trainer.max_steps=1", "trainer.eval_every=0", "task.verifiers=[]",
                  f"reward_model.path={rm_dir}"), run)
    evals = [r for r in read_metrics(run) if "eval/reward/mean" in r]
    # No verifiers: evaluation scores with the training reward, sigmoid(score) of the reward model.
    assert [r["step"] for r in evals] == [0, 1]
    assert all(0.0 < r["eval/reward/mean"] < 1.0 and "eval/rm_score" in r for r in evals)
