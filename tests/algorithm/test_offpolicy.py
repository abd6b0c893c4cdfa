"""The decoupled off-policy correction of policy_loss (behav_logp, behav_cap; issue 24): values derived by
hand, and exact equality with the plain loss when the behaviour policy is the proximal one."""

import math

import pytest
import torch

from grpo import policy_loss

LN = math.log


# ---- by hand ---------------------------------------------------------------------------------------------
def test_decoupled_loss_and_gradient_by_hand():
    # 2 rows x 3 tokens, row 1's last token is padding. clip 0.2 / 0.2, behav_cap 4, A = [+1, -1] per row,
    # token_mean over the 5 real tokens. prox_logp = -1 on every real token; the ratio to the proximal
    # policy r = exp(logp - prox) and the behaviour weight w = min(exp(prox - behav), 4):
    #   row 0 (A = +1):
    #     t0: r = 1,   w = e^ln2 = 2:            -2 * min(1, 1) = -2;         d/dlogp = -w A r = -2
    #     t1: r = 1.5, w = e^ln0.5 = 0.5:        -0.5 * min(1.5, 1.2) = -0.6  (clipped: gradient 0)
    #     t2: r = 0.5, w = min(e^ln8, 4) = 4:    -4 * min(0.5, 0.8) = -2;     d/dlogp = -4 * 0.5 = -2  (cap cut it)
    #   row 1 (A = -1):
    #     t0: r = 1.5, w = e^ln0.25 = 0.25:      -0.25 * min(-1.5, -1.2) = +0.375; d/dlogp = 0.25 * 1.5 = 0.375
    #     t1: r = 0.5, w = e^0 = 1:              -1 * min(-0.5, -0.8) = +0.8  (clipped: gradient 0)
    #     t2: padding; logp 50, prox 0, behav -inf (a weight of e^inf if it were read): loss 0, gradient 0
    # loss = (-2 - 0.6 - 2 + 0.375 + 0.8) / 5 = -3.425 / 5 = -0.685
    # gradient = per-token derivative / 5: row 0 [-0.4, 0, -0.4], row 1 [0.075, 0, 0]
    prox = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, 0.0]])
    logp = (prox + torch.tensor([[0.0, LN(1.5), LN(0.5)], [LN(1.5), LN(0.5), 50.0]])).requires_grad_()
    behav = prox - torch.tensor([[LN(2), LN(0.5), LN(8)], [LN(0.25), 0.0, 0.0]])
    behav[1, 2] = float("-inf")
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, m = policy_loss(logp, prox, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2, behav_logp=behav, behav_cap=4.0)
    torch.testing.assert_close(loss, torch.tensor(-0.685))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.4, 0.0, -0.4], [0.075, 0.0, 0.0]]))
    assert logp.grad[1, 2] == 0 and logp.grad[0, 1] == 0 and logp.grad[1, 1] == 0  # exactly
    # weights after the cap 2, 0.5, 4, 0.25, 1: mean 7.75 / 5 = 1.55; one of 5 (the 8) cut: 0.2.
    # The clip: row 0 t1 above (r 1.5 > 1.2, A > 0), row 1 t1 below (r 0.5 < 0.8, A < 0): 1/5 each.
    assert m["offpolicy/weight_mean"] == pytest.approx(1.55)
    assert m["offpolicy/truncated_frac"] == pytest.approx(0.2)
    assert m["clip/high_frac"] == pytest.approx(0.2) and m["clip/low_frac"] == pytest.approx(0.2)


def test_cispo_takes_the_behaviour_weight_too():
    # CISPO, one token, A = 1, logp = -0.5 = prox (r = 1), behav = -0.5 - ln 3: w = 3 under cap 5.
    # loss = -w * sg(clip(r)) * A * logp = -3 * 1 * 1 * (-0.5) = 1.5; gradient -w * A = -3.
    logp = torch.tensor([[-0.5]], requires_grad=True)
    loss, m = policy_loss(logp, torch.tensor([[-0.5]]), torch.tensor([1.0]), torch.ones(1, 1), objective="cispo",
                          behav_logp=torch.tensor([[-0.5 - LN(3)]]), behav_cap=5.0)
    torch.testing.assert_close(loss, torch.tensor(1.5))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-3.0]]))
    assert m["offpolicy/weight_mean"] == pytest.approx(3.0) and m["offpolicy/truncated_frac"] == 0.0


@pytest.mark.parametrize("level,objective,agg", [("token", "ppo", "token_mean"),
                                                 ("sequence", "ppo", "seq_mean_token_mean"),
                                                 ("sequence_token", "ppo", "seq_mean_token_sum"),
                                                 ("token", "cispo", "seq_mean_token_sum_norm")])
def test_behaviour_equal_to_proximal_is_the_plain_loss_bit_for_bit(level, objective, agg):
    # mu = pi_prox: every weight is e^0 = 1 exactly, so loss, gradient and the shared metrics are those of
    # the call without behav_logp (torch.equal, not a tolerance), with KL, a mismatch mask and padding that
    # holds garbage in behav_logp.
    torch.manual_seed(3)
    base = torch.randn(3, 4)
    old = base + 0.3 * torch.randn(3, 4)
    ref = base + 0.1 * torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]])
    adv = torch.tensor([0.7, -1.3, 2.0])
    keep = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    behav = torch.where(mask.bool(), old, torch.full_like(old, float("-inf")))
    out = []
    for kw in ({}, {"behav_logp": behav, "behav_cap": 2.0}):
        logp = base.clone().requires_grad_()
        loss, m = policy_loss(logp, old, adv, mask, 0.2, 0.28, ref_logp=ref, beta=0.05, agg=agg, is_weights=keep,
                              is_level=level, objective=objective, **kw)
        loss.backward()
        out.append((loss.detach(), logp.grad, m))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert {k: out[1][2][k] for k in out[0][2]} == out[0][2]
    assert "offpolicy/weight_mean" not in out[0][2]  # without behav_logp the metrics are today's
    assert out[1][2]["offpolicy/weight_mean"] == 1.0 and out[1][2]["offpolicy/truncated_frac"] == 0.0


def test_a_cap_below_one_is_refused():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="behav_cap"):
        policy_loss(x, x, torch.ones(1), torch.ones(1, 1), behav_logp=x, behav_cap=0.5)
