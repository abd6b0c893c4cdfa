"""`grpo rm`: a reward model learnt from preference data (InstructGPT's second stage), top to bottom.

One step:
    `trainer.batch_size` prompts -> each prompt's K responses (best first), as prompt + response
    + EOS -> the scalar head's score at the last real token [P, K] -> ranking_loss (all C(K, 2)
    pairs of a prompt are one batch element) -> clipped gradient step.
Pairs are rankings of K = 2; pairs with a `margin` use pairwise_loss with it; rows of `score`
use the pointwise (MSE) loss.

Evaluation on held-out pairs: eval/accuracy (share with chosen > rejected; ties are wrong),
eval/margin (mean chosen - rejected score), eval/reward/mean and /std. After the last step the
model stores a bias (config.reward_bias, and optionally a scale) so that its scores on the
training responses, i.e. completions of the reference policy, have mean 0, as InstructGPT
normalises its reward model; it is saved as AutoModelForSequenceClassification (num_labels=1)
in <run dir>/model.

Where this differs from InstructGPT (Ouyang et al., 2022): the reward model starts from the
policy's own SFT model rather than a 6B model fine-tuned elsewhere, and training may run several
epochs (`trainer.max_steps`) where the paper took one, since the built-in task is small.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo.algorithm.preference_losses import pairwise_loss, pointwise_loss, ranking_loss
from grpo.parts import checkpoint
from grpo.parts import config as C
from grpo.parts.distributed import Parallel, call, shard
from grpo.parts.optim import optimizer_step
from grpo.parts.reward_model import batch_sequences, fit_normalizer, init_reward_model, raw_scores
from grpo.parts.run import Run
from grpo.tasks.base import TaskError, render_prompt
from grpo.tasks.preference_data import ranking_pairs, read_preferences

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One prompt's responses as token sequences (prompt + response + EOS), best first."""

    seqs: list[list[int]]
    margin: float | None = None
    score: float | None = None  # pointwise data


def encode(tok, kind: str, records: list, system_prompt: str | None) -> list[Encoded]:
    eos = tok.eos_token_id
    out = []
    for r in records:
        p = tok(render_prompt(tok, r.sample, system_prompt), add_special_tokens=False)["input_ids"]
        responses = [r.response] if kind == "scores" else r.responses
        seqs = [p + tok(x, add_special_tokens=False)["input_ids"] + [eos] for x in responses]
        out.append(Encoded(seqs, getattr(r, "margin", None), getattr(r, "score", None)))
    return out


def eval_pairs(tok, kind: str, records: list, system_prompt: str | None) -> list[Encoded]:
    """Held-out data as pairs (rankings expanded to their C(K, 2) pairs), or scored rows."""
    if kind == "scores":
        return encode(tok, kind, records, system_prompt)
    from grpo.tasks.preference_data import Ranking

    pairs = [Ranking(s, [c, r], None, "") for s, c, r in ranking_pairs(records)]
    return encode(tok, "pairs", pairs, system_prompt)


def scores_of(model, seqs: list[list[int]], pad_id: int, device) -> torch.Tensor:
    ids, attn = batch_sequences(seqs, pad_id)
    return call(model, raw_scores, ids.to(device), attn.to(device))  # [len(seqs)]


def batch_loss(model, batch: list[Encoded], kind: str, pad_id: int, device, center_coef: float):
    """The loss of one batch of prompts and its metrics."""
    flat = [s for e in batch for s in e.seqs]
    scores = scores_of(model, flat, pad_id, device)  # [sum K]
    if kind == "scores":
        return pointwise_loss(scores, torch.tensor([e.score for e in batch], device=device))
    K = max(len(e.seqs) for e in batch)
    grid = torch.zeros(len(batch), K, device=device)  # [P, K]
    mask = torch.zeros(len(batch), K, device=device)  # [P, K]
    i = 0
    for p, e in enumerate(batch):
        grid[p, :len(e.seqs)] = scores[i:i + len(e.seqs)]
        mask[p, :len(e.seqs)] = 1
        i += len(e.seqs)
    if any(e.margin is not None for e in batch) or center_coef > 0:
        if K != 2:
            raise TaskError("a margin or rm.center_coef needs pair data (K = 2)")
        margin = torch.tensor([e.margin or 0.0 for e in batch], device=device)
        return pairwise_loss(grid[:, 0], grid[:, 1], margin, center_coef)
    return ranking_loss(grid, mask)


