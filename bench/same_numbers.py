"""Same seed, same numbers: every command's no-argument run, recorded and compared across code versions.

    python bench/same_numbers.py record OUT          # runs the commands below into OUT/<name>/
    python bench/same_numbers.py compare OLD NEW     # exit 0 when every recorded number is equal

`record` runs, one after the other, with no arguments beyond the run dir (and, for `sft`, the rows it
trains on, which `grpo sft` has no default for):
    train  grpo train          (what `make train` runs)
    rm     grpo rm
    ppo    grpo ppo
    dpo    grpo dpo
    bon    grpo bon
    sft    grpo sft model=embedded_chat data.path=OUT/bon/best_of_n.jsonl trainer.max_steps=200
and keeps each run dir. `compare` reads, for each command, every record of metrics.jsonl without
the `time/*` keys (wall clock), bon's summary and kept rows, and a hash of every tensor of the
model the run ends with (its last checkpoint's, or its model/ folder), and prints the first
difference of each command. About 9 minutes for `record` on the 2-core machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRPO = str(Path(sys.executable).parent / "grpo")

COMMANDS = {
    "train": ["train"],
    "rm": ["rm"],
    "ppo": ["ppo"],
    "dpo": ["dpo"],
    "bon": ["bon"],
    "sft": ["sft", "model=embedded_chat", "data.path={out}/bon/best_of_n.jsonl", "trainer.max_steps=200"],
}


def record(out: Path, names: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    for name in names:
        args = [a.format(out=out) for a in COMMANDS[name]]
        t0 = time.time()
        p = subprocess.run([GRPO, *args, f"hydra.run.dir={out / name}"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        (out / f"{name}.stdout").write_text(p.stdout + p.stderr)
        print(f"{name:6s} rc {p.returncode}  {time.time() - t0:6.1f} s  load {os.getloadavg()[0]:.1f}", flush=True)
        if p.returncode:
            print(p.stdout[-2000:], p.stderr[-2000:])
            return 1
    return 0


def tensor_hashes(folder: Path) -> dict[str, str]:
    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in sorted(st.keys()):
                t = st.get_tensor(k).contiguous()
                out[k] = hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return out


def final_models(run: Path) -> dict[str, dict[str, str]]:
    """Every model folder the run ends with: model/ and, for checkpointing loops, the last checkpoint's."""
    found = {}
    if (run / "model").is_dir():
        found["model"] = tensor_hashes(run / "model")
    latest = run / "checkpoints" / "latest"
    if latest.exists():
        ckpt = run / "checkpoints" / latest.read_text().strip()
        for sub in sorted(p for p in ckpt.iterdir() if p.is_dir() and any(p.glob("*.safetensors"))):
            found[f"checkpoint/{sub.name}"] = tensor_hashes(sub)
    return found


def numbers(run: Path) -> dict:
    recs = []
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            recs.append({k: v for k, v in r.items() if not k.startswith("time/")})
    out = {"metrics": recs, "models": final_models(run)}
    if (run / "best_of_n.summary.json").exists():
        s = json.loads((run / "best_of_n.summary.json").read_text())
        out["bon"] = {"by_k": s["by_k"], "rows": (run / "best_of_n.jsonl").read_text().splitlines()}
    return out


def first_difference(a, b, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}/{k}: only in {'new' if k not in a else 'old'}"
            d = first_difference(a[k], b[k], f"{where}/{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} entries vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def compare(old: Path, new: Path, names: list[str]) -> int:
    bad = 0
    for name in names:
        a, b = numbers(old / name), numbers(new / name)
        d = first_difference(a, b)
        count = len(a["metrics"])
        models = sum(len(v) for v in a["models"].values())
        kept = f", {len(a['bon']['rows'])} kept rows by k" if "bon" in a else ""
        print(f"{name:6s} {'same' if d is None else 'DIFFERENT'}: {count} metric records, {models} tensors{kept}"
              + ("" if d is None else f"; first difference {d}"))
        bad += d is not None
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "record":
        return record(Path(argv[1]).resolve(), argv[2:] or list(COMMANDS))
    if len(argv) >= 3 and argv[0] == "compare":
        return compare(Path(argv[1]), Path(argv[2]), argv[3:] or list(COMMANDS))
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
