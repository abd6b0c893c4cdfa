"""Throughput of the `math` verifier against a sequential math_verify.parse/verify loop.

    PYTHONPATH=. .venv/bin/python bench/bench_math_verify.py [--steps 16] [--batch 128] [--seed 0]

The workload imitates GRPO scoring: `steps` batches of `batch` completions (groups of 8 samples
per prompt, so answers repeat within a group), 60% GSM8K-style integer answers and 40% MATH-style
LaTeX answers (fractions, radicals, intervals, sets, expressions), each completion either right
(in the gold's form or an equivalent one), wrong, or a gaming attempt (hedge, two boxes).

Each side runs in a fresh interpreter, and its wall time includes interpreter start, imports and
(for us) starting the worker pool:

- baseline: ``for each pair: math_verify.verify(parse("$" + gold + "$"), parse(completion))``
- ours: ``MathVerifier().score(batch, samples)`` once per step, then ``close()``.

The intended verdict of every generated completion is known, so the table also shows how often
each side is right, besides how often the two agree. Finally the hot-path latency of one batch of
128 short completions after warm-up is measured (median of 20 calls, fresh pairs each call so the
verdict cache does not answer them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (gold, [equivalent forms], [wrong answers]) for MATH-style problems
LATEX = [
    ("\\frac{3}{4}", ["\\frac{3}{4}", "0.75", "\\dfrac{3}{4}", "\\frac{6}{8}"], ["\\frac{4}{3}", "0.7"]),
    ("2\\sqrt{3}", ["2\\sqrt{3}", "\\sqrt{12}", "2 \\sqrt 3"], ["3\\sqrt{2}", "\\sqrt{6}"]),
    ("[-2, 7)", ["[-2,7)", "[-2, 7)"], ["[-2,7]", "(-2,7)"]),
    ("\\{1, 4\\}", ["\\{1,4\\}", "4, 1", "1 \\text{ and } 4"], ["\\{1\\}", "1, 4, 5"]),
    ("x^2 + 2x + 1", ["(x+1)^2", "x^2+2x+1"], ["x^2+1", "(x-1)^2"]),
    ("\\frac{\\pi}{6}", ["\\frac{\\pi}{6}", "\\pi/6"], ["\\frac{\\pi}{3}", "30"]),
    ("y = 2x - 3", ["y=2x-3", "2x-3"], ["y=2x+3"]),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
     ["\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1 & 2\\\\ 3 & 4\\end{bmatrix}"],
     ["\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}"]),
    ("25\\%", ["25\\%", "25", "0.25"], ["2.5\\%", "75\\%"]),
    ("5\\text{ cm}", ["5", "5\\text{ cm}", "5 \\mbox{cm}"], ["6\\text{ cm}"]),
]


def make_workload(steps: int, batch: int, seed: int) -> list[list[tuple[str, str, bool]]]:
    """steps x batch (gold, completion, intended verdict)."""
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        rows = []
        while len(rows) < batch:
            if rng.random() < 0.6:
                a, b = rng.randint(10, 999), rng.randint(10, 999)
                gold = str(a + b)
                right, wrong = [gold, f"{a + b:,}", f"{a + b}.0"], [str(a + b + 1), str(a + b - 10)]
                work = f"We add {a} and {b}: {a} + {b} = {a + b}."
            else:
                gold, right, wrong = rng.choice(LATEX)
                work = "Simplifying the expression step by step gives the result."
            for _ in range(8):  # one GRPO group: samples of the same prompt
                r = rng.random()
                if r < 0.5:
                    rows.append((gold, f"{work} So the answer is $\\boxed{{{rng.choice(right)}}}$.", True))
                elif r < 0.85:
                    rows.append((gold, f"{work} So the answer is $\\boxed{{{rng.choice(wrong)}}}$.", False))
                elif r < 0.93:  # hedge between a right and a wrong answer
                    rows.append((gold, f"{work} It is \\boxed{{{right[0]}}} or \\boxed{{{wrong[0]}}}.", False))
                else:
                    rows.append((gold, f"{work} Final Answer: The final answer is {right[0]}. I hope it is correct.", True))
        out.append(rows[:batch])
    return out


BASELINE = """
import json, sys, time, logging
t0 = time.perf_counter()
from math_verify import parse, verify
logging.getLogger("math_verify").setLevel(logging.ERROR)
steps = json.load(open(sys.argv[1]))
verdicts = []
for rows in steps:
    for gold, completion, _ in rows:
        # a bare LaTeX gold is wrapped in $...$ as math-verify's README advises; unwrapped, its
        # default extraction finds nothing in golds such as "\\frac{3}{4}"
        verdicts.append(bool(verify(parse("$" + gold + "$"), parse(completion))))
