"""Seeds: every random stream a run draws from (Python, NumPy, torch), one per rank under torchrun."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Rank r's seed: `seed` itself on rank 0 (one process runs as before), a stream of its own on
    the others; `step` starts a fresh stream for a resumed rank that has no saved one."""
    return seed + 1_000_003 * rank + step
