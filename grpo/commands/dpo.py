"""`grpo dpo`: direct preference optimisation (Rafailov et al., 2023), top to bottom.

One step:
    `trainer.batch_size` preference pairs (rankings expanded to their C(K, 2) pairs, better first)
    -> sequence log-probs of chosen and rejected (sums over completion tokens only; the prompt is
    masked) under the policy and the frozen reference -> dpo_loss (sigmoid | robust | ipo)
    [+ dpo.nll_coef x the chosen completions' token-mean NLL] -> clipped gradient step.
No reward model and no sampling in training; evaluation samples the policy on the task's held-out
prompts and scores them with the task's verifiers (on the built-in preference task, the hidden
rule: eval/reward/mean is the true score).

Where this differs from the paper: the reference is the initial policy (the paper fine-tunes it on
the chosen completions first when the data did not come from it; here the built-in data did), and
IPO gets per-token log-ratios (u / length), as the IPO authors' own runs used.
Reference log-probs are computed by a frozen copy of the model each step, or once before training
with `dpo.precompute_ref=true` (cached in the run dir, keyed by a hash of the reference weights
and the encoded data, so a changed model or dataset never reuses stale values).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo.parts import checkpoint
from grpo.parts import config as C
from grpo.parts.batch import batch_logprobs, pack
from grpo.parts.distributed import OnDevice, Parallel, shard
from grpo.parts.evaluation import policy_eval
from grpo.parts.modeling import disable_dropout, load_model, load_tokenizer, pick_device
from grpo.parts.optim import build_optimizer, build_scheduler, optimizer_step
from grpo.algorithm.preference_losses import DPO_LOSSES, dpo_loss
from grpo.parts.reward_sources import build_rewards
from grpo.commands.rm import resolve_data
from grpo.parts.rollout import build_engine, encode_prompts, push_weights, sampling_params
from grpo.tasks.base import TaskError, build_task, render_prompt
from grpo.tasks.preference_data import read_preferences
from grpo.parts.tracking import Silent, Tracker, due


@dataclass
class DPOData:
    path: str = "embedded-prefs"  # pairs or rankings; the built-in task's rankings by default
    split: str = "train"  # hub datasets only
    config: str | None = None
    system_prompt: str | None = None
    max_length: int | None = C.num(None, ge=2)  # longer pairs are dropped (counted); null = the model's limit


@dataclass
class DPOOptions:
    beta: float = C.num(0.1, gt=0)
    loss: str = C.choice("sigmoid", *DPO_LOSSES)
    label_smoothing: float = C.num(0.0, ge=0, le=0.49)
    nll_coef: float = C.num(0.0, ge=0)  # + coef x token-mean NLL of the chosen completions
    precompute_ref: bool = False


@dataclass
class DPOTrainer(C.SupervisedTrainer):
    micro_batch_size: int = C.num(0, ge=0)  # pairs per forward/backward; 0 = the whole batch
    eval_every: int = C.num(25, ge=0)
    eval_size: int = C.num(128, ge=1)
    log_samples: int = C.num(8, ge=0)
    system_prompt: str | None = None  # for the evaluation prompts, as in training


@dataclass
class DPOConfig:
    model: C.Model = C.group(C.Model)
    task: dict = C.field(default_factory=dict)  # the held-out prompts and the verifiers of evaluation
    rollout: C.Rollout = C.group(C.Rollout)
    data: DPOData = C.group(DPOData)
    dpo: DPOOptions = C.group(DPOOptions)
    trainer: DPOTrainer = C.group(DPOTrainer)
    optim: C.Optim = C.group(C.Optim)
    logger: C.Logger = C.group(C.Logger)
    verifier: C.Verifier = C.group(C.Verifier)
    parallel: C.Parallel = C.group(C.Parallel)


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]  # completion ids + EOS
    rejected: list[int]


def encode_pairs(tok, records: list, system_prompt: str | None) -> list[Pair]:
    """Rankings (pairs are K = 2) -> token pairs, better first.

    The completion's ids are what follows the prompt's ids in the tokenisation of prompt +
    completion; a row whose tokenised prompt is not a prefix of that (a tokenizer merging across
    the boundary) is reported, since its log-probs would be mis-masked.
    """
    eos = tok.eos_token_id
    out = []
    for r in records:
        text = render_prompt(tok, r.sample, system_prompt)
        p = tok(text, add_special_tokens=False)["input_ids"]
        ids = []
        for k, resp in enumerate(r.responses):
            full = tok(text + resp, add_special_tokens=False)["input_ids"]
            if full[:len(p)] != p:
                raise TaskError(f"{r.where}: response {k + 1}: the tokenised prompt is not a prefix of the tokenised "
                                "prompt + response (the tokenizer merges across the boundary), so the prompt could "
                                "not be masked exactly")
            ids.append(full[len(p):] + [eos])
        out += [Pair(p, ids[i], ids[j]) for i in range(len(ids)) for j in range(i + 1, len(ids))]
    return out


def sequence_logps(model, pairs: list[Pair], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [2P] (chosen rows first, then rejected) and per-token [2P, T] + mask."""
    prompts = [p.prompt for p in pairs] * 2
    comps = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = pack(prompts, comps, pad_id).to(device)
    logp = batch_logprobs(model, batch)  # [2P, T]
    return (logp * batch.mask).sum(1), (logp, batch.mask)


