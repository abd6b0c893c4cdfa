"""PPO's estimators: reward shaping with a KL penalty, GAE, whitening, the clipped value loss, and
the adaptive KL controller. Pure tensor code: imports only torch.

Shapes: N rows (completions), T completion tokens; `mask` [N, T] is 1 on real completion tokens
(the EOS included) and 0 on padding.
"""

from __future__ import annotations

import torch

from grpo.algorithm.losses import aggregate


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """[N]: the column of each row's last real token (-1 for a row with none)."""
    T = mask.shape[1]
    has = mask.sum(dim=1) > 0  # [N]
    last = T - 1 - mask.flip(dims=[1]).to(torch.long).argmax(dim=1)  # [N]
    return torch.where(has, last, torch.full_like(last, -1))


def ppo_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards [N, T]: r_t = -beta * kl_t on real tokens, plus `score` [N] at each row's last
    real token (never on a padding slot; a row with no real token gets nothing). kl: [N, T]."""
    m = mask.to(kl.dtype)  # [N, T]
    rewards = -beta * kl * m  # [N, T]
    last = last_index(mask)  # [N]
    rows = torch.nonzero(last >= 0).squeeze(1)  # rows that have a last token
    rewards[rows, last[rows]] += score[rows].to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens (Schulman et al., 2016).

        delta_t = r_t + gamma * V_{t+1} - V_t,   V = 0 after a row's last real token
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V   (before any whitening of A)

    rewards, values, mask: [N, T]. Returns (advantages [N, T], returns [N, T]), 0 on padding.
    Masked slots are not steps: t+1 is the next real token, so a mask with holes (a multi-turn
    rollout's tool results, which the model did not choose) gives the GAE of its real tokens alone,
    and a mask that is a prefix of ones is plain GAE. A reverse scan over T, vectorised over the N rows.
    """
    m = mask.to(values.dtype)  # [N, T]
    v = values * m  # [N, T] padding values never leak in
    N, T = v.shape
    adv = torch.zeros_like(v)  # [N, T]
    next_v = torch.zeros(N, dtype=v.dtype, device=v.device)  # [N] V_{t+1}
    next_a = torch.zeros(N, dtype=v.dtype, device=v.device)  # [N] A_{t+1}
    for t in range(T - 1, -1, -1):
        delta = rewards[:, t] * m[:, t] + gamma * next_v - v[:, t]  # [N]
        a = (delta + gamma * lam * next_a) * m[:, t]  # [N]
        adv[:, t] = a
        real = m[:, t] > 0  # [N]; a masked slot passes the next real token's V and A through (0 after the last)
        next_v, next_a = torch.where(real, v[:, t], next_v), torch.where(real, a, next_a)
    return adv, (adv + v) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the real tokens of the whole batch (unbiased variance);
    with shift_mean=False the mean is added back (only the scale changes). x, mask: [N, T];
    padding comes out 0. `reduce` sums a list of floats over the ranks that hold the rest of the
    batch (grpo.parts.distributed.Parallel.sum): the mean and variance are then the whole batch's."""
    m = mask.to(x.dtype)  # [N, T]
    n, total = m.sum(), (x * m).sum()
    if reduce is not None:
        n, total = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in reduce([float(n), float(total)]))
    mean = total / n.clamp(min=1)
    sq = (((x - mean) ** 2) * m).sum()
    if reduce is not None:
        sq = torch.tensor(reduce([float(sq)])[0], dtype=x.dtype, device=x.device)
    var = sq / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)  # [N, T]
    if not shift_mean:
        out = out + mean
    return out * m


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2, agg: str = "token_mean", num_tokens=None, num_rows=None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss, per token:

        0.5 * max((V - R)^2, (V_old + clamp(V - V_old, -clip, clip) - R)^2)

    aggregated like the policy loss (`aggregate`, with the step's global normaliser when given).
    values, old_values, returns, mask: [N, T]. metrics: val/clipfrac (share of real tokens where the
    clipped term is the larger), val/mean (mean V over real tokens)."""
    old = old_values.detach()
    clipped = old + (values - old).clamp(-clip, clip)  # [N, T]
    unclipped_sq = (values - returns) ** 2  # [N, T]
    clipped_sq = (clipped - returns) ** 2  # [N, T]
    loss = 0.5 * aggregate(torch.max(unclipped_sq, clipped_sq), mask, agg, None, num_tokens, num_rows)
    with torch.no_grad():
        m = mask.to(values.dtype)
        n = m.sum().clamp(min=1)
        metrics = {"val/clipfrac": float(((clipped_sq > unclipped_sq).to(values.dtype) * m).sum() / n),
                   "val/mean": float((values * m).sum() / n)}
    return loss, metrics


class AdaptiveKL:
    """The KL coefficient of Ziegler et al. (2019): after each batch,

        beta *= 1 + clamp(kl / target - 1, -0.2, 0.2) * n / horizon

    where `kl` is the batch's mean per-SEQUENCE KL (the sum over a completion's tokens, nats) and n
    the number of sequences in the batch. target=None keeps beta fixed. `.value` is the current beta.
    """

    def __init__(self, init: float, target: float | None = None, horizon: float = 10000.0):
        if target is not None and not target > 0:
            raise ValueError(f"AdaptiveKL: target must be > 0 (or None for a fixed beta), got {target}")
        if not horizon > 0:
            raise ValueError(f"AdaptiveKL: horizon must be > 0, got {horizon}")
        self.value, self.target, self.horizon = float(init), target, float(horizon)

    def update(self, kl: float, n: int) -> float:
        if self.target is not None:
            err = min(0.2, max(-0.2, kl / self.target - 1.0))
            self.value *= 1.0 + err * n / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
