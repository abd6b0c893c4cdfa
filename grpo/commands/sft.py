"""Supervised fine-tuning on prompt/completion rows; the loss covers completion tokens only.

Rows: {"prompt": str | [messages], "completion": str}. The prompt is rendered with the chat
template (as the GRPO trainer renders it), the completion is followed by EOS. Step s trains on
`trainer.batch_size` rows drawn with replacement by a generator seeded with (seed, s), so a resumed
run (`trainer.resume=true`) draws exactly what the uninterrupted one would have.

Under torchrun every rank draws the same batch and trains on its share of the rows; the loss is the
mean over the batch's completion tokens on all ranks (transformers' `num_items_in_batch`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from grpo.parts import config as C
from grpo.parts.batch import batch_tensors, encode_rows
from grpo.parts.distributed import shard
from grpo.parts.optim import optimizer_step
from grpo.parts.run import Run
from grpo.tasks.base import TaskError
from grpo.tasks.file import located_rows


def run_sft(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train and save the model to ``run_dir/model``; returns the run's summary."""
    cfg = C.parse(C.SFTConfig, raw)
    trainer, data = cfg.trainer, cfg.data
    with Run.from_config("sft", cfg, raw, run_dir) as run:
        par = run.par
        run.require(trainer.batch_size, f"trainer.batch_size={trainer.batch_size}")
        tok = run.tokenizer(cfg.model.path)
        pairs = encode_rows(tok, located_rows(data.path), data.prompt_field, data.completion_field, data.system_prompt)
        if not pairs:
            raise TaskError(f"{data.path}: no rows")
        policy = run.policy(cfg.model, reference=False, keep_dropout=True)
        opt, sched = run.optimizer(policy.fwd.parameters(), cfg.optim, trainer.max_steps)
        run.restore({"model": (policy.model, opt)}, {"scheduler": sched})

        for step in run.steps():
            rng = random.Random(f"{trainer.seed}:{step.index}")
            batch = [pairs[rng.randrange(len(pairs))] for _ in range(trainer.batch_size)]
            mine = batch[slice(*shard(len(batch), par.rank, par.world))]  # this rank's rows
            ids, attn, labels = (x.to(run.device) for x in batch_tensors(mine, tok.pad_token_id))
            # the batch's completion tokens on all ranks, over W: the ranks' average is the batch mean
            n_tok = par.sum([float((labels != -100).sum())])[0]
            loss = policy.fwd(input_ids=ids, attention_mask=attn, labels=labels,
                              num_items_in_batch=torch.tensor(max(n_tok, 1.0) / par.world)).loss
            loss.backward()
            grad_norm, lr = optimizer_step(policy.fwd, opt, sched, cfg.optim.max_grad_norm)
            loss_v = par.sum([loss.item()])[0] / par.world
            step.done({"loss": loss_v, "grad_norm": grad_norm, "lr": lr}, bar={"loss": f"{loss_v:.3f}"})

        return run.finish(model=policy.model)
