"""`grpo ppo` end to end on tiny config-built models (CPU, seconds)."""

import json

import pytest
import torch

from grpo.cli import compose_config
from grpo.commands.ppo import run_ppo
from tests.conftest import run_interrupted

pytestmark = pytest.mark.slow
TOY = "task.verifiers=[{_target_: tests.toy_verifiers.DigitFraction}]"


def overrides(model_dir, *extra):
    """A small run's command-line overrides: the tiny model, 4 prompts x 2 samples of 6 tokens."""
    return [f"model.path={model_dir}", "task=arithmetic", TOY, "task.eval_size=8", "trainer.eval_size=8",
            "rollout.max_new_tokens=6", "trainer.prompts_per_step=4", "ppo.samples=2", "trainer.eval_every=0", *extra]


def cfg(model_dir, *extra):
    return compose_config("ppo", overrides(model_dir, *extra))


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_with_a_reward_model_logs_the_invariants_and_both_scores(tiny_model_dir, tiny_rm_dir, tmp_path):
    summary = run_ppo(cfg(tiny_model_dir, f"reward_model.path={tiny_rm_dir}", "trainer.max_steps=3", "ppo.kl_target=1.0"),
                      tmp_path)
    recs = metrics(tmp_path)
    steps = [r for r in recs if "objective/scores" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        # The first minibatch of every step scores the sampling policy: ratio 1, no engine gap (hf engine).
        assert r["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert r["rollout/logprob_abs_diff/mean"] < 1e-4
        for key in ("objective/kl", "objective/rlhf_reward", "policy/clipfrac", "policy/approxkl", "val/clipfrac",
                    "val/explained_var", "val/mean", "loss/policy", "loss/value", "kl/beta", "completion/len_mean",
                    "completion/no_eos_frac"):
            assert key in r, key
        assert r["objective/rlhf_reward"] == pytest.approx(r["objective/scores"] - r["kl/beta"] * r["objective/kl"])
    # Step 1 samples the reference itself: its k1 KL is 0 exactly, and the adaptive beta then shrinks
    # (kl / target - 1 = -1, clamped to -0.2): 0.05 * (1 - 0.2 * 8 / 10000).
    assert steps[0]["objective/kl"] == 0.0 and steps[1]["kl/beta"] == pytest.approx(0.05 * (1 - 0.2 * 8 / 10000))
    evals = [r for r in recs if "eval/reward/mean" in r]
    assert [r["step"] for r in evals] == [0, 3] and all("eval/rm_score" in r and "eval/kl" in r for r in evals)
    # the summary's "first -> last" are the evaluations before step 1 and after the last step
    assert summary["first_eval"] == {k: v for k, v in evals[0].items() if k != "step"}
    assert summary["last_eval"] == {k: v for k, v in evals[1].items() if k != "step"}


def test_ppo_resume_is_exact(tiny_model_dir, tiny_rm_dir, tmp_path):
    common = [f"reward_model.path={tiny_rm_dir}", "trainer.save_every=2", "optim.lr=1e-2", "ppo.kl_target=1.0"]
    full, part, _ = run_interrupted(run_ppo, lambda *o: cfg(tiny_model_dir, *o, *common), tmp_path, 4, 2)
    keys = ("loss/policy", "loss/value", "objective/scores", "kl/beta")
    a = {r["step"]: [r[k] for k in keys] for r in metrics(full) if "loss/policy" in r}
    b = {r["step"]: [r[k] for k in keys] for r in metrics(part) if "loss/policy" in r}
    assert sorted(b) == [1, 2, 3, 4] and a == b
    from transformers import AutoModelForCausalLM

    from grpo.parts.reward_model import load_reward_model

    ck_a, ck_b = full / "checkpoints" / "step_000004", part / "checkpoints" / "step_000004"
    pa, pb = (AutoModelForCausalLM.from_pretrained(c / "model").state_dict() for c in (ck_a, ck_b))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # The critic's head survives save and a strict reload (a fresh head would be an error).
    va, vb = (load_reward_model(str(c / "value")).state_dict() for c in (ck_a, ck_b))
    assert all(torch.equal(va[k], vb[k]) for k in va)


def test_ptx_keeps_the_lm_loss_on_the_ptx_data_lower(tiny_model_dir, tiny_rm_dir, tmp_path):
    from grpo.parts.modeling import load_tokenizer
    from grpo.parts.batch import batch_tensors, encode_rows
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": f"say {w}", "completion": w} for w in ("alpha", "beta", "gamma", "delta")]
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(str(tiny_model_dir))
    ids, attn, labels = batch_tensors(encode_rows(tok, [(str(ptx), r) for r in rows], "prompt", "completion"), tok.pad_token_id)

    def lm_loss(run):
        model = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step_000006" / "model")
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=attn, labels=labels).loss.item()

    common = [f"reward_model.path={tiny_rm_dir}", "trainer.max_steps=6", "optim.lr=5e-3"]
    run_ppo(cfg(tiny_model_dir, *common), tmp_path / "plain")
    run_ppo(cfg(tiny_model_dir, *common, "ppo.ptx_coef=1.0", f"ppo.ptx_path={ptx}", "ppo.ptx_batch_size=4"),
            tmp_path / "ptx")
    plain, with_ptx = lm_loss(tmp_path / "plain"), lm_loss(tmp_path / "ptx")
    assert with_ptx < plain - 0.1, (with_ptx, plain)
    assert all("loss/ptx" in r for r in metrics(tmp_path / "ptx") if "loss/policy" in r)


def test_ppo_with_verifiers_only_starts_a_zero_critic(tiny_model_dir, tmp_path):
    run_ppo(cfg(tiny_model_dir, "reward_model=none", "trainer.max_steps=1"), tmp_path)
    first = next(r for r in metrics(tmp_path) if "val/mean" in r)
    assert first["val/mean"] == 0.0  # the new value head is zero: every value starts at 0
    assert "eval/rm_score" not in next(r for r in metrics(tmp_path) if "eval/reward/mean" in r)


def test_shared_value_head_trains_and_resumes_exactly(tiny_model_dir, tmp_path):
    common = ["reward_model=none", "ppo.value=shared", "trainer.save_every=2", "optim.lr=1e-2"]
    full, part, _ = run_interrupted(run_ppo, lambda *o: cfg(tiny_model_dir, *o, *common), tmp_path, 4, 2)
    a = {r["step"]: [r["loss/policy"], r["loss/value"], r["val/mean"]] for r in metrics(full) if "loss/policy" in r}
    b = {r["step"]: [r["loss/policy"], r["loss/value"], r["val/mean"]] for r in metrics(part) if "loss/policy" in r}
    assert sorted(b) == [1, 2, 3, 4] and a == b
    # The head starts at zero (values 0 at step 1), then learns; it lives in state.pt, not a value/ folder.
    assert a[1][2] == 0.0 and a[4][2] != 0.0
    ck = part / "checkpoints" / "step_000004"
    assert not (ck / "value").exists()
    state = torch.load(ck / "state.pt", weights_only=False)
    assert state["value_head"]["weight"].shape[0] == 1 and state["value_head"]["weight"].abs().sum() > 0


def test_ppo_optimises_the_configured_reward(tiny_model_dir, tiny_rm_dir, tmp_path):
    """reward_model.weight and verifier_weight apply to PPO's score (unsquashed): weight 0 and
    verifier_weight 1 make the score the verifier's reward, so the step's mean score is the mean
    digit fraction it logs; with weight 2 alone the score is twice the reward model's score."""
    run_ppo(cfg(tiny_model_dir, f"reward_model.path={tiny_rm_dir}", "reward_model.weight=0",
                "reward_model.verifier_weight=1", "trainer.max_steps=2"), tmp_path / "verifier")
    for r in [r for r in metrics(tmp_path / "verifier") if "objective/scores" in r]:
        assert r["objective/scores"] == pytest.approx(r["reward/digit_fraction/mean"], abs=1e-6)
    run_ppo(cfg(tiny_model_dir, f"reward_model.path={tiny_rm_dir}", "reward_model.weight=2", "trainer.max_steps=2"),
            tmp_path / "double")
    for r in [r for r in metrics(tmp_path / "double") if "objective/scores" in r]:
        assert r["objective/scores"] == pytest.approx(2 * r["rm/score/mean"], abs=1e-5)
