"""Loading models and the one forward helper that turns sequences into token log-probs."""

from __future__ import annotations

from pathlib import Path

import torch

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "embedded_model"
EMBEDDED_CODE_MODEL_DIR = Path(__file__).resolve().parent / "embedded_code_model"  # warm-started on task=code
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class ModelError(ValueError):
    """A model path or option that cannot work; the message says which and why."""


def resolve_model_path(path: str) -> str:
    """``embedded`` / ``embedded-code`` name the models shipped in the package; a local dir must exist; else a hub id."""
    if path in (None, "", "embedded"):
        if not (EMBEDDED_MODEL_DIR / "config.json").exists():
            raise ModelError(f"the embedded model is missing from {EMBEDDED_MODEL_DIR}: rebuild it with `make embedded-model`")
        return str(EMBEDDED_MODEL_DIR)
    if path == "embedded-code":
        if not (EMBEDDED_CODE_MODEL_DIR / "config.json").exists():
            raise ModelError(f"the embedded code model is missing from {EMBEDDED_CODE_MODEL_DIR}: "
                             "rebuild it with `python -m grpo.embedded --task code`")
        return str(EMBEDDED_CODE_MODEL_DIR)
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

    tok = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, dtype: str = "float32", gradient_checkpointing: bool = False, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    src = resolve_model_path(path)
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


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Left-pad prompts and right-pad completions so every completion starts at column P.

    Returns input_ids [N, P+T], attention_mask [N, P+T], position_ids [N, P+T], completion
    ids [N, T] and completion mask [N, T] (1 = real token). Positions count real tokens only, as
    generate() does with left padding, so both compute the same log-probs.
    """
    P = max(len(p) for p in prompts)
    T = max(1, max(len(c) for c in completions))
    N = len(prompts)
    ids = torch.full((N, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((N, P + T), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
        if c:
            ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[i, P:P + len(c)] = 1
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)  # [N, P+T]
    return ids, attn, pos, ids[:, P:], attn[:, P:].clone()


def token_logprobs(model, input_ids, attention_mask, position_ids, T: int, temperature: float = 1.0,
                   with_entropy: bool = False):
    """Log-probs of the last T tokens of each row under logits / temperature.

    input_ids, attention_mask, position_ids: [N, P+T]. Returns logp [N, T] (and entropy [N, T]).
    Only the T+1 last positions go through the LM head, which keeps memory at [N, T, V].
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=T + 1, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature  # [N, T, V]; position t predicts token t+1
    logp_all = torch.log_softmax(logits, dim=-1)  # [N, T, V]
    targets = input_ids[:, -T:]  # [N, T]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, T]
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # [N, T]
    return logp, entropy
