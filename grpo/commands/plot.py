"""Plot a run's reward curve from its metrics.jsonl: `python -m grpo.commands.plot RUN_DIR [-o curve.png]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from grpo.parts.tracking import read_metrics


def plot(run_dir: Path, out: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir)
    train = [r for r in recs if "reward/mean" in r]
    evals = [r for r in recs if "eval/reward/mean" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["step"] for r in train], [r["reward/mean"] for r in train], color="#9ab", lw=1, label="train reward (batch mean)")
    ax.plot([r["step"] for r in evals], [r["eval/reward/mean"] for r in evals], "o-", color="#c33", label="held-out reward (sampled)")
    if evals and "eval/tool/called_frac" in evals[0]:  # a tool-using run: how often it calls the tool
        ax.plot([r["step"] for r in evals], [r["eval/tool/called_frac"] for r in evals], "^-", color="#2a7",
                label="held-out conversations that call the tool")
    if evals and "eval/pass@1" in evals[0]:
        ax.plot([r["step"] for r in evals], [r["eval/pass@1"] for r in evals], "s--", color="#36c", label="held-out pass@1 (greedy)")
    elapsed = sum(r.get("time/step", 0) + r.get("time/eval", 0) for r in recs)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or f"{run_dir.name}: {len(train)} steps, {elapsed / 60:.1f} min of steps + evals")
    fig.tight_layout()
    fig.savefig(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", type=Path, help="a run dir or its metrics.jsonl")
    ap.add_argument("-o", "--out", type=Path, default=Path("reward_curve.png"))
    ap.add_argument("--title")
    a = ap.parse_args()
    print(plot(a.run, a.out, a.title))


if __name__ == "__main__":
    main()
