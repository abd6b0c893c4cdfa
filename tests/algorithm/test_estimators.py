"""The estimator pack (issue 22) against values derived by hand: RLOO, REINFORCE++, GSPO (sequence
and sequence-token), CISPO, the mismatch masks, DAPO's group filter and overlong penalty; and each
reduces to GRPO where its paper says it does."""

import math

import pytest
import torch

from grpo import (group_advantages, mismatch_mask, overlong_penalty, policy_loss, reinforce_pp_advantages,
                  rloo_advantages, sequence_ratio, varied_groups)


# ---- RLOO ------------------------------------------------------------------------------------------
def test_rloo_g8_three_right():
    # G = 8, rewards 1,1,1,0,0,0,0,0. A right answer: 1 - (2 right among the 7 others) / 7 = 5/7 = 0.7143;
    # a wrong one: 0 - 3/7 = -0.4286. (= 8/7 * (R - 3/8).)
    adv = rloo_advantages(torch.tensor([1.0] * 3 + [0.0] * 5), group_size=8)
    torch.testing.assert_close(adv, torch.tensor([5 / 7] * 3 + [-3 / 7] * 5))
    assert round(float(adv[0]), 4) == 0.7143 and round(float(adv[-1]), 4) == -0.4286


def test_rloo_group_of_one_is_zero_and_equal_rewards_are_zero():
    assert torch.equal(rloo_advantages(torch.tensor([0.3, 1.0]), group_size=1), torch.zeros(2))
    # a group of equal rewards (0.5 four times): no std division, so nothing blows up (NeMo-RL #1518)
    assert torch.equal(rloo_advantages(torch.tensor([0.5] * 4), group_size=4), torch.zeros(4))


def test_rloo_is_dr_grpo_times_g_over_g_minus_1():
    r = torch.tensor([0.0, 0.2, 0.9, 1.0, 1.0, 0.0])
    torch.testing.assert_close(rloo_advantages(r, 3), 3 / 2 * group_advantages(r, 3, scale="none"))


# ---- REINFORCE++ -------------------------------------------------------------------------------------
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
KL = torch.full((2, 3), 0.1)


def test_reinforce_pp_returns_whitened_by_hand():
    # beta = 0.5: r_t = -0.05 per real token, plus the score at the last one (row 0: score 1, row 1: 0).
    # gamma = 1 returns: row 0 [0.85, 0.90, 0.95], row 1 [-0.10, -0.05].
    # mean over the 5 real tokens: 2.55 / 5 = 0.51; deviations 0.34, 0.39, 0.44, -0.61, -0.56;
    # unbiased variance (0.1156 + 0.1521 + 0.1936 + 0.3721 + 0.3136) / 4 = 0.28675.
    adv = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), KL, MASK, beta=0.5, gamma=1.0)
    sd = math.sqrt(0.28675)
    expected = torch.tensor([[0.34 / sd, 0.39 / sd, 0.44 / sd], [-0.61 / sd, -0.56 / sd, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_reinforce_pp_discount_and_baseline():
    # gamma = 0.5, row 0: G_2 = 0.95, G_1 = -0.05 + 0.5 * 0.95 = 0.425, G_0 = -0.05 + 0.5 * 0.425 = 0.1625;
    # row 1: G_1 = -0.05, G_0 = -0.05 - 0.025 = -0.075.
    g = torch.tensor([[0.1625, 0.425, 0.95], [-0.075, -0.05, 0.0]])
    real = g[MASK.bool()]
    expected = (g - real.mean()) / real.std() * MASK
    adv = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), KL, MASK, beta=0.5, gamma=0.5)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    # The baseline (group of 2): scores [1, 0] - 0.5 = [0.5, -0.5]. Row 0: G_2 = -0.05 + 0.5 = 0.45,
    # G_1 = -0.05 + 0.225 = 0.175, G_0 = -0.05 + 0.0875 = 0.0375; row 1: G_1 = -0.55, G_0 = -0.05 - 0.275.
    # With gamma < 1 the shift is not common to all tokens, so the baseline changes the advantages.
    gb = torch.tensor([[0.0375, 0.175, 0.45], [-0.325, -0.55, 0.0]])
    real = gb[MASK.bool()]
    adv_b = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), KL, MASK, beta=0.5, gamma=0.5, group_size=2)
    torch.testing.assert_close(adv_b, (gb - real.mean()) / real.std() * MASK, atol=1e-5, rtol=0)


