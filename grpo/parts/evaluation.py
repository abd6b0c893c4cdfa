"""`grpo eval`: sample k completions per held-out prompt and report mean reward, pass@k and maj@k.

    grpo eval model.path=runs/<run>/checkpoints/step_000120/model task=gsm8k eval.samples=8

It samples and scores through `sample_and_score`, the one evaluation path that every trainer's
periodic evaluation (`policy_eval`) uses too, so a score here is the score the training run's
evaluation would give. It writes one JSON line per completion and a summary JSON next to it, and
prints a table.

Metrics, for P prompts with n completions each, c_i of them correct (reward 1) for prompt i:
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

import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from grpo.parts import config as C
from grpo.parts.checkpoint import seed_everything
from grpo.parts.config import ConfigError
from grpo.parts.modeling import load_model, load_tokenizer, pick_device
from grpo.parts.reward_sources import RewardInputs, Rewards, build_rewards
from grpo.parts.rollout import build_engine, encode_prompts, sampling_params
from grpo.parts.rollout.base import Rollout, SamplingParams
from grpo.tasks.base import TaskError, build_task
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
def sample_and_score(engine, prompt_ids: list[list[int]], samples: list[Any], n: int, sampling: SamplingParams,
                     source, seed: int | None = None) -> tuple[Rollout, Rewards]:
    """n completions per prompt (prompt-major) and their rewards from `source`.

    With a seed, sampling runs under its own fork of the RNG, so evaluating more or less often
    never changes what training draws.
    """
    if seed is None:
        ro = engine.generate(prompt_ids, n, sampling)
    else:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.manual_seed(seed)
            ro = engine.generate(prompt_ids, n, sampling)
    fields = [s.fields() for s in samples for _ in range(n)]  # [P * n] prompt-major, like ro
    return ro, source(RewardInputs.from_rollout(ro, fields))


@torch.no_grad()
def sequence_kl(policy, ref, ro: Rollout, pad_id: int, temperature: float = 1.0, batch_size: int = 256) -> float:
    """Mean over completions sampled from the policy of sum_t log pi(y_t) - log ref(y_t): the k1
    estimate of KL(policy || reference) per sequence, in nats (unbiased; at the sampling temperature)."""
    from grpo.parts.batch import batch_logprobs, pack

    device = next(policy.parameters()).device
    total, n = 0.0, len(ro.completion_ids)
    for i in range(0, n, batch_size):
        batch = pack(ro.prompt_ids[i:i + batch_size], ro.completion_ids[i:i + batch_size], pad_id).to(device)
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
        return par.reduce_metrics(metrics, hi - lo), table
    sampled, rs = sample_and_score(engine, prompt_ids, samples, 1, sampling, verifiers, seed)
    _, rg = sample_and_score(engine, prompt_ids, samples, 1, greedy, verifiers, seed)
    P = len(samples)
    metrics = {
        "eval/reward/mean": sum(rs.rewards) / P,
        **{f"eval/{k}": v for k, v in rs.metrics.items() if k.startswith(("reward/", "verifier/"))},
        "eval/greedy/reward/mean": sum(rg.rewards) / P,
        "eval/pass@1": sum(r >= 1.0 for r in rg.rewards) / P,
        "eval/completion/len_mean": sum(len(c) for c in sampled.completion_ids) / P,
    }
    if rm is not None:
        metrics["eval/rm_score"] = float(rm.score(sampled.prompt_ids, sampled.completion_ids).mean())
    if kl_models is not None and sampling.temperature > 0 and sampling.top_p >= 1.0 and sampling.top_k == 0:
        metrics["eval/kl"] = sequence_kl(*kl_models, sampled, pad_id, sampling.temperature, kl_batch_size)
    table = [{"prompt": s.prompt or str(s.messages), "answer": str(s.answer if s.answer is not None else s.tests),
              "completion": c, "reward": r}
             for s, c, r in list(zip(samples, sampled.texts, rs.rewards))[:log_samples]]
    return metrics, table


# ---- the command ---------------------------------------------------------------------------
def resolve_model_dir(path: str) -> str:
    """A model dir as is; a checkpoint dir (…/step_N) -> its model/; a run dir -> its newest checkpoint."""
    p = Path(str(path)).expanduser()
    if not p.is_dir() or (p / "config.json").exists():
        return str(path)
    if (p / "model" / "config.json").exists():
        return str(p / "model")
    latest = p / "checkpoints" / "latest"
    if latest.exists():
        model = latest.parent / latest.read_text().strip() / "model"
        if (model / "config.json").exists():
            return str(model)
    return str(path)  # load_model explains what is missing


def extracted_answers(infos: list[dict[str, Any]]) -> tuple[str | None, list[Any] | None]:
    """The first verifier (in config order) whose infos carry an `extracted` answer, and those answers.

    infos[j] maps each verifier's label to its info for completion j, in the order of task.verifiers.
    """
    names = list(dict.fromkeys(name for i in infos for name in i))
    for name in names:
        if any(isinstance(i.get(name), dict) and "extracted" in i[name] for i in infos):
            return name, [(i.get(name) or {}).get("extracted") for i in infos]
    return None, None


def format_table(s: dict[str, Any]) -> str:
    lines = [f"grpo eval: {s['model']} on {s['task']}: {s['prompts']} prompts x {s['samples']} samples "
             f"(temperature {s['temperature']})",
             f"  reward/mean  {s['reward/mean']:.4f}",
             f"  {'k':>4}  {'pass@k':>8}  {'maj@k':>8}"]
    for k in k_values(s["samples"]):
        maj = s.get(f"maj@{k}")
        lines.append(f"  {k:>4}  {s[f'pass@{k}']:>8.4f}  {'-' if maj is None else f'{maj:.4f}':>8}")
    if s.get("answers_from") is None:
        lines.append("  maj@k: no verifier reports extracted answers")
    lines.append(f"  completion length {s['completion/len_mean']:.1f} tokens, "
                 f"{s['completion/truncated_frac']:.1%} cut at max_new_tokens")
    lines += [f"samples: {s['output']}", f"summary: {s['summary']}"]
    return "\n".join(lines)


def run_eval(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    cfg = C.parse(C.EvalConfig, raw)
    e, t, m = cfg.eval, cfg.trainer, cfg.model
    n = e.samples
    temperature = cfg.rollout.temperature if e.temperature is None else e.temperature
    if temperature <= 0 and n > 1:
        raise ConfigError(f"eval.temperature=0 is greedy decoding: all {n} samples would be the same; "
                          "use eval.samples=1 or a temperature > 0")
    if not cfg.task.get("verifiers"):
        raise ConfigError("task.verifiers is not set: name at least one verifier, e.g. task.verifiers=[math]")
    cfg.rollout.temperature = temperature  # the engine (vLLM's log-prob mode) samples at the eval temperature
    seed_everything(t.seed)

    task = build_task(cfg.task, seed=t.seed)
    samples = task.eval_samples()
    if e.max_prompts:
        samples = samples[: e.max_prompts]
    if not samples:
        raise TaskError(f"task {cfg.task.get('name')!r} holds out no samples to evaluate")
    model_dir = resolve_model_dir(m.path)
    tok = load_tokenizer(model_dir)
    device = pick_device(m.device)
    _, verifiers, _ = build_rewards(cfg.task["verifiers"], cfg.verifier.fail_fast, cfg.verifier.timeout, None, tok, device)
    engine = None
    try:
        model = load_model(model_dir, m.dtype, device=device).eval()
        engine = build_engine(cfg.rollout, model, tok, model_dir, m.dtype, m.device, lambda: samples, t.system_prompt)
        sp = sampling_params(cfg.rollout, greedy=temperature <= 0)
        t0 = time.time()
        seed_everything(t.seed)  # the samples depend on the seed, not on what loading drew
        ro, scored = sample_and_score(engine, encode_prompts(tok, samples, t.system_prompt), samples, n, sp, verifiers)
        rewards, infos, rmetrics = scored.rewards, scored.infos, scored.metrics
        t2 = time.time()
    finally:
        verifiers.close()
        if engine is not None:
            engine.close()
    source, answers = extracted_answers(infos)

    P = len(samples)
    grid = [rewards[i * n:(i + 1) * n] for i in range(P)]  # [P][n]
    agrid = [answers[i * n:(i + 1) * n] for i in range(P)] if answers is not None else None
    output = Path(e.output or Path(run_dir) / "eval_samples.jsonl")
    summary_path = output.with_name(output.stem + ".summary.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as f:
        for j, (text, ids, fin, r, info) in enumerate(zip(ro.texts, ro.completion_ids, ro.finished, rewards, infos)):
            s = samples[j // n]
            rec = {"prompt_index": j // n, "sample_index": j % n,
                   "prompt": s.prompt if s.messages is None else s.messages, "answer": s.answer,
                   "completion": text, "reward": r, "correct": r >= 1.0, "finished": fin,
                   "completion_tokens": len(ids), "info": info}
            f.write(json.dumps(rec, default=str) + "\n")

    summary = {
        "model": str(m.path), "model_dir": model_dir, "task": cfg.task.get("name"),
        "prompts": P, "samples": n, "temperature": temperature,
        "max_new_tokens": cfg.rollout.max_new_tokens, "engine": cfg.rollout.engine, "seed": t.seed,
        **summarize(grid, agrid),
        "answers_from": source,
        **{k: v for k, v in rmetrics.items() if k.startswith(("reward/", "verifier/"))},
        "completion/len_mean": sum(len(c) for c in ro.completion_ids) / len(ro.completion_ids),
        "completion/truncated_frac": 1.0 - sum(ro.finished) / len(ro.finished),
        "time/generate_and_score": t2 - t0,
        "output": str(output), "summary": str(summary_path),
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary), flush=True)
    return summary
