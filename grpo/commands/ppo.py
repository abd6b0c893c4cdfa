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
- The score is the reward model's normalised score, unsquashed (`reward_model.squash` and `scale`
  are for [0, 1] rewards and do not apply), times `reward_model.weight`, plus
  `reward_model.verifier_weight` times the verifiers' reward; without a reward model, the verifiers'.
- Rollouts may be off-policy by a fixed lag (`rollout.max_staleness` = eta > 0, grpo/parts/lag.py, as
  grpo train does): step k trains on the rollout the policy of step k - eta generated (a group is a
  prompt's `ppo.samples` completions with their scores). The ratio is to pi_prox = the policy at the
  start of the step (`old_logp`, its own forward as always), every token weighted by
  min(pi_prox / mu, ppo.behav_cap) with mu the engine's sampling probability (Hilton et al. 2021,
  AReaL 2025); the values, the KL in the reward and GAE are the current critic's and policy's. The
  rollouts in flight are checkpointed, so a resumed run is exact. With rollout=server the generation
  overlaps the update (as in grpo train: sent in the background, scored by a thread as it arrives).
Invariants checked at run time: at the first minibatch of every step the ratio is 1 (the
trainer's log-probs are the sampling policy's, with lagged rollouts pi_prox's) and the
engine/trainer log-prob gap is logged; a non-finite loss skips that minibatch's update with a warning.

Collectives per step under torchrun: one for the batch's tokens, its log-prob gap and every
minibatch's token count, two for whitening, one per minibatch (the non-finite vote, which
also carries the first minibatch's ratio), and two for the step's metrics (the loop's sums, and the
reward sources' means and stds); with lagged rollouts, two gathers per rollout generated (its
scores and its groups).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from grpo.algorithm.kl import kl_penalty
from grpo.algorithm.losses import policy_loss
from grpo.algorithm.value import AdaptiveKL, gae, ppo_rewards, value_loss, whiten
from grpo.parts import checkpoint
from grpo.parts import config as C
from grpo.parts import lag
from grpo.parts.batch import RolloutBatch, batch_logprobs, batch_tensors, encode_rows, engine_logprobs, pack
from grpo.parts.distributed import call, full_tensor, shard
from grpo.parts.evaluation import eval_headline
from grpo.parts.modeling import backbone
from grpo.parts.reward_model import init_reward_model, load_reward_model
from grpo.parts.reward_sources import score_rollout
from grpo.parts.rollout import encode_prompts, push_weights, sampling_params, task_prompts, tools_of
from grpo.parts.rollout.multiturn import conversation_metrics, generate
from grpo.parts.run import Run
from grpo.tasks.base import TaskError, build_task
from grpo.tasks.file import located_rows

log = logging.getLogger(__name__)


class SharedValue(torch.nn.Module):
    """A value head on the policy's own trunk (ppo.value=shared): the critic interface of a scalar-head
    model (`base_model_prefix` and `score`), whose only parameters of its own are the head's."""

    def __init__(self, policy):
        super().__init__()
        self.base_model_prefix = "trunk"
        object.__setattr__(self, "trunk", backbone(policy))  # shared, not registered (under LoRA's adapters too)
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
    pairs = encode_rows(tok, located_rows(path), "prompt", "completion", system_prompt)
    if not pairs:
        raise TaskError(f"{path}: no ptx rows")
    return pairs


def ptx_loss(policy, pairs, batch_size: int, seed: str, pad_id: int, device) -> torch.Tensor:
    """Token-mean LM loss of the completions of `batch_size` rows drawn (seeded) from `pairs`."""
    rng = random.Random(seed)
    rows = [pairs[rng.randrange(len(pairs))] for _ in range(batch_size)]
    ids, attn, labels = (x.to(device) for x in batch_tensors(rows, pad_id))
    return policy(input_ids=ids, attention_mask=attn, labels=labels).loss


def variance_sums(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """What explained_variance needs over real tokens, as sums that add up over ranks:
    [n, sum R, sum R^2, sum (R - V), sum (R - V)^2]."""
    m = mask.bool()
    r, v = returns[m].double(), values[m].double()
    return [float(r.numel()), float(r.sum()), float((r * r).sum()), float((r - v).sum()), float(((r - v) ** 2).sum())]


def explained_variance(sums: list[float]) -> float:
    """1 - Var(returns - values) / Var(returns), from variance_sums (of one rank or all)."""
    n, sr, sr2, sd, sd2 = sums
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
    cfg = C.parse(C.PPOConfig, raw)
    trainer, model, optim, hp, rm = cfg.trainer, cfg.model, cfg.optim, cfg.ppo, cfg.reward_model
    with Run.from_config("ppo", cfg, raw, run_dir) as run:
        par, device, B = run.par, run.device, trainer.prompts_per_step
        W = par.world
        run.require(B, f"trainer.prompts_per_step={B}")
        if W > 1 and hp.value == "shared":
            raise C.ConfigError("ppo.value=shared under torchrun is not supported yet: use ppo.value=separate")
        if not cfg.task.get("verifiers") and not rm.path:
            raise C.ConfigError("ppo needs a reward: set reward_model.path or task.verifiers")
        if hp.ptx_coef > 0 and not hp.ptx_path:
            raise C.ConfigError("ppo.ptx_coef > 0 needs ppo.ptx_path (prompt/completion rows)")
        task = build_task(cfg.task, seed=trainer.seed)
        eval_set = run.held_out(task, trainer.eval_size)
        tok = run.tokenizer(model.path)
        rewards, verifiers, reward_model = run.rewards(cfg.task, cfg.verifier, rm, model)
        policy = run.policy(model, reference=True)

        # The critic: a head on the policy's trunk, a one-process checkpoint's or a reward model's
        # (strictly: its head must be there), or the policy's weights with a new, zero head.
        whole = checkpoint.has_folders(run.ckpt)  # a one-process checkpoint holds the critic's folder
        value_src = hp.value_model or rm.path
        if hp.value == "shared":
            critic = SharedValue(policy.model)  # its head comes back from state.pt on resume
        elif whole or value_src:
            critic = load_reward_model(str(run.ckpt / "value") if whole else value_src, model.dtype, device,
                                       "checkpoint" if whole else "ppo.value_model" if hp.value_model else "reward_model.path")
        else:
            critic = init_reward_model(model.path, model.dtype, device, tok.pad_token_id)
            torch.nn.init.zeros_(critic.score.weight)  # values start at 0, not at noise
            log.info("ppo: no reward model: the critic starts from %s with a new, zero value head", model.path)
        critic.train()
        cwd = par.wrap(critic) if hp.value == "separate" else critic  # DDP / FSDP2 hook into the wrapper

        ptx = ptx_rows(hp.ptx_path, tok, trainer.system_prompt) if hp.ptx_coef > 0 else None
        engine = run.engine(cfg.rollout, policy, model, lambda: task_prompts(task), trainer.system_prompt,
                            cfg.task.get("env"))
        updates = trainer.max_steps * hp.epochs * hp.minibatches  # optimizer steps
        opt, sched = run.optimizer(policy.fwd.parameters(), optim, updates)
        vopt, vsched = run.optimizer(cwd.parameters(), optim, updates, lr=hp.value_lr)
        kl_ctl = AdaptiveKL(hp.beta, hp.kl_target, hp.kl_horizon)
        stateful = {"scheduler": sched, "value_scheduler": vsched, "kl_controller": kl_ctl}
        models = {"model": (policy.model, opt), "value": (critic, vopt)}
        if hp.value == "shared":  # the head alone: the trunk is the policy's
            models = {"model": (policy.model, opt)}
            stateful.update(value_head=critic.score, value_optimizer=vopt)
        # data_pos: the next training sample; inflight: the lagged rollouts generated for the coming steps
        eta = cfg.rollout.max_staleness
        progress = run.restore(models, stateful, {"data_pos": 0, "inflight": []})
        queue = lag.restored_queue(progress, eta)
        run.evaluate_policy(engine, policy, eval_set, cfg.rollout, trainer.system_prompt, verifiers or rewards,
                            reward_model, log_samples=trainer.log_samples)
        sampling = sampling_params(cfg.rollout)
        temp, pad = sampling.temperature or 1.0, tok.pad_token_id

        # lagged rollouts from rollout=server are sent, not waited for: generated while a step trains
        background = bool(eta) and lag.submits(engine)
        scorer = lag.scoring_thread(run) if background else None
        run.settle_with(lambda: lag.settle(queue, run, hp.samples))  # before checkpoints and evaluations

        def draw(submit: bool = False):
            """This rank's share of the next B prompts, `ppo.samples` completions each, scored; the data
            position moves on by B. Returns its rollout `ro`, its scores `shaped` [n] and the batch's
            reward and rollout `metrics` (reduced over ranks). With `submit` (an engine that generates
            in the background) the generation is sent and scored by the scoring thread, in order:
            returns a function that waits for both."""
            first, last = shard(B, par.rank, W)  # this rank's prompts of the step's B
            samples = [task.train_sample(progress["data_pos"] + i) for i in range(first, last)]
            progress["data_pos"] += B
            prompts = encode_prompts(tok, samples, trainer.system_prompt, tools_of(engine))
            fields = [s.fields() for s in samples for _ in range(hp.samples)]
            if submit:
                done = lag.send_and_score(engine, scorer, rewards, prompts, hp.samples, sampling, fields)
                return lambda: scored(fields, *done.result())
            ro = generate(engine, prompts, hp.samples, sampling, samples)  # one completion, or a conversation, each
            return scored(fields, ro)

        def scored(fields, ro, got=None):
            """`draw`'s second half: the rollout `ro` scored (unless `got` is, in the background)."""
            t1 = time.time()
            got = got if got is not None else score_rollout(rewards, ro, fields)
            score = torch.tensor(got.raw, device=device)  # [n] the configured score (see the docstring)
            finished = torch.tensor(ro.finished, device=device)  # [n]
            if hp.missing_eos_penalty:
                score = score - hp.missing_eos_penalty * (~finished).float()
            if hp.score_clip:
                score = score.clamp(-hp.score_clip, hp.score_clip)
            n = len(ro.completion_ids)
            own = {k: v for k, v in got.metrics.items() if k.startswith(("reward/", "rm/"))}
            metrics = {**par.reduce_metrics(own, n),
                       **(par.reduce_metrics(conversation_metrics(ro.conversations), n) if ro.conversations else {}),
                       "time/reward": time.time() - t1}
            return SimpleNamespace(ro=ro, shaped=score, metrics=metrics)

        def everyone(got):
            """A draw with every rank's scores [N] (rank-major = prompt-major), as the lag's groups need."""
            got.shaped = torch.tensor([x for part in par.gather(got.shaped.tolist()) for x in part])
            return got

        def send():
            pending = draw(submit=True)
            return lambda: everyone(pending())

        for step in run.steps():
            t0 = time.time()
            if eta:  # this rank's share of the rollout of step k - eta (lagged: grpo/parts/lag.py)
                ro, scores, offset, drawn = lag.lagged(queue, run, hp.samples, B, eta, lambda: everyone(draw()),
                                                       send if background else None)
                score = scores[offset:offset + len(ro.completion_ids)].to(device)  # [n]
            else:
                got = draw()
                ro, score, drawn = got.ro, got.shaped, got.metrics
                offset = shard(B, par.rank, W)[0] * hp.samples

            # a conversation's mask holds the model's tokens only: tool results are no actions (no
            # loss, KL or value target; GAE skips them)
            batch = pack(ro.prompt_ids, ro.completion_ids, pad, ro.model_mask).to(device)
            mask = batch.mask  # [n, T] this rank's rows: offset .. offset + n of the step's N
            n, T = mask.shape
            with torch.no_grad():
                old_logp = batch_logprobs(policy.fwd, batch, temp)  # [n, T]
                ref_logp = batch_logprobs(policy.ref, batch, temp)  # [n, T]
                old_values = call(cwd, token_values, batch)  # [n, T]
                kl = kl_penalty(old_logp, ref_logp, hp.kl_estimator) * mask  # [n, T]
                token_rewards = ppo_rewards(score, kl, mask, kl_ctl.value)  # [n, T]
            eng = engine_logprobs(ro.logprobs, T, device)  # [n, T] the engine's sampling log-probs

            # The step's shuffled minibatches, drawn from a seeded generator (resume is exact), as global
            # row indices (N = B x samples on all ranks), and each one's tokens on every rank: summed in
            # the same all-reduce as the batch's tokens and log-prob gap.
            N = B * hp.samples
            gen = torch.Generator().manual_seed(trainer.seed * 1_000_003 + step.index)
            minibatches = [(epoch, chunk) for epoch in range(hp.epochs)
                           for chunk in torch.randperm(N, generator=gen).chunk(min(hp.minibatches, N))]
            rows = [minibatch_rows(chunk, offset, n).to(device) for _, chunk in minibatches]
            own_tokens = [float(mask[idx].sum()) for idx in rows]
            gap_sum, tokens, *mb_tokens = par.sum([float(((eng - old_logp).abs() * mask).sum()), float(mask.sum()),
                                                   *own_tokens])
            with torch.no_grad():
                adv, returns = gae(token_rewards, old_values, mask, hp.gamma, hp.lam)  # [n, T]
                if hp.whiten_advantages:  # over the whole batch's tokens, on all ranks
                    adv = whiten(adv, mask, reduce=par.sum if W > 1 else None)

            train_policy = step.index >= hp.critic_warmup_steps
            acc: dict[str, list[float]] = {}  # each minibatch's share of a metric (the shares add up over ranks)
            first_ratio = None
            for (epoch, chunk), idx, mine, all_tokens in zip(minibatches, rows, own_tokens, mb_tokens):
                keep = 1.0 if len(idx) else 0.0  # a rank with no row here runs row 0 at weight 0
                idx = idx if len(idx) else torch.zeros(1, dtype=torch.long, device=device)
                all_tokens = max(all_tokens, 1.0)
                mb = batch[idx]
                logp = batch_logprobs(policy.fwd, mb, temp)  # [k, T]
                # lagged: the ratio to pi_prox = old_logp, each token weighted by min(pi_prox / mu, behav_cap)
                pl, pm = policy_loss(logp, old_logp[idx], adv[idx], mask[idx], hp.clip, hp.clip,
                                     num_tokens=all_tokens / W,
                                     **({"behav_logp": eng[idx], "behav_cap": hp.behav_cap} if eta else {}))
                values = call(cwd, token_values, mb)  # [k, T]
                vl, vm = value_loss(values, old_values[idx], returns[idx], mask[idx], hp.value_clip,
                                    num_tokens=all_tokens / W)
                loss = ((pl if train_policy else 0.0 * pl) + hp.vf_coef * vl) * keep
                lm_v = None
                if ptx is not None and train_policy:  # the same rows on every rank: averaged, unchanged
                    lm = ptx_loss(policy.fwd, ptx, hp.ptx_batch_size,
                                  f"{trainer.seed}:ptx:{step.index}:{epoch}:{int(chunk[0])}", pad, device)
                    loss = loss + hp.ptx_coef * lm
                    lm_v = float(lm.detach())
                # One all-reduce: whether any rank's loss is non-finite (then every rank skips), and on
                # the step's first minibatch the ratio's token sum (1 before any update).
                opening = first_ratio is None
                votes = par.sum([0.0 if torch.isfinite(loss) else 1.0]
                                + ([pm["ratio/mean"] * mine * keep] if opening else []))
                if opening:
                    first_ratio = votes[1] / all_tokens
                    if abs(first_ratio - 1.0) > 1e-3:
                        log.warning("ppo step %d: the first minibatch's ratio is %.5f, not 1: the trainer's "
                                    "log-probs differ from the sampling policy's", step.index + 1, first_ratio)
                if votes[0]:
                    log.warning("ppo step %d: non-finite loss, this minibatch's update is skipped", step.index + 1)
                    opt.zero_grad(set_to_none=True)
                    vopt.zero_grad(set_to_none=True)
                    acc.setdefault("skipped_updates", []).append(1.0 / W)
                    continue
                if lm_v is not None:
                    acc.setdefault("loss/ptx", []).append(lm_v / W)
                loss.backward()
                gn = full_tensor(torch.nn.utils.clip_grad_norm_(policy.fwd.parameters(), optim.max_grad_norm))
                vgn = full_tensor(torch.nn.utils.clip_grad_norm_(cwd.parameters(), optim.max_grad_norm))
                if train_policy:
                    opt.step()
                vopt.step()
                sched.step()
                vsched.step()
                opt.zero_grad(set_to_none=True)
                vopt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    approxkl = float((0.5 * (logp - old_logp[idx]) ** 2 * mask[idx]).sum()) * keep / all_tokens
                share = mine * keep / all_tokens  # this rank's share of the minibatch's tokens
                for key, v in (("loss/policy", float(pl.detach()) * keep / W),
                               ("loss/value", float(vl.detach()) * keep / W),
                               ("policy/clipfrac", pm["clip/frac"] * share), ("policy/approxkl", approxkl),
                               ("val/clipfrac", vm["val/clipfrac"] * share), ("grad_norm", float(gn) / W),
                               ("grad_norm/value", float(vgn) / W),
                               *((k, pm[k] * share) for k in ("offpolicy/weight_mean", "offpolicy/truncated_frac")
                                 if k in pm)):
                    acc.setdefault(key, []).append(v)
            push_weights(engine, policy.model)
            # The step's metrics in one all-reduce: each minibatch's shares, the batch's sequence KL,
            # scores, lengths and values, and what the explained variance needs.
            local = {**{f"acc:{k}": sum(v) for k, v in acc.items()}, "kl": float((kl * mask).sum()),
                     "score": float(score.sum()), "len": float(mask.sum()), "done": float(sum(ro.finished)),
                     "values": float((old_values * mask).sum()),
                     **{f"ev:{i}": v for i, v in enumerate(variance_sums(old_values, returns, mask))}}
            totals = par.sum_dict(local)
            # mean per-sequence KL of this batch (nats); one process sums as it always did
            seq_kl = float((kl * mask).sum(1).mean()) if W == 1 else totals["kl"] / N
            beta = kl_ctl.value
            kl_ctl.update(seq_kl, N)
            metrics = {
                "objective/scores": totals["score"] / N,
                "objective/kl": seq_kl,
                "objective/rlhf_reward": totals["score"] / N - beta * seq_kl,
                # means over the minibatches; skipped_updates is a count
                **{k: totals[f"acc:{k}"] if k == "skipped_updates" else totals[f"acc:{k}"] / len(v)
                   for k, v in acc.items()},
                "val/mean": totals["values"] / max(tokens, 1.0),
                "val/explained_var": explained_variance([totals[f"ev:{i}"] for i in range(5)]),
                "kl/beta": beta,
                "policy/first_ratio": first_ratio,
                "rollout/logprob_abs_diff/mean": gap_sum / max(tokens, 1.0),
                "lr": sched.get_last_lr()[0],
                "completion/len_mean": totals["len"] / N,
                "completion/no_eos_frac": 1.0 - totals["done"] / N,
                **drawn,  # the trained samples' reward figures (lagged: with the async/ counts)
                "time/step": time.time() - t0,
            }
            step.done(metrics, bar={"score": f"{metrics['objective/scores']:.3f}"})

        return run.finish(lambda first, last: eval_headline(first, last, "eval true score"))
