"""Overlap of generation and training, measured by simulating two devices on this machine's two cores.

A `grpo rollout serve` process pinned to core 0 generates; a `grpo train rollout=server` process
pinned to core 1 trains (each with one torch thread). With rollout.max_staleness = 0 every step waits
for its rollout, then trains: time/step ~ rollout + update. With eta = 1 the server generates for
step k + 1 while the trainer trains step k: time/step should approach max(rollout, update). Issue 24
asks for at most 1.15 x max(rollout time, update time), both taken from the synchronous run.

Scoring is CPU work of the host, not of either device: the math verifier judges in worker processes
(grpo/verifiers/pool.py) that the trainer starts, so they inherit its core. Row 1* runs eta = 1 again
with those workers moved to the server's core, as on a GPU node, where the host's cores score beside
the devices (the scoring thread's own share, extraction and bookkeeping, stays on the trainer's core).

    .venv/bin/python bench/bench_async.py                  # the embedded model, 30 steps each
    .venv/bin/python bench/bench_async.py --steps 40 --new-tokens 24

Prints one table; the first `--skip` steps (start-up, the first pushes) are left out of the means.
Same machine, same run: compare the ratios, and read the load average printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pinned(core: int):
    def pin():
        os.sched_setaffinity(0, {core})
    return pin


def start_server(core: int, weights: Path, model: str, new_tokens: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "grpo", "rollout", "serve", "--port", "0", "--weights-dir",
                             str(weights), f"model.path={model}", f"rollout.max_new_tokens={new_tokens}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env,
                            preexec_fn=pinned(core))
    deadline, line = time.monotonic() + 300, ""
    while time.monotonic() < deadline and not line and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
    if not line.startswith("rollout server on http://"):
        proc.kill()
        sys.exit(f"bench_async: the rollout server did not start ({line!r})")
    return proc, line.split()[3]


def children(pid: int) -> set[int]:
    """Every descendant of process `pid` (from /proc's children lists)."""
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            todo += [k for k in kids if k not in out]
            out.update(kids)
    return out


def pin_children(proc: subprocess.Popen, core: int) -> None:
    """Until `proc` ends, pin the processes it starts (the verifiers' worker pool) to `core`."""
    while proc.poll() is None:
        for kid in children(proc.pid):
            try:
                if os.sched_getaffinity(kid) != {core}:
                    os.sched_setaffinity(kid, {core})
            except OSError:
                pass  # gone already
        time.sleep(0.1)


def train(core: int, url: str, weights: Path, run_dir: Path, eta: int, args, workers_core: int | None = None) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "grpo", "train", f"model.path={args.model}", "logger=jsonl", "rollout=server",
           f"rollout.server_urls=[{url}]", f"rollout.server_weights_dir={weights}", f"rollout.max_staleness={eta}",
           f"rollout.max_new_tokens={args.new_tokens}", f"trainer.max_steps={args.steps}", "trainer.eval_every=0",
           "trainer.save_every=0", f"trainer.prompts_per_step={args.prompts}", f"algorithm.group_size={args.group}",
           f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, preexec_fn=pinned(core), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if workers_core is not None:
        threading.Thread(target=pin_children, args=(proc, workers_core), daemon=True).start()
    if proc.wait():
        sys.exit(f"bench_async: the trainer (max_staleness={eta}) failed; rerun its command to see why: {' '.join(cmd)}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r and r["step"] > args.skip]


def mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r.get(key, 0.0) for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=3)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    a = p.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench_async: needs two cores (one per simulated device)")
    core_server, core_train = sorted(os.sched_getaffinity(0))[:2]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights"
        weights.mkdir()
        proc, url = start_server(core_server, weights, a.model, a.new_tokens)
        try:
            for key, eta, workers in ((0, 0, None), (1, 1, None), ("1*", 1, core_server)):
                rows[key] = train(core_train, url, weights, Path(tmp) / f"eta{eta}{workers}", eta, a, workers)
        finally:
            proc.terminate()
            proc.wait(60)
    sync = rows[0]
    rollout_s, update_s = mean(sync, "time/rollout"), mean(sync, "time/update")
    reward_s = mean(sync, "time/reward")
    bound = max(rollout_s, update_s)
    print(f"\n{a.model}, B={a.prompts} x G={a.group}, {a.new_tokens} new tokens, steps {a.skip + 1}..{a.steps}; "
          f"server on core {core_server}, trainer on core {core_train}; load average {os.getloadavg()[0]:.2f}")
    print(f"synchronous: rollout {rollout_s:.3f} s, scoring {reward_s:.3f} s, update {update_s:.3f} s; "
          f"max(rollout, update) = {bound:.3f} s\n")
    print("| max_staleness | time/step (s) | waiting for the rollout (s) | update (s) | step / max(rollout, update) |"
          " mean staleness |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, rs in rows.items():
        step = mean(rs, "time/step")
        print(f"| {key} | {step:.3f} | {mean(rs, 'time/rollout'):.3f} | {mean(rs, 'time/update'):.3f} | "
              f"{step / bound:.2f} | {mean(rs, 'async/staleness') if key else 0.0:.2f} |")
    print(f"\n1*: the verifiers' worker processes on core {core_server} beside the server (the host's CPUs, not the "
          f"trainer's device); the scoring thread's own work stays on core {core_train}.")


if __name__ == "__main__":
    main()
