"""`grpo compare RUN ...`: which method buys the most true quality for how much drift from the reference.

Each argument is a finished run: a `grpo train` / `grpo dpo` (/ PPO) run dir, whose evaluation
records carry eval/kl (the sampled completions' KL from the reference, nats per sequence),
eval/reward/mean (the true score) and, when a reward model took part, eval/rm_score; or a `grpo bon`
summary (best_of_n.summary.json, or its run dir), plotted at the analytic KL log k - (k - 1)/k; or a
folder of such runs (runs/bon, where `grpo bon` without hydra.run.dir writes a dated run dir each
time), which stands for its newest run: the one whose metrics.jsonl or summary was written last.
One curve per run: true score against KL, solid; the reward-model score on a second axis, dashed
(the picture Gao et al. 2022 drew for reward-model over-optimisation). Prints the points as a table,
each curve under the run dir it was read from.

    grpo compare runs/bon/a runs/dpo/b runs/c -o docs/preference_comparison.png --label best-of-N DPO GRPO
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from grpo.parts.config import UserError
from grpo.parts.tracking import read_metrics


def _record(run: Path) -> Path | None:
    """The file a finished run dir is read from: its grpo bon summary, else its metrics.jsonl."""
    bon = next(iter(sorted(run.glob("best_of_n*.summary.json"))), None)
    return bon or (run / "metrics.jsonl" if (run / "metrics.jsonl").is_file() else None)


def resolve_run(path: Path) -> tuple[Path, int]:
    """(the run `path` stands for, how many runs it was chosen from): a run dir or a file as it is;
    a folder holding no run itself but run dirs (runs/bon/<date>/ ...) -> the newest of them, the
    one whose record (_record) was modified last (ties: the greater name, for dated names the later)."""
    path = Path(path)
    if not path.is_dir() or _record(path) is not None:
        return path, 1
    runs = [(d, _record(d)) for d in path.iterdir() if d.is_dir()]
    runs = [(d, r) for d, r in runs if r is not None]
    if not runs:
        return path, 0
    newest = max(runs, key=lambda dr: (dr[1].stat().st_mtime, dr[0].name))[0]
    return newest, len(runs)


def curve(path: Path) -> dict:
    """{kind, run, of, kl: [...], true: [...], rm: [... or None]} of one run (`run`: the run dir or file
    it was read from; `of`: how many runs the folder `path` held, 1 for a run itself)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run dir or file")
    given, (path, of) = path, resolve_run(path)
    if of == 0:
        raise UserError(f"{given}: no run in it or in its sub-folders (no metrics.jsonl or best_of_n*.summary.json): "
                        "pass a run dir, a metrics.jsonl, a grpo bon summary or a folder of run dirs")
    found = {"run": str(path), "of": of}
    bon = path if path.suffix == ".json" else next(iter(sorted(path.glob("best_of_n*.summary.json"))), None)
    if bon is not None:
        by_k = json.loads(bon.read_text()).get("by_k")
        if not by_k or any(e.get("true/mean") is None for e in by_k):
            raise UserError(f"{bon}: not a grpo bon summary with true scores (run grpo bon with task.verifiers)")
        return {**found, "kind": "best-of-N", "kl": [e["kl"] for e in by_k], "true": [e.get("true/mean") for e in by_k],
                "rm": [e.get("rm/mean") for e in by_k], "steps": [f"N={e['k']}" for e in by_k]}
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.exists():
        raise UserError(f"{metrics}: not found (pass a run dir, a metrics.jsonl or a grpo bon summary)")
    evals = [r for r in read_metrics(metrics) if "eval/kl" in r and "eval/reward/mean" in r]
    if not evals:
        raise UserError(f"{metrics}: no evaluation records with eval/kl (a run evaluated with a reference model "
                        "and plain sampling: grpo dpo, or grpo train with algorithm.beta > 0)")
    return {**found, "kind": "run", "kl": [r["eval/kl"] for r in evals], "true": [r["eval/reward/mean"] for r in evals],
            "rm": [r.get("eval/rm_score") for r in evals], "steps": [f"step {r['step']}" for r in evals]}


def plot(curves: list[tuple[str, dict]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    ax2 = None
    colors = ["#c33", "#36c", "#2a2", "#a6c", "#c80", "#555"]
    for (label, c), color in zip(curves, colors):
        ax.plot(c["kl"], c["true"], "o-", color=color, label=f"{label}: true score")
        if any(v is not None for v in c["rm"]):
            ax2 = ax2 or ax.twinx()
            pts = [(k, v) for k, v in zip(c["kl"], c["rm"]) if v is not None]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "--", color=color, alpha=0.7, label=f"{label}: reward model")
    ax.set_xlabel("KL from the reference policy (nats per completion)")
    ax.set_ylabel("held-out true score (solid)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ax2 is not None:
        ax2.set_ylabel("reward-model score (dashed)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    return out


def compare_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="grpo compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path,
                    help="run dirs (train, dpo, ...), grpo bon summaries, or folders of run dirs (each: its newest)")
    ap.add_argument("--label", nargs="*", help="one label per run (default: the run dir's name)")
    ap.add_argument("-o", "--out", type=Path, default=Path("comparison.png"))
    ap.add_argument("--title", default="true score against KL from the reference")
    a = ap.parse_args(argv)
    labels = a.label or [p.name for p in a.runs]
    if len(labels) != len(a.runs):
        ap.error(f"--label: {len(labels)} labels for {len(a.runs)} runs")
    curves = [(label, curve(p)) for label, p in zip(labels, a.runs)]
    for (label, c), given in zip(curves, a.runs):
        picked = "" if Path(c["run"]) == given else (f" (the newest of {c['of']} runs in {given})" if c["of"] > 1
                                                     else f" (the only run in {given})")
        print(f"{label}: {c['run']}{picked}")
        for s, k, t, r in zip(c["steps"], c["kl"], c["true"], c["rm"]):
            print(f"  {s:>10}  KL {k:7.3f}  true {t:.3f}" + (f"  rm {r:.3f}" if r is not None else ""))
    print(plot(curves, a.out, a.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(compare_main(__import__("sys").argv[1:]))
