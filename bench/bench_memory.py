"""Peak memory of token log-probs, forward + backward, whole logits against chunked (trainer.logprob_chunk).

    .venv/bin/python bench/bench_memory.py                      # 32k vocabulary, 2 rows of 4096 tokens
    .venv/bin/python bench/bench_memory.py --chunks 0,256,1024,4096 --rows 1 --repeats 3

The model is a seeded, randomly initialised Llama with a 32,000-token vocabulary and a small trunk
(hidden 256, 2 layers, 4 heads, sdpa attention; untied head), so that it runs on a CPU: the
[rows, tokens, vocab] float32 logits (2 x 4064 x 32000 x 4 B = 0.97 GiB each) are what the memory is
about, and the trunk's activations are small beside them. Each row is a 32-token prompt and a
4064-token completion (4096 tokens), the work one training micro-batch does: logp and entropy of
the completion tokens at temperature 0.7 (grpo/parts/batch.py, batch_logprobs), then the gradient
of sum(logp) through the head and the trunk.

Each variant runs in a fresh process, so that one's peak does not hide another's: it builds the
model and the batch, notes its memory, runs forward + backward `--repeats` times, and reports the
peak above that baseline: on CUDA torch.cuda.max_memory_allocated, on the CPU the process's resident
high-water mark (getrusage ru_maxrss; torch's CPU allocator hands large blocks back to the system,
so the high-water mark is the peak of what was live). Times are the median over the repeats of the
forward + backward wall time (after one short warm-up pass, which also allocates the gradients). The header prints the load average at both ends: on a shared
machine the times move with the other load, the peaks do not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = 32  # tokens of each row's prompt; the rest of --tokens is the completion


def build(vocab: int, hidden: int, layers: int, tokens: int, rows: int, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpo.parts.batch import pack

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=tokens,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device).train()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, vocab, (PROMPT,), generator=g).tolist() for _ in range(rows)]
    completions = [torch.randint(2, vocab, (tokens - PROMPT,), generator=g).tolist() for _ in range(rows)]
    return model, pack(prompts, completions, 0).to(device)


def worker(spec: dict) -> dict:
    """One variant in this process: {chunk, ...} -> {peak_mib, times}."""
    import torch

    torch.set_num_threads(spec["threads"])
    from grpo.parts.batch import batch_logprobs, set_logprob_chunk

    device = spec["device"]
    model, batch = build(spec["vocab"], spec["hidden"], spec["layers"], spec["tokens"], spec["rows"], device)
    set_logprob_chunk(model, spec["chunk"])
    # A short pass first: the code paths' one-time allocations (kernels, thread pools) and the
    # parameters' gradients are then part of the baseline, not of the peak.
    short = batch[:1]
    short = type(short)(short.input_ids[:, :PROMPT + 16], short.attention_mask[:, :PROMPT + 16],
                        short.position_ids[:, :PROMPT + 16], short.completion_ids[:, :16], short.mask[:, :16])
    (batch_logprobs(model, short, 0.7, with_entropy=True)[0] * short.mask).sum().backward()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    times = []
    for _ in range(spec["repeats"]):
        model.zero_grad(set_to_none=False)  # the gradients' memory is there in both variants
        t0 = time.perf_counter()
        logp, ent = batch_logprobs(model, batch, 0.7, with_entropy=True)  # [N, T]
        (logp * batch.mask).sum().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del logp, ent
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_mib": peak / 2 ** 20, "times": times}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", default="0,1024", help="comma-separated trainer.logprob_chunk values (0 = whole logits)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per row (a 32-token prompt + the completion)")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="forward + backward passes per variant")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    ap.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(a.worker))), flush=True)
        return 0
    if a.tokens <= PROMPT or a.rows < 1 or a.repeats < 1:
        raise SystemExit(f"--tokens must exceed the {PROMPT}-token prompt; --rows and --repeats >= 1")
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    chunks = [int(c) for c in a.chunks.split(",")]
    load0 = os.getloadavg()
    results = []
    for chunk in chunks:
        spec = {"chunk": chunk, "vocab": a.vocab, "hidden": a.hidden, "layers": a.layers, "tokens": a.tokens,
                "rows": a.rows, "repeats": a.repeats, "threads": a.threads, "device": device}
        print(f"chunk {chunk} ...", file=sys.stderr, flush=True)
        p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode or line is None:
            sys.stderr.write(p.stderr[-4000:])
            raise SystemExit(f"the chunk={chunk} worker failed (exit {p.returncode})")
        results.append((chunk, json.loads(line[len("RESULT "):])))
    load1 = os.getloadavg()

    T = a.tokens - PROMPT
    whole_gib = a.rows * T * a.vocab * 4 / 2 ** 30
    print(f"log-probs forward + backward | {device}, torch {torch.__version__}, {a.threads} threads, "
          f"{os.cpu_count()} CPUs | Llama vocab {a.vocab}, hidden {a.hidden}, {a.layers} layers | {a.rows} rows x "
          f"{a.tokens} tokens ({T} completion tokens each) | one [N, T, V] float32 tensor = {whole_gib:.2f} GiB")
    print(f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, at end {load1[0]:.2f} {load1[1]:.2f} "
          f"{load1[2]:.2f} | peak = {'max_memory_allocated' if device.startswith('cuda') else 'RSS high-water'} "
          f"above the built model; time = median of {a.repeats}")
    print()
    ref = dict(results).get(0)
    print(f"{'logprob_chunk':>14} {'peak MiB':>10} {'time s':>8} {'peak ratio':>11} {'time ratio':>11}")
    for chunk, r in results:
        t = statistics.median(r["times"])
        label = f"{chunk}" if chunk else "0 (whole)"
        if ref:
            pr = ref["peak_mib"] / max(r["peak_mib"], 1e-9)
            tr = t / statistics.median(ref["times"])
            print(f"{label:>14} {r['peak_mib']:>10.0f} {t:>8.2f} {pr:>10.1f}x {tr:>10.2f}x")
        else:
            print(f"{label:>14} {r['peak_mib']:>10.0f} {t:>8.2f} {'-':>11} {'-':>11}")
    if ref:
        print("\npeak ratio = whole-logits peak / this peak (higher is less memory); time ratio = this time / whole-logits time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
