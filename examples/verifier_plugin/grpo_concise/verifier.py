"""`concise`: reward 1 for a completion within a character budget, falling linearly to 0 at twice it.

    task.verifiers=[{name: math, weight: 1.0}, {name: concise, weight: 0.2, max_chars: 400}]

A row may carry its own budget in a `max_chars` field; otherwise the constructor's is used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from grpo.verifiers.base import Score


class ConciseVerifier:
    name = "concise"

    def __init__(self, max_chars: int = 200):
        if int(max_chars) < 1:
            raise ValueError(f"max_chars={max_chars}: must be at least 1")
        self.max_chars = int(max_chars)

    def score(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[Score]:
        out = []
        for text, sample in zip(completions, samples):
            budget = int(sample.get("max_chars") or self.max_chars)
            chars = len(text.strip())
            over = max(0, chars - budget)
            reward = max(0.0, 1.0 - over / budget)  # 1 within budget, 0 at twice the budget
            out.append(Score(reward, {"chars": chars, "budget": budget}))
        return out
