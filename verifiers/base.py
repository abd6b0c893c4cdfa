"""The verifier protocol: a batch of completions in, one reward in [0, 1] per completion out.

A verifier is any object with a ``name`` and a ``score`` method:

    class MyVerifier:
        name = "mine"
        def score(self, completions: Sequence[str], samples: Sequence[Mapping]) -> list[Score]: ...

``completions[i]`` is the generated text for ``samples[i]``; a sample is the task row as a plain
mapping (``answer``, ``tests`` and whatever else the task carries). ``score`` returns one
:class:`Score` per completion, in order. Verifiers never import the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class Score:
    """One completion's reward in [0, 1] and why (free-form, JSON-serialisable)."""

    reward: float
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Verifier(Protocol):
    name: str

    def score(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[Score]: ...


class VerifierOutputError(ValueError):
    """A verifier returned something that is not a reward in [0, 1]."""


def check_scores(name: str, scores: Any, n: int) -> list[Score]:
    """Validate a verifier's output: ``n`` Scores with finite rewards in [0, 1]."""
    if not isinstance(scores, (list, tuple)) or len(scores) != n:
        got = len(scores) if isinstance(scores, (list, tuple)) else type(scores).__name__
        raise VerifierOutputError(f"verifier {name!r} returned {got} scores for {n} completions")
    out = []
    for i, s in enumerate(scores):
        if not isinstance(s, Score):
            raise VerifierOutputError(f"verifier {name!r}: item {i} is {type(s).__name__}, not Score")
        r = s.reward
        if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r) or not 0.0 <= r <= 1.0:
            raise VerifierOutputError(f"verifier {name!r}: reward {r!r} of item {i} is not in [0, 1]")
        out.append(Score(float(r), dict(s.info)))
    return out
