"""The ``math`` verifier: reward 1 when the completion's final answer equals the gold answer.

    v = MathVerifier()                       # extraction=("boxed", "anchor"), timeout=5 s
    v.score(["... so 37+48=85. \\boxed{85}"], [{"answer": "85"}])   # [Score(1.0, {...})]

Pipeline for a batch (see docs/math_verifier.md for the user-facing description):

1. In the caller, per completion: find the answer span (:mod:`grpo.verifiers.math_extract`): the boxes
   after ``</think>``, else a "final answer is" anchor, else (opt-in) the last number or the whole
   text. A boxed or anchored answer in number words ("The answer is twenty-one.") is read as its
   digits. Cheap string work.
2. Plain decimal numbers on both sides are compared exactly right here (the common GSM8K case),
   without sympy and without a round-trip to the pool.
3. The remaining distinct (gold, answer) pairs, deduplicated within the batch and against a
   cache of earlier batches, go in one batched call to a process pool (:mod:`grpo.verifiers.pool`)
   that runs math-verify + sympy (:mod:`grpo.verifiers.math_compare`) under a hard per-pair time limit.

Several different boxes (``multiple_boxed``). By default ("last") the final box is the answer:
the grader grades one answer, the final one, so a completion that boxes 5, notices a mistake and
boxes 6 is graded on 6. That is not a hedge, and boxing extra candidates gains nothing, because
the earlier boxes are never compared (a gold with several parts, "find all roots", is compared
with all the boxes first, since there they are the parts of one answer). "reject" keeps the
strict rule: several different boxes against a single gold get 0 ("multiple_boxed" when one of
them is right). Pick it when a box must be final, for example an evaluation protocol that counts
a second box as a failure, or to train a model to box only its final answer.

Anti-gaming (each case gets 0 and an ``info["reason"]``): no answer found ("no_answer"), only
empty boxes ("empty_box"), several alternatives against a single gold ("hedged": ``3 or 4``,
``\\pm 3``), a hedge written in words ("hedged": ``at least 1``, ``1 \\text{ or more}``,
``approximately 3``, ``1 (or 2)``, unless the gold says the same), an interval or set where a number
is expected ("wrong"), and no tolerance beyond math-verify's rounding of floats to 6 decimals
(so 1000001 != 1000000). Failures never raise: a pair that times out or kills its worker gets 0
with reason "timeout" / "crashed"; an unusable gold gets 0 with "bad_gold" / "gold_unparsable".
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from grpo.verifiers.base import Score
from grpo.verifiers.math_compare import MULTIPLE_BOXED
from grpo.verifiers.math_extract import (
    DEFAULT_EXTRACTION,
    EXTRACTORS,
    Extraction,
    extract,
    gold_answer,
    plain_number,
    read_number_words,
)
from grpo.verifiers.pool import WorkerPool

_SHOW = 200  # characters of extracted/gold text kept in info (infos are logged per sample)
# Answer spans short enough to hold an answer and nothing else: number words are read and hedges
# written in words are looked for only there (a "whole" span is a completion, with prose).
_ANSWER_SOURCES = ("boxed", "anchor")
_GOLD_SOURCES = ("gold", "gold_boxed")

# (correct, reason, parsed prediction or None, whether only the final box was graded)
Verdict = tuple[bool, str, str | None, bool]


class MathVerifier:
    """Math answer equivalence (math-verify + sympy) with anti-gaming rules and a hard time bound.

    Args:
        extraction: rules tried in order to find the answer: "boxed", "anchor", "last_number",
            "whole" (see :mod:`grpo.verifiers.math_extract`). "last_number" and "whole" are off by
            default because they reward a number that merely appears last.
        timeout: seconds one (gold, answer) comparison may take before its worker is killed.
        num_workers: worker processes (default: CPU count, at most 4). They start on the first
            batch that needs them and are reused.
        memory_limit_mb: address-space limit of each worker.
        answer_key: the sample field holding the gold answer.
        cache_size: verdicts remembered across batches (GRPO sees the same pairs again).
        max_answer_chars: longer boxed/anchored spans get 0 ("answer_too_long") without parsing
            ("whole" spans are whole completions, searched by math-verify's regexes instead).
        multiple_boxed: what several different boxes mean. "last" (default): the final box is
            the answer, since the grader grades one answer, the final one, and a model that
            revises its answer is not hedging. "reject": several different boxes against a
            single gold get 0, for protocols where any second box is a failure. A gold with
            several parts is compared with all the boxes as a set in both modes.
    """

    name = "math"
    required_fields = ("answer",)

    def __init__(
        self,
        extraction: Sequence[str] = DEFAULT_EXTRACTION,
        timeout: float = 5.0,
        num_workers: int | None = None,
        memory_limit_mb: int | None = 2048,
        answer_key: str = "answer",
        cache_size: int = 100_000,
        max_answer_chars: int = 1000,
        multiple_boxed: str = "last",
    ):
        if isinstance(extraction, str):
            extraction = (extraction,)
        extraction = tuple(extraction)
        unknown = [r for r in extraction if r not in EXTRACTORS]
        if unknown or not extraction:
            raise ValueError(f"extraction rules must be a non-empty list of {EXTRACTORS}, got {list(extraction)}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if multiple_boxed not in MULTIPLE_BOXED:
            raise ValueError(f"multiple_boxed must be one of {list(MULTIPLE_BOXED)}, got {multiple_boxed!r}")
        self.extraction = extraction
        self.timeout = float(timeout)
        self.num_workers = int(num_workers) if num_workers else max(1, min(4, os.cpu_count() or 1))
        self.memory_limit_mb = memory_limit_mb
        self.answer_key = answer_key
        self.cache_size = int(cache_size)
        self.max_answer_chars = int(max_answer_chars)
        self.multiple_boxed = multiple_boxed
        self._cache: OrderedDict[tuple, Verdict] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._pool: WorkerPool | None = None
        self._pool_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def pool(self) -> WorkerPool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = WorkerPool(
                    "grpo.verifiers.math_compare:judge_payload",
                    num_workers=self.num_workers,
                    timeout=self.timeout,
                    memory_limit_mb=self.memory_limit_mb,
                )
            return self._pool

    def warmup(self) -> None:
        """Start the workers now, so the first training step does not pay for their imports."""
        self.pool.start()

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scoring -------------------------------------------------------------------------------

    def _gold(self, sample: Any) -> Extraction:
        if not isinstance(sample, Mapping) or self.answer_key not in sample:
            return Extraction((), None, "bad_gold")
        return gold_answer(sample[self.answer_key])

    @staticmethod
    def _read_words(ex: Extraction, sources: tuple[str, ...]) -> Extraction:
        """The extraction with answers written in number words as digits ("three" -> "3")."""
        if ex.source not in sources or not ex.parts:
            return ex
        parts = tuple(read_number_words(p) or p for p in ex.parts)
        return ex if parts == ex.parts else Extraction(parts, ex.source, ex.reason)

    def score(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[Score]:
        n = len(completions)
        if len(samples) != n:
            # A caller bug, not a bad completion: still no exception, every item says why.
            return [Score(0.0, {"reason": "bad_batch", "detail": f"{n} completions, {len(samples)} samples"})] * n
        verdicts: list[Verdict | None] = [None] * n
        infos: list[dict[str, Any]] = []
        preds: list[tuple[Extraction, Extraction]] = []  # (as written, as compared)
        todo: dict[tuple, list[int]] = {}
        for i, (completion, sample) in enumerate(zip(completions, samples)):
            gold_written = self._gold(sample)
            gold = self._read_words(gold_written, _GOLD_SOURCES)
            written = extract(completion, self.extraction)
            pred = self._read_words(written, _ANSWER_SOURCES)
            preds.append((written, pred))
            info: dict[str, Any] = {
                "extracted": written.text[:_SHOW] if written.text else None,
                "gold": gold_written.text[:_SHOW] if gold_written.text else None,
                "source": pred.source,
            }
            infos.append(info)
            if not gold.parts:
                verdicts[i] = (False, gold.reason or "bad_gold", None, False)
                continue
            if not pred.parts:
                verdicts[i] = (False, pred.reason or "no_answer", None, False)
                continue
            if len(pred.text) > self.max_answer_chars and pred.source != "whole":
                verdicts[i] = (False, "answer_too_long", None, False)
                continue
            fast = self._fast(gold, pred)
            if fast is not None:
                verdicts[i] = fast
                continue
            key = (gold.parts, pred.parts, gold.source == "gold_boxed", pred.source == "boxed",
                   self.multiple_boxed, pred.source in _ANSWER_SOURCES)
            with self._cache_lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
            if hit is not None:
                verdicts[i] = hit
            else:
                todo.setdefault(key, []).append(i)
        if todo:
            keys = list(todo)
            outcomes = self.pool.map(keys)
            for key, (status, value) in zip(keys, outcomes):
                if status == "ok":
                    verdict = (bool(value[0]), str(value[1]), value[2], bool(value[3]))
                elif status == "error":
                    verdict = (False, "error", str(value)[:_SHOW], False)
                else:  # "timeout" or "crashed"
                    verdict = (False, status, None, False)
                if status != "crashed":  # a crash may be the machine's fault; retry it next time
                    self._remember(key, verdict)
                for i in todo[key]:
                    verdicts[i] = verdict
        out = []
        for v, info, (written, pred) in zip(verdicts, infos, preds):
            ok, reason, parsed, final_only = v  # type: ignore[misc]
            info["reason"] = reason
            if final_only:
                # Only the final box was graded: that is the answer (also for majority votes).
                written = Extraction(written.parts[-1:], written.source)
                pred = Extraction(pred.parts[-1:], pred.source)
                info["extracted"] = written.text[:_SHOW]
            if pred.parts != written.parts:
                info["read_as"] = pred.text[:_SHOW]  # number words, as they were compared
            if parsed is not None:
                info["parsed"] = parsed
            out.append(Score(1.0 if ok else 0.0, info))
        return out

    def _fast(self, gold: Extraction, pred: Extraction) -> Verdict | None:
        """Exact verdict for two plain decimal numbers (same verdict math-verify gives), else None."""
        if len(gold.parts) != 1:
            return None
        g = plain_number(gold.parts[0])
        if g is None:
            return None
        final_only = False
        if len(pred.parts) > 1:
            if self.multiple_boxed != "last":
                return None
            final_only = True  # a plain number is a single value: the final box is the answer
        p = plain_number(pred.parts[-1])
        if p is None:
            return None
        return (g == p, "correct" if g == p else "wrong", None, final_only)

    def _remember(self, key: tuple, verdict: Verdict) -> None:
        if self.cache_size <= 0:
            return
        with self._cache_lock:
            self._cache[key] = verdict
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
