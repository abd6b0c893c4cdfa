"""Held-out reward against step for the estimator pack's variants, several seeds each, on the arithmetic
and the code task: one figure (a panel per task, mean line and min-max band over seeds per variant) and
one markdown table per task.

    .venv/bin/python bench/compare_estimators.py                    # 7 variants x 2 tasks x 3 seeds, 2 at a time
    .venv/bin/python bench/compare_estimators.py --tasks arithmetic --variants grpo rloo --seeds 0 1
    .venv/bin/python bench/compare_estimators.py --plot-only         # redraw from the runs on disk

Each run is `python -m grpo train <task overrides> <variant overrides> trainer.seed=K logger=jsonl
hydra.run.dir=OUT_ROOT/<task>/<variant>/seed<K>` in its own process with OMP_NUM_THREADS=1, `--jobs` at a
time; its terminal output goes to OUT_ROOT/<task>/<variant>/seed<K>.log. A run whose metrics.jsonl already
holds the evaluation after its last step is kept (so the command resumes where it stopped); a run dir
that holds an unfinished run is removed and the run starts over. `--rev REV` runs the `grpo` of that git
revision (exported with `git archive` to OUT_ROOT/src-<sha>) instead of the working tree, so edits made
to the working tree while the batch runs do not leak into it; each run records the source it ran in
OUT_ROOT/<task>/<variant>/seed<K>.json, with its wall time.

The held-out reward is `eval/reward/mean` (one sampled completion per held-out prompt; the verifiers'
reward only, without DAPO's overlong penalty). The table gives mean +- sample std over seeds at each
evaluation step (at most --columns of them, the last always), the final step's min-max, and the mean
over seeds of each seed's average over the second half of its evaluations (a less noisy summary).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from grpo.parts.tracking import read_metrics  # noqa: E402  (the reader grpo.commands.plot uses)

EVAL_KEY = "eval/reward/mean"

# task -> (overrides, rollout.max_new_tokens of that task: DAPO's overlong cache is a quarter of it)
TASKS: dict[str, tuple[list[str], int]] = {
    "arithmetic": (["trainer.eval_every=10"], 16),
    "code": (["+experiment=code", "trainer.max_steps=30", "trainer.eval_every=5"], 40),
}
TITLES = {"arithmetic": "arithmetic (120 steps, 128 held-out prompts)",
          "code": "code (30 steps, 64 held-out prompts)"}


def variant_overrides(variant: str, max_new_tokens: int) -> list[str]:
    """The `algorithm.*` overrides of one variant (everything else is conf/algorithm/grpo.yaml's default)."""
    return {
        "grpo": [],
        "rloo": ["algorithm.adv_estimator=rloo"],
        "reinforce_pp": ["algorithm.adv_estimator=reinforce_pp"],
        "reinforce_pp_baseline": ["algorithm.adv_estimator=reinforce_pp_baseline"],
        # GSPO: sequence-level ratio, its clip range is seq_clip_low/high (3e-4 / 4e-4, the paper's)
        "gspo": ["algorithm.is_level=sequence", "algorithm.loss_agg=seq_mean_token_mean"],
        # CISPO: no lower bound on the IS weight, cap 1 + 4 = 5 (TRL 1.16's recommended epsilon_high=5.0)
        "cispo": ["algorithm.loss=cispo", "algorithm.clip_low=1.0", "algorithm.clip_high=4.0"],
        # DAPO: clip-higher, dynamic sampling, soft overlong punishment over the last quarter of the budget
        "dapo": ["algorithm.clip_high=0.28", "algorithm.dynamic_sampling=true",
                 f"algorithm.overlong_cache={max_new_tokens // 4}"],
    }[variant]


VARIANTS = ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gspo", "cispo", "dapo"]
COLORS = {"grpo": "#c33", "rloo": "#36c", "reinforce_pp": "#2a2", "reinforce_pp_baseline": "#7b5",
          "gspo": "#a6c", "cispo": "#c80", "dapo": "#555"}
# dashed where a variant can sit exactly on another (cispo equals grpo whenever the IS ratio is 1: epochs=1)
STYLES = {"cispo": "--", "reinforce_pp_baseline": "-."}


def export_rev(rev: str, out_root: Path) -> Path:
    """`git archive` of rev under out_root/src-<sha>, laid out as the installed package is (grpo.conf,
    grpo.sandbox, ... beside grpo/), so that PYTHONPATH=<it> imports only its code."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    src = out_root / f"src-{sha[:12]}"
    if not (src / "grpo" / "__init__.py").exists():
        tmp = out_root / f".src-{sha[:12]}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        for sub in ("conf", "envs", "sandbox", "tasks", "verifiers"):  # pyproject's package-dir mapping
            if (tmp / sub).is_dir() and not (tmp / "grpo" / sub).exists():
                (tmp / "grpo" / sub).symlink_to(Path("..") / sub)
        tmp.rename(src)
    return src


def finished(run_dir: Path) -> bool:
    """Whether run_dir holds a run that got to its last step's evaluation."""
    metrics, cfg = run_dir / "metrics.jsonl", run_dir / ".hydra" / "config.yaml"
    if not metrics.exists() or not cfg.exists():
        return False
    from omegaconf import OmegaConf

    max_steps = OmegaConf.load(cfg).trainer.max_steps
    try:
        return any(r.get("step") == max_steps and EVAL_KEY in r for r in read_metrics(metrics))
    except json.JSONDecodeError:  # a line cut short by a kill
        return False


def launch(task: str, variant: str, seed: int, out_root: Path, src: Path | None, extra: list[str]) -> dict:
    run_dir = out_root / task / variant / f"seed{seed}"
    if finished(run_dir):
        return {"run": str(run_dir), "skipped": True}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    task_overrides, max_new_tokens = TASKS[task]
    overrides = [*task_overrides, *variant_overrides(variant, max_new_tokens), f"trainer.seed={seed}",
                 "logger=jsonl", "trainer.save_every=0", "trainer.keep_checkpoints=1", *extra,
                 f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if src is not None:
        env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "grpo", "train", *overrides]
    t0 = time.time()
    with open(run_dir.parent / f"seed{seed}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=src or ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    info = {"run": str(run_dir), "cmd": ["grpo", "train", *overrides], "src": str(src or ROOT), "rc": rc,
            "wall_s": round(time.time() - t0, 1), "finished": finished(run_dir)}
    (run_dir.parent / f"seed{seed}.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def curves(out_root: Path, task: str, variant: str, seeds: list[int]) -> dict[int, dict[int, float]]:
    """{seed: {step: held-out reward}} of the finished runs."""
    got = {}
    for s in seeds:
        run_dir = out_root / task / variant / f"seed{s}"
        if finished(run_dir):
            got[s] = {r["step"]: r[EVAL_KEY] for r in read_metrics(run_dir / "metrics.jsonl") if EVAL_KEY in r}
    return got


def table(out_root: Path, task: str, variants: list[str], seeds: list[int], columns: int) -> str:
    rows, steps = [], None
    for v in variants:
        c = curves(out_root, task, v, seeds)
        if not c:
            continue
        common = sorted(set.intersection(*(set(x) for x in c.values())))
        steps = steps or common
        rows.append((v, c, common))
    if not rows:
        return f"(no finished runs for {task})"
    every = max(1, -(-(len(steps) - 1) // (columns - 1))) if columns > 1 else len(steps)
    shown = steps[::every] if (len(steps) - 1) % every == 0 else steps[::every] + [steps[-1]]

    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    head = ["variant", "seeds", *(f"step {s}" for s in shown), "final min–max", "2nd-half avg"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, c, common in rows:
        cells = [v, str(len(c))]
        cells += [ms([c[s][st] for s in c]) if st in common else "" for st in shown]
        last = [c[s][max(c[s])] for s in c]
        cells.append(f"{min(last):.3f}–{max(last):.3f}")
        half = [statistics.mean([r for st, r in c[s].items() if st >= max(c[s]) / 2]) for s in c]
        cells.append(ms(half))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def figure(out_root: Path, tasks: list[str], variants: list[str], seeds: list[int], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        lo_all = 1.0
        for v in variants:
            c = curves(out_root, task, v, seeds)
            if not c:
                continue
            steps = sorted(set.intersection(*(set(x) for x in c.values())))
            vals = [[c[s][st] for s in c] for st in steps]
            mean = [statistics.mean(x) for x in vals]
            lo, hi = [min(x) for x in vals], [max(x) for x in vals]
            lo_all = min(lo_all, *lo)
            color = COLORS.get(v, None)
            ax.plot(steps, mean, marker="o", ls=STYLES.get(v, "-"), ms=3, lw=1.5, color=color, label=f"{v} (n={len(c)})")
            ax.fill_between(steps, lo, hi, color=color, alpha=0.12, lw=0)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out reward (sampled)")
        ax.set_ylim(max(0.0, lo_all - 0.05), 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(TITLES.get(task, task), fontsize=10)
    fig.suptitle(f"held-out reward: mean over seeds {', '.join(map(str, seeds))}, band = min-max", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "estimators_comparison.png")
    ap.add_argument("--out-root", type=Path, default=ROOT / "runs" / "compare_estimators")
    ap.add_argument("--rev", help="run the grpo of this git revision instead of the working tree")
    ap.add_argument("--src", type=Path, help="run the grpo of this source tree (laid out as --rev exports one)")
    ap.add_argument("--columns", type=int, default=7, help="evaluation steps shown in a table")
    ap.add_argument("--plot-only", action="store_true", help="launch nothing, draw from the runs on disk")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for every run")
    a = ap.parse_args()
    out_root = a.out_root.resolve()
    out_root.mkdir(parents=True, exist_ok=True)

    if not a.plot_only:
        src = a.src.resolve() if a.src else export_rev(a.rev, out_root) if a.rev else None
        # variants in the outer loop, tasks inner: every task gets each variant before the next one
        todo = [(t, v, s) for v in a.variants for t in a.tasks for s in a.seeds]
        t0 = time.time()
        print(f"{len(todo)} runs, {a.jobs} at a time, source {src or ROOT}, runs under {out_root}", flush=True)
        with ThreadPoolExecutor(a.jobs) as pool:
            futures = {pool.submit(launch, *x, out_root, src, a.extra): x for x in todo}
            for f in as_completed(futures):
                (t, v, s), info = futures[f], f.result()
                state = "kept (finished before)" if info.get("skipped") else \
                    f"rc={info['rc']} {info['wall_s']:.0f}s" + ("" if info["finished"] else " NOT FINISHED")
                print(f"[{time.time() - t0:6.0f}s] {t}/{v}/seed{s}: {state}", flush=True)
        print(f"batch wall time: {time.time() - t0:.0f} s", flush=True)

    for t in a.tasks:
        print(f"\n{t}: held-out reward (eval/reward/mean), mean ± std over seeds\n")
        print(table(out_root, t, a.variants, a.seeds, a.columns))
    print("\n" + str(figure(out_root, a.tasks, a.variants, a.seeds, a.out)))


if __name__ == "__main__":
    main()
