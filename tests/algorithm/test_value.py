"""PPO's estimators against values derived by hand, and GAE against a plain per-row loop."""

import random

import pytest
import torch

from grpo.algorithm.value import AdaptiveKL, gae, last_index, ppo_rewards, value_loss, whiten


def test_ppo_rewards_put_the_score_on_the_last_real_token_never_on_padding():
    # Row 0 is [t0, t1, EOS, PAD, PAD]: mask [1, 1, 1, 0, 0]; kl [0.1, 0.2, 0.3, 9, 9], beta 0.5, score 2
    #   -> [-0.05, -0.1, -0.15 + 2, 0, 0] (the padding's kl of 9 never counts).
    # Row 1 is full: mask [1] * 5, kl 0, score -1 -> -1 at t = 4. Row 2 has no token: all 0.
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0, 9.0], [0.0] * 5, [5.0] * 5])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [0] * 5])
    r = ppo_rewards(torch.tensor([2.0, -1.0, 7.0]), kl, mask, beta=0.5)
    assert r[0].tolist() == pytest.approx([-0.05, -0.1, 1.85, 0.0, 0.0])
    assert r[1].tolist() == [0.0, 0.0, 0.0, 0.0, -1.0]
    assert r[2].tolist() == [0.0] * 5
    assert last_index(mask).tolist() == [2, 4, -1]


def test_gae_by_hand():
    # Row 0: rewards [0, 0, 1], values [0.5] * 3, gamma 1.
    #   deltas: t2 = 1 + 0 - 0.5 = 0.5 (V after the last token is 0); t1 = 0 + 0.5 - 0.5 = 0; t0 = 0.
    #   lam 1: A = [0.5, 0.5, 0.5], returns = A + V = [1, 1, 1]
    #   lam 0.5: A2 = 0.5, A1 = 0 + 0.5 * 0.5 = 0.25, A0 = 0.125
    # Row 1 (ragged, mask [1, 1, 0]): rewards [0, 1, junk], values [0.2, 0.4, junk 9]:
    #   delta1 = 1 + 0 - 0.4 = 0.6; delta0 = 0 + 0.4 - 0.2 = 0.2; lam 0.5: A1 = 0.6, A0 = 0.2 + 0.3 = 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, 0.5]) and ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.125, 0.25, 0.5])
    assert adv[1].tolist() == pytest.approx([0.5, 0.6, 0.0]) and ret[1].tolist() == pytest.approx([0.7, 1.0, 0.0])


def loop_gae(r, v, n, gamma, lam):
    """One row, plain Python: the textbook recursion over its n real tokens."""
    adv, nxt_a = [0.0] * n, 0.0
    for t in reversed(range(n)):
        nxt_v = v[t + 1] if t + 1 < n else 0.0
        delta = r[t] + gamma * nxt_v - v[t]
        nxt_a = delta + gamma * lam * nxt_a
        adv[t] = nxt_a
    return adv


def test_gae_matches_a_loop_on_random_ragged_rows():
    rng = random.Random(0)
    N, T = 6, 7
    lengths = [rng.randint(0, T) for _ in range(N)]
    rewards, values = torch.randn(N, T, dtype=torch.float64), torch.randn(N, T, dtype=torch.float64)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
        adv, ret = gae(rewards, values, mask, gamma, lam)
        for i, n in enumerate(lengths):
            ref = loop_gae(rewards[i].tolist(), values[i].tolist(), n, gamma, lam)
            assert adv[i, :n].tolist() == pytest.approx(ref)
            assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0
            assert ret[i, :n].tolist() == pytest.approx([a + v for a, v in zip(ref, values[i, :n].tolist())])


def test_gae_skips_masked_slots_inside_a_row():
    # A multi-turn row: model tokens at t = 0, 1 and 4, a tool result at t = 2, 3 (mask 0), padding at 5.
    # Its GAE is that of the three real tokens alone, [r0, r1, r4] = [0, 0, 1] with values [0.5, 0.2, 0.4]:
    #   gamma 1, lam 0.5: delta4 = 1 + 0 - 0.4 = 0.6; delta1 = 0 + 0.4 - 0.2 = 0.2; delta0 = 0 + 0.2 - 0.5 = -0.3
    #   A4 = 0.6, A1 = 0.2 + 0.5 * 0.6 = 0.5, A0 = -0.3 + 0.5 * 0.5 = -0.05; returns = A + V = [0.45, 0.7, 1.0]
    # The masked slots' junk values (9) and rewards (7) never enter, and they get A = returns = 0.
    rewards = torch.tensor([[0.0, 0.0, 7.0, 7.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.2, 9.0, 9.0, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 0, 0, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([-0.05, 0.5, 0.0, 0.0, 0.6, 0.0])
    assert ret[0].tolist() == pytest.approx([0.45, 0.7, 0.0, 0.0, 1.0, 0.0])
    # the same numbers as the compacted row
    a2, r2 = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.4]]), torch.ones(1, 3), 1.0, 0.5)
    assert adv[0, [0, 1, 4]].tolist() == pytest.approx(a2[0].tolist())


def test_whiten():
    # real tokens 1, 2, 3 (the 100 is padding): mean 2, unbiased var ((1 + 0 + 1) / 2) = 1
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert whiten(x, mask).flatten().tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0])
    assert whiten(x, mask, shift_mean=False).flatten().tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0])


def test_value_loss_clips_like_the_paper():
    # token 0: V 1.0, V_old 0.5, R 2.0, clip 0.2 -> clipped V 0.7; (1 - 2)^2 = 1, (0.7 - 2)^2 = 1.69: max 1.69
    # token 1: V 0.6, V_old 0.5, R 0.55 -> within the clip, both 0.0025
    # token 2: padding. token_mean: 0.5 * (1.69 + 0.0025) / 2 = 0.423125; clipfrac 1/2; mean V (1 + 0.6) / 2
    v = torch.tensor([[1.0, 0.6, 50.0]], requires_grad=True)
    loss, m = value_loss(v, torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[2.0, 0.55, 0.0]]),
                         torch.tensor([[1, 1, 0]]), clip=0.2)
    assert loss.item() == pytest.approx(0.423125)
    assert m == pytest.approx({"val/clipfrac": 0.5, "val/mean": 0.8})
    loss.backward()
    # token 0 takes the clipped branch, whose value is constant in V (clamp saturated): no gradient;
    # token 1: d/dV 0.5 * (V - R)^2 / 2 = (0.6 - 0.55) / 2 = 0.025 ; padding: 0
    assert v.grad.flatten().tolist() == pytest.approx([0.0, 0.025, 0.0])


def test_adaptive_kl():
    # init 0.1, target 6, horizon 10000: kl 12 -> error clamp(12/6 - 1) = 0.2 -> 0.1 * (1 + 0.2 * 256 / 10000)
    ctl = AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * 1.00512)
    # kl 3 -> error -0.5 clamped to -0.2
    assert ctl.update(3.0, 256) == pytest.approx(0.1 * 1.00512 * (1 - 0.00512))
    # kl 6.6 -> error 0.1 (not clamped)
    before = ctl.value
    assert ctl.update(6.6, 100) == pytest.approx(before * (1 + 0.1 * 100 / 10000))
    again = AdaptiveKL(1.0)
    again.load_state_dict(ctl.state_dict())
    assert again.value == ctl.value and again.target == 6.0
    fixed = AdaptiveKL(0.05)  # no target: fixed
    assert fixed.update(100.0, 1000) == 0.05
    with pytest.raises(ValueError, match="target must be > 0"):
        AdaptiveKL(0.1, target=0.0)
