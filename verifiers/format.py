"""The ``format`` verifier: a small, separately weighted reward for answer *form*, not correctness.

    {name: format, weight: 0.1, think: true}

Checks (each on by a constructor flag; the reward is the fraction of enabled checks passed, so a
weight of 0.1 gives at most 0.1 for form and can never outweigh a correct answer):

- ``boxed``: after the thinking, exactly one distinct non-empty ``\\boxed{...}`` (the same answer
  restated in a second box is fine; two different boxes or an empty one are not).
- ``think``: the thinking block is closed: one ``</think>``, at most one ``<think>`` before it
  (chat templates often put the opening tag in the prompt), and some text after it.

It never raises: a non-string completion fails every check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from grpo.verifiers.base import Score
from grpo.verifiers.math_extract import boxed_answer, strip_thinking


class FormatVerifier:
    name = "format"

    def __init__(self, boxed: bool = True, think: bool = False):
        if not (boxed or think):
            raise ValueError("FormatVerifier needs at least one check (boxed=True or think=True)")
        self.boxed = bool(boxed)
        self.think = bool(think)

    def _checks(self, text: Any) -> dict[str, bool]:
        checks: dict[str, bool] = {}
        ok_text = isinstance(text, str)
        if self.think:
            closed = ok_text and text.count("</think>") == 1
            if closed:
                head, _, tail = text.partition("</think>")
                closed = head.count("<think>") <= 1 and "<think>" not in tail and bool(tail.strip())
            checks["think_closed"] = bool(closed)
        if self.boxed:
            got = boxed_answer(strip_thinking(text)) if ok_text else None
            checks["one_boxed_answer"] = got is not None and len(got.parts) == 1
        return checks

    def score(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[Score]:
        out = []
        for text in completions:
            checks = self._checks(text)
            failed = [k for k, ok in checks.items() if not ok]
            info: dict[str, Any] = dict(checks)
            info["reason"] = "ok" if not failed else failed[0]
            out.append(Score(sum(checks.values()) / len(checks), info))
        return out
