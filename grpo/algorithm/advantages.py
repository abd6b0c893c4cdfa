"""Group-relative advantages (GRPO). Pure tensor code: imports only torch."""

from __future__ import annotations

import torch

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
