"""Preference data for reward models: rankings of responses, or responses with scores.

A local .jsonl/.json/.parquet file or a hub dataset (read with tasks/file.py) holds one of three
row shapes, told apart by their fields; every row of a file must have the file's shape:

- pairs:    ``prompt``, ``chosen``, ``rejected``, optional numeric ``margin`` (how much better)
- rankings: ``prompt``, ``responses`` (2..9 distinct strings, best first, as InstructGPT's K)
- scores:   ``prompt``, ``response``, ``score`` (a number)

``prompt`` is a string or a list of {role, content} messages. Pairs also come in two more forms:

- conversational: ``chosen``/``rejected`` are message lists; the response is the content of the
  final assistant message and the messages before it are the conversation so far (appended to the
  prompt, unless they already start with it, as in UltraFeedback where they repeat it);
- implicit prompt (Anthropic HH): no ``prompt``; for message lists the prompt is the leading
  messages both share; for strings it is their longest common prefix cut back to just after the
  last "Assistant:" in it (the two responses often start alike, "Assistant: I ...").

A pair is read as a ranking with K = 2. Errors name the file, the 1-based line (JSONL) or row
(Parquet, hub) and the field. `embedded-prefs` and `embedded-prefs-eval` name the built-in
preference task's rankings, shipped in grpo/data (`grpo prefs --ship` rebuilds them).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo.tasks.base import Sample, TaskError
from grpo.tasks.file import located_rows

K_MIN, K_MAX = 2, 9
ASSISTANT_MARKER = "Assistant:"
# The fields that mark each shape; a row is of the one shape whose markers it has.
SHAPES = {"pairs": ("chosen", "rejected"), "rankings": ("responses",), "scores": ("response", "score")}


# The built-in task's files, shipped beside the embedded models.
SHIPPED = {"embedded-prefs": "prefs_train.jsonl", "embedded-prefs-eval": "prefs_eval.jsonl"}


def shipped_file(name: str) -> Path:
    """Where the built-in file `name` (a key of SHIPPED) lives in the package: grpo/data."""
    import grpo

    return Path(grpo.__file__).resolve().parent / "data" / SHIPPED[name]


def resolve_data(path: str) -> str:
    """`embedded-prefs` / `embedded-prefs-eval` name the built-in task's files; anything else as is."""
    if path not in SHIPPED:
        return path
    shipped = shipped_file(path)
    if not shipped.exists():
        raise TaskError(f"{shipped} is missing: rebuild it with `grpo prefs --ship`")
    return str(shipped)


@dataclass
class Ranking:
    """Responses to one prompt, best first (a pair is K = 2); ``margin`` only comes with pairs."""

    sample: Sample
    responses: list[str]
    margin: float | None
    where: str


@dataclass
class Scored:
    sample: Sample
    response: str
    score: float
    where: str


def read_preferences(path: str, split: str = "train", config: str | None = None) -> tuple[str, list]:
    """(kind, records): kind is "pairs" or "rankings" (records are Ranking) or "scores" (Scored)."""
    rows = located_rows(resolve_data(str(path)), split, config)
    if not rows:
        raise TaskError(f"{path}: no rows")
    kind = _shape(*rows[0])
    records = []
    for where, row in rows:
        shape = _shape(where, row)
        if shape != kind:
            raise TaskError(f"{where}: a {shape} row (fields {sorted(row)}) in a file of {kind} "
                            "(the shape of its first row)")
        records.append(_READERS[kind](where, row))
    return kind, records


def ranking_pairs(rankings: list[Ranking]) -> list[tuple[Sample, str, str]]:
    """(sample, chosen, rejected) for every pair i < j of every ranking: C(K, 2) per ranking."""
    return [(r.sample, r.responses[i], r.responses[j])
            for r in rankings for i in range(len(r.responses)) for j in range(i + 1, len(r.responses))]


