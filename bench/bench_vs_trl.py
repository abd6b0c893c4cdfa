"""Step time of TRL's GRPOTrainer against this project's `grpo train`, on identical work, on CPU.

    make bench-trl                                          # all four cells (sets up .venv-bench once)
    make bench-trl ARGS="--cells short:embedded --steps 2"  # one cell, quick
    .venv-bench/bin/python bench/bench_vs_trl.py --help

Both trainers must be importable in one environment, so this runs in `.venv-bench` (torch 2.13.0
CPU, trl 1.16.x, and this project installed editable), never in the project's own `.venv`: TRL is
only the thing measured, not a dependency. trl 1.16.0 asks for transformers>=4.56.2, which the
project's own pin (>=5.16.1,<5.20) satisfies, so the bench environment has the same transformers
as the project's (5.19 at the time of writing), torch 2.13.0 and accelerate from TRL's needs.

Cells: a workload x a model size.
  short   arithmetic prompts ("What is a + b?"), B = 16 prompts x G = 8 completions, max_new_tokens 16
  long    the same prompts after a ~150-token few-shot system prompt, completions up to 64 tokens
  embedded  the shipped 0.9M-parameter Llama (grpo/data/embedded_model, head_dim 64)
  27m       a seeded, randomly initialised Llama of ~27M parameters (hidden 512, 8 layers, 8 heads of
            64, intermediate 1536, the embedded tokenizer's vocabulary), written to a temporary folder
            beside a copy of the embedded tokenizer files; its completions are random text that rarely
            samples EOS, so on `long` their lengths vary up to 64 tokens
Both trainers load the same model folder.

Identical work, per step: one generation of B x G completions on the transformers model (ours:
rollout=hf, the hf engine; TRL: transformers' generate(), no vLLM), then exactly one AdamW (torch)
optimizer step on the whole batch (TRL: per_device_train_batch_size = B x G, gradient accumulation 1,
steps_per_generation 1, num_iterations 1; ours: algorithm.epochs=1, no micro-batches):
float32, no gradient checkpointing, betas (0.9, 0.99), constant learning rate without warm-up, grad
norm clipped at 1.0, no weight decay; loss = token-mean clipped surrogate (TRL `dapo` = our
`algorithm.loss_agg=token_mean`), epsilon 0.2 both sides, beta 0.04 with the k3 KL to a frozen
reference model (both run its forward), group-normalised advantages (TRL `scale_rewards="group"` =
our `algorithm.adv_scale=group`, both with eps 1e-4), temperature 1, top-p 1, top-k off, the same
max_new_tokens, the same prompts in the same order (TRL's dataset is not shuffled), rendered with the
model's chat template (TRL gets conversational prompts, we render them with render_prompt: the
script asserts that both produce the same token ids, every step), and one reward function,
`SharedReward` below, used by both (ours through `task.verifiers=[{_target_: bench.bench_vs_trl.
SharedReward}]`, TRL as a reward function). No evaluation, no checkpoint during the measured steps
(ours: grpo.commands.train.train_step() is called directly; TRL: eval_strategy=no, save_strategy=no).

How it runs. For every cell and round the script starts two worker processes of its own, one per
trainer (`--worker trl|ours`), so that each has its own peak RSS. Each sets its trainer up, then
waits; the parent then asks them for one step at a time, alternating TRL, ours, ours, TRL, TRL,
ours... (who goes first flips every step), so drifts in the machine's load hit both alike; a worker
never runs while the other one does. The first `--warmup` steps of each are not counted. TRL's
training loop runs unmodified (Trainer.train()); a TrainerCallback holds it at each step's start
until the parent asks for the step, and light timing wrappers around its methods give the split.

Columns (per cell and trainer; times are medians over the measured steps, in seconds):
  step med/min/max  wall time of one training step (TRL: from on_step_begin to on_step_end, which
                    covers generation, scoring, reference forward, loss, backward, clipping and the
                    optimizer step, not TRL's per-step logging, which runs after on_step_end; ours:
                    one train_step() call, which logs nothing)
  cpu s             CPU time of the worker process during the step (all threads; less sensitive to
                    other load on the machine than wall time, though OpenMP threads that wait at a
                    barrier for a descheduled sibling spin and count too)
  gen tok/s         generated (completion) tokens per second of the generation phase
  tok/s             generated tokens per second of the whole step
  gen, rew, ref, fwd, bwd, opt, other   the step's split:
                    gen   generation (TRL: _generate, which tokenizes and decodes too; ours:
                          time/rollout, the same plus drawing the task's samples)
                    rew   reward (TRL: _calculate_rewards; ours: time/reward, which also takes the
                          advantages)
                    ref   reference model log-probs (TRL: _get_per_token_logps_and_entropies on the
                          reference; ours: time/ref_forward)
                    fwd   policy forward and loss (TRL: compute_loss; ours: time/forward)
                    bwd   backward (TRL: accelerator.backward; ours: time/backward)
                    opt   gradient clipping and optimizer step (TRL: end of training_step to
                          on_step_end, which includes the schedule step and zero_grad; ours:
                          time/optimizer)
                    other the rest of the step (padding, advantages, metrics, TRL's bookkeeping)
  len               mean completion length in tokens (EOS included)
  reward            mean reward of the measured steps (SharedReward, same for both), and of the last
                    step: a speed-up must not come from doing less
  RSS MB            peak resident memory of the worker process (setup included)
  GF/s, util        useful GFLOP/s and its share of this machine's float32 matmul peak (measured at
                    the start and end of the run with a torch.matmul loop at --threads threads; the
                    higher of the two is used). Useful FLOPs of a step count every real token once:
                    each prompt once per group (not G times), the real completion tokens (no padding);
                    forward = 2 x params x tokens, backward = 2 x forward, plus one reference forward
                    and one for generation: 10 x params x tokens in all (attention scores not counted)
The last lines are `ratio <workload> <size> <ours/TRL median step time>`, one per cell (< 1: ours is
faster).

What is not identical, and why it is left so:
- Sampling is random in both; neither trainer gets the other's completions, so completion lengths
  and rewards differ from step to step (the table shows both; the FLOP count uses each step's own).
- How the same work is laid out is each trainer's own, and is what is measured. Ours computes each
  group's prompt once in the policy, reference and backward passes (trainer.shared_prompt, on by
  default; the same log-probs as one padded row per completion) and its hf engine prefills each
  prompt once and drops finished rows from the batch; TRL runs every prompt G times, pads every row
  to the longest, and on CPU projects every position (prompt included) through its fused LM head.
  `--ours trainer.shared_prompt=false` measures ours with one padded row per completion.
- Our engine also returns the sampling log-probs (for its engine/trainer log-prob gap metric);
  TRL's generate() does not. Our trainer passes position ids that skip left padding; TRL's
  training forward does not.
- Our k3 KL clamps the log-ratio to [-20, 20]; TRL's does not (no effect on cost).
- The 27m cell uses 8 layers with intermediate 1536 (27.3M parameters, the shape bench_rollout.py
  calls 512x8); 6 layers with intermediate 1376 would be 19M.

Time. A long:27m step does ~3 TFLOP of useful work, a minute or more per trainer on 2 cores, so the
default measures only 1 step (after 1 warm-up) on the 27m cells and 5 on the embedded ones: the
default run then takes about 15 minutes on an idle 2-core machine (much longer on a busy one), most
of it in long:27m. `--steps N` sets every cell; `--rounds R` repeats each cell with fresh workers.
Memory: on long:27m TRL's worker peaks near 12.5 GB and ours near 6 GB (both are alive, one idle,
while the other steps). On a shared machine the numbers move with the other load (the header prints the load average and the
matmul peak at both ends): prefer more steps or rounds over reading much into one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench.bench_vs_trl.SharedReward` must be importable as a verifier target
    sys.path.insert(0, str(ROOT))

# ---- the work -----------------------------------------------------------------------------------
FEW_SHOT = (
    "Add the two numbers; put the sum in a box.\n"
    "What is 12 + 7? \\boxed{19}\n"
    "What is 40 + 35? \\boxed{75}\n"
    "What is 8 + 91? \\boxed{99}\n"
    "What is 56 + 27? \\boxed{83}\n"
)
WORKLOADS = {
    # name: (B prompts, G completions each, max_new_tokens, system prompt)
    "short": (16, 8, 16, None),
    "long": (16, 8, 64, FEW_SHOT),
}
SIZES = ("embedded", "27m")
DEFAULT_STEPS = {"embedded": 5, "27m": 1}  # measured steps when --steps is not given
LR, BETAS, BETA, CLIP, GRAD_NORM, SEED = 2e-4, (0.9, 0.99), 0.04, 0.2, 1.0, 0


class SharedReward:
    """The one reward both trainers use: 1 when the completion contains the right sum as a number,
    else partial credit 0.5 / (1 + |last number - sum| / 10) when it contains a number, else 0.
    A verifier for ours (`name` + `score`), wrapped as a reward function for TRL."""

    name = "shared"

    def score(self, completions, samples) -> list[float]:
        out = []
        for text, s in zip(completions, samples):
            want = int(s["answer"])
            nums = [int(n) for n in re.findall(r"-?\d{1,9}", text)]
            if want in nums:
                out.append(1.0)
            elif nums:
                out.append(0.5 / (1.0 + abs(nums[-1] - want) / 10.0))
            else:
                out.append(0.0)
        return out


def samples_for(B: int, steps: int):
    """The prompts of `steps` steps in order: what our trainer draws (task arithmetic, trainer.seed)."""
    from grpo.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(seed=SEED)
    return [task.train_sample(i) for i in range(B * steps)]


def build_27m(out: Path) -> str:
    """A seeded ~27M-parameter Llama beside a copy of the embedded tokenizer files."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from grpo.parts.modeling import EMBEDDED_MODEL_DIR

    out.mkdir(parents=True, exist_ok=True)
    for f in EMBEDDED_MODEL_DIR.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(SEED)
    hidden = 512
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=8,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
        max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    return str(out)


