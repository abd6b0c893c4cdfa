"""The cost of a tool call: the built-in `python` tool (grpo/envs/tools.py), each call a fresh sandbox.

    python bench/bench_tools.py [--calls 200]

Times ToolEnv.step on one assistant message that calls the tool with a small program (the demo's
`print(347*58)`), one call after another (latency: milliseconds per call, median and 90th percentile),
then with 1, 2, 4 and 8 conversations calling at once, as the rollout loop runs them (throughput:
calls per second). Prints a table and the load average; timings on a shared machine vary, so
compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from grpo.envs.tools import ToolEnv

MESSAGE = {"role": "assistant", "content": "```python\nprint(347*58)\n```"}


def one_call(env: ToolEnv) -> float:
    t0 = time.perf_counter()
    turn = env.step(env.reset(None), MESSAGE)
    assert turn.messages[0]["content"] == "20126\n", turn.messages
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    env = ToolEnv()
    for _ in range(5):  # warm-up: the sandbox's helper process starts on the first call
        one_call(env)
    lat = sorted(one_call(env) for _ in range(a.calls))
    rows = [("sequential", 1, 1000 * statistics.median(lat), 1000 * lat[int(0.9 * len(lat))], len(lat) / sum(lat))]
    for k in (1, 2, 4, 8):
        with ThreadPoolExecutor(k) as pool:
            t0 = time.perf_counter()
            times = list(pool.map(lambda _: one_call(env), range(a.calls)))
            wall = time.perf_counter() - t0
        times.sort()
        rows.append((f"{k} at once", k, 1000 * statistics.median(times), 1000 * times[int(0.9 * len(times))],
                     a.calls / wall))
    print(f"python tool, {a.calls} calls per row, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"| {'mode':<12} | {'concurrent':>10} | {'ms/call p50':>11} | {'ms/call p90':>11} | {'calls/s':>8} |")
    print("| " + " | ".join(["-" * 12, "-" * 9 + ":", "-" * 10 + ":", "-" * 10 + ":", "-" * 7 + ":"]) + " |")
    for name, k, p50, p90, rate in rows:
        print(f"| {name:<12} | {k:>10} | {p50:>11.1f} | {p90:>11.1f} | {rate:>8.1f} |")


if __name__ == "__main__":
    main()
