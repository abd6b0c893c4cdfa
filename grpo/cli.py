"""`grpo <command>`: train | sft | eval | rm | ppo | dpo | bon | prefs | verify | verifiers | sandbox.

Hydra stays here, at the edge: `train`, `sft`, `eval`, `rm`, `ppo`, `dpo` and `bon` compose a config from conf/ plus the overrides
on the command line and pass plain values on. Errors in what the user typed end the command with
one line naming the problem (exit 2), not a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

USAGE = """usage: grpo <command> [args]

commands:
  train [key=value ...]      GRPO training (Hydra overrides, e.g. task=file task.path=x.jsonl)
  sft [key=value ...]        supervised fine-tuning on prompt/completion rows
  eval [key=value ...]       evaluate a model or checkpoint on a task (pass@1, pass@k, maj@k)
  rm [key=value ...]         train a reward model on preference data (pairs, rankings, scores)
  ppo [key=value ...]        PPO with a critic against a reward model (InstructGPT), PPO-ptx
  dpo [key=value ...]        direct preference optimisation (DPO, IPO, robust DPO) on pairs or rankings
  bon [key=value ...]        best-of-N: keep the reward model's best of N samples; writes SFT rows
  compare RUN ... [-o F]     one figure: true score against KL from the reference, one curve per run
  prefs [--out DIR ...]      build the built-in preference task's data (simulated labellers)
  verify --verifier NAME FILE.jsonl
                             score each line ({"completion", ...fields}); prints JSON lines
  verifiers                  list the verifiers that can be named
  sandbox run|serve ...      run a program in the sandbox, or serve the sandbox over HTTP
"""

CONF_DIR = str(Path(__file__).resolve().parent / "conf") if (Path(__file__).resolve().parent / "conf").is_dir() \
    else str(Path(__file__).resolve().parent.parent / "conf")


class UserError(Exception):
    """A mistake in the command, config or data: reported in one line, exit status 2."""


def _user_errors():
    from grpo.modeling import ModelError
    from grpo.config import ConfigError
    from grpo.tasks.base import TaskError
    from grpo.verifiers.registry import VerifierConfigError

    return (UserError, ModelError, ConfigError, TaskError, VerifierConfigError, FileNotFoundError)


def _hydra_job(config_name: str, fn, argv: list[str]) -> int:
    import hydra
    from omegaconf import OmegaConf

    result = {"rc": 0}

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def job(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except Exception as e:  # a ??? left unset
            print(f"grpo {config_name}: config error: {e}", file=sys.stderr)
            result["rc"] = 2
            return
        try:
            fn(plain, run_dir)
        except _user_errors() as e:
            print(f"grpo {config_name}: error: {e}", file=sys.stderr)
            result["rc"] = 2

    saved = sys.argv
    sys.argv = [f"grpo {config_name}"] + argv
    try:
        job()
    finally:
        sys.argv = saved
    return result["rc"]


def _train(cfg: dict, run_dir: Path) -> None:
    from grpo.trainer import train

    train(cfg, run_dir)


def _sft(cfg: dict, run_dir: Path) -> None:
    from grpo.sft import run_sft

    out = run_sft(cfg, run_dir)
    print(f"sft done: model saved to {out}")


def _eval(cfg: dict, run_dir: Path) -> None:
    from grpo.evaluate import run_eval

    run_eval(cfg, run_dir)


def _rm(cfg: dict, run_dir: Path) -> None:
    from grpo.rm import run_rm

    run_rm(cfg, run_dir)


def _ppo(cfg: dict, run_dir: Path) -> None:
    from grpo.ppo import run_ppo

    run_ppo(cfg, run_dir)


def _dpo(cfg: dict, run_dir: Path) -> None:
    from grpo.dpo import run_dpo

    run_dpo(cfg, run_dir)


def _bon(cfg: dict, run_dir: Path) -> None:
    from grpo.bon import run_bon

    run_bon(cfg, run_dir)


def compare_main(argv: list[str]) -> int:
    from grpo.compare import compare_main as main

    return main(argv)


def prefs_main(argv: list[str]) -> int:
    from grpo.prefs import prefs_main as main

    return main(argv)


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
    from grpo.tasks.file import read_rows

    rows = read_rows(a.file) if a.file.endswith(".jsonl") else None
    if rows is None:
        raise UserError(f"{a.file}: expected a .jsonl file")
    for i, row in enumerate(rows):
        if not isinstance(row.get("completion"), str):
            raise UserError(f"{a.file}: row {i}: missing field 'completion' (a string)")
    errors = 0
    # The same isolation as training: a raising, hanging or out-of-range verifier costs only its rows.
    with RewardFunction([spec], timeout=a.timeout) as reward_fn:
        label = reward_fn.labels[0]
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


def sandbox_main(argv: list[str]) -> int:
    try:
        from grpo.sandbox.cli import cli_main
    except ImportError as e:
        raise UserError(f"the sandbox is not available: {e}") from e
    return cli_main(argv)


COMMANDS = {
    "train": lambda argv: _hydra_job("train", _train, argv),
    "sft": lambda argv: _hydra_job("sft", _sft, argv),
    "eval": lambda argv: _hydra_job("eval", _eval, argv),
    "rm": lambda argv: _hydra_job("rm", _rm, argv),
    "ppo": lambda argv: _hydra_job("ppo", _ppo, argv),
    "dpo": lambda argv: _hydra_job("dpo", _dpo, argv),
    "bon": lambda argv: _hydra_job("bon", _bon, argv),
    "prefs": prefs_main,
    "compare": compare_main,
    "verify": verify_main,
    "verifiers": verifiers_main,
    "sandbox": sandbox_main,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0)
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"grpo: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    try:
        rc = COMMANDS[cmd](rest)
    except _user_errors() as e:
        print(f"grpo {cmd}: error: {e}", file=sys.stderr)
        rc = 2
    sys.exit(rc or 0)


def compose_config(config_name: str, overrides: list[str] | None = None) -> dict:
    """The plain config that `grpo <config_name> overrides...` would run with (for Python use and tests)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
