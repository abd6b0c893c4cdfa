"""The pure GRPO math against values derived by hand."""

import math

import pytest
import torch

from grpo import group_advantages, kl_penalty, policy_loss
from grpo.algorithm.losses import aggregate


def test_group_advantages_group_scale():
    # Group 1: rewards 0,1 -> mean 0.5, unbiased std sqrt(((.5)^2+(.5)^2)/1) = 0.7071
    #   adv = +-0.5 / (0.7071 + 1e-4) = +-0.70701
    # Group 2: rewards 1,1 -> std 0 -> adv 0 / (0 + eps) = 0
    adv = group_advantages(torch.tensor([0.0, 1.0, 1.0, 1.0]), group_size=2)
    expected = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([-expected, expected, 0.0, 0.0]))


def test_group_advantages_batch_scale_uses_batch_std_but_group_mean():
    # rewards [0, 1, 1, 1]: batch mean 0.75, unbiased batch std = sqrt((0.5625 + 3*0.0625)/3) = sqrt(0.25) = 0.5
    # group means 0.5 and 1 -> centred [-0.5, 0.5, 0, 0] -> / (0.5 + 1e-4)
    adv = group_advantages(torch.tensor([0.0, 1.0, 1.0, 1.0]), group_size=2, scale="batch")
    d = 0.5 / (0.5 + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([-d, d, 0.0, 0.0]))


def test_group_advantages_none_scale_is_dr_grpo():
    # group of 3: rewards 0, 0, 1 -> mean 1/3 -> centred -1/3, -1/3, 2/3, no division
    adv = group_advantages(torch.tensor([0.0, 0.0, 1.0]), group_size=3, scale="none")
    torch.testing.assert_close(adv, torch.tensor([-1 / 3, -1 / 3, 2 / 3]))


def test_group_size_one_gives_zero_advantage_not_nan():
    adv = group_advantages(torch.tensor([0.3, 1.0]), group_size=1)
    assert torch.equal(adv, torch.zeros(2))


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="adv_scale"):
        group_advantages(torch.zeros(4), group_size=2, scale="std")


def test_kl_estimators_by_hand():
    # logp = log 0.5, ref_logp = log 0.25: d = logp - ref = log 2 = 0.6931
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    d = math.log(2)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[d]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[d * d / 2]]))
    # k3 = exp(ref - logp) - (ref - logp) - 1 = 0.5 + 0.6931 - 1 = 0.1931
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([[0.5 + d - 1]]))
    assert float(kl_penalty(logp, logp, "k3")) == 0.0
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logp, ref, "k4")


def test_policy_loss_ratio_one_is_minus_advantage_token_mean():
    # ratio 1 everywhere: per-token loss = -A. Row 0 (A=1) has 2 tokens, row 1 (A=-0.5) has 1 token.
    # token_mean = (-1 - 1 + 0.5) / 3 = -0.5
    logp = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, m = policy_loss(logp, logp, torch.tensor([1.0, -0.5]), mask)
    assert loss.item() == pytest.approx(-0.5)
    assert m["clip/frac"] == 0.0 and m["kl"] == 0.0


def test_aggregations_differ_on_ragged_masks():
    # values: row 0 = [1, 3] (2 tokens), row 1 = [5, x] (1 token; x masked)
    v = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert aggregate(v, mask, "token_mean").item() == pytest.approx(9 / 3)  # (1+3+5)/3
    assert aggregate(v, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 5) / 2)  # row means 2 and 5
    assert aggregate(v, mask, "seq_mean_token_sum").item() == pytest.approx((4 + 5) / 2)  # row sums 4 and 5
    # Dr. GRPO: total 9 / (rows 2 * max_len 4) = 1.125
    assert aggregate(v, mask, "seq_mean_token_sum_norm", max_len=4).item() == pytest.approx(9 / 8)
    assert aggregate(v, mask, "seq_mean_token_sum_norm").item() == pytest.approx(9 / 4)  # max_len = T = 2
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate(v, mask, "sum")


def test_global_normaliser_makes_micro_batches_add_up():
    # Same values as above, split into two micro-batches of one row each. With the step's global
    # counts (3 tokens, 2 rows) the two parts add up to the whole-batch value:
    #   token_mean: 4/3 + 5/3 = 3;  seq_mean_token_mean: 2/2 + 5/2 = 3.5;  seq_mean_token_sum: 4/2 + 5/2 = 4.5
    v = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    for agg, whole in (("token_mean", 3.0), ("seq_mean_token_mean", 3.5), ("seq_mean_token_sum", 4.5),
                       ("seq_mean_token_sum_norm", 9 / 8)):
        parts = sum(aggregate(v[i:i + 1], mask[i:i + 1], agg, max_len=4, num_tokens=3.0, num_rows=2) for i in (0, 1))
        assert parts.item() == pytest.approx(whole), agg
        assert aggregate(v, mask, agg, max_len=4).item() == pytest.approx(whole), agg
    # Without the global counts each micro-batch divides by its own (token_mean: 4/2 + 5/1 = 7, not 3).
    assert sum(aggregate(v[i:i + 1], mask[i:i + 1], "token_mean") for i in (0, 1)).item() == pytest.approx(7.0)