json.dump({"verdicts": verdicts, "inner_s": time.perf_counter() - t0}, open(sys.argv[2], "w"))
"""

OURS = """
import json, sys, time
t0 = time.perf_counter()
from grpo.verifiers.math import MathVerifier
steps = json.load(open(sys.argv[1]))
verdicts = []
v = MathVerifier()
for rows in steps:
    scores = v.score([c for _, c, _ in rows], [{"answer": g} for g, _, _ in rows])
    verdicts += [s.reward == 1.0 for s in scores]
v.close()
json.dump({"verdicts": verdicts, "inner_s": time.perf_counter() - t0}, open(sys.argv[2], "w"))
"""

LATENCY = """
import json, sys, time, statistics, random
from grpo.verifiers.math import MathVerifier
v = MathVerifier()
kind = sys.argv[1]
def batch(k):
    rng = random.Random(k)
    if kind == "gsm8k":
        pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(128)]
        return ([f"... so {a}+{b}={a + b}. \\\\boxed{{{a + b}}}" for a, b in pairs], [{"answer": str(a + b)} for a, b in pairs])
    # LaTeX fractions, fresh every call (the cache cannot answer), 16 prompts x 8 samples
    golds = [f"\\\\frac{{{rng.randint(1, 10**6)}}}{{{rng.randint(2, 10**6)}}}" for _ in range(16)]
    return ([f"so the value is \\\\boxed{{{g}}}" for g in golds for _ in range(8)], [{"answer": g} for g in golds for _ in range(8)])
v.score(*batch(-1))  # warm-up: starts the pool
times = []
for k in range(20):
    c, s = batch(k)
    t = time.perf_counter(); v.score(c, s); times.append(time.perf_counter() - t)
v.close()
print(json.dumps({"median_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000}))
"""


def run_side(code: str, data: Path) -> tuple[dict, float]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(data), str(out)], check=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    res = json.loads(out.read_text())
    out.unlink()
    return res, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    steps = make_workload(args.steps, args.batch, args.seed)
    intended = [ok for rows in steps for _, _, ok in rows]
    n = len(intended)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(steps, f)
        data = Path(f.name)
    try:
        base, base_wall = run_side(BASELINE, data)
        ours, ours_wall = run_side(OURS, data)
    finally:
        data.unlink()
    agree = sum(a == b for a, b in zip(base["verdicts"], ours["verdicts"]))
    right_b = sum(a == w for a, w in zip(base["verdicts"], intended))
    right_o = sum(a == w for a, w in zip(ours["verdicts"], intended))
    print(f"workload: {args.steps} steps x {args.batch} completions = {n} pairs, "
          f"{len(set((g, c) for rows in steps for g, c, _ in rows))} distinct; cpus={os.cpu_count()}")
    print(f"{'':34} {'wall s (incl. startup)':>23} {'pairs/s':>9} {'right vs intended':>18}")
    print(f"{'sequential math_verify loop':34} {base_wall:23.2f} {n / base_wall:9.0f} {right_b / n:18.1%}")
    print(f"{'MathVerifier.score per step':34} {ours_wall:23.2f} {n / ours_wall:9.0f} {right_o / n:18.1%}")
    print(f"throughput ratio: {base_wall / ours_wall:.2f}x; verdict agreement: {agree / n:.1%} ({n - agree} differ)")
    diffs = [(rows_g, rows_c[-70:], b, o, w) for (rows_g, rows_c, w), b, o in
             zip([r for rows in steps for r in rows], base["verdicts"], ours["verdicts"]) if b != o]
    seen = set()
    for g, c, b, o, w in diffs:
        if (g, c) not in seen and len(seen) < 8:
            seen.add((g, c))
            print(f"  differs: gold={g!r} completion=...{c!r} baseline={b} ours={o} intended={w}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for kind in ("gsm8k", "latex"):
        r = subprocess.run([sys.executable, "-c", LATENCY, kind], check=True, cwd=ROOT, env=env,
                           capture_output=True, text=True)
        lat = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"latency, 128 {kind} completions after warm-up: median {lat['median_ms']:.1f} ms, "
              f"max {lat['max_ms']:.1f} ms")


if __name__ == "__main__":
    main()
