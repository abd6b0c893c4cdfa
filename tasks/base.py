"""What a task is: rows turned into prompts that carry what the verifiers need.

A task is any object with:
    name: str
    train_sample(index: int) -> Sample   deterministic in (seed, index), so a run resumes exactly
    eval_samples() -> list[Sample]       the held-out split, fixed for the run
Tasks never import the trainer.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class TaskError(ValueError):
    """Bad task configuration or a malformed row; the message names the file, row and field."""


@dataclass
class Sample:
    """One problem. Exactly one of ``prompt`` (plain text) or ``messages`` (chat turns) is set."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    answer: Any = None
    tests: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The mapping a verifier sees."""
        out = dict(self.meta)
        out.update(prompt=self.prompt, messages=self.messages, answer=self.answer, tests=self.tests)
        return out

    def chat(self, system_prompt: str | None = None) -> list[dict[str, str]]:
        msgs = list(self.messages) if self.messages is not None else [{"role": "user", "content": self.prompt or ""}]
        if system_prompt and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system_prompt})
        return msgs


def distinct_draws(draw, n: int, max_tries: int | None = None) -> list[Sample]:
    """Up to n samples with distinct prompts from repeated draw() calls (a held-out set without
    repeats); stops early when max_tries (default 50 * n) draws found no more new ones."""
    out, seen = [], set()
    for _ in range(max_tries or 50 * n):
        if len(out) == n:
            break
        s = draw()
        key = s.prompt if s.prompt is not None else repr(s.messages)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def render_prompt(tokenizer: Any, sample: Sample, system_prompt: str | None = None, tools: list | None = None) -> str:
    """The text the model continues: the chat template (given the tools' JSON schemas, if any) when the
    tokenizer has one, else the raw prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(sample.chat(system_prompt), tools=tools or None, add_generation_prompt=True,
                                             tokenize=False)
    if sample.prompt is None:
        return "\n".join(m["content"] for m in sample.chat(system_prompt)) + "\n"
    return (system_prompt + "\n\n" if system_prompt else "") + sample.prompt


def build_task(cfg: Mapping[str, Any], seed: int = 0) -> Any:
    """Construct a task from its config mapping (``_target_`` plus constructor options)."""
    cfg = dict(cfg)
    target = cfg.pop("_target_", None)
    name = cfg.pop("name", None) or target
    cfg.pop("verifiers", None)  # read by the trainer, not the task
    cfg.pop("env", None)  # the multi-turn environment, read by the rollout (grpo/envs)
    if not target or ":" not in target and "." not in target:
        raise TaskError(f"task {name!r}: config needs _target_ (module.Class), got {target!r}")
    module_name, _, cls_name = target.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise TaskError(f"task {name!r}: cannot import _target_ {target!r}: {e}") from e
    try:
        return cls(seed=seed, **cfg)
    except TypeError as e:
        raise TaskError(f"task {name!r}: bad option: {e}") from e
