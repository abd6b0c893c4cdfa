"""Procedural arithmetic: "What is 37 + 48?" -> 85. Seeded, infinite, with a held-out split.

Every (a, op, b) problem belongs to the training or the held-out split by a hash of the problem
itself, so no held-out problem is ever trained on, whatever the seed.
"""

from __future__ import annotations

import random
import zlib

from grpo.tasks.base import Sample, TaskError, distinct_draws

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def is_held_out(a: int, op: str, b: int, fraction: float) -> bool:
    h = zlib.crc32(f"{a}{op}{b}".encode()) / 2**32
    return h < fraction


def make_problem(a: int, op: str, b: int) -> Sample:
    answer = _OPS[op](a, b)
    return Sample(prompt=f"What is {a} {op} {b}?", answer=str(answer), meta={"a": a, "b": b, "op": op})


class ArithmeticTask:
    name = "arithmetic"

    def __init__(
        self,
        seed: int = 0,
        min_operand: int = 0,
        max_operand: int = 99,
        ops: tuple[str, ...] | list[str] = ("+",),
        held_out_fraction: float = 0.1,
        eval_size: int = 128,
    ):
        bad = [o for o in ops if o not in _OPS]
        if bad or not ops:
            raise TaskError(f"task arithmetic: ops must be a non-empty subset of {sorted(_OPS)}, got {list(ops)}")
        if not 0 <= min_operand <= max_operand:
            raise TaskError(f"task arithmetic: need 0 <= min_operand <= max_operand, got {min_operand}, {max_operand}")
        if not 0.0 < held_out_fraction < 1.0:
            raise TaskError(f"task arithmetic: held_out_fraction must be in (0, 1), got {held_out_fraction}")
        self.seed, self.lo, self.hi, self.ops = seed, min_operand, max_operand, list(ops)
        self.fraction, self.eval_size = held_out_fraction, eval_size
        size = (max_operand - min_operand + 1) ** 2 * len(self.ops)
        if size <= 200_000:  # small spaces can leave a split empty, and drawing from it would never end
            held = sum(is_held_out(a, op, b, held_out_fraction) for a in range(min_operand, max_operand + 1)
                       for b in range(min_operand, max_operand + 1) for op in self.ops)
            if held == 0 or held == size:
                raise TaskError(f"task arithmetic: operands {min_operand}..{max_operand} give {size} problems, "
                                f"too few to split {held_out_fraction:.0%} off for evaluation: widen the range")

    def _draw(self, rng: random.Random, held_out: bool) -> Sample:
        while True:
            a, b = rng.randint(self.lo, self.hi), rng.randint(self.lo, self.hi)
            op = rng.choice(self.ops)
            if is_held_out(a, op, b, self.fraction) == held_out:
                return make_problem(a, op, b)

    def train_sample(self, index: int) -> Sample:
        return self._draw(random.Random(f"{self.seed}:train:{index}"), held_out=False)

    def eval_samples(self) -> list[Sample]:
        rng = random.Random(f"{self.seed}:eval")  # fixed held-out set for the run, no repeats
        return distinct_draws(lambda: self._draw(rng, held_out=True), self.eval_size)
