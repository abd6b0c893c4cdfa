"""`grpo <command>`: the dispatcher to grpo/commands/, one file per command.

Hydra stays here, at the edge: `train`, `sft`, `eval`, `rm`, `ppo`, `dpo` and `bon` compose a config
from conf/ plus the overrides on the command line and pass the plain result on; the other commands
parse their own arguments. Errors in what the user typed end the command with one line naming the
problem (exit 2), not a traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from grpo.parts.config import UserError

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
  rollout serve ...          serve a rollout engine (hf, vllm) to trainers with rollout=server
  export CKPT OUT            write a checkpoint (sharded, LoRA, or a run dir's newest) as one model folder

train, sft, rm, dpo and ppo run on several processes under torchrun: torchrun --nproc_per_node K -m grpo train ...
"""

CONF_DIR = str(Path(__file__).resolve().parent / "conf") if (Path(__file__).resolve().parent / "conf").is_dir() \
    else str(Path(__file__).resolve().parent.parent / "conf")


def _user_errors():
    from grpo.parts.config import ConfigError, UserError
    from grpo.parts.modeling import ModelError
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
            if close == [leaf]:  # the key is there: a mapping value is merged into it and cannot add keys
                return (f"{key}: a mapping merges into the existing {key} and cannot add keys to it; set them "
                        f"one by one ({key}.<name>=...) or replace it whole: ~{key} +{given}")
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

    from grpo.parts import checkpoint, distributed, logs, runlock
    from grpo.parts.rollout.remote import RolloutServerError

    _check_overrides(config_name, argv)
    result = {"rc": 0, "locked": None}
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
            if trains and runlock.hold(run_dir):  # one writer: a second start is refused, naming the first
                result["locked"] = run_dir
            if trains and not checkpoint.resuming(plain["trainer"]["resume"]) and checkpoint.holds_run(run_dir):
                raise checkpoint.refusal(run_dir)  # before anything in that run is touched
            # The record of what ran: config.yaml for a new or resumed run; another command run in an
            # existing run dir (grpo eval there, say) keeps the run's record and writes its own.
            prefix = "" if fresh or trains else f"{config_name}_"
            if main_rank:
                logs.write_record(run_dir, prefix, OmegaConf.to_yaml(cfg), argv)
            with logs.command_output(run_dir, config_name if main_rank else f"{config_name}.rank{distributed.rank()}"):
                fn(plain, run_dir)
        except checkpoint.Stopped as e:  # preempted: the step finished and saved, one line, status 0
            if main_rank:
                print(f"grpo {config_name}: {e}", flush=True)
        except (checkpoint.SaveError, runlock.RunDirBusy, RolloutServerError) as e:
            # a full disk, a read-only file system, no rollout server left (status 1); the run dir is
            # another run's, touch nothing in it (status 2): every rank stops, one line says why (a
            # rollout server's fault on every rank: each rank's servers are its own view)
            if main_rank or isinstance(e, RolloutServerError):
                tag = "" if main_rank else f" (rank {distributed.rank()})"
                print(f"grpo {config_name}: error{tag}: {e}", file=sys.stderr, flush=True)
            result["rc"] = 2 if isinstance(e, runlock.RunDirBusy) else 1
        except _user_errors() as e:
            tag = "" if main_rank else f" (rank {distributed.rank()})"
            print(f"grpo {config_name}: error{tag}: {e}", file=sys.stderr)
            result["rc"] = 2
            if fresh:  # each rank after its own writes: the last one leaves nothing behind
                checkpoint.remove_if_empty_run(run_dir)
        except BaseException as e:
            if fresh:
                checkpoint.remove_if_empty_run(run_dir)
            if not (distributed.world() > 1 and distributed.collective_timed_out(e)):
                raise
            # a rank went silent (the SilentRanks line before this one names it): one line per rank
            why = str(e).strip().splitlines()[0]
            print(f"grpo {config_name}: error (rank {distributed.rank()}): a collective gave up waiting for the other "
                  f"ranks after parallel.collective_timeout_s: {why}", file=sys.stderr, flush=True)
            result["rc"] = 1

    saved = sys.argv
    sys.argv = [f"grpo {config_name}"] + argv + _HYDRA_OWN
    try:
        job()
    finally:
        sys.argv = saved
        if result["locked"] is not None:
            runlock.release(result["locked"])
        distributed.close()
    return result["rc"]


# The commands whose config Hydra composes: name -> (module, function(plain config, run dir)).
HYDRA_COMMANDS = {
    "train": ("grpo.commands.train", "train"), "sft": ("grpo.commands.sft", "run_sft"),
    "eval": ("grpo.commands.eval", "run_eval"), "rm": ("grpo.commands.rm", "run_rm"),
    "ppo": ("grpo.commands.ppo", "run_ppo"), "dpo": ("grpo.commands.dpo", "run_dpo"),
    "bon": ("grpo.commands.bon", "run_bon"),
}
# The others parse their own arguments: name -> (module, function(argv) -> exit status).
ARGV_COMMANDS = {
    "prefs": ("grpo.commands.prefs", "prefs_main"), "compare": ("grpo.commands.compare", "compare_main"),
    "verify": ("grpo.commands.verify", "verify_main"), "verifiers": ("grpo.commands.verify", "verifiers_main"),
    "sandbox": ("grpo.commands.sandbox", "sandbox_main"), "export": ("grpo.commands.export", "export_main"),
    "rollout": ("grpo.commands.rollout", "rollout_main"),
}


def _load(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def _run_command(cmd: str, argv: list[str]) -> int:
    if cmd in HYDRA_COMMANDS:
        return _hydra_job(cmd, lambda cfg, run_dir: _load(*HYDRA_COMMANDS[cmd])(cfg, run_dir), argv)
    return _load(*ARGV_COMMANDS[cmd])(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-v", "--verbose"):  # grpo -v <command>: library output on the terminal too
        from grpo.parts import logs

        logs.VERBOSE, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0)
    cmd, rest = argv[0], argv[1:]
    if cmd not in HYDRA_COMMANDS and cmd not in ARGV_COMMANDS:
        print(f"grpo: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    try:
        rc = _run_command(cmd, rest)
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
