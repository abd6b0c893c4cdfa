"""What a command prints, and what it keeps in its run dir.

The terminal gets the command's one progress bar, its summary and its own warnings. Everything the
libraries say (transformers, vLLM, wandb, datasets, Python warnings) goes to ``<run dir>/<command>.log``
instead, with every record of the project's own loggers. ``grpo -v <command>`` puts it all back on
the terminal, library progress bars included.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

VERBOSE = False  # set by `grpo -v`

# Loggers whose records stay off the terminal unless -v: libraries, and Python warnings (mostly
# deprecation notices from libraries).
LIBRARIES = ("transformers", "torch", "datasets", "huggingface_hub", "vllm", "wandb", "urllib3", "filelock",
             "fsspec", "httpx", "httpcore", "hydra", "matplotlib", "PIL", "asyncio", "accelerate", "peft",
             "sympy", "math_verify", "latex2sympy2", "numexpr", "py.warnings")

_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def write_record(run_dir: Path, prefix: str, config_yaml: str, overrides: list[str]) -> None:
    """``.hydra/<prefix>config.yaml`` (the composed config) and ``<prefix>overrides.yaml`` (the
    command line), where Hydra keeps them."""
    d = Path(run_dir) / ".hydra"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{prefix}config.yaml").write_text(config_yaml)
    (d / f"{prefix}overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides) or "[]\n")


def where(*items: tuple[str, object]) -> list[str]:
    """The lines of a command's summary that say where its outputs went, `label: path`, one column
    (Run.finish for the trainers: run dir, metrics, checkpoint, model; grpo bon and grpo eval: run
    dir, rows, summary)."""
    return [f"{label + ':':<13}{value}" for label, value in items]


class _BarSafeHandler(logging.StreamHandler):
    """Writes through tqdm, so a message does not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _is_library(record: logging.LogRecord) -> bool:
    return any(record.name == p or record.name.startswith(p + ".") for p in LIBRARIES)


def quiet_libraries(verbose: bool) -> None:
    """Route the libraries' own output through logging, and switch off their progress bars; the
    environment settings also reach processes they start (vLLM's engine)."""
    if not verbose:
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM logs through the root logger
        os.environ.setdefault("WANDB_SILENT", "true")  # banners and the run summary: see the log
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers.utils.logging as tlog

    tlog.disable_default_handler()  # transformers has its own stderr handler, and does not propagate
    tlog.enable_propagation()
    tlog.set_verbosity(logging.INFO if verbose else logging.WARNING)
    if verbose:
        tlog.enable_progress_bar()
    else:
        tlog.disable_progress_bar()  # "Loading weights", "Writing model shards"


@contextmanager
def command_output(run_dir: Path, command: str, verbose: bool | None = None) -> Iterator[Path]:
    """Log records go to ``run_dir/<command>.log``; the terminal gets the project's warnings only
    (everything at INFO with ``verbose``)."""
    verbose = VERBOSE if verbose is None else verbose
    quiet_libraries(verbose)
    path = Path(run_dir) / f"{command}.log"
    root = logging.getLogger()
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(_FORMAT))
    to_file.setLevel(logging.INFO)
    console = _BarSafeHandler()
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    if not verbose:
        console.addFilter(lambda r: not _is_library(r))
    saved_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(to_file)
    root.addHandler(console)
    logging.captureWarnings(True)
    try:
        yield path
    finally:
        logging.captureWarnings(False)
        root.removeHandler(console)
        root.removeHandler(to_file)
        root.setLevel(saved_level)
        to_file.close()
