"""The built-in preference data: simulated labellers rank the policy's own answers.

As in InstructGPT, a labeller sees K = 4..9 samples of the policy for one prompt and ranks them.
Here the prompts are "What is a + b?" problems, the samples come from the embedded chat model
(`embedded-chat`: the embedded arithmetic model fine-tuned to answer in several styles, terse or
chatty, boxed or not, right half of the time) at T = 1, and the labeller ranks them by a hidden rule
(verifiers/prefs_rule.py: properly boxed, then the shorter the better, then the nearer the truth)
plus noise:

    labeller order = the K completions sorted by  true_score + noise * Gumbel(0, 1)  descending

Sorting Gumbel-perturbed scores draws a Plackett-Luce ranking with weights exp(true_score / noise):
the labeller picks the best, then the best of the rest, each pick a softmax choice, so close calls
are often swapped and clear ones rarely (two responses swap with probability
sigmoid(-gap / noise)). The default noise, 0.15, swaps 13.9% of all the pairs whose true scores
differ and 29.1% of the adjacent ones (neighbours in a ranking are the closer calls), as measured
on the shipped data.

Files (JSON lines):
- train.jsonl: {"prompt", "responses": best first} per prompt of the arithmetic task's TRAINING
  split; no true scores (a reward model must learn the rule from the rankings alone);
- eval.jsonl: {"prompt", "chosen", "rejected"} for every pair with different true scores, in the
  rule's noiseless order, from HELD-OUT prompts, so no evaluated prompt is trained on.

The same options and seed give byte-for-byte the same files on the same torch build (sampling goes
through float matmuls, run on one thread). grpo/data holds the files built with the defaults
(`grpo prefs --ship`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from grpo.tasks.preference_data import K_MAX, K_MIN, shipped_file
from grpo.verifiers.prefs_rule import rule

SHIPPED_TRAIN, SHIPPED_EVAL = shipped_file("embedded-prefs"), shipped_file("embedded-prefs-eval")
NOISE = 0.15  # Gumbel scale: flips 13.9% of all pairs with different true scores, 29.1% of adjacent ones
PER_ROUND, MAX_ROUNDS = 8, 8  # samples per prompt per round; a prompt with few distinct answers stops at 64
SCORE_BINS = (("1", 1.0, 1.0), ("[0.5, 1)", 0.5, 1.0), ("[0.25, 0.5)", 0.25, 0.5), ("[0.1, 0.25)", 0.1, 0.25),
              ("(0, 0.1)", 0.0, 0.1), ("0", 0.0, 0.0))


def check_options(train_prompts: int, eval_prompts: int, k_min: int, k_max: int, noise: float,
                  temperature: float, max_new_tokens: int) -> None:
    if train_prompts < 1 or eval_prompts < 1:
        raise ValueError(f"need at least 1 training and 1 evaluation prompt, got {train_prompts} and {eval_prompts}")
    if not K_MIN <= k_min <= k_max <= K_MAX:
        raise ValueError(f"need {K_MIN} <= k_min <= k_max <= {K_MAX}, got k_min={k_min}, k_max={k_max}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be >= 0 (0 = a perfect labeller), got {noise}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (greedy decoding gives one answer per prompt), got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def sample_distinct(engine, tok, samples: list, ks: list[int], seed: int, stream: str,
                    temperature: float, max_new_tokens: int) -> tuple[list[list[str]], int]:
    """Up to ks[i] distinct non-empty completions of samples[i], in the order first drawn, and the
    number of completions drawn in all.

    Sampling runs in rounds of PER_ROUND draws for every prompt still short of its K (all in one
    batched call per round, seeded by (seed, stream, round)), for at most MAX_ROUNDS rounds.
    """
    from grpo.parts.rollout import encode_prompts
    from grpo.parts.rollout.base import SamplingParams

    ids = encode_prompts(tok, samples)
    got: list[list[str]] = [[] for _ in samples]
    draws = 0
    for rnd in range(MAX_ROUNDS):
        todo = [i for i, k in enumerate(ks) if len(got[i]) < k]
        if not todo:
            break
        sp = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                            seed=zlib.crc32(f"{seed}:{stream}:{rnd}".encode()))
        texts = engine.generate([ids[i] for i in todo], PER_ROUND, sp).texts
        draws += len(texts)
        for j, i in enumerate(todo):
            for text in texts[j * PER_ROUND:(j + 1) * PER_ROUND]:
                if len(got[i]) < ks[i] and text.strip() and text not in got[i]:
                    got[i].append(text)
    return got, draws


def gumbel(rng: random.Random) -> float:
    return -math.log(max(rng.expovariate(1.0), 1e-300))  # -log(Exp(1)) is Gumbel(0, 1)


def label(scores: list[float], noise: float, rng: random.Random) -> list[int]:
    """The labeller's ranking, best first: indices sorted by score + noise * Gumbel (Plackett-Luce)."""
    keys = [s + noise * gumbel(rng) for s in scores]
    return sorted(range(len(scores)), key=lambda j: -keys[j])