def _shape(where: str, row: dict[str, Any]) -> str:
    found = [kind for kind, marks in SHAPES.items() if any(m in row for m in marks)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise TaskError(f"{where}: cannot tell the preference format from fields {sorted(row)}: expected "
                        "chosen/rejected (pairs), responses (rankings) or response/score (scores)")
    raise TaskError(f"{where}: fields {sorted(row)} mix the {' and '.join(found)} formats")


def _text(where: str, row: dict[str, Any], field: str) -> str:
    v = row.get(field)
    if v is None:
        raise TaskError(f"{where}: missing field {field!r}")
    if not isinstance(v, str):
        raise TaskError(f"{where}: field {field!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise TaskError(f"{where}: field {field!r} is empty")
    return v


def _messages(where: str, field: str, v: list) -> list[dict[str, str]]:
    if not v:
        raise TaskError(f"{where}: field {field!r} is an empty message list")
    for i, m in enumerate(v, start=1):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TaskError(f"{where}: field {field!r}: message {i} must be a {{role, content}} object of strings")
    return [{"role": m["role"], "content": m["content"]} for m in v]  # drops extra keys parquet may add


def _prompt(where: str, row: dict[str, Any]) -> list[dict[str, str]] | str:
    v = row.get("prompt")
    return _messages(where, "prompt", v) if isinstance(v, list) else _text(where, row, "prompt")


def _sample(prompt: list[dict[str, str]] | str, row: dict[str, Any], used: tuple[str, ...]) -> Sample:
    meta = {k: v for k, v in row.items() if k not in used}  # other columns travel along, as in tasks/file.py
    if isinstance(prompt, list):
        return Sample(messages=prompt, meta=meta)
    return Sample(prompt=prompt, meta=meta)


def _number(where: str, row: dict[str, Any], field: str) -> float:
    v = row.get(field)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):  # True is an int, but no score
        raise TaskError(f"{where}: field {field!r} must be a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise TaskError(f"{where}: field {field!r} must be finite, got {v}")
    return float(v)


def _split_conversation(where: str, field: str, v: list) -> tuple[list[dict[str, str]], str]:
    """(messages before the response, the response) of a conversational chosen/rejected."""
    msgs = _messages(where, field, v)
    last = msgs[-1]
    if last["role"] != "assistant":
        raise TaskError(f"{where}: field {field!r}: the last message must be the assistant's response, "
                        f"got role {last['role']!r}")
    if not last["content"].strip():
        raise TaskError(f"{where}: field {field!r}: the final assistant message is empty")
    return msgs[:-1], last["content"]


def _implicit_text_prompt(where: str, chosen: str, rejected: str) -> str:
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise TaskError(f"{where}: no field 'prompt', and the common start of 'chosen' and 'rejected' has no "
                        f"{ASSISTANT_MARKER!r} to end a prompt at: add a prompt field")
    return common[:cut + len(ASSISTANT_MARKER)]


def _read_pair(where: str, row: dict[str, Any]) -> Ranking:
    for field in ("chosen", "rejected"):
        if row.get(field) is None:
            raise TaskError(f"{where}: missing field {field!r}")
    chosen, rejected = row["chosen"], row["rejected"]
    has_prompt = row.get("prompt") is not None
    prompt = _prompt(where, row) if has_prompt else None
    if isinstance(chosen, list) and isinstance(rejected, list):
        head, chosen = _split_conversation(where, "chosen", chosen)
        rhead, rejected = _split_conversation(where, "rejected", rejected)
        if head != rhead:
            raise TaskError(f"{where}: fields 'chosen' and 'rejected' differ before their final assistant message")
        if prompt is None:
            if not head:
                raise TaskError(f"{where}: no field 'prompt', and 'chosen' holds only the response")
            prompt = head
        elif head:
            lead = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            prompt = head if head[:len(lead)] == lead else lead + head  # UltraFeedback repeats the prompt
    elif isinstance(chosen, list) or isinstance(rejected, list):
        raise TaskError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists")
    else:
        chosen, rejected = _text(where, row, "chosen"), _text(where, row, "rejected")
        if prompt is None:
            prompt = _implicit_text_prompt(where, chosen, rejected)
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
            for field, text in (("chosen", chosen), ("rejected", rejected)):
                if not text.strip():
                    raise TaskError(f"{where}: field {field!r} has an empty response after the prompt")
    if chosen == rejected:
        raise TaskError(f"{where}: fields 'chosen' and 'rejected' hold the same response")
    margin = None if row.get("margin") is None else _number(where, row, "margin")
    return Ranking(_sample(prompt, row, ("prompt", "chosen", "rejected", "margin")), [chosen, rejected], margin, where)


def _read_ranking(where: str, row: dict[str, Any]) -> Ranking:
    prompt = _prompt(where, row)
    responses = row.get("responses")
    if hasattr(responses, "tolist"):  # a numpy array from parquet
        responses = responses.tolist()
    if not isinstance(responses, list):
        raise TaskError(f"{where}: field 'responses' must be a list of strings, got {type(responses).__name__}")
    if not K_MIN <= len(responses) <= K_MAX:
        raise TaskError(f"{where}: field 'responses' has {len(responses)} responses; a ranking needs "
                        f"{K_MIN} to {K_MAX}")
    first: dict[str, int] = {}
    for i, r in enumerate(responses, start=1):
        if not isinstance(r, str):
            raise TaskError(f"{where}: field 'responses': item {i} must be a string, got {type(r).__name__}")
        if not r.strip():
            raise TaskError(f"{where}: field 'responses': item {i} is empty")
        if r in first:
            raise TaskError(f"{where}: field 'responses': item {i} repeats item {first[r]}")
        first[r] = i
    return Ranking(_sample(prompt, row, ("prompt", "responses")), list(responses), None, where)


def _read_scored(where: str, row: dict[str, Any]) -> Scored:
    prompt = _prompt(where, row)
    response = _text(where, row, "response")
    score = _number(where, row, "score")
    return Scored(_sample(prompt, row, ("prompt", "response", "score")), response, score, where)


_READERS = {"pairs": _read_pair, "rankings": _read_ranking, "scores": _read_scored}
