"""The policy losses (PPO's clipped surrogate at token or sequence level, GSPO, CISPO), their token
aggregation, and the engine/trainer mismatch masks. Pure tensor code: imports only torch."""

from __future__ import annotations

import math

import torch

from grpo.algorithm.kl import kl_penalty

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
IS_LEVELS = ("token", "sequence", "sequence_token")
OBJECTIVES = ("ppo", "cispo")
MISMATCH_LEVELS = ("token", "sequence", "geometric")


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str, max_len: int | None = None,
              num_tokens: float | torch.Tensor | None = None, num_rows: int | None = None) -> torch.Tensor:
    """Reduce per-token values [N, T] under mask [N, T] (1 = completion token) to a scalar.

    token_mean:              sum over all tokens / number of tokens (DAPO)
    seq_mean_token_mean:     mean over rows of (row sum / row length) (DeepSeekMath GRPO)
    seq_mean_token_sum:      mean over rows of row sums
    seq_mean_token_sum_norm: sum over all tokens / (rows * max_len) (Dr. GRPO; max_len
                             defaults to T, pass the generation budget to keep it fixed)
    The normaliser is global: when these N rows are one micro-batch of a larger optimizer step,
    pass that step's total real-token count (`num_tokens`, token_mean) and row count (`num_rows`,
    the seq_mean modes); the micro-batch losses then add up to the loss of the whole step, with
    no reweighting. Left as None they are this batch's own. Rows with no tokens count as empty
    rows (0) and never divide by zero.
    """
    m = mask.to(values.dtype)  # [N, T]
    masked = values * m  # [N, T]
    rows = values.shape[0] if num_rows is None else num_rows
    if agg == "token_mean":
        denom = m.sum().clamp(min=1.0) if num_tokens is None else num_tokens
        return masked.sum() / denom
    if agg == "seq_mean_token_mean":
        return (masked.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).sum() / rows
    if agg == "seq_mean_token_sum":
        return masked.sum(dim=1).sum() / rows
    if agg == "seq_mean_token_sum_norm":
        return masked.sum() / (rows * (max_len if max_len is not None else values.shape[1]))
    raise ValueError(f"loss_agg must be one of {AGGREGATIONS}, got {agg!r}")


