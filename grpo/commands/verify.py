"""`grpo verify` (score the completions of a JSONL file with a verifier) and `grpo verifiers` (list
the verifiers that can be named)."""

from __future__ import annotations

import json
import sys

from grpo.parts.config import UserError


def verify_main(argv: list[str]) -> int:
    import argparse

    from grpo.verifiers.compose import RewardFunction

    ap = argparse.ArgumentParser(prog="grpo verify", description="Score completions in a JSONL file.")
    ap.add_argument("--verifier", required=True,
                    help="a verifier name (see `grpo verifiers`), or module:Class for any importable verifier")
    ap.add_argument("--args", default="{}", help='constructor arguments as a JSON object, e.g. \'{"think": true}\'')
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per batch before its samples get 0")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("file", help="JSONL: one object per line with `completion` and the fields the verifier needs")
    a = ap.parse_args(argv)
    try:
        kwargs = json.loads(a.args)
    except json.JSONDecodeError as e:
        raise UserError(f"--args: not valid JSON ({e.msg})") from None
    if not isinstance(kwargs, dict):
        raise UserError("--args: must be a JSON object")
    spec = {("_target_" if ":" in a.verifier else "name"): a.verifier, **kwargs}
    from grpo.tasks.file import located_rows

    if not a.file.endswith(".jsonl"):
        raise UserError(f"{a.file}: expected a .jsonl file")
    located = located_rows(a.file)
    rows = [row for _, row in located]
    errors = 0
    # The same isolation as training: a raising, hanging or out-of-range verifier costs only its rows.
    with RewardFunction([spec], timeout=a.timeout) as reward_fn:
        label = reward_fn.labels[0]
        for where, row in located:  # every row is checked before any is scored, as grpo train does
            if not isinstance(row.get("completion"), str):
                raise UserError(f"{where}: missing field 'completion' (a string)")
            missing = reward_fn.missing_field(row)
            if missing:
                raise UserError(f"{where}: missing field {missing}")
        for start in range(0, len(rows), a.batch_size):
            chunk = rows[start:start + a.batch_size]
            rewards, infos, metrics = reward_fn([r["completion"] for r in chunk], chunk)
            errors += int(metrics[f"verifier/{label}/errors"])
            for r, info in zip(rewards, infos):
                print(json.dumps({"reward": r, "info": info[label]}, default=str), flush=True)
    if errors:
        print(f"grpo verify: {errors} of {len(rows)} rows got 0 because verifier {label!r} failed on them "
              "(see the warnings above)", file=sys.stderr)
    return 0


def verifiers_main(argv: list[str]) -> int:
    from grpo.verifiers.registry import available

    for name, origin in sorted(available().items()):
        print(f"{name:16s} {origin}")
    print("(any importable verifier also works as {_target_: module.Class}; see docs/verifiers.md)")
    return 0
