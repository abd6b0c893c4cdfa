"""`grpo train`: the GRPO loop, top to bottom.

One step:
    B prompts -> G completions each (rollout engine) -> rewards in [0, 1] (verifiers)
    -> group-normalised advantages -> token log-probs (policy, old policy when epochs > 1,
    reference when beta > 0) -> clipped policy loss + beta * KL -> clipped gradient step(s)
    -> push weights to the engine -> metrics; periodic evaluation and checkpoints (grpo/parts/run.py).

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
- The advantage estimator is an option (`algorithm.adv_estimator`): RLOO's leave-one-out baseline,
  or REINFORCE++'s KL-in-the-reward returns whitened over the whole step (its loss then has no KL
  term). The importance ratio may be taken per sequence (`is_level`, GSPO), the loss may be CISPO's,
  engine/trainer mismatches may be masked (`mismatch`), and DAPO's overlong penalty, cut-completion
  filter and dynamic sampling are switches. The README's "The estimator pack" lists each with its paper.
- Rollouts may be off-policy by a fixed lag (`rollout.max_staleness` = eta > 0): step k trains on the
  rollout the policy of step k - eta generated, with the decoupled loss (ratio to the policy at the
  start of the step, times min(pi_prox / mu, algorithm.behav_cap); Hilton et al. 2021, AReaL 2025).
  The lag is fixed, so the run is deterministic and resumes exactly (the rollouts in flight are
  checkpointed). With rollout=server the generation overlaps the update; the in-process engines
  wait for each rollout.

`train` is the command. `build` makes a run's GRPO parts and `train_step` takes one step on them, so a
caller that times steps one by one (bench/bench_vs_trl.py) or checks one update (tests) runs exactly
what `train` runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo.algorithm.advantages import (group_advantages, overlong_penalty, reinforce_pp_advantages, rloo_advantages,
                                       varied_groups)
from grpo.algorithm.kl import kl_penalty
from grpo.algorithm.losses import mismatch_mask, policy_loss
from grpo.parts import config as C
from grpo.parts.batch import (batch_logprobs, engine_logprobs, group_logprobs, micro_batches, pack, pack_groups,
                              supports_shared_prompt)
from grpo.parts.distributed import full_tensor, shard
from grpo.parts.evaluation import eval_headline
from grpo.parts.lag import (gathered_groups, lagged, my_share, restored_queue, scoring_thread, send_and_score,
                            settle as settle_queue, submits)
from grpo.parts.reward_sources import score_rollout
from grpo.parts.rollout import SamplingParams, encode_prompts, push_weights, sampling_params, task_prompts, tools_of
from grpo.parts.rollout.base import Rollout
from grpo.parts.rollout.multiturn import conversation_metrics, generate
from grpo.parts.run import Policy, Run
from grpo.tasks.base import build_task

log = logging.getLogger(__name__)


@dataclass
class GRPO:
    """What a GRPO run is built from: its hyperparameters and parts (the loop is `train`)."""

    algorithm: C.GRPOAlgorithmConfig  # group size, beta, clip range, epochs, advantage scale, loss aggregation
    prompts_per_step: int  # B
    micro_batch_size: int  # rows per forward/backward (0 = all)
    max_tokens_per_batch: int  # tokens per forward/backward (0 = no limit)
    max_grad_norm: float
    system_prompt: str | None
    task: Any
    rewards: Any  # the training reward source (grpo/parts/reward_sources.py)
    policy: Policy
    engine: Any
    opt: torch.optim.Optimizer
    sched: Any
    sampling: SamplingParams
    shared_prompt: bool  # one row per group: the prompt once, then its G completions
    progress: dict[str, Any]  # {"data_pos": the next sample, "buffer": kept groups, "inflight": lagged rollouts}
    max_staleness: int = 0  # eta: step k trains on the rollout of step k - eta's policy
    scorer: Any = None  # lagged rollouts from an engine that submits: the thread that scores them as they come


def build(cfg: C.TrainConfig, run: Run) -> GRPO:
    """The task, reward, policy (+ reference), engine and optimizer of a run; everything that can
    fail on user input fails here, before the first step. A resumed run gets its state back."""
    algorithm, trainer, model = cfg.algorithm, cfg.trainer, cfg.model
    if cfg.rollout.temperature <= 0 and algorithm.group_size > 1:
        raise C.ConfigError("rollout.temperature=0 makes the G samples of a prompt identical (no learning signal): "
                            "use a temperature > 0 for training")
    if not cfg.task.get("verifiers") and not cfg.reward_model.path:
        raise C.ConfigError("task.verifiers is not set: name at least one verifier, e.g. task.verifiers=[math], "
                            "or give a reward model (reward_model.path)")
    run.require(trainer.prompts_per_step, f"trainer.prompts_per_step={trainer.prompts_per_step}")
    check_algorithm(algorithm, cfg.rollout.max_new_tokens, cfg.rollout.max_staleness)
    # Every rank reads the same prompt order (the task's seed) and samples its own stream.
    task = build_task(cfg.task, seed=trainer.seed)
    eval_set = run.held_out(task, trainer.eval_size)
    run.tokenizer(model.path)
    rewards, verifiers, reward_model = run.rewards(cfg.task, cfg.verifier, cfg.reward_model, model)
    policy = run.policy(model, reference=algorithm.beta > 0)
    # The shared-prompt layout gives the padded layout's log-probs (tests/parts/test_shared_prompt.py) at a
    # fraction of the prompt's cost; models whose attention takes no custom mask fall back.
    grouped = trainer.shared_prompt and algorithm.group_size > 1
    shared_prompt = grouped and supports_shared_prompt(policy.model)
    if grouped and not shared_prompt:
        log.info("trainer.shared_prompt: %s attention takes no custom mask; using one padded row per completion",
                 policy.model.config._attn_implementation)
    engine = run.engine(cfg.rollout, policy, model, lambda: task_prompts(task), trainer.system_prompt, cfg.task.get("env"))
    # One optimizer step per epoch over a batch: the schedule (and its warm-up) counts optimizer steps.
    opt, sched = run.optimizer(policy.fwd.parameters(), cfg.optim, trainer.max_steps * algorithm.epochs)
    # data_pos: the next training sample; buffer: dynamic sampling's kept groups not yet trained on;
    # inflight: the lagged rollouts generated for the coming steps (rollout.max_staleness > 0)
    progress = run.restore({"model": (policy.model, opt)}, {"scheduler": sched},
                           {"data_pos": 0, "buffer": [], "inflight": []})
    restored_queue(progress, cfg.rollout.max_staleness)
    run.evaluate_policy(engine, policy, eval_set, cfg.rollout, trainer.system_prompt, verifiers or rewards,
                        reward_model, kl_batch_size=trainer.micro_batch_size or 256, log_samples=trainer.log_samples)
    scorer = scoring_thread(run) if cfg.rollout.max_staleness and submits(engine) else None
    return GRPO(algorithm, trainer.prompts_per_step, trainer.micro_batch_size, trainer.max_tokens_per_batch,
                cfg.optim.max_grad_norm, trainer.system_prompt, task, rewards, policy, engine, opt, sched,
                sampling_params(cfg.rollout), shared_prompt, progress, cfg.rollout.max_staleness, scorer)


def check_algorithm(algorithm: C.GRPOAlgorithmConfig, max_new_tokens: int, max_staleness: int = 0) -> None:
    """The combinations of algorithm keys that make no sense fail before the first step."""
    if algorithm.adv_estimator != "grpo" and algorithm.adv_scale is not None:
        # RLOO and REINFORCE++ have no std division of their own; dividing RLOO's leave-one-out
        # differences by a group std gave advantages of 1e6 elsewhere (NeMo-RL #1518).
        raise C.ConfigError(f"algorithm.adv_scale={algorithm.adv_scale} applies to adv_estimator=grpo only "
                            f"({algorithm.adv_estimator} does not divide by a standard deviation): leave it null")
    if algorithm.loss == "cispo" and algorithm.is_level != "token":
        raise C.ConfigError("algorithm.loss=cispo weights tokens: use it with algorithm.is_level=token")
    if algorithm.overlong_cache > max_new_tokens:
        raise C.ConfigError(f"algorithm.overlong_cache={algorithm.overlong_cache} is more than the budget "
                            f"rollout.max_new_tokens={max_new_tokens}")
    if algorithm.mismatch != "none" and algorithm.mismatch_low >= algorithm.mismatch_high:
        raise C.ConfigError(f"algorithm.mismatch_low={algorithm.mismatch_low} must be below "
                            f"algorithm.mismatch_high={algorithm.mismatch_high}")
    if max_staleness:
        if algorithm.dynamic_sampling:
            raise C.ConfigError("rollout.max_staleness > 0 with algorithm.dynamic_sampling is not supported yet")
        if algorithm.tis_cap > 0 or algorithm.mismatch != "none":
            # mu is the engine's sampling probability: the behaviour weight corrects the engine's
            # mismatch and the lag together; a second weight or mask would count the mismatch twice.
            raise C.ConfigError("rollout.max_staleness > 0 weights every token by min(pi_prox / mu, "
                                "algorithm.behav_cap) with mu the engine's probability: leave algorithm.tis_cap=0 "
                                "and algorithm.mismatch=none")


def shaped_rewards(grpo: GRPO, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The step's N rewards [N] the advantages see: the verifiers' plus DAPO's overlong penalty
    (algorithm.overlong_cache > 0) on the N completion lengths [N]."""
    cache = grpo.algorithm.overlong_cache
    if not cache:
        return rewards
    return rewards + overlong_penalty(lengths, grpo.sampling.max_new_tokens, cache)


