"""Group-relative advantages (GRPO). Pure tensor code: imports only torch."""

from __future__ import annotations

import torch

from grpo.algorithm.value import gae, ppo_rewards, whiten

SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Rewards minus their group's mean, optionally divided by a standard deviation.

    rewards: [N] with N = B * G, grouped prompt-major (rows g*G .. g*G+G-1 share a prompt).
    scale:
      "group": divide by (unbiased std of the group + eps)   -- DeepSeekMath GRPO
      "batch": divide by (unbiased std of the whole batch + eps), mean still per group
      "none":  do not divide                                   -- Dr. GRPO
    Returns [N] float32. A group of one (G = 1) has std 0 by convention (no NaN from the
    unbiased estimator), so its advantage is 0.
    """
    if scale not in SCALES:
        raise ValueError(f"adv_scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be [N] with N divisible by group_size={group_size}, got {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)  # [B, G]
    centered = r - r.mean(dim=1, keepdim=True)  # [B, G]
    if scale == "none":
        return centered.view(-1)
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])  # [B, 1]
    else:
        std = rewards.float().std() if rewards.numel() > 1 else rewards.new_zeros(())  # []
    return (centered / (std + eps)).view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out advantages (RLOO, Ahmadian et al. 2024): each completion's reward minus the mean
    of the other G - 1 completions of its prompt, with no division by a standard deviation.

        A_i = R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean_group(R))

    rewards: [N] with N = B * G, grouped prompt-major as in group_advantages. Returns [N] float32.
    A group of one (G = 1) has no other sample to compare with: its advantage is 0, never NaN.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be [N] with N divisible by group_size={group_size}, got {tuple(rewards.shape)}")
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    r = rewards.float().view(-1, group_size)  # [B, G]
    return (group_size / (group_size - 1) * (r - r.mean(dim=1, keepdim=True))).view(-1)


def reinforce_pp_advantages(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                            gamma: float = 1.0, group_size: int | None = None, eps: float = 1e-8,
                            reduce=None) -> torch.Tensor:
    """REINFORCE++ (Hu 2025) token advantages [N, T]: no critic, no group normalisation.

        r_t = -beta * kl_t, plus the score at the row's last real token     (ppo_rewards)
        G_t = sum_{s >= t} gamma^(s - t) r_s over the row's real tokens     (gae with V = 0, lambda = 1)
        A   = whiten(G) over every real token of the whole step, all ranks  (whiten)

    score: [N] sequence scores; kl, mask: [N, T] (kl of the sampling policy to the reference per
    token). group_size: subtract each prompt's mean score first (`reinforce_pp_baseline`, N = B * G
    prompt-major); None = plain REINFORCE++. reduce: as in whiten, the sum over ranks, so the
    whitening statistics are the whole step's. Masked slots (tool results) are not steps. Padding is 0.
    """
    s = score.float()  # [N]
    if group_size is not None:
        if s.numel() % group_size:
            raise ValueError(f"score must be [N] with N divisible by group_size={group_size}, got {tuple(s.shape)}")
        g = s.view(-1, group_size)  # [B, G]
        s = (g - g.mean(dim=1, keepdim=True)).view(-1)
    rewards = ppo_rewards(s, kl.float(), mask, beta)  # [N, T]
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)  # [N, T]
    return whiten(returns, mask, shift_mean=True, eps=eps, reduce=reduce)


def varied_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: [B] bool, True for the groups whose G rewards are not all
    equal (a group of equal rewards has zero advantage under grpo and rloo: no learning signal).
    rewards: [N] with N = B * G prompt-major."""
    r = rewards.view(-1, group_size)  # [B, G]
    return (r != r[:, :1]).any(dim=1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment [N], added to the reward (Yu et al. 2025, eq. 13):

        0                               if L <= L_max - L_c
        ((L_max - L_c) - L) / L_c       if L_max - L_c < L <= L_max      (from 0 down to -1)
        -1                              if L > L_max

    lengths: [N] completion lengths L; max_len = L_max (the generation budget); cache = L_c
    (0 < L_c <= L_max), the span before the budget over which the penalty grows.
    """
    if not 0 < cache <= max_len:
        raise ValueError(f"the overlong cache must be in (0, max_len={max_len}], got {cache}")
    L = lengths.float()  # [N]
    start = max_len - cache
    ramp = (start - L) / cache  # [N]
    return torch.where(L <= start, torch.zeros_like(L), torch.where(L <= max_len, ramp, torch.full_like(L, -1.0)))