def test_empty_row_does_not_divide_by_zero():
    v = torch.ones(2, 2)
    mask = torch.tensor([[1, 1], [0, 0]])
    # row means: 1 and 0 (empty row counts as 0) -> 0.5
    assert aggregate(v, mask, "seq_mean_token_mean").item() == pytest.approx(0.5)


def test_clipping_on_both_sides():
    # 4 tokens, eps 0.2. logp - old = log(ratio).
    #  tok0: ratio 1.5, A=+1 -> min(1.5, 1.2) = 1.2 -> loss -1.2   (high clip bites)
    #  tok1: ratio 0.5, A=-1 -> min(-0.5, -0.8) = -0.8 -> loss 0.8 (low clip bites)
    #  tok2: ratio 0.5, A=+1 -> min(0.5, 0.8) = 0.5 -> loss -0.5   (unclipped branch)
    #  tok3: ratio 1.5, A=-1 -> min(-1.5, -1.2) = -1.5 -> loss 1.5 (unclipped branch)
    ratios = torch.tensor([[1.5], [0.5], [0.5], [1.5]])
    logp = ratios.log()
    old = torch.zeros(4, 1)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, m = policy_loss(logp, old, adv, torch.ones(4, 1), clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5) / 4)
    assert m["clip/high_frac"] == pytest.approx(0.25)
    assert m["clip/low_frac"] == pytest.approx(0.25)
    assert m["clip/frac"] == pytest.approx(0.5)


def test_clip_higher_is_asymmetric():
    # ratio 1.25 with A=+1: clipped at 1.2 with clip_high=0.2, free with clip_high=0.28
    logp = torch.tensor([[math.log(1.25)]])
    l1, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), clip_high=0.2)
    l2, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), clip_high=0.28)
    assert l1.item() == pytest.approx(-1.2)
    assert l2.item() == pytest.approx(-1.25)


def test_gradient_of_clipped_token_is_zero_and_kl_adds_beta_k3():
    # tok0 clipped (ratio 1.5, A=+1): no gradient from the surrogate.
    logp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    loss.backward()
    assert logp.grad.item() == 0.0
    # With a reference: loss = -A*ratio + beta * k3. ratio 1 (logp=old=log .5), ref = log .25:
    # k3 = 0.5 + log 2 - 1 = 0.19315; beta 0.1 -> loss = -1 + 0.019315
    lp = torch.tensor([[math.log(0.5)]])
    loss, m = policy_loss(lp, lp, torch.tensor([1.0]), torch.ones(1, 1), ref_logp=torch.tensor([[math.log(0.25)]]), beta=0.1)
    assert loss.item() == pytest.approx(-1 + 0.1 * (0.5 + math.log(2) - 1))
    assert m["kl"] == pytest.approx(0.5 + math.log(2) - 1)


def test_vectorised_loss_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    logp, old = torch.randn(3, 5, generator=g) * 0.3, torch.randn(3, 5, generator=g) * 0.3
    adv = torch.randn(3, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.3, agg="seq_mean_token_mean")
    rows = []
    for i in range(3):
        toks = []
        for t in range(5):
            if mask[i, t]:
                r = math.exp(logp[i, t] - old[i, t])
                toks.append(-min(r * adv[i], min(max(r, 0.9), 1.3) * adv[i]))
        rows.append(sum(toks) / len(toks))
    assert loss.item() == pytest.approx(float(sum(rows) / 3), rel=1e-5)


def test_importance_weights_scale_the_clipped_term_not_the_kl():
    # ratio 1, A = +1 on two tokens, weights 0.5 and 2 -> surrogate -(0.5 + 2) / 2 = -1.25;
    # the KL term (beta 0.1, k3 = 0.19315 per token) is not weighted: + 0.1 * 0.19315
    lp = torch.full((1, 2), math.log(0.5))
    ref = torch.full((1, 2), math.log(0.25))
    w = torch.tensor([[0.5, 2.0]])
    loss, _ = policy_loss(lp, lp, torch.tensor([1.0]), torch.ones(1, 2), ref_logp=ref, beta=0.1, is_weights=w)
    assert loss.item() == pytest.approx(-1.25 + 0.1 * (0.5 + math.log(2) - 1))
