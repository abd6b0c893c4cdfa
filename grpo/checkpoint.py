"""Checkpoints that are written atomically and resume a run exactly.

Layout: <run_dir>/checkpoints/step_000040/
    model/          each trained module in Hugging Face format (from_pretrained, vLLM) with its
                    tokenizer: `model/` for the policy (grpo, sft) or the reward model (rm); a
                    trainer with several modules (policy and value) writes one folder per name
    state.pt        optimizer(s), scheduler(s), RNG states, data position, step
and <run_dir>/checkpoints/latest, a one-line file naming the newest complete checkpoint.

A checkpoint is assembled in a temporary sibling directory and renamed into place, and `latest`
is replaced with os.replace, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(run_dir: Path, step: int, modules: Mapping[str, Any], tokenizer, stateful: Mapping[str, Any],
         extra: Mapping[str, Any] | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step`: each of `modules` (name -> model) as a Hugging Face folder, and in
    state.pt the state_dict() of each of `stateful` (name -> optimizer, scheduler, KL controller ...),
    the RNG states and `extra` (plain values such as the data position)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp_step_{step:06d}_"))
    try:
        for name, module in modules.items():
            module.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
        state = {**{k: v.state_dict() for k, v in stateful.items()}, **dict(extra or {})}
        torch.save({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(root / "latest", final.name + "\n")
    if keep > 0:
        # Keep this checkpoint and the keep-1 newest before it; never the one just written.
        older = [p for p in sorted(root.glob("step_*")) if p.name < final.name]
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def restore(ckpt: Path, stateful: Mapping[str, Any]) -> dict[str, Any]:
    """Load state.pt: each of `stateful` gets its saved state_dict back, the RNG states are set, and
    the whole state (step, data position, ...) is returned."""
    state = load_state(ckpt)
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"])
    return state


def find(run_dir: Path, resume: Any) -> Path | None:
    """The checkpoint to resume from: `resume` is true (newest in run_dir) or a checkpoint path."""
    if resume in (None, False, "", "false"):
        return None
    if resume is True or resume == "true":
        latest = Path(run_dir) / "checkpoints" / "latest"
        if not latest.exists():
            raise FileNotFoundError(f"trainer.resume=true but {latest} does not exist: pass the run's hydra.run.dir")
        ckpt = latest.parent / latest.read_text().strip()
        if not (ckpt / "state.pt").exists():
            raise FileNotFoundError(f"{latest} names {ckpt.name}, which is not a complete checkpoint")
        return ckpt
    p = Path(str(resume))
    if not (p / "state.pt").exists():
        raise FileNotFoundError(f"trainer.resume={resume}: not a checkpoint (no state.pt)")
    return p


def begin(run_dir: Path, resume: Any, seed: int | None = None) -> Path | None:
    """Start a run in run_dir (created if missing; every RNG seeded when a seed is given) and return
    the checkpoint it resumes from (None: a fresh run). A fresh run refuses a run dir that already
    holds one."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    if seed is not None:
        seed_everything(seed)
    ckpt = find(run_dir, resume)
    if not ckpt and (Path(run_dir) / "metrics.jsonl").exists():
        from grpo.config import ConfigError

        raise ConfigError(f"{run_dir} already holds a run: continue it with trainer.resume=true, "
                          "or start a new one in another hydra.run.dir")
    return ckpt


def load_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "state.pt", weights_only=False)
