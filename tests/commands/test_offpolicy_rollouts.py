"""Off-policy rollouts by a fixed lag (`rollout.max_staleness` = eta, grpo/commands/train.py
`lagged_sample`): which policy version each step trains on, the bound on what is held, stale
rollouts dropped, eta = 0 as the synchronous trainer, the behaviour weights, exact resume."""

import types

import pytest
import torch

from grpo.commands.train import GRPO, Sampled, lagged_sample, train
from grpo.parts.config import ConfigError
from grpo.parts.distributed import Parallel
from grpo.parts.rollout.base import Rollout
from tests.commands.test_train_e2e import cfg_for, read_metrics
from tests.conftest import assert_resumed_exactly, run_interrupted, run_killed


def fake_run(step: int, max_steps: int):
    return types.SimpleNamespace(step=step, max_steps=max_steps, par=Parallel("ddp"))


def fake_grpo(eta: int, B: int = 2, G: int = 2, inflight=None):
    grpo = GRPO.__new__(GRPO)  # only the fields lagged_sample reads
    grpo.algorithm = types.SimpleNamespace(group_size=G)
    grpo.prompts_per_step, grpo.max_staleness = B, eta
    grpo.progress = {"data_pos": 0, "inflight": inflight if inflight is not None else []}
    return grpo


def drawing(log):
    """A draw that records the data position it took and the version of the policy (run.step) it
    sampled with; its B groups' rewards encode the data position."""
    def draw(grpo, run):
        B, G = grpo.prompts_per_step, grpo.algorithm.group_size
        pos = grpo.progress["data_pos"]
        grpo.progress["data_pos"] += B
        log.append((pos, run.step))
        n = B * G
        ro = Rollout(prompt_ids=[[1]] * n, completion_ids=[[2, 3]] * n, texts=["x"] * n,
                     logprobs=[[-0.5, -0.25]] * n, finished=[True] * n)
        rewards = torch.full((n,), float(pos))
        return Sampled(ro, rewards, rewards, {"reward/mean": float(pos), "time/reward": 0.0})
    return draw


@pytest.mark.parametrize("eta", [1, 2, 3])
def test_step_k_trains_on_the_rollout_of_step_k_minus_eta(eta):
    # Steps k = 0..5, B = 2: the rollout for step j takes data positions 2j, 2j + 1, as the
    # synchronous trainer's would. Step k's rollout was generated at the start of step
    # max(0, k - eta): the first eta + 1 come from the initial policy (version 0).
    steps, B, G = 6, 2, 2
    grpo, log = fake_grpo(eta, B, G), []
    draw = drawing(log)
    for k in range(steps):
        ro, shaped, offset, m = lagged_sample(grpo, fake_run(k, steps), draw)
        assert shaped.tolist() == [float(2 * k)] * (B * G)  # step k's own data, in order
        assert (offset, len(ro.completion_ids)) == (0, B * G)
        assert m["async/staleness"] == k - max(0, k - eta) <= eta
        # held: this step's rollout and the eta generated ahead (past the last step too)
        assert m["async/inflight_groups"] == (eta + 1) * B
        assert m["async/dropped_groups"] == 0 and m["reward/mean"] == 2 * k
        assert ro.logprobs == [[-0.5, -0.25]] * (B * G)  # the engine's sampling log-probs travel with it
    # every rollout drawn once, in data order; the one for step j by the policy of max(0, j - eta),
    # the eta for steps past the last one too (held for a run extended later)
    assert log == [(2 * j, max(0, j - eta)) for j in range(steps + eta)]
    assert [b["version"] for b in grpo.progress["inflight"]] == [steps - eta + i for i in range(eta)]


def test_a_rollout_staler_than_eta_is_dropped_and_counted():
    # A run resumed with eta 1 holds rollouts for its step 4 made by versions 1 and 3 (an eta-3 run's
    # queue): version 1 is 3 steps stale at step 4 (> 1), dropped with its B = 2 groups; version 3 is
    # 1 stale, trained on. Then the step generates ahead for step 5 (one rollout, version 4).
    def held(version, tag):
        return {"version": version, "metrics": {"reward/mean": tag, "time/reward": 0.0},
                "groups": [{"prompt_ids": [1], "completion_ids": [[2]] * 2, "texts": ["x"] * 2, "logprobs": [[-1.0]] * 2,
                            "finished": [True] * 2, "model_mask": None, "conversations": None, "rewards": [tag] * 2}] * 2}
    log = []
    grpo = fake_grpo(1, inflight=[held(1, 10.0), held(3, 20.0)])
    ro, shaped, _, m = lagged_sample(grpo, fake_run(4, 10), drawing(log))
    assert shaped.tolist() == [20.0] * 4 and m["async/staleness"] == 1
    assert m["async/dropped_groups"] == 2
    assert log == [(0, 4)] and [b["version"] for b in grpo.progress["inflight"]] == [4]


