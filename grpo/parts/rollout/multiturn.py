"""Multi-turn rollouts: the model and an environment (grpo/envs) take turns, token in, token out.

A conversation starts from the task's prompt (rendered with the environment's tools by the model's
own chat template). Each turn the engine continues the conversation's exact token ids; the
environment reads the assistant message and answers (tool results) or ends the conversation; its
messages are rendered once into the ids that follow, with the next assistant header, and the next
turn continues from there. The history is never re-tokenised, so the trainer scores exactly the
tokens the engine sampled, and BPE merges across a turn boundary cannot change them.

The ids of a turn's messages are the chat template's render of the conversation with them (and the
generation prompt) minus its render without them: `render_turn`. The model's own end-of-turn token
is already in the ids; what the template writes after it (Qwen's newline after <|im_end|>) is kept
(dropping it is veRL #6921). When a template's render of the longer conversation does not start
with its render of the shorter one (a template that rewrites earlier turns), that conversation ends
there with reason `template`, and a warning says so once; nothing is re-tokenised to paper over it.

Only the model's tokens learn: `Rollout.model_mask` is 1 on sampled tokens and 0 on the
environment's and the template's, and the trainers multiply it into their loss mask.

Caps (task.env keys beside the environment's own): max_turns (assistant messages), max_tokens
(everything after the prompt), max_tool_tokens (each tool result, cut with a marker). Each
conversation ends with one reason: answered, turns, length, tool_cap, template, env_error (or an
environment's own word).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from grpo.parts.rollout.base import Rollout, SamplingParams

log = logging.getLogger(__name__)

REASONS = ("answered", "turns", "length", "tool_cap", "template", "env_error")


@dataclass
class Caps:
    max_turns: int = 4  # assistant messages per conversation
    max_tokens: int = 512  # tokens after the prompt, the model's and the environment's
    max_tool_tokens: int = 256  # tokens of one tool result; longer ones are cut, with a marker
    parallelism: int = 0  # concurrent environment steps (tool calls); 0 = the CPU count


def environment(spec: Any) -> tuple[Any, Caps]:
    """(the environment, the loop's caps) of a `task.env` value; None for a single-turn task (no
    `task.env`, or `single`). Built before the engine, whose context is sized with its tools."""
    from grpo.envs.base import build_env

    env_spec, caps = split_spec(spec)
    return (build_env(env_spec) if env_spec is not None else None), caps


def context_tokens(env: Any, caps: Caps, max_new_tokens: int) -> int:
    """Tokens after the prompt that the engine's context must hold: a turn, or a whole conversation
    (no turn asks for more than the conversation has left)."""
    return max_new_tokens if env is None else caps.max_tokens


def with_env(engine, env: Any, caps: Caps, tokenizer, eos_ids: list[int], system_prompt: str | None = None):
    """`engine` itself for a single-turn task, else Conversations with `env` around it."""
    return engine if env is None else Conversations(engine, env, tokenizer, caps, eos_ids, system_prompt)


def split_spec(spec: Any) -> tuple[Any, Caps]:
    """(the environment's own spec, the loop's caps) of a `task.env` value."""
    if not isinstance(spec, Mapping):
        return spec, Caps()
    env = dict(spec)
    caps = Caps(**{k: int(env.pop(k)) for k in list(env) if k in Caps.__dataclass_fields__})
    if caps.max_turns < 1 or caps.max_tokens < 1 or caps.max_tool_tokens < 1:
        from grpo.parts.config import ConfigError

        raise ConfigError(f"task.env: max_turns, max_tokens and max_tool_tokens must be >= 1, got {caps}")
    return env, caps


class NotExtension(ValueError):
    """The chat template's render of a longer conversation does not extend the shorter one's."""


def chat_text(tokenizer, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=generation_prompt,
                                        tokenize=False)


def render_turn(tokenizer, messages: list[dict], new: list[dict], tools: list[dict] | None,
                last_id: int | None, eos_ids: list[int]) -> list[int]:
    """The token ids that follow an assistant message the model ended with token `last_id`: what the
    template writes after the model's end-of-turn token, then `new` messages and the next assistant
    header. `messages` ends with that assistant message. Raises NotExtension (see the module)."""
    try:
        before = chat_text(tokenizer, messages, tools, False)
        after = chat_text(tokenizer, messages + new, tools, True)
        # what the template writes after an assistant message's content: its end-of-turn, and after it
        marked = chat_text(tokenizer, messages[:-1] + [dict(messages[-1], content=_SENTINEL)], tools, False)
    except Exception as e:  # noqa: BLE001 - a template that refuses the conversation (e.g. wants structured tool_calls)
        raise NotExtension(f"the chat template failed on the conversation ({type(e).__name__}: {e})") from None
    if not after.startswith(before):
        raise NotExtension("the chat template's render of the conversation with the new messages does not start "
                           "with its render without them")
    at = marked.rfind(_SENTINEL)
    tail = marked[at + len(_SENTINEL):] if at >= 0 else ""
    if last_id is not None and last_id in eos_ids:  # the model wrote the end-of-turn token itself
        end = tokenizer.decode([last_id])
        if end and tail.startswith(end):
            tail = tail[len(end):]
    return tokenizer(tail + after[len(before):], add_special_tokens=False)["input_ids"]


_SENTINEL = "\u2063grpo:content\u2063"  # stands for an assistant message's content in a render


def cut_tool_text(tokenizer, text: str, cap: int) -> str:
    """At most `cap` tokens of a tool's result, the cut marked (the marker's own tokens not counted)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= cap:
        return text
    return tokenizer.decode(ids[:cap]) + f"\n[cut: {len(ids) - cap} more tokens]"


