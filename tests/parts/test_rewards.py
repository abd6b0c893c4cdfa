"""Reward sources: verifiers and a reward model behind one interface, and their mixture."""

import pytest
import torch

from grpo.parts.reward_model import batch_sequences, fit_normalizer, init_reward_model, raw_scores, save_reward_model
from grpo.parts.reward_sources import Mixture, ModelRewards, RewardInputs, Rewards, VerifierRewards, build_rewards, squash
from grpo.parts.modeling import load_tokenizer


class Const:
    """A reward source that gives every completion the same reward (a test double for the mixture's inputs)."""

    def __init__(self, r, label):
        self.r, self.label, self.closed = r, label, False

    def __call__(self, inputs):
        n = len(inputs.texts)
        return Rewards([self.r] * n, [{self.label: {}}] * n, {f"reward/{self.label}/mean": self.r})

    def close(self):
        self.closed = True


def inputs(texts, samples=None):
    n = len(texts)
    return RewardInputs(list(texts), [[1, 2]] * n, [[3]] * n, [True] * n, samples or [{"answer": "5"}] * n)


def test_squash():
    s = torch.tensor([0.0, 2.0, -2.0])
    # sigmoid(0) = 0.5, sigmoid(2 / 2) = 0.7311, sigmoid(-1) = 0.2689; clip(s / 2) = [0, 1, 0]
    assert squash(s, "sigmoid", 2.0).tolist() == pytest.approx([0.5, 0.7310586, 0.2689414])
    assert squash(s, "clip", 2.0).tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="squash"):
        squash(s, "tanh")


def test_mixture_weights_and_clips():
    # 0.8 * 0.5 + 0.5 * 1.0 = 0.9; with weight 2 on the first: 2 * 0.5 + 0.5 = 1.5 -> clipped to 1
    a, b = Const(0.5, "a"), Const(1.0, "b")
    out = Mixture([(0.8, a), (0.5, b)])(inputs(["x", "y"]))
    assert out.rewards == pytest.approx([0.9, 0.9])
    assert out.metrics == {"reward/a/mean": 0.5, "reward/b/mean": 1.0}
    assert set(out.infos[0]) == {"a", "b"}
    assert Mixture([(2.0, a), (0.5, b)])(inputs(["x"])).rewards == [1.0]
    Mixture([(1.0, a), (1.0, b)]).close()
    assert a.closed and b.closed


def test_verifier_rewards_are_the_reward_function_s():
    src = VerifierRewards(["math"], timeout=60)
    try:
        out = src(inputs([r"\boxed{5}", r"\boxed{6}"]))
    finally:
        src.close()
        src.close()  # closing twice is harmless (a mixture and its trainer may both close it)
    assert out.rewards == [1.0, 0.0] and out.scores is None
    assert out.metrics["reward/math/mean"] == 0.5


