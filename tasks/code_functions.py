"""Procedural code: "Write g(n) that returns n plus 7." -> "def g(n):\n    return n+7". Seeded, infinite.

Each problem is one operation family with a small constant (add, subtract, multiply, take the first
k characters, drop the first k, repeat k times, the character at index k), a function name and an
argument name. Every sample carries ``call`` tests (3 by default) for the ``code`` verifier, so the
reward is the fraction of cases passed. The first case is one where a near miss may still pass
(x in 0..2, a string shorter than k), which gives partial credit; the others fail every near miss
that `near_miss` makes (a constant off by 1 or 2, a swapped operation).

The split into training and held-out problems is by a hash of (family, constant): a held-out
operation-constant pair is never trained on under any function or argument name, whatever the seed.

Completions are short on purpose (20-35 characters): the embedded model's tokenizer spends a
token on every character.
"""

from __future__ import annotations

import random
import string
import zlib
from dataclasses import dataclass
from typing import Any, Callable

from grpo.tasks.base import Sample, TaskError, distinct_draws


@dataclass(frozen=True)
class Family:
    kind: str  # "int" or "str": the argument's type
    spec: str  # what the prompt asks for; {a} = argument name, {k} = constant
    body: str  # the reference expression
    fn: Callable[[Any, int], Any]
    k_min: int
    k_max: int


FAMILIES: dict[str, Family] = {
    "add": Family("int", "{a} plus {k}", "{a}+{k}", lambda x, k: x + k, 1, 99),
    "sub": Family("int", "{a} minus {k}", "{a}-{k}", lambda x, k: x - k, 1, 99),
    "mul": Family("int", "{a} times {k}", "{a}*{k}", lambda x, k: x * k, 2, 19),
    "first": Family("str", "the first {k} characters of {a}", "{a}[:{k}]", lambda s, k: s[:k], 1, 9),
    "drop": Family("str", "{a} without its first {k} characters", "{a}[{k}:]", lambda s, k: s[k:], 1, 9),
    "repeat": Family("str", "{a} repeated {k} times", "{a}*{k}", lambda s, k: s * k, 2, 5),
    "index": Family("str", "the character of {a} at index {k}", "{a}[{k}]", lambda s, k: s[k], 0, 9),
}
FN_NAMES = ("f", "g", "h")
ARG_NAMES = {"int": ("x", "n", "a"), "str": ("s", "t", "w")}
# Operator swaps a near miss may make (same argument type, so the program still runs).
_SWAPS = {"add": ("sub", "mul"), "sub": ("add",), "mul": ("add",), "first": ("drop",), "drop": ("first",),
          "repeat": ("first",), "index": ("first",)}


def is_held_out(family: str, k: int, fraction: float) -> bool:
    h = zlib.crc32(f"code:{family}:{k}".encode()) / 2**32
    return h < fraction


def solution(family: str, k: int, fn_name: str, arg: str) -> str:
    return f"def {fn_name}({arg}):\n    return {FAMILIES[family].body.format(a=arg, k=k)}"


def near_miss(sample: Sample, rng: random.Random) -> str:
    """A plausible wrong program for a sample: a wrong constant or a wrong operation (never right)."""
    fam, k, name, arg = (sample.meta[x] for x in ("family", "k", "fn_name", "arg"))
    if rng.random() < 0.5:
        other = rng.choice(_SWAPS[fam])
        return solution(other, k, name, arg)
    deltas = [d for d in (-2, -1, 1, 2) if k + d >= 0 and not (fam in ("mul", "repeat") and k + d == 1)]
    return solution(fam, k + rng.choice(deltas), name, arg)


def _cases(family: str, k: int, rng: random.Random, n: int) -> list[dict[str, Any]]:
    """The first case is small (a near miss may pass it: partial credit); the others tell every near
    miss apart from the reference: |x| >= 3, and strings of k+3 or more distinct letters."""
    fam = FAMILIES[family]
    if fam.kind == "int":
        xs = [rng.randint(0, 2)] + [rng.randint(3, 60) * rng.choice((1, 1, -1)) for _ in range(n - 1)]
        return [{"args": [x], "expected": fam.fn(x, k)} for x in xs]
    short = [] if family == "index" else [rng.randint(0, max(0, k - 1))]  # index k must exist
    lengths = (short + [rng.randint(k + 3, k + 6) for _ in range(n)])[:n]
    words = ["".join(rng.sample(string.ascii_lowercase, m)) for m in lengths]
    return [{"args": [w], "expected": fam.fn(w, k)} for w in words]


def make_problem(family: str, k: int, fn_name: str, arg: str, rng: random.Random, n_cases: int = 3) -> Sample:
    fam = FAMILIES[family]
    prompt = f"Write {fn_name}({arg}) that returns {fam.spec.format(a=arg, k=k)}."
    tests = {"call": {"fn_name": fn_name, "cases": _cases(family, k, rng, n_cases)}}
    meta = {"family": family, "k": k, "fn_name": fn_name, "arg": arg, "solution": solution(family, k, fn_name, arg)}
    return Sample(prompt=prompt, tests=tests, meta=meta)


class CodeFunctionsTask:
    name = "code"

    def __init__(
        self,
        seed: int = 0,
        families: tuple[str, ...] | list[str] = tuple(FAMILIES),
        cases: int = 3,
        held_out_fraction: float = 0.15,
        eval_size: int = 64,
    ):
        bad = [f for f in families if f not in FAMILIES]
        if bad or not families:
            raise TaskError(f"task code: families must be a non-empty subset of {list(FAMILIES)}, got {list(families)}")
        if not 1 <= cases <= 8:
            raise TaskError(f"task code: cases must be in 1..8, got {cases}")
        if not 0.0 < held_out_fraction < 1.0:
            raise TaskError(f"task code: held_out_fraction must be in (0, 1), got {held_out_fraction}")
        self.seed, self.families, self.cases = seed, list(families), int(cases)
        self.fraction, self.eval_size = held_out_fraction, eval_size
        pairs = [(f, k) for f in self.families for k in range(FAMILIES[f].k_min, FAMILIES[f].k_max + 1)]
        self.train_pairs = [p for p in pairs if not is_held_out(*p, held_out_fraction)]
        self.held_pairs = [p for p in pairs if is_held_out(*p, held_out_fraction)]
        if not self.train_pairs or not self.held_pairs:
            raise TaskError(f"task code: families {self.families} with held_out_fraction={held_out_fraction} "
                            "leave the training or the held-out split empty")

    def _draw(self, rng: random.Random, pairs: list[tuple[str, int]]) -> Sample:
        # A family first, then a constant, so families with few constants are not starved.
        family = rng.choice(sorted({f for f, _ in pairs}))
        k = rng.choice([k for f, k in pairs if f == family])
        name, arg = rng.choice(FN_NAMES), rng.choice(ARG_NAMES[FAMILIES[family].kind])
        return make_problem(family, k, name, arg, rng, self.cases)

    def train_sample(self, index: int) -> Sample:
        return self._draw(random.Random(f"{self.seed}:code:train:{index}"), self.train_pairs)

    def eval_samples(self) -> list[Sample]:
        rng = random.Random(f"{self.seed}:code:eval")  # fixed held-out set for the run, no repeats
        return distinct_draws(lambda: self._draw(rng, self.held_pairs), self.eval_size)