def flips(ordered: list[float]) -> tuple[int, int, int, int]:
    """(adjacent flipped, adjacent with different scores, all flipped, all with different scores) of
    true scores listed in the labeller's order; a flip is a worse response ranked above a better one."""
    adj = [(a, b) for a, b in zip(ordered, ordered[1:]) if a != b]
    every = [(a, b) for i, a in enumerate(ordered) for b in ordered[i + 1:] if a != b]
    return sum(a < b for a, b in adj), len(adj), sum(a < b for a, b in every), len(every)


def score_bins(scores: list[float]) -> dict[str, float]:
    """Share of completions per true-score range (right answers are the "1" bin)."""
    def inside(s: float, lo: float, hi: float) -> bool:
        return s == lo if lo == hi else lo <= s < hi and s > 0
    return {name: round(sum(inside(s, lo, hi) for s in scores) / max(1, len(scores)), 4)
            for name, lo, hi in SCORE_BINS}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def build_dataset(out_dir: str | Path, model_path: str = "embedded-chat", train_prompts: int = 2000,
                  eval_prompts: int = 200, k_min: int = 4, k_max: int = 9, noise: float = NOISE, seed: int = 0,
                  temperature: float = 1.0, max_new_tokens: int = 32) -> dict[str, Any]:
    """Write out_dir/train.jsonl (rankings) and out_dir/eval.jsonl (pairs); return the stats."""
    import torch

    check_options(train_prompts, eval_prompts, k_min, k_max, noise, temperature, max_new_tokens)
    t0 = time.time()
    threads = torch.get_num_threads()
    # One thread: a 1M-parameter model gains nothing from more, they spin against other work on a
    # shared CPU (10x slower, measured), and the samples then do not depend on the thread count.
    torch.set_num_threads(1)
    try:
        stats = _build(Path(out_dir), model_path, train_prompts, eval_prompts, k_min, k_max, noise, seed,
                       temperature, max_new_tokens)
    finally:
        torch.set_num_threads(threads)
    stats["seconds"] = round(time.time() - t0, 1)
    return stats


