"""Reward sources: verifier sets and learned reward models behind one interface.

A reward source is any object with
    __call__(inputs: RewardInputs) -> Rewards      rewards in [0, 1], one per completion
    close() -> None
It sees the token ids and whether each completion finished (a reward model scores tokens, and
PPO penalises completions cut at max_new_tokens), not only the text.

- VerifierRewards: the task's verifiers (weighted, each one's failures kept to its samples).
- ModelRewards: a reward model's score at the last real token of prompt + completion, mapped to
  [0, 1] by `squash`: sigmoid(score / scale) (default; the stored normalisation puts the
  reference policy's completions at 0, i.e. reward 0.5) or clip(score / scale, 0, 1).
- Mixture: clip(sum_k weight_k * reward_k, 0, 1) over several sources.

Every source also gives `raw`: the same weighted sum with a reward model's normalised score in place
of its squashed reward, and no clip. PPO optimises it (an unbounded score, as InstructGPT does), and
best-of-N picks by it (a clipped reward ties every score above `scale`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class RewardInputs:
    """N completions, prompt-major like a Rollout."""

    texts: list[str]  # [N] decoded completions
    prompt_ids: list[list[int]]  # [N]
    completion_ids: list[list[int]]  # [N] ragged; ends with EOS when the model stopped by itself
    finished: list[bool]  # [N]
    samples: list[Mapping[str, Any]]  # [N] what the verifiers see (Sample.fields())

    @classmethod
    def from_rollout(cls, ro, samples: Sequence[Mapping[str, Any]]) -> RewardInputs:
        """A multi-turn rollout's texts are its final assistant messages; its verifiers also see the
        whole conversation as the field `conversation` (the list of messages)."""
        if ro.conversations is not None:
            samples = [{**s, "conversation": c["messages"]} for s, c in zip(samples, ro.conversations)]
        return cls(ro.texts, ro.prompt_ids, ro.completion_ids, ro.finished, list(samples))


@dataclass
class Rewards:
    rewards: list[float]  # [N] in [0, 1]
    infos: list[dict[str, Any]]  # [N] per-source details (a verifier's label -> its info)
    metrics: dict[str, float] = field(default_factory=dict)
    scores: list[float] | None = None  # [N] a reward model's normalised scores, when one took part
    raw: list[float] | None = None  # [N] the weighted sum with the reward model's score unsquashed, unclipped

    def __post_init__(self) -> None:
        if self.raw is None:  # a source without a reward model: its reward is its raw score
            self.raw = list(self.rewards)


def score_rollout(source, ro, samples: Sequence[Mapping[str, Any]]) -> Rewards:
    """`source`'s rewards for a rollout; a multi-turn rollout's environment terms are added to each
    conversation's reward (and raw score), the sum is not clipped."""
    scored = source(RewardInputs.from_rollout(ro, samples))
    if ro.conversations is not None and any(c["env_reward"] for c in ro.conversations):
        extra = [c["env_reward"] for c in ro.conversations]
        scored.rewards = [r + e for r, e in zip(scored.rewards, extra)]
        scored.raw = [r + e for r, e in zip(scored.raw, extra)]
    return scored


class RewardSource(Protocol):
    def __call__(self, inputs: RewardInputs) -> Rewards: ...

    def close(self) -> None: ...


class VerifierRewards:
    def __init__(self, specs: Sequence[Any], fail_fast: bool = False, timeout: float = 120.0):
        from grpo.verifiers.compose import RewardFunction

        self.fn = RewardFunction(list(specs), fail_fast=fail_fast, timeout=timeout)
        self.closed = False

    @property
    def passes(self) -> bool:
        """Whether a reward of 1 is a pass (see RewardFunction.passes)."""
        return self.fn.passes

    def __call__(self, inputs: RewardInputs) -> Rewards:
        rewards, infos, metrics = self.fn(inputs.texts, inputs.samples)
        return Rewards(rewards, infos, metrics)

    def warmup(self) -> None:
        self.fn.warmup()

    def close(self) -> None:
        if not self.closed:  # a Mixture and its trainer may both close it
            self.closed = True
            self.fn.close()


def squash(scores: torch.Tensor, how: str = "sigmoid", scale: float = 1.0) -> torch.Tensor:
    """Reward-model scores [N] -> rewards [N] in [0, 1]."""
    if how == "sigmoid":
        return torch.sigmoid(scores / scale)
    if how == "clip":
        return (scores / scale).clamp(0.0, 1.0)
    raise ValueError(f"reward_model.squash={how!r}: use sigmoid or clip")


