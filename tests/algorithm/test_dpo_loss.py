"""dpo_loss against values derived by hand."""

import math

import pytest
import torch

from grpo.algorithm.preference_losses import dpo_loss

LOG2 = math.log(2.0)


def zeros(n=3):
    return torch.zeros(n)


def test_policy_equal_to_reference_gives_log2_and_zero_metrics():
    # d = 0: -logsigmoid(0) = log 2, for every eps: (1 - eps) log 2 + eps log 2 = log 2;
    # robust: ((1 - eps) log 2 - eps log 2) / (1 - 2 eps) = log 2
    for eps in (0.0, 0.1, 0.3):
        for kind in ("sigmoid", "robust"):
            loss, m = dpo_loss(zeros(), zeros(), zeros(), zeros(), beta=0.1, loss=kind, label_smoothing=eps)
            assert loss.item() == pytest.approx(LOG2)
            assert m == {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0,
                         "rewards/accuracies": 0.0}
    # ipo at d = 0, beta 0.1: (0 - 1 / 0.2)^2 = 25
    assert dpo_loss(zeros(), zeros(), zeros(), zeros(), beta=0.1, loss="ipo")[0].item() == pytest.approx(25.0)


def test_sigmoid_and_metrics_on_one_pair():
    # u_c = -1 - (-3) = 2, u_r = -4 - (-2) = -2, d = 4; beta 0.5: beta d = 2
    # loss = -logsigmoid(2) = log(1 + e^-2) = 0.126928; rewards: chosen 1, rejected -1, margin 2, accuracy 1
    loss, m = dpo_loss(torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)))
    assert m == pytest.approx({"rewards/chosen": 1.0, "rewards/rejected": -1.0, "rewards/margins": 2.0,
                               "rewards/accuracies": 1.0})
    # conservative DPO, eps 0.1: 0.9 log(1 + e^-2) + 0.1 log(1 + e^2) = 0.114235 + 0.212693 = 0.326928
    cons = dpo_loss(torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), beta=0.5,
                    label_smoothing=0.1)[0]
    assert cons.item() == pytest.approx(0.9 * math.log(1 + math.exp(-2)) + 0.1 * math.log(1 + math.exp(2)))
    # robust, eps 0.1: (0.9 log(1 + e^-2) - 0.1 log(1 + e^2)) / 0.8 = (0.114235 - 0.212693) / 0.8 = -0.123072
    rob = dpo_loss(torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), beta=0.5,
                   loss="robust", label_smoothing=0.1)[0]
    assert rob.item() == pytest.approx((0.9 * math.log(1 + math.exp(-2)) - 0.1 * math.log(1 + math.exp(2))) / 0.8)


def test_ipo_uses_per_token_log_ratios_when_lengths_are_given():
    # u_c = 2 over 4 tokens -> 0.5; u_r = -1 over 2 tokens -> -0.5; d' = 1; beta 0.5: (1 - 1)^2 = 0.
    # Without lengths d = 3: (3 - 1)^2 = 4.
    args = (torch.tensor([2.0]), torch.tensor([-1.0]), zeros(1), zeros(1))
    assert dpo_loss(*args, beta=0.5, loss="ipo", len_chosen=torch.tensor([4.0]),
                    len_rejected=torch.tensor([2.0]))[0].item() == pytest.approx(0.0)
    assert dpo_loss(*args, beta=0.5, loss="ipo")[0].item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="both"):
        dpo_loss(*args, loss="ipo", len_chosen=torch.tensor([4.0]))


def test_gradient_raises_chosen_and_lowers_rejected_and_never_reaches_the_reference():
    # d loss / d logp_chosen = -beta * sigmoid(-beta d) / P: at d = 0, beta 0.1, P = 1: -0.05
    lc, lr = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    rc, rr = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    dpo_loss(lc, lr, rc, rr, beta=0.1)[0].backward()
    assert lc.grad.item() == pytest.approx(-0.05) and lr.grad.item() == pytest.approx(0.05)
    assert rc.grad is None and rr.grad is None


def test_bad_options():
    with pytest.raises(ValueError, match="dpo loss"):
        dpo_loss(zeros(), zeros(), zeros(), zeros(), loss="hinge2")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(zeros(), zeros(), zeros(), zeros(), label_smoothing=0.5)