@dataclass
class Sampled:
    """One rollout of the step's B prompts, scored: this rank's completions and every rank's rewards."""

    ro: Rollout  # this rank's share, prompt-major
    rewards: torch.Tensor  # [N] the verifiers' rewards of the whole batch (rank-major = prompt-major)
    shaped: torch.Tensor  # [N] what the advantages see (rewards + the overlong penalty)
    metrics: dict[str, float]  # the batch's reward and rollout metrics, reduced over ranks


def sample(grpo: GRPO, run: Run, submit: bool = False) -> Sampled | Callable[[], Sampled]:
    """This rank's share of the next B prompts, G completions each, scored; the data position moves on by B.
    With `submit` (an engine that takes submissions, `submits`) the generation is sent and scored in
    the background (grpo.scorer, in order): returns a function that waits for both and gathers."""
    par, G, B = run.par, grpo.algorithm.group_size, grpo.prompts_per_step
    first, last = shard(B, par.rank, par.world)  # this rank's prompts of the step's B
    start = grpo.progress["data_pos"]
    samples = [grpo.task.train_sample(start + i) for i in range(first, last)]
    grpo.progress["data_pos"] += B
    prompts = encode_prompts(run.tok, samples, grpo.system_prompt, tools_of(grpo.engine))
    if submit:
        fields = [s.fields() for s in samples for _ in range(G)]
        done = send_and_score(grpo.engine, grpo.scorer, grpo.rewards, prompts, G, grpo.sampling, fields)
        return lambda: scored(grpo, run, samples, *done.result())
    ro = generate(grpo.engine, prompts, G, grpo.sampling, samples)  # one completion, or a conversation, each
    return scored(grpo, run, samples, ro)