@dataclass
class _Conversation:
    sample: Any
    state: Any
    messages: list[dict]
    prompt: list[int]
    ids: list[int]  # everything after the prompt
    mask: list[int]  # 1 where the model sampled the token
    logprobs: list[float]
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_time: float = 0.0
    reason: str | None = None
    rewards: dict[str, float] = field(default_factory=dict)  # the environment's declared terms, summed
    env_reward: float = 0.0  # all its terms, summed
    text: str = ""  # the last assistant message


class Conversations:
    """An engine that holds multi-turn conversations with `env` around a single-turn `engine`.

    generate(prompt_ids, n, sampling, samples) -> Rollout as the engines do (prompt-major), with
    completion_ids = every token after the prompt, model_mask, texts = the final assistant messages,
    finished = ended by the model's answer, and `conversations` (messages, turns, tools, reason).
    Rendering needs the samples: the engine functions call generate(..., samples=...)."""

    def __init__(self, engine, env, tokenizer, caps: Caps, eos_ids: list[int], system_prompt: str | None = None):
        self.engine, self.env, self.tok, self.caps = engine, env, tokenizer, caps
        self.eos_ids, self.system_prompt = list(eos_ids), system_prompt
        self.tools = list(getattr(env, "tools", None) or []) or None
        self.reward_names = list(getattr(env, "reward_names", None) or [])
        self.pool = ThreadPoolExecutor(caps.parallelism or max(2, os.cpu_count() or 2))
        self._warned = False

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, samples=None) -> Rollout:
        if samples is None or len(samples) != len(prompt_ids):
            raise ValueError("a multi-turn rollout needs the samples its prompts were rendered from")
        convs = [_Conversation(s, None, s.chat(self.system_prompt), list(p), [], [], [],
                               rewards=dict.fromkeys(self.reward_names, 0.0))
                 for s, p in zip(samples, prompt_ids) for _ in range(n)]
        for c, state in zip(convs, self.pool.map(self._reset, [c.sample for c in convs])):
            c.state = state
        live = [c for c in convs if c.reason is None and c.state is not _FAILED]
        for c in convs:
            if c.state is _FAILED:
                c.reason = "env_error"
        # A sharded model's every forward is a collective (the hf engine's Lockstep): all ranks take as
        # many turns, a rank whose conversations have ended with an empty batch.
        lock = getattr(self.engine, "lockstep", None)
        hold = hasattr(self.engine, "hold_awake")  # vLLM's sleep mode: not between the turns of a conversation
        if hold:
            self.engine.hold_awake = True
        try:
            self._turns(convs, live, prompt_ids, n, sampling, lock)
        finally:
            if hold:
                self.engine.hold_awake = False
                self.engine.rest()
        return Rollout(prompt_ids=[c.prompt for c in convs], completion_ids=[c.ids for c in convs],
                       texts=[c.text for c in convs], logprobs=[c.logprobs for c in convs],
                       finished=[c.reason != "length" for c in convs], model_mask=[c.mask for c in convs],
                       conversations=[{"messages": c.messages, "turns": c.turns, "tool_calls": c.tool_calls,
                                       "tool_errors": c.tool_errors, "tool_time": c.tool_time, "reason": c.reason,
                                       "rewards": c.rewards, "env_reward": c.env_reward} for c in convs])

    def _turns(self, convs, live, prompt_ids, n, sampling, lock) -> None:
        first = True
        while (lock.anyone(bool(live)) if lock is not None else live):
            # no turn asks for more tokens than the roomiest conversation has left (the engine's context
            # is sized for the prompt plus max_tokens)
            room = max((self.caps.max_tokens - len(c.ids) for c in live), default=1)
            sp = sampling if room >= sampling.max_new_tokens else dataclasses.replace(sampling, max_new_tokens=room)
            if first and all(c.state is not _FAILED for c in convs):  # the n samples of a prompt share its prefill
                ro = self.engine.generate(prompt_ids, n, sp)
            else:
                ro = self.engine.generate([c.prompt + c.ids for c in live], 1, sp)
            first = False
            for c, ids, lps, text, done in zip(live, ro.completion_ids, ro.logprobs, ro.texts, ro.finished):
                room = self.caps.max_tokens - len(c.ids)
                if len(ids) > room:  # cut at the cap: the text is what is kept
                    ids, lps, done = ids[:room], lps[:room], False
                    text = self.tok.decode(ids, skip_special_tokens=True)
                c.ids += ids
                c.mask += [1] * len(ids)
                c.logprobs += lps
                c.turns += 1
                c.text = text
                c.messages.append({"role": "assistant", "content": text})
                if not done:
                    c.reason = "length"
            going = [c for c in live if c.reason is None]
            for c, turn in zip(going, self.pool.map(self._step, going)):
                if turn is None:
                    c.reason = "env_error"
                    continue
                c.tool_calls += turn.tool_calls
                c.tool_errors += turn.tool_errors
                c.tool_time += turn.tool_time
                for k, v in turn.rewards.items():
                    c.env_reward += float(v)
                    if k in c.rewards:  # the terms the environment declares are logged one by one
                        c.rewards[k] += float(v)
                new = [dict(m, content=cut_tool_text(self.tok, m["content"], self.caps.max_tool_tokens))
                       if m.get("role") == "tool" and isinstance(m.get("content"), str) else m for m in turn.messages]
                if turn.done:
                    c.reason = turn.reason or "answered"
                elif c.turns >= self.caps.max_turns:
                    c.reason = "turns"
                else:
                    self._extend(c, new)
                c.messages += new
            live = [c for c in live if c.reason is None]

    def _extend(self, c: _Conversation, new: list[dict]) -> None:
        """The ids of the environment's messages and the next assistant header after c's last turn."""
        try:
            ids = render_turn(self.tok, c.messages, new, self.tools, c.ids[-1] if c.ids else None, self.eos_ids)
        except NotExtension as e:
            if not self._warned:
                self._warned = True
                log.warning("multi-turn: %s; such conversations end there (reason template)", e)
            c.reason = "template"
            return
        if len(c.ids) + len(ids) >= self.caps.max_tokens:  # no room left for the model's next turn
            c.reason = "length"
            return
        c.ids += ids
        c.mask += [0] * len(ids)
        c.logprobs += [0.0] * len(ids)

    def _reset(self, sample):
        try:
            return self.env.reset(sample)
        except Exception:  # noqa: BLE001 - a sample the environment cannot start costs that sample
            log.warning("environment reset failed for one sample", exc_info=True)
            return _FAILED

    def _step(self, c: _Conversation):
        try:
            return self.env.step(c.state, c.messages[-1])
        except Exception:  # noqa: BLE001 - one conversation ends, not the run
            log.warning("environment step failed; that conversation ends (env_error)", exc_info=True)
            return None

    def update_weights(self, named_params) -> None:
        self.engine.update_weights(named_params)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.env.close()


