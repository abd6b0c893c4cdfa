"""`grpo ppo`: PPO with a critic against a reward model (InstructGPT's RL stage), top to bottom.

One step:
    B prompts -> n completions each (rollout engine) -> score per completion (the reward model's
    normalised score, or the verifiers' reward) -> log-probs of the sampling policy and the frozen
    reference, and the critic's values, per token -> rewards r_t = -beta * KL_t, plus the score at
    the last real token (ppo_rewards) -> GAE advantages and returns -> advantages whitened ->
    `ppo.epochs` passes over `ppo.minibatches` shuffled minibatches: clipped policy loss +
    vf_coef x clipped value loss (+ ptx_coef x LM loss on pretraining rows, PPO-ptx) -> push
    the weights to the engine -> adapt beta (Ziegler et al.) -> metrics; evaluation, checkpoints.

Where this differs from InstructGPT (Ouyang et al., 2022) and why:
- The critic is its own copy of the reward model (as in the paper; `ppo.value_model` names
  another) with its own optimizer; without a reward model it starts from the policy's weights
  with a zero value head. `ppo.value=shared` puts a zero-initialised value head on the policy's
  own trunk instead (half the memory; the value loss then also shapes the policy's trunk).
- The KL estimator is an option (k1 by default, as the paper; k3 has lower variance).
- PPO-ptx mixes the LM loss of `ppo.ptx_path` rows (prompt/completion, as grpo sft reads) into the
  same gradients: InstructGPT's objective 2 with gamma = ptx_coef.
Invariants checked at run time: at the first minibatch of every step the ratio is 1 (the
trainer's log-probs are the sampling policy's) and the engine/trainer log-prob gap is logged; a
non-finite loss skips that minibatch's update with a warning.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo.parts import checkpoint
from grpo.parts import config as C
from grpo.parts.batch import RolloutBatch, batch_logprobs, engine_logprobs, pack
from grpo.parts.distributed import OnDevice, Parallel, call, full_tensor, shard
from grpo.parts.evaluation import policy_eval
from grpo.algorithm.kl import kl_penalty
from grpo.algorithm.losses import policy_loss
from grpo.parts.modeling import disable_dropout, load_model, load_tokenizer, pick_device
from grpo.parts.optim import build_optimizer, build_scheduler
from grpo.parts.reward_model import init_reward_model, load_reward_model
from grpo.parts.reward_sources import RewardInputs, build_rewards
from grpo.parts.rollout import build_engine, encode_prompts, push_weights, sampling_params, task_prompts
from grpo.tasks.base import TaskError, build_task
from grpo.parts.tracking import Silent, Tracker, due
from grpo.algorithm.value import AdaptiveKL, gae, ppo_rewards, value_loss, whiten

log = logging.getLogger(__name__)


@dataclass
class PPOOptions:
    samples: int = C.num(1, ge=1)  # completions per prompt
    epochs: int = C.num(2, ge=1)  # passes over each batch
    minibatches: int = C.num(2, ge=1)  # per epoch
    clip: float = C.num(0.2, gt=0)
    value_clip: float = C.num(0.2, gt=0)
    vf_coef: float = C.num(0.1, ge=0)
    gamma: float = C.num(1.0, ge=0, le=1)
    lam: float = C.num(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    kl_estimator: str = C.choice("k1", "k1", "k3")
    beta: float = C.num(0.05, ge=0)  # the KL coefficient (the initial one with kl_target)
    kl_target: float | None = C.num(None, gt=0)  # per-sequence KL (nats); null = fixed beta
    kl_horizon: float = C.num(10000.0, gt=0)
    missing_eos_penalty: float | None = C.num(None, ge=0)  # subtracted from the score of a cut completion
    score_clip: float | None = C.num(None, gt=0)  # clip scores to [-c, c]
    critic_warmup_steps: int = C.num(0, ge=0)  # steps that train the critic only
    value: str = C.choice("separate", "separate", "shared")  # a critic of its own, or a head on the policy
    value_model: str | None = None  # the critic's init (a reward model); null = reward_model.path
    value_lr: float | None = C.num(None, ge=0)  # null = optim.lr
    ptx_coef: float = C.num(0.0, ge=0)  # PPO-ptx gamma
    ptx_path: str | None = None  # prompt/completion rows (as grpo sft reads) for the ptx LM loss
    ptx_batch_size: int = C.num(8, ge=1)


@dataclass
class PPOTrainer:
    max_steps: int = C.num(100, ge=0)
    prompts_per_step: int = C.num(32, ge=1)
    eval_every: int = C.num(20, ge=0)
    eval_size: int = C.num(128, ge=1)
    save_every: int = C.num(0, ge=0)
    keep_checkpoints: int = C.num(2, ge=0)
    seed: int = 0
    resume: Any = False
    system_prompt: str | None = None
    log_samples: int = C.num(8, ge=0)


@dataclass
class PPOConfig:
    model: C.Model = C.group(C.Model)
    task: dict = C.field(default_factory=dict)
    rollout: C.Rollout = C.group(C.Rollout)
    reward_model: C.RewardModel = C.group(C.RewardModel)
    ppo: PPOOptions = C.group(PPOOptions)
    trainer: PPOTrainer = C.group(PPOTrainer)
    optim: C.Optim = C.group(C.Optim)
    logger: C.Logger = C.group(C.Logger)
    verifier: C.Verifier = C.group(C.Verifier)
    parallel: C.Parallel = C.group(C.Parallel)


class SharedValue(torch.nn.Module):
    """A value head on the policy's own trunk (ppo.value=shared): the critic interface of a scalar-head
    model (`base_model_prefix` and `score`), whose only parameters of its own are the head's."""

    def __init__(self, policy):
        super().__init__()
        self.base_model_prefix = "trunk"
        object.__setattr__(self, "trunk", getattr(policy, policy.base_model_prefix))  # shared, not registered
        self.score = torch.nn.Linear(policy.config.hidden_size, 1, bias=False)
        torch.nn.init.zeros_(self.score.weight)  # values start at 0
        self.score.to(next(policy.parameters()).device)