class ModelRewards:
    passes = False  # a squashed score: no reward of 1 is a pass
    def __init__(self, model, eos_id: int, pad_id: int, squash_fn: str = "sigmoid", scale: float = 1.0,
                 batch_size: int = 64, eos_ids: Sequence[int] = ()):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.eos_ids = {eos_id, *eos_ids}  # every id that ends a completion (the engines stop on each)
        self.how, self.scale, self.batch_size = squash_fn, scale, batch_size

    @classmethod
    def load(cls, path: str, tokenizer, device: str = "cpu", dtype: str = "float32", **kw) -> ModelRewards:
        """The reward model at `path`, scoring token ids of the policy's `tokenizer`: the two must
        share a vocabulary (the ids are fed as they are)."""
        from grpo.parts.modeling import ModelError, load_tokenizer
        from grpo.parts.reward_model import load_reward_model

        model = load_reward_model(path, dtype, device)
        rm_tok = load_tokenizer(path)
        if rm_tok.get_vocab() != tokenizer.get_vocab() or rm_tok.eos_token_id != tokenizer.eos_token_id:
            raise ModelError(f"reward_model.path={path!r}: its tokenizer differs from the policy's (vocabulary or "
                             "EOS), so it cannot score the policy's tokens: use a reward model built on the "
                             "policy's tokenizer")
        return cls(model, tokenizer.eos_token_id, tokenizer.pad_token_id, **kw)

    @torch.no_grad()
    def score(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]]) -> torch.Tensor:
        """Normalised scores [N] of prompt + completion + EOS, read at that EOS.

        A reward model is trained on responses that end with EOS, so the tokenizer's EOS is appended
        where a completion ends in none of the EOS ids the engines stop on (cut by a stop string, or
        at max_new_tokens: then the reward model judges the cut text as a whole answer; PPO's
        missing-EOS penalty is the tool against it).
        """
        from grpo.parts.reward_model import batch_sequences, sequence_scores

        device = next(self.model.parameters()).device
        out = []
        seqs = [list(p) + list(c) + ([] if c and c[-1] in self.eos_ids else [self.eos_id])
                for p, c in zip(prompt_ids, completion_ids)]
        for i in range(0, len(seqs), self.batch_size):
            ids, attn = batch_sequences(seqs[i:i + self.batch_size], self.pad_id)
            out.append(sequence_scores(self.model, ids.to(device), attn.to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, inputs: RewardInputs) -> Rewards:
        scores = self.score(inputs.prompt_ids, inputs.completion_ids)  # [N]
        rewards = squash(scores, self.how, self.scale)  # [N]
        metrics = {"rm/score/mean": float(scores.mean()), "rm/score/std": float(scores.std()) if len(scores) > 1 else 0.0,
                   "reward/rm/mean": float(rewards.mean())}
        infos = [{"rm": {"score": float(s)}} for s in scores]
        return Rewards(rewards.tolist(), infos, metrics, scores.tolist(), scores.tolist())

    def close(self) -> None:
        pass


class Mixture:
    """clip(sum_k weight_k * reward_k, 0, 1); weight 0 runs a source for its metrics only."""

    def __init__(self, parts: Sequence[tuple[float, Any]]):
        self.parts = list(parts)

    @property
    def passes(self) -> bool:
        """A reward of 1 is a pass only when every weighted part has passes (a reward model's
        squashed score has none)."""
        return all(getattr(src, "passes", False) for w, src in self.parts if w)

    def __call__(self, inputs: RewardInputs) -> Rewards:
        outs = [(w, src(inputs)) for w, src in self.parts]
        n = len(inputs.texts)
        total = [min(1.0, max(0.0, sum(w * o.rewards[i] for w, o in outs))) for i in range(n)]
        infos = [{k: v for _, o in outs for k, v in o.infos[i].items()} for i in range(n)]
        metrics = {k: v for _, o in outs for k, v in o.metrics.items()}
        scores = next((o.scores for _, o in outs if o.scores is not None), None)
        raw = [sum(w * o.raw[i] for w, o in outs) for i in range(n)]
        return Rewards(total, infos, metrics, scores, raw)

    def close(self) -> None:
        for _, src in self.parts:
            src.close()


def build_rewards(verifier_specs: Sequence[Any] | None, fail_fast: bool, timeout: float, rm_path: str | None,
                  tokenizer, device: str, dtype: str = "float32", rm_weight: float = 1.0,
                  verifier_weight: float = 0.0, squash_fn: str = "sigmoid", scale: float = 1.0,
                  batch_size: int = 64, eos_ids: Sequence[int] = ()
                  ) -> tuple[Any, VerifierRewards | None, ModelRewards | None]:
    """(training source, the task's verifiers, the reward model) from plain values.

    Without a reward model the training reward is the verifiers'. With one it is the reward
    model's, plus the verifiers' when verifier_weight != 0; the verifiers still measure the true
    score in evaluation either way.
    """
    verifiers = VerifierRewards(verifier_specs, fail_fast, timeout) if verifier_specs else None
    rm = None
    if rm_path:
        rm = ModelRewards.load(rm_path, tokenizer, device, dtype, squash_fn=squash_fn, scale=scale,
                               batch_size=batch_size, eos_ids=eos_ids)
    if rm is None:
        return verifiers, verifiers, None
    if verifiers is None or verifier_weight == 0:
        return (Mixture([(rm_weight, rm)]) if rm_weight != 1.0 else rm), verifiers, rm
    return Mixture([(rm_weight, rm), (verifier_weight, verifiers)]), verifiers, rm


def build_rewards_from(task: Mapping[str, Any], verifier, reward_model, tokenizer, device: str,
                       dtype: str = "float32", model_path: str | None = None):
    """build_rewards from the config groups (the task's `verifiers`, a VerifierConfig, a
    RewardModelConfig or None for no reward model): the config's edge for every command.
    `model_path` is the policy's, whose generation config names the EOS ids its completions may
    end with."""
    from grpo.parts.modeling import eos_ids

    if reward_model is None or not reward_model.path:
        return build_rewards(task.get("verifiers"), verifier.fail_fast, verifier.timeout, None, tokenizer, device)
    rm = reward_model
    ends = eos_ids(tokenizer, path=model_path) if model_path else ()
    return build_rewards(task.get("verifiers"), verifier.fail_fast, verifier.timeout, rm.path, tokenizer, device, dtype,
                         rm.weight, rm.verifier_weight, rm.squash, rm.scale, rm.batch_size, ends)
