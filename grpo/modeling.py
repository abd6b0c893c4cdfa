"""Loading models and the one forward helper that turns sequences into token log-probs."""

from __future__ import annotations

from pathlib import Path

import torch

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "embedded_model"
EMBEDDED_CODE_MODEL_DIR = Path(__file__).resolve().parent / "embedded_code_model"  # warm-started on task=code
EMBEDDED_CHAT_MODEL_DIR = Path(__file__).resolve().parent / "embedded_chat_model"  # the preference task's policy
EMBEDDED_RM_DIR = Path(__file__).resolve().parent / "embedded_rm"  # `grpo rm` on the built-in preference task
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class ModelError(ValueError):
    """A model path or option that cannot work; the message says which and why."""


# The models shipped in the package: name -> (folder, the command that rebuilds it).
EMBEDDED = {
    "embedded": (EMBEDDED_MODEL_DIR, "make embedded-model"),
    "embedded-code": (EMBEDDED_CODE_MODEL_DIR, "python -m grpo.embedded --task code"),
    "embedded-chat": (EMBEDDED_CHAT_MODEL_DIR, "python -m grpo.embedded --task chat"),
    "embedded-rm": (EMBEDDED_RM_DIR, "make embedded-rm"),
}


def resolve_model_path(path: str) -> str:
    """A name of EMBEDDED -> its folder in the package; a local dir must exist; else a hub id."""
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
            raise ModelError(f"model.path={path!r}: no such directory")
        if not (p / "config.json").exists():
            raise ModelError(f"model.path={path!r}: no config.json in that directory (not a Hugging Face model)")
        return str(p)
    return path  # a hub id such as Qwen/Qwen2.5-0.5B-Instruct


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


def check_whole(what: str, src: str) -> None:
    """A local model folder with a weights file cut short (a copy or a save that was killed) is a
    one-line error naming the file, not a deserialiser's traceback."""
    from grpo.checkpoint import damaged_file

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


def disable_dropout(model) -> None:
    """Zero every dropout of a policy: the engine samples without it, so log-probs must be computed
    without it too, or the ratio is noisy before any update."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
