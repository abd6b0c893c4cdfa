"""Rows from a local JSONL or Parquet file (or a hub dataset): ``prompt`` and ``answer`` columns.

``prompt`` is a string or a list of chat messages ({"role", "content"}). Other columns travel to
the verifiers unchanged (e.g. ``tests`` for code). Rows are validated up front: a bad row stops
the run before training with the file, the row index and the field in the message.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from grpo.tasks.base import Sample, TaskError

log = logging.getLogger(__name__)

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_single_file(path: str) -> bool:
    """A .jsonl/.json/.parquet file (no splits), as opposed to a hub name or a dataset directory."""
    return Path(path).suffix in _FILE_SUFFIXES


def read_rows(path: str, split: str = "train", config: str | None = None) -> list[dict[str, Any]]:
    """Rows of a .jsonl/.json/.parquet file, or of a `datasets` hub dataset when no such file exists.

    ``split`` and ``config`` (the hub dataset's configuration, e.g. "main" for openai/gsm8k) apply
    to hub datasets and dataset directories only; a single file is one split.
    """
    p = Path(path).expanduser()
    if _is_json_array(p):
        try:  # a JSON array of row objects
            rows = json.loads(utf8(p.read_bytes(), path))
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        for i, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise TaskError(f"{path}: row {i} (1-based): expected a JSON object, got {type(row).__name__}")
        return rows
    if p.suffix == ".jsonl" or (p.suffix == ".json" and p.exists()):
        return [row for _, row in jsonl_lines(path)]
    import datasets  # slow import; only where needed

    try:
        if p.suffix == ".parquet":
            if not p.exists():
                raise TaskError(f"{path}: file not found")
            ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
        else:
            ds = datasets.load_dataset(path, config, split=split)
    except TaskError:
        raise
    except Exception as e:  # hub names out of reach, unknown formats
        where = f"config {config!r}, split {split!r}" if config else f"split {split!r}"
        hint = ""
        if "ConnectionError" in type(e).__name__ or "Offline" in str(e) or "reach" in str(e):
            hint = (" -- the hub is out of reach: download the dataset where there is network, or point the"
                    " path at a local .jsonl/.parquet copy (HF_HUB_OFFLINE=1 skips the network retries)")
        raise TaskError(f"{path}: cannot load dataset ({where}): {type(e).__name__}: {e}{hint}") from e
    return [dict(r) for r in ds]


def _is_json_array(p: Path) -> bool:
    """A .json file that holds one array of rows (its first non-blank character is "["); any other
    .json file is read as JSON lines. Reads only up to that character."""
    if p.suffix != ".json" or not p.is_file():
        return False
    with p.open(encoding="utf-8", errors="replace") as f:  # a peek: bad bytes are reported where the rows are read
        while chunk := f.read(4096):
            if chunk.strip():
                return chunk.lstrip().startswith("[")
    return False


def _is_json_lines(p: Path) -> bool:
    """read_rows' rule: .jsonl, or a .json file that does not hold one array of rows."""
    return p.suffix == ".jsonl" or (p.suffix == ".json" and p.is_file() and not _is_json_array(p))


def located_rows(path: str, split: str = "train", config: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for each row, ``where`` naming the place as an editor shows it: "FILE: line N" for
    JSON lines (the 1-based line, blank lines counted), "FILE: row N (1-based)" for a JSON array,
    Parquet or a hub dataset, whose rows have no line."""
    if _is_json_lines(Path(path).expanduser()):
        return [(f"{path}: line {n}", row) for n, row in jsonl_lines(path)]
    label = path if is_single_file(path) else f"{path} (split {split})"
    return [(f"{label}: row {i} (1-based)", row) for i, row in enumerate(read_rows(path, split, config), start=1)]


def jsonl_lines(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, row) for each non-blank line of a JSON-lines file, so that errors
    found later in a row can name its line."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TaskError(f"{path}: file not found")
    with p.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            line = utf8(raw, path, i)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}: line {i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}: line {i}: expected a JSON object, got {type(row).__name__}")
            yield i, row


def utf8(data: bytes, path: str, line: int | None = None) -> str:
    """`data` (a file, or its 1-based `line`) as text; bytes that are not UTF-8 are one TaskError that
    names the file, the line and the column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[:e.start]
        n = line if line is not None else before.count(b"\n") + 1
        col = e.start - (before.rfind(b"\n") + 1) + 1
        raise TaskError(f"{path}: line {n}: not UTF-8 text (byte {data[e.start]:#04x} at column {col}); "
                        "save the file as UTF-8") from None


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


def hold_out(samples: list[Sample], eval_size: int, seed: int, path: str = "the data") -> tuple[list[Sample], list[Sample]]:
    """(train, eval): a seeded subset of at most half the rows is held out, both kept in file order.

    A file too small for ``eval_size`` says so, with the numbers it holds out and trains on."""
    order = list(range(len(samples)))
    random.Random(f"{seed}:split").shuffle(order)
    k = min(eval_size, len(samples) // 2)
    held = [samples[i] for i in sorted(order[:k])]
    train = [samples[i] for i in sorted(order[k:])] or samples
    if k < eval_size:
        log.warning("%s holds %d rows, fewer than twice task.eval_size=%d: holding out %d for evaluation and "
                    "training on %d (set task.eval_path to evaluate on another file)",
                    path, len(samples), eval_size, k, len(train))
    return train, held


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
    return tuple(order)


def epoch_sample(train: list[Sample], seed: int, index: int) -> Sample:
    """Row `index` of an endless stream: a fresh seeded permutation of `train` per epoch.

    The permutation depends only on (seed, epoch, len(train)), so it is computed once per epoch
    rather than once per sample."""
    epoch, pos = divmod(index, len(train))
    return train[_epoch_order(seed, epoch, len(train))[pos]]


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
        rows = located_rows(path, split)
        if not rows:
            raise TaskError(f"{path}: no rows")
        samples = [to_sample(r, where, prompt_field, answer_field) for where, r in rows]
        if eval_path:
            erows = located_rows(eval_path, split)
            self.eval = [to_sample(r, where, prompt_field, answer_field) for where, r in erows]
            self.train = samples
        else:
            self.train, self.eval = hold_out(samples, eval_size, seed, path)
        self.seed = seed

    def train_sample(self, index: int) -> Sample:
        return epoch_sample(self.train, self.seed, index)  # deterministic in (seed, index)

    def eval_samples(self) -> list[Sample]:
        return list(self.eval)


def load_splits(
    convert: Callable[[dict[str, Any], str], Sample],
    path: str | None,
    split: str,
    config: str | None,
    eval_path: str | None,
    eval_split: str | None,
    eval_config: str | None,
    eval_size: int | None,
    seed: int,
    task: str,
) -> tuple[list[Sample], list[Sample]]:
    """(train, eval) samples of a dataset with a train split and a held-out split.

    The held-out samples come from ``eval_path`` (another file or hub dataset), else from the
    ``eval_split`` of ``path`` when ``path`` has splits (a hub name or dataset directory), else a
    seeded subset of ``path`` is held out. ``eval_size`` keeps the first rows of a held-out split
    (null = all of them) or sets the size of the subset held out of a single file (null = 64).
    ``convert(row, where)`` turns one row into a Sample, raising TaskError that names ``where``.
    """
    if not path:
        raise TaskError(f"task {task}: set task.path to a hub dataset name or a local .jsonl/.parquet file")

    def samples(src: str, spl: str, cfg: str | None) -> list[Sample]:
        rows = located_rows(src, spl, cfg)
        if not rows:
            raise TaskError(f"{src}: no rows")
        return [convert(r, where) for where, r in rows]

    train = samples(path, split, config)
    if eval_path or (eval_split and not is_single_file(path)):
        held = samples(eval_path or path, eval_split or split, eval_config if eval_path else config)
        return train, held if eval_size is None else held[:eval_size]
    return hold_out(train, 64 if eval_size is None else eval_size, seed, path)
