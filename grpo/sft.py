"""Supervised fine-tuning on prompt/completion rows; the loss covers completion tokens only.

Rows: {"prompt": str | [messages], "completion": str}. The prompt is rendered with the chat
template (as the GRPO trainer renders it), the completion is followed by EOS.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from grpo.modeling import load_model, load_tokenizer, pick_device
from grpo.tasks.base import Sample, TaskError, render_prompt
from grpo.tasks.file import read_rows, to_sample

log = logging.getLogger(__name__)


def encode_rows(tokenizer, rows: list[dict[str, Any]], path: str, prompt_field: str, completion_field: str,
                system_prompt: str | None = None) -> list[tuple[list[int], list[int]]]:
    eos = tokenizer.eos_token_id
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        sample: Sample = to_sample(row, where, prompt_field, None)
        if not isinstance(row.get(completion_field), str) or not row[completion_field]:
            raise TaskError(f"{where}: missing field {completion_field!r}")
        p = tokenizer(render_prompt(tokenizer, sample, system_prompt), add_special_tokens=False)["input_ids"]
        c = tokenizer(row[completion_field], add_special_tokens=False)["input_ids"] + [eos]
        out.append((p, c))
    return out


def batch_tensors(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input_ids [B, L], attention_mask [B, L], labels [B, L] (-100 off the completion)."""
    L = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), L), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(pairs):
        seq = torch.tensor(p + c, dtype=torch.long)
        ids[i, :len(seq)] = seq
        attn[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = seq[len(p):]
    return ids, attn, labels


def run_sft(cfg: dict[str, Any], run_dir: Path) -> Path:
    """Train and save the model to ``run_dir/model``; returns that path."""
    torch.manual_seed(cfg["trainer"]["seed"])
    rng = random.Random(cfg["trainer"]["seed"])
    tok = load_tokenizer(cfg["model"]["path"])
    device = pick_device(cfg["model"].get("device", "auto"))
    model = load_model(cfg["model"]["path"], cfg["model"]["dtype"], cfg["model"].get("gradient_checkpointing", False), device)
    data = cfg["data"]
    rows = read_rows(data["path"])
    pairs = encode_rows(tok, rows, data["path"], data["prompt_field"], data["completion_field"], data.get("system_prompt"))
    if not pairs:
        raise TaskError(f"{data['path']}: no rows")
    steps, bs = cfg["trainer"]["max_steps"], cfg["trainer"]["batch_size"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["optim"]["lr"], weight_decay=cfg["optim"]["weight_decay"])
    warm = cfg["optim"]["warmup_steps"]
    # Linear warm-up, then cosine decay to 10% of the peak.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warm)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
    metrics_path = run_dir / "metrics.jsonl"
    model.train()
    t0 = time.time()
    with metrics_path.open("a") as mf:
        for step in range(1, steps + 1):
            batch = [pairs[rng.randrange(len(pairs))] for _ in range(bs)]
            ids, attn, labels = (x.to(device) for x in batch_tensors(batch, tok.pad_token_id))
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["optim"]["max_grad_norm"])
            opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
            if step % cfg["trainer"]["log_every"] == 0 or step == steps:
                rec = {"step": step, "loss": loss.item(), "grad_norm": float(gn), "lr": sched.get_last_lr()[0],
                       "time/elapsed": time.time() - t0}
                mf.write(json.dumps(rec) + "\n"); mf.flush()
                log.info("sft step %d/%d loss %.4f", step, steps, rec["loss"])
    out = run_dir / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
