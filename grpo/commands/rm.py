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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

from grpo.parts import checkpoint  # noqa: E402
from grpo.parts import config as C
from grpo.parts.distributed import Parallel, call, shard
from grpo.parts.modeling import DATA_DIR, load_tokenizer, pick_device
from grpo.parts.optim import build_optimizer, build_scheduler, optimizer_step
from grpo.algorithm.preference_losses import pairwise_loss, pointwise_loss, ranking_loss
from grpo.parts.reward_model import batch_sequences, fit_normalizer, init_reward_model, raw_scores
from grpo.tasks.base import TaskError, render_prompt
from grpo.tasks.preference_data import ranking_pairs, read_preferences
from grpo.parts.tracking import Silent, Tracker, due

BUILTIN_DATA = {"embedded-prefs": DATA_DIR / "prefs_train.jsonl", "embedded-prefs-eval": DATA_DIR / "prefs_eval.jsonl"}


@dataclass
class RMData:
    path: str = "embedded-prefs"  # the built-in preference task's training rankings (grpo prefs)
    # Held-out data; null = embedded-prefs-eval for the built-in data, else eval_fraction of path's prompts.
    eval_path: str | None = None
    eval_fraction: float = C.num(0.05, ge=0, le=0.5)
    split: str = "train"  # hub datasets only
    eval_split: str = "test"  # hub datasets only, for eval_path
    config: str | None = None
    system_prompt: str | None = None
    max_length: int | None = C.num(None, ge=2)  # longer prompt + response rows are dropped; null = the model's limit


@dataclass
class RMOptions:
    center_coef: float = C.num(0.0, ge=0)  # + coef * mean((s_chosen + s_rejected)^2): keeps scores near 0
    normalize: bool = True  # store a bias so the training responses score 0 on average (not for scores data)
    normalize_scale: bool = False  # and a scale so they have std 1
    normalize_samples: int = C.num(4096, ge=2)  # training responses scored for the normaliser
    eval_batch_size: int = C.num(256, ge=1)


@dataclass
class RMConfig:
    model: C.Model = C.group(C.Model)
    data: RMData = C.group(RMData)
    rm: RMOptions = C.group(RMOptions)
    trainer: C.RMTrainer = C.group(C.RMTrainer)
    optim: C.Optim = C.group(C.Optim)
    logger: C.Logger = C.group(C.Logger)
    parallel: C.Parallel = C.group(C.Parallel)