def _build(out: Path, model_path: str, train_prompts: int, eval_prompts: int, k_min: int, k_max: int,
           noise: float, seed: int, temperature: float, max_new_tokens: int) -> dict[str, Any]:
    from grpo.parts.modeling import load_model, load_tokenizer
    from grpo.parts.rollout.hf import HFEngine
    from grpo.tasks.arithmetic import ArithmeticTask

    tok = load_tokenizer(model_path)
    engine = HFEngine(load_model(model_path), tok)
    task = ArithmeticTask(seed=seed, eval_size=eval_prompts)
    splits = {"train": [task.train_sample(i) for i in range(train_prompts)], "eval": task.eval_samples()}
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    stats: dict[str, Any] = {}
    for split, samples in splits.items():
        k_rng = random.Random(f"{seed}:k:{split}")
        ks = [k_rng.randint(k_min, k_max) for _ in samples]
        drawn, draws = sample_distinct(engine, tok, samples, ks, seed, split, temperature, max_new_tokens)
        all_scores, counts, realised, short = [], [0, 0, 0, 0], [], 0
        for i, (s, texts) in enumerate(zip(samples, drawn)):
            if len(texts) < 2:
                continue  # nothing to rank
            short += len(texts) < ks[i]
            scores = [rule(t, s.answer)[0] for t in texts]
            all_scores += scores
            realised.append(len(texts))
            if split == "train":
                order = label(scores, noise, random.Random(f"{seed}:label:{i}"))
                counts = [c + f for c, f in zip(counts, flips([scores[j] for j in order]))]
                rows[split].append({"prompt": s.prompt, "responses": [texts[j] for j in order]})
            else:  # every strictly ordered pair, better first
                rows[split] += [{"prompt": s.prompt, "chosen": texts[a], "rejected": texts[b]}
                                for a in range(len(texts)) for b in range(len(texts)) if scores[a] > scores[b]]
        stats[split] = {
            "prompts": len(samples), "skipped": len(samples) - len(realised), "rows": len(rows[split]),
            "mean_k": round(statistics.mean(realised), 3) if realised else 0.0, "short_of_k": short,
            "draws": draws,
            "mean_score": round(statistics.mean(all_scores), 4) if all_scores else 0.0,
            "score_bins": score_bins(all_scores),
        }
        if split == "train":
            stats[split].update(adjacent_flip_rate=round(counts[0] / max(1, counts[1]), 4),
                                pair_flip_rate=round(counts[2] / max(1, counts[3]), 4))
    out.mkdir(parents=True, exist_ok=True)
    for split in rows:
        _write_jsonl(out / f"{split}.jsonl", rows[split])
    return stats


def prefs_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="grpo prefs",
        description="Build the built-in preference data: the embedded model's answers ranked by simulated "
                    "labellers (a hidden rule plus Plackett-Luce noise).")
    ap.add_argument("--out", default="prefs_data", help="directory for train.jsonl and eval.jsonl")
    ap.add_argument("--model", default="embedded-chat", help="the model whose samples are ranked")
    ap.add_argument("--train-prompts", type=int, default=2000, help="training prompts (one ranking each)")
    ap.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts (all their ordered pairs)")
    ap.add_argument("--k-min", type=int, default=4, help="fewest responses ranked per prompt")
    ap.add_argument("--k-max", type=int, default=9, help="most responses ranked per prompt")
    ap.add_argument("--noise", type=float, default=NOISE, help="labeller noise, the Gumbel scale (0 = perfect)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--ship", action="store_true",
                    help=f"also copy the files to {SHIPPED_TRAIN.name} and {SHIPPED_EVAL.name} in {SHIPPED_TRAIN.parent}")
    a = ap.parse_args(argv)
    try:
        check_options(a.train_prompts, a.eval_prompts, a.k_min, a.k_max, a.noise, a.temperature, a.max_new_tokens)
    except ValueError as e:
        ap.error(str(e))
    stats = build_dataset(a.out, a.model, a.train_prompts, a.eval_prompts, a.k_min, a.k_max, a.noise, a.seed,
                          a.temperature, a.max_new_tokens)
    tr, ev = stats["train"], stats["eval"]
    print(f"train: {tr['rows']} rankings (mean K {tr['mean_k']}, {tr['skipped']} prompts skipped, "
          f"{tr['short_of_k']} short of their K, {tr['draws']} samples drawn); the labeller flipped "
          f"{tr['adjacent_flip_rate']:.1%} of adjacent and {tr['pair_flip_rate']:.1%} of all pairs with "
          "different true scores")
    print(f"eval: {ev['rows']} strictly ordered pairs from {ev['prompts'] - ev['skipped']} held-out prompts")
    print(f"true scores: mean {tr['mean_score']} (train), {ev['mean_score']} (eval); train share by range: "
          + ", ".join(f"{k} {v:.1%}" for k, v in tr["score_bins"].items()))
    print(f"written to {a.out}/train.jsonl and {a.out}/eval.jsonl in {stats['seconds']} s")
    if a.ship:
        SHIPPED_TRAIN.parent.mkdir(exist_ok=True)
        shutil.copyfile(Path(a.out) / "train.jsonl", SHIPPED_TRAIN)
        shutil.copyfile(Path(a.out) / "eval.jsonl", SHIPPED_EVAL)
        print(f"copied to {SHIPPED_TRAIN} and {SHIPPED_EVAL}")
    return 0


if __name__ == "__main__":
    raise SystemExit(prefs_main(sys.argv[1:]))