def scored(grpo: GRPO, run: Run, samples: list, ro: Rollout, scores=None) -> Sampled:
    """`sample`'s second half: this rank's rollout `ro` of `samples` scored (unless `scores` are,
    from the background), every rank's rewards gathered."""
    par, G = run.par, grpo.algorithm.group_size
    t1 = time.time()
    if scores is None:
        fields = [s.fields() for s in samples for _ in range(G)]  # [n] prompt-major, like ro
        scores = score_rollout(grpo.rewards, ro, fields)
    # Every rank gets the step's N rewards (rank-major = prompt-major): the advantages and the
    # reward metrics are those of the whole batch, whatever the process count.
    # (with the completions' lengths, for the overlong penalty: one gather)
    parts = par.gather((scores.rewards, [len(c) for c in ro.completion_ids]))
    rewards = torch.tensor([x for r, _ in parts for x in r])  # [N]
    shaped = shaped_rewards(grpo, rewards, torch.tensor([x for _, n in parts for x in n]))  # [N]
    N, groups = len(rewards), rewards.view(-1, G)
    metrics = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if N > 1 else 0.0,
        **par.reduce_metrics(scores.metrics, len(ro.completion_ids)),
        **(par.reduce_metrics(conversation_metrics(ro.conversations), len(ro.conversations)) if ro.conversations else {}),
        "groups/zero_std_frac": float((groups.std(1) == 0).float().mean()) if G > 1 else 1.0,
        "time/reward": time.time() - t1,
    }
    if grpo.algorithm.overlong_cache:
        metrics["reward/overlong_mean"] = float((shaped - rewards).mean())
    return Sampled(ro, rewards, shaped, metrics)


