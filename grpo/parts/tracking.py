"""Metrics: `metrics.jsonl` in every run dir, and wandb on top when asked for.

Each line of metrics.jsonl is one JSON object with `step`; training records carry `reward/mean`,
`loss`, `kl`, `time/step` ...; evaluation records carry `eval/reward/mean` ...
"""

from __future__ import annotations

import json
import math
import netrc
import os
import uuid
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


class JsonlLogger:
    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop records past the checkpoint (the resumed run writes those steps again) and a
            # line torn by a kill.
            keep = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) is not None and _step_of(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self._f = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._f.write(json.dumps({"step": step, **{k: _clean(v) for k, v in metrics.items()}}) + "\n")
        self._f.flush()

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        pass

    def close(self) -> None:
        self._f.close()


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger(JsonlLogger):
    def __init__(self, run_dir: Path, config: dict[str, Any], project: str = "grpo", entity: str | None = None,
                 name: str | None = None, tags: list[str] | None = None, mode: str = "auto",
                 resume_step: int | None = None, **_: Any):
        super().__init__(run_dir, resume_step)
        import wandb

        if mode == "auto":
            mode = "online" if _has_wandb_key() else "offline"
        self.mode = mode
        id_file = Path(run_dir) / ".wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(project=project, entity=entity, name=name or Path(run_dir).name, tags=tags or [],
                              config=config, dir=str(run_dir), mode=mode, id=run_id, resume="allow")
        self._wandb = wandb

    def log(self, metrics: dict[str, Any], step: int) -> None:
        super().log(metrics, step)
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if rows:
            cols = list(rows[0])
            table = self._wandb.Table(columns=["step", *cols], data=[[step, *[r[c] for c in cols]] for r in rows])
            self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        super().close()
        self.run.finish()


def build_logger(backend: str, run_dir: Path, full_config: dict[str, Any], resume_step: int | None,
                 **wandb_opts: Any):
    if backend == "jsonl":
        return JsonlLogger(run_dir, resume_step)
    if backend == "wandb":
        return WandbLogger(run_dir, full_config, resume_step=resume_step, **wandb_opts)
    raise ValueError(f"logger.backend must be wandb or jsonl, got {backend!r}")


class Tracker:
    """What every command reports through: metrics.jsonl (+ wandb) and one progress bar.

    `resume_step` is the step of the checkpoint a run resumes from (None for a fresh run): the
    log drops what came after it and the bar starts there.
    """

    def __init__(self, logger_cfg, run_dir: Path, full_config: dict[str, Any], resume_step: int | None,
                 total: int, desc: str):
        from tqdm.auto import tqdm

        opts = {k: v for k, v in vars(logger_cfg).items() if k != "backend"}
        self.logger = build_logger(logger_cfg.backend, run_dir, full_config, resume_step, **opts)
        self.bar = tqdm(total=total, initial=resume_step or 0, desc=desc, unit="step", dynamic_ncols=True)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.logger.log(metrics, step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self.logger.log_samples(rows, step)

    def past_evals(self, key: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The first and the last record holding `key` already in metrics.jsonl: a resumed run's
        evaluations from before it stopped, so that its summary starts from the run's first one."""
        found = [r for r in read_metrics(self.logger.path) if key in r]
        return (found[0], found[-1]) if found else (None, None)

    def advance(self, postfix: dict[str, str]) -> None:
        """One step done: move the bar and show `postfix` (e.g. reward, eval) beside it."""
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


class Silent:
    """The Tracker of ranks other than 0 under torchrun: rank 0 alone writes metrics, wandb and the bar."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        pass

    def past_evals(self, key: str) -> tuple[None, None]:
        return None, None

    def advance(self, postfix: dict[str, str]) -> None:
        pass

    def close(self) -> None:
        pass


def due(step: int, every: int, max_steps: int) -> bool:
    """Whether a periodic event (evaluation, checkpoint) falls on `step`: every `every` steps
    (0 = never) and always after the last step."""
    return bool(every and step % every == 0) or step == max_steps