def ids_hash(prompts: list[list[int]]) -> str:
    return hashlib.sha1(json.dumps(prompts).encode()).hexdigest()[:12]


# ---- workers: one trainer each, one step per request -------------------------------------------
class Channel:
    """The worker's line protocol with the parent: requests on stdin, JSON replies on the original
    stdout; everything the libraries print goes to stderr (the parent's log file)."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)

    def send(self, **msg) -> None:
        self.out.write(json.dumps(msg) + "\n")
        self.out.flush()

    def wait(self) -> None:
        line = sys.stdin.readline().strip()
        if line != "step":
            raise SystemExit(f"worker: parent said {line!r}, stopping")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    """CPU time of this process, all threads, user + system."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def worker_setup(spec: dict):
    os.environ.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(SEED)
    return torch


def worker_ours(spec: dict, ch: Channel) -> None:
    worker_setup(spec)
    from grpo.cli import compose_config
    from grpo.commands.train import build, train_step
    from grpo.parts import config as C
    from grpo.parts.run import Run

    B, G, max_new, system = WORKLOADS[spec["workload"]]
    total = spec["warmup"] + spec["steps"]
    overrides = [
        f"model.path={spec['model']}", "model.dtype=float32", "model.device=cpu", "model.gradient_checkpointing=false",
        "rollout=hf", "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0",
        f"rollout.max_new_tokens={max_new}", f"rollout.batch_size={B * G}",
        f"algorithm.group_size={G}", f"algorithm.beta={BETA}", "algorithm.kl_estimator=k3",
        f"algorithm.clip_low={CLIP}", f"algorithm.clip_high={CLIP}", "algorithm.epochs=1", "algorithm.adv_scale=group",
        "algorithm.adv_eps=1e-4", "algorithm.loss_agg=token_mean", "algorithm.tis_cap=0",
        f"trainer.prompts_per_step={B}", "trainer.micro_batch_size=0", f"trainer.max_steps={total}",
        "trainer.eval_every=0", f"trainer.save_every={10 ** 6}", f"trainer.seed={SEED}",
        f"optim.lr={LR}", f"optim.betas=[{BETAS[0]},{BETAS[1]}]", "optim.weight_decay=0.0", "optim.warmup_steps=0",
        "optim.schedule=constant", f"optim.max_grad_norm={GRAD_NORM}",
        "logger=jsonl", "task=arithmetic", "task.verifiers=[{_target_: bench.bench_vs_trl.SharedReward}]",
        *spec["ours_overrides"],
    ]
    raw = compose_config("train", overrides)
    raw["trainer"]["system_prompt"] = system  # free text: set after composing rather than quoted for Hydra
    run_dir = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    try:
        cfg = C.parse(C.TrainConfig, raw)
        # The parts `grpo train` builds, stepped one train_step() at a time (no evaluation, no checkpoint).
        with Run.from_config("grpo", cfg, raw, run_dir) as run:
            grpo = build(cfg, run)
            seen: list[list[list[int]]] = []
            generate = grpo.engine.generate

            def generate_and_record(prompt_ids, n, sampling):
                seen.append([list(p) for p in prompt_ids])
                return generate(prompt_ids, n, sampling)

            grpo.engine.generate = generate_and_record
            params = sum(p.numel() for p in grpo.policy.model.parameters())
            ch.send(event="ready", params=params)
            for _ in range(total):
                ch.wait()
                c0, t0 = cpu_seconds(), time.perf_counter()
                m = train_step(grpo, run)
                step, cpu = time.perf_counter() - t0, cpu_seconds() - c0
                prompts = seen[-1]
                ch.send(event="step", step=step, cpu=cpu, gen=m["time/rollout"], reward=m["time/reward"],
                        ref=m["time/ref_forward"], fwd=m["time/forward"], bwd=m["time/backward"],
                        opt=m["time/optimizer"], reward_mean=m["reward/mean"],
                        completion_tokens=m["completion/len_mean"] * B * G,
                        prompt_tokens=sum(len(p) for p in prompts), prompt_hash=ids_hash(prompts))
        ch.send(event="done", rss_mb=peak_rss_mb())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def worker_trl(spec: dict, ch: Channel) -> None:
    torch = worker_setup(spec)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.parts.rollout import encode_prompts

    B, G, max_new, system = WORKLOADS[spec["workload"]]
    total = spec["warmup"] + spec["steps"]
    samples = samples_for(B, total)
    data = Dataset.from_list([{"prompt": s.chat(system), "answer": str(s.answer)} for s in samples])
    shared = SharedReward()

    def shared_reward(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return shared.score(texts, [{"answer": a} for a in answer])

    out_dir = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    args = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        model_init_kwargs={"dtype": "float32"}, disable_dropout=True, seed=SEED,
        per_device_train_batch_size=B * G, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        num_generations=G, max_completion_length=max_new, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
        repetition_penalty=1.0, beta=BETA, epsilon=CLIP, loss_type="dapo", scale_rewards="group",
        mask_truncated_completions=False, learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        weight_decay=0.0, max_grad_norm=GRAD_NORM, optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0,
        max_steps=total, shuffle_dataset=False, eval_strategy="no", save_strategy="no", report_to="none",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
    )
    rec: dict = {}
    prompt_rows: list[list[list[int]]] = []

    class Driver(TrainerCallback):
        """Holds each step at its start until the parent asks for it; reports it at its end."""

        ready = False

        def on_step_begin(self, args, state, control, **kw):
            if not self.ready:
                self.ready = True
                ch.send(event="ready", params=sum(p.numel() for p in trainer.model.parameters()))
            ch.wait()
            rec.clear()
            rec.update(gen=0.0, reward=0.0, ref=0.0, fwd=0.0, bwd=0.0, c0=cpu_seconds(), t0=time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            end, cpu = time.perf_counter(), cpu_seconds() - rec["c0"]
            rows = prompt_rows[-1]
            unique = rows[::G]
            assert all(rows[i] == unique[i // G] for i in range(len(rows))), "TRL's rows are not G x each prompt"
            ch.send(event="step", step=end - rec["t0"], cpu=cpu, gen=rec["gen"], reward=rec["reward"], ref=rec["ref"],
                    fwd=rec["fwd"], bwd=rec["bwd"], opt=end - rec["ts_end"], reward_mean=rec["reward_mean"],
                    completion_tokens=rec["completion_tokens"], prompt_tokens=sum(len(p) for p in unique),
                    prompt_hash=ids_hash(unique))

    trainer = GRPOTrainer(model=spec["model"], reward_funcs=shared_reward, args=args, train_dataset=data,
                          callbacks=[Driver()])

    # The same token ids as ours, asserted once here on the real path (and every step by the parent).
    tok = AutoTokenizer.from_pretrained(spec["model"])
    ours_ids = encode_prompts(tok, samples[:B], system)

    def timed(key, fn, when=None):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                name = key if when is None else when(*a, **k)
                if name:
                    rec[name] = rec.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    tokenize = trainer._tokenize_prompts

    def tokenize_and_record(prompts):
        ids, images, mm = tokenize(prompts)
        rows = [list(r) for r in ids]
        if not prompt_rows:
            want = [p for p in ours_ids for _ in range(G)]
            assert rows == want, "TRL's prompt token ids differ from ours"
        prompt_rows.append(rows)
        return ids, images, mm

    calculate = trainer._calculate_rewards

    def calculate_and_record(inputs, prompts, completions, completion_ids_list):
        r = calculate(inputs, prompts, completions, completion_ids_list)
        rec["reward_mean"] = float(r[:, 0].mean())
        rec["completion_tokens"] = sum(len(c) for c in completion_ids_list)
        return r

    training_step = trainer.training_step

    def training_step_and_mark(*a, **k):
        try:
            return training_step(*a, **k)
        finally:
            rec["ts_end"] = time.perf_counter()

    trainer._tokenize_prompts = tokenize_and_record
    trainer._generate = timed("gen", trainer._generate)
    trainer._calculate_rewards = timed("reward", calculate_and_record)
    trainer._get_per_token_logps_and_entropies = timed(
        None, trainer._get_per_token_logps_and_entropies,
        when=lambda model, *a, **k: "ref" if (model is trainer.ref_model or not torch.is_grad_enabled()) else None)
    trainer.compute_loss = timed("fwd", trainer.compute_loss)
    trainer.accelerator.backward = timed("bwd", trainer.accelerator.backward)
    trainer.training_step = training_step_and_mark
    try:
        trainer.train()
        ch.send(event="done", rss_mb=peak_rss_mb())
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


# ---- the parent ---------------------------------------------------------------------------------
def matmul_peak(threads: int, seconds: float = 0.7) -> float:
    """float32 torch.matmul GFLOP/s at `threads` threads: the best of a few square sizes."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            a @ b
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            k += 1
        best = max(best, 2 * n ** 3 * k / (time.perf_counter() - t0) / 1e9)
    return best


class Worker:
    def __init__(self, kind: str, spec: dict, log_dir: Path):
        self.kind = kind
        self.log = log_dir / f"{spec['workload']}-{spec['size']}-{kind}-{spec['round']}.log"
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
                   PYTHONWARNINGS="ignore")
        self.t0 = time.perf_counter()
        self.err = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1,
            cwd=str(ROOT), env=env)

    def read(self, event: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log.read_text()[-4000:]
            raise RuntimeError(f"the {self.kind} worker ended (exit {self.proc.returncode}) waiting for "
                               f"{event!r}; its log {self.log} ends with:\n{tail}")
        msg = json.loads(line)
        if msg.get("event") != event:
            raise RuntimeError(f"the {self.kind} worker sent {msg!r}, expected {event!r}")
        return msg

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.read("step")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def run_cell(workload: str, size: str, model: str, a, log_dir: Path) -> dict:
    """Both trainers on one cell: `a.rounds` fresh pairs of workers, steps alternating."""
    res = {k: {"steps": [], "rss_mb": [], "params": None, "setup_s": []} for k in ("trl", "ours")}
    for r in range(a.rounds):
        steps = a.steps or DEFAULT_STEPS[size]
        spec = dict(workload=workload, size=size, model=model, threads=a.threads, warmup=a.warmup, steps=steps,
                    round=r, ours_overrides=a.ours)
        order = ["trl", "ours"] if r % 2 == 0 else ["ours", "trl"]
        workers = {}
        try:
            for k in order:  # one at a time, so their setups do not compete
                workers[k] = Worker(k, spec, log_dir)
                ready = workers[k].read("ready")
                res[k]["params"] = ready["params"]
                res[k]["setup_s"].append(time.perf_counter() - workers[k].t0)
            for i in range(a.warmup + steps):
                turn = order if i % 2 == 0 else order[::-1]
                got = {k: workers[k].step() for k in turn}
                if got["trl"]["prompt_hash"] != got["ours"]["prompt_hash"]:
                    raise RuntimeError(f"{workload}:{size} step {i + 1}: the trainers were given different prompt ids")
                if i >= a.warmup:
                    for k in turn:
                        res[k]["steps"].append(got[k])
                print(f"  {workload}:{size} round {r + 1} step {i + 1}/{a.warmup + steps}"
                      f"{' (warm-up)' if i < a.warmup else ''}: "
                      + "  ".join(f"{k} {got[k]['step']:.2f}s" for k in ("trl", "ours")), file=sys.stderr, flush=True)
            for k in order:
                res[k]["rss_mb"].append(workers[k].read("done")["rss_mb"])
        finally:
            for w in workers.values():
                w.close()
    return res


SPLIT = ("gen", "reward", "ref", "fwd", "bwd", "opt")


def summarize(res: dict, peak_gflops: float) -> dict:
    out = {}
    for k, r in res.items():
        st = r["steps"]
        med = lambda key: statistics.median(s[key] for s in st)  # noqa: E731
        times = [s["step"] for s in st]
        useful = [10 * r["params"] * (s["prompt_tokens"] + s["completion_tokens"]) / s["step"] / 1e9 for s in st]
        out[k] = {
            "med": statistics.median(times), "min": min(times), "max": max(times),
            "gen_tps": statistics.median(s["completion_tokens"] / s["gen"] for s in st),
            "tps": statistics.median(s["completion_tokens"] / s["step"] for s in st),
            "cpu": med("cpu"), **{"t_" + p: med(p) for p in SPLIT},
            "t_other": statistics.median(s["step"] - sum(s[p] for p in SPLIT) for s in st),
            "len": statistics.mean(s["completion_tokens"] for s in st) / (res[k]["n_rows"]),
            "reward": statistics.mean(s["reward_mean"] for s in st), "reward_last": st[-1]["reward_mean"],
            "rss": max(r["rss_mb"]), "gflops": statistics.median(useful),
            "util": statistics.median(useful) / peak_gflops if peak_gflops else float("nan"),
        }
    return out


def print_table(rows: list[tuple[str, str, dict]], header: list[str]) -> None:
    cols = ["cell", "trainer", "step med", "min", "max", "cpu s", "gen tok/s", "tok/s", "gen", "rew", "ref", "fwd", "bwd",
            "opt", "other", "len", "reward", "last", "RSS MB", "GF/s", "util"]
    body = []
    for cell, trainer, s in rows:
        body.append([cell, trainer, f"{s['med']:.2f}", f"{s['min']:.2f}", f"{s['max']:.2f}", f"{s['cpu']:.2f}",
                     f"{s['gen_tps']:.0f}",
                     f"{s['tps']:.0f}", *(f"{s['t_' + p]:.2f}" for p in (*SPLIT, "other")), f"{s['len']:.1f}",
                     f"{s['reward']:.3f}", f"{s['reward_last']:.3f}", f"{s['rss']:.0f}", f"{s['gflops']:.1f}",
                     f"{100 * s['util']:.1f}%"])
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    print("\n".join(header))
    print(line(cols))
    print("  ".join("-" * w for w in widths))
    last = None
    for b in body:
        if last is not None and b[0] != last:
            print()
        print(line(b))
        last = b[0]


def parse_cells(text: str) -> list[tuple[str, str]]:
    cells = []
    for part in text.split(","):
        w, _, s = part.strip().partition(":")
        if w not in WORKLOADS or s not in SIZES:
            raise SystemExit(f"--cells: {part!r} is not WORKLOAD:SIZE with WORKLOAD in {sorted(WORKLOADS)} "
                             f"and SIZE in {list(SIZES)}")
        cells.append((w, s))
    return cells


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="short:embedded,short:27m,long:embedded,long:27m",
                    help="comma-separated WORKLOAD:SIZE (workloads: short, long; sizes: embedded, 27m)")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"measured steps per trainer per round (default: {DEFAULT_STEPS['embedded']} on embedded "
                         f"cells, {DEFAULT_STEPS['27m']} on 27m cells, to keep a full run near 15 minutes)")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted steps at the start of each round")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each trainer (and of the matmul peak)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="fresh worker pairs per cell (who starts flips each round; steps alternate within a round)")
    ap.add_argument("--ours", action="append", default=[], metavar="OVERRIDE",
                    help="an extra Hydra override for our trainer, e.g. --ours trainer.shared_prompt=false "
                         "(repeatable; the work must stay identical)")
    ap.add_argument("--json", default=None, help="also write every step's raw record to this JSON file")
    ap.add_argument("--worker", choices=("trl", "ours"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        ch = Channel()
        (worker_trl if a.worker == "trl" else worker_ours)(json.loads(a.spec), ch)
        return 0
    if (a.steps is not None and a.steps < 1) or a.warmup < 0 or a.rounds < 1 or a.threads < 1:
        raise SystemExit("--steps and --rounds must be >= 1, --warmup >= 0, --threads >= 1")
    cells = parse_cells(a.cells)
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("trl is not importable here: run this with `make bench-trl` (it sets up .venv-bench)")
    import torch
    import transformers

    from grpo.parts.modeling import resolve_model_path

    load0 = os.getloadavg()
    peak0 = matmul_peak(a.threads)
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-vs-trl-"))
    rows, ratios = [], []
    try:
        models = {"embedded": resolve_model_path("embedded")}
        if any(s == "27m" for _, s in cells):
            models["27m"] = build_27m(tmp / "llama-27m")
        for w, s in cells:
            print(f"cell {w}:{s} ...", file=sys.stderr, flush=True)
            res = run_cell(w, s, models[s], a, tmp)
            B, G, _, _ = WORKLOADS[w]
            for r in res.values():
                r["n_rows"] = B * G
            rows.append((w, s, res))
        peak1 = matmul_peak(a.threads)
    except BaseException:
        print(f"(worker logs kept in {tmp})", file=sys.stderr)
        raise
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    peak = max(peak0, peak1)
    table = []
    for w, s, res in rows:
        summ = summarize({k: res[k] for k in ("trl", "ours")}, peak)
        table.append((f"{w}:{s}", f"TRL {trl.__version__}", summ["trl"]))
        table.append((f"{w}:{s}", "ours", summ["ours"]))
        ratios.append((w, s, summ["ours"]["med"] / summ["trl"]["med"]))
    params = ", ".join(f"{s} {res['ours']['params'] / 1e6:.2f}M" for s, res in {s: res for _, s, res in rows}.items())
    steps = ", ".join(f"{w}:{s} {len(res['ours']['steps'])}" for w, s, res in rows)
    header = [
        f"GRPO step time, TRL {trl.__version__} GRPOTrainer vs grpo train | torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {a.threads} threads, {os.cpu_count()} CPUs | {a.warmup} warm-up step(s), then "
        f"measured steps per trainer: {steps} ({a.rounds} round(s), alternating) | {time.perf_counter() - t_start:.0f} s",
        f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, at end {load1[0]:.2f} {load1[1]:.2f} "
        f"{load1[2]:.2f} | float32 matmul peak {peak0:.0f} GFLOP/s at start, {peak1:.0f} at end | params: {params}",
        *([f"our extra overrides: {' '.join(a.ours)}"] if a.ours else []),
        "times in s (medians; split: gen rew ref fwd bwd opt other); len = completion tokens; reward = mean over the "
        "measured steps, last = last step; util = useful FLOP/s / matmul peak",
        "",
    ]
    print_table(table, header)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "peak_gflops": [peak0, peak1], "load": [load0, load1],
                                            "cells": {f"{w}:{s}": res for w, s, res in rows}}, indent=1))
    print()
    for w, s, ratio in ratios:
        print(f"ratio {w} {s} {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
