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

from grpo import checkpoint
from grpo import config as C
from grpo.batch import RolloutBatch, batch_logprobs, engine_logprobs, pack
from grpo.evaluate import policy_eval
from grpo.kl import kl_penalty
from grpo.losses import policy_loss
from grpo.modeling import disable_dropout, load_model, load_tokenizer, pick_device
from grpo.optim import build_optimizer, build_scheduler
from grpo.reward_model import init_reward_model, load_reward_model
from grpo.rewards import RewardInputs, build_rewards
from grpo.rollout import build_engine, encode_prompts, sampling_params, task_prompts
from grpo.tasks.base import TaskError, build_task
from grpo.tracking import Tracker, due
from grpo.value import AdaptiveKL, gae, ppo_rewards, value_loss, whiten

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
    from grpo.sft import encode_rows
    from grpo.tasks.file import located_rows

    pairs = encode_rows(tok, located_rows(path), "prompt", "completion", system_prompt)
    if not pairs:
        raise TaskError(f"{path}: no ptx rows")
    return pairs


def ptx_loss(policy, pairs, batch_size: int, seed: str, pad_id: int, device) -> torch.Tensor:
    """Token-mean LM loss of the completions of `batch_size` rows drawn (seeded) from `pairs`."""
    from grpo.sft import batch_tensors

    rng = random.Random(seed)
    rows = [pairs[rng.randrange(len(pairs))] for _ in range(batch_size)]
    ids, attn, labels = (x.to(device) for x in batch_tensors(rows, pad_id))
    return policy(input_ids=ids, attention_mask=attn, labels=labels).loss


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens."""
    m = mask.bool()
    r, v = returns[m], values[m]
    var = r.var() if r.numel() > 1 else torch.tensor(0.0)
    return float(1 - (r - v).var() / var) if var > 0 else float("nan")


def run_ppo(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    cfg = C.parse(PPOConfig, raw)
    t, m, o, p, rm = cfg.trainer, cfg.model, cfg.optim, cfg.ppo, cfg.reward_model
    run_dir = Path(run_dir)
    ckpt = checkpoint.begin(run_dir, t.resume, t.seed)
    if not cfg.task.get("verifiers") and not rm.path:
        raise C.ConfigError("ppo needs a reward: set reward_model.path or task.verifiers")
    if p.ptx_coef > 0 and not p.ptx_path:
        raise C.ConfigError("ppo.ptx_coef > 0 needs ppo.ptx_path (prompt/completion rows)")
    value_src = p.value_model or rm.path  # None: the policy's weights with a new head (no reward model to start from)
    task = build_task(cfg.task, seed=t.seed)
    eval_set = task.eval_samples()[: t.eval_size]
    if not eval_set:
        raise TaskError("the task holds out no samples for evaluation")
    device = pick_device(m.device)
    tok = load_tokenizer(m.path)
    rewards, verifiers, reward_model = build_rewards(cfg.task.get("verifiers"), cfg.verifier.fail_fast,
                                                     cfg.verifier.timeout, rm.path, tok, device, m.dtype,
                                                     **rm.judge_options())
    policy = load_model(str(ckpt / "model") if ckpt else m.path, m.dtype, m.gradient_checkpointing, device)
    disable_dropout(policy)
    policy.train()
    ref = load_model(m.path, m.dtype, device=device).eval().requires_grad_(False)
    if p.value == "shared":
        critic = SharedValue(policy)  # its head comes back from state.pt on resume
    elif ckpt or value_src:  # strict: a checkpoint's or a reward model's head must be there
        critic = load_reward_model(str(ckpt / "value") if ckpt else value_src, m.dtype, device)
    else:
        critic = init_reward_model(m.path, m.dtype, device, tok.pad_token_id)
        torch.nn.init.zeros_(critic.score.weight)  # values start at 0, not at noise
        log.info("ppo: no reward model: the critic starts from %s with a new, zero value head", m.path)
    if p.value == "separate":
        disable_dropout(critic)
    critic.train()
    ptx = ptx_rows(p.ptx_path, tok, t.system_prompt) if p.ptx_coef > 0 else None
    engine = build_engine(cfg.rollout, policy, tok, m.path, m.dtype, m.device, lambda: task_prompts(task),
                          t.system_prompt)
    updates = t.max_steps * p.epochs * p.minibatches  # optimizer steps
    opt = build_optimizer(policy.parameters(), o.lr, o.betas, o.weight_decay, o.name)
    sched = build_scheduler(opt, o.schedule, o.warmup_steps, updates, o.min_lr_rate)
    vopt = build_optimizer(critic.parameters(), p.value_lr if p.value_lr is not None else o.lr, o.betas, o.weight_decay, o.name)
    vsched = build_scheduler(vopt, o.schedule, o.warmup_steps, updates, o.min_lr_rate)
    kl_ctl = AdaptiveKL(p.beta, p.kl_target, p.kl_horizon)
    stateful = {"optimizer": opt, "scheduler": sched, "value_optimizer": vopt, "value_scheduler": vsched,
                "kl_controller": kl_ctl}
    if p.value == "shared":
        stateful["value_head"] = critic.score
    step, data_pos = 0, 0
    if ckpt:
        st = checkpoint.restore(ckpt, stateful)
        step, data_pos = st["step"], st["data_pos"]
    tracker = Tracker(cfg.logger, run_dir, raw, step if ckpt else None, t.max_steps, "ppo")
    sampling, greedy = sampling_params(cfg.rollout), sampling_params(cfg.rollout, greedy=True)
    temp = sampling.temperature or 1.0
    pad = tok.pad_token_id
    eval_prompts = encode_prompts(tok, eval_set, t.system_prompt)

    def run_eval() -> dict[str, float]:
        metrics, table = policy_eval(engine, eval_prompts, eval_set, sampling, greedy, verifiers or rewards, reward_model,
                                     seed=t.seed + 1_000_003 * (step + 1), log_samples=t.log_samples,
                                     kl_models=(policy, ref), pad_id=pad)
        tracker.log(metrics, step)
        tracker.log_samples(table, step)
        return metrics

    first, last = tracker.past_evals("eval/reward/mean") if ckpt else (run_eval(),) * 2
    try:
        while step < t.max_steps:
            t0 = time.time()
            samples = [task.train_sample(data_pos + i) for i in range(t.prompts_per_step)]
            data_pos += t.prompts_per_step
            ro = engine.generate(encode_prompts(tok, samples, t.system_prompt), p.samples, sampling)
            fields = [s.fields() for s in samples for _ in range(p.samples)]
            scored = rewards(RewardInputs.from_rollout(ro, fields))
            score = torch.tensor(scored.scores if scored.scores is not None else scored.rewards, device=device)  # [N]
            finished = torch.tensor(ro.finished, device=device)  # [N]
            if p.missing_eos_penalty:
                score = score - p.missing_eos_penalty * (~finished).float()
            if p.score_clip:
                score = score.clamp(-p.score_clip, p.score_clip)

            batch = pack(ro.prompt_ids, ro.completion_ids, pad).to(device)
            mask = batch.mask  # [N, T]
            N, T = mask.shape
            with torch.no_grad():
                old_logp = batch_logprobs(policy, batch, temp)  # [N, T]
                ref_logp = batch_logprobs(ref, batch, temp)  # [N, T]
                old_values = token_values(critic, batch)  # [N, T]
                kl = kl_penalty(old_logp, ref_logp, p.kl_estimator) * mask  # [N, T]
                token_rewards = ppo_rewards(score, kl, mask, kl_ctl.value)  # [N, T]
                adv, returns = gae(token_rewards, old_values, mask, p.gamma, p.lam)  # [N, T]
                if p.whiten_advantages:
                    adv = whiten(adv, mask)
            eng = engine_logprobs(ro.logprobs, T, device)  # [N, T] the engine's sampling log-probs
            gap = ((eng - old_logp).abs() * mask).sum() / mask.sum().clamp(min=1)

            train_policy = step >= p.critic_warmup_steps
            acc: dict[str, list[float]] = {}
            gen = torch.Generator().manual_seed(t.seed * 1_000_003 + step)  # shuffles resume exactly
            first_ratio = None
            for epoch in range(p.epochs):
                order = torch.randperm(N, generator=gen)
                for idx in order.chunk(min(p.minibatches, N)):
                    idx = idx.to(device)
                    mb = batch[idx]
                    logp = batch_logprobs(policy, mb, temp)  # [n, T]
                    pl, pm = policy_loss(logp, old_logp[idx], adv[idx], mask[idx], p.clip, p.clip)
                    values = token_values(critic, mb)  # [n, T]
                    vl, vm = value_loss(values, old_values[idx], returns[idx], mask[idx], p.value_clip)
                    loss = (pl if train_policy else 0.0 * pl) + p.vf_coef * vl
                    if ptx is not None and train_policy:
                        lm = ptx_loss(policy, ptx, p.ptx_batch_size, f"{t.seed}:ptx:{step}:{epoch}:{int(idx[0])}", pad,
                                      device)
                        loss = loss + p.ptx_coef * lm
                        acc.setdefault("loss/ptx", []).append(float(lm.detach()))
                    if first_ratio is None:
                        first_ratio = pm["ratio/mean"]
                        if abs(first_ratio - 1.0) > 1e-3:
                            log.warning("ppo step %d: the first minibatch's ratio is %.5f, not 1: the trainer's "
                                        "log-probs differ from the sampling policy's", step + 1, first_ratio)
                    if not torch.isfinite(loss):
                        log.warning("ppo step %d: non-finite loss, this minibatch's update is skipped", step + 1)
                        opt.zero_grad(set_to_none=True)
                        vopt.zero_grad(set_to_none=True)
                        acc.setdefault("skipped_updates", []).append(1.0)
                        continue
                    loss.backward()
                    gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), o.max_grad_norm)
                    vgn = torch.nn.utils.clip_grad_norm_(critic.parameters(), o.max_grad_norm)
                    if train_policy:
                        opt.step()
                    vopt.step()
                    sched.step()
                    vsched.step()
                    opt.zero_grad(set_to_none=True)
                    vopt.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        approxkl = float((0.5 * (logp - old_logp[idx]) ** 2 * mask[idx]).sum() / mask[idx].sum().clamp(min=1))
                    for k, v in (("loss/policy", float(pl.detach())), ("loss/value", float(vl.detach())),
                                 ("policy/clipfrac", pm["clip/frac"]), ("policy/approxkl", approxkl),
                                 ("val/clipfrac", vm["val/clipfrac"]), ("grad_norm", float(gn)),
                                 ("grad_norm/value", float(vgn))):
                        acc.setdefault(k, []).append(v)
            engine.update_weights(policy.named_parameters())
            seq_kl = float((kl * mask).sum(1).mean())  # mean per-sequence KL of this batch (nats)
            beta = kl_ctl.value
            kl_ctl.update(seq_kl, N)
            step += 1
            metrics = {
                "objective/scores": float(score.mean()),
                "objective/kl": seq_kl,
                "objective/rlhf_reward": float(score.mean()) - beta * seq_kl,
                **{k: sum(v) / len(v) for k, v in acc.items()},
                "val/mean": float((old_values * mask).sum() / mask.sum().clamp(min=1)),
                "val/explained_var": explained_variance(old_values, returns, mask),
                "kl/beta": beta,
                "policy/first_ratio": first_ratio,
                "rollout/logprob_abs_diff/mean": float(gap),
                "lr": sched.get_last_lr()[0],
                "completion/len_mean": float(mask.sum(1).float().mean()),
                "completion/no_eos_frac": 1.0 - sum(ro.finished) / N,
                **{k: v for k, v in scored.metrics.items() if k.startswith(("reward/", "rm/"))},
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
                modules = {"model": policy} if p.value == "shared" else {"model": policy, "value": critic}
                checkpoint.save(run_dir, step, modules, tok, stateful,
                                {"data_pos": data_pos}, t.keep_checkpoints)
    finally:
        tracker.close()
        for part in {id(x): x for x in (rewards, verifiers, engine) if x is not None}.values():
            part.close()
    lines = ["", f"done after {step} steps", f"metrics: {run_dir / 'metrics.jsonl'}"]
    if first and last:
        lines.append(f"eval true score: {first['eval/reward/mean']:.3f} -> {last['eval/reward/mean']:.3f}   "
                     f"KL {last.get('eval/kl', math.nan):.2f}")
    print("\n".join(lines))
    return {"run_dir": str(run_dir), "steps": step, "first_eval": first, "last_eval": last}