def sequence_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence importance ratio [N]: s_i = exp(mean over row i's real tokens of (logp - old_logp)),
    the geometric mean of the token ratios (1 for a row with no real token). logp, old_logp, mask: [N, T].
    Padding never enters, whatever its values."""
    real = mask.bool()  # [N, T]
    diff = torch.where(real, logp - old_logp, torch.zeros_like(logp))  # [N, T]
    return torch.exp(diff.sum(dim=1) / real.sum(dim=1).clamp(min=1))  # [N]


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    agg: str = "token_mean",
    max_len: int | None = None,
    kl_estimator: str = "k3",
    is_weights: torch.Tensor | None = None,
    num_tokens: float | torch.Tensor | None = None,
    num_rows: int | None = None,
    is_level: str = "token",
    objective: str = "ppo",
    behav_logp: torch.Tensor | None = None,
    behav_cap: float = math.inf,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss per token, plus an optional KL term to a reference, aggregated by `aggregate`:

        ppo:   -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A) + beta * KL
        cispo: -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * logp + beta * KL   (MiniMax-M1, 2025)

    The ratio r by `is_level`:
        token:          r_t = exp(logp_t - old_logp_t)                                  (PPO, GRPO)
        sequence:       r_t = s_i = exp(mean_t(logp - old_logp)) for every token of row i (GSPO,
                        Zheng et al. 2025: one ratio, clipped once, per sequence)
        sequence_token: r_t = sg(s_i) * exp(logp_t - sg(logp_t)) (GSPO-token: the value of s_i, the
                        gradient of one token; equals `sequence` when A is constant over a row)
    GSPO clips with a range of its own, orders of magnitude smaller (3e-4 / 4e-4 in the paper):
    pass it as clip_low / clip_high.

    logp, old_logp, ref_logp, mask: [N, T]; advantages: [N] (broadcast over tokens, GRPO) or [N, T]
    (per token, PPO's GAE, REINFORCE++).
    old_logp is detached (it is the sampling policy); with one update per batch pass
    logp.detach() so ratio = 1 and the gradient is the plain policy gradient.
    is_weights: optional [N, T] per-token weights on the policy term (not on the KL), e.g.
    truncated importance sampling min(exp(old_logp - engine_logp), C) when the rollout engine's
    sampling distribution differs slightly from the trainer's, or mismatch_mask's 0/1.
    num_tokens, num_rows: the global normaliser of `aggregate` (the whole optimizer step).

    Off-policy samples, the decoupled objective (Hilton et al. 2021, "Batch size-invariance for policy
    optimization"; AReaL, Fu et al. 2025): behav_logp [N, T] = log mu_t, the probability with which the
    behaviour policy (the engine, possibly eta versions old) sampled token t. old_logp is then the
    proximal policy pi_prox (the policy at the start of this step), and each token's policy term is
    multiplied by the truncated behaviour weight, detached:

        loss_t = -w_t * min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t)     (ppo; cispo alike)
        r_t = exp(logp_t - prox_logp_t),   w_t = sg(min(exp(prox_logp_t - behav_logp_t), behav_cap))

    The clip keeps the update near pi_prox; w corrects the sampling distribution from mu to pi_prox,
    so the gradient at logp = prox_logp is E_mu[w A grad log pi] = E_pi_prox[A grad log pi], unbiased
    while the cap does not bind (tests/algorithm/test_offpolicy.py shows it on a bandit). A smaller
    behav_cap (>= 1) trades that bias for lower variance; math.inf truncates nothing. w is per token
    whatever is_level; it multiplies is_weights (and is not on the KL). With behav_logp equal to
    old_logp every w is exactly 1 and the loss is the one without behav_logp, bit for bit; with
    behav_logp None nothing changes. Padding takes w = 1 whatever behav_logp holds there.

    Padding (mask 0) gets exactly zero loss and zero gradient, whatever logp holds there.
    Returns (scalar loss, metrics) where metrics hold the clip fractions (share of tokens
    whose ratio was clipped below / above and where clipping changed the objective; for cispo,
    where the weight was clipped), the mean KL (over tokens, 0 without ref_logp) and the mean ratio;
    with behav_logp also offpolicy/weight_mean (mean w over real tokens, after the cap) and
    offpolicy/truncated_frac (share of real tokens whose weight the cap cut).
    """
    if is_level not in IS_LEVELS:
        raise ValueError(f"is_level must be one of {IS_LEVELS}, got {is_level!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if behav_logp is not None and not behav_cap >= 1.0:
        raise ValueError(f"behav_cap must be >= 1 (1 = never up-weight, math.inf = no cap), got {behav_cap!r}")
    m = mask.to(logp.dtype)  # [N, T]
    real = mask.bool()  # [N, T]
    n_tok = m.sum().clamp(min=1.0)
    adv = advantages.to(logp.dtype)
    adv = adv if adv.dim() == 2 else adv.unsqueeze(1)  # [N, T] per token (PPO), or [N, 1] per row (GRPO)
    old = old_logp.detach()
    log_ratio = torch.where(real, logp - old, torch.zeros_like(logp))  # [N, T]; padding: ratio 1, no gradient
    if is_level == "token":
        ratio = torch.exp(log_ratio)  # [N, T]
    else:
        seq = sequence_ratio(logp, old, mask).unsqueeze(1)  # [N, 1]
        if is_level == "sequence":
            ratio = seq.expand_as(logp)  # [N, T]
        else:
            own = torch.where(real, logp, torch.zeros_like(logp))  # [N, T]
            ratio = seq.detach() * torch.exp(own - own.detach())  # [N, T], value s_i
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [N, T]
    if objective == "ppo":
        per_token = -torch.min(ratio * adv, clipped * adv)  # [N, T]
    else:
        per_token = -clipped.detach() * adv * torch.where(real, logp, torch.zeros_like(logp))  # [N, T]
    if behav_logp is not None:
        with torch.no_grad():  # pi_prox / mu per token; padding: log-weight 0, weight 1
            raw = torch.exp(torch.where(real, old - behav_logp.detach(), torch.zeros_like(old)))  # [N, T]
            behav_w = raw.clamp(max=behav_cap)  # [N, T]
        per_token = per_token * behav_w
    if is_weights is not None:
        per_token = per_token * is_weights.detach()

    kl_mean = 0.0
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp.detach(), kl_estimator)  # [N, T]
        kl = torch.where(real, kl, torch.zeros_like(kl))
        kl_mean = float(((kl * m).sum() / n_tok).detach())
        if beta != 0.0:
            per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, agg, max_len, num_tokens, num_rows)

    with torch.no_grad():
        if objective == "ppo":  # clipping bites where the clipped branch is the smaller one
            low = ((ratio < 1.0 - clip_low) & (adv < 0)).to(logp.dtype)
            high = ((ratio > 1.0 + clip_high) & (adv > 0)).to(logp.dtype)
        else:  # CISPO clips the weight whatever the sign of A
            low = (ratio < 1.0 - clip_low).to(logp.dtype)
            high = (ratio > 1.0 + clip_high).to(logp.dtype)
        metrics = {
            "clip/low_frac": float((low * m).sum() / n_tok),
            "clip/high_frac": float((high * m).sum() / n_tok),
            "clip/frac": float(((low + high) * m).sum() / n_tok),
            "kl": kl_mean,
            "ratio/mean": float((ratio * m).sum() / n_tok),
        }
        if behav_logp is not None:
            metrics["offpolicy/weight_mean"] = float((behav_w * m).sum() / n_tok)
            metrics["offpolicy/truncated_frac"] = float(((raw > behav_cap).to(logp.dtype) * m).sum() / n_tok)
    return loss, metrics


