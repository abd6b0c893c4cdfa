"""The verifier protocol: a batch of completions in, one reward in [0, 1] per completion out.

A verifier is any object with a ``name`` and one of two methods over a batch:

    class MyVerifier:
        name = "mine"
        def score(self, completions: Sequence[str], samples: Sequence[Mapping]) -> list[Score]: ...

    class MyServiceVerifier:             # for verifiers that wait on a service (HTTP, a judge model)
        name = "judge"
        async def ascore(self, completions, samples) -> list[Score]: ...

``completions[i]`` is the generated text for ``samples[i]``; a sample is the task row as a plain
mapping (``answer``, ``tests`` and whatever else the task carries). The method returns one result
per completion, in order: a :class:`Score` (reward and a JSON-serialisable ``info`` dict saying
why), or a bare number when there is nothing to say. Rewards must be finite and in [0, 1];
anything else is rejected for that sample, with an error naming the verifier.

When an object has both methods, ``ascore`` is used. An optional ``close()`` is called once at the
end of the run. An optional ``required_fields`` (a tuple of sample field names, e.g. ``("answer",)``)
lets `grpo verify` reject a row that lacks one, naming its line, before anything is scored. Verifiers never import the trainer; subclassing anything here is not required.
"""

from __future__ import annotations

import inspect
import math
import numbers
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


@runtime_checkable
class AsyncVerifier(Protocol):
    name: str

    async def ascore(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[Score]: ...


def is_async(verifier: Any) -> bool:
    """True when the verifier is scored through ``async def ascore``."""
    return inspect.iscoroutinefunction(getattr(verifier, "ascore", None))


def has_score_method(verifier: Any) -> bool:
    return is_async(verifier) or callable(getattr(verifier, "score", None))


class VerifierOutputError(ValueError):
    """A verifier returned something that is not a reward in [0, 1]."""


def check_batch(name: str, scores: Any, n: int) -> list[Any]:
    """The batch-level shape check: a list or tuple of exactly ``n`` results."""
    if not isinstance(scores, (list, tuple)):
        raise VerifierOutputError(
            f"verifier {name!r} returned {type(scores).__name__}; score() must return a list of {n} Score")
    if len(scores) != n:
        raise VerifierOutputError(f"verifier {name!r} returned {len(scores)} scores for {n} completions")
    return list(scores)


def check_score(name: str, s: Any, i: int) -> Score:
    """One result as a clean Score, or VerifierOutputError naming the verifier and the item."""
    info: Any = {}
    if isinstance(s, Score):
        r, info = s.reward, s.info
    else:
        r = s
    if type(r).__module__ == "numpy" and hasattr(r, "item"):  # numpy scalars, np.bool_ included
        r = r.item()
    if isinstance(r, bool):  # Score(x == y) is a natural way to write a 0/1 reward
        r = float(r)
    if not isinstance(r, numbers.Real):
        raise VerifierOutputError(
            f"verifier {name!r}: item {i} is {type(s).__name__}; return a Score(reward, info) or a number in [0, 1]")
    r = float(r)
    if math.isnan(r) or not 0.0 <= r <= 1.0:
        raise VerifierOutputError(f"verifier {name!r}: reward {r!r} of item {i} is not in [0, 1]")
    if not isinstance(info, Mapping):
        raise VerifierOutputError(f"verifier {name!r}: info of item {i} is {type(info).__name__}, not a dict")
    return Score(r, dict(info))


def check_scores(name: str, scores: Any, n: int) -> list[Score]:
    """Validate a verifier's whole output: ``n`` results, each a finite reward in [0, 1]."""
    return [check_score(name, s, i) for i, s in enumerate(check_batch(name, scores, n))]
