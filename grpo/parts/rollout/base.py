"""The rollout-engine interface: prompts in, G sampled completions each out.

An engine is any object with:
    generate(prompt_ids, n, sampling) -> Rollout
    update_weights(named_params) -> None     push the trainer's weights (no-op when shared)
    close() -> None

It is small on purpose so that a remote engine (an OpenAI-compatible server plus a
weight-update channel) can stand behind it without touching the trainer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class SamplingParams:
    """Maps one-to-one onto both engines' sampling options."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # None: draw from the process RNG (reproducible through trainer.seed)


@dataclass
class Rollout:
    """N = len(prompts) * n completions, prompt-major: rows i*n .. i*n+n-1 answer prompt i.

    completion_ids[j]: generated token ids, ending with EOS when the model stopped by itself.
    logprobs[j][t]: log-prob of completion_ids[j][t] under the sampling distribution at
        temperature (logits / temperature, before top-p/top-k truncation); the trainer computes the
        same quantity, so the two can be compared token for token.
    """

    prompt_ids: list[list[int]]  # [N] (each prompt repeated n times)
    completion_ids: list[list[int]]  # [N] ragged
    texts: list[str]  # [N] decoded completions, special tokens skipped
    logprobs: list[list[float]]  # [N] ragged, same lengths as completion_ids
    finished: list[bool]  # [N] stopped by EOS or a stop string (not by max_new_tokens)
    # Multi-turn rollouts (grpo/parts/rollout/multiturn.py) only; None for one prompt, one completion:
    model_mask: list[list[int]] | None = None  # [N] ragged like completion_ids: 1 where the model sampled the token
    conversations: list[dict] | None = None  # [N] messages, turns, tool calls, the reason it ended


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> Rollout: ...

    def update_weights(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def close(self) -> None: ...
