"""Loading models and the one forward helper that turns sequences into token log-probs."""

from __future__ import annotations

from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # what the package ships: models and preference data
EMBEDDED_MODEL_DIR = DATA_DIR / "embedded_model"
EMBEDDED_CODE_MODEL_DIR = DATA_DIR / "embedded_code_model"  # warm-started on task=code
EMBEDDED_CHAT_MODEL_DIR = DATA_DIR / "embedded_chat_model"  # the preference task's policy
EMBEDDED_RM_DIR = DATA_DIR / "embedded_rm"  # `grpo rm` on the built-in preference task
EMBEDDED_TOOLS_MODEL_DIR = DATA_DIR / "embedded_tools_model"  # calls the python tool (+experiment=tools)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class ModelError(ValueError):
    """A model path or option that cannot work; the message says which and why."""


# The models shipped in the package: name -> (folder, the command that rebuilds it).
EMBEDDED = {
    "embedded": (EMBEDDED_MODEL_DIR, "make embedded-model"),
    "embedded-code": (EMBEDDED_CODE_MODEL_DIR, "python -m grpo.commands.embedded --task code"),
    "embedded-chat": (EMBEDDED_CHAT_MODEL_DIR, "python -m grpo.commands.embedded --task chat"),
    "embedded-rm": (EMBEDDED_RM_DIR, "make embedded-rm"),
    "embedded-tools": (EMBEDDED_TOOLS_MODEL_DIR, "python -m grpo.commands.embedded --task tools"),
}


def resolve_model_path(path: str, key: str = "model.path") -> str:
    """A name of EMBEDDED -> its folder in the package; a local dir must exist; else a hub id. `key`:
    the setting the path came from, which an error names."""
    name = path or "embedded"
    if name in EMBEDDED:
        folder, rebuild = EMBEDDED[name]
        if not (folder / "config.json").exists():
            raise ModelError(f"the shipped model {name!r} is missing from {folder}: rebuild it with `{rebuild}`")
        return str(folder)
    p = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or p.exists() or path.count("/") > 1
    if looks_local:
        if not p.is_dir():
            raise ModelError(f"{key}={path!r}: no such directory")
        if not (p / "config.json").exists():
            raise ModelError(f"{key}={path!r}: no config.json in that directory (not a Hugging Face model)")
        return str(p)
    return path  # a hub id such as Qwen/Qwen2.5-0.5B-Instruct


def resolve_model_dir(path: str) -> str:
    """A model dir as is; a checkpoint dir (…/step_N) -> its model/; a run dir -> its newest checkpoint."""
    p = Path(str(path)).expanduser()
    if not p.is_dir() or (p / "config.json").exists():
        return str(path)
    if (p / "model" / "config.json").exists():
        return str(p / "model")
    latest = p / "checkpoints" / "latest"
    if latest.exists():
        model = latest.parent / latest.read_text().strip() / "model"
        if (model / "config.json").exists():
            return str(model)
    return str(path)  # load_model explains what is missing


def pick_device(name: str) -> str:
    """`auto` = cuda when available, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ModelError(f"model.dtype={name!r}: use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(path))
    except OSError as e:  # an unknown hub id, or the hub out of reach
        raise ModelError(f"model.path={path!r}: cannot load its tokenizer ({e})") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def eos_ids(tokenizer, model=None, path: str | None = None) -> list[int]:
    """Every token id that ends a completion: the generation config's EOS ids (of `model`, or saved
    with the model at `path`; Qwen-Instruct names two), then the tokenizer's. The engines stop on
    each of them, and a reward model reads a completion ending in any of them as finished."""
    config = getattr(model, "generation_config", None)
    if config is None and path is not None:
        from transformers import GenerationConfig

        try:
            config = GenerationConfig.from_pretrained(resolve_model_path(path))
        except (OSError, ValueError):  # a model saved without one
            config = None
    gen_eos = getattr(config, "eos_token_id", None)
    ids = []
    for e in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) + [tokenizer.eos_token_id]:
        if e is not None and e not in ids:
            ids.append(int(e))
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model's generation_config names none")
    return ids


def check_whole(what: str, src: str) -> None:
    """A local model folder with a weights file cut short (a copy or a save that was killed) is a
    one-line error naming the file, not a deserialiser's traceback."""
    from grpo.parts.checkpoint import damaged_file

    if Path(src).is_dir():
        bad = damaged_file(Path(src))
        if bad is not None:
            raise ModelError(f"{what}: {bad} is cut short or unreadable")


def load_model(path: str, dtype: str = "float32", gradient_checkpointing: bool = False, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    src = resolve_model_path(path)
    check_whole(f"model.path={path!r}", src)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype(dtype))
    except OSError as e:
        raise ModelError(f"model.path={path!r}: cannot load ({e})") from e
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model.to(device)


def apply_lora(model, r: int, alpha: float, dropout: float, target_modules: list[str], adapter: str | None = None):
    """The model with peft LoRA adapters on `target_modules` (only they train), or with the trained
    adapters of a checkpoint's `adapter` folder when resuming. r = 0: the model unchanged."""
    if not r:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    targets: str | list[str] = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    try:
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                                task_type="CAUSAL_LM"))
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ModelError(f"model.lora.target_modules={list(target_modules)}: {str(e).splitlines()[0]}") from e


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def backbone(model):
    """The decoder stack under the LM head (the base model of a peft model)."""
    return (model.get_base_model() if is_lora(model) else model).base_model


def merged_parameters(model):
    """(name, tensor) of the model under plain transformers names, with LoRA adapters merged in
    (W + scale * B @ A, computed aside: merging into the weights and back would leave rounding
    drift in the frozen base): what vLLM and from_pretrained load."""
    if not is_lora(model):
        yield from model.named_parameters()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {}
    for name, mod in base.named_modules():
        if isinstance(mod, LoraLayer) and not mod.merged:
            for adapter in mod.active_adapters:
                if adapter in mod.lora_A:
                    key = f"{name}.base_layer.weight"
                    deltas[key] = deltas.get(key, 0) + mod.get_delta_weight(adapter)
    for name, p in base.named_parameters():
        if "lora_" not in name:
            yield name.replace(".base_layer.", "."), (p + deltas[name] if name in deltas else p)


class AdaptersOff(torch.nn.Module):
    """`wrapped` (the policy, or its DDP / FSDP2 wrapper) called with the adapters of the peft model
    `policy` switched off: the base model, which is LoRA's reference, with no second copy."""

    def __init__(self, wrapped: torch.nn.Module, policy):
        super().__init__()
        self.wrapped, self._policy = wrapped, [policy]  # a list: not registered twice as a submodule

    def forward(self, *args, **kwargs):
        with self._policy[0].disable_adapter():
            return self.wrapped(*args, **kwargs)


def plain_copy(model):
    """A plain transformers model equal to a peft model with its adapters merged in (on the CPU):
    what `save_pretrained`, `from_pretrained` and vLLM take."""
    from transformers import AutoModelForCausalLM

    base = model.get_base_model()
    plain = AutoModelForCausalLM.from_config(base.config, dtype=base.dtype)
    with torch.no_grad():
        state = {name: p.detach().to("cpu") for name, p in merged_parameters(model)}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(base.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ModelError(f"merging the adapters: missing {sorted(set(missing) - tied)[:4]}, unexpected {unexpected[:4]}")
    plain.generation_config = base.generation_config
    return plain


def disable_dropout(model) -> None:
    """Zero every dropout of a policy: the engine samples without it, so log-probs must be computed
    without it too, or the ratio is noisy before any update."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