def reference_cache(ref, pairs: list[Pair], pad_id: int, device, run_dir: Path, batch_size: int) -> torch.Tensor:
    """Reference sums [n_pairs, 2] (chosen, rejected), computed once and cached by weights + data."""
    h = hashlib.sha256()
    for name, t in sorted(ref.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for p in pairs:
        h.update(repr((p.prompt, p.chosen, p.rejected)).encode())
    path = Path(run_dir) / f"ref_logps_{h.hexdigest()[:16]}.pt"
    if path.exists():
        return torch.load(path)
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            s, _ = sequence_logps(ref, chunk, pad_id, device)
            out.append(torch.stack([s[:len(chunk)], s[len(chunk):]], dim=1).cpu())  # [n, 2]
    cache = torch.cat(out)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # under torchrun every rank writes the same values
    torch.save(cache, tmp)
    tmp.replace(path)
    return cache


def run_dpo(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    cfg = C.parse(DPOConfig, raw)
    t, m, o, d, opts = cfg.trainer, cfg.model, cfg.optim, cfg.data, cfg.dpo
    run_dir = Path(run_dir)
    pc = cfg.parallel
    par = Parallel(pc.strategy, pick_device(m.device), pc.mixed_precision)
    par.require(t.batch_size, f"trainer.batch_size={t.batch_size}")
    ckpt = checkpoint.begin(run_dir, t.resume, t.seed, par)
    if not cfg.task.get("verifiers"):
        raise C.ConfigError("task.verifiers is not set: evaluation needs them (the true score of the policy)")
    if opts.loss == "ipo" and opts.label_smoothing > 0:
        raise C.ConfigError("dpo.label_smoothing applies to the sigmoid and robust losses, not to ipo: set it to 0")
    task = build_task(cfg.task, seed=t.seed)
    eval_set = task.eval_samples()[: t.eval_size]
    if not eval_set:
        raise TaskError("the task holds out no samples for evaluation")
    par.require(len(eval_set), f"the task holds out {len(eval_set)} samples for evaluation", TaskError)
    tok = load_tokenizer(m.path)
    kind, records = read_preferences(resolve_data(d.path), d.split, d.config)
    if kind == "scores":
        raise TaskError(f"{d.path}: holds scores rows; DPO needs pairs or rankings")
    pairs = encode_pairs(tok, records, d.system_prompt)
    device = par.device
    policy = load_model(checkpoint.model_source(ckpt, m.path), m.dtype, m.gradient_checkpointing, device)
    disable_dropout(policy)
    policy.train()
    ref = load_model(m.path, m.dtype, device="cpu" if pc.ref_on_cpu else device).eval().requires_grad_(False)
    limit = d.max_length or getattr(policy.config, "max_position_embeddings", None)
    if limit:
        kept = [p for p in pairs if len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= limit]
        if len(kept) < len(pairs) and par.main:
            print(f"grpo dpo: {len(pairs) - len(kept)} of {len(pairs)} pairs are longer than {limit} tokens "
                  "and were dropped (data.max_length)")
        pairs = kept
    if not pairs:
        raise TaskError(f"{d.path}: no training pairs")
    pad = tok.pad_token_id
    rows = t.micro_batch_size or t.batch_size  # pairs per forward, as in training
    ref_cache = (reference_cache(ref, pairs, pad, ref.device, run_dir, rows).to(device)
                 if opts.precompute_ref else None)
    # Every pass goes through the wrappers, where DDP and FSDP2 hook in (grpo/distributed.py).
    fwd = par.wrap(policy)
    ref = OnDevice(ref, "cpu", device) if pc.ref_on_cpu else par.wrap(ref, trainable=False)

    _, verifiers, _ = build_rewards(cfg.task["verifiers"], cfg.verifier.fail_fast, cfg.verifier.timeout, None, tok,
                                    device)
    engine = build_engine(cfg.rollout, policy, tok, m.path, m.dtype, m.device, lambda: eval_set, t.system_prompt,
                          par, fwd)
    opt = build_optimizer(fwd.parameters(), o.lr, o.betas, o.weight_decay, o.name)
    sched = build_scheduler(opt, o.schedule, o.warmup_steps, t.max_steps, o.min_lr_rate)
    step = checkpoint.restore_run(ckpt, par, {"model": (policy, opt)}, {"scheduler": sched}, t.seed)["step"] if ckpt else 0
    tracker = Tracker(cfg.logger, run_dir, raw, step if ckpt else None, t.max_steps, "dpo") if par.main else Silent()
    sampling, greedy = sampling_params(cfg.rollout), sampling_params(cfg.rollout, greedy=True)
    eval_prompts = encode_prompts(tok, eval_set, t.system_prompt)

    def run_eval() -> dict[str, float]:
        policy.eval()
        metrics, table = policy_eval(engine, eval_prompts, eval_set, sampling, greedy, verifiers,
                                     seed=t.seed + 1_000_003 * (step + 1), log_samples=t.log_samples,
                                     kl_models=(fwd, ref), pad_id=pad, kl_batch_size=2 * rows, par=par)
        policy.train()
        tracker.log(metrics, step)
        tracker.log_samples(table, step)
        return metrics

    first, last = tracker.past_evals("eval/reward/mean") if ckpt else (run_eval(),) * 2
    t0 = time.time()
    W = par.world
    try:
        while step < t.max_steps:
            rng = random.Random(f"{t.seed}:{step}")  # step s draws the same pairs after a resume
            idx = [rng.randrange(len(pairs)) for _ in range(t.batch_size)]
            mine = idx[slice(*shard(len(idx), par.rank, W))]  # this rank's share of the batch
            mb = t.micro_batch_size or len(idx)
            loss_v, metrics = 0.0, {}
            n_chosen_tok = sum(len(pairs[j].chosen) for j in idx)  # the NLL's global token count
            # (slice, weight) per micro-batch, as many on every rank; padding ones have weight 0.
            mbs = par.pad_micro_batches([slice(i, i + mb) for i in range(0, len(mine), mb)])
            for k, (sl, keep) in enumerate(mbs):
                part = [pairs[j] for j in mine[sl]]
                n = len(part)
                with par.grad_sync(fwd, sync=k == len(mbs) - 1):
                    sums, (tok_logp, mask) = sequence_logps(fwd, part, pad, device)  # [2n]
                    if ref_cache is not None:
                        rc = ref_cache[mine[sl]]  # [n, 2]
                        ref_c, ref_r = rc[:, 0], rc[:, 1]
                    else:
                        with torch.no_grad():
                            ref_sums, _ = sequence_logps(ref, part, pad, device)
                        ref_c, ref_r = ref_sums[:n], ref_sums[n:]
                    lens = mask.sum(1).float()  # [2n]
                    loss, m_part = dpo_loss(sums[:n], sums[n:], ref_c, ref_r, opts.beta, opts.loss,
                                            opts.label_smoothing, lens[:n], lens[n:])
                    # dpo_loss is a mean over pairs: weighted by the batch's share, the micro-batches
                    # of all ranks add up to the batch's loss
                    w = keep * n / len(idx)
                    total = loss * w
                    if opts.nll_coef:  # a token mean over the whole batch's chosen tokens, like aggregate's
                        nll = -(tok_logp[:n] * mask[:n]).sum() / n_chosen_tok * keep
                        total = total + opts.nll_coef * nll
                        metrics["loss/nll"] = metrics.get("loss/nll", 0.0) + float(nll.detach())
                    (total * W).backward()  # DDP and FSDP2 average over the W ranks
                loss_v += total.item()
                metrics.update({key: metrics.get(key, 0.0) + v * w for key, v in m_part.items()})
            gn, lr = optimizer_step(fwd, opt, sched, o.max_grad_norm)
            push_weights(engine, policy)
            metrics = par.sum_dict({**metrics, "loss": loss_v})  # the ranks' shares add up
            loss_v = metrics.pop("loss")
            step += 1
            if step == 1 or due(step, t.log_every, t.max_steps):
                tracker.log({"loss": loss_v, **metrics, "grad_norm": gn, "lr": lr,
                             "time/elapsed": time.time() - t0}, step)
            if due(step, t.eval_every, t.max_steps):
                last = run_eval()
                first = first or last
            post = {"loss": f"{loss_v:.3f}"}
            if last:
                post["eval"] = f"{last['eval/reward/mean']:.3f}"
            tracker.advance(post)
            if due(step, t.save_every, t.max_steps):
                checkpoint.save_run(run_dir, step, par, {"model": (policy, opt)}, tok, {"scheduler": sched},
                                    keep=t.keep_checkpoints)
    finally:
        tracker.close()
        verifiers.close()
        engine.close()
    out = checkpoint.save_final(par, policy, tok, run_dir / "model")
    lines = ["", f"done after {step} steps", f"model:   {out}", f"metrics: {run_dir / 'metrics.jsonl'}"]
    if first and last:
        lines.append(f"eval reward: {first['eval/reward/mean']:.3f} -> {last['eval/reward/mean']:.3f}")
    if par.main:
        print("\n".join(lines))
    return {"run_dir": str(run_dir), "model": str(out), "steps": step, "first_eval": first, "last_eval": last}
