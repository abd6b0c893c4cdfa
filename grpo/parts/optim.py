"""Optimizer and learning-rate schedule from plain values, for every trainer."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from grpo.parts.config import ConfigError


def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] | list[float],
                    weight_decay: float = 0.0, name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over the parameters that train; or plain SGD (no momentum), whose step is lr times the
    gradient, which makes a wrong gradient scale visible (AdamW's normalisation hides it)."""
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if len(betas) != 2:
        raise ConfigError(f"optim.betas={list(betas)!r}: must be two numbers")
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int,
                    min_lr_rate: float = 0.1) -> torch.optim.lr_scheduler.LRScheduler:
    """One of transformers' schedules (`constant_with_warmup`, `linear`, `cosine`, `cosine_with_min_lr`, ...).

    Step s (0-based) of the loop uses the schedule's value at s + 1: transformers' warm-up starts at
    lr 0, which would spend the first optimizer step doing nothing. So with warmup_steps = W the
    first step already trains at lr / W, and step W - 1 reaches the full rate.
    """
    from transformers import SchedulerType, get_scheduler

    if name not in {t.value for t in SchedulerType}:
        raise ConfigError(f"optim.schedule={name!r}: use one of {', '.join(t.value for t in SchedulerType)}")
    extra = {"min_lr_rate": min_lr_rate} if name == "cosine_with_min_lr" else None
    sched = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(1, total_steps),
                          scheduler_specific_kwargs=extra)
    with warnings.catch_warnings():  # the one deliberate step before any optimizer step
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
        sched.step()
    return sched


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, max_grad_norm: float
                   ) -> tuple[float, float]:
    """Clip the gradients, step the optimizer and the schedule, clear the gradients.
    Returns (gradient norm before clipping, the learning rate this step used)."""
    from grpo.parts.distributed import full_tensor

    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))  # whole under fsdp2
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), lr