def test_reinforce_pp_skips_masked_slots():
    # A tool result (column 1) is not a step: row [a, tool, b] has the returns of [a, b].
    holes = torch.tensor([[1, 0, 1]])
    dense = torch.tensor([[1, 1]])
    # with a second row so that the whitening has a spread
    a = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), torch.full((2, 3), 0.1),
                                torch.cat([holes, torch.tensor([[1, 1, 0]])]), beta=0.5, gamma=0.5)
    b = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), torch.full((2, 2), 0.1),
                                torch.cat([dense, torch.tensor([[1, 1]])]), beta=0.5, gamma=0.5)
    torch.testing.assert_close(a[0, [0, 2]], b[0])
    assert a[0, 1] == 0


def test_reinforce_pp_whitening_over_ranks_equals_one_process():
    # Two "ranks" (threads) hold one row each; `reduce` sums each list over both, as Parallel.sum does
    # over processes: each rank's advantages are then its rows of the one-process result.
    import threading

    score = torch.tensor([1.0, 0.0])
    whole = reinforce_pp_advantages(score, KL, MASK, beta=0.5, gamma=1.0)
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def rank(i):
        def reduce(values):
            slots[i] = values
            barrier.wait()
            total = [a + b for a, b in zip(*slots)]
            barrier.wait()  # both have read before the next reduce overwrites
            return total
        out[i] = reinforce_pp_advantages(score[i:i + 1], KL[i:i + 1], MASK[i:i + 1], beta=0.5, gamma=1.0,
                                         reduce=reduce)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    torch.testing.assert_close(torch.cat(out), whole)


# ---- GSPO --------------------------------------------------------------------------------------------
def one_row(log_ratios, adv=1.0):
    """A row of len(log_ratios) tokens whose token ratios are exp(log_ratios); logp requires grad."""
    old = torch.tensor([[-1.0] * len(log_ratios)])
    logp = (old + torch.tensor([log_ratios])).requires_grad_()
    return logp, old, torch.tensor([adv]), torch.ones_like(old)


def test_gspo_sequence_ratio_is_the_geometric_mean():
    # token ratios e^3, e^-3, e^0.6: s = exp((3 - 3 + 0.6) / 3) = e^0.2 = 1.2214; padding ignored
    logp = torch.tensor([[2.0, -4.0, -0.4, 55.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0, 0.0]])
    s = sequence_ratio(logp, old, torch.tensor([[1, 1, 1, 0]]))
    torch.testing.assert_close(s, torch.tensor([math.exp(0.2)]))


def test_gspo_with_ratios_e3_em3_e06_token_vs_sequence():
    # Token level (PPO/GRPO, clip 0.2, A = 1): per token -min(r, clip(r, 0.8, 1.2)):
    #   e^3 = 20.09 -> -1.2 (clipped, no gradient); e^-3 = 0.0498 -> -0.0498 (A > 0: min picks r,
    #   gradient -r / 3); e^0.6 = 1.822 -> -1.2 (clipped). Mean: -(2.4 + e^-3) / 3 = -0.8166.
    logp, old, adv, mask = one_row([3.0, -3.0, 0.6])
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, 0.2, agg="seq_mean_token_mean")
    torch.testing.assert_close(loss, torch.tensor(-(2.4 + math.exp(-3)) / 3))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -math.exp(-3) / 3, 0.0]]))
    # Sequence level, the paper's clip range 3e-4 / 4e-4: s = e^0.2 = 1.2214 > 1.0004, so the
    # clipped branch -1.0004 wins for the whole sequence and no token gets a gradient.
    for level in ("sequence", "sequence_token"):
        logp, old, adv, mask = one_row([3.0, -3.0, 0.6])
        loss, m = policy_loss(logp, old, adv, mask, 3e-4, 4e-4, agg="seq_mean_token_mean", is_level=level)
        torch.testing.assert_close(loss, torch.tensor(-1.0004))
        loss.backward()
        assert torch.equal(logp.grad, torch.zeros(1, 3)), level
        assert m["clip/high_frac"] == 1.0
    # Inside a wider range (0.3): loss -s = -1.2214; d(-s)/d logp_t = -s / 3 = -0.40714 for every
    # token, in both forms (GSPO-token's gradient equals GSPO's when A is constant over the row).
    for level in ("sequence", "sequence_token"):
        logp, old, adv, mask = one_row([3.0, -3.0, 0.6])
        loss, _ = policy_loss(logp, old, adv, mask, 0.3, 0.3, agg="seq_mean_token_mean", is_level=level)
        torch.testing.assert_close(loss, torch.tensor(-math.exp(0.2)))
        loss.backward()
        torch.testing.assert_close(logp.grad, torch.full((1, 3), -math.exp(0.2) / 3))


