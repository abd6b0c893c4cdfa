"""MATH competition problems (Hendrycks et al. 2021) and MATH-500: answers in ``\\boxed{}``.

Rows have a ``problem`` and either an ``answer`` column (MATH-500) or only a worked ``solution``
whose last ``\\boxed{...}`` is the gold answer (the original MATH release). Defaults: train on
``DigitalLearningGmbH/MATH-lighteval`` (the 7,500 MATH training problems), evaluate on
``HuggingFaceH4/MATH-500`` (500 problems of the MATH test split). Named so that it does not
shadow the standard library's ``math``.
"""

from __future__ import annotations

from typing import Any

from grpo.tasks.base import Sample, TaskError
from grpo.tasks.file import epoch_sample, load_splits, to_sample
from grpo.tasks.gsm8k import DEFAULT_INSTRUCTION, with_instruction

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``, else None."""
    start = max(text.rfind(c) for c in _BOX_COMMANDS)
    while start >= 0:
        cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
        i = start + len(cmd)
        if text.startswith("{", i):
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    inner = text[i + 1:j].strip()
                    return inner or None
            return None  # unbalanced braces
        if text.startswith(" ", i):  # "\boxed 5": one token, up to a dollar sign or whitespace
            token = text[i:].lstrip().split("$", 1)[0].split()
            return token[0] if token else None
        # "\boxedfoo" is some other command: look further left.
        start = max(text.rfind(c, 0, start) for c in _BOX_COMMANDS)
    return None


class MathTask:
    name = "math"

    def __init__(
        self,
        seed: int = 0,
        path: str | None = "DigitalLearningGmbH/MATH-lighteval",
        config: str | None = None,
        split: str = "train",
        eval_path: str | None = "HuggingFaceH4/MATH-500",
        eval_split: str | None = "test",
        eval_config: str | None = None,
        eval_size: int | None = None,
        problem_field: str = "problem",
        answer_field: str | None = "answer",
        solution_field: str | None = "solution",
        instruction: str | None = DEFAULT_INSTRUCTION,
    ):
        if not answer_field and not solution_field:
            raise TaskError("task math: set task.answer_field or task.solution_field (or both)")
        self.problem_field, self.instruction = problem_field, instruction
        self.answer_field, self.solution_field = answer_field, solution_field
        self.train, self.eval = load_splits(self.convert, path, split, config, eval_path, eval_split, eval_config,
                                            eval_size, seed, self.name)
        self.seed = seed

    def gold(self, row: dict[str, Any], where: str) -> str:
        """The ``answer`` column when present, else the last box of the ``solution`` column."""
        ans = row.get(self.answer_field) if self.answer_field else None
        if isinstance(ans, (int, float)) and not isinstance(ans, bool):
            return str(ans)
        if isinstance(ans, str) and ans.strip():
            return ans.strip()
        sol = row.get(self.solution_field) if self.solution_field else None
        if isinstance(sol, str) and sol.strip():
            boxed = last_boxed(sol)
            if boxed is None:
                raise TaskError(f"{where}: field {self.solution_field!r} has no \\boxed{{}} answer"
                                + (f" and field {self.answer_field!r} is missing" if self.answer_field else ""))
            return boxed
        wanted = " or ".join(repr(f) for f in (self.answer_field, self.solution_field) if f)
        raise TaskError(f"{where}: missing field {wanted}")

    def convert(self, row: dict[str, Any], where: str) -> Sample:
        s = to_sample(row, where, self.problem_field, None)
        s.answer = self.gold(row, where)
        s.meta.pop(self.answer_field, None)  # the gold travels as `answer`; the solution stays in meta
        return with_instruction(s, self.instruction)

    def train_sample(self, index: int) -> Sample:
        return epoch_sample(self.train, self.seed, index)

    def eval_samples(self) -> list[Sample]:
        return list(self.eval)
