"""A scalar reward model: a causal LM trunk with a linear `score` head, stored as Hugging Face
AutoModelForSequenceClassification with num_labels=1.

A sequence's score is the head's output at its last real token (attention_mask = 1), then
normalised as (raw - reward_bias) / reward_scale. Both constants live on model.config, so
save_pretrained writes them to config.json and any from_pretrained brings them back.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from grpo.parts.modeling import ModelError, check_whole, disable_dropout, resolve_model_path, torch_dtype

HEAD = "score"  # the head's attribute in Llama / Qwen / Mistral / Gemma ...ForSequenceClassification


@contextlib.contextmanager
def _quiet_load_report():
    """Drop transformers' load report (the "newly initialized" head, an unused lm_head) while we
    check the loading info ourselves. A filter, not a raised log level: at WARNING and above
    from_pretrained logs a tensor-parallel notice instead."""
    def drop(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    log = logging.getLogger("transformers.modeling_utils")
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _from_pretrained(path: str, dtype: str, key: str, **kw):
    """from_pretrained with the loading info; `key`: the setting the path came from, which errors name."""
    from transformers import AutoModelForSequenceClassification

    src, dt = resolve_model_path(path, key), torch_dtype(dtype)
    check_whole(f"{key}={path!r}", src)
    try:
        return AutoModelForSequenceClassification.from_pretrained(src, dtype=dt, output_loading_info=True, **kw)
    except (OSError, ValueError) as e:  # ValueError: an architecture with no sequence-classification class
        raise ModelError(f"{key}={path!r}: cannot load ({e})") from e


def _not_loaded(info: dict) -> set[str]:
    """Parameters that from_pretrained had to initialise: missing, or reshaped (mismatched)."""
    return set(info["missing_keys"]) | {k[0] for k in info["mismatched_keys"]}


def _head(model) -> torch.nn.Module:
    head = getattr(model, HEAD, None)
    if not isinstance(head, torch.nn.Module):
        raise ModelError(f"{type(model).__name__} has no `{HEAD}` head: only Llama/Qwen/Mistral-style "
                         "...ForSequenceClassification models are supported as reward models")
    return head


def init_reward_model(path: str, dtype: str = "float32", device: str = "cpu", pad_token_id: int | None = None,
                      key: str = "model.path"):
    """A reward model to train, from a causal LM dir (the head starts fresh) or an existing reward model.

    The trunk must load completely; only the `score` head may be new. config.pad_token_id is set
    (argument, else the config's, else eos) because transformers refuses batches without one.
    Returned as from_pretrained leaves it (eval mode; dropout is off either way): call .train() to train.
    """
    with _quiet_load_report():  # a new head is the expected case here, not news
        model, info = _from_pretrained(path, dtype, key, num_labels=1, ignore_mismatched_sizes=True)
    _head(model)
    trunk_missing = sorted(k for k in _not_loaded(info) if not k.startswith(HEAD + "."))
    if trunk_missing:
        raise ModelError(f"reward model {path!r}: trunk weights missing from the checkpoint: {trunk_missing[:5]}")
    cfg = model.config
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    if pad is None:
        eos = cfg.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    if pad is None:
        raise ModelError(f"reward model {path!r}: no pad_token_id in the config and none given")
    cfg.pad_token_id = pad
    disable_dropout(model)
    return model.to(device)


def load_reward_model(path: str, dtype: str = "float32", device: str = "cpu", key: str = "reward_model.path"):
    """A trained reward model, strictly: every weight, the head included, must come from the checkpoint.
    `key`: the setting the path came from, which errors name."""
    model, info = _from_pretrained(path, dtype, key)
    _head(model)
    new = sorted(_not_loaded(info))
    if any(k.startswith(HEAD + ".") for k in new):  # checked first: a causal LM's config also says num_labels=2
        raise ModelError(f"{key}={path!r}: no trained `{HEAD}` head in the checkpoint ({', '.join(new[:5])} "
                         "would be newly initialised); is it a plain causal LM? Train a reward model from it "
                         f"first: grpo rm model.path={path}")
    if new:
        raise ModelError(f"{key}={path!r}: weights missing from the checkpoint: {new[:5]}")
    if model.config.num_labels != 1:
        raise ModelError(f"{key}={path!r}: num_labels={model.config.num_labels}, a reward model has 1")
    disable_dropout(model)
    return model.to(device).eval()


def batch_sequences(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into input_ids [N, L] and attention_mask [N, L] (1 = real token)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)  # [N, L]
    attn = torch.zeros((len(seqs), L), dtype=torch.long)  # [N, L]
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, :len(s)] = 1
    return ids, attn


def raw_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head's output at each row's last real token, before normalisation: [N] float32.

    input_ids, attention_mask: [N, L], padded on either side. The last real token is found from
    attention_mask, not from input_ids != pad_token_id as transformers' own pooling does, which
    picks the wrong token when pad == eos and a sequence ends with eos. Gradients flow.
    """
    head = _head(model)
    if bool((attention_mask.sum(dim=1) == 0).any()):
        raise ValueError("raw_scores: a row has no real token (attention_mask all 0)")
    mask = attention_mask.long()  # [N, L]
    # Positions count real tokens only, so a left-padded row scores as it does unpadded.
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [N, L]
    trunk = getattr(model, model.base_model_prefix)
    out = trunk(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False)
    hidden = out.last_hidden_state  # [N, L, H]
    L = mask.shape[1]
    last = L - 1 - mask.flip(dims=[1]).argmax(dim=1)  # [N]; argmax finds the first 1 from the right
    h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [N, H]
    return head(h_last).squeeze(-1).float()  # [N]; only N rows go through the head, not N * L


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Normalised scores [N] float32: (raw - config.reward_bias) / config.reward_scale (defaults 0, 1)."""
    raw = raw_scores(model, input_ids, attention_mask)  # [N]
    cfg = model.config
    return (raw - getattr(cfg, "reward_bias", 0.0)) / getattr(cfg, "reward_scale", 1.0)


def fit_normalizer(model, raw: torch.Tensor, with_scale: bool = False) -> dict[str, float]:
    """Store reward_bias = mean(raw) (and reward_scale = unbiased std(raw) if with_scale, else 1) on
    model.config, so the normalised scores of these reference completions have mean 0 (and std 1),
    as InstructGPT does before RL. raw: [M] *raw* scores (raw_scores, not sequence_scores).
    """
    raw = raw.detach().float().flatten()  # [M]
    if raw.numel() < (2 if with_scale else 1):
        raise ValueError(f"fit_normalizer: {raw.numel()} scores are too few")
    bias = float(raw.mean())
    scale = float(raw.std()) if with_scale else 1.0
    if not scale > 0:
        raise ValueError("fit_normalizer: the reference scores are all equal, their std is 0")
    model.config.reward_bias, model.config.reward_scale = bias, scale
    return {"reward_bias": bias, "reward_scale": scale}


def save_reward_model(model, tokenizer, out_dir) -> Path:
    """Write the model (its config carries the normalisation) and, if given, the tokenizer."""
    out = Path(out_dir)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