def train_step(grpo: GRPO, run: Run) -> dict[str, float]:
    """One GRPO step: this rank's share of the step's B prompts, G completions each, scored (with
    dynamic sampling: as many rollouts as it takes to fill B groups whose rewards differ); then
    `update` on them."""
    t0 = time.time()
    G = grpo.algorithm.group_size
    if grpo.algorithm.dynamic_sampling:
        ro, shaped, offset, metrics = dynamic_sample(grpo, run)
    elif grpo.max_staleness:
        ro, shaped, offset, metrics = lagged_sample(grpo, run)
    else:
        got = sample(grpo, run)
        ro, shaped, offset, metrics = got.ro, got.shaped, shard(grpo.prompts_per_step, run.par.rank, run.par.world)[0] * G, got.metrics
    t2 = time.time()
    if ro is not None:
        metrics.update(update(grpo, run, ro, shaped, offset, behaviour=bool(grpo.max_staleness)))
    t3 = time.time()
    # rollout: generation (all of dynamic sampling's tries); reward: scoring
    return {**metrics, "time/rollout": t2 - t0 - metrics["time/reward"], "time/update": t3 - t2, "time/step": t3 - t0}


def dynamic_sample(grpo: GRPO, run: Run, draw=sample) -> tuple[Rollout | None, torch.Tensor, int, dict[str, float]]:
    """DAPO's dynamic sampling (Yu et al. 2025): keep only the groups whose rewards differ, and roll
    out B more prompts until B groups are kept, at most algorithm.max_gen_batches times. Kept groups
    beyond B wait in grpo.progress["buffer"] for the next step (it is checkpointed, so a resumed run
    takes the same groups). When the tries run out the step trains on the groups it has, and on none
    (a warning, no update) if there are fewer than processes. Returns this rank's rollout (None: no
    update), the used groups' shaped rewards [K * G], this rank's row offset in them, and the metrics.
    draw(grpo, run) -> Sampled is one rollout (`sample`; tests give fixed batches)."""
    par, G, B = run.par, grpo.algorithm.group_size, grpo.prompts_per_step
    kept: list[dict] = list(grpo.progress["buffer"])  # the same list on every rank
    tries, seen = 0, []
    while len(kept) < B and tries < grpo.algorithm.max_gen_batches:
        got = draw(grpo, run)
        tries += 1
        seen.append(got.metrics)
        varied = varied_groups(got.shaped, G).tolist()  # [B'] the try's groups, every rank's
        kept += [g for g, v in zip(gathered_groups(got, run, G), varied) if v]  # prompt-major over the ranks
    use, grpo.progress["buffer"] = kept[:B], kept[B:]
    metrics = {k: sum(m[k] for m in seen) / (1 if k.startswith("time/") else len(seen)) for k in seen[0]} if seen else {}
    metrics.setdefault("time/reward", 0.0)  # the step took its B groups from the buffer
    metrics.update({"dapo/gen_batches": float(tries), "dapo/kept_groups": float(len(use)),
                    "dapo/buffer": float(len(grpo.progress["buffer"]))})
    if len(use) < B:
        log.warning("dynamic sampling: %d of %d groups had differing rewards after %d rollouts "
                    "(algorithm.max_gen_batches=%d); %s", len(use), B, tries, grpo.algorithm.max_gen_batches,
                    f"training on {len(use)}" if len(use) >= par.world else
                    f"no update this step (fewer groups than the {par.world} processes)")
    if len(use) < par.world:
        return None, torch.zeros(0), 0, metrics
    return (*my_share(use, run, G), metrics)


def lagged_sample(grpo: GRPO, run: Run, draw=sample) -> tuple[Rollout, torch.Tensor, int, dict[str, float]]:
    """Off-policy rollouts by a fixed lag eta (rollout.max_staleness, grpo/parts/lag.py): step k trains
    on the rollout generated at the start of step k - eta, from grpo.progress["inflight"]. Returns
    what dynamic_sample does. draw(grpo, run) -> Sampled is one rollout (`sample`; tests give fixed
    batches).

    With an engine that generates in the background (rollout=server), the rollouts are sent, not
    waited for: step k trains while the servers generate for step k + eta, and waits only when it
    needs a rollout still in flight. The requests, seeds and versions are those of the waiting
    order, so the run is the same either way; `settle` waits for them all before a checkpoint or an
    evaluation."""
    background = draw is sample and submits(grpo.engine)
    return lagged(grpo.progress["inflight"], run, grpo.algorithm.group_size, grpo.prompts_per_step,
                  grpo.max_staleness, lambda: draw(grpo, run),
                  (lambda: sample(grpo, run, submit=True)) if background else None)