def backward(model, batch: list[Encoded], micro_batch_size: int, kind: str, pad_id: int, device,
             center_coef: float, par: Parallel | None = None) -> tuple[float, dict[str, float]]:
    """Gradients of the batch's loss, accumulated over micro-batches of whole prompts.

    Every loss here is a mean over prompts (rankings, pairs) or rows (scores), one element per
    prompt, so weighting each micro-batch by its share of the prompts makes the sum the whole
    batch's loss. Under torchrun (`par`) each rank takes its share of the batch's prompts, and its
    sum is multiplied by W: DDP and FSDP2 average the ranks' gradients. Returns the loss and the
    metrics, weighted the same way, over the whole batch."""
    par = par or Parallel("ddp")
    W = par.world
    mine = batch[slice(*shard(len(batch), par.rank, W))]
    mb = micro_batch_size or len(mine)
    mbs = par.pad_micro_batches([slice(i, i + mb) for i in range(0, len(mine), mb)])
    loss_v, metrics = 0.0, {}
    for k, (sl, keep) in enumerate(mbs):
        part = mine[sl]
        with par.grad_sync(model, sync=k == len(mbs) - 1):
            loss, m_part = batch_loss(model, part, kind, pad_id, device, center_coef)
            w = keep * len(part) / len(batch)
            (loss * w * W).backward()
        loss_v += loss.item() * w
        metrics = {key: metrics.get(key, 0.0) + v * w for key, v in m_part.items()}
    metrics = par.sum_dict({**metrics, "loss": loss_v})  # the ranks' shares add up
    return metrics.pop("loss"), metrics


@torch.no_grad()
def evaluate(model, data: list[Encoded], kind: str, pad_id: int, device, batch_size: int) -> dict[str, float]:
    model.eval()
    flat = [s for e in data for s in e.seqs]
    scores = torch.cat([scores_of(model, flat[i:i + batch_size], pad_id, device) for i in range(0, len(flat), batch_size)])
    model.train()
    if kind == "scores":
        target = torch.tensor([e.score for e in data])
        return {"eval/mse": float(((scores.cpu() - target) ** 2).mean()), "eval/reward/mean": float(scores.mean()),
                "eval/reward/std": float(scores.std())}
    chosen, rejected = scores[0::2], scores[1::2]  # [pairs]
    return {"eval/accuracy": float((chosen > rejected).float().mean()),  # ties are wrong
            "eval/margin": float((chosen - rejected).mean()),
            "eval/reward/mean": float(scores.mean()), "eval/reward/std": float(scores.std())}