_FAILED = object()


def conversation_metrics(conversations: list[dict]) -> dict[str, float]:
    """Means over the conversations of a batch: env/turns_mean, tool/calls_mean, tool/called_frac (the
    conversations that called a tool at least once), tool/error_frac (failed calls per call), tool/time
    (seconds of tool runs per conversation), env/end/<reason>_frac (an environment's own reasons
    count as `other`), env/reward (its reward terms summed) and env/reward/<name> for the terms it
    declares (`reward_names`). The keys depend on nothing but the environment: every rank of a
    torchrun job has the same ones, which the all-reduce of the metrics needs."""
    n = max(1, len(conversations))
    calls = sum(c["tool_calls"] for c in conversations)
    out = {"env/turns_mean": sum(c["turns"] for c in conversations) / n,
           "tool/calls_mean": calls / n,
           "tool/called_frac": sum(c["tool_calls"] > 0 for c in conversations) / n,
           "tool/error_frac": sum(c["tool_errors"] for c in conversations) / max(1, calls),
           "tool/time": sum(c["tool_time"] for c in conversations) / n,
           "env/reward": sum(c["env_reward"] for c in conversations) / n}
    out.update({f"env/end/{r}_frac": sum(c["reason"] == r for c in conversations) / n for r in REASONS})
    out["env/end/other_frac"] = sum(c["reason"] not in REASONS for c in conversations) / n
    names = conversations[0]["rewards"] if conversations else {}
    out.update({f"env/reward/{k}": sum(c["rewards"][k] for c in conversations) / n for k in names})
    return out


