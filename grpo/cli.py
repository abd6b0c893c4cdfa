"""`grpo <command>`: train | sft | eval | rm | ppo | dpo | bon | prefs | verify | verifiers | sandbox.

Hydra stays here, at the edge: `train`, `sft`, `eval`, `rm`, `ppo`, `dpo` and `bon` compose a config from conf/ plus the overrides
on the command line and pass plain values on. Errors in what the user typed end the command with
one line naming the problem (exit 2), not a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

USAGE = """usage: grpo [-v] <command> [args]

  -v, --verbose              show the libraries' logs and progress bars too (else in <run dir>/<command>.log)

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
  export CKPT OUT            write a checkpoint (sharded, LoRA, or a run dir's newest) as one model folder

train, sft, rm, dpo and ppo run on several processes under torchrun: torchrun --nproc_per_node K -m grpo train ...
"""

CONF_DIR = str(Path(__file__).resolve().parent / "conf") if (Path(__file__).resolve().parent / "conf").is_dir() \
    else str(Path(__file__).resolve().parent.parent / "conf")


class UserError(Exception):
    """A mistake in the command, config or data: reported in one line, exit status 2."""


def _user_errors():
    from grpo.parts.modeling import ModelError
    from grpo.parts.config import ConfigError
    from grpo.tasks.base import TaskError
    from grpo.verifiers.registry import VerifierConfigError

    return (UserError, ModelError, ConfigError, TaskError, VerifierConfigError, FileNotFoundError)


def _overrides(argv: list[str]) -> list[str] | None:
    """The key=value overrides of a command line, as Hydra reads them; None when Hydra is asked for
    something else (--help, --cfg, --multirun ...), which Hydra then handles itself."""
    from hydra._internal.utils import get_args_parser

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # a malformed command line: Hydra's own message says how
        return None
    asked = [v for k, v in vars(args).items() if k != "overrides"]  # --cfg, --multirun, --config-dir ...
    return None if any(asked) else list(args.overrides)


def _hydra_message(e: Exception, config_name: str, overrides: list[str]) -> str:
    """Hydra's several-line composition error as one line that names the override at fault."""
    import difflib
    import re

    text = str(e)
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        listed = f"; {group} is one of {', '.join(options)}" if options else ""
        return f"{group}={option}: no such option{listed}"
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        given = next((o for o in overrides if o.split("=", 1)[0] == key), f"{key}=...")
        parent, _, leaf = key.rpartition(".")
        hint = f"a new key needs a +: +{given}"
        try:  # the keys beside it, from the config composed without this override
            node = compose_config(config_name, [o for o in overrides if o != given], resolve=False)
            for part in filter(None, parent.split(".")):
                node = node[part]
            close = difflib.get_close_matches(leaf, [str(k) for k in node], n=1)
            if close:
                hint = f"did you mean {parent + '.' if parent else ''}{close[0]}? ({hint})"
        except Exception:
            pass
        return f"{key}: no such key; {hint}"
    if type(e).__name__ == "OverrideParseException":  # name the override that does not parse
        from hydra.core.override_parser.overrides_parser import OverridesParser

        for o in overrides:
            try:
                OverridesParser.create().parse_overrides([o])
            except Exception as bad:
                first = str(bad).splitlines()[-2 if "See https" in str(bad) else -1]
                return f"{o}: not a valid override ({first}); see https://hydra.cc/docs/advanced/override_grammar/basic/"
    lines = [ln.strip() for ln in text.split("Config search path")[0].splitlines()]
    return " ".join(ln for ln in lines if ln and not ln.startswith("See https://"))


def _check_overrides(config_name: str, argv: list[str]) -> None:
    """Compose the config once before Hydra's own run, so that an unknown key or group option is
    one `grpo <command>: error:` line with exit status 2 (as the project's own errors are), and no
    run directory is made for a command that cannot start."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = _overrides(argv)
    if overrides is None:
        return
    try:
        compose_config(config_name, overrides, resolve=False)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(_hydra_message(e, config_name, overrides)) from None


# Hydra makes the run dir; the project writes what goes in it (after the checks below) and sets up
# logging itself (grpo.parts.logs), so Hydra's own .hydra/ writing and logging are switched off.
_HYDRA_OWN = ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


# The commands that split their work over the ranks of a torchrun launch; the others run on one process.
TORCHRUN_COMMANDS = ("train", "sft", "rm", "dpo", "ppo")


def _ranks_agree(config_name: str, argv: list[str]) -> tuple[list[str], bool]:
    """Under torchrun: join the process group now, and give every rank rank 0's run dir (the default
    one is named by the clock, which the ranks read at different moments). Returns the overrides
    and whether this is rank 0."""
    from grpo.parts import distributed

    if not distributed.launched():
        return argv, True
    if config_name not in TORCHRUN_COMMANDS:
        raise UserError(f"runs on one process; under torchrun: {', '.join(TORCHRUN_COMMANDS)}")
    distributed.init_process_group()
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        run_dir = distributed.broadcast(time.strftime("runs/%Y-%m-%d_%H-%M-%S"))
        argv = argv + [f"hydra.run.dir={run_dir}"]
    return argv, distributed.is_main()


def _hydra_job(config_name: str, fn, argv: list[str]) -> int:
    import hydra
    from omegaconf import OmegaConf

    from grpo.parts import checkpoint, distributed, logs

    _check_overrides(config_name, argv)
    result = {"rc": 0}
    argv, main_rank = _ranks_agree(config_name, argv)

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def job(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        fresh = not any(run_dir.iterdir())  # Hydra has just made it, or it was empty
        distributed.barrier()  # under torchrun: every rank has looked before any writes to it
        try:
            try:
                plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
            except Exception as e:  # a ??? left unset, a bad interpolation
                raise UserError(f"config: {e}".splitlines()[0]) from None
            trains = "resume" in (plain.get("trainer") or {})  # a training command, which may resume
            if trains and not checkpoint.resuming(plain["trainer"]["resume"]) and checkpoint.holds_run(run_dir):
                raise checkpoint.refusal(run_dir)  # before anything in that run is touched
            # The record of what ran: config.yaml for a new or resumed run; another command run in an
            # existing run dir (grpo eval there, say) keeps the run's record and writes its own.
            prefix = "" if fresh or trains else f"{config_name}_"
            if main_rank:
                logs.write_record(run_dir, prefix, OmegaConf.to_yaml(cfg), argv)
            with logs.command_output(run_dir, config_name if main_rank else f"{config_name}.rank{distributed.rank()}"):
                fn(plain, run_dir)
        except _user_errors() as e:
            tag = "" if main_rank else f" (rank {distributed.rank()})"
            print(f"grpo {config_name}: error{tag}: {e}", file=sys.stderr)
            result["rc"] = 2
            if fresh:  # each rank after its own writes: the last one leaves nothing behind
                checkpoint.remove_if_empty_run(run_dir)
        except BaseException:
            if fresh:
                checkpoint.remove_if_empty_run(run_dir)
            raise

    saved = sys.argv
    sys.argv = [f"grpo {config_name}"] + argv + _HYDRA_OWN
    try:
        job()
    finally:
        sys.argv = saved
        distributed.close()
    return result["rc"]


def _train(cfg: dict, run_dir: Path) -> None:
    from grpo.commands.train import train

    train(cfg, run_dir)


def _sft(cfg: dict, run_dir: Path) -> None:
    from grpo.commands.sft import run_sft

    out = run_sft(cfg, run_dir)
    print(f"sft done: model saved to {out}")


def _eval(cfg: dict, run_dir: Path) -> None:
    from grpo.parts.evaluation import run_eval

    run_eval(cfg, run_dir)


def _rm(cfg: dict, run_dir: Path) -> None:
    from grpo.commands.rm import run_rm

    run_rm(cfg, run_dir)


def _ppo(cfg: dict, run_dir: Path) -> None:
    from grpo.commands.ppo import run_ppo

    run_ppo(cfg, run_dir)


def _dpo(cfg: dict, run_dir: Path) -> None:
    from grpo.commands.dpo import run_dpo

    run_dpo(cfg, run_dir)


def _bon(cfg: dict, run_dir: Path) -> None:
    from grpo.commands.bon import run_bon

    run_bon(cfg, run_dir)


def compare_main(argv: list[str]) -> int:
    from grpo.commands.compare import compare_main as main

    return main(argv)


def prefs_main(argv: list[str]) -> int:
    from grpo.commands.prefs import prefs_main as main

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


def export_main(argv: list[str]) -> int:
    from grpo.commands.export import export_main as main

    return main(argv)


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
    "export": export_main,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-v", "--verbose"):  # grpo -v <command>: library output on the terminal too
        from grpo.parts import logs

        logs.VERBOSE, argv = True, argv[1:]
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


def compose_config(config_name: str, overrides: list[str] | None = None, resolve: bool = True) -> dict:
    """The plain config that `grpo <config_name> overrides...` would run with (for Python use and tests)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    return OmegaConf.to_container(cfg, resolve=resolve, throw_on_missing=resolve)
