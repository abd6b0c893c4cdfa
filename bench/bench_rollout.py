"""Rollout throughput: raw vLLM vs this project's vLLM engine vs the hf engine, same prompts and settings.

    python bench/bench_rollout.py                         # the embedded model
    python bench/bench_rollout.py --build 512x8           # a config-built Llama, hidden 512, 8 layers (~27M)
    python bench/bench_rollout.py --model path/to/hf_dir

Prompts are arithmetic-task prompts in the chat template; every engine samples `--n` completions
of each at the same temperature / top-p / top-k / max-new-tokens. "raw vLLM" calls `LLM.generate`
on the very engine our wrapper holds, with the SamplingParams the wrapper builds (seeds, stop
tokens, one log-prob per token), so the difference between (a) and (b) is exactly the wrapper's
cost: building requests, reading log-probs, decoding texts. A raw run without log-probs is shown
for reference. Runs alternate between engines and the median of `--repeats` is reported, because
the machine is shared. Tokens = generated tokens (EOS included), the same count for every engine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_model(spec: str, out: Path) -> str:
    from grpo.commands.embedded import build_tokenizer, init_model

    hidden, layers = (int(x) for x in spec.split("x"))
    tok = build_tokenizer(out)
    init_model(out, tok, hidden=hidden, layers=layers, seed=0)
    return str(out)


def prompts_for(tok, k: int) -> list[list[int]]:
    from grpo.tasks.arithmetic import ArithmeticTask
    from grpo.tasks.base import render_prompt

    task = ArithmeticTask(seed=0)
    return [tok(render_prompt(tok, task.train_sample(i), None), add_special_tokens=False)["input_ids"]
            for i in range(k)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--build", default=None, help="HIDDENxLAYERS: bench a randomly initialised Llama of that size")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for each engine")
    ap.add_argument("--hf-batch", type=int, default=512)
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import torch

    torch.set_num_threads(a.threads)
    from vllm import SamplingParams as VSamplingParams

    from grpo.parts.modeling import load_model, load_tokenizer
    from grpo.parts.rollout.base import SamplingParams
    from grpo.parts.rollout.hf import HFEngine
    from grpo.parts.rollout.vllm import VLLMEngine

    tmp = tempfile.TemporaryDirectory()
    path = build_model(a.build, Path(tmp.name)) if a.build else a.model
    tok = load_tokenizer(path)
    model = load_model(path, "float32", device="cpu").eval()
    n_params = sum(p.numel() for p in model.parameters())
    prompts = prompts_for(tok, a.prompts)
    sp = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, max_new_tokens=a.max_new_tokens)
    rcfg = dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, kv_cache_gib=1.0,
                max_num_seqs=max(256, a.n * a.prompts))
    t0 = time.perf_counter()
    ours = VLLMEngine(model, tok, path, "float32", "cpu", **rcfg)
    start_s = time.perf_counter() - t0
    hf = HFEngine(model, tok, batch_size=a.hf_batch)

    def raw_params(logprobs: bool):
        seeds = ours._seeds(len(prompts), None)
        return [VSamplingParams(n=a.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                max_tokens=sp.max_new_tokens, stop_token_ids=ours.eos_ids, seed=s,
                                logprobs=0 if logprobs else None, skip_special_tokens=True) for s in seeds]

    def run_raw(logprobs: bool) -> int:
        params = raw_params(logprobs)  # timed, like the wrapper building its own
        outs = ours.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    def run_ours() -> int:
        return sum(map(len, ours.generate(prompts, a.n, sp).completion_ids))

    def run_hf() -> int:
        return sum(map(len, hf.generate(prompts, a.n, sp).completion_ids))

    runs = {"raw vLLM": lambda: run_raw(True), "ours (vllm)": run_ours, "raw vLLM, no logprobs": lambda: run_raw(False)}
    if not a.skip_hf:
        runs["ours (hf)"] = run_hf
    run_ours()  # warm-up: first requests allocate and compile
    rates: dict[str, list[float]] = {k: [] for k in runs}
    tokens: dict[str, list[int]] = {k: [] for k in runs}
    for _ in range(a.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            n_tok = fn()
            dt = time.perf_counter() - t0
            rates[name].append(n_tok / dt)
            tokens[name].append(n_tok)
            print(f"  {name}: {n_tok} tokens in {dt:.2f}s = {n_tok / dt:.0f} tokens/s", flush=True)
    ours.close()

    print(f"\nmodel: {a.build or a.model} ({n_params / 1e6:.1f}M params, float32, CPU, {a.threads} threads); "
          f"{a.prompts} prompts x n={a.n}, max_new_tokens={a.max_new_tokens}, T={a.temperature}, "
          f"top_p={a.top_p}, top_k={a.top_k}; vLLM engine start {start_s:.1f}s; median of {a.repeats}")
    print(f"{'engine':<24}{'tokens/s':>12}{'tokens/run':>12}   all runs (tokens/s)")
    for name in runs:
        print(f"{name:<24}{statistics.median(rates[name]):>12.0f}{statistics.median(tokens[name]):>12.0f}   "
              + " ".join(f"{r:.0f}" for r in rates[name]))
    ratio = statistics.median(rates["ours (vllm)"]) / statistics.median(rates["raw vLLM"])
    print(f"ours (vllm) / raw vLLM: {ratio:.3f}  (target >= 0.95)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