def generate(engine, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, samples) -> Rollout:
    """engine.generate, with the samples a multi-turn engine renders its conversations from."""
    if isinstance(engine, Conversations):
        return engine.generate(prompt_ids, n, sampling, samples)
    return engine.generate(prompt_ids, n, sampling)


def conversation_text(conv: Mapping[str, Any]) -> str:
    """A conversation for a log or a table: one `role: content` block per message after the prompt."""
    msgs = conv["messages"]
    first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
    return "\n".join(f"[{m['role']}] {m['content']}" for m in msgs[first:])


def conversation_ids(tokenizer, start: list[dict], turns: list[dict], eos_id: int,
                     tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """(ids, model mask) of the conversation `turns` after the prompt `start`, built as a rollout
    builds it (an SFT row of a multi-turn demonstration, grpo sft): each assistant message is its
    content's ids and the end-of-turn token (mask 1), the other messages are render_turn's ids
    (mask 0). Turns must alternate: assistant first, and not end on other messages."""
    ids: list[int] = []
    mask: list[int] = []
    messages = list(start)
    pending: list[dict] = []
    for m in turns:
        if m.get("role") != "assistant":
            pending.append(m)
            continue
        if pending or (messages and messages[-1].get("role") == "assistant"):
            if not ids:
                raise ValueError("a demonstration's turns must start with an assistant message")
            extra = render_turn(tokenizer, messages, pending, tools, ids[-1], [eos_id])
            ids += extra
            mask += [0] * len(extra)
            messages += pending
            pending = []
        content = tokenizer(m["content"], add_special_tokens=False)["input_ids"] + [eos_id]
        ids += content
        mask += [1] * len(content)
        messages.append(m)
    if pending:
        raise ValueError("a demonstration's turns must end with an assistant message")
    return ids, mask
