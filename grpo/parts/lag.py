"""Off-policy rollouts by a fixed lag (`rollout.max_staleness` = eta > 0), shared by `grpo train` and
`grpo ppo`: step k trains on the rollout generated at the start of step k - eta (the first eta + 1
steps' by the initial policy), as an asynchronous system with one rollout in flight per step of lag
would, but deterministically, so a run resumes exactly.

The queue (the loop's progress["inflight"], checkpointed) holds the rollouts for steps k, k + 1, ...
as plain dicts, every rank's groups on every rank, each tagged with the version (the number of
optimizer steps) of the policy that sampled it; the engine's sampling log-probs travel with the
samples as mu. A group is one prompt's G completions with their G rewards (what the trainer's
advantages see: GRPO's shaped rewards, PPO's scores).

A draw is a function of no arguments that rolls out the step's B prompts (this rank's share), scores
them and moves the data position on; it returns an object with `ro` (this rank's Rollout,
prompt-major), `shaped` (every rank's rewards [B * G], rank-major = prompt-major) and `metrics` (the
batch's reward and rollout figures, reduced over ranks, with "time/reward").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from grpo.parts.distributed import shard
from grpo.parts.rollout.base import Rollout

log = logging.getLogger(__name__)


def submits(engine: Any) -> bool:
    """Whether the engine generates in the background (rollout=server's `submit`); the multi-turn
    wrapper and the in-process engines do not."""
    return callable(getattr(engine, "submit", None))


def scoring_thread(run: Any):
    """The one thread that scores lagged rollouts sent in the background, in the order they were
    sent, as they arrive (an executor the run closes)."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    pool = ThreadPoolExecutor(1, thread_name_prefix="grpo-scoring")
    run.own(SimpleNamespace(close=lambda: pool.shutdown(wait=True)))
    return pool


def send_and_score(engine: Any, scorer: Any, rewards: Any, prompts: list, n: int, sampling: Any,
                   fields: list) -> Any:
    """Send the generation of `prompts` x `n` to the engine now (its `submit`) and queue its scoring
    against `fields` on the scoring thread; returns the Future of (Rollout, the reward source's Rewards)."""
    from grpo.parts.reward_sources import score_rollout

    sent = engine.submit(prompts, n, sampling)

    def score():
        ro = sent.result()
        return ro, score_rollout(rewards, ro, fields)
    return scorer.submit(score)


def restored_queue(progress: dict[str, Any], eta: int) -> list[dict]:
    """The queue a run (perhaps resumed) starts from: a checkpoint from before the key has none, and
    an on-policy run (eta = 0) drops what an off-policy one left, with a warning."""
    progress.setdefault("inflight", [])  # a checkpoint from before the key
    if progress["inflight"] and not eta:
        log.warning("rollout.max_staleness=0: dropping the %d lagged rollouts the checkpoint holds (their prompts "
                    "are skipped)", len(progress["inflight"]))
        progress["inflight"] = []
    return progress["inflight"]


def lagged(queue: list[dict], run: Any, G: int, B: int, eta: int, draw: Callable[[], Any],
           send: Callable[[], Callable[[], Any]] | None = None) -> tuple[Rollout, torch.Tensor, int, dict[str, float]]:
    """The rollout step run.step = k trains on, from `queue` (changed in place): this step generates
    with the current policy (draw()) until the queue reaches step k + eta, then takes its own. The last
    eta steps generate too, for steps past trainer.max_steps: a finished run extended later (a larger
    max_steps, resumed) then trains exactly as one run to the new end would. A rollout staler than
    eta (a run resumed with a smaller eta) is dropped and counted, never trained on. At most
    (eta + 1) x B groups are held.

    With `send` (an engine that generates in the background) the rollouts are sent, not waited for:
    send() returns a function that waits for the rollout and scores it (a draw). The step waits only
    when it needs a rollout still in flight; `settle` waits for them all before a checkpoint.

    Returns this rank's share of the trained groups (`my_share`) and the trained samples' metrics,
    with async/staleness, async/dropped_groups, async/inflight_groups and async/generated."""
    k = run.step
    seen, dropped, made = [], 0, 0
    while len(queue) > eta + 1:  # held by a run with a larger eta: too stale by the time its step comes
        dropped += len(queue.pop()["groups"])
    while True:
        while len(queue) <= eta:
            made += 1
            if send is not None:  # sent now, scored when a step needs it (or a checkpoint is due)
                queue.append({"version": k, "pending": send()})
                continue
            got = draw()
            seen.append(got.metrics)
            queue.append({"version": k, "groups": gathered_groups(got, run, G), "metrics": got.metrics})
        held = len(queue) * B
        if "pending" in queue[0]:
            seen.append(arrive(queue[0], run, G))
        batch = queue.pop(0)
        if k - batch["version"] <= eta:
            break
        dropped += len(batch["groups"])
    metrics = dict(batch["metrics"])  # the trained samples' reward and rollout figures
    metrics["time/reward"] = sum(m["time/reward"] for m in seen)  # this step's generation's
    metrics.update({"async/staleness": float(k - batch["version"]), "async/dropped_groups": float(dropped),
                    "async/inflight_groups": float(held), "async/generated": float(made)})
    return (*my_share(batch["groups"], run, G), metrics)


def arrive(entry: dict, run: Any, G: int) -> dict[str, float]:
    """A lagged rollout sent in the background, waited for and scored in place; returns its metrics."""
    got = entry.pop("pending")()
    entry.update(groups=gathered_groups(got, run, G), metrics=got.metrics)
    return got.metrics


def settle(queue: list[dict], run: Any, G: int) -> None:
    """Every lagged rollout still in flight waited for and scored, in order: a checkpoint holds them
    as data (what was sent with weights the checkpoint no longer has could not be sent again)."""
    for entry in queue:
        if "pending" in entry:
            arrive(entry, run, G)


def gathered_groups(got: Any, run: Any, G: int) -> list[dict]:
    """The groups of one draw (split_groups' dicts), every rank's, prompt-major, on every rank."""
    first = shard(len(got.shaped) // G, run.par.rank, run.par.world)[0]
    return [g for part in run.par.gather(split_groups(got.ro, got.shaped, G, first)) for g in part]


def my_share(use: list[dict], run: Any, G: int) -> tuple[Rollout, torch.Tensor, int]:
    """This rank's share of K groups: its rollout, the K groups' rewards [K * G], its row offset."""
    lo, hi = shard(len(use), run.par.rank, run.par.world)
    shaped = torch.tensor([r for g in use for r in g["rewards"]])  # [K * G]
    return join_groups(use[lo:hi]), shaped, lo * G


def split_groups(ro: Rollout, shaped: torch.Tensor, G: int, first: int) -> list[dict]:
    """This rank's rollout as one plain dict per group (checkpointable: lists, numbers, strings),
    with its G rewards; `first` is the rank's first prompt in the step's batch."""
    out = []
    for b in range(len(ro.completion_ids) // G):
        rows = slice(b * G, (b + 1) * G)
        out.append({"prompt_ids": ro.prompt_ids[b * G], "completion_ids": ro.completion_ids[rows],
                    "texts": ro.texts[rows], "logprobs": ro.logprobs[rows], "finished": ro.finished[rows],
                    "model_mask": ro.model_mask[rows] if ro.model_mask is not None else None,
                    "conversations": ro.conversations[rows] if ro.conversations is not None else None,
                    "rewards": shaped[(first + b) * G:(first + b + 1) * G].tolist()})
    return out


def join_groups(groups: list[dict]) -> Rollout:
    """The Rollout (prompt-major) of split_groups' dicts."""
    def cat(key):
        return [x for g in groups for x in g[key]]
    multi = all(g["model_mask"] is not None for g in groups)
    return Rollout(prompt_ids=[g["prompt_ids"] for g in groups for _ in g["completion_ids"]],
                   completion_ids=cat("completion_ids"), texts=cat("texts"), logprobs=cat("logprobs"),
                   finished=cat("finished"), model_mask=cat("model_mask") if multi else None,
                   conversations=cat("conversations") if all(g["conversations"] is not None for g in groups) else None)