def test_gspo_token_form_takes_per_token_advantages():
    # sequence_token with A = [1, -1] over two tokens of ratio 1: per token -min(A, A) = -A, mean 0;
    # gradient -A_t / 2 on token t (the sequence form would have no per-token A at all).
    logp, old, _, mask = one_row([0.0, 0.0])
    loss, _ = policy_loss(logp, old, torch.tensor([[1.0, -1.0]]), mask, 3e-4, 4e-4, agg="seq_mean_token_mean",
                          is_level="sequence_token")
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 0.5]]))


def test_gspo_on_policy_reduces_to_grpo():
    # With old = logp.detach() every ratio is 1: all levels give GRPO's plain policy gradient.
    torch.manual_seed(0)
    base = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv = torch.tensor([0.5, -1.0, 2.0])
    grads = {}
    for level in ("token", "sequence", "sequence_token"):
        logp = base.clone().requires_grad_()
        loss, _ = policy_loss(logp, logp.detach(), adv, mask, 3e-4, 4e-4, agg="seq_mean_token_mean",
                              is_level=level)
        loss.backward()
        grads[level] = logp.grad
    torch.testing.assert_close(grads["sequence"], grads["token"])
    torch.testing.assert_close(grads["sequence_token"], grads["token"])


# ---- CISPO -------------------------------------------------------------------------------------------
def test_cispo_keeps_the_gradient_of_clipped_tokens():
    # Token ratios e^0.6 = 1.822 (clipped to 1.2) and e^-0.1 = 0.905 (inside); A = 1; logp = -0.4, -1.1.
    # per token -sg(clip(r)) * A * logp: 1.2 * 0.4 = 0.48 and 0.905 * 1.1 = 0.9955; mean 0.73775.
    # The gradient is -sg(w) * A / 2: -0.6 and -0.4524 (PPO's would be 0 on the clipped token).
    logp, old, adv, mask = one_row([0.6, -0.1])
    loss, m = policy_loss(logp, old, adv, mask, 0.2, 0.2, objective="cispo")
    w2 = math.exp(-0.1)
    torch.testing.assert_close(loss, torch.tensor((1.2 * 0.4 + w2 * 1.1) / 2))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.6, -w2 / 2]]))
    assert m["clip/high_frac"] == 0.5 and m["clip/low_frac"] == 0.0


def test_cispo_on_policy_has_grpo_gradient():
    torch.manual_seed(1)
    base = torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    adv = torch.tensor([1.5, -0.5])
    grads = []
    for objective in ("ppo", "cispo"):
        logp = base.clone().requires_grad_()
        loss, _ = policy_loss(logp, logp.detach(), adv, mask, objective=objective)
        loss.backward()
        grads.append(logp.grad)
    torch.testing.assert_close(grads[0], grads[1])


# ---- padding: exactly zero, whatever it holds ---------------------------------------------------------
@pytest.mark.parametrize("level,objective", [("token", "ppo"), ("sequence", "ppo"), ("sequence_token", "ppo"),
                                             ("token", "cispo")])
