"""Overlap of generation and training, measured by simulating two devices on this machine's two cores.

A `grpo rollout serve` process pinned to core 0 generates; a `grpo train rollout=server` process
pinned to core 1 trains (each with one torch thread). With rollout.max_staleness = 0 every step waits
for its rollout, then trains: time/step ~ rollout + update. With eta = 1 the server generates for
step k + 1 while the trainer trains step k: time/step should approach max(rollout, update). Issue 24
asks for at most 1.15 x max(rollout time, update time).

Two cores of one chip are not two devices: they share the L3 cache and the memory bus, so the
trainer's update runs slower while the other core generates, whatever the trainer's code does. A
third run measures that: the synchronous trainer again, with a generation loop (the embedded model
on the hf engine) running on the server's core all along. The table gives step / max(rollout,
update) against both update times: the synchronous run's (idle neighbour) and this one's (busy
neighbour, as the overlapped run's update always has).

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


def train(core: int, url: str, weights: Path, run_dir: Path, eta: int, args) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "grpo", "train", f"model.path={args.model}", "logger=jsonl", "rollout=server",
           f"rollout.server_urls=[{url}]", f"rollout.server_weights_dir={weights}", f"rollout.max_staleness={eta}",
           f"rollout.max_new_tokens={args.new_tokens}", f"trainer.max_steps={args.steps}", "trainer.eval_every=0",
           "trainer.save_every=0", f"trainer.prompts_per_step={args.prompts}", f"algorithm.group_size={args.group}",
           f"hydra.run.dir={run_dir}"]
    if subprocess.run(cmd, cwd=ROOT, env=env, preexec_fn=pinned(core), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode:
        sys.exit(f"bench_async: the trainer (max_staleness={eta}) failed; rerun its command to see why: {' '.join(cmd)}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r and r["step"] > args.skip]


def generation_loop(core: int, model: str, new_tokens: int) -> None:
    """Generate forever on `core`, one torch thread: the busy neighbour of the third run."""
    os.sched_setaffinity(0, {core})
    import torch

    from grpo.parts.modeling import load_model, load_tokenizer
    from grpo.parts.rollout.base import SamplingParams
    from grpo.parts.rollout.hf import HFEngine

    torch.set_num_threads(1)
    tok = load_tokenizer(model)
    engine = HFEngine(load_model(model), tok)
    prompts = [tok.encode(f"What is {i} + {2 * i}?") for i in range(16)]
    while True:
        engine.generate(prompts, 8, SamplingParams(temperature=1.0, max_new_tokens=new_tokens))


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
    p.add_argument("--generation-loop", type=int, metavar="CORE", help=argparse.SUPPRESS)  # the third run's neighbour
    a = p.parse_args()
    if a.generation_loop is not None:
        return generation_loop(a.generation_loop, a.model, a.new_tokens)
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench_async: needs two cores (one per simulated device)")
    core_server, core_train = sorted(os.sched_getaffinity(0))[:2]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights"
        weights.mkdir()
        proc, url = start_server(core_server, weights, a.model, a.new_tokens)
        try:
            for eta in (0, 1):
                rows[eta] = train(core_train, url, weights, Path(tmp) / f"eta{eta}", eta, a)
            env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            loop = subprocess.Popen([sys.executable, __file__, "--generation-loop", str(core_server), "--model",
                                     a.model, "--new-tokens", str(a.new_tokens)], env=env, cwd=ROOT)
            try:
                time.sleep(10)  # the loop's model loaded and generating
                busy = train(core_train, url, weights, Path(tmp) / "busy", 0, a)
            finally:
                loop.kill()
                loop.wait(60)
        finally:
            proc.terminate()
            proc.wait(60)
    sync = rows[0]
    rollout_s, update_s = mean(sync, "time/rollout"), mean(sync, "time/update")
    reward_s, busy_s = mean(sync, "time/reward"), mean(busy, "time/update")
    bound, busy_bound = max(rollout_s, update_s), max(rollout_s, busy_s)
    print(f"\n{a.model}, B={a.prompts} x G={a.group}, {a.new_tokens} new tokens, steps {a.skip + 1}..{a.steps}; "
          f"server on core {core_server}, trainer on core {core_train}; load average {os.getloadavg()[0]:.2f}")
    print(f"synchronous: rollout {rollout_s:.3f} s, scoring {reward_s:.3f} s, update {update_s:.3f} s "
          f"({busy_s:.3f} s with core {core_server} generating all along: x{busy_s / update_s:.2f})\n")
    print("| max_staleness | time/step (s) | waiting for the rollout (s) | update (s) | step / max(rollout, update) |"
          " step / max(rollout, update beside a busy core) | mean staleness |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for eta, rs in rows.items():
        step = mean(rs, "time/step")
        print(f"| {eta} | {step:.3f} | {mean(rs, 'time/rollout'):.3f} | {mean(rs, 'time/update'):.3f} | "
              f"{step / bound:.2f} | {step / busy_bound:.2f} | {mean(rs, 'async/staleness') if eta else 0.0:.2f} |")


if __name__ == "__main__":
    main()
