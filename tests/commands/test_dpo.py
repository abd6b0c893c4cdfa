"""`grpo dpo` end to end on a tiny config-built model, and its prompt masking."""

import json
import math

import pytest
import torch

from grpo.cli import compose_config
from grpo.commands.dpo import encode_pairs, reference_cache, run_dpo
from grpo.tasks.base import Sample, TaskError
from grpo.tasks.preference_data import Ranking
from tests.conftest import run_interrupted

TOY = "task.verifiers=[{_target_: tests.toy_verifiers.DigitFraction}]"


@pytest.fixture
def pairs_file(tmp_path):
    # The better answer is always "yes", whatever the prompt (a rule a 1-layer model learns in a few steps).
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(20)))
    return path


def cfg(model_dir, data, *extra):
    return compose_config("dpo", [f"model.path={model_dir}", f"data.path={data}", "task=arithmetic", TOY,
                                  "task.eval_size=8", "trainer.eval_size=8", "rollout.max_new_tokens=6",
                                  "trainer.batch_size=8", "trainer.log_every=1", "trainer.eval_every=0",
                                  "dpo.beta=0.5", "optim.lr=5e-3", "optim.warmup_steps=0", *extra])


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_starts_at_zero_rewards_and_learns_the_preference(tiny_model_dir, pairs_file, tmp_path):
    run_dpo(cfg(tiny_model_dir, pairs_file, "trainer.max_steps=8"), tmp_path)
    recs = metrics(tmp_path)
    steps = [r for r in recs if "loss" in r]
    # Step 1 is computed before any update, policy == reference: u_c = u_r = 0 exactly, so every
    # rewards/* metric is exactly 0 and the sigmoid loss is -logsigmoid(0) = log 2.
    first = steps[0]
    assert first["step"] == 1
    assert [first[k] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")] == [0.0] * 4
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[-1]["rewards/accuracies"] == 1.0 and steps[-1]["rewards/margins"] > 0 and steps[-1]["loss"] < math.log(2)
    evals = [r for r in recs if "eval/reward/mean" in r]
    assert [r["step"] for r in evals] == [0, 8]  # before training and after the last step
    assert evals[0]["eval/kl"] == 0.0 and evals[1]["eval/kl"] > 0  # the policy starts as the reference
    assert (tmp_path / "model" / "config.json").exists()


@pytest.mark.slow
def test_dpo_resume_and_micro_batches(tiny_model_dir, pairs_file, tmp_path):
    common = ["trainer.save_every=2", "trainer.micro_batch_size=3"]
    full, part, _ = run_interrupted(run_dpo, lambda *o: cfg(tiny_model_dir, pairs_file, *o, *common), tmp_path, 4, 2)
    a = {r["step"]: r["loss"] for r in metrics(full) if "loss" in r}
    b = {r["step"]: r["loss"] for r in metrics(part) if "loss" in r}
    assert sorted(b) == [1, 2, 3, 4] and a == b
    # Micro-batches of 3 pairs out of 8 give the whole batch's loss at step 1 (policy == reference): log 2.
    assert a[1] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow
def test_nll_term_is_a_token_mean_over_the_whole_batch(tiny_model_dir, tmp_path):
    # Chosen completions of different lengths; the NLL must be the batch's token mean whatever the
    # micro-batches, so step 1's loss and loss/nll are the same with micro_batch_size 0 and 3.
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "y" * (1 + i % 5), "rejected": "n"}) + "\n"
                            for i in range(20)))
    out = {}
    for micro in (0, 3):
        run = tmp_path / f"m{micro}"
        run_dpo(cfg(tiny_model_dir, data, "trainer.max_steps=1", "dpo.nll_coef=0.5",
                    f"trainer.micro_batch_size={micro}"), run)
        out[micro] = next(r for r in metrics(run) if "loss" in r)
    assert out[3]["loss/nll"] == pytest.approx(out[0]["loss/nll"], rel=1e-5)
    assert out[3]["loss"] == pytest.approx(out[0]["loss"], rel=1e-5)
    # step 1: the DPO term is log 2 and the NLL term is 0.5 x the logged NLL
    assert out[0]["loss"] == pytest.approx(math.log(2) + 0.5 * out[0]["loss/nll"], rel=1e-5)


def test_ipo_with_label_smoothing_is_refused(tiny_model_dir, pairs_file, tmp_path):
    from grpo.parts.config import ConfigError

    with pytest.raises(ConfigError, match="dpo.label_smoothing applies to the sigmoid and robust losses"):
        run_dpo(cfg(tiny_model_dir, pairs_file, "dpo.loss=ipo", "dpo.label_smoothing=0.1"), tmp_path)


@pytest.mark.slow
def test_precomputed_reference_is_cached_by_weights_and_data(tiny_model_dir, pairs_file, tmp_path):
    from grpo.parts.modeling import load_model, load_tokenizer
    from grpo.tasks.preference_data import read_preferences

    tok = load_tokenizer(str(tiny_model_dir))
    pairs = encode_pairs(tok, read_preferences(str(pairs_file))[1], None)
    ref = load_model(str(tiny_model_dir))
    ref.register_buffer("scalar", torch.tensor(1.0))  # a 0-dim tensor in the state dict hashes too
    a = reference_cache(ref, pairs, tok.pad_token_id, "cpu", tmp_path, 4)
    (cached,) = tmp_path.glob("ref_logps_*.pt")
    assert a.shape == (20, 2) and torch.equal(reference_cache(ref, pairs, tok.pad_token_id, "cpu", tmp_path, 7), a)
    with torch.no_grad():
        next(ref.parameters()).add_(0.01)  # another reference: another key, never the stale values
    b = reference_cache(ref, pairs, tok.pad_token_id, "cpu", tmp_path, 4)
    assert len(list(tmp_path.glob("ref_logps_*.pt"))) == 2 and not torch.equal(a, b)
    # A run with the cache starts at ~0 rewards (the cache was computed in other batches: equal to 1e-5).
    run = tmp_path / "run"
    run_dpo(cfg(tiny_model_dir, pairs_file, "trainer.max_steps=1", "dpo.precompute_ref=true"), run)
    first = next(r for r in metrics(run) if "loss" in r)
    assert abs(first["rewards/margins"]) < 1e-5 and list(run.glob("ref_logps_*.pt"))


def test_a_prompt_that_is_not_a_token_prefix_is_reported():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    # A BPE that merges "a" + "b": the prompt "xa" tokenises as [x, a], but "xa" + "b..." as [x, ab].
    vocab = {"x": 0, "a": 1, "b": 2, "ab": 3, "c": 4, "<eos>": 5}
    core = Tokenizer(models.BPE(vocab, [("a", "b")]))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")
    ok = Ranking(Sample(prompt="xa"), ["c", "cc"], None, "f.jsonl: line 1")
    assert encode_pairs(tok, [ok], None)[0].chosen == [4, 5]  # "c" + EOS
    bad = Ranking(Sample(prompt="xa"), ["c", "bc"], None, "f.jsonl: line 3")
    with pytest.raises(TaskError, match=r"f.jsonl: line 3: response 2: the tokenised prompt is not a prefix"):
        encode_pairs(tok, [bad], None)