def test_a_queue_from_a_larger_eta_is_cut_to_eta_plus_one():
    # An eta-3 run's queue at step 4: rollouts by versions 1, 2, 3, 4. Resumed with eta 1 (B = 2
    # groups each): the two beyond eta + 1 (versions 3, 4) go at once (4 groups); then version 1 is
    # popped, 3 steps stale (6 dropped), a rollout by version 4 is generated, version 2 is popped, 2
    # stale (8 dropped), another by version 4 is generated, and the step takes the first of those.
    def held(version):
        return {"version": version, "metrics": {"reward/mean": float(version), "time/reward": 0.0},
                "groups": [{"prompt_ids": [1], "completion_ids": [[2]] * 2, "texts": ["x"] * 2, "logprobs": [[-1.0]] * 2,
                            "finished": [True] * 2, "model_mask": None, "conversations": None,
                            "rewards": [float(version)] * 2}] * 2}
    log = []
    grpo = fake_grpo(1, inflight=[held(v) for v in (1, 2, 3, 4)])
    _, _, _, m = lagged_sample(grpo, fake_run(4, 10), drawing(log))
    assert m["async/dropped_groups"] == 8 and m["async/staleness"] == 0
    assert m["async/inflight_groups"] <= 2 * 2  # (eta + 1) x B
    assert log == [(0, 4), (2, 4)]  # the step's own rollout and step 5's, both by version 4


def test_lagged_rollouts_refuse_what_would_count_the_engine_twice():
    from grpo.commands.train import check_algorithm
    from grpo.parts.config import GRPOAlgorithmConfig

    with pytest.raises(ConfigError, match="leave algorithm.tis_cap=0 and algorithm.mismatch=none"):
        check_algorithm(GRPOAlgorithmConfig(mismatch="token"), 16, max_staleness=2)
    check_algorithm(GRPOAlgorithmConfig(mismatch="token"), 16, max_staleness=0)  # on-policy: fine