def resolve_data(path: str) -> str:
    """`embedded-prefs` / `embedded-prefs-eval` name the built-in task's files; anything else as is."""
    if path in BUILTIN_DATA:
        if not BUILTIN_DATA[path].exists():
            raise TaskError(f"{BUILTIN_DATA[path]} is missing: rebuild it with `grpo prefs --ship`")
        return str(BUILTIN_DATA[path])
    return path


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
    cfg = C.parse(RMConfig, raw)
    t, m, o, d = cfg.trainer, cfg.model, cfg.optim, cfg.data
    run_dir = Path(run_dir)
    par = Parallel(cfg.parallel.strategy, pick_device(m.device), cfg.parallel.mixed_precision)
    par.require(t.batch_size, f"trainer.batch_size={t.batch_size}")
    ckpt = checkpoint.begin(run_dir, t.resume, t.seed, par)
    tok = load_tokenizer(m.path)
    kind, records = read_preferences(resolve_data(d.path), d.split, d.config)
    eval_path = d.eval_path or ("embedded-prefs-eval" if d.path == "embedded-prefs" else None)
    if eval_path:
        eval_kind, held = read_preferences(resolve_data(eval_path), d.eval_split, d.config)
        if (eval_kind == "scores") != (kind == "scores"):
            raise TaskError(f"{eval_path}: holds {eval_kind} rows but {d.path} holds {kind}: use the same kind")
    else:
        records, held = split_held_out(records, d.eval_fraction, t.seed)

    device = par.device
    model = init_reward_model(checkpoint.model_source(ckpt, m.path), m.dtype, device, tok.pad_token_id)
    limit = d.max_length or getattr(model.config, "max_position_embeddings", None)
    train = drop_long(encode(tok, kind, records, d.system_prompt), limit, "training")
    held_out = drop_long(eval_pairs(tok, kind, held, d.system_prompt), limit, "held-out") if held else []
    if not train:
        raise TaskError(f"{d.path}: no training rows")
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    # Every pass goes through the wrapper, where DDP and FSDP2 hook in (grpo/distributed.py); every
    # rank evaluates the whole held-out set (the same forwards on each: no collective is left unpaired).
    fwd = par.wrap(model)
    opt = build_optimizer(fwd.parameters(), o.lr, o.betas, o.weight_decay, o.name)
    sched = build_scheduler(opt, o.schedule, o.warmup_steps, t.max_steps, o.min_lr_rate)
    step = checkpoint.restore_run(ckpt, par, {"model": (model, opt)}, {"scheduler": sched}, t.seed)["step"] if ckpt else 0
    tracker = Tracker(cfg.logger, run_dir, raw, step if ckpt else None, t.max_steps, "rm") if par.main else Silent()
    pad = tok.pad_token_id

    def run_eval() -> dict[str, float]:
        metrics = evaluate(fwd, held_out, kind, pad, device, cfg.rm.eval_batch_size) if held_out else {}
        if metrics:
            tracker.log(metrics, step)
        return metrics

    first, last = tracker.past_evals("eval/accuracy") if ckpt else (run_eval(),) * 2
    t0 = time.time()
    try:
        while step < t.max_steps:
            rng = random.Random(f"{t.seed}:{step}")  # step s draws the same prompts after a resume
            batch = [train[rng.randrange(len(train))] for _ in range(t.batch_size)]
            loss_v, metrics = backward(fwd, batch, t.micro_batch_size, kind, pad, device, cfg.rm.center_coef, par)
            gn, lr = optimizer_step(fwd, opt, sched, o.max_grad_norm)
            step += 1
            if due(step, t.log_every, t.max_steps):
                tracker.log({"loss": loss_v, **{f"train/{k}": v for k, v in metrics.items()},
                             "grad_norm": gn, "lr": lr, "time/elapsed": time.time() - t0}, step)
            if due(step, t.eval_every, t.max_steps):
                last = run_eval()
                first = first or last
            post = {"loss": f"{loss_v:.3f}"}
            if last and "eval/accuracy" in last:
                post["acc"] = f"{last['eval/accuracy']:.3f}"
            tracker.advance(post)
            if due(step, t.save_every, t.max_steps):
                checkpoint.save_run(run_dir, step, par, {"model": (model, opt)}, tok, {"scheduler": sched},
                                    keep=t.keep_checkpoints)
        norm = {}
        if cfg.rm.normalize and kind != "scores":  # pointwise targets already fix the scale and offset
            # Reference completions: the training responses, i.e. samples of the policy the data came from.
            refs = [s for e in train for s in e.seqs]
            refs = [refs[i] for i in random.Random(t.seed).sample(range(len(refs)), min(len(refs), cfg.rm.normalize_samples))]
            bs = cfg.rm.eval_batch_size
            with torch.no_grad():
                model.eval()
                raw_s = torch.cat([scores_of(fwd, refs[i:i + bs], pad, device) for i in range(0, len(refs), bs)])
            try:
                norm = fit_normalizer(model, raw_s.cpu(), with_scale=cfg.rm.normalize_scale)
            except ValueError as e:
                raise TaskError(f"rm.normalize: {e}") from e
            tracker.log({f"rm/{k}": v for k, v in norm.items()}, step)
    finally:
        tracker.close()
    out = checkpoint.save_final(par, model, tok, run_dir / "model")  # its config carries the normaliser
    summary = {"run_dir": str(run_dir), "model": str(out), "steps": step, "first_eval": first, "last_eval": last,
               "normalizer": norm}
    lines = ["", f"done after {step} steps", f"reward model: {out}", f"metrics:      {run_dir / 'metrics.jsonl'}"]
    if first and last and "eval/accuracy" in last:
        lines.append(f"held-out pairwise accuracy: {first['eval/accuracy']:.3f} -> {last['eval/accuracy']:.3f}")
    if par.main:
        print("\n".join(lines))
    return summary
