import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A run starts its verifiers' workers at build (Run.rewards) so its first steps do not wait for them;
# most tests build a run and end in seconds, before the workers would be used: they skip that start
# (test_run checks it with the variable at 1).
os.environ.setdefault("GRPO_VERIFIER_WARMUP", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 1-layer Llama with the embedded model's tokenizer (built, not downloaded)."""
    from grpo.commands.embedded import build_tokenizer, init_model

    out = tmp_path_factory.mktemp("tiny_model")
    tok = build_tokenizer(out)
    init_model(out, tok, hidden=64, layers=1, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_rm_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A reward model on tiny_model_dir: its trunk plus a seeded, untrained scalar head."""
    import torch

    from grpo.parts.modeling import load_tokenizer
    from grpo.parts.reward_model import init_reward_model, save_reward_model

    out = tmp_path_factory.mktemp("tiny_rm")
    torch.manual_seed(0)
    save_reward_model(init_reward_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), out)
    return out


def run_interrupted(run, make_cfg, tmp_path, steps: int, stop: int):
    """The resume check's three runs: `steps` uninterrupted in tmp_path/full; `stop` steps, then
    resumed to `steps`, in tmp_path/part. make_cfg(*overrides) -> a config. Returns (full, part,
    (what the full run returned, what the resumed run returned))."""
    full, part = tmp_path / "full", tmp_path / "part"
    whole = run(make_cfg(f"trainer.max_steps={steps}"), full)
    run(make_cfg(f"trainer.max_steps={stop}"), part)
    resumed = run(make_cfg(f"trainer.max_steps={steps}", "trainer.resume=true"), part)
    return full, part, (whole, resumed)


def run_grpo(*args: str, timeout: int = 600):
    """Run the real CLI in a subprocess; returns CompletedProcess with text output."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "grpo", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def run_killed(kill_at: int, *args: str):
    """`run_grpo(*args)` with a verifier that SIGKILLs the run at its kill_at-th call
    (tests.toy_verifiers.DigitFractionEvenOnlyKilled); asserts it died so. The subprocess uses this
    process's torch thread count: a run here and one there then reduce alike, bit for bit (earlier
    tests in this process may have set it to 1)."""
    import torch

    env = {"GRPO_TEST_KILL_AT": str(kill_at), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        r = run_grpo(*args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    assert r.returncode == -9, r.stderr[-2000:]
    return r


def torchrun(world: int, *args: str, timeout: int = 600):
    """Run `torchrun --standalone --nproc_per_node world ARGS` (gloo on the CPU); asserts it exits 0."""
    import subprocess

    # faulthandler: a rank that aborts prints where every thread of it was
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-8000:]
    return p


def proc_table() -> dict[int, tuple[int, str, str, int]]:
    """pid -> (ppid, state, comm, start time) for every process on the host, from /proc (the process
    tests look for what a command left behind)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        close = stat.rindex(")")
        fields = stat[close + 2:].split()
        table[int(name)] = (int(fields[1]), fields[0], stat[stat.index("(") + 1:close], int(fields[19]))
    return table


def pids_with(token: str) -> list[str]:
    """The pids of host processes whose command line holds `token`."""
    hits = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    hits.append(pid)
        except OSError:
            pass
    return hits


def assert_resumed_exactly(full: Path, part: Path, steps, keys, last: int, marker: str = "loss") -> None:
    """The resumed run in `part` logged the same `keys` as the uninterrupted one in `full` at each of
    `steps` (in the records that hold `marker`: a step's), and its checkpoint at step `last` holds the
    same weights, bit for bit."""
    import json

    import torch
    from safetensors.torch import load_file

    def logged(d):
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in recs if marker in r}
    a, b = logged(full), logged(part)
    for step in steps:
        for key in keys:
            assert a[step][key] == b[step][key], (step, key)
    ckpt = f"checkpoints/step_{last:06d}/model/model.safetensors"
    wa, wb = load_file(full / ckpt), load_file(part / ckpt)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
