"""The shared-prompt layout: each group's prompt computed once, the same log-probs and gradients
as one padded row per completion (float32, max abs difference < 1e-5)."""

import pytest
import torch

from grpo.parts.batch import batch_logprobs, group_logprobs, pack, pack_groups, supports_shared_prompt
from grpo.parts.modeling import load_model
from grpo.parts.batch import micro_batches

G = 3


def rollout(vocab: int):
    """Two groups of 3 with ragged prompts (5 and 9 tokens) and completions (4, 1, 7 | 3, 0, 6)."""
    g = torch.Generator().manual_seed(0)
    group_prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (5, 9)]
    completions = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (4, 1, 7, 3, 0, 6)]
    return [group_prompts[i // G] for i in range(6)], completions


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_same_logprobs_and_gradients_as_padded_rows(tiny_model_dir, impl):
    model = load_model(str(tiny_model_dir))
    model.config._attn_implementation = impl
    assert supports_shared_prompt(model)
    prompts, completions = rollout(model.config.vocab_size)
    padded, shared = pack(prompts, completions, 0), pack_groups(prompts, completions, G, 0)
    assert torch.equal(padded.mask, shared.mask) and torch.equal(padded.completion_ids * padded.mask, shared.completion_ids * shared.mask)
    # 2 rows of 5 + 12 and 9 + 9 tokens instead of 6 rows of 9 + 7
    assert shared.input_ids.shape == (2, 18) and padded.input_ids.shape == (6, 16)

    def logp_and_grads(fn, batch):
        model.zero_grad()
        logp = fn(model, batch, 0.7)
        (logp * batch.mask).sum().backward()
        return logp.detach() * batch.mask, [p.grad.clone() for p in model.parameters()]

    a, ga = logp_and_grads(batch_logprobs, padded)
    b, gb = logp_and_grads(group_logprobs, shared)
    assert (a - b).abs().max() < 1e-5
    assert max(float((x - y).abs().max()) for x, y in zip(ga, gb)) < 1e-5
    # a micro-batch of the second group only, cut to its own 18 tokens
    part = shared[slice(3, 6)]
    assert part.input_ids.shape == (1, 18)
    assert ((group_logprobs(model, part, 0.7) - a[3:6]).abs() * shared.mask[3:6]).max() < 1e-5


def test_attention_sees_the_prompt_and_its_own_completion_only():
    # one group: prompt of 2, completions of 2 and 1; then one padding column
    b = pack_groups([[7, 8]] * 2, [[1, 2], [3]], 2, 0)
    b = type(b)(**{**b.__dict__, "input_ids": torch.nn.functional.pad(b.input_ids, (0, 1)),
                   "position_ids": torch.nn.functional.pad(b.position_ids, (0, 1))})
    allowed = (b.attention_bias(torch.float32)[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],  # prompt token 0
        [1, 1, 0, 0, 0, 0],  # prompt token 1
        [1, 1, 1, 0, 0, 0],  # completion 0, token 0: the prompt and itself
        [1, 1, 1, 1, 0, 0],  # completion 0, token 1
        [1, 1, 0, 0, 1, 0],  # completion 1, token 0: the prompt, not completion 0
        [0, 0, 0, 0, 0, 1],  # padding: itself only
    ]
    assert b.position_ids[0, :5].tolist() == [0, 1, 2, 3, 2]  # positions restart after the prompt
    # token 0 of each completion is predicted at the prompt's last position (1), token 1 of
    # completion 0 at its token 0 (column 2)
    assert b.index[0, :2].tolist() == [1, 2] and b.index[1, 0] == 1


def test_flash_attention_falls_back(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    model.config._attn_implementation = "flash_attention_2"  # takes no custom mask
    assert not supports_shared_prompt(model)


def test_micro_batches_by_rows_and_by_tokens():
    # 4 groups of G = 2 rows, group lengths 10, 30, 20, 5
    lengths = [10, 30, 20, 5]
    assert micro_batches(lengths, 2) == [slice(0, 8)]  # no limit: one
    assert micro_batches(lengths, 2, size=4) == [slice(0, 4), slice(4, 8)]  # 2 groups of 2 rows each
    assert micro_batches(lengths, 2, size=3) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    # budget 60 tokens, a micro-batch costs groups x its longest group: {10, 30} = 60 fits, adding
    # 20 would be 3 x 30 = 90; {20, 5} = 2 x 20 = 40
    assert micro_batches(lengths, 2, budget=60) == [slice(0, 4), slice(4, 8)]
    # a group longer than the budget still goes, alone
    assert micro_batches(lengths, 2, budget=15) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert micro_batches([16] * 5, 1, budget=40) == [slice(0, 2), slice(2, 4), slice(4, 5)]  # padded rows


@pytest.mark.slow
@pytest.mark.parametrize("algo", [
    [], ["algorithm.is_level=sequence", "algorithm.loss_agg=seq_mean_token_mean"], ["algorithm.is_level=sequence_token"],
    ["algorithm.adv_estimator=reinforce_pp"], ["algorithm.loss=cispo", "algorithm.mismatch=geometric"],
    ["algorithm.adv_estimator=rloo", "algorithm.mismatch=sequence", "algorithm.overlong_filter=true"]])
def test_a_training_step_is_the_same_in_both_layouts(tiny_model_dir, tmp_path, algo):
    # The padded layout left-pads prompts and right-pads completions in [N, P + T] rows; the shared one
    # packs a group in one row: the estimators and losses see only real tokens either way.
    from grpo.commands.train import build, train_step
    from grpo.parts import config as C
    from grpo.parts.run import Run
    from tests.commands.test_train_e2e import cfg_for

    steps = {}
    for shared in (True, False):
        raw = cfg_for(tiny_model_dir, "trainer.max_steps=1", "algorithm.beta=0.1", "algorithm.epochs=2",
                      f"trainer.shared_prompt={shared}", "trainer.max_tokens_per_batch=64", *algo)
        cfg = C.parse(C.TrainConfig, raw)
        with Run.from_config("grpo", cfg, raw, tmp_path / str(shared)) as run:
            grpo = build(cfg, run)
            assert grpo.shared_prompt is shared
            steps[shared] = (train_step(grpo, run),
                             torch.cat([p.detach().flatten() for p in grpo.policy.model.parameters()]))
    (ma, wa), (mb, wb) = steps[True], steps[False]
    for key in ("loss", "kl", "entropy", "grad_norm", "clip/frac", "rollout/logprob_abs_diff/max"):
        assert ma[key] == pytest.approx(mb[key], abs=1e-5), key
    assert (wa - wb).abs().max() < 1e-5
