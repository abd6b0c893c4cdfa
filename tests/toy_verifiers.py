"""Small verifiers for tests of the trainer's plumbing (not of the math verifier)."""

from __future__ import annotations

import re

from grpo.verifiers.base import Score


class BoxedExact:
    """Reward 1 when the last \\boxed{...} equals the answer string exactly."""

    name = "boxed_exact"

    def score(self, completions, samples):
        out = []
        for c, s in zip(completions, samples):
            m = re.findall(r"\\boxed\{([^{}]*)\}", c)
            out.append(Score(float(bool(m) and m[-1].strip() == str(s["answer"])), {"extracted": m[-1] if m else None}))
        return out


class RaisesOnOdd:
    """Raises for samples whose first operand is odd; reward 1 otherwise."""

    name = "raises_on_odd"

    def score(self, completions, samples):
        if any(s["a"] % 2 for s in samples):
            raise RuntimeError("odd operand")
        return [Score(1.0) for _ in completions]


class DigitFraction:
    """Reward = share of characters that are digits: varies even for a random model's samples."""

    name = "digit_fraction"

    def score(self, completions, samples):
        return [Score(sum(ch.isdigit() for ch in c) / len(c) if c else 0.0) for c in completions]
