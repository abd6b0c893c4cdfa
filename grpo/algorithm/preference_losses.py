"""Losses for learning from preferences: reward models (pairwise, ranking, pointwise) and the policy
directly (dpo_loss). Pure tensor code: imports only torch.

All return (scalar loss, metrics) with python-float metrics, like grpo.algorithm.losses.policy_loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair_metrics(diff: torch.Tensor) -> dict[str, float]:
    """diff [M]: better minus worse score per pair. Ties count as wrong: the model did not separate them."""
    d = diff.detach()
    return {"accuracy": float((d > 0).float().mean()), "margin": float(d.mean())}


def pairwise_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry loss on P preference pairs:

        mean(-logsigmoid(chosen - rejected - margin)) + center_coef * mean((chosen + rejected)^2)

    chosen, rejected, margin: [P]. margin (None = 0) asks for a bigger gap on clearer pairs
    (Llama 2); the centring term keeps the scores near 0, since the BT loss only sees differences.
    metrics: accuracy (share of pairs with chosen > rejected), margin (mean chosen - rejected).
    """
    diff = chosen - rejected  # [P]
    target = diff if margin is None else diff - margin  # [P]
    loss = -F.logsigmoid(target).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss, _pair_metrics(diff)


def ranking_loss(scores: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """InstructGPT's K-wise ranking loss (section 3.5).

    scores: [P, K], each row ordered best first; mask: [P, K], 1 = real response, real ones first
    (a prompt may have fewer than K). For prompt p with K_p real responses the loss is the mean over
    its C(K_p, 2) pairs i < j of -logsigmoid(s_i - s_j); the batch loss is the mean over prompts, so
    every prompt weighs the same whatever its K_p (all its pairs are one batch element, which is
    what keeps a prompt's many correlated pairs from over-fitting).
    metrics: accuracy (share of all pairs with s_i > s_j), margin (mean s_i - s_j over all pairs).
    Raises ValueError when a prompt has fewer than 2 real responses.
    """
    P, K = scores.shape
    real = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()  # [P, K]
    n_real = real.sum(dim=1)  # [P]
    if bool((n_real < 2).any()):
        bad = torch.nonzero(n_real < 2).flatten().tolist()
        raise ValueError(f"ranking_loss: prompts {bad} have fewer than 2 real responses")
    upper = torch.ones(K, K, dtype=torch.bool, device=scores.device).triu(diagonal=1)  # [K, K]; i < j
    pairs = upper & real.unsqueeze(2) & real.unsqueeze(1)  # [P, K, K]; both real
    s = scores.masked_fill(~real, 0.0)  # [P, K]; padding may hold anything, even nan, which would poison the grads
    diff = s.unsqueeze(2) - s.unsqueeze(1)  # [P, K, K]; s_i - s_j
    per_pair = -F.logsigmoid(diff)  # [P, K, K]
    w = pairs.to(scores.dtype)  # [P, K, K]
    per_prompt = (per_pair * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2))  # [P]; mean over that prompt's pairs
    return per_prompt.mean(), _pair_metrics(diff[pairs])


def pointwise_loss(pred: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean squared error between predicted and given scores, pred and score: [N]. metrics: mse."""
    loss = ((pred - score) ** 2).mean()
    return loss, {"mse": float(loss.detach())}


DPO_LOSSES = ("sigmoid", "robust", "ipo")


def dpo_loss(
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    len_chosen: torch.Tensor | None = None,
    len_rejected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Direct preference optimisation on P pairs; every input is [P] (sequence log-probs: sums over
    the completion's tokens under the policy and the frozen reference; lengths in tokens).

    With u_c = logp_chosen - ref_chosen, u_r = logp_rejected - ref_rejected, d = u_c - u_r and
    eps = label_smoothing:
        sigmoid: mean(-(1 - eps) * logsigmoid(beta * d) - eps * logsigmoid(-beta * d))
                 (DPO, Rafailov et al. 2023; eps > 0 is conservative DPO)
        robust:  mean((-(1 - eps) * logsigmoid(beta * d) + eps * logsigmoid(-beta * d)) / (1 - 2 * eps))
                 (Chowdhury et al. 2024: unbiased under labels flipped with probability eps)
        ipo:     mean((d' - 1 / (2 * beta))^2), d' = u_c / len_chosen - u_r / len_rejected when the
                 lengths are given (per-token log-ratios), else d (Azar et al. 2023)
    metrics: rewards/chosen = mean(beta * u_c), rewards/rejected = mean(beta * u_r),
    rewards/margins = mean(beta * d), rewards/accuracies = mean(u_c > u_r); all 0 when the policy
    is the reference.
    """
    if loss not in DPO_LOSSES:
        raise ValueError(f"dpo loss must be one of {DPO_LOSSES}, got {loss!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    u_c = logp_chosen - ref_chosen.detach()  # [P]
    u_r = logp_rejected - ref_rejected.detach()  # [P]
    d = u_c - u_r  # [P]
    eps = label_smoothing
    if loss == "sigmoid":
        per_pair = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)  # [P]
    elif loss == "robust":
        per_pair = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)  # [P]
    else:
        if (len_chosen is None) != (len_rejected is None):
            raise ValueError("ipo: give both len_chosen and len_rejected, or neither")
        dd = d if len_chosen is None else u_c / len_chosen.clamp(min=1) - u_r / len_rejected.clamp(min=1)  # [P]
        per_pair = (dd - 1.0 / (2.0 * beta)) ** 2  # [P]
    with torch.no_grad():
        metrics = {
            "rewards/chosen": float((beta * u_c).mean()),
            "rewards/rejected": float((beta * u_r).mean()),
            "rewards/margins": float((beta * d).mean()),
            "rewards/accuracies": float((u_c > u_r).float().mean()),
        }
    return per_pair.mean(), metrics
