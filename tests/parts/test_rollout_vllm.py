"""The vLLM engine against a real vLLM (the CPU build in CI), on a tiny config-built model.

One engine is started for the module (a start takes tens of seconds); the tests that change the
policy restore it. The end-to-end run starts its own engine inside `grpo train`.
"""

import json
import os

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed: `make setup-vllm` installs it (CI does)")

from grpo.parts.batch import pack, token_logprobs
from grpo.parts.modeling import load_model, load_tokenizer  # noqa: E402
from grpo.parts.rollout.base import SamplingParams  # noqa: E402
from grpo.parts.rollout.hf import HFEngine, _stop_end  # noqa: E402
from grpo.parts.rollout.vllm import VLLMEngine, choose_logprobs_mode  # noqa: E402
from tests.conftest import run_grpo, torchrun  # noqa: E402

pytestmark = pytest.mark.slow

# Two cores shared with the rest of the suite: vLLM's worker unpinned, on one thread (set only while
# an engine starts, so the rest of the session keeps its own settings).
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}

# A small token budget per engine step, so that a batch of prompts does not fit in one prefill.
RCFG = dict(temperature=1.0, top_p=1.0, top_k=0, kv_cache_gib=0.0625, max_num_seqs=64, max_model_len=256,
            max_num_batched_tokens=256)
PROMPTS = ["<|user|>12+7<|end|><|assistant|>", "<|user|>a longer prompt, 3*4<|end|><|assistant|>",
           "<|user|>9<|end|><|assistant|>"]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    policy = load_model(str(tiny_model_dir))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in VLLM_ENV.items():
            mp.setenv(k, os.environ.get(k, v))
        engine = VLLMEngine(policy, tok, str(tiny_model_dir), "float32", "cpu", **RCFG)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    yield tok, policy, engine, prompts
    engine.close()


def trainer_logprobs(policy, ro, pad_id, temperature):
    """The trainer's log-probs of the engine's tokens: [N] ragged lists."""
    b = pack(ro.prompt_ids, ro.completion_ids, pad_id)
    ids, attn, pos, comp, mask = b.input_ids, b.attention_mask, b.position_ids, b.completion_ids, b.mask
    with torch.no_grad():
        logp = token_logprobs(policy, ids, attn, pos, comp.shape[1], temperature)
    return [logp[i, : len(c)].tolist() for i, c in enumerate(ro.completion_ids)]


def max_gap(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_the_trainer(setup, temperature):
    tok, policy, engine, prompts = setup
    ro = engine.generate(prompts, 4, SamplingParams(temperature=temperature, max_new_tokens=8, seed=3))
    assert len(ro.completion_ids) == 12
    assert ro.prompt_ids[0] == ro.prompt_ids[3] == prompts[0] and ro.prompt_ids[4] == prompts[1]  # prompt-major
    for ids, lps, fin in zip(ro.completion_ids, ro.logprobs, ro.finished):
        assert len(ids) == len(lps) and 1 <= len(ids) <= 8
        assert fin == (ids[-1] == tok.eos_token_id)
    # Log-probs at the sampling temperature, same tokens, same weights: float32 agreement.
    assert max_gap(ro.logprobs, trainer_logprobs(policy, ro, tok.pad_token_id, temperature)) < 1e-4


def test_weight_sync_after_an_optimizer_step(setup):
    """A high-lr step moves the policy; without the push the engine is stale, with it the gap is < 1e-3."""
    tok, policy, engine, prompts = setup
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, seed=11)
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    try:
        ro = engine.generate(prompts, 4, sp)
        opt = torch.optim.AdamW(policy.parameters(), lr=3e-2)
        lps = trainer_logprobs_grad(policy, ro, tok.pad_token_id)
        (-lps).backward()  # one maximum-likelihood step on the sampled tokens
        opt.step()

        stale = engine.generate(prompts, 4, sp)
        assert stale.completion_ids == ro.completion_ids  # same seed, same (old) engine weights
        assert max_gap(stale.logprobs, trainer_logprobs(policy, stale, tok.pad_token_id, 1.0)) > 1e-2

        engine.update_weights(policy.named_parameters())
        fresh = engine.generate(prompts, 4, sp)
        assert max_gap(fresh.logprobs, trainer_logprobs(policy, fresh, tok.pad_token_id, 1.0)) < 1e-3
        # The sampled tokens became likelier: the engine now samples from the new policy.
        assert sum(map(sum, fresh.logprobs)) != sum(map(sum, ro.logprobs))
    finally:
        policy.load_state_dict(before)
        engine.update_weights(policy.named_parameters())


def trainer_logprobs_grad(policy, ro, pad_id):
    b = pack(ro.prompt_ids, ro.completion_ids, pad_id)
    ids, attn, pos, comp, mask = b.input_ids, b.attention_mask, b.position_ids, b.completion_ids, b.mask
    logp = token_logprobs(policy, ids, attn, pos, comp.shape[1], 1.0)
    return (logp * mask).sum() / mask.sum()


def test_greedy_matches_the_hf_engine(setup):
    tok, policy, engine, prompts = setup
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)
    a, b = engine.generate(prompts, 2, sp), HFEngine(policy, tok).generate(prompts, 2, sp)
    assert (a.prompt_ids, a.completion_ids, a.texts, a.finished) == (b.prompt_ids, b.completion_ids, b.texts, b.finished)
    assert max_gap(a.logprobs, b.logprobs) < 1e-4  # greedy: log-probs at T = 1 in both engines


