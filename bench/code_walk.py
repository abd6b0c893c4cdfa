"""The walk of one run of a training loop: which files a reader of the loop jumps to, and how often back.

    python bench/code_walk.py ppo [overrides ...]

Runs `grpo <command>` in this process for one step (an evaluation before and after it, a checkpoint
at the end) under a profiler that records, in order, the project file of every function that the
loop's own file calls (the loop function, its helpers and closures, and for the GRPO Trainer class
its methods: whatever is defined in the loop's file), once per call site (a reader follows a call
once, however often it runs). Consecutive calls into the same file are one visit. It prints the files visited and the returns (visits to a file already visited): a reader
following the loop top to bottom opens that many files, and jumps back to an open one that often.
Works on the layout before grpo/parts/ too (put that checkout first on PYTHONPATH).
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

# command -> (its module now, its module before grpo/commands/, one-step overrides)
LOOPS = {
    "train": ("grpo.commands.train", "grpo.trainer", ["trainer.max_steps=1", "logger=jsonl"]),
    "ppo": ("grpo.commands.ppo", "grpo.ppo", ["trainer.max_steps=1"]),
    "dpo": ("grpo.commands.dpo", "grpo.dpo", ["trainer.max_steps=1"]),
    "rm": ("grpo.commands.rm", "grpo.rm", ["trainer.max_steps=1"]),
    "sft": ("grpo.commands.sft", "grpo.sft", ["trainer.max_steps=1", "model=embedded_chat"]),
}


def walk(command: str, overrides: list[str]) -> list[str]:
    import grpo
    from grpo.cli import main

    root = Path(grpo.__file__).resolve().parents[1]
    now, before, quick = LOOPS[command]
    old_layout = not (Path(grpo.__file__).parent / "commands").is_dir()
    loop_file = str(Path(importlib.import_module(before if old_layout else now).__file__).resolve())
    tmp = Path(tempfile.mkdtemp(prefix=f"walk-{command}-"))
    if command == "sft":
        rows = tmp / "rows.jsonl"
        rows.write_text('{"prompt": "What is 1 + 1?", "completion": "\\\\boxed{2}"}\n' * 4)
        overrides = [f"data.path={rows}", *overrides]
    visits: list[str] = []
    sites: set[tuple[int, str]] = set()

    def profile(frame, event, arg):
        if event != "call" or frame.f_back is None or frame.f_back.f_code.co_filename != loop_file:
            return
        path = Path(frame.f_code.co_filename).resolve()
        if str(path) == loop_file or root not in path.parents or ".venv" in path.parts:
            return
        name = str(path.relative_to(root))
        site = (frame.f_back.f_lineno, name)
        if site in sites:
            return
        sites.add(site)
        if not visits or visits[-1] != name:
            visits.append(name)

    sys.setprofile(profile)
    try:
        main([command, f"hydra.run.dir={tmp / 'run'}", *quick, *overrides])
    except SystemExit as e:
        if e.code:
            raise
    finally:
        sys.setprofile(None)
    return visits


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in LOOPS:
        print(__doc__)
        return 2
    visits = walk(argv[0], argv[1:])
    seen: set[str] = set()
    returns = 0
    for v in visits:
        returns += v in seen
        seen.add(v)
    print(f"{argv[0]}: {len(seen)} files visited, {returns} returns to a file already seen ({len(visits)} visits)",
          file=sys.stderr)
    print("  " + " -> ".join(visits), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
