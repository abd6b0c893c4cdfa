"""The GRPO loop, top to bottom.

One step:
    B prompts -> G completions each (rollout engine) -> rewards in [0, 1] (verifiers)
    -> group-normalised advantages -> token log-probs (policy, old policy when epochs > 1,
    reference when beta > 0) -> clipped policy loss + beta * KL -> clipped gradient step(s)
    -> push weights to the engine -> metrics; periodic evaluation and checkpoints.

Where this differs from the DeepSeekMath GRPO paper (Shao et al., 2024), and why:
- Loss aggregation is an option (`algorithm.loss_agg`). The default `token_mean` averages over all
  tokens of the batch (DAPO) instead of per sequence first (`seq_mean_token_mean`, the paper),
  which gives long wrong answers as much weight per token as short ones.
- The clip range may be asymmetric (`clip_high` > `clip_low`, DAPO's clip-higher).
- Advantages may skip the std division (`adv_scale=none`, Dr. GRPO) or use the batch std.
- The KL term uses the k3 estimator by default, as the paper does, but k1/k2 are options, and
  beta = 0 drops the reference model entirely (no extra forward pass).
- The reference model stays frozen for the whole run (the paper's iterative variant refreshes it).
- Rewards come from verifiers, or a learned reward model (`reward_model.path`), or both.
- Each of the `epochs` passes over a batch is one optimizer step on the whole batch (gradient
  accumulation over micro-batches), rather than shuffled mini-batches.
- Log-probs are taken at the sampling temperature (logits / T), matching what the engine sampled.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from grpo.parts import checkpoint
from grpo.parts import config as C
from grpo.algorithm.advantages import group_advantages
from grpo.parts.batch import batch_logprobs, engine_logprobs, group_logprobs, pack, pack_groups, supports_shared_prompt
from grpo.parts.config import ConfigError
from grpo.parts.distributed import OnDevice, Parallel, full_tensor, shard
from grpo.parts.evaluation import policy_eval
from grpo.algorithm.losses import policy_loss
from grpo.parts.modeling import (AdaptersOff, apply_lora, disable_dropout, is_lora, load_model, load_tokenizer,
                           pick_device, plain_copy)
from grpo.parts.optim import build_optimizer, build_scheduler
from grpo.parts.reward_sources import RewardInputs, build_rewards
from grpo.parts.rollout import build_engine, encode_prompts, push_weights, sampling_params, task_prompts
from grpo.tasks.base import TaskError, build_task
from grpo.parts.tracking import Silent, Tracker, due

log = logging.getLogger(__name__)


def micro_batches(lengths: list[int], unit: int, size: int = 0, budget: int = 0) -> list[slice]:
    """Slices over the N = len(lengths) * unit rows of a step, each a run of whole units (a group
    in the shared-prompt layout, one row in the padded one) of at most `size` rows (0 = no limit,
    at least one unit) and, with a budget, at most `budget` tokens as the forward pays for them:
    units x the longest unit's length (at least one unit)."""
    per = max(1, size // unit) if size else len(lengths)
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        count = i - start
        if count and (count >= per or (budget and (count + 1) * max(longest, n) > budget)):
            out.append(slice(start * unit, i * unit))
            start, longest = i, 0
        longest = max(longest, n)
    out.append(slice(start * unit, len(lengths) * unit))
    return out


class Trainer:
    def __init__(self, cfg: C.TrainConfig, run_dir: Path, raw_cfg: dict[str, Any] | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t, a, r, m = cfg.trainer, cfg.algorithm, cfg.rollout, cfg.model
        self.t, self.a = t, a
        if r.temperature <= 0 and a.group_size > 1:
            raise ConfigError("rollout.temperature=0 makes the G samples of a prompt identical (no learning signal): "
                              "use a temperature > 0 for training")
        if not cfg.task.get("verifiers") and not cfg.reward_model.path:
            raise ConfigError("task.verifiers is not set: name at least one verifier, e.g. task.verifiers=[math], "
                              "or give a reward model (reward_model.path)")
        self.G, self.B = a.group_size, t.prompts_per_step
        pc = cfg.parallel
        self.par = par = Parallel(pc.strategy, pick_device(m.device), pc.mixed_precision)
        W = par.world
        par.require(self.B, f"trainer.prompts_per_step={self.B}")
        if m.lora.r and par.sharded:
            raise ConfigError("model.lora with parallel=fsdp2 is not supported yet: use parallel=ddp")
        # Every rank reads the same prompt order (the task's seed) and samples its own stream.
        checkpoint.seed_everything(checkpoint.rank_seed(t.seed, par.rank))

        # Everything that can fail on user input is built before the first step.
        self.task = build_task(cfg.task, seed=t.seed)
        self.eval_set = self.task.eval_samples()[: t.eval_size]
        if not self.eval_set:
            raise TaskError("the task holds out no samples for evaluation")
        par.require(len(self.eval_set), f"the task holds out {len(self.eval_set)} samples for evaluation", TaskError)
        self.device = par.device
        self.ckpt = checkpoint.begin(self.run_dir, t.resume, par=par)
        self.tok = load_tokenizer(m.path)
        rm = cfg.reward_model
        self.rewards, self.verifiers, self.rm = build_rewards(
            cfg.task.get("verifiers"), cfg.verifier.fail_fast, cfg.verifier.timeout, rm.path, self.tok,
            "cpu" if pc.ref_on_cpu else self.device, m.dtype, rm.weight, rm.verifier_weight, rm.squash, rm.scale,
            rm.batch_size)
        # A one-process checkpoint holds the policy as a model folder (its adapters with LoRA); a
        # sharded one is loaded into the wrapped model below.
        whole = checkpoint.has_folders(self.ckpt)
        lo = m.lora
        policy = load_model(checkpoint.model_source(self.ckpt if not lo.r else None, m.path), m.dtype,
                            m.gradient_checkpointing, self.device)
        disable_dropout(policy)  # the base model's; LoRA's own dropout is model.lora.dropout
        self.policy = apply_lora(policy, lo.r, lo.alpha, lo.dropout, lo.target_modules,
                                 adapter=str(self.ckpt / "model") if whole and lo.r else None)
        self.policy.train()
        if lo.r and lo.save_merged and W > 1:
            log.warning("model.lora.save_merged: a run on several processes writes sharded checkpoints, with no "
                        "merged/ folder: `grpo export CKPT OUT` writes the merged model")
        # With LoRA the reference is the base model: the policy with its adapters off (no second copy).
        ref = None
        if a.beta > 0 and not lo.r:
            ref = load_model(m.path, m.dtype, device="cpu" if pc.ref_on_cpu else self.device)
            ref.eval().requires_grad_(False)
        # The shared-prompt layout gives the padded layout's log-probs (tests/test_shared_prompt.py)
        # at a fraction of the prompt's cost; models whose attention takes no custom mask fall back.
        models = [x for x in (self.policy, ref) if x is not None]
        self.shared_prompt = t.shared_prompt and self.G > 1 and all(supports_shared_prompt(x) for x in models)
        if t.shared_prompt and self.G > 1 and not self.shared_prompt:
            log.info("trainer.shared_prompt: %s attention takes no custom mask; using one padded row per completion",
                     self.policy.config._attn_implementation)
        # Every pass goes through the wrapper, where DDP and FSDP2 hook in (grpo/distributed.py).
        self.fwd = par.wrap(self.policy)
        if lo.r and a.beta > 0:
            self.ref = AdaptersOff(self.fwd, self.policy)
        elif ref is not None:
            self.ref = OnDevice(ref, "cpu", self.device) if pc.ref_on_cpu else par.wrap(ref, trainable=False)
        else:
            self.ref = None
        self.engine = build_engine(r, self.policy, self.tok, m.path, m.dtype, m.device, lambda: task_prompts(self.task),
                                   t.system_prompt, par, self.fwd)

        o = cfg.optim
        self.opt = build_optimizer(self.fwd.parameters(), o.lr, o.betas, o.weight_decay, o.name)
        # One optimizer step per epoch over a batch: the schedule (and its warm-up) counts optimizer steps.
        self.sched = build_scheduler(self.opt, o.schedule, o.warmup_steps, t.max_steps * a.epochs, o.min_lr_rate)
        self.step, self.data_pos = 0, 0
        if self.ckpt:
            st = checkpoint.restore_run(self.ckpt, par, {"model": (self.policy, self.opt)}, {"scheduler": self.sched},
                                    t.seed)
            self.step, self.data_pos = st["step"], st["data_pos"]
            log.info("resumed from %s at step %d", self.ckpt, self.step)
        self.tracker = (Tracker(cfg.logger, self.run_dir, raw_cfg or C.to_dict(cfg), self.step if self.ckpt else None,
                                t.max_steps, "grpo") if par.main else Silent())
        self.sampling = sampling_params(r)

    # ---- one step -------------------------------------------------------------------------
    def encode_prompts(self, samples) -> list[list[int]]:
        return encode_prompts(self.tok, samples, self.t.system_prompt)

    def train_step(self) -> dict[str, float]:
        t0 = time.time()
        par = self.par
        lo, hi = shard(self.B, par.rank, par.world)  # this rank's prompts of the step's B
        samples = [self.task.train_sample(self.data_pos + i) for i in range(lo, hi)]
        self.data_pos += self.B
        ro = self.engine.generate(self.encode_prompts(samples), self.G, self.sampling)
        t1 = time.time()
        fields = [s.fields() for s in samples for _ in range(self.G)]  # [n] prompt-major, like ro
        scored = self.rewards(RewardInputs.from_rollout(ro, fields))
        # Every rank gets the step's N rewards (rank-major = prompt-major): the advantages and the
        # reward metrics are those of the whole batch, whatever the process count.
        rewards = torch.tensor([x for part in par.gather(scored.rewards) for x in part])  # [N]
        t2 = time.time()
        metrics = self.update(ro, rewards, lo * self.G)
        t3 = time.time()
        N, groups = len(rewards), rewards.view(-1, self.G)
        return {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if N > 1 else 0.0,
            **par.reduce_metrics(scored.metrics, len(ro.completion_ids)),
            "groups/zero_std_frac": float((groups.std(1) == 0).float().mean()) if self.G > 1 else 1.0,
            **metrics,
            "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2, "time/step": t3 - t0,
        }

    def update(self, ro, rewards: torch.Tensor, offset: int) -> dict[str, float]:
        """The optimizer step(s) on this rank's completions `ro`, rows offset .. offset + n of the
        step's batch, whose N rewards [N] every rank holds; the weights then go to the engine."""
        a, par, W = self.a, self.par, self.par.world
        t2 = time.time()
        n = len(ro.completion_ids)
        adv = group_advantages(rewards, self.G, a.adv_scale, a.adv_eps)[offset:offset + n].to(self.device)  # [n]
        pad = self.tok.pad_token_id
        if self.shared_prompt:  # one row per group: its prompt once, then its G completions
            batch = pack_groups(ro.prompt_ids, ro.completion_ids, self.G, pad).to(self.device)
            logprobs, unit, lengths = group_logprobs, self.G, batch.lengths.tolist()
        else:  # one padded row per completion
            batch = pack(ro.prompt_ids, ro.completion_ids, pad).to(self.device)
            logprobs, unit, lengths = batch_logprobs, 1, [batch.input_ids.shape[1]] * n
        mask = batch.mask  # [n, T]
        T = mask.shape[1]
        # The normaliser is global: the step's real tokens (and rows) on all ranks. DDP and FSDP2
        # average gradients over the W ranks, so each rank divides its sum by N_global / W.
        tokens, rows = par.sum([float(mask.sum()), float(n)])
        tokens = max(tokens, 1.0)
        # (slice, weight) per micro-batch, as many on every rank; padding ones have weight 0.
        mbs = par.pad_micro_batches(micro_batches(lengths, unit, self.t.micro_batch_size, self.t.max_tokens_per_batch))
        temp = self.sampling.temperature or 1.0
        clock = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}

        def frozen(model):  # log-probs of every real micro-batch without gradients, [n, T]
            outs = [(w, model(batch[s], temp, fn=logprobs)) for s, w in mbs]
            return torch.cat([o.to(self.device) for w, o in outs if w])

        with torch.no_grad():
            old_logp = frozen(self.fwd) if a.epochs > 1 else None
            ref_logp = frozen(self.ref) if self.ref is not None else None
        t_ref = time.time()

        # The engine's sampling log-probs of the sampled tokens, [n, T] like the trainer's.
        eng = engine_logprobs(ro.logprobs, T, self.device)  # [n, T]

        first_logp = torch.zeros(n, T, device=self.device)
        acc: dict[str, float] = {}
        for epoch in range(a.epochs):
            self.opt.zero_grad(set_to_none=True)
            for i, (s, weight) in enumerate(mbs):
                tf = time.time()
                with par.grad_sync(self.fwd, sync=i == len(mbs) - 1):  # reduce once, after the last
                    logp, ent = self.fwd(batch[s], temp, fn=logprobs, with_entropy=True)  # [k, T]
                    old = old_logp[s] if old_logp is not None else logp.detach()
                    # Truncated importance sampling: reweight tokens the engine sampled with a slightly
                    # different distribution than the trainer's (off when tis_cap = 0).
                    tis = (old - eng[s]).exp().clamp(max=a.tis_cap) if a.tis_cap > 0 else None
                    loss, m = policy_loss(
                        logp, old, adv[s], mask[s], a.clip_low, a.clip_high,
                        ref_logp[s] if ref_logp is not None else None, a.beta, a.loss_agg,
                        max_len=self.sampling.max_new_tokens, kl_estimator=a.kl_estimator, is_weights=tis,
                        num_tokens=tokens / W, num_rows=rows / W)
                    tb = time.time()
                    (loss * weight).backward()  # micro-batch losses over the global normaliser add up
                clock["forward"] += tb - tf
                clock["backward"] += time.time() - tb
                if not weight:
                    continue
                w = float(mask[s].sum()) / tokens  # this micro-batch's share of the step's tokens
                if epoch == a.epochs - 1:  # clipping only happens after the first update
                    for k, v in m.items():
                        if k.startswith(("clip/", "ratio/")):
                            acc[k] = acc.get(k, 0.0) + w * v
                if epoch == 0:
                    first_logp[s] = logp.detach()
                    acc["kl"] = acc.get("kl", 0.0) + w * m["kl"]
                    acc["entropy"] = acc.get("entropy", 0.0) + float((ent * mask[s]).sum()) / tokens
                    acc["loss"] = acc.get("loss", 0.0) + float(loss.detach()) / W  # the ranks' shares add up
            to = time.time()
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.fwd.parameters(), self.cfg.optim.max_grad_norm))
            lr = self.sched.get_last_lr()[0]  # the rate this step uses
            self.opt.step()
            self.sched.step()
            clock["optimizer"] += time.time() - to
        push_weights(self.engine, self.policy)

        # The engine's log-probs against the trainer's for the same tokens, before the update.
        gap = (eng - first_logp).abs() * mask  # [n, T]
        lengths = mask.sum(1).float()
        # the ranks' shares and counts, in one all-reduce
        totals = par.sum_dict({**acc, "gap": float(gap.sum()), "len": float(lengths.sum()),
                               "finished": float(sum(ro.finished))})
        gap_sum, len_sum, finished = (totals.pop(k) for k in ("gap", "len", "finished"))
        maxima = par.gather((float(lengths.max()), float(gap.max())))
        return {
            **totals,
            "grad_norm": float(grad_norm),
            "lr": lr,
            "completion/len_mean": len_sum / rows,
            "completion/len_max": max(x[0] for x in maxima),
            "completion/truncated_frac": 1.0 - finished / rows,
            "rollout/logprob_abs_diff/mean": gap_sum / tokens,
            "rollout/logprob_abs_diff/max": max(x[1] for x in maxima),
            # the update's split: old-policy and reference forwards, then the policy's own
            "time/ref_forward": t_ref - t2, **{f"time/{k}": v for k, v in clock.items()},
        }

    # ---- evaluation, checkpoints ------------------------------------------------------------
    def run_eval(self) -> dict[str, float]:
        t0 = time.time()
        metrics, table = policy_eval(
            self.engine, self.encode_prompts(self.eval_set), self.eval_set, self.sampling,
            sampling_params(self.cfg.rollout, greedy=True), self.verifiers or self.rewards, self.rm,
            seed=self.t.seed + 1_000_003 * (self.step + 1), log_samples=self.t.log_samples,
            kl_models=(self.fwd, self.ref) if self.ref is not None else None, pad_id=self.tok.pad_token_id,
            kl_batch_size=self.t.micro_batch_size or 256, par=self.par)
        metrics["time/eval"] = time.time() - t0
        self.tracker.log(metrics, self.step)
        self.tracker.log_samples(table, self.step)
        return metrics

    def save(self) -> Path:
        # merged/ beside a one-process checkpoint's adapters (a sharded one has none: grpo export merges)
        merge = is_lora(self.policy) and self.cfg.model.lora.save_merged and self.par.world == 1
        return checkpoint.save_run(self.run_dir, self.step, self.par, {"model": (self.policy, self.opt)}, self.tok,
                                   {"scheduler": self.sched}, {"data_pos": self.data_pos}, self.t.keep_checkpoints,
                                   {"merged": plain_copy(self.policy)} if merge else None)

    # ---- the loop ------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.t
        if self.ckpt:
            first_eval, last_eval = self.tracker.past_evals("eval/reward/mean")
        else:
            first_eval = last_eval = self.run_eval()
        last_ckpt = self.ckpt  # a resumed run with nothing left to do still names its checkpoint
        try:
            while self.step < t.max_steps:
                metrics = self.train_step()
                self.step += 1
                self.tracker.log(metrics, self.step)
                post = {"reward": f"{metrics['reward/mean']:.3f}"}
                if due(self.step, t.eval_every, t.max_steps):
                    last_eval = self.run_eval()
                    first_eval = first_eval or last_eval
                if last_eval:
                    post["eval"] = f"{last_eval['eval/reward/mean']:.3f}"
                self.tracker.advance(post)
                if due(self.step, t.save_every, t.max_steps):
                    last_ckpt = self.save()
        finally:
            self.tracker.close()
            for part in {id(p): p for p in (self.rewards, self.verifiers, self.engine) if p is not None}.values():
                part.close()
        return {"run_dir": str(self.run_dir), "checkpoint": str(last_ckpt) if last_ckpt else None,
                "first_eval": first_eval, "last_eval": last_eval, "steps": self.step}


def train(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    trainer = Trainer(C.parse(C.TrainConfig, raw), run_dir, raw)
    summary = trainer.fit()
    if not trainer.par.main:
        return summary
    fe, le = summary["first_eval"], summary["last_eval"]
    lines = [f"run dir:     {summary['run_dir']}", f"metrics:     {Path(summary['run_dir']) / 'metrics.jsonl'}",
             f"checkpoint:  {summary['checkpoint']}"]
    if fe and le:
        lines.append(f"eval reward: {fe['eval/reward/mean']:.3f} -> {le['eval/reward/mean']:.3f}   "
                     f"greedy pass@1: {fe['eval/pass@1']:.3f} -> {le['eval/pass@1']:.3f}")
    print("\n".join(["", "done after %d steps" % summary["steps"], *lines]))
    return summary
