"""GSM8K grade-school word problems: the gold answer is the number after ``####`` in the solution.

Loads ``openai/gsm8k`` (config ``main``: ``question``, ``answer`` columns) from the hub, or a local
.jsonl/.parquet copy with the same columns. Each question is followed by an instruction to put the
final answer in ``\\boxed{}``; the model's chat template is applied later, by the trainer.
"""

from __future__ import annotations

import re
from typing import Any

from grpo.tasks.base import Sample, TaskError
from grpo.tasks.file import epoch_sample, load_splits, to_sample

DEFAULT_INSTRUCTION = "Solve the problem step by step, then put the final answer in \\boxed{}."
_NUMBER_RE = re.compile(r"[+-]?\d+(?:\.\d+)?")


def gsm8k_answer(solution: str) -> str | None:
    """``"... #### 1,234"`` -> ``"1234"``; a bare number stays as it is; else None."""
    text = solution.rsplit("####", 1)[1] if "####" in solution else solution
    text = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    return text if _NUMBER_RE.fullmatch(text) else None


def with_instruction(sample: Sample, instruction: str | None) -> Sample:
    """The instruction goes after the problem (in the last user turn of a chat-message prompt)."""
    if not instruction:
        return sample
    if sample.messages is None:
        sample.prompt = f"{sample.prompt}\n\n{instruction}"
        return sample
    msgs = [dict(m) for m in sample.messages]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=len(msgs) - 1)
    msgs[last]["content"] = f"{msgs[last]['content']}\n\n{instruction}"
    sample.messages = msgs
    return sample


class GSM8KTask:
    name = "gsm8k"

    def __init__(
        self,
        seed: int = 0,
        path: str | None = "openai/gsm8k",
        config: str | None = "main",
        split: str = "train",
        eval_path: str | None = None,
        eval_split: str | None = "test",
        eval_config: str | None = None,
        eval_size: int | None = None,
        question_field: str = "question",
        answer_field: str = "answer",
        instruction: str | None = DEFAULT_INSTRUCTION,
    ):
        self.question_field, self.answer_field, self.instruction = question_field, answer_field, instruction
        self.train, self.eval = load_splits(self.convert, path, split, config, eval_path, eval_split, eval_config,
                                            eval_size, seed, self.name)
        self.seed = seed

    def convert(self, row: dict[str, Any], where: str) -> Sample:
        s = to_sample(row, where, self.question_field, self.answer_field)
        solution = s.answer if isinstance(s.answer, str) else str(s.answer)
        gold = gsm8k_answer(solution)
        if gold is None:
            raise TaskError(f"{where}: field {self.answer_field!r} has no final '#### <number>' line "
                            f"(got {solution[-60:]!r})")
        s.answer = gold
        s.meta["solution"] = solution
        return with_instruction(s, self.instruction)

    def train_sample(self, index: int) -> Sample:
        return epoch_sample(self.train, self.seed, index)

    def eval_samples(self) -> list[Sample]:
        return list(self.eval)
