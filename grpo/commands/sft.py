"""Supervised fine-tuning on prompt/completion rows; the loss covers completion tokens only.

Rows: {"prompt": str | [messages], "completion": str}. The prompt is rendered with the chat
template (as the GRPO trainer renders it), the completion is followed by EOS. Step s trains on
`trainer.batch_size` rows drawn with replacement by a generator seeded with (seed, s), so a resumed
run (`trainer.resume=true`) draws exactly what the uninterrupted one would have.

Under torchrun every rank draws the same batch and trains on its share of the rows; the loss is the
mean over the batch's completion tokens on all ranks (transformers' `num_items_in_batch`).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from grpo.parts import checkpoint
from grpo.parts import config as C
from grpo.parts.distributed import Parallel, shard
from grpo.parts.modeling import load_model, load_tokenizer, pick_device
from grpo.parts.optim import build_optimizer, build_scheduler, optimizer_step
from grpo.parts.tracking import Silent, Tracker, due
from grpo.tasks.base import Sample, TaskError, render_prompt
from grpo.tasks.file import located_rows, to_sample

log = logging.getLogger(__name__)


def encode_rows(tokenizer, rows: list[tuple[str, dict[str, Any]]], prompt_field: str, completion_field: str,
                system_prompt: str | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per row; ``rows`` are (where, row) from `located_rows`, so a
    bad row's error names its file and line."""
    eos = tokenizer.eos_token_id
    out = []
    for where, row in rows:
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


def run_sft(raw: dict[str, Any], run_dir: Path) -> Path:
    """Train and save the model to ``run_dir/model``; returns that path."""
    cfg = C.parse(C.SFTConfig, raw)
    t, m, o, data = cfg.trainer, cfg.model, cfg.optim, cfg.data
    run_dir = Path(run_dir)
    par = Parallel(cfg.parallel.strategy, pick_device(m.device), cfg.parallel.mixed_precision)
    par.require(t.batch_size, f"trainer.batch_size={t.batch_size}")
    ckpt = checkpoint.begin(run_dir, t.resume, t.seed, par)
    tok = load_tokenizer(m.path)
    pairs = encode_rows(tok, located_rows(data.path), data.prompt_field, data.completion_field, data.system_prompt)
    if not pairs:
        raise TaskError(f"{data.path}: no rows")
    device = par.device
    model = load_model(checkpoint.model_source(ckpt, m.path), m.dtype, m.gradient_checkpointing, device)
    fwd = par.wrap(model)
    opt = build_optimizer(fwd.parameters(), o.lr, o.betas, o.weight_decay, o.name)
    sched = build_scheduler(opt, o.schedule, o.warmup_steps, t.max_steps, o.min_lr_rate)
    step = checkpoint.restore_run(ckpt, par, {"model": (model, opt)}, {"scheduler": sched}, t.seed)["step"] if ckpt else 0
    tracker = Tracker(cfg.logger, run_dir, raw, step if ckpt else None, t.max_steps, "sft") if par.main else Silent()
    model.train()
    t0 = time.time()
    try:
        while step < t.max_steps:
            rng = random.Random(f"{t.seed}:{step}")
            batch = [pairs[rng.randrange(len(pairs))] for _ in range(t.batch_size)]
            mine = batch[slice(*shard(len(batch), par.rank, par.world))]  # this rank's rows
            ids, attn, labels = (x.to(device) for x in batch_tensors(mine, tok.pad_token_id))
            # the batch's completion tokens on all ranks, over W: the ranks' average is the batch mean
            n_tok = par.sum([float((labels != -100).sum())])[0]
            loss = fwd(input_ids=ids, attention_mask=attn, labels=labels,
                       num_items_in_batch=torch.tensor(max(n_tok, 1.0) / par.world)).loss
            loss.backward()
            gn, lr = optimizer_step(fwd, opt, sched, o.max_grad_norm)
            loss_v = par.sum([loss.item()])[0] / par.world
            step += 1
            if due(step, t.log_every, t.max_steps):
                tracker.log({"loss": loss_v, "grad_norm": gn, "lr": lr, "time/elapsed": time.time() - t0}, step)
            tracker.advance({"loss": f"{loss_v:.3f}"})
            if due(step, t.save_every, t.max_steps):
                checkpoint.save_run(run_dir, step, par, {"model": (model, opt)}, tok, {"scheduler": sched},
                                    keep=t.keep_checkpoints)
    finally:
        tracker.close()
    return checkpoint.save_final(par, model, tok, run_dir / "model")