def settle(grpo: GRPO, run: Run) -> None:
    """Every lagged rollout still in flight waited for and scored, in order (before a checkpoint or an
    evaluation)."""
    settle_queue(grpo.progress.get("inflight", []), run, grpo.algorithm.group_size)


def update(grpo: GRPO, run: Run, ro, rewards: torch.Tensor, offset: int, behaviour: bool = False) -> dict[str, float]:
    """The optimizer step(s) on this rank's completions `ro`, rows offset .. offset + n of the
    step's batch, whose N rewards [N] every rank holds; the weights then go to the engine. With
    `behaviour` (off-policy rollouts) the ratio is to the policy at the start of the step and every
    token is weighted by min(pi_prox / mu, algorithm.behav_cap), mu the engine's sampling probability."""
    algorithm = grpo.algorithm
    par, device, policy = run.par, run.device, grpo.policy
    W, G = par.world, algorithm.group_size
    t2 = time.time()
    n = len(ro.completion_ids)
    estimator = algorithm.adv_estimator
    if estimator == "grpo":
        adv = group_advantages(rewards, G, algorithm.adv_scale or "group", algorithm.adv_eps)  # [N]
    elif estimator == "rloo":
        adv = rloo_advantages(rewards, G)  # [N]
    adv = adv[offset:offset + n].to(device) if estimator in ("grpo", "rloo") else None  # [n]; reinforce_pp below
    pad = run.tok.pad_token_id
    if grpo.shared_prompt:  # one row per group: its prompt once, then its G completions
        batch = pack_groups(ro.prompt_ids, ro.completion_ids, G, pad, ro.model_mask).to(device)
        logprobs, unit, lengths = group_logprobs, G, batch.lengths.tolist()
    else:  # one padded row per completion
        batch = pack(ro.prompt_ids, ro.completion_ids, pad, ro.model_mask).to(device)
        logprobs, unit, lengths = batch_logprobs, 1, [batch.input_ids.shape[1]] * n
    mask = batch.mask  # [n, T]
    if algorithm.overlong_filter:  # completions cut at the budget get no loss (they still count as rows)
        mask = mask * torch.tensor([float(f) for f in ro.finished], device=device).unsqueeze(1).to(mask.dtype)
    T = mask.shape[1]
    # The normaliser is global: the step's real tokens (and rows) on all ranks. DDP and FSDP2
    # average gradients over the W ranks, so each rank divides its sum by N_global / W.
    tokens, rows = par.sum([float(mask.sum()), float(n)])
    tokens = max(tokens, 1.0)
    # (slice, weight) per micro-batch, as many on every rank; padding ones have weight 0.
    mbs = par.pad_micro_batches(micro_batches(lengths, unit, grpo.micro_batch_size, grpo.max_tokens_per_batch))
    temp = grpo.sampling.temperature or 1.0
    clock = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def frozen(model):  # log-probs of every real micro-batch without gradients, [n, T]
        outs = [(w, model(batch[s], temp, fn=logprobs)) for s, w in mbs]
        return torch.cat([o.to(device) for w, o in outs if w])

    reinforce = estimator.startswith("reinforce_pp")
    with torch.no_grad():
        # REINFORCE++ puts the KL into the reward: it needs the sampling policy's log-probs up front.
        # (With one epoch the policy at the start of the step, the decoupled loss's pi_prox, is the
        # training forward's own detached log-probs: no forward of its own.)
        need_old = algorithm.epochs > 1 or (reinforce and policy.ref is not None)
        old_logp = frozen(policy.fwd) if need_old else None
        ref_logp = frozen(policy.ref) if policy.ref is not None else None
    if reinforce:
        kl = (kl_penalty(old_logp, ref_logp, algorithm.kl_estimator) if ref_logp is not None
              else torch.zeros(n, T, device=device))  # [n, T]
        adv = reinforce_pp_advantages(rewards[offset:offset + n].to(device), kl, mask, algorithm.beta, algorithm.gamma,
                                      G if estimator == "reinforce_pp_baseline" else None, reduce=par.sum)  # [n, T]
    loss_beta = 0.0 if reinforce else algorithm.beta  # REINFORCE++'s KL is in its reward, not its loss
    token_level = algorithm.is_level == "token"
    clip_low, clip_high = ((algorithm.clip_low, algorithm.clip_high) if token_level
                           else (algorithm.seq_clip_low, algorithm.seq_clip_high))
    t_ref = time.time()

    # The engine's sampling log-probs of the sampled tokens, [n, T] like the trainer's.
    eng = engine_logprobs(ro.logprobs, T, device)  # [n, T]

    first_logp = torch.zeros(n, T, device=device)
    acc: dict[str, float] = {"mismatch/masked_frac": 0.0} if algorithm.mismatch != "none" else {}
    for epoch in range(algorithm.epochs):
        grpo.opt.zero_grad(set_to_none=True)
        for i, (s, weight) in enumerate(mbs):
            tf = time.time()
            with par.grad_sync(policy.fwd, sync=i == len(mbs) - 1):  # reduce once, after the last
                logp, ent = policy.fwd(batch[s], temp, fn=logprobs, with_entropy=True)  # [k, T]
                old = old_logp[s] if old_logp is not None else logp.detach()
                # Truncated importance sampling: reweight tokens the engine sampled with a slightly
                # different distribution than the trainer's (off when tis_cap = 0).
                tis = (old - eng[s]).exp().clamp(max=algorithm.tis_cap) if algorithm.tis_cap > 0 else None
                if algorithm.mismatch != "none":  # drop the tokens (rows) the engine sampled too differently
                    keep = mismatch_mask(old, eng[s], mask[s], algorithm.mismatch, algorithm.mismatch_low,
                                         algorithm.mismatch_high)  # [k, T]
                    tis = keep if tis is None else tis * keep
                    if epoch == 0 and weight:
                        acc["mismatch/masked_frac"] += float((mask[s] - keep).sum()) / tokens
                loss, parts = policy_loss(
                    logp, old, adv[s], mask[s], clip_low, clip_high,
                    ref_logp[s] if ref_logp is not None else None, loss_beta, algorithm.loss_agg,
                    max_len=grpo.sampling.max_new_tokens, kl_estimator=algorithm.kl_estimator, is_weights=tis,
                    num_tokens=tokens / W, num_rows=rows / W, is_level=algorithm.is_level, objective=algorithm.loss,
                    **({"behav_logp": eng[s], "behav_cap": algorithm.behav_cap} if behaviour else {}))
                tb = time.time()
                (loss * weight).backward()  # micro-batch losses over the global normaliser add up
            clock["forward"] += tb - tf
            clock["backward"] += time.time() - tb
            if not weight:
                continue
            share = float(mask[s].sum()) / tokens  # this micro-batch's share of the step's tokens
            if epoch == algorithm.epochs - 1:  # clipping only happens after the first update
                for k, v in parts.items():
                    if k.startswith(("clip/", "ratio/")):
                        acc[k] = acc.get(k, 0.0) + share * v
            if epoch == 0:
                first_logp[s] = logp.detach()
                acc["kl"] = acc.get("kl", 0.0) + share * parts["kl"]
                for k in ("offpolicy/weight_mean", "offpolicy/truncated_frac"):
                    if k in parts:
                        acc[k] = acc.get(k, 0.0) + share * parts[k]
                acc["entropy"] = acc.get("entropy", 0.0) + float((ent * mask[s]).sum()) / tokens
                acc["loss"] = acc.get("loss", 0.0) + float(loss.detach()) / W  # the ranks' shares add up
        to = time.time()
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(policy.fwd.parameters(), grpo.max_grad_norm))
        lr = grpo.sched.get_last_lr()[0]  # the rate this step uses
        grpo.opt.step()
        grpo.sched.step()
        clock["optimizer"] += time.time() - to
    push_weights(grpo.engine, policy.model)

    # The engine's log-probs against the trainer's for the same tokens, before the update.
    gap = (eng - first_logp).abs() * mask  # [n, T]
    lengths = batch.mask.sum(1).float()  # the completions' lengths, overlong_filter or not
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


def train(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    cfg = C.parse(C.TrainConfig, raw)
    with Run.from_config("grpo", cfg, raw, run_dir) as run:
        grpo = build(cfg, run)
        run.settle_with(lambda: settle(grpo, run))
        for step in run.steps():
            metrics = train_step(grpo, run)
            step.done(metrics, bar={"reward": f"{metrics['reward/mean']:.3f}"})
        return run.finish(eval_headline)