def split_held_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of the prompts, with every record of each held-out prompt, so that no
    evaluated prompt is trained on."""
    key = lambda r: r.sample.prompt if r.sample.messages is None else repr(r.sample.messages)  # noqa: E731
    prompts = sorted({key(r) for r in records})
    random.Random(f"{seed}:rm-split").shuffle(prompts)
    held = set(prompts[: int(round(len(prompts) * fraction))])
    return [r for r in records if key(r) not in held], [r for r in records if key(r) in held]


def drop_long(data: list[Encoded], limit: int | None, what: str) -> list[Encoded]:
    """Rows whose longest prompt + response exceeds `limit` tokens are dropped, and counted."""
    if not limit:
        return data
    kept = [e for e in data if max(len(s) for s in e.seqs) <= limit]
    if len(kept) < len(data):
        log.warning("grpo rm: %d of %d %s rows are longer than %d tokens and were dropped (data.max_length)",
                    len(data) - len(kept), len(data), what, limit)
    return kept


def run_rm(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    cfg = C.parse(C.RMConfig, raw)
    trainer, model, data, hp = cfg.trainer, cfg.model, cfg.data, cfg.rm
    if trainer.max_steps < 1:  # the head would be saved as it was drawn: a "reward model" that scores noise
        raise C.ConfigError(f"trainer.max_steps={trainer.max_steps}: grpo rm would save a reward model whose head "
                            "was never trained; train at least 1 step")
    with Run.from_config("rm", cfg, raw, run_dir) as run:
        par, device = run.par, run.device
        run.require(trainer.batch_size, f"trainer.batch_size={trainer.batch_size}")
        if model.lora.r:
            raise C.ConfigError("model.lora: grpo rm trains the whole reward model (its new head with its trunk); "
                                "set model.lora.r=0")
        tok = run.tokenizer(model.path)
        kind, records = read_preferences(data.path, data.split, data.config)
        eval_path = data.eval_path or ("embedded-prefs-eval" if data.path == "embedded-prefs" else None)
        if eval_path:
            eval_kind, held = read_preferences(eval_path, data.eval_split, data.config)
            if (eval_kind == "scores") != (kind == "scores"):
                raise TaskError(f"{eval_path}: holds {eval_kind} rows but {data.path} holds {kind}: use the same kind")
        else:
            records, held = split_held_out(records, data.eval_fraction, trainer.seed)

        scorer = init_reward_model(checkpoint.model_source(run.ckpt, model.path), model.dtype, device, tok.pad_token_id)
        limit = data.max_length or getattr(scorer.config, "max_position_embeddings", None)
        train = drop_long(encode(tok, kind, records, data.system_prompt), limit, "training")
        held_out = drop_long(eval_pairs(tok, kind, held, data.system_prompt), limit, "held-out") if held else []
        if not train:
            raise TaskError(f"{data.path}: no training rows")
        if model.gradient_checkpointing:
            scorer.gradient_checkpointing_enable()
        scorer.train()
        # Every pass goes through the wrapper, where DDP and FSDP2 hook in (grpo/parts/distributed.py); every
        # rank evaluates the whole held-out set (the same forwards on each: no collective is left unpaired).
        fwd = par.wrap(scorer)
        opt, sched = run.optimizer(fwd.parameters(), cfg.optim, trainer.max_steps)
        run.restore({"model": (scorer, opt)}, {"scheduler": sched})
        pad = tok.pad_token_id
        run.evaluate_with(lambda: (evaluate(fwd, held_out, kind, pad, device, hp.eval_batch_size) if held_out else {}, []),
                          key="eval/mse" if kind == "scores" else "eval/accuracy",
                          label="mse" if kind == "scores" else "acc")

        for step in run.steps():
            rng = random.Random(f"{trainer.seed}:{step.index}")  # step s draws the same prompts after a resume
            batch = [train[rng.randrange(len(train))] for _ in range(trainer.batch_size)]
            loss_v, metrics = backward(fwd, batch, trainer.micro_batch_size, kind, pad, device, hp.center_coef, par)
            grad_norm, lr = optimizer_step(fwd, opt, sched, cfg.optim.max_grad_norm)
            step.done({"loss": loss_v, **{f"train/{k}": v for k, v in metrics.items()}, "grad_norm": grad_norm,
                       "lr": lr}, bar={"loss": f"{loss_v:.3f}"})

        norm = {}
        if hp.normalize and kind != "scores":  # pointwise targets already fix the scale and offset
            # Reference completions: the training responses, i.e. samples of the policy the data came from.
            refs = [s for e in train for s in e.seqs]
            refs = [refs[i] for i in random.Random(trainer.seed).sample(range(len(refs)),
                                                                        min(len(refs), hp.normalize_samples))]
            size = hp.eval_batch_size
            with torch.no_grad():
                scorer.eval()
                raw_s = torch.cat([scores_of(fwd, refs[i:i + size], pad, device) for i in range(0, len(refs), size)])
            try:
                norm = fit_normalizer(scorer, raw_s.cpu(), with_scale=hp.normalize_scale)
            except ValueError as e:
                raise TaskError(f"rm.normalize: {e}") from e
            run.log({f"rm/{k}": v for k, v in norm.items()})

        def headline(first: dict[str, Any], last: dict[str, Any]) -> list[str]:
            if "eval/accuracy" in last:
                return [f"held-out pairwise accuracy over {len(held_out)} pairs: {first['eval/accuracy']:.3f} -> "
                        f"{last['eval/accuracy']:.3f}"]
            return [f"held-out MSE over {len(held_out)} rows: {first['eval/mse']:.4f} -> {last['eval/mse']:.4f}"]

        return run.finish(headline, model=scorer, normalizer=norm)  # the model's config carries the normaliser
