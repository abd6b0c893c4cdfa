"""Rollout engines (hf, vllm, server) behind one interface, and the helpers that feed them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from grpo.parts.config import ConfigError
from grpo.parts.rollout.base import SamplingParams
from grpo.tasks.base import Sample, render_prompt


def build_engine(engine: str, model, tokenizer, path: str, dtype: str = "float32", device: str = "auto", *,
                 batch_size: int = 256, max_new_tokens: int = 16, prompts: Callable[[], Iterable[Sample]] | None = None,
                 system_prompt: str | None = None, par=None, wrapped=None, tools: list | None = None,
                 **vllm_options: Any):
    """The engine named `engine` ("hf", "vllm" or "server") around the trainer's own model.

    hf: `batch_size` completions per decoding batch. vllm: `vllm_options` are VLLMEngine's keyword
    arguments (the sampling options that decide its log-prob mode, and the engine's own: context,
    cache, seed, GPU share ...). ``prompts`` gives the samples (rendered with `tools`, a multi-turn
    environment's) the engine will be asked to continue
    (called only for vLLM, when `max_model_len` is not given): vLLM reserves KV cache for its whole
    context, so the context is sized from the longest of them plus `max_new_tokens` rather than from
    the model's maximum (131072 positions for a Llama-3 would need more cache than a CPU run has).

    Under torchrun (`par`) every rank has an engine of its own. With parallel=fsdp2 the hf engine
    runs `wrapped` (the sharded model's wrapper) in lockstep with the other ranks; vLLM gets the
    whole weights pushed (push_weights).

    server: generation by `grpo rollout serve` processes (grpo/parts/rollout/remote.py); `vllm_options`
    are then the server_* keys of the rollout group (urls, weights_dir, timeout_s, token_file). Under
    torchrun every rank sends its own share to the servers, and rank 0 alone writes the weights."""
    from grpo.parts.distributed import Lockstep

    if engine == "server":
        from grpo.parts.rollout.remote import ServerEngine

        many = par is not None and par.world > 1
        return ServerEngine(model, **vllm_options, lockstep=Lockstep(par, tokenizer.pad_token_id) if many else None)
    if engine == "hf":
        from grpo.parts.rollout.hf import HFEngine

        if par is not None and par.sharded:
            return HFEngine(wrapped, tokenizer, batch_size=batch_size, lockstep=Lockstep(par, tokenizer.pad_token_id))
        return HFEngine(model, tokenizer, batch_size=batch_size)
    if engine == "vllm":
        try:
            from grpo.parts.rollout.vllm import VLLMEngine  # the only place vllm is imported
        except ImportError as e:  # its message says how to install vLLM
            raise ConfigError(str(e)) from e
        opts = dict(vllm_options)
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if not opts.get("max_model_len") and prompts is not None:
            longest = max((len(p) for p in encode_prompts(tokenizer, prompts(), system_prompt, tools)), default=0)
            opts["max_model_len"] = context_length(longest, max_new_tokens, limit)
        length = opts.get("max_model_len") or limit
        on_gpu = device != "cpu" and _cuda()
        if not on_gpu:
            check_kv_cache(model.config, dtype, length, opts.get("kv_cache_gib", 0.25))
        try:
            return VLLMEngine(model, tokenizer, path, dtype, device, **opts)
        except RuntimeError as e:
            if "initialization failed" not in str(e):
                raise
            budget = "rollout.gpu_memory_utilization" if on_gpu else "rollout.kv_cache_gib"
            raise ConfigError(f"rollout=vllm: the engine did not start with rollout.max_model_len={length} (the "
                              f"reason is in vLLM's log above): lower rollout.max_model_len or raise {budget}") from e
    raise ConfigError(f"rollout.engine={engine!r}: use hf, vllm or server")


# The rollout group's keys that are not the vLLM engine's own options (the trainer's, the server engine's).
_NOT_VLLM_OPTIONS = ("engine", "batch_size", "stop", "max_new_tokens", "max_staleness")
_SERVER_PREFIX = "server_"


def build_engine_from(rollout, model, tokenizer, path: str, dtype: str = "float32", device: str = "auto",
                      prompts: Callable[[], Iterable[Sample]] | None = None, system_prompt: str | None = None,
                      par=None, wrapped=None, tools: list | None = None, engine_options: dict | None = None):
    """build_engine from the `rollout` config group (a RolloutConfig): the config's edge for every command.
    `engine_options` are the engine's own beyond the group's (a rollout server's weight transfer)."""
    import dataclasses

    keys = dataclasses.asdict(rollout)
    vllm = {k: v for k, v in keys.items() if k not in _NOT_VLLM_OPTIONS and not k.startswith(_SERVER_PREFIX)}
    server = {k[len(_SERVER_PREFIX):]: v for k, v in keys.items() if k.startswith(_SERVER_PREFIX)}
    options = {**{"vllm": vllm, "server": server}.get(rollout.engine, {}), **(engine_options or {})}
    return build_engine(rollout.engine, model, tokenizer, path, dtype, device, batch_size=rollout.batch_size,
                        max_new_tokens=rollout.max_new_tokens, prompts=prompts, system_prompt=system_prompt, par=par,
                        wrapped=wrapped, tools=tools, **options)


def whole_parameters(model) -> Iterable[tuple[str, Any]]:
    """(name, tensor) of the trainer's model as an engine loads it: whole tensors (gathered from the
    shards under fsdp2: every rank must run through all of them), LoRA adapters merged in."""
    import torch

    from grpo.parts.distributed import full_tensor
    from grpo.parts.modeling import merged_parameters

    with torch.no_grad():
        for name, p in merged_parameters(model):
            yield name, full_tensor(p.detach())


def push_weights(engine, model) -> None:
    """The trainer's updated weights to the engine. The hf engine runs the trainer's own module:
    nothing to send."""
    from grpo.parts.rollout.hf import HFEngine

    engine = getattr(engine, "engine", engine)  # a multi-turn engine's own
    if not isinstance(engine, HFEngine):
        engine.update_weights(whole_parameters(model))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def context_length(longest_prompt: int, max_new_tokens: int, limit: int | None) -> int:
    """The default vLLM context: the longest prompt plus the completion, rounded up to a multiple of
    256 (room for a procedural task's longer draws), at most the model's own limit."""
    need = -(-(longest_prompt + max_new_tokens) // 256) * 256
    return min(need, limit) if limit else need


def kv_cache_bytes(config, dtype: str, tokens: int) -> int | None:
    """Bytes of K and V cache for `tokens` positions of a model with full attention in every layer
    (None where the config does not say, or uses sliding windows, whose cache is smaller)."""
    from grpo.parts.modeling import torch_dtype

    c = config.get_text_config()
    layers, heads = getattr(c, "num_hidden_layers", None), getattr(c, "num_attention_heads", None)
    if not layers or not heads or getattr(c, "sliding_window", None):
        return None
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * torch_dtype(dtype).itemsize * tokens


def check_kv_cache(config, dtype: str, tokens: int | None, kv_cache_gib: float) -> None:
    """On CPU the cache is a fixed budget: a context that cannot fit is one line before vLLM starts."""
    need = kv_cache_bytes(config, dtype, tokens) if tokens else None
    have = float(kv_cache_gib) * (1 << 30)
    if need is not None and need > have:
        fits = int(have // (need // tokens)) // 256 * 256
        raise ConfigError(f"rollout=vllm: a context of rollout.max_model_len={tokens} tokens needs "
                          f"{need / (1 << 30):.2f} GiB of KV cache, more than rollout.kv_cache_gib={kv_cache_gib}: "
                          f"lower rollout.max_model_len (at most {fits} fits) or raise rollout.kv_cache_gib")


def task_prompts(task, scan: int = 1024) -> list[Sample]:
    """The samples a run on `task` may prompt with: every row of a task that holds its rows (a file),
    the first `scan` draws of a procedural one, and the held-out rows."""
    rows = getattr(task, "train", None)
    train = rows if isinstance(rows, list) else [task.train_sample(i) for i in range(scan)]
    return [*train, *task.eval_samples()]


def sampling_params(rollout, greedy: bool = False) -> SamplingParams:
    return SamplingParams(temperature=0.0 if greedy else float(rollout.temperature), top_p=float(rollout.top_p),
                          top_k=int(rollout.top_k), max_new_tokens=int(rollout.max_new_tokens), stop=list(rollout.stop))


def encode_prompts(tokenizer, samples, system_prompt: str | None = None, tools: list | None = None) -> list[list[int]]:
    """Prompt token ids as the engines see them: chat template applied (with the tools' schemas, for
    an engine that holds conversations with tools: `tools_of(engine)`), no extra special tokens."""
    return [tokenizer(render_prompt(tokenizer, s, system_prompt, tools), add_special_tokens=False)["input_ids"]
            for s in samples]


def tools_of(engine) -> list | None:
    """The JSON schemas of the tools a multi-turn engine's environment offers (None: no tools)."""
    return getattr(engine, "tools", None)
