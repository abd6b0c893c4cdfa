"""Rollout engines (hf, vllm) behind one interface, and the helpers that feed them."""

from __future__ import annotations

from grpo.config import ConfigError
from grpo.rollout.base import SamplingParams
from grpo.tasks.base import render_prompt


def build_engine(rollout, model, tokenizer, path: str, dtype: str = "float32", device: str = "auto"):
    """The engine named by `rollout.engine` (a config.Rollout) around the trainer's own model."""
    if rollout.engine == "hf":
        from grpo.rollout.hf import HFEngine

        return HFEngine(model, tokenizer, batch_size=rollout.batch_size)
    if rollout.engine == "vllm":
        try:
            from grpo.rollout.vllm import VLLMEngine  # the only place vllm is imported
        except ImportError as e:  # its message says how to install vLLM
            raise ConfigError(str(e)) from e
        return VLLMEngine(model, tokenizer, path, dtype, device, **rollout.engine_options())
    raise ConfigError(f"rollout.engine={rollout.engine!r}: use hf or vllm")


def sampling_params(rollout, greedy: bool = False) -> SamplingParams:
    return SamplingParams(temperature=0.0 if greedy else float(rollout.temperature), top_p=float(rollout.top_p),
                          top_k=int(rollout.top_k), max_new_tokens=int(rollout.max_new_tokens), stop=list(rollout.stop))


def encode_prompts(tokenizer, samples, system_prompt: str | None = None) -> list[list[int]]:
    """Prompt token ids as the engines see them: chat template applied, no extra special tokens."""
    return [tokenizer(render_prompt(tokenizer, s, system_prompt), add_special_tokens=False)["input_ids"]
            for s in samples]
