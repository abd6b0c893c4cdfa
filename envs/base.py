"""What an environment is: the other side of a multi-turn conversation.

A rollout is a conversation. The model writes an assistant message; the environment answers with
messages to append (tool results, a user's reply) or says the conversation is over; the model goes
on from there. The rollout loop (grpo/parts/rollout/multiturn.py) owns the tokens, the caps and the
concurrency; an environment only sees and returns messages:

    tools: list[dict]                       JSON schemas of its tools, rendered by the chat template
    reward_names: list[str]                 (optional) its per-turn reward terms, logged one by one
    reset(sample) -> state                  a fresh conversation about one task sample
    step(state, message) -> Turn            the model's message {"role": "assistant", "content": ...}
    close() -> None

`step` runs in a worker thread, concurrently for the conversations of a batch (tool calls run side by
side in the sandbox), so it must not share mutable state between conversations except through
`state`. An exception in `step` ends that conversation only (reason `env_error`).

The task picks the environment (`task.env`): a name (built-ins below, plugins from the `grpo.envs`
entry-point group, declared like verifiers), or a mapping with `name` or `_target_` plus the
environment's options and the loop's caps (grpo.parts.rollout.multiturn.CAPS). No `task.env` (or
`single`) is today's single-turn rollout, untouched. The verifiers still give the reward: they
judge the final assistant message, and see the whole conversation as the sample field
`conversation`; an environment may add per-turn terms (`Turn.rewards`), which are added to the
reward, logged summed as env/reward and, for the names it declares in `reward_names`, one by one
as env/reward/<name>.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Turn:
    """What the environment does after one assistant message."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # appended to the conversation
    done: bool = False
    reason: str | None = None  # why it ended (done=True): "answered", "tool_cap", or the environment's own word
    rewards: dict[str, float] = field(default_factory=dict)  # per-turn reward terms, by name
    tool_calls: int = 0  # tools called in this turn (those refused by a cap not counted)
    tool_errors: int = 0  # of which failed: a malformed call, an unknown tool, a raising or timed-out run
    tool_time: float = 0.0  # seconds this turn's tools ran


class Environment(Protocol):
    tools: list[dict[str, Any]]

    def reset(self, sample: Any) -> Any: ...

    def step(self, state: Any, message: dict[str, Any]) -> Turn: ...

    def close(self) -> None: ...


class EnvError(ValueError):
    """An environment spec that cannot be built; the message says which and why."""


BUILTINS = {"tools": "grpo.envs.tools:ToolEnv"}
ENTRY_POINT_GROUP = "grpo.envs"


def build_env(spec: str | Mapping[str, Any]) -> Any:
    """The environment a `task.env` spec (a name, or a mapping of `name` or `_target_` plus options,
    the loop's caps already taken out) stands for; None for the single-turn default."""
    from grpo.verifiers.registry import _import, discover

    if spec is None or spec == "single":
        return None
    opts = {"name": spec} if isinstance(spec, str) else dict(spec)
    name, target = opts.pop("name", None), opts.pop("_target_", None)
    if name == "single" and not target:
        return None
    if bool(name) == bool(target):
        raise EnvError(f"task.env={spec!r}: give `name` (one of {sorted(BUILTINS)} or a plugin) or `_target_`, one of them")
    if target:
        factory = _import(target, f"task.env _target_ {target!r}")
    else:
        found = discover(ENTRY_POINT_GROUP, BUILTINS).get(name)
        if not found:
            raise EnvError(f"task.env: unknown environment {name!r}; known: {sorted(discover(ENTRY_POINT_GROUP, BUILTINS))}"
                           " (or give `_target_: module:Class`)")
        first = found[0]
        factory = _import(first.target, f"environment {name!r}") if first.entry_point is None else first.entry_point.load()
    try:
        return factory(**opts)
    except TypeError as e:
        raise EnvError(f"task.env {name or target!r}: bad option: {e}") from e