def token_values(critic, batch: RolloutBatch) -> torch.Tensor:
    """The critic's value of each completion token's state [N, T]: its head on the hidden state that
    chooses the token (position P - 1 + t, as the logits that score it)."""
    trunk = getattr(critic, critic.base_model_prefix)
    hidden = trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).last_hidden_state  # [N, P+T, H]
    T = batch.T
    return critic.score(hidden[:, -T - 1:-1]).squeeze(-1).float()  # [N, T]


def ptx_rows(path: str, tok, system_prompt: str | None):
    from grpo.commands.sft import encode_rows
    from grpo.tasks.file import located_rows

    pairs = encode_rows(tok, located_rows(path), "prompt", "completion", system_prompt)
    if not pairs:
        raise TaskError(f"{path}: no ptx rows")
    return pairs


def ptx_loss(policy, pairs, batch_size: int, seed: str, pad_id: int, device) -> torch.Tensor:
    """Token-mean LM loss of the completions of `batch_size` rows drawn (seeded) from `pairs`."""
    from grpo.commands.sft import batch_tensors

    rng = random.Random(seed)
    rows = [pairs[rng.randrange(len(pairs))] for _ in range(batch_size)]
    ids, attn, labels = (x.to(device) for x in batch_tensors(rows, pad_id))
    return policy(input_ids=ids, attention_mask=attn, labels=labels).loss


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, par=None) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens (of all ranks, with `par`)."""
    m = mask.bool()
    r, v = returns[m].double(), values[m].double()
    n, sr, sr2, sd, sd2 = (par.sum if par is not None else list)(
        [float(r.numel()), float(r.sum()), float((r * r).sum()), float((r - v).sum()), float(((r - v) ** 2).sum())])
    if n < 2:
        return float("nan")
    var_r = (sr2 - sr * sr / n) / (n - 1)
    var_d = (sd2 - sd * sd / n) / (n - 1)
    return float(1 - var_d / var_r) if var_r > 0 else float("nan")


def minibatch_rows(order: torch.Tensor, offset: int, n: int) -> torch.Tensor:
    """The rows of global minibatch `order` (indices into the step's N rows) that this rank holds,
    rows offset .. offset + n, as local indices."""
    mine = order[(order >= offset) & (order < offset + n)]
    return mine - offset


def run_ppo(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    cfg = C.parse(PPOConfig, raw)
    t, m, o, p, rm = cfg.trainer, cfg.model, cfg.optim, cfg.ppo, cfg.reward_model
    run_dir = Path(run_dir)
    pc = cfg.parallel
    par = Parallel(pc.strategy, pick_device(m.device), pc.mixed_precision)
    W = par.world
    par.require(t.prompts_per_step, f"trainer.prompts_per_step={t.prompts_per_step}")
    if W > 1 and p.value == "shared":
        raise C.ConfigError("ppo.value=shared under torchrun is not supported yet: use ppo.value=separate")
    ckpt = checkpoint.begin(run_dir, t.resume, t.seed, par)
    if not cfg.task.get("verifiers") and not rm.path:
        raise C.ConfigError("ppo needs a reward: set reward_model.path or task.verifiers")
    if p.ptx_coef > 0 and not p.ptx_path:
        raise C.ConfigError("ppo.ptx_coef > 0 needs ppo.ptx_path (prompt/completion rows)")
    value_src = p.value_model or rm.path  # None: the policy's weights with a new head (no reward model to start from)
    task = build_task(cfg.task, seed=t.seed)
    eval_set = task.eval_samples()[: t.eval_size]
    if not eval_set:
        raise TaskError("the task holds out no samples for evaluation")
    par.require(len(eval_set), f"the task holds out {len(eval_set)} samples for evaluation", TaskError)
    device = par.device
    tok = load_tokenizer(m.path)
    rewards, verifiers, reward_model = build_rewards(cfg.task.get("verifiers"), cfg.verifier.fail_fast,
                                                     cfg.verifier.timeout, rm.path, tok,
                                                     "cpu" if pc.ref_on_cpu else device, m.dtype, **rm.judge_options())
    policy = load_model(checkpoint.model_source(ckpt, m.path), m.dtype, m.gradient_checkpointing, device)
    disable_dropout(policy)
    policy.train()
    ref = load_model(m.path, m.dtype, device="cpu" if pc.ref_on_cpu else device).eval().requires_grad_(False)
    whole = checkpoint.has_folders(ckpt)  # a one-process checkpoint holds the critic's folder
    if p.value == "shared":
        critic = SharedValue(policy)  # its head comes back from state.pt on resume
    elif whole or value_src:  # strict: a checkpoint's or a reward model's head must be there
        critic = load_reward_model(str(ckpt / "value") if whole else value_src, m.dtype, device)
    else:
        critic = init_reward_model(m.path, m.dtype, device, tok.pad_token_id)
        torch.nn.init.zeros_(critic.score.weight)  # values start at 0, not at noise
        log.info("ppo: no reward model: the critic starts from %s with a new, zero value head", m.path)
    if p.value == "separate":
        disable_dropout(critic)
    critic.train()
    # Every pass goes through the wrappers, where DDP and FSDP2 hook in (grpo/distributed.py).
    fwd = par.wrap(policy)
    cwd = par.wrap(critic) if p.value == "separate" else critic
    ref = OnDevice(ref, "cpu", device) if pc.ref_on_cpu else par.wrap(ref, trainable=False)
    ptx = ptx_rows(p.ptx_path, tok, t.system_prompt) if p.ptx_coef > 0 else None
    engine = build_engine(cfg.rollout, policy, tok, m.path, m.dtype, m.device, lambda: task_prompts(task),
                          t.system_prompt, par, fwd)
    updates = t.max_steps * p.epochs * p.minibatches  # optimizer steps
    opt = build_optimizer(fwd.parameters(), o.lr, o.betas, o.weight_decay, o.name)
    sched = build_scheduler(opt, o.schedule, o.warmup_steps, updates, o.min_lr_rate)
    vopt = build_optimizer(cwd.parameters(), p.value_lr if p.value_lr is not None else o.lr, o.betas, o.weight_decay,
                           o.name)
    vsched = build_scheduler(vopt, o.schedule, o.warmup_steps, updates, o.min_lr_rate)
    kl_ctl = AdaptiveKL(p.beta, p.kl_target, p.kl_horizon)
    stateful = {"scheduler": sched, "value_scheduler": vsched, "kl_controller": kl_ctl}
    models = {"model": (policy, opt), "value": (critic, vopt)}
    if p.value == "shared":  # the head alone: the trunk is the policy's
        stateful["value_head"] = critic.score
        models = {"model": (policy, opt)}
        stateful["value_optimizer"] = vopt
    step, data_pos = 0, 0
    if ckpt:
        st = checkpoint.restore_run(ckpt, par, models, stateful, t.seed)
        step, data_pos = st["step"], st["data_pos"]
    tracker = Tracker(cfg.logger, run_dir, raw, step if ckpt else None, t.max_steps, "ppo") if par.main else Silent()
    sampling, greedy = sampling_params(cfg.rollout), sampling_params(cfg.rollout, greedy=True)
    temp = sampling.temperature or 1.0
    pad = tok.pad_token_id
    eval_prompts = encode_prompts(tok, eval_set, t.system_prompt)

    def run_eval() -> dict[str, float]:
        metrics, table = policy_eval(engine, eval_prompts, eval_set, sampling, greedy, verifiers or rewards, reward_model,
                                     seed=t.seed + 1_000_003 * (step + 1), log_samples=t.log_samples,
                                     kl_models=(fwd, ref), pad_id=pad, par=par)
        tracker.log(metrics, step)
        tracker.log_samples(table, step)
        return metrics

    first, last = tracker.past_evals("eval/reward/mean") if ckpt else (run_eval(),) * 2
    try:
        while step < t.max_steps:
            t0 = time.time()
            lo, hi = shard(t.prompts_per_step, par.rank, W)  # this rank's prompts of the step's B
            samples = [task.train_sample(data_pos + i) for i in range(lo, hi)]
            data_pos += t.prompts_per_step
            ro = engine.generate(encode_prompts(tok, samples, t.system_prompt), p.samples, sampling)
            fields = [s.fields() for s in samples for _ in range(p.samples)]
            scored = rewards(RewardInputs.from_rollout(ro, fields))
            score = torch.tensor(scored.scores if scored.scores is not None else scored.rewards, device=device)  # [n]
            finished = torch.tensor(ro.finished, device=device)  # [n]
            if p.missing_eos_penalty:
                score = score - p.missing_eos_penalty * (~finished).float()
            if p.score_clip:
                score = score.clamp(-p.score_clip, p.score_clip)

            batch = pack(ro.prompt_ids, ro.completion_ids, pad).to(device)
            mask = batch.mask  # [n, T] this rank's rows: offset .. offset + n of the step's N
            n, T = mask.shape
            offset = lo * p.samples
            N = int(par.sum([float(n)])[0])
            with torch.no_grad():
                old_logp = batch_logprobs(fwd, batch, temp)  # [n, T]
                ref_logp = batch_logprobs(ref, batch, temp)  # [n, T]
                old_values = call(cwd, token_values, batch)  # [n, T]
                kl = kl_penalty(old_logp, ref_logp, p.kl_estimator) * mask  # [n, T]
                token_rewards = ppo_rewards(score, kl, mask, kl_ctl.value)  # [n, T]
                adv, returns = gae(token_rewards, old_values, mask, p.gamma, p.lam)  # [n, T]
                if p.whiten_advantages:  # over the whole batch's tokens, on all ranks
                    adv = whiten(adv, mask, reduce=par.sum if W > 1 else None)
            eng = engine_logprobs(ro.logprobs, T, device)  # [n, T] the engine's sampling log-probs
            gap_sum, tokens = par.sum([float(((eng - old_logp).abs() * mask).sum()), float(mask.sum())])

            train_policy = step >= p.critic_warmup_steps
            # each entry: this rank's share of a minibatch's value (the shares add up over ranks)
            acc: dict[str, list[float]] = {}
            gen = torch.Generator().manual_seed(t.seed * 1_000_003 + step)  # shuffles resume exactly
            first_ratio = None
            for epoch in range(p.epochs):
                order = torch.randperm(N, generator=gen)
                for chunk in order.chunk(min(p.minibatches, N)):
                    idx = minibatch_rows(chunk, offset, n).to(device)
                    keep = 1.0 if len(idx) else 0.0  # a rank with no row here runs row 0 at weight 0
                    idx = idx if len(idx) else torch.zeros(1, dtype=torch.long, device=device)
                    mb_tok = float(mask[idx].sum()) * keep
                    mb_tokens = max(par.sum([mb_tok])[0], 1.0)  # the minibatch's tokens on all ranks
                    mb = batch[idx]
                    logp = batch_logprobs(fwd, mb, temp)  # [k, T]
                    pl, pm = policy_loss(logp, old_logp[idx], adv[idx], mask[idx], p.clip, p.clip,
                                         num_tokens=mb_tokens / W)
                    values = call(cwd, token_values, mb)  # [k, T]
                    vl, vm = value_loss(values, old_values[idx], returns[idx], mask[idx], p.value_clip,
                                        num_tokens=mb_tokens / W)
                    loss = ((pl if train_policy else 0.0 * pl) + p.vf_coef * vl) * keep
                    lm_v = None
                    if ptx is not None and train_policy:  # the same rows on every rank: averaged, unchanged
                        lm = ptx_loss(fwd, ptx, p.ptx_batch_size, f"{t.seed}:ptx:{step}:{epoch}:{int(chunk[0])}", pad,
                                      device)
                        loss = loss + p.ptx_coef * lm
                        lm_v = float(lm.detach())
                    # One all-reduce: whether any rank's loss is non-finite (then every rank skips), and on
                    # the step's first minibatch the ratio's token sum (1 before any update).
                    opening = first_ratio is None  # (not `first`: that is the run's first evaluation)
                    votes = par.sum([0.0 if torch.isfinite(loss) else 1.0] + ([pm["ratio/mean"] * mb_tok] if opening else []))
                    if opening:
                        first_ratio = votes[1] / mb_tokens
                        if abs(first_ratio - 1.0) > 1e-3:
                            log.warning("ppo step %d: the first minibatch's ratio is %.5f, not 1: the trainer's "
                                        "log-probs differ from the sampling policy's", step + 1, first_ratio)
                    if votes[0]:
                        log.warning("ppo step %d: non-finite loss, this minibatch's update is skipped", step + 1)
                        opt.zero_grad(set_to_none=True)
                        vopt.zero_grad(set_to_none=True)
                        acc.setdefault("skipped_updates", []).append(1.0 / W)
                        continue
                    if lm_v is not None:
                        acc.setdefault("loss/ptx", []).append(lm_v / W)
                    loss.backward()
                    gn = full_tensor(torch.nn.utils.clip_grad_norm_(fwd.parameters(), o.max_grad_norm))
                    vgn = full_tensor(torch.nn.utils.clip_grad_norm_(cwd.parameters(), o.max_grad_norm))
                    if train_policy:
                        opt.step()
                    vopt.step()
                    sched.step()
                    vsched.step()
                    opt.zero_grad(set_to_none=True)
                    vopt.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        approxkl = float((0.5 * (logp - old_logp[idx]) ** 2 * mask[idx]).sum()) * keep / mb_tokens
                    w = mb_tok / mb_tokens  # this rank's share of the minibatch's tokens
                    for k, v in (("loss/policy", float(pl.detach()) * keep / W), ("loss/value", float(vl.detach()) * keep / W),
                                 ("policy/clipfrac", pm["clip/frac"] * w), ("policy/approxkl", approxkl),
                                 ("val/clipfrac", vm["val/clipfrac"] * w), ("grad_norm", float(gn) / W),
                                 ("grad_norm/value", float(vgn) / W)):
                        acc.setdefault(k, []).append(v)
            push_weights(engine, policy)
            totals = par.sum_dict({k: sum(v) for k, v in acc.items()})  # each minibatch's shares, over ranks
            # the batch's sequence KL, scores and lengths over all ranks
            kl_sum, score_sum, len_sum, done, val_sum = par.sum([
                float((kl * mask).sum()), float(score.sum()), float(mask.sum()), float(sum(ro.finished)),
                float((old_values * mask).sum())])
            # mean per-sequence KL of this batch (nats); one process sums as it always did
            seq_kl = float((kl * mask).sum(1).mean()) if W == 1 else kl_sum / N
            beta = kl_ctl.value
            kl_ctl.update(seq_kl, N)
            step += 1
            metrics = {
                "objective/scores": score_sum / N,
                "objective/kl": seq_kl,
                "objective/rlhf_reward": score_sum / N - beta * seq_kl,
                # means over the minibatches; skipped_updates is a count
                **{k: v if k == "skipped_updates" else v / len(acc[k]) for k, v in totals.items()},
                "val/mean": val_sum / max(tokens, 1.0),
                "val/explained_var": explained_variance(old_values, returns, mask, par if W > 1 else None),
                "kl/beta": beta,
                "policy/first_ratio": first_ratio,
                "rollout/logprob_abs_diff/mean": gap_sum / max(tokens, 1.0),
                "lr": sched.get_last_lr()[0],
                "completion/len_mean": len_sum / N,
                "completion/no_eos_frac": 1.0 - done / N,
                **par.reduce_metrics({k: v for k, v in scored.metrics.items() if k.startswith(("reward/", "rm/"))}, n),
                "time/step": time.time() - t0,
            }
            tracker.log(metrics, step)
            if due(step, t.eval_every, t.max_steps):
                last = run_eval()
                first = first or last
            post = {"score": f"{metrics['objective/scores']:.3f}"}
            if last:
                post["eval"] = f"{last['eval/reward/mean']:.3f}"
            tracker.advance(post)
            if due(step, t.save_every, t.max_steps):
                checkpoint.save_run(run_dir, step, par, models, tok, stateful, {"data_pos": data_pos}, t.keep_checkpoints)
    finally:
        tracker.close()
        for part in {id(x): x for x in (rewards, verifiers, engine) if x is not None}.values():
            part.close()
    lines = ["", f"done after {step} steps", f"metrics: {run_dir / 'metrics.jsonl'}"]
    if first and last:
        lines.append(f"eval true score: {first['eval/reward/mean']:.3f} -> {last['eval/reward/mean']:.3f}   "
                     f"KL {last.get('eval/kl', math.nan):.2f}")
    if par.main:
        print("\n".join(lines))
    return {"run_dir": str(run_dir), "steps": step, "first_eval": first, "last_eval": last}
