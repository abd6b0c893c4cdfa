"""The decoupled off-policy correction of policy_loss (behav_logp, behav_cap; issue 24): values derived by
hand, exact equality with the plain loss when the behaviour policy is the proximal one, and, on a softmax
bandit whose policy gradient is known in closed form, that the corrected gradient of lagged samples is
unbiased and the uncorrected one is not (shown by simulation over 10,000 seeds, not assumed)."""

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


# ---- a softmax bandit: unbiasedness, shown ----------------------------------------------------------------
# K = 5 arms, pi_theta = softmax(theta), arm a pays a Bernoulli reward of mean p_a. The objective and its
# gradient, in closed form: J(theta) = sum_a pi_a p_a, and with d pi_a / d theta_b = pi_a (1[a=b] - pi_b),
#     dJ / d theta_b = sum_a p_a pi_a (1[a=b] - pi_b) = pi_b p_b - pi_b J = pi_b (p_b - J).
# The run: theta_0 = 0 (uniform), theta_{j+1} = theta_j + 10 * grad J(theta_j) for j = 0, 1 (exact ascent
# moves, large enough that consecutive policies differ noticeably); step k = 2 trains at theta_2, so
# pi_prox = pi_theta_2, and with staleness eta its samples come from mu = pi_theta_{2-eta}.
# One sample is one row of one token, logp = log pi_theta(a). The advantage is A = R - b with
# b = J(theta_2), a number fixed before sampling: the baseline adds E_mu[w b grad log pi(a)] =
# b sum_a pi_a grad log pi_a = b grad sum_a pi_a = 0 in expectation, so it lowers the variance and keeps the
# estimate unbiased. (A group mean as baseline would depend on the sample itself, an O(1/G) bias of its own
# that this test keeps out, to see the lag alone.) At theta = theta_2 every r = 1, so the clip does not bind
# and one gradient of the corrected loss is -w A grad log pi(a), with
#     E_mu[(pi_a / mu_a) A grad log pi(a)] = sum_a pi_a A grad log pi(a) = grad J      (w uncapped).
# "Uncorrected" is today's on-policy loss applied to the stale samples: policy_loss with old_logp =
# logp.detach() and no behav_logp (every weight 1); its mean is sum_a mu_a (p_a - J) (e_a - pi), not grad J.
P = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1], dtype=torch.float64)
SEEDS, PER_SEED = 10_000, 8  # 10,000 independent seeds, each one batch of 8 samples; all in one tensor
BIG_CAP = 10.0  # above the largest pi_prox / mu of this bandit (3.21 at eta = 2; asserted), so it never binds


def true_gradient(theta: torch.Tensor) -> torch.Tensor:
    pi = theta.softmax(-1)
    return pi * (P - (pi * P).sum())


def thetas() -> list[torch.Tensor]:
    out = [torch.zeros(5, dtype=torch.float64)]
    for _ in range(2):
        out.append(out[-1] + 10.0 * true_gradient(out[-1]))
    return out


def lagged_gradients(eta: int, corrected: bool, cap: float = BIG_CAP, seed: int = 0):
    """Per-seed ascent directions [SEEDS, 5] at theta_2 from samples of pi_theta_{2-eta}, by autograd through
    policy_loss; plus the metrics. Seed s's loss is the token mean over its own 8 samples; num_tokens=8 makes
    the batch loss the sum of the seeds' losses, so d loss / d theta[s] is seed s's own gradient."""
    th = thetas()
    mu = th[2 - eta].softmax(-1)  # [5]
    g = torch.Generator().manual_seed(seed)
    arms = torch.multinomial(mu.expand(SEEDS, 5), PER_SEED, replacement=True, generator=g)  # [S, M]
    rewards = torch.bernoulli(P[arms], generator=g)  # [S, M]
    baseline = (th[2].softmax(-1) * P).sum()  # J(theta_2)
    theta = th[2].expand(SEEDS, 5).clone().requires_grad_()  # one copy per seed
    logp = theta.log_softmax(-1).gather(1, arms).reshape(-1, 1)  # [S * M, 1]
    behav = {"behav_logp": mu.log()[arms].reshape(-1, 1), "behav_cap": cap} if corrected else {}
    loss, metrics = policy_loss(logp, logp.detach(), (rewards - baseline).reshape(-1), torch.ones_like(logp),
                                0.2, 0.2, num_tokens=PER_SEED, **behav)
    loss.backward()
    return -theta.grad, metrics


def mean_se(grads: torch.Tensor):
    return grads.mean(0), grads.std(0) / math.sqrt(grads.shape[0])


@pytest.mark.parametrize("eta", [1, 2])
def test_bandit_corrected_gradient_is_unbiased_and_uncorrected_is_not(eta):
    th = thetas()
    truth = true_gradient(th[2])
    pi, mu = th[2].softmax(-1), th[2 - eta].softmax(-1)
    assert float((pi / mu).max()) < BIG_CAP  # the cap does not bind on this bandit ...
    grads, metrics = lagged_gradients(eta, corrected=True)
    assert metrics["offpolicy/truncated_frac"] == 0.0  # ... and the loss agrees
    mean, se = mean_se(grads)
    z = (mean - truth) / se
    assert z.abs().max() < 3, f"eta={eta}: corrected gradient off the truth by z = {z.tolist()}"

    plain, _ = lagged_gradients(eta, corrected=False)
    mean_u, se_u = mean_se(plain)
    z_u = (mean_u - truth) / se_u
    assert z_u.abs().max() > 5, f"eta={eta}: uncorrected gradient only z = {z_u.tolist()} from the truth"
    # and it estimates what the derivation says it does, sum_a mu_a (p_a - J) (e_a - pi):
    J = (pi * P).sum()
    biased = (mu * (P - J)).unsqueeze(1) * (torch.eye(5, dtype=torch.float64) - pi)  # [a, b]
    z_b = (mean_u - biased.sum(0)) / se_u
    assert z_b.abs().max() < 3, f"eta={eta}: uncorrected mean off its derived expectation by z = {z_b.tolist()}"


@pytest.mark.parametrize("eta", [1, 2])
def test_bandit_small_cap_trades_bias_for_variance(eta):
    # The same samples (same seed) under cap 10 (never binds) and cap 1 (w = min(pi/mu, 1): arms whose
    # probability rose since mu, the good ones here, lose their up-weighting). The trade-off: the summed
    # per-coordinate variance of a seed's gradient drops, and the mean moves off the truth (biased).
    truth = true_gradient(thetas()[2])
    full, _ = lagged_gradients(eta, corrected=True, cap=BIG_CAP)
    capped, metrics = lagged_gradients(eta, corrected=True, cap=1.0)
    assert metrics["offpolicy/truncated_frac"] > 0
    var_full, var_capped = full.var(0).sum(), capped.var(0).sum()
    assert var_capped < var_full, f"eta={eta}: variance {float(var_capped):.5f} capped vs {float(var_full):.5f}"
    mean, se = mean_se(capped)
    z = (mean - truth) / se
    assert z.abs().max() > 5, f"eta={eta}: capped gradient only z = {z.tolist()} from the truth"
