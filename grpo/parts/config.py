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


class UserError(Exception):
    """A mistake in the command, config or data: reported in one line, exit status 2."""


def num(default: Any, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


def choice(default: str, *allowed: str) -> Any:
    return field(default=default, metadata={"choices": allowed})


def group(cls: type) -> Any:
    return field(default_factory=cls)


# ---- the groups every command shares ----------------------------------------------------------
@dataclass
class LoraConfig:
    """Low-rank adapters through peft (r = 0: off, the whole model trains)."""

    r: int = num(0, ge=0)
    alpha: float = num(16.0, gt=0)
    dropout: float = num(0.0, ge=0, le=1)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # peft's names; all-linear = every Linear but the LM head
    save_merged: bool = False  # checkpoints also hold merged/: base + adapters as one Hugging Face model


@dataclass
class ModelConfig:
    path: str = "embedded"
    dtype: str = choice("float32", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
    device: str = "auto"
    gradient_checkpointing: bool = False
    lora: LoraConfig = group(LoraConfig)


@dataclass
class ParallelConfig:
    """How the ranks of a torchrun launch share the work (grpo/parts/distributed.py); on one process
    only ref_on_cpu applies."""

    strategy: str = choice("ddp", "ddp", "fsdp2")
    mixed_precision: str = choice("auto", "auto", "bf16", "fp32")  # auto: bf16 compute, fp32 reduce on GPUs under fsdp2
    ref_on_cpu: bool = False  # the frozen models (reference, reward model) whole on the CPU, not beside the policy
    collective_timeout_s: float = num(1800.0, gt=0)  # how long a collective waits for a silent rank before the job ends
    silent_rank_warn_s: float = num(60.0, ge=0)  # log which rank has not answered for this long (0 = never)


@dataclass
class RolloutConfig:
    engine: str = choice("hf", "hf", "vllm", "server")
    temperature: float = num(1.0, ge=0)
    top_p: float = num(1.0, gt=0, le=1)
    top_k: int = num(0, ge=0)
    max_new_tokens: int = num(16, ge=1)
    stop: list[str] = field(default_factory=list)
    batch_size: int = num(256, ge=1)  # hf: completions per generate() call
    max_staleness: int = num(0, ge=0)  # grpo train, grpo ppo: step k trains on rollouts of the policy of step k - eta (0 = on-policy)
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
    # server only (see conf/rollout/server.yaml): generation by `grpo rollout serve` processes
    server_urls: list[str] = field(default_factory=list)
    server_weights_dir: str | None = None  # the trainer writes its weights here, the servers read them (files)
    server_timeout_s: float = num(600.0, gt=0)  # longest wait for a server's answer before it counts as gone
    server_token_file: str | None = None  # null: $GRPO_ROLLOUT_TOKEN, or the file $GRPO_ROLLOUT_TOKEN_FILE names
    server_weight_transfer: str = choice("files", "files", "nccl")  # nccl: vLLM's weight-transfer API (GPUs)
    server_nccl_host: str | None = None  # nccl: this trainer's address the servers reach (null: loopback servers)


@dataclass
class OptimConfig:
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
class LoggerConfig:
    backend: str = choice("jsonl", "jsonl", "wandb")
    project: str = "grpo"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = choice("auto", "auto", "online", "offline", "disabled")


@dataclass
class VerifierConfig:
    fail_fast: bool = False
    timeout: float = num(120.0, gt=0)


@dataclass
class RewardModelConfig:
    """A learned reward model as (part of) the training reward; see grpo/parts/reward_sources.py."""

    path: str | None = None  # null = no reward model; `embedded-rm` = the shipped one
    weight: float = 1.0  # reward = clip(weight * squash(score) + verifier_weight * verifiers, 0, 1)
    verifier_weight: float = 0.0  # 0 = task.verifiers only measure (eval); > 0 = they add to the reward
    squash: str = choice("sigmoid", "sigmoid", "clip")
    scale: float = num(1.0, gt=0)  # sigmoid(score / scale), or clip(score / scale, 0, 1)
    batch_size: int = num(64, ge=1)


# ---- the trainer groups: length, seed, resume, checkpoints, evaluation ---------------------------
@dataclass
class TrainerConfig:
    """What every training loop's run (grpo/parts/run.py) reads from `trainer`."""

    max_steps: int = num(120, ge=0)
    save_every: int = num(40, ge=0)  # steps between checkpoints (also after the last); 0 = only at the end
    keep_checkpoints: int = num(2, ge=0)
    seed: int = 0
    resume: Any = False  # true | false | a checkpoint path


@dataclass
class RLTrainerConfig(TrainerConfig):
    """The RL loops' (grpo ppo, grpo train): prompts per step, evaluation."""

    prompts_per_step: int = num(16, ge=1)
    eval_every: int = num(20, ge=0)
    eval_size: int = num(128, ge=1)
    system_prompt: str | None = None
    log_samples: int = num(8, ge=0)
    logprob_chunk: int = num(0, ge=0)  # tokens per LM-head chunk of the log-probs (memory [chunk, V]); 0 = all at once


@dataclass
class PPOTrainerConfig(RLTrainerConfig):
    max_steps: int = num(100, ge=0)
    save_every: int = num(0, ge=0)
    prompts_per_step: int = num(32, ge=1)


@dataclass
class GRPOTrainerConfig(RLTrainerConfig):
    micro_batch_size: int = num(0, ge=0)  # rows per forward/backward; 0 = all at once
    max_tokens_per_batch: int = num(0, ge=0)  # tokens per forward/backward (padding counted); 0 = no limit
    shared_prompt: bool = True  # each group's prompt computed once (where the model allows)


@dataclass
class SupervisedTrainerConfig(TrainerConfig):
    """The supervised loops' (sft, rm, dpo): steps over batches of rows drawn with replacement."""

    max_steps: int = num(1000, ge=0)
    save_every: int = num(0, ge=0)
    batch_size: int = num(32, ge=1)
    log_every: int = num(50, ge=1)


@dataclass
class RMTrainerConfig(SupervisedTrainerConfig):
    micro_batch_size: int = num(0, ge=0)  # prompts per forward/backward; 0 = the whole batch
    eval_every: int = num(50, ge=0)


@dataclass
class DPOTrainerConfig(SupervisedTrainerConfig):
    micro_batch_size: int = num(0, ge=0)  # pairs per forward/backward; 0 = the whole batch
    eval_every: int = num(25, ge=0)
    eval_size: int = num(128, ge=1)
    log_samples: int = num(8, ge=0)
    system_prompt: str | None = None  # for the evaluation prompts, as in training
    logprob_chunk: int = num(0, ge=0)  # tokens per LM-head chunk of the log-probs (memory [chunk, V]); 0 = all at once


@dataclass
class SamplingConfig:
    """What grpo eval and grpo bon take from `trainer`."""

    seed: int = 0
    system_prompt: str | None = None


# ---- the algorithm groups ------------------------------------------------------------------------
@dataclass
class GRPOAlgorithmConfig:
    group_size: int = num(8, ge=1)
    beta: float = num(0.01, ge=0)
    kl_estimator: str = choice("k3", "k1", "k2", "k3")
    clip_low: float = num(0.2, ge=0)
    clip_high: float = num(0.2, ge=0)
    epochs: int = num(1, ge=1)
    adv_estimator: str = choice("grpo", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
    adv_scale: str | None = choice(None, "group", "batch", "none")  # grpo's std division; null = group
    adv_eps: float = num(1e-4, ge=0)
    gamma: float = num(1.0, ge=0, le=1)  # reinforce_pp's discount
    loss: str = choice("ppo", "ppo", "cispo")
    is_level: str = choice("token", "token", "sequence", "sequence_token")
    seq_clip_low: float = num(3e-4, ge=0)  # the clip range when is_level is not token (GSPO)
    seq_clip_high: float = num(4e-4, ge=0)
    loss_agg: str = choice("token_mean", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                           "seq_mean_token_sum_norm")
    tis_cap: float = num(0.0, ge=0)
    mismatch: str = choice("none", "none", "token", "sequence", "geometric")
    mismatch_low: float = num(0.5, ge=0)
    mismatch_high: float = num(2.0, gt=0)
    dynamic_sampling: bool = False  # DAPO: train only on groups whose rewards differ
    max_gen_batches: int = num(3, ge=1)  # rollouts a step may take to fill its B groups
    overlong_cache: int = num(0, ge=0)  # DAPO's L_c in tokens; 0 = no overlong penalty
    overlong_filter: bool = False  # leave completions cut at the token budget out of the loss
    behav_cap: float = num(5.0, ge=1)  # rollout.max_staleness > 0: the behaviour weight min(pi_prox / mu, cap)


@dataclass
class PPOAlgorithmConfig:
    samples: int = num(1, ge=1)  # completions per prompt
    epochs: int = num(2, ge=1)  # passes over each batch
    minibatches: int = num(2, ge=1)  # per epoch
    clip: float = num(0.2, gt=0)
    value_clip: float = num(0.2, gt=0)
    vf_coef: float = num(0.1, ge=0)
    gamma: float = num(1.0, ge=0, le=1)
    lam: float = num(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    kl_estimator: str = choice("k1", "k1", "k3")
    beta: float = num(0.05, ge=0)  # the KL coefficient (the initial one with kl_target)
    kl_target: float | None = num(None, gt=0)  # per-sequence KL (nats); null = fixed beta
    kl_horizon: float = num(10000.0, gt=0)
    missing_eos_penalty: float | None = num(None, ge=0)  # subtracted from the score of a cut completion
    score_clip: float | None = num(None, gt=0)  # clip scores to [-c, c]
    critic_warmup_steps: int = num(0, ge=0)  # steps that train the critic only
    value: str = choice("separate", "separate", "shared")  # a critic of its own, or a head on the policy
    value_model: str | None = None  # the critic's init (a reward model); null = reward_model.path
    value_lr: float | None = num(None, ge=0)  # null = optim.lr
    ptx_coef: float = num(0.0, ge=0)  # PPO-ptx gamma
    ptx_path: str | None = None  # prompt/completion rows (as grpo sft reads) for the ptx LM loss
    ptx_batch_size: int = num(8, ge=1)
    behav_cap: float = num(5.0, ge=1)  # rollout.max_staleness > 0: the behaviour weight min(pi_prox / mu, cap)


@dataclass
class DPOAlgorithmConfig:
    beta: float = num(0.1, gt=0)
    loss: str = choice("sigmoid", "sigmoid", "robust", "ipo")  # grpo.algorithm.preference_losses.DPO_LOSSES
    label_smoothing: float = num(0.0, ge=0, le=0.49)
    nll_coef: float = num(0.0, ge=0)  # + coef x token-mean NLL of the chosen completions
    precompute_ref: bool = False


@dataclass
class RMLossConfig:
    center_coef: float = num(0.0, ge=0)  # + coef * mean((s_chosen + s_rejected)^2): keeps scores near 0
    normalize: bool = True  # store a bias so the training responses score 0 on average (not for scores data)
    normalize_scale: bool = False  # and a scale so they have std 1
    normalize_samples: int = num(4096, ge=2)  # training responses scored for the normaliser
    eval_batch_size: int = num(256, ge=1)


@dataclass
class BonSamplingConfig:
    n: int = num(16, ge=1)  # N samples per prompt
    split: str = choice("eval", "eval", "train")  # eval = held-out prompts; train = training prompts (SFT data)
    prompts: int = num(128, ge=1)  # at most this many prompts
    output: str | None = None  # null = <run dir>/best_of_n.jsonl (summary beside it)


@dataclass
class EvalSamplingConfig:
    samples: int = num(8, ge=1)
    temperature: float | None = num(1.0, ge=0)
    max_prompts: int | None = None
    output: str | None = None


# ---- the data groups -----------------------------------------------------------------------------
@dataclass
class SFTDataConfig:
    path: str = ""
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    system_prompt: str | None = None


@dataclass
class PreferenceDataConfig:
    path: str = "embedded-prefs"  # pairs or rankings (scores for grpo rm); the built-in task's rankings by default
    split: str = "train"  # hub datasets only
    config: str | None = None
    system_prompt: str | None = None
    max_length: int | None = num(None, ge=2)  # longer rows are dropped (counted); null = the model's limit


@dataclass
class RMDataConfig(PreferenceDataConfig):
    # Held-out data; null = embedded-prefs-eval for the built-in data, else eval_fraction of path's prompts.
    eval_path: str | None = None
    eval_fraction: float = num(0.05, ge=0, le=0.5)
    eval_split: str = "test"  # hub datasets only, for eval_path


# ---- one schema per command ------------------------------------------------------------------------
@dataclass
class TrainConfig:
    model: ModelConfig = group(ModelConfig)
    task: dict = field(default_factory=dict)  # the task's own constructor arguments: it checks them
    rollout: RolloutConfig = group(RolloutConfig)
    algorithm: GRPOAlgorithmConfig = group(GRPOAlgorithmConfig)
    trainer: GRPOTrainerConfig = group(GRPOTrainerConfig)
    optim: OptimConfig = group(OptimConfig)
    logger: LoggerConfig = group(LoggerConfig)
    verifier: VerifierConfig = group(VerifierConfig)
    reward_model: RewardModelConfig = group(RewardModelConfig)
    parallel: ParallelConfig = group(ParallelConfig)


@dataclass
class PPOConfig:
    model: ModelConfig = group(ModelConfig)
    task: dict = field(default_factory=dict)
    rollout: RolloutConfig = group(RolloutConfig)
    reward_model: RewardModelConfig = group(RewardModelConfig)
    ppo: PPOAlgorithmConfig = group(PPOAlgorithmConfig)
    trainer: PPOTrainerConfig = group(PPOTrainerConfig)
    optim: OptimConfig = group(OptimConfig)
    logger: LoggerConfig = group(LoggerConfig)
    verifier: VerifierConfig = group(VerifierConfig)
    parallel: ParallelConfig = group(ParallelConfig)


@dataclass
class DPOConfig:
    model: ModelConfig = group(ModelConfig)
    task: dict = field(default_factory=dict)  # the held-out prompts and the verifiers of evaluation
    rollout: RolloutConfig = group(RolloutConfig)
    data: PreferenceDataConfig = group(PreferenceDataConfig)
    dpo: DPOAlgorithmConfig = group(DPOAlgorithmConfig)
    trainer: DPOTrainerConfig = group(DPOTrainerConfig)
    optim: OptimConfig = group(OptimConfig)
    logger: LoggerConfig = group(LoggerConfig)
    verifier: VerifierConfig = group(VerifierConfig)
    parallel: ParallelConfig = group(ParallelConfig)


@dataclass
class RMConfig:
    model: ModelConfig = group(ModelConfig)
    data: RMDataConfig = group(RMDataConfig)
    rm: RMLossConfig = group(RMLossConfig)
    trainer: RMTrainerConfig = group(RMTrainerConfig)
    optim: OptimConfig = group(OptimConfig)
    logger: LoggerConfig = group(LoggerConfig)
    parallel: ParallelConfig = group(ParallelConfig)


@dataclass
class SFTConfig:
    model: ModelConfig = group(ModelConfig)
    data: SFTDataConfig = group(SFTDataConfig)
    trainer: SupervisedTrainerConfig = group(SupervisedTrainerConfig)
    optim: OptimConfig = group(OptimConfig)
    logger: LoggerConfig = group(LoggerConfig)
    parallel: ParallelConfig = group(ParallelConfig)


@dataclass
class BonConfig:
    model: ModelConfig = group(ModelConfig)
    task: dict = field(default_factory=dict)
    rollout: RolloutConfig = group(RolloutConfig)
    reward_model: RewardModelConfig = group(RewardModelConfig)
    bon: BonSamplingConfig = group(BonSamplingConfig)
    trainer: SamplingConfig = group(SamplingConfig)
    verifier: VerifierConfig = group(VerifierConfig)


@dataclass
class EvalConfig:
    model: ModelConfig = group(ModelConfig)
    task: dict = field(default_factory=dict)
    rollout: RolloutConfig = group(RolloutConfig)
    eval: EvalSamplingConfig = group(EvalSamplingConfig)
    trainer: SamplingConfig = group(SamplingConfig)
    verifier: VerifierConfig = group(VerifierConfig)


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
