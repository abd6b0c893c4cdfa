"""Weighted rewards from several verifiers, with each verifier's failures kept to its samples.

reward_i = clip(sum_k weight_k * reward_k_i, 0, 1)

A verifier that raises on a batch is retried one sample at a time, so only the samples that make
it raise get 0; every such sample is counted in `verifier/<name>/errors`. The first error of each
kind is logged once with its traceback.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from verifiers.base import Score, check_scores
from verifiers.registry import build_verifier

log = logging.getLogger(__name__)
_seen_errors: set[tuple[str, str]] = set()


def _log_once(name: str, exc: BaseException) -> None:
    key = (name, type(exc).__name__)
    if key not in _seen_errors:
        _seen_errors.add(key)
        log.warning("verifier %r raised %s (first of its kind; the sample gets reward 0):\n%s", name,
                    type(exc).__name__, "".join(traceback.format_exception(exc)))


def score_isolated(verifier: Any, completions: Sequence[str], samples: Sequence[Mapping]) -> tuple[list[Score], int]:
    """Score a batch; returns (scores, number of samples that errored)."""
    name = getattr(verifier, "name", type(verifier).__name__)
    try:
        return check_scores(name, verifier.score(list(completions), list(samples)), len(completions)), 0
    except Exception as e:  # noqa: BLE001 - a verifier must never end the run
        _log_once(name, e)
    out, errors = [], 0
    for c, s in zip(completions, samples):
        try:
            out.append(check_scores(name, verifier.score([c], [s]), 1)[0])
        except Exception as e:  # noqa: BLE001
            _log_once(name, e)
            errors += 1
            out.append(Score(0.0, {"error": f"{type(e).__name__}: {e}"}))
    return out, errors


class RewardFunction:
    def __init__(self, specs: Sequence[str | Mapping[str, Any]], fail_fast: bool = False, timeout: float | None = None):
        self.fail_fast, self.timeout = fail_fast, timeout  # TODO(issue 6): enforce both
        if not specs:
            raise ValueError("a task needs at least one verifier (task.verifiers)")
        self.entries = []
        for spec in specs:
            weight = float(spec.get("weight", 1.0)) if isinstance(spec, Mapping) else 1.0
            v = build_verifier(spec)
            name = getattr(v, "name", type(v).__name__)
            self.entries.append((name, weight, v))

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping]) -> tuple[list[float], list[dict], dict[str, float]]:
        """Returns (rewards [N], infos [N], metrics)."""
        n = len(completions)
        total = [0.0] * n
        infos: list[dict] = [{} for _ in range(n)]
        metrics: dict[str, float] = {}
        for name, weight, v in self.entries:
            scores, errors = score_isolated(v, completions, samples)
            for i, s in enumerate(scores):
                total[i] += weight * s.reward
                infos[i][name] = s.info
            metrics[f"reward/{name}/mean"] = sum(s.reward for s in scores) / max(1, n)
            metrics[f"verifier/{name}/errors"] = float(errors)
        return [min(1.0, max(0.0, r)) for r in total], infos, metrics

    def close(self) -> None:
        for _, _, v in self.entries:
            close = getattr(v, "close", None)
            if callable(close):
                close()
