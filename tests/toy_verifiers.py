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


class DigitFractionEvenOnly:
    """DigitFraction for samples whose first operand is even; 0 for odd ones, so about half of the
    groups have equal rewards (what dynamic sampling drops)."""

    name = "digit_fraction_even"

    def score(self, completions, samples):
        return [Score(0.0 if s["a"] % 2 else (sum(ch.isdigit() for ch in c) / len(c) if c else 0.0))
                for c, s in zip(completions, samples)]


class DigitFractionEvenOnlyKilled(DigitFractionEvenOnly):
    """DigitFractionEvenOnly that SIGKILLs its own process on its GRPO_TEST_KILL_AT-th call (counting
    evaluations too): a run killed at a chosen point of a step, as a preempted machine would be."""

    def __init__(self):
        import os

        self.calls, self.kill_at = 0, int(os.environ.get("GRPO_TEST_KILL_AT", "0"))

    def score(self, completions, samples):
        import os
        import signal

        self.calls += 1
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().score(completions, samples)
