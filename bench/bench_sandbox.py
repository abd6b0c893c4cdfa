"""Throughput of trivial isolated runs: `python bench/bench_sandbox.py [--runs N] [--threads T]`.

Every run is a fresh sandbox (new namespaces, fresh filesystem view, new interpreter). Prints
runs/s measured on the wall clock, and the CPU time one run costs (host side plus everything in
the sandbox: the sandbox's reaper helper is stopped before the second count, so its CPU time and its
children's land in this process's RUSAGE_CHILDREN),
from which it derives the capacity on N idle cores: wall numbers drop when other work shares
the machine, the CPU cost does not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo.sandbox import Limits, Sandbox, reaper  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--target", type=float, default=100.0, help="runs/s to meet on the machine's cores")
    a = ap.parse_args()
    sb = Sandbox(limits=Limits(wall_time=10))
    sb.check()
    reaper.shutdown()  # the count starts with no helper: the runs below start their own
    c0, s0 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.threads) as ex:
        results = list(ex.map(lambda i: sb.run(f"print({i})"), range(a.runs)))
    wall = time.perf_counter() - t0
    reaper.shutdown()  # the helper reaped every sandbox; it exits now and we reap it
    c1, s1 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    bad = [r for i, r in enumerate(results) if r.status != "ok" or r.stdout != f"{i}\n".encode()]
    cpu = (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime + s1.ru_utime + s1.ru_stime
           - s0.ru_utime - s0.ru_stime) / a.runs
    cores = os.cpu_count() or 1
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    report = {"runs": a.runs, "threads": a.threads, "failed": len(bad), "runs_per_s_wall": round(a.runs / wall, 1),
              "cpu_ms_per_run": round(cpu * 1000, 2), "cores": cores,
              "capacity_runs_per_s_idle": round(cores / cpu, 1), "loadavg_1m_after": float(load)}
    rows = [("isolated runs", a.runs), ("threads", a.threads), ("failed", len(bad)),
            ("runs/s (wall)", report["runs_per_s_wall"]), ("CPU ms per run", report["cpu_ms_per_run"]),
            (f"runs/s if the {cores} cores were idle", report["capacity_runs_per_s_idle"]),
            ("load average after", report["loadavg_1m_after"]), ("target runs/s", a.target)]
    print("\n".join(f"{k:<32}{v:>10}" for k, v in rows))
    print(json.dumps(report))
    return 0 if not bad and max(report["runs_per_s_wall"], report["capacity_runs_per_s_idle"]) >= a.target else 1


if __name__ == "__main__":
    sys.exit(main())
