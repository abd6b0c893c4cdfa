"""Reward-model losses (grpo.algorithm.preference_losses) against values derived by hand and a loop reference."""

import itertools
import math

import pytest
import torch

from grpo.algorithm.preference_losses import pairwise_loss, pointwise_loss, ranking_loss


def nll(d: float) -> float:
    """-logsigmoid(d) = log(1 + e^-d)."""
    return math.log1p(math.exp(-d))


def test_pairwise_tie_is_log2_and_counts_as_wrong():
    # diff 0 -> -logsigmoid(0) = log 2; a tie is not a correct ranking
    loss, m = pairwise_loss(torch.tensor([0.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(math.log(2))
    assert m == {"accuracy": 0.0, "margin": 0.0}


def test_pairwise_margin_is_subtracted_from_the_difference():
    # pair 0: 1 - 0 - margin 1 = 0 -> log 2; pair 1: 2 - 0 - margin 0 = 2 -> log(1 + e^-2)
    # both chosen > rejected: accuracy 1; margin metric is the raw gap, (1 + 2) / 2 = 1.5
    loss, m = pairwise_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), margin=torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx((math.log(2) + nll(2)) / 2)
    assert m["accuracy"] == 1.0 and m["margin"] == pytest.approx(1.5)


def test_pairwise_center_term():
    # chosen [1, 0], rejected [0, 1]: diffs +1, -1 -> BT part (log(1+e^-1) + log(1+e^1)) / 2
    # (chosen + rejected)^2 = [1, 1] -> mean 1 -> + 0.5 * 1
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    loss, m = pairwise_loss(chosen, rejected, center_coef=0.5)
    assert loss.item() == pytest.approx((nll(1) + nll(-1)) / 2 + 0.5)
    assert m["accuracy"] == 0.5 and m["margin"] == pytest.approx(0.0)


def test_pairwise_gradient_by_hand():
    # d/dc -logsigmoid(c - r) = -sigmoid(r - c) = -0.5 at c = r; one pair, so no 1/P shrinkage
    chosen = torch.zeros(1, requires_grad=True)
    rejected = torch.zeros(1, requires_grad=True)
    pairwise_loss(chosen, rejected)[0].backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.5]))
    torch.testing.assert_close(rejected.grad, torch.tensor([0.5]))


def test_ranking_k3_by_hand():
    # scores [3, 1, 0] best first: pairs (0,1) diff 2, (0,2) diff 3, (1,2) diff 1
    # loss = mean of log(1+e^-2), log(1+e^-3), log(1+e^-1); all ordered: accuracy 1; margin (2+3+1)/3 = 2
    loss, m = ranking_loss(torch.tensor([[3.0, 1.0, 0.0]]))
    assert loss.item() == pytest.approx((nll(2) + nll(3) + nll(1)) / 3)
    assert m["accuracy"] == 1.0 and m["margin"] == pytest.approx(2.0)
    # reversed [0, 1, 3]: diffs -1, -3, -2, all wrong; margin -2
    loss, m = ranking_loss(torch.tensor([[0.0, 1.0, 3.0]]))
    assert loss.item() == pytest.approx((nll(-1) + nll(-3) + nll(-2)) / 3)
    assert m["accuracy"] == 0.0 and m["margin"] == pytest.approx(-2.0)


def test_ranking_mask_drops_a_response_and_weighs_prompts_equally():
    # prompt 0: [3, 1, (100 masked)] -> one pair, diff 2 -> log(1+e^-2)
    # prompt 1: [0, 0, 0] -> three pairs, diff 0 -> log 2 each, mean log 2
    # loss = mean over prompts = (log(1+e^-2) + log 2) / 2, not the pair mean (log(1+e^-2) + 3 log 2) / 4
    # metrics over the 4 pairs: 1 correct -> 0.25; margin (2 + 0 + 0 + 0) / 4 = 0.5
    scores = torch.tensor([[3.0, 1.0, 100.0], [0.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, m = ranking_loss(scores, mask)
    assert loss.item() == pytest.approx((nll(2) + math.log(2)) / 2)
    assert m["accuracy"] == 0.25 and m["margin"] == pytest.approx(0.5)
    loss.backward()
    assert scores.grad[0, 2].item() == 0.0  # the masked response gets no gradient


def test_ranking_padding_may_be_nan():
    scores = torch.tensor([[1.0, 0.0, float("nan")]], requires_grad=True)
    loss, _ = ranking_loss(scores, torch.tensor([[1, 1, 0]]))
    loss.backward()
    assert loss.item() == pytest.approx(nll(1))  # only the pair diff 1
    assert torch.isfinite(scores.grad).all()


def test_ranking_k2_equals_pairwise():
    chosen, rejected = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.1, 0.5, 2.0])
    r_loss, r_m = ranking_loss(torch.stack([chosen, rejected], dim=1))
    p_loss, p_m = pairwise_loss(chosen, rejected)
    torch.testing.assert_close(r_loss, p_loss)
    assert r_m == pytest.approx(p_m)


def test_ranking_needs_two_real_responses():
    with pytest.raises(ValueError, match=r"prompts \[1\]"):
        ranking_loss(torch.zeros(2, 3), torch.tensor([[1, 1, 0], [1, 0, 0]]))


def loop_ranking(scores, lengths):
    """The definition, one pair at a time."""
    per_prompt, diffs = [], []
    for row, k in zip(scores.tolist(), lengths):
        pair = [row[i] - row[j] for i, j in itertools.combinations(range(k), 2)]
        per_prompt.append(sum(nll(d) for d in pair) / len(pair))
        diffs += pair
    return sum(per_prompt) / len(per_prompt), sum(d > 0 for d in diffs) / len(diffs), sum(diffs) / len(diffs)


def test_ranking_matches_loop_on_random_ragged_batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        P, K = 7, 5
        scores = torch.randn(P, K, generator=g, dtype=torch.float64) * 2
        lengths = torch.randint(2, K + 1, (P,), generator=g).tolist()
        mask = (torch.arange(K).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()  # real ones first
        loss, m = ranking_loss(scores, mask)
        ref_loss, ref_acc, ref_margin = loop_ranking(scores, lengths)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-9)
        assert m["accuracy"] == pytest.approx(ref_acc) and m["margin"] == pytest.approx(ref_margin)


def test_pointwise_mse():
    # errors 1 and -2 -> (1 + 4) / 2 = 2.5; d/dpred = 2 * err / N = [1, -2]
    pred = torch.tensor([1.0, 2.0], requires_grad=True)
    loss, m = pointwise_loss(pred, torch.tensor([0.0, 4.0]))
    loss.backward()
    assert loss.item() == pytest.approx(2.5) and m == {"mse": pytest.approx(2.5)}
    torch.testing.assert_close(pred.grad, torch.tensor([1.0, -2.0]))
