"""The ``prefs_rule`` verifier: the hidden rule behind the built-in preference data (grpo/commands/prefs.py).

Simulated labellers rank the answers of the preference task's policy (the embedded chat model,
`embedded-chat`, which answers "What is a + b?" in several styles) by this rule plus noise; a reward
model trained on their rankings never sees it, and it is used again only to measure the true
quality of what a trained policy writes. The labellers want a properly boxed answer, as short as
possible, and right. For a completion and the gold answer y:

    box     = the \\boxed{...} spans; none, an empty one, different contents, or a content that is
              not an integer n: reward 0 (not properly boxed)
    stray   = non-whitespace characters outside the first box (a repeated box counts as stray)
    concise = max(0, 1 - stray / 16)        every extra character costs 1/16, 16 or more cost all
    close   = 1 / (1 + |n - y|)             1 when right, 1/2 off by one, 1/11 off by ten
    reward  = 0.9 * concise + 0.1 * close

So `\\boxed{85}` for 37 + 48 scores 1.0; `Sure! \\boxed{85}` 0.9 * 11/16 + 0.1 = 0.72; a terse answer
off by one 0.95; an unboxed "85" 0. Concision dominates, correctness orders answers of the same
length. Why not mostly correctness: a reward model built on the 0.9M-parameter embedded model does
not learn to check a sum from a few thousand rankings (measured: held-out accuracy on right-vs-wrong
pairs stayed at 0.52 after 375 steps of clean labels), while format and length it learns in
minutes; the rule rewards what such a reward model can see, as a real preference task should.

It never raises: a non-string completion or a sample with no integer answer gets 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from grpo.verifiers.base import Score

STRAY_BUDGET = 16  # stray characters that cost the whole concision part
W_CONCISE, W_CLOSE = 0.9, 0.1
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
    concise = max(0.0, 1.0 - stray / STRAY_BUDGET)
    reward = W_CONCISE * concise + W_CLOSE / (1 + distance)
    return reward, {"reason": "ok" if distance == 0 else "wrong", "distance": distance, "stray": stray}


class PrefsRuleVerifier:
    name = "prefs_rule"
    passes = False  # a score: 1.0 is the best answer, not a pass; no pass@k is reported for it
    required_fields = ("answer",)

    def score(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[Score]:
        return [Score(*rule(text, s.get("answer"))) for text, s in zip(completions, samples)]
