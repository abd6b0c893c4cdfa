"""Typed schemas for every config group, checked once when a command starts.

Hydra composes a plain dict from conf/; `parse(Schema, cfg)` turns it into dataclasses, checking
each value's type and range and refusing unknown keys, with one line that names the key:

    trainer.prompts_per_step=0: must be a whole number >= 1

From there on the loops read attributes (`cfg.trainer.max_steps`) and builders take plain values.
Groups whose options belong to a plug-in (`task`: its `_target_`'s constructor arguments) stay
dicts: the plug-in checks them. A field's range and choices live in its metadata:

    lr: float = num(2e-4, ge=0)       choice("hf", "hf", "vllm")
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work; raised before training starts."""


def num(default: Any, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


def choice(default: str, *allowed: str) -> Any:
    return field(default=default, metadata={"choices": allowed})


def group(cls: type) -> Any:
    return field(default_factory=cls)


# ---- the groups -------------------------------------------------------------------------------
@dataclass
class Lora:
    """Low-rank adapters through peft (r = 0: off, the whole model trains)."""

    r: int = num(0, ge=0)
    alpha: float = num(16.0, gt=0)
    dropout: float = num(0.0, ge=0, le=1)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # peft's names; all-linear = every Linear but the LM head
    save_merged: bool = False  # checkpoints also hold merged/: base + adapters as one Hugging Face model


@dataclass
class Model:
    path: str = "embedded"
    dtype: str = choice("float32", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
    device: str = "auto"
    gradient_checkpointing: bool = False
    lora: Lora = group(Lora)


@dataclass
class Parallel:
    """How the ranks of a torchrun launch share the work (see grpo/distributed.py); on one process
    only ref_on_cpu applies."""

    strategy: str = choice("ddp", "ddp", "fsdp2")
    mixed_precision: str = choice("auto", "auto", "bf16", "fp32")  # auto: bf16 compute, fp32 reduce on GPUs under fsdp2
    ref_on_cpu: bool = False  # the frozen models (reference, reward model) whole on the CPU, not beside the policy


@dataclass
class Rollout:
    engine: str = choice("hf", "hf", "vllm")
    temperature: float = num(1.0, ge=0)
    top_p: float = num(1.0, gt=0, le=1)
    top_k: int = num(0, ge=0)
    max_new_tokens: int = num(16, ge=1)
    stop: list[str] = field(default_factory=list)
    batch_size: int = num(256, ge=1)  # hf: completions per generate() call
    # vllm only (see conf/rollout/vllm.yaml)
    max_model_len: int | None = None
    max_num_seqs: int = num(256, ge=1)
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    engine_seed: int = 0
    kv_cache_gib: float = num(0.25, gt=0)
    gpu_memory_utilization: float = num(0.3, gt=0, le=1)
    tensor_parallel_size: int = num(1, ge=1)
    sleep_level: int = num(0, ge=0, le=2)

    def engine_options(self) -> dict[str, Any]:
        """The engine's own options, as keyword arguments for its constructor."""
        skip = {"engine", "batch_size", "stop", "max_new_tokens"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class Optim:
    name: str = choice("adamw", "adamw", "sgd")  # sgd: plain SGD (no momentum), for checks and ablations
    lr: float = num(2e-4, ge=0)
    weight_decay: float = num(0.0, ge=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = num(5, ge=0)
    max_grad_norm: float = num(1.0, gt=0)
    # transformers' schedule names: constant_with_warmup, linear, cosine, cosine_with_min_lr, ...
    schedule: str = "constant_with_warmup"
    min_lr_rate: float = num(0.1, ge=0, le=1)  # cosine_with_min_lr: the floor, as a share of lr


@dataclass
class Logger:
    backend: str = choice("jsonl", "jsonl", "wandb")
    project: str = "grpo"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = choice("auto", "auto", "online", "offline", "disabled")


@dataclass
class Verifier:
    fail_fast: bool = False
    timeout: float = num(120.0, gt=0)


@dataclass
class RewardModel:
    """A learned reward model as (part of) the training reward; see grpo/rewards.py."""

    path: str | None = None  # null = no reward model; `embedded-rm` = the shipped one
    weight: float = 1.0  # reward = clip(weight * squash(score) + verifier_weight * verifiers, 0, 1)
    verifier_weight: float = 0.0  # 0 = task.verifiers only measure (eval); > 0 = they add to the reward
    squash: str = choice("sigmoid", "sigmoid", "clip")
    scale: float = num(1.0, gt=0)  # sigmoid(score / scale), or clip(score / scale, 0, 1)
    batch_size: int = num(64, ge=1)

    def judge_options(self) -> dict[str, Any]:
        return {"rm_weight": self.weight, "verifier_weight": self.verifier_weight, "squash_fn": self.squash,
                "scale": self.scale, "batch_size": self.batch_size}


@dataclass
class GRPOAlgorithm:
    group_size: int = num(8, ge=1)
    beta: float = num(0.01, ge=0)
    kl_estimator: str = choice("k3", "k1", "k2", "k3")
    clip_low: float = num(0.2, ge=0)
    clip_high: float = num(0.2, ge=0)
    epochs: int = num(1, ge=1)
    adv_scale: str = choice("group", "group", "batch", "none")
    adv_eps: float = num(1e-4, ge=0)
    loss_agg: str = choice("token_mean", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                           "seq_mean_token_sum_norm")
    tis_cap: float = num(0.0, ge=0)


@dataclass
class Trainer:
    """The RL loops' (grpo train): length, evaluation, checkpoints, seed, resume."""

    max_steps: int = num(120, ge=0)
    prompts_per_step: int = num(16, ge=1)
    micro_batch_size: int = num(0, ge=0)  # rows per forward/backward; 0 = all at once
    max_tokens_per_batch: int = num(0, ge=0)  # tokens per forward/backward (padding counted); 0 = no limit
    shared_prompt: bool = True  # grpo train: each group's prompt computed once (where the model allows)
    eval_every: int = num(20, ge=0)
    eval_size: int = num(128, ge=1)
    save_every: int = num(40, ge=0)
    keep_checkpoints: int = num(2, ge=0)
    seed: int = 0
    resume: Any = False  # true | false | a checkpoint path
    system_prompt: str | None = None
    log_samples: int = num(8, ge=0)


@dataclass
class SupervisedTrainer:
    """The supervised loops' (sft, rm): steps over batches of rows drawn with replacement."""

    max_steps: int = num(1000, ge=0)
    batch_size: int = num(32, ge=1)
    log_every: int = num(50, ge=1)
    save_every: int = num(0, ge=0)
    keep_checkpoints: int = num(2, ge=0)
    seed: int = 0
    resume: Any = False


@dataclass
class RMTrainer(SupervisedTrainer):
    micro_batch_size: int = num(0, ge=0)  # prompts per forward/backward; 0 = the whole batch
    eval_every: int = num(50, ge=0)


@dataclass
class Sampling:
    """What grpo eval and grpo bon take from `trainer`."""

    seed: int = 0
    system_prompt: str | None = None


@dataclass
class TrainConfig:
    model: Model = group(Model)
    task: dict = field(default_factory=dict)
    rollout: Rollout = group(Rollout)
    algorithm: GRPOAlgorithm = group(GRPOAlgorithm)
    trainer: Trainer = group(Trainer)
    optim: Optim = group(Optim)
    logger: Logger = group(Logger)
    verifier: Verifier = group(Verifier)
    reward_model: RewardModel = group(RewardModel)
    parallel: Parallel = group(Parallel)


@dataclass
class SFTData:
    path: str = ""
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    system_prompt: str | None = None


@dataclass
class SFTConfig:
    model: Model = group(Model)
    data: SFTData = group(SFTData)
    trainer: SupervisedTrainer = group(SupervisedTrainer)
    optim: Optim = group(Optim)
    logger: Logger = group(Logger)
    parallel: Parallel = group(Parallel)


@dataclass
class Eval:
    samples: int = num(8, ge=1)
    temperature: float | None = num(1.0, ge=0)
    max_prompts: int | None = None
    output: str | None = None


@dataclass
class EvalConfig:
    model: Model = group(Model)
    task: dict = field(default_factory=dict)
    rollout: Rollout = group(Rollout)
    eval: Eval = group(Eval)
    trainer: Sampling = group(Sampling)
    verifier: Verifier = group(Verifier)


# ---- parsing ----------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bounds(meta: Any) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<="}
    return "".join(f" {words[k]} {meta[k]}" for k in ("ge", "gt", "le") if meta.get(k) is not None)


def _convert(v: Any, tp: Any, where: str, meta: Any = None) -> Any:
    meta = meta or {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is dict:
        return v
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(v, inner[0], where, meta)
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: must be a group of keys, got {v!r}")
        return parse(tp, v, where)
    if origin is list:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}={v!r}: must be a list")
        return [_convert(x, args[0], f"{where}[{i}]") for i, x in enumerate(v)] if args else list(v)
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}={v!r}: must be true or false")
        return v
    if tp is int:
        if not _is_number(v) or not float(v).is_integer():
            raise ConfigError(f"{where}={v!r}: must be a whole number{_bounds(meta)}")
        return int(v)
    if tp is float:
        if not _is_number(v):
            raise ConfigError(f"{where}={v!r}: must be a number{_bounds(meta)}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where}={v!r}: must be a string")
        return v
    return v


def _check_range(v: Any, meta: Any, where: str) -> None:
    if v is None:
        return
    if meta.get("choices") and v not in meta["choices"]:
        raise ConfigError(f"{where}={v!r}: use one of {', '.join(meta['choices'])}")
    for key, ok in (("ge", lambda a, b: a >= b), ("gt", lambda a, b: a > b), ("le", lambda a, b: a <= b)):
        if meta.get(key) is not None and not ok(v, meta[key]):
            kind = "a whole number" if isinstance(v, int) else "a number"
            raise ConfigError(f"{where}={v!r}: must be {kind}{_bounds(meta)}")


def parse(schema: type, cfg: dict[str, Any], prefix: str = "") -> Any:
    """cfg -> an instance of the dataclass `schema`; unknown keys and bad values raise ConfigError."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(cfg) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(fields))})")
    values = {}
    for name, f in fields.items():
        if name not in cfg:
            continue  # the default
        where = f"{prefix}.{name}" if prefix else name
        values[name] = _convert(cfg[name], hints[name], where, f.metadata)
        _check_range(values[name], f.metadata, where)
    return schema(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A parsed config back to plain values (for logging it, e.g. to wandb)."""
    return dataclasses.asdict(cfg)