def mismatch_mask(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, level: str,
                  low: float, high: float) -> torch.Tensor:
    """Which tokens keep their loss when the rollout engine's sampling distribution and the trainer's
    disagree: [N, T] of 0/1 (0 on padding). With rho = p_trainer / p_engine of the sampled tokens:

        token:     keep token t if low <= rho_t <= high                              (token masking)
        sequence:  keep row i if low <= prod_t rho_t <= high (all its tokens or none) (sequence masking)
        geometric: keep row i if low <= exp(mean_t log rho_t) <= high                 (geometric-mean masking)

    trainer_logp, engine_logp, mask: [N, T]. Rejection rather than truncated reweighting (tis_cap):
    a masked token gets no gradient but still counts in the loss normaliser. The masked fraction is
    1 - result.sum() / mask.sum().
    """
    if level not in MISMATCH_LEVELS:
        raise ValueError(f"mismatch level must be one of {MISMATCH_LEVELS}, got {level!r}")
    real = mask.bool()  # [N, T]
    log_rho = torch.where(real, trainer_logp - engine_logp, torch.zeros_like(trainer_logp)).detach()  # [N, T]
    lo, hi = math.log(low) if low > 0 else -math.inf, math.log(high)
    if level == "token":
        keep = (log_rho >= lo) & (log_rho <= hi)  # [N, T]
    else:
        total = log_rho.sum(dim=1)  # [N]
        if level == "geometric":
            total = total / real.sum(dim=1).clamp(min=1)
        keep = ((total >= lo) & (total <= hi)).unsqueeze(1).expand_as(real)  # [N, T]
    return (keep & real).to(trainer_logp.dtype)