@pytest.fixture(scope="module")
def tiny_rm(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    tok = load_tokenizer(str(tiny_model_dir))
    model = init_reward_model(str(tiny_model_dir))
    seqs = [[5, 6, 7, 1], [5, 6, 8, 9, 1], [10, 1]]  # EOS (id 1) last, as reward models are trained
    ids, attn = batch_sequences(seqs, tok.pad_token_id)
    with torch.no_grad():
        fit_normalizer(model, raw_scores(model, ids, attn))
    save_reward_model(model, tok, out)
    return out, seqs


def test_model_rewards_score_prompt_plus_completion(tiny_rm):
    path, seqs = tiny_rm
    tok = load_tokenizer(str(path))
    src = ModelRewards.load(str(path), tok, squash_fn="sigmoid", scale=1.0, batch_size=2)
    # The same sequences split into prompt + completion at different places score the same, in
    # batches of 2; the normaliser was fitted on them, so their scores have mean 0.
    prompts, comps = [s[:1] for s in seqs], [s[1:] for s in seqs]
    out = src(RewardInputs(["a", "b", "c"], prompts, comps, [True] * 3, [{}] * 3))
    assert sum(out.scores) / 3 == pytest.approx(0.0, abs=1e-5)
    assert out.rewards == pytest.approx(torch.sigmoid(torch.tensor(out.scores)).tolist())
    again = src.score([s[:-1] for s in seqs], [s[-1:] for s in seqs])  # the completion is only the EOS
    assert again.tolist() == pytest.approx(out.scores, abs=1e-5)
    assert out.metrics["rm/score/mean"] == pytest.approx(0.0, abs=1e-5)
    # A completion without EOS (cut by a stop string or max_new_tokens) is scored with one appended.
    cut = src.score(prompts, [c[:-1] for c in comps])
    assert cut.tolist() == pytest.approx(out.scores, abs=1e-5)


def test_a_reward_model_with_another_tokenizer_is_refused(tiny_rm, tmp_path):
    from grpo.parts.modeling import ModelError

    path, _ = tiny_rm
    tok = load_tokenizer(str(path))
    tok.add_tokens(["<extra>"])  # another vocabulary: the policy's ids would mean other tokens to it
    with pytest.raises(ModelError, match="tokenizer differs from the policy's"):
        ModelRewards.load(str(path), tok)


def test_build_rewards_keeps_the_verifiers_out_of_a_reward_model_reward(tiny_rm):
    path, _ = tiny_rm
    tok = load_tokenizer(str(path))
    train, verifiers, rm = build_rewards(["math"], False, 60.0, str(path), tok, "cpu")
    try:
        assert train is rm and verifiers is not None  # verifier_weight 0: they only measure
        mixed, _, _ = build_rewards(["math"], False, 60.0, str(path), tok, "cpu", verifier_weight=0.5)
        assert isinstance(mixed, Mixture) and len(mixed.parts) == 2
        mixed.close()
        plain, v2, none = build_rewards(["math"], False, 60.0, None, tok, "cpu")
        assert plain is v2 and none is None
        plain.close()
    finally:
        verifiers.close()


def test_raw_is_the_weighted_sum_unsquashed_and_unclipped(tiny_rm):
    """`raw` (PPO's score, best-of-N's pick): the same weights as the reward, the reward model's score
    unsquashed, no clip."""
    path, seqs = tiny_rm
    tok = load_tokenizer(str(path))
    rm = ModelRewards.load(str(path), tok, squash_fn="clip", scale=1e-3)
    prompts, comps = [s[:1] for s in seqs], [s[1:] for s in seqs]
    batch = RewardInputs(["a", "b", "c"], prompts, comps, [True] * 3, [{}] * 3)
    alone = rm(batch)
    assert alone.raw == alone.scores  # a reward model alone: its normalised score
    # clip(score / 1e-3, 0, 1) saturates every score that is not tiny: the rewards tie, the raw scores do not
    assert len(set(alone.raw)) == 3 and set(alone.rewards) <= {0.0, 1.0}
    mixed = Mixture([(2.0, rm), (0.5, Const(1.0, "v"))])(batch)
    # 2 x score + 0.5 x 1.0 per completion; the reward is clip(2 x clip(...) + 0.5, 0, 1)
    assert mixed.raw == pytest.approx([2.0 * s + 0.5 for s in alone.scores])
    assert Const(0.25, "v")(batch).raw == [0.25] * 3  # a verifier's raw score is its reward


def test_a_completion_ending_in_any_eos_id_is_not_extended(tiny_rm):
    """The engines stop on every EOS id of the generation config (Qwen-Instruct has two); a completion
    ending in any of them is read where it ends, one ending in none gets the tokenizer's EOS."""
    from grpo.parts.reward_model import sequence_scores

    path, _ = tiny_rm
    tok = load_tokenizer(str(path))
    other = 7  # a second EOS id, as a generation config may name
    prompts, comps = [[5, 6]], [[8, other]]
    both = ModelRewards.load(str(path), tok, eos_ids=[tok.eos_token_id, other])
    only_tokenizer_s = ModelRewards.load(str(path), tok)  # what the reward model read before: EOS appended
    with torch.no_grad():
        ids, attn = batch_sequences([[5, 6, 8, other]], tok.pad_token_id)
        at_end = sequence_scores(both.model, ids, attn)  # read at the completion's own last token
        ids, attn = batch_sequences([[5, 6, 8, other, tok.eos_token_id]], tok.pad_token_id)
        appended = sequence_scores(both.model, ids, attn)
    assert both.score(prompts, comps).tolist() == pytest.approx(at_end.tolist(), abs=1e-6)
    assert only_tokenizer_s.score(prompts, comps).tolist() == pytest.approx(appended.tolist(), abs=1e-6)
    assert abs(float(at_end - appended)) > 1e-4  # the two readings differ: the test can tell them apart
    # without any EOS at the end, the tokenizer's is appended either way
    assert both.score(prompts, [[8]]).tolist() == pytest.approx(only_tokenizer_s.score(prompts, [[8]]).tolist())


def test_the_eos_ids_come_from_the_policy_s_generation_config(tiny_rm, tiny_model_dir, tmp_path):
    import shutil

    from transformers import GenerationConfig

    from grpo.parts.config import RewardModelConfig, VerifierConfig
    from grpo.parts.reward_sources import build_rewards_from

    path, _ = tiny_rm
    policy = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, policy)
    tok = load_tokenizer(str(policy))
    GenerationConfig(eos_token_id=[tok.eos_token_id, 7]).save_pretrained(policy)
    train, _, rm = build_rewards_from({}, VerifierConfig(), RewardModelConfig(path=str(path)), tok, "cpu",
                                      model_path=str(policy))
    assert train is rm and rm.eos_ids == {tok.eos_token_id, 7}
