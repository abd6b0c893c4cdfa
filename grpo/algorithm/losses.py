"""The clipped GRPO policy loss and its token aggregation. Pure tensor code: imports only torch."""

from __future__ import annotations

import torch

from grpo.algorithm.kl import kl_penalty

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


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
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate with an optional KL term to a reference, per token:

        -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + beta * KL

    logp, old_logp, ref_logp, mask: [N, T]; advantages: [N] (broadcast over tokens, GRPO) or [N, T]
    (per token, PPO's GAE).
    old_logp is detached (it is the sampling policy); with one update per batch pass
    logp.detach() so ratio = 1 and the gradient is the plain policy gradient.
    is_weights: optional [N, T] per-token weights on the clipped term (not on the KL), e.g.
    truncated importance sampling min(exp(old_logp - engine_logp), C) when the rollout engine's
    sampling distribution differs slightly from the trainer's.
    num_tokens, num_rows: the global normaliser of `aggregate` (the whole optimizer step).
    Returns (scalar loss, metrics) where metrics hold the clip fractions (share of tokens
    whose ratio was clipped below / above and where clipping changed the objective), the
    mean KL (over tokens, 0 without ref_logp) and the mean ratio.
    """
    m = mask.to(logp.dtype)  # [N, T]
    n_tok = m.sum().clamp(min=1.0)
    adv = advantages.to(logp.dtype)
    adv = adv if adv.dim() == 2 else adv.unsqueeze(1)  # [N, T] per token (PPO), or [N, 1] per row (GRPO)
    ratio = torch.exp(logp - old_logp.detach())  # [N, T]
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [N, T]
    per_token = -torch.min(ratio * adv, clipped * adv)  # [N, T]
    if is_weights is not None:
        per_token = per_token * is_weights.detach()

    kl_mean = 0.0
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp.detach(), kl_estimator)  # [N, T]
        kl_mean = float(((kl * m).sum() / n_tok).detach())
        if beta != 0.0:
            per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, agg, max_len, num_tokens, num_rows)

    with torch.no_grad():
        # Clipping bites where the clipped branch is the smaller one: low side for A < 0, high for A > 0.
        low = ((ratio < 1.0 - clip_low) & (adv < 0)).to(logp.dtype)
        high = ((ratio > 1.0 + clip_high) & (adv > 0)).to(logp.dtype)
        metrics = {
            "clip/low_frac": float((low * m).sum() / n_tok),
            "clip/high_frac": float((high * m).sum() / n_tok),
            "clip/frac": float(((low + high) * m).sum() / n_tok),
            "kl": kl_mean,
            "ratio/mean": float((ratio * m).sum() / n_tok),
        }
    return loss, metrics