def test_stop_strings_cut_like_the_hf_engine(setup):
    """Same seed with and without a stop string: the stopped rollout is the free one cut by the hf rule."""
    tok, policy, engine, prompts = setup
    free = engine.generate(prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=8, seed=7))
    text = next(t for t in free.texts if len(t) >= 4)
    stop = [text[2]]  # a character that some completion produces mid-way
    cut = engine.generate(prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=8, seed=7, stop=stop))
    n_cut = 0
    for ids, t, fin, ids2, t2, fin2, lp2 in zip(free.completion_ids, free.texts, free.finished, cut.completion_ids,
                                                cut.texts, cut.finished, cut.logprobs):
        end = _stop_end(ids, stop, tok)
        stopped = end is not None
        want_ids = ids[:end] if stopped else ids
        want_text = tok.decode(want_ids, skip_special_tokens=True) if stopped else t
        n_cut += stopped and want_ids != ids
        assert (ids2, t2, fin2) == (want_ids, want_text, stopped or fin)
        assert len(lp2) == len(ids2)
    assert n_cut >= 1


def test_seeds_make_samples_reproducible(setup):
    tok, policy, engine, prompts = setup
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    a, b = engine.generate(prompts, 3, sp), engine.generate(prompts, 3, sp)
    assert a.completion_ids == b.completion_ids
    assert len(set(map(tuple, a.completion_ids))) > 3  # the n samples of a prompt differ
    # Unseeded requests draw their seeds from torch's RNG: reproducible through torch.manual_seed.
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=8)
    torch.manual_seed(0)
    c = engine.generate(prompts, 3, unseeded)
    torch.manual_seed(0)
    d = engine.generate(prompts, 3, unseeded)
    e = engine.generate(prompts, 3, unseeded)
    assert c.completion_ids == d.completion_ids != e.completion_ids


def test_seeded_batch_larger_than_one_engine_step(setup):
    """More prompt tokens than one step's budget: vLLM would prefill in chunks and, on CPU, crash on seeds."""
    tok, policy, engine, prompts = setup
    many = [p + [tok.convert_tokens_to_ids(c)] * 20 for p in prompts for c in "0123456789"]  # 30 x ~40 tokens
    assert sum(map(len, many)) > RCFG["max_num_batched_tokens"] * 3
    ro = engine.generate(many, 2, SamplingParams(temperature=1.0, max_new_tokens=8, seed=1))
    assert len(ro.completion_ids) == 60
    assert max_gap(ro.logprobs, trainer_logprobs(policy, ro, tok.pad_token_id, 1.0)) < 1e-4


def test_logprobs_mode_choice():
    assert choose_logprobs_mode(0.7, 1.0, 0) == ("processed_logprobs", True)  # logits / T, nothing truncated
    assert choose_logprobs_mode(1.0, 0.9, 0) == ("raw_logprobs", True)  # T = 1: raw = before truncation
    assert choose_logprobs_mode(0.0, 0.9, 5) == ("processed_logprobs", True)  # greedy
    assert choose_logprobs_mode(0.7, 0.9, 0) == ("processed_logprobs", False)  # nothing exposes it


def test_grpo_train_with_vllm_keeps_the_logprob_gap_small(tiny_model_dir, tmp_path, monkeypatch):
    """`grpo train rollout=vllm` at a learning rate where stale weights would show: every step's gap < 1e-3."""
    for k, v in VLLM_ENV.items():
        monkeypatch.setenv(k, os.environ.get(k, v))
    res = run_grpo(
        "train", "rollout=vllm", f"model.path={tiny_model_dir}", "model.device=cpu", "logger=jsonl",
        f"hydra.run.dir={tmp_path}", "trainer.prompts_per_step=4", "algorithm.group_size=4", "trainer.max_steps=4",
        "trainer.eval_every=0", "trainer.save_every=0", "trainer.eval_size=8", "task.eval_size=8",
        "rollout.max_new_tokens=8", "rollout.kv_cache_gib=0.0625", "rollout.max_num_seqs=64", "optim.lr=2e-2", "optim.warmup_steps=1",
        "task.verifiers=[{_target_: tests.toy_verifiers.DigitFraction}]", timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    gaps = [r["rollout/logprob_abs_diff/max"] for r in steps]
    assert all(g < 1e-3 for g in gaps), gaps
    assert steps[-1]["grad_norm"] > 0


def test_two_processes_each_push_whole_weights_to_their_own_engine(tiny_model_dir, tmp_path, monkeypatch):
    """torchrun, parallel=fsdp2, rollout=vllm: each rank's engine gets the whole weights gathered from
    the shards after every step (a missing or partial push would show as a gap at steps 2 and 3)."""
    for k, v in VLLM_ENV.items():
        monkeypatch.setenv(k, os.environ.get(k, v))
    torchrun(2, "-m", "grpo", "train", "rollout=vllm", "parallel=fsdp2", f"model.path={tiny_model_dir}",
             "model.device=cpu", "logger=jsonl", f"hydra.run.dir={tmp_path}", "trainer.prompts_per_step=4",
             "algorithm.group_size=4", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.save_every=0",
             "trainer.eval_size=8", "task.eval_size=8", "rollout.max_new_tokens=8", "rollout.kv_cache_gib=0.0625",
             "rollout.max_num_seqs=64", "optim.lr=2e-2", "optim.warmup_steps=1",
             "task.verifiers=[{_target_: tests.toy_verifiers.DigitFraction}]", timeout=900)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    gaps = [r["rollout/logprob_abs_diff/max"] for r in steps]
    assert all(g < 1e-3 for g in gaps), gaps
