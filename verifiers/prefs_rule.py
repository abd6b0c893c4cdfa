"""The ``prefs_rule`` verifier: the hidden rule behind the built-in preference data (grpo/prefs.py).

Simulated labellers rank the embedded model's answers to "What is a + b?" by this rule plus noise;
a reward model trained on their rankings never sees it, and it is used again only to measure the
true quality of what a trained policy writes. The rule, for a completion and the gold answer y:

    box    = the \\boxed{...} spans; none, an empty one, different contents, or a content that is
             not an integer n: reward 0
    d      = |n - y|                       distance of the answer from the truth
    stray  = non-whitespace characters outside the first box (a repeated box counts as stray)
    reward = 1 / (1 + d) * 0.9 ** stray

so a right, cleanly boxed answer gets 1.0, off by 1 gets 0.5, by 2 0.33, by 10 0.09, and every
stray character costs 10% of that. It grades on what the embedded model's samples at T=1 actually
vary on: about half are right and most of the rest are off by 1, 2 or 10 (its SFT near misses) or
by a few more; stray characters are rare, so concision only breaks near ties.

It never raises: a non-string completion or a sample with no integer answer gets 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from grpo.verifiers.base import Score

STRAY_FACTOR = 0.9  # reward kept per stray character
_BOX_RE = re.compile(r"\\boxed\{([^{}]*)\}")  # closed boxes only: an unclosed box holds no answer
_INT_RE = re.compile(r"[+-]?\d+")


def rule(text: Any, answer: Any) -> tuple[float, dict[str, Any]]:
    """(reward, info) of one completion against the gold answer."""
    try:
        truth = int(str(answer).strip())
    except ValueError:
        return 0.0, {"reason": "no_gold"}
    if not isinstance(text, str):
        return 0.0, {"reason": "not_text"}
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return 0.0, {"reason": "no_box"}
    contents = {m.group(1).strip() for m in boxes}
    if len(contents) > 1:  # boxing several candidates is no answer
        return 0.0, {"reason": "several_answers"}
    content = contents.pop()
    if not _INT_RE.fullmatch(content):
        return 0.0, {"reason": "not_integer"}
    first = boxes[0]
    outside = text[:first.start()] + text[first.end():]
    stray = len(re.sub(r"\s+", "", outside))
    distance = abs(int(content) - truth)
    reward = 1.0 / (1 + distance) * STRAY_FACTOR ** stray
    return reward, {"reason": "ok" if distance == 0 else "wrong", "distance": distance, "stray": stray}


class PrefsRuleVerifier:
    name = "prefs_rule"

    def score(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[Score]:
        return [Score(*rule(text, s.get("answer"))) for text, s in zip(completions, samples)]
