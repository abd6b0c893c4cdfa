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
