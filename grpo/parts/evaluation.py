"""The one evaluation path: what every trainer's periodic evaluation and `grpo eval` score with.

- `sample_and_score`: n completions per prompt from an engine, scored by a reward source (under
  its own fork of the RNG when seeded, so evaluating never changes what training draws);
- `policy_eval`: a trainer's evaluation on the held-out prompts (reward, greedy pass@1, the reward
  model's score, the KL from the reference), sharded under torchrun;
- the metrics of `grpo eval` (grpo/commands/eval.py), for P prompts with n completions each, c_i of
  them correct (reward 1) for prompt i:
  - reward/mean: mean reward over all P * n completions.
  - pass@k: mean over prompts of 1 - C(n - c_i, k) / C(n, k), the unbiased estimator of Chen et al.
    (2021) of "at least one of k samples is correct". pass@1 is then the mean of c_i / n.
  - maj@k: for each prompt, a majority vote over the extracted answers of its first k completions
    (the `extracted` field of a verifier's info, e.g. the math verifier's); the earliest completion
    giving the winning answer is scored. Completions without an answer do not vote; ties go to the
    answer seen first. Answers are compared as normalised strings (plain numbers by value), not by
    mathematical equivalence, so `1/2` and `0.5` are separate votes.
  k runs over the powers of 2 below n, and n.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import torch

from grpo.parts.reward_sources import Rewards, score_rollout
from grpo.parts.rollout.multiturn import conversation_metrics, conversation_text, generate
from grpo.parts.rollout.base import Rollout, SamplingParams
from grpo.verifiers.math_extract import plain_number

log = logging.getLogger(__name__)


# ---- metrics (pure) ------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k draws without replacement from n is correct), c correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct completion
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # exact integers, one rounding


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def vote_key(answer: Any) -> str | None:
    """What two answers must share to count as the same vote: plain numbers by value, else the text
    without whitespace. None (no answer extracted) does not vote."""
    if answer is None:
        return None
    text = str(answer).strip()
    if not text:
        return None
    value = plain_number(text)
    if value is not None:
        return f"number:{value}"
    return "".join(text.split())


def majority_index(answers: list[Any]) -> int | None:
    """Index of the earliest completion giving the most common answer; None when nothing voted."""
    keys = [vote_key(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == best)  # ties: seen first


def summarize(rewards: list[list[float]], answers: list[list[Any]] | None) -> dict[str, float]:
    """rewards[i][j]: reward of completion j of prompt i ([P][n]); answers likewise (None: no maj@k)."""
    n = len(rewards[0])
    if any(len(r) != n for r in rewards):
        raise ValueError("every prompt needs the same number of completions")
    P = len(rewards)
    correct = [sum(r >= 1.0 for r in row) for row in rewards]  # c_i
    out = {"reward/mean": sum(map(sum, rewards)) / (P * n)}
    for k in k_values(n):
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / P
    if answers is not None:
        for k in k_values(n):
            hits = 0
            for row_r, row_a in zip(rewards, answers):
                i = majority_index(row_a[:k])
                hits += i is not None and row_r[i] >= 1.0
            out[f"maj@{k}"] = hits / P
    return out


# ---- the one evaluation path ----------------------------------------------------------------
def generate_with_bar(engine, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, samples: list[Any],
                      desc: str) -> Rollout:
    """generate(), with a progress bar over the prompts (`desc` its label), for the commands that
    sample for minutes (grpo bon, grpo eval). The prompts go in the chunks the hf engine makes of
    them anyway (batch_size // n whole prompts), one after the other from the same RNG, so the
    completions are those of one call; an engine that batches otherwise (vLLM), or reseeds each
    call, gets one call."""
    from tqdm.auto import tqdm

    size = getattr(engine, "batch_size", None)
    per = max(1, size // n) if size and sampling.seed is None else max(1, len(prompt_ids))
    parts = []
    with tqdm(total=len(prompt_ids), desc=desc, unit="prompt", dynamic_ncols=True) as bar:
        for start in range(0, len(prompt_ids), per):
            parts.append(generate(engine, prompt_ids[start:start + per], n, sampling, samples[start:start + per]))
            bar.update(len(parts[-1].prompt_ids) // n)
    if len(parts) == 1:
        return parts[0]
    joined = {f: [x for p in parts for x in getattr(p, f)] for f in ("prompt_ids", "completion_ids", "texts",
                                                                   "logprobs", "finished")}
    for f in ("model_mask", "conversations"):  # multi-turn only: None in every part, or a list in every one
        joined[f] = None if getattr(parts[0], f) is None else [x for p in parts for x in getattr(p, f)]
    return Rollout(**joined)


def sample_and_score(engine, prompt_ids: list[list[int]], samples: list[Any], n: int, sampling: SamplingParams,
                     source, seed: int | None = None, bar: str | None = None) -> tuple[Rollout, Rewards]:
    """n completions per prompt (prompt-major) and their rewards from `source`; with `bar`, under a
    progress bar of that label (generate_with_bar).

    With a seed, sampling runs under its own fork of the RNG, so evaluating more or less often
    never changes what training draws.
    """
    def sample() -> Rollout:
        if bar is None:
            return generate(engine, prompt_ids, n, sampling, samples)
        return generate_with_bar(engine, prompt_ids, n, sampling, samples, bar)

    if seed is None:
        ro = sample()
    else:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.manual_seed(seed)
            ro = sample()
    fields = [s.fields() for s in samples for _ in range(n)]  # [P * n] prompt-major, like ro
    return ro, score_rollout(source, ro, fields)


@torch.no_grad()
def sequence_kl(policy, ref, ro: Rollout, pad_id: int, temperature: float = 1.0, batch_size: int = 256) -> float:
    """Mean over completions sampled from the policy of sum_t log pi(y_t) - log ref(y_t): the k1
    estimate of KL(policy || reference) per sequence, in nats (unbiased; at the sampling temperature)."""
    from grpo.parts.batch import batch_logprobs, pack

    device = next(policy.parameters()).device
    total, n = 0.0, len(ro.completion_ids)
    for i in range(0, n, batch_size):
        mm = ro.model_mask[i:i + batch_size] if ro.model_mask is not None else None
        batch = pack(ro.prompt_ids[i:i + batch_size], ro.completion_ids[i:i + batch_size], pad_id, mm).to(device)
        diff = batch_logprobs(policy, batch, temperature) - batch_logprobs(ref, batch, temperature)  # [n, T]
        total += float((diff * batch.mask).sum())
    return total / max(1, n)


def policy_eval(engine, prompt_ids: list[list[int]], samples: list[Any], sampling: SamplingParams,
                greedy: SamplingParams, verifiers, rm=None, seed: int = 0, log_samples: int = 0,
                kl_models: tuple | None = None, pad_id: int | None = None, kl_batch_size: int = 256, par=None
                ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """A trainer's periodic evaluation: one sampled completion per held-out prompt scored by the
    task's verifiers (the true score; a trainer whose task has none passes its training reward),
    greedy pass@1, the reward model's score when there is one (eval/rm_score: proxy up while true
    down is over-optimisation), and with kl_models = (policy, reference) eval/kl, the sampled
    completions' KL from the reference per sequence (sequence_kl), the x axis of `grpo compare`;
    only for plain sampling (temperature > 0, no top-p / top-k truncation), where the samples come
    from the distribution that is scored.

    Under torchrun (`par`, a grpo.parts.distributed.Parallel) each rank scores its share of the prompts
    and the metrics are weighted by the shares; the table holds rank 0's samples."""
    if par is not None and par.world > 1:
        from grpo.parts.distributed import shard

        lo, hi = shard(len(samples), par.rank, par.world)
        if par.sharded:  # the KL forwards are collectives: one batch per rank keeps their counts equal
            kl_batch_size = len(samples)
        metrics, table = policy_eval(engine, prompt_ids[lo:hi], samples[lo:hi], sampling, greedy, verifiers, rm, seed,
                                     log_samples, kl_models, pad_id, kl_batch_size)
        return {**par.reduce_metrics(metrics, hi - lo), "eval/prompts": len(samples)}, table
    sampled, rs = sample_and_score(engine, prompt_ids, samples, 1, sampling, verifiers, seed)
    _, rg = sample_and_score(engine, prompt_ids, samples, 1, greedy, verifiers, seed)
    P = len(samples)
    metrics = {
        "eval/reward/mean": sum(rs.rewards) / P,
        **{f"eval/{k}": v for k, v in rs.metrics.items() if k.startswith(("reward/", "verifier/"))},
        "eval/greedy/reward/mean": sum(rg.rewards) / P,
        "eval/completion/len_mean": sum(len(c) for c in sampled.completion_ids) / P,
        "eval/prompts": P,
    }
    if getattr(verifiers, "passes", True):  # a score (prefs_rule, a reward model) has no pass
        metrics["eval/pass@1"] = sum(r >= 1.0 for r in rg.rewards) / P
    if rm is not None:
        metrics["eval/rm_score"] = float(rm.score(sampled.prompt_ids, sampled.completion_ids).mean())
    if kl_models is not None and sampling.temperature > 0 and sampling.top_p >= 1.0 and sampling.top_k == 0:
        metrics["eval/kl"] = sequence_kl(*kl_models, sampled, pad_id, sampling.temperature, kl_batch_size)
    texts = sampled.texts
    if sampled.conversations is not None:  # a multi-turn rollout: its metrics, and whole conversations in the table
        metrics.update({f"eval/{k}": v for k, v in conversation_metrics(sampled.conversations).items()})
        texts = [conversation_text(c) for c in sampled.conversations]
    table = [{"prompt": s.prompt or str(s.messages), "answer": str(s.answer if s.answer is not None else s.tests),
              "completion": c, "reward": r}
             for s, c, r in list(zip(samples, texts, rs.rewards))[:log_samples]]
    return metrics, table


def pass_fail(evaluation: dict[str, Any]) -> bool:
    """Whether an evaluation has a pass@1: its reward source has a pass (a verifier's reward of 1:
    math's right answer, code's every test passed, partial credit or not), not only a score
    (prefs_rule, a reward model), where the share of 1s reads like a failure."""
    return "eval/pass@1" in evaluation


def eval_headline(first: dict[str, Any], last: dict[str, Any], name: str = "eval reward") -> list[str]:
    """The summary's line of a policy's first and last evaluation (policy_eval): the mean reward of
    the samples (`name`), over how many held-out prompts; greedy pass@1 where the rewards are pass or
    fail (pass_fail); the KL from the reference where it was measured."""
    n = last.get("eval/prompts")
    line = f"{name}{f' over {n} held-out prompts' if n else ''}: {first['eval/reward/mean']:.3f} -> " \
           f"{last['eval/reward/mean']:.3f}"
    if pass_fail(first) and pass_fail(last):
        line += f"   greedy pass@1: {first['eval/pass@1']:.3f} -> {last['eval/pass@1']:.3f}"
    if "eval/kl" in last:
        line += f"   KL {last['eval/kl']:.2f}"
    return [line]
