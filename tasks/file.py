"""Rows from a local JSONL or Parquet file (or a hub dataset): ``prompt`` and ``answer`` columns.

``prompt`` is a string or a list of chat messages ({"role", "content"}). Other columns travel to
the verifiers unchanged (e.g. ``tests`` for code). Rows are validated up front: a bad row stops
the run before training with the file, the row index and the field in the message.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tasks.base import Sample, TaskError


def read_rows(path: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a .jsonl/.json/.parquet file, or of a `datasets` hub dataset when no such file exists."""
    p = Path(path).expanduser()
    if p.suffix == ".jsonl" or (p.suffix == ".json" and p.exists()):
        if not p.exists():
            raise TaskError(f"{path}: file not found")
        rows = []
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskError(f"{path}: line {i + 1}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise TaskError(f"{path}: line {i + 1}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    import datasets  # slow import; only where needed

    try:
        if p.suffix == ".parquet":
            if not p.exists():
                raise TaskError(f"{path}: file not found")
            ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
        else:
            ds = datasets.load_dataset(path, split=split)
    except TaskError:
        raise
    except Exception as e:  # hub names out of reach, unknown formats
        raise TaskError(f"{path}: cannot load dataset (split {split!r}): {type(e).__name__}: {e}") from e
    return [dict(r) for r in ds]


def to_sample(row: dict[str, Any], where: str, prompt_field: str, answer_field: str | None) -> Sample:
    if prompt_field not in row or row[prompt_field] in (None, "", []):
        raise TaskError(f"{where}: missing field {prompt_field!r}")
    prompt = row[prompt_field]
    messages = None
    if isinstance(prompt, list):
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise TaskError(f"{where}: field {prompt_field!r} must be a string or a list of {{role, content}} messages")
        messages, prompt = prompt, None
    elif not isinstance(prompt, str):
        raise TaskError(f"{where}: field {prompt_field!r} must be a string, got {type(prompt).__name__}")
    answer = None
    if answer_field is not None:
        if answer_field not in row or row[answer_field] is None or row[answer_field] == "":
            raise TaskError(f"{where}: missing field {answer_field!r}")
        answer = row[answer_field]
        answer = str(answer) if isinstance(answer, (int, float)) else answer
    meta = {k: v for k, v in row.items() if k not in (prompt_field, answer_field, "tests")}
    return Sample(prompt=prompt, messages=messages, answer=answer, tests=row.get("tests"), meta=meta)


class FileTask:
    name = "file"

    def __init__(
        self,
        path: str | None = None,
        seed: int = 0,
        eval_path: str | None = None,
        eval_size: int = 64,
        prompt_field: str = "prompt",
        answer_field: str | None = "answer",
        split: str = "train",
    ):
        if not path:
            raise TaskError("task file: set task.path=FILE.jsonl (or .parquet)")
        rows = read_rows(path, split)
        if not rows:
            raise TaskError(f"{path}: no rows")
        samples = [to_sample(r, f"{path}: row {i}", prompt_field, answer_field) for i, r in enumerate(rows)]
        if eval_path:
            erows = read_rows(eval_path, split)
            self.eval = [to_sample(r, f"{eval_path}: row {i}", prompt_field, answer_field) for i, r in enumerate(erows)]
            self.train = samples
        else:
            # Hold out a seeded subset, at most half the file.
            order = list(range(len(samples)))
            random.Random(f"{seed}:split").shuffle(order)
            k = min(eval_size, len(samples) // 2)
            self.eval = [samples[i] for i in sorted(order[:k])]
            self.train = [samples[i] for i in sorted(order[k:])] or samples
        self.seed = seed

    def train_sample(self, index: int) -> Sample:
        # A fresh seeded permutation per epoch over the file: deterministic in (seed, index).
        n = len(self.train)
        epoch, pos = divmod(index, n)
        order = list(range(n))
        random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
        return self.train[order[pos]]

    def eval_samples(self) -> list[Sample]:
        return list(self.eval)