@pytest.mark.slow
def test_staleness_zero_is_the_synchronous_trainer_bit_for_bit(tiny_model_dir, tmp_path, monkeypatch):
    # eta = 0 never enters the lagged path (it raises here), and gives the default run's weights.
    # (The default run itself reproduces the README's figures of before the lag landed: 0.891 and
    # 0.820 at steps 100 and 120.)
    import grpo.commands.train as T

    common = ["trainer.max_steps=3", "trainer.eval_every=0", "optim.lr=1e-2"]
    train(cfg_for(tiny_model_dir, *common), tmp_path / "sync")

    def never(*_):
        raise AssertionError("eta = 0 took the lagged path")
    monkeypatch.setattr(T, "lagged_sample", never)
    train(cfg_for(tiny_model_dir, *common, "rollout.max_staleness=0"), tmp_path / "zero")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "sync/checkpoints/step_000003/model/model.safetensors")
    b = load_file(tmp_path / "zero/checkpoints/step_000003/model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_lag_one_weights_tokens_by_the_sampling_policy_s_probabilities(tiny_model_dir, tmp_path):
    # Step 1 trains on the initial policy's rollout with the initial policy: pi_prox = mu exactly
    # (the hf engine samples from the trainer's own module), every weight 1, the synchronous run's
    # step (to float error: the proximal log-probs come from their own no-grad forward, where the
    # synchronous step detaches the training forward's). From step 2 on the rollout is one version old: mu is the recorded sampling
    # probability, not recomputed, so it differs from pi_prox and the weights move off 1.
    common = ["trainer.max_steps=4", "trainer.eval_every=0", "optim.lr=3e-2", "algorithm.beta=0"]
    train(cfg_for(tiny_model_dir, *common), tmp_path / "sync")
    train(cfg_for(tiny_model_dir, *common, "rollout.max_staleness=1"), tmp_path / "lag")
    sync = {r["step"]: r for r in read_metrics(tmp_path / "sync") if "loss" in r}
    lag = {r["step"]: r for r in read_metrics(tmp_path / "lag") if "loss" in r}
    assert [lag[s]["async/staleness"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert [lag[s]["async/generated"] for s in (1, 2, 3, 4)] == [2, 1, 1, 1]  # two up front, then one each
    assert all(lag[s]["async/inflight_groups"] <= 2 * 4 for s in lag)  # (eta + 1) x B, B = 4
    assert lag[1]["reward/mean"] == sync[1]["reward/mean"]  # the same rollout
    assert lag[1]["loss"] == pytest.approx(sync[1]["loss"], abs=1e-6)
    assert lag[1]["grad_norm"] == pytest.approx(sync[1]["grad_norm"], rel=1e-5)
    assert lag[1]["offpolicy/weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert lag[1]["rollout/logprob_abs_diff/max"] < 1e-5
    for s in (2, 3, 4):
        assert lag[s]["rollout/logprob_abs_diff/max"] > 1e-3 and lag[s]["offpolicy/weight_mean"] != 1.0
        assert lag[s]["offpolicy/truncated_frac"] <= 1.0
        # the ratio is to pi_prox (this step's own policy, epochs = 1): exactly 1, nothing clipped;
        # a ratio to the stale mu would not be
        assert lag[s]["ratio/mean"] == pytest.approx(1.0, abs=1e-6) and lag[s]["clip/frac"] == 0.0
    assert lag[2]["reward/mean"] != sync[2]["reward/mean"]  # the initial policy's samples, not step 2's


@pytest.mark.slow
def test_a_finished_lagged_run_extended_trains_as_one_run_to_the_new_end(tiny_model_dir, tmp_path):
    # eta = 1: 4 steps, then resumed to 6, against 6 at once. The 4-step run's last step generated
    # the rollout for step 5 (version 3); the extension trains step 5 on it, as the 6-step run does.
    common = ["trainer.eval_every=0", "trainer.save_every=2", "optim.lr=1e-2", "rollout.max_staleness=1"]
    full, part, _ = run_interrupted(train, lambda *o: cfg_for(tiny_model_dir, *o, *common), tmp_path, 6, 4)
    assert_resumed_exactly(full, part, (5, 6), ("reward/mean", "loss", "grad_norm", "offpolicy/weight_mean",
                                               "async/staleness"), 6)
    assert {r["step"]: r for r in read_metrics(part) if "loss" in r}[5]["async/staleness"] == 1


@pytest.mark.slow
def test_lag_one_killed_mid_run_resumes_to_the_uninterrupted_weights(tiny_model_dir, tmp_path):
    # eta = 1, 6 steps, a checkpoint after step 3 holding the rollout for step 4 (made at the start of
    # step 3). Verifier calls: 1-2 the step-0 evaluation (sampled, greedy), 3-4 step 1 (its own
    # rollout and step 2's), 5 step 2, 6 step 3, 7 step 4: SIGKILLed there, after the checkpoint. Resumed, step 4 must train
    # on the checkpointed rollout (version 2) and land on the uninterrupted run's weights.
    common = ["trainer.eval_every=0", "trainer.save_every=3", "optim.lr=1e-2", "rollout.max_staleness=1",
              "trainer.max_steps=6", "task.verifiers=[{_target_: tests.toy_verifiers.DigitFractionEvenOnlyKilled}]"]
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg_for(tiny_model_dir, *common), full)
    # (the killed run is a subprocess with this process's torch thread count: see run_killed)
    overrides = ["model.path=" + str(tiny_model_dir), "logger=jsonl", "trainer.prompts_per_step=4",
                 "algorithm.group_size=4", "rollout.max_new_tokens=6", "trainer.eval_size=8", "task.eval_size=8", *common]
    run_killed(7, "train", f"hydra.run.dir={part}", *overrides)
    assert sorted(x["step"] for x in read_metrics(part) if "loss" in x) == [1, 2, 3]  # died inside step 4
    train(cfg_for(tiny_model_dir, *common, "trainer.resume=true"), part)
    assert_resumed_exactly(full, part, (4, 5, 6), ("reward/mean", "loss", "grad_norm", "offpolicy/weight_mean",
                                                    "async/staleness", "async/inflight_groups"), 6)