def test_padding_gets_exactly_zero_gradient_and_left_right_padding_agree(level, objective):
    torch.manual_seed(2)
    real = torch.randn(2, 3)
    old = real + 0.05 * torch.randn(2, 3)
    adv = torch.tensor([1.0, -1.0])
    # right padding: real tokens first; left: real tokens last; padding holds huge or -inf values
    out = {}
    for side in ("right", "left"):
        pad = torch.tensor([[80.0, float("-inf")], [-80.0, 1e9]])
        logp = (torch.cat([real, pad], 1) if side == "right" else torch.cat([pad, real], 1)).requires_grad_()
        o = torch.cat([old, torch.zeros(2, 2)], 1) if side == "right" else torch.cat([torch.zeros(2, 2), old], 1)
        mask = torch.tensor([[1, 1, 1, 0, 0]] * 2) if side == "right" else torch.tensor([[0, 0, 1, 1, 1]] * 2)
        loss, _ = policy_loss(logp, o, adv, mask, 0.1, 0.1, ref_logp=o, beta=0.1, is_level=level, objective=objective)
        loss.backward()
        g = logp.grad
        assert torch.isfinite(loss)
        pads = g[:, 3:] if side == "right" else g[:, :2]
        assert torch.equal(pads, torch.zeros(2, 2))
        out[side] = (loss.detach(), g[:, :3] if side == "right" else g[:, 2:])
    torch.testing.assert_close(out["left"][0], out["right"][0])
    torch.testing.assert_close(out["left"][1], out["right"][1])


def test_bad_level_or_objective_is_refused():
    logp, old, adv, mask = one_row([0.0])
    with pytest.raises(ValueError, match="is_level"):
        policy_loss(logp, old, adv, mask, is_level="row")
    with pytest.raises(ValueError, match="objective"):
        policy_loss(logp, old, adv, mask, objective="ppo2")


# ---- engine/trainer mismatch masks -------------------------------------------------------------------
def test_mismatch_masks_by_hand():
    # rho = p_trainer / p_engine. Row 0: 3, 1, 0.4 (product 1.2, geometric mean 1.2^(1/3) = 1.063);
    # row 1: 1.5, 1.5, padding (product 2.25, geometric mean 1.5). Bounds [0.5, 2].
    engine = torch.full((2, 3), -1.0)
    trainer = engine + torch.log(torch.tensor([[3.0, 1.0, 0.4], [1.5, 1.5, 1.0]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    token = mismatch_mask(trainer, engine, mask, "token", 0.5, 2.0)
    assert token.tolist() == [[0, 1, 0], [1, 1, 0]]  # 3 and 0.4 leave [0.5, 2]
    seq = mismatch_mask(trainer, engine, mask, "sequence", 0.5, 2.0)
    assert seq.tolist() == [[1, 1, 1], [0, 0, 0]]  # 1.2 stays, 2.25 leaves
    geo = mismatch_mask(trainer, engine, mask, "geometric", 0.5, 2.0)
    assert geo.tolist() == [[1, 1, 1], [1, 1, 0]]  # 1.063 and 1.5 stay
    with pytest.raises(ValueError, match="mismatch"):
        mismatch_mask(trainer, engine, mask, "row", 0.5, 2.0)


def test_a_masked_token_gets_no_gradient():
    logp, old, adv, mask = one_row([0.0, 0.0])
    keep = torch.tensor([[1.0, 0.0]])
    loss, _ = policy_loss(logp, old, adv, mask, is_weights=keep)
    loss.backward()
    # token_mean over both tokens (the masked one still counts in the normaliser): -1 / 2 on token 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 0.0]]))


# ---- DAPO ----------------------------------------------------------------------------------------------
def test_varied_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    assert varied_groups(r, 3).tolist() == [False, True, False]
    assert varied_groups(torch.tensor([1.0, 0.0]), 1).tolist() == [False, False]  # a group of one never varies


def test_overlong_penalty_by_hand():
    # L_max = 20, L_c = 5: 0 up to 15; (15 - L) / 5 from 16 (-0.2) to 20 (-1); -1 beyond
    pen = overlong_penalty(torch.tensor([10, 15, 16, 18, 20, 21]), max_len=20, cache=5)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0, -1.0]))
    with pytest.raises(ValueError, match="cache"):
        overlong_penalty(torch.tensor([1]), max_len=20, cache=0)
