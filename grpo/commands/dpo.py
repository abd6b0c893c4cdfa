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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo.algorithm.preference_losses import dpo_loss
from grpo.parts import config as C
from grpo.parts.batch import batch_logprobs, pack
from grpo.parts.distributed import full_tensor, shard
from grpo.parts.evaluation import eval_headline
from grpo.parts.optim import optimizer_step
from grpo.parts.rollout import push_weights
from grpo.parts.run import Run
from grpo.tasks.base import TaskError, build_task, render_prompt
from grpo.tasks.preference_data import read_preferences


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
        if "lora_" in name:  # with LoRA the reference is the base: its adapters are off
            continue
        t = full_tensor(t)  # whole under fsdp2 (every rank hashes the same weights)
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
    cfg = C.parse(C.DPOConfig, raw)
    trainer, model, data, hp = cfg.trainer, cfg.model, cfg.data, cfg.dpo
    with Run.from_config("dpo", cfg, raw, run_dir, log_first=True) as run:
        par, device = run.par, run.device
        W = par.world
        run.require(trainer.batch_size, f"trainer.batch_size={trainer.batch_size}")
        if not cfg.task.get("verifiers"):
            raise C.ConfigError("task.verifiers is not set: evaluation needs them (the true score of the policy)")
        if hp.loss == "ipo" and hp.label_smoothing > 0:
            raise C.ConfigError("dpo.label_smoothing applies to the sigmoid and robust losses, not to ipo: set it to 0")
        task = build_task(cfg.task, seed=trainer.seed)
        eval_set = run.held_out(task, trainer.eval_size)
        tok = run.tokenizer(model.path)
        kind, records = read_preferences(data.path, data.split, data.config)
        if kind == "scores":
            raise TaskError(f"{data.path}: holds scores rows; DPO needs pairs or rankings")
        pairs = encode_pairs(tok, records, data.system_prompt)
        policy = run.policy(model, reference=True)
        limit = data.max_length or getattr(policy.model.config, "max_position_embeddings", None)
        if limit:
            kept = [p for p in pairs if len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= limit]
            if len(kept) < len(pairs) and par.main:
                print(f"grpo dpo: {len(pairs) - len(kept)} of {len(pairs)} pairs are longer than {limit} tokens "
                      "and were dropped (data.max_length)")
            pairs = kept
        if not pairs:
            raise TaskError(f"{data.path}: no training pairs")
        pad = tok.pad_token_id
        rows = trainer.micro_batch_size or trainer.batch_size  # pairs per forward, as in training
        ref_cache = (reference_cache(policy.ref, pairs, pad, device, run.run_dir, rows).to(device)
                     if hp.precompute_ref else None)
        _, verifiers, _ = run.rewards(cfg.task, cfg.verifier)
        engine = run.engine(cfg.rollout, policy, model, lambda: eval_set, trainer.system_prompt)
        opt, sched = run.optimizer(policy.fwd.parameters(), cfg.optim, trainer.max_steps)
        run.restore({"model": (policy.model, opt)}, {"scheduler": sched})
        run.evaluate_policy(engine, policy, eval_set, cfg.rollout, trainer.system_prompt, verifiers,
                            kl_batch_size=2 * rows, log_samples=trainer.log_samples)

        for step in run.steps():
            rng = random.Random(f"{trainer.seed}:{step.index}")  # step s draws the same pairs after a resume
            idx = [rng.randrange(len(pairs)) for _ in range(trainer.batch_size)]
            mine = idx[slice(*shard(len(idx), par.rank, W))]  # this rank's share of the batch
            size = trainer.micro_batch_size or len(idx)
            loss_v, metrics = 0.0, {}
            n_chosen_tok = sum(len(pairs[j].chosen) for j in idx)  # the NLL's global token count
            # (slice, weight) per micro-batch, as many on every rank; padding ones have weight 0.
            mbs = par.pad_micro_batches([slice(i, i + size) for i in range(0, len(mine), size)])
            for k, (sl, keep) in enumerate(mbs):
                part = [pairs[j] for j in mine[sl]]
                n = len(part)
                with par.grad_sync(policy.fwd, sync=k == len(mbs) - 1):
                    sums, (tok_logp, mask) = sequence_logps(policy.fwd, part, pad, device)  # [2n]
                    if ref_cache is not None:
                        cached = ref_cache[mine[sl]]  # [n, 2]
                        ref_c, ref_r = cached[:, 0], cached[:, 1]
                    else:
                        with torch.no_grad():
                            ref_sums, _ = sequence_logps(policy.ref, part, pad, device)
                        ref_c, ref_r = ref_sums[:n], ref_sums[n:]
                    lens = mask.sum(1).float()  # [2n]
                    loss, parts = dpo_loss(sums[:n], sums[n:], ref_c, ref_r, hp.beta, hp.loss, hp.label_smoothing,
                                           lens[:n], lens[n:])
                    # dpo_loss is a mean over pairs: weighted by the batch's share, the micro-batches
                    # of all ranks add up to the batch's loss
                    share = keep * n / len(idx)
                    total = loss * share
                    if hp.nll_coef:  # a token mean over the whole batch's chosen tokens, like aggregate's
                        nll = -(tok_logp[:n] * mask[:n]).sum() / n_chosen_tok * keep
                        total = total + hp.nll_coef * nll
                        metrics["loss/nll"] = metrics.get("loss/nll", 0.0) + float(nll.detach())
                    (total * W).backward()  # DDP and FSDP2 average over the W ranks
                loss_v += total.item()
                metrics.update({key: metrics.get(key, 0.0) + v * share for key, v in parts.items()})
            grad_norm, lr = optimizer_step(policy.fwd, opt, sched, cfg.optim.max_grad_norm)
            push_weights(engine, policy.model)
            metrics = par.sum_dict({**metrics, "loss": loss_v})  # the ranks' shares add up
            loss_v = metrics.pop("loss")
            step.done({"loss": loss_v, **metrics, "grad_norm": grad_norm, "lr": lr}, bar={"loss": f"{loss_v:.3f}"})

        return run.finish(eval_headline, model=policy.model)
