"""The run skeleton every training loop stands on: what a run does around its algorithm.

A loop (grpo/commands/train.py, ppo.py, dpo.py, rm.py, sft.py) reads top to bottom:

    cfg = C.parse(C.PPOConfig, raw)                         # its schema
    with Run.from_config("ppo", cfg, raw, run_dir) as run:  # ranks, seed, resume, run dir
        policy = run.policy(cfg.model, reference=True)      # its own parts, built from plain values
        opt, sched = run.optimizer(policy.fwd.parameters(), cfg.optim, updates)
        run.restore({"model": (policy.model, opt)}, {"scheduler": sched})
        run.evaluate_with(...)                               # what "evaluate" means for it
        for step in run.steps():                             # the rhythm
            ... the algorithm, on step.index ...
            step.done(metrics, bar={"loss": ...})
        return run.finish(headline)                          # summary

`run.steps()` owns the rhythm: the evaluation before the first step (or, on resume, the run's past
ones from metrics.jsonl), then after each step: its metrics logged when due, an evaluation when due,
the progress bar, a checkpoint when due. The first and last evaluation feed the summary. Leaving the
`with` block, normally or by an exception, closes the tracker and every part the run built (engines,
reward sources); `finish` also writes the trained model where the loop asks for one.

Nothing here knows an algorithm, and no loop subclasses anything: the run is used, not inherited.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo.parts import checkpoint, runlock
from grpo.parts.batch import set_logprob_chunk
from grpo.parts.config import ConfigError
from grpo.parts.distributed import OnDevice, Parallel
from grpo.parts.modeling import (AdaptersOff, apply_lora, disable_dropout, is_lora, load_model, load_tokenizer,
                                 pick_device, plain_copy)
from grpo.parts.tracking import Silent, Tracker, due
from grpo.tasks.base import TaskError

log = logging.getLogger(__name__)


@dataclass
class Policy:
    """The model a loop trains and its frozen reference.

    model: the bare model (a peft model with LoRA), what checkpoints and the hf engine hold;
    fwd:   the model inside its DDP / FSDP2 wrapper: every training pass goes through it;
    ref:   the frozen reference, called like `fwd` (None without one): a copy of the starting model
           (sharded alike, or whole on the CPU with parallel.ref_on_cpu), or with LoRA the policy
           itself with its adapters off (no second copy)."""

    model: torch.nn.Module
    fwd: torch.nn.Module
    ref: torch.nn.Module | None
    save_merged: bool = False  # LoRA: checkpoints also hold merged/ (base + adapters as one model)


class Step:
    """One step of `Run.steps()`: `index` is the number of steps done before it (0-based, what a loop
    seeds its draws with); the loop ends it with `done(metrics, bar)`."""

    def __init__(self, index: int):
        self.index = index
        self.metrics: dict[str, Any] | None = None
        self.bar: dict[str, str] = {}

    def done(self, metrics: dict[str, Any], bar: dict[str, str] | None = None) -> None:
        """The step's training metrics (logged when due) and what the progress bar shows beside it."""
        self.metrics, self.bar = metrics, dict(bar or {})


class _StopRequest:
    """What asks a run to stop between steps: SIGTERM (a scheduler preempting the job: SLURM,
    Kubernetes, a spot instance; a second SIGTERM ends the process at once), and under torchrun the
    launcher's end (a rank whose parent is gone was orphaned by a SIGKILLed torchrun)."""

    def __init__(self, par):
        self.par, self.why = par, None
        self.parent = os.getppid() if par.world > 1 else None
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._term)

    def _term(self, signum, frame) -> None:
        if self.why == "SIGTERM":  # asked twice: no step to finish
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.why = "SIGTERM"

    def agreed(self) -> str | None:
        """Why this run stops now (None: it goes on), the same on every rank: one collective."""
        why = self.why
        if why is None and self.parent is not None and os.getppid() != self.parent:
            why = "the end of its launcher (torchrun)"
        causes = [None, "SIGTERM", "the end of its launcher (torchrun)"]
        code = self.par.max(causes.index(why)) if self.par.world > 1 else causes.index(why)
        if not code:
            return None
        return why or (causes[code] + (" on another rank" if code == 1 else ""))

    def close(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)


class Run:
    """One training run's housekeeping: its ranks, seed and resume, the parts it closes, the rhythm
    of its steps, its checkpoints, its metrics and its summary. Built from plain values; see
    `from_config` for the config groups every loop shares (trainer, parallel, logger, model.device)."""

    def __init__(self, command: str, run_dir: Path, raw: dict[str, Any], *, max_steps: int, seed: int, resume: Any,
                 eval_every: int = 0, save_every: int = 0, keep_checkpoints: int = 2, log_every: int = 1,
                 log_first: bool = False, strategy: str = "ddp", mixed_precision: str = "auto", device: str = "auto",
                 ref_on_cpu: bool = False, logger: Any = None, logprob_chunk: int = 0,
                 collective_timeout_s: float = 1800.0, silent_rank_warn_s: float = 60.0):
        self.command, self.run_dir, self.raw = command, Path(run_dir), raw
        self.max_steps, self.seed = max_steps, seed
        self.eval_every, self.save_every, self.keep = eval_every, save_every, keep_checkpoints
        self.log_every, self.log_first = log_every, log_first
        self.ref_on_cpu, self.logger_cfg = ref_on_cpu, logger
        self.logprob_chunk = logprob_chunk  # tokens per LM-head chunk of the models' log-probs (0 = all)
        self.par = Parallel(strategy, pick_device(device), mixed_precision)
        self.par.watch(collective_timeout_s, silent_rank_warn_s)
        self.device = self.par.device
        # One writer per run dir (an OS lock; the CLI has taken it already, for the command's whole run).
        self._locked = runlock.hold(self.run_dir)
        try:
            # Every rank seeds its own stream (rank_seed) and looks at the run dir before rank 0 writes to it.
            self.ckpt = checkpoint.begin(self.run_dir, resume, seed, self.par)
        except BaseException:
            self._unlock()
            raise
        self.step = 0
        self.progress: dict[str, Any] = {}  # loop state saved with each checkpoint (the data position ...)
        self.tok = None
        self.tracker: Tracker | Silent | None = None
        self.first_eval: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None
        self.last_checkpoint: Path | None = self.ckpt  # a resumed run with nothing left to do still names it
        self._parts: list[Any] = []
        self._models: dict[str, tuple[Any, Any]] = {}
        self._stateful: dict[str, Any] = {}
        self._policy: Policy | None = None
        self._evaluate: Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]] | None = None
        self._eval_key, self._eval_label = "eval/reward/mean", "eval"
        self._closed = False
        self._settlers: list[Callable[[], None]] = []

    @classmethod
    def from_config(cls, command: str, cfg: Any, raw: dict[str, Any], run_dir: Path, log_first: bool = False) -> Run:
        """The edge for the groups every loop shares: `trainer` (steps, seed, resume, evaluation,
        checkpoints, logging), `parallel`, `logger` and `model.device`."""
        trainer, parallel = cfg.trainer, cfg.parallel
        return cls(command, run_dir, raw, max_steps=trainer.max_steps, seed=trainer.seed, resume=trainer.resume,
                   eval_every=getattr(trainer, "eval_every", 0), save_every=trainer.save_every,
                   keep_checkpoints=trainer.keep_checkpoints, log_every=getattr(trainer, "log_every", 1),
                   log_first=log_first, strategy=parallel.strategy, mixed_precision=parallel.mixed_precision,
                   device=cfg.model.device, ref_on_cpu=parallel.ref_on_cpu, logger=cfg.logger,
                   logprob_chunk=getattr(trainer, "logprob_chunk", 0),
                   collective_timeout_s=parallel.collective_timeout_s, silent_rank_warn_s=parallel.silent_rank_warn_s)

    # ---- what the run closes -----------------------------------------------------------------
    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind, error, tb) -> None:
        try:
            self.close()
        except Exception:
            if error is None:
                raise
            log.exception("closing the run after %s", kind.__name__)  # the loop's own error is the one to see

    def own(self, *parts: Any) -> Any:
        """Parts (engines, reward sources) the run closes when it ends, each once; returns the first."""
        for part in parts:
            if part is not None and all(part is not p for p in self._parts):
                self._parts.append(part)
        return parts[0] if parts else None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.par.close()  # first: the parts' closing may take a while on one rank, and it is not silence
        failed = None
        for part in ([self.tracker] if self.tracker is not None else []) + self._parts:
            try:  # every part gets closed (an engine's processes, a verifier's workers) even if one fails
                part.close()
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others
                failed = failed or e
        # Let go of the models now: the evaluation closure refers back to the run, and a cycle would
        # keep a sharded model (and the process group it holds) alive past the group's end.
        self._evaluate, self._policy, self._models, self._stateful, self._parts = None, None, {}, {}, []
        self._unlock()
        if failed is not None:
            raise failed

    def _unlock(self) -> None:
        if self._locked:
            runlock.release(self.run_dir)
            self._locked = False

    # ---- shared parts ----------------------------------------------------------------------------
    def require(self, n: int, what: str, error: type[Exception] | None = None) -> None:
        """Every rank needs one of the n items it shares out: one line naming `what` when n is too small."""
        self.par.require(n, what, error)

    def held_out(self, task: Any, size: int) -> list[Any]:
        """The task's first `size` held-out samples, which the evaluations score."""
        samples = task.eval_samples()[:size]
        if not samples:
            raise TaskError("the task holds out no samples for evaluation")
        self.require(len(samples), f"the task holds out {len(samples)} samples for evaluation", TaskError)
        return samples

    def tokenizer(self, path: str):
        """The tokenizer of the model at `path`; checkpoints and the final model are saved with it."""
        self.tok = load_tokenizer(path)
        return self.tok

    @property
    def frozen_device(self) -> str:
        """Where the frozen scorers live (reference, reward model): the CPU with parallel.ref_on_cpu."""
        return "cpu" if self.ref_on_cpu else self.device

    def policy(self, model: Any, reference: bool, keep_dropout: bool = False) -> Policy:
        """The policy from `model` (a ModelConfig: path, dtype, gradient checkpointing, LoRA), loaded
        from the checkpoint a resumed run continues, and with `reference` a frozen copy of the starting
        model. Dropout is off (the engine samples without it) unless `keep_dropout` (grpo sft)."""
        lora = model.lora
        if lora.r and self.par.sharded:
            raise ConfigError("model.lora with parallel=fsdp2 is not supported yet: use parallel=ddp")
        # A one-process checkpoint holds the policy as a model folder (its adapters with LoRA); a
        # sharded one is loaded into the wrapped model by `restore`.
        whole = checkpoint.has_folders(self.ckpt)
        policy = load_model(checkpoint.model_source(self.ckpt if not lora.r else None, model.path), model.dtype,
                            model.gradient_checkpointing, self.device)
        if not keep_dropout:
            disable_dropout(policy)  # the base model's; LoRA's own dropout is model.lora.dropout
        policy = apply_lora(policy, lora.r, lora.alpha, lora.dropout, lora.target_modules,
                            adapter=str(self.ckpt / "model") if whole and lora.r else None)
        policy.train()
        set_logprob_chunk(policy, self.logprob_chunk)
        if lora.r and lora.save_merged and self.par.world > 1:
            log.warning("model.lora.save_merged: a run on several processes writes sharded checkpoints, with no "
                        "merged/ folder: `grpo export CKPT OUT` writes the merged model")
        ref = None
        if reference and not lora.r:
            ref = load_model(model.path, model.dtype, device=self.frozen_device)
            ref.eval().requires_grad_(False)
            set_logprob_chunk(ref, self.logprob_chunk)
        fwd = self.par.wrap(policy)  # every pass goes through the wrapper, where DDP and FSDP2 hook in
        if reference and lora.r:
            ref = AdaptersOff(fwd, policy)
        elif ref is not None:
            ref = OnDevice(ref, "cpu", self.device) if self.ref_on_cpu else self.par.wrap(ref, trainable=False)
        self._policy = Policy(policy, fwd, ref, bool(lora.r and lora.save_merged))
        return self._policy

    def optimizer(self, params: Iterable[torch.nn.Parameter], optim: Any, updates: int, lr: float | None = None):
        """The optimizer and learning-rate schedule of `optim` (an OptimConfig) over `updates` optimizer
        steps in all (the schedule, its warm-up included, counts optimizer steps)."""
        from grpo.parts.optim import build_optimizer, build_scheduler

        opt = build_optimizer(params, optim.lr if lr is None else lr, optim.betas, optim.weight_decay, optim.name)
        return opt, build_scheduler(opt, optim.schedule, optim.warmup_steps, updates, optim.min_lr_rate)

    def engine(self, rollout: Any, policy: Policy, model: Any, prompts: Callable[[], list], system_prompt: str | None,
               env: Any = None):
        """The rollout engine of `rollout` (a RolloutConfig) on the policy; the run closes it. With a
        task's multi-turn environment (`env`, the task.env spec; grpo/envs), the engine holds
        conversations with it (grpo/parts/rollout/multiturn.py)."""
        import dataclasses

        from grpo.parts.modeling import eos_ids
        from grpo.parts.rollout import build_engine_from
        from grpo.parts.rollout.multiturn import context_tokens, environment, with_env

        environ, caps = environment(env)
        # vLLM sizes its context for whole conversations, their prompts rendered with the tools
        sized = dataclasses.replace(rollout, max_new_tokens=context_tokens(environ, caps, rollout.max_new_tokens))
        engine = self.own(build_engine_from(sized, policy.model, self.tok, model.path, model.dtype, model.device,
                                            prompts, system_prompt, self.par, policy.fwd,
                                            tools=getattr(environ, "tools", None)))
        return self.own(with_env(engine, environ, caps, self.tok, eos_ids(self.tok, policy.model), system_prompt))

    def rewards(self, task: dict[str, Any], verifier: Any, reward_model: Any = None, model: Any = None):
        """(training reward, the task's verifiers, the reward model) from the task's verifiers and the
        `reward_model` group (None: no reward model) for the policy `model` (grpo/parts/reward_sources.py);
        the run closes them."""
        from grpo.parts.reward_sources import build_rewards_from

        parts = build_rewards_from(task, verifier, reward_model, self.tok, self.frozen_device,
                                   model.dtype if model else "float32", model.path if model else None)
        self.own(*parts)
        # The verifiers' workers start now, beside the model's loading, so the first steps that need
        # them do not wait (GRPO_VERIFIER_WARMUP=0 leaves them to their first use: the test suite).
        if parts[1] is not None and os.environ.get("GRPO_VERIFIER_WARMUP", "1") != "0":
            parts[1].warmup()
        return parts

    # ---- checkpoints -----------------------------------------------------------------------------
    def restore(self, models: Mapping[str, tuple[Any, Any]], stateful: Mapping[str, Any] | None = None,
                progress: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What every checkpoint of this run holds: `models` (name -> (model, optimizer); "model" is the
        one trained), `stateful` (name -> an object with state_dict / load_state_dict) and `progress`
        (name -> a plain value the loop keeps, with its starting value). A resumed run gets them back
        from its checkpoint, at any process count; then the tracker opens (a resumed run's metrics.jsonl
        drops what came after the checkpoint). Returns the progress dict, which the loop updates."""
        self._models, self._stateful = dict(models), dict(stateful or {})
        self.progress = dict(progress or {})
        if self.ckpt:
            state = checkpoint.restore_run(self.ckpt, self.par, self._models, self._stateful, self.seed)
            self.step = state["step"]
            self.progress.update({k: state[k] for k in self.progress if k in state})
            log.info("resumed from %s at step %d", self.ckpt, self.step)
        self.tracker = (Tracker(self.logger_cfg, self.run_dir, self.raw, self.step if self.ckpt else None,
                                self.max_steps, self.command) if self.par.main else Silent())
        return self.progress

    def settle_with(self, fn: Callable[[], None]) -> None:
        """fn() runs before every checkpoint and every evaluation: to settle what a checkpoint must hold
        and what must not run beside an evaluation (rollouts still in flight, their scoring)."""
        self._settlers.append(fn)

    def save(self) -> Path:
        """A checkpoint of everything `restore` named, at the current step (called by every rank)."""
        for fn in self._settlers:
            fn()
        policy = self._policy
        merged = policy is not None and policy.save_merged and self.par.world == 1 and is_lora(policy.model)
        self.par.doing = f"the checkpoint of step {self.step}"
        self.last_checkpoint = checkpoint.save_run(
            self.run_dir, self.step, self.par, self._models, self.tok, self._stateful, self.progress, self.keep,
            {"merged": plain_copy(policy.model)} if merged else None)
        return self.last_checkpoint

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate_with(self, fn: Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]], key: str = "eval/reward/mean",
                      label: str = "eval") -> None:
        """The loop's evaluation: fn() -> (metrics, sample rows), run before the first step and when
        due; `key` is the metric the bar shows (as `label`) and the summary compares first to last."""
        self._evaluate, self._eval_key, self._eval_label = fn, key, label

    def evaluate(self) -> dict[str, Any]:
        if self._evaluate is None:
            return {}
        for fn in self._settlers:
            fn()
        t0 = time.time()
        self.par.doing = f"the evaluation after step {self.step}"
        metrics, table = self._evaluate()
        if metrics:
            metrics["time/eval"] = time.time() - t0
            self.tracker.log(metrics, self.step)
        self.tracker.log_samples(table, self.step)
        self.last_eval = metrics
        self.first_eval = self.first_eval or metrics
        return metrics

    def evaluate_policy(self, engine, policy: Policy, eval_set: list, rollout: Any, system_prompt: str | None,
                        verifiers, reward_model=None, kl_batch_size: int = 256, log_samples: int = 0) -> None:
        """The evaluation of the RL and preference loops (grpo/parts/evaluation.py, policy_eval): one
        sampled and one greedy completion per held-out prompt, scored by the task's verifiers, with
        the reward model's score and the KL from the reference where there are ones."""
        from grpo.parts.evaluation import policy_eval
        from grpo.parts.rollout import encode_prompts, sampling_params, tools_of

        prompts = encode_prompts(self.tok, eval_set, system_prompt, tools_of(engine))
        sampling, greedy = sampling_params(rollout), sampling_params(rollout, greedy=True)

        def fn():
            policy.model.eval()
            try:
                return policy_eval(engine, prompts, eval_set, sampling, greedy, verifiers, reward_model,
                                   seed=self.seed + 1_000_003 * (self.step + 1), log_samples=log_samples,
                                   kl_models=(policy.fwd, policy.ref) if policy.ref is not None else None,
                                   pad_id=self.tok.pad_token_id, kl_batch_size=kl_batch_size, par=self.par)
            finally:
                policy.model.train()

        self.evaluate_with(fn)

    # ---- the rhythm ------------------------------------------------------------------------------
    def steps(self) -> Iterator[Step]:
        """The steps from where the run stands to trainer.max_steps. Before the first: the first
        evaluation (a resumed run reads its past ones instead). After each: its metrics logged
        (every `log_every` steps, the first with `log_first`, and the last), an evaluation when due,
        the bar, a checkpoint when due. Evaluations and checkpoints fall every eval_every /
        save_every steps (0 = never) and always after the last step."""
        if self.tracker is None:
            raise RuntimeError("Run.restore(...) names what the checkpoints hold; call it before Run.steps()")
        if self.ckpt:
            self.first_eval, self.last_eval = self.tracker.past_evals(self._eval_key)
        else:
            self.evaluate()
        t0 = time.time()
        stop = _StopRequest(self.par)  # SIGTERM, or the launcher gone: save after the step and stop
        try:
            while self.step < self.max_steps:
                step = Step(self.step)
                self.par.doing = f"step {self.step + 1}"
                yield step
                if step.metrics is None:
                    raise RuntimeError(f"{self.command}: a step ended without step.done(metrics)")
                self.step += 1
                why = stop.agreed()  # every rank, after every step: they stop together
                if (self.log_every <= 1 or due(self.step, self.log_every, self.max_steps)
                        or (self.log_first and self.step == 1) or why):
                    self.tracker.log({**step.metrics, "time/elapsed": time.time() - t0}, self.step)
                if due(self.step, self.eval_every, self.max_steps) and not why:  # no time for it
                    self.evaluate()
                bar = dict(step.bar)
                if self.last_eval and self._eval_key in self.last_eval:
                    bar[self._eval_label] = f"{self.last_eval[self._eval_key]:.3f}"
                self.tracker.advance(bar)
                if due(self.step, self.save_every, self.max_steps) or why:
                    self.save()
                if why and self.step < self.max_steps:
                    raise checkpoint.Stopped(
                        f"stopped by {why} after step {self.step} of {self.max_steps}; checkpoint: "
                        f"{self.last_checkpoint}; continue with trainer.resume=true hydra.run.dir={self.run_dir}")
        finally:
            stop.close()

    def log(self, metrics: dict[str, Any]) -> None:
        """Metrics at the current step, outside the rhythm (a loop's closing figures)."""
        self.tracker.log(metrics, self.step)

    # ---- the end ---------------------------------------------------------------------------------
    def finish(self, headline: Callable[[dict[str, Any], dict[str, Any]], list[str]] | None = None,
               model: torch.nn.Module | None = None, **extra: Any) -> dict[str, Any]:
        """With `model`, write it as one Hugging Face folder, <run dir>/model (LoRA's adapters merged
        in); close the run; print the summary on rank 0: where everything is, and `headline(first,
        last)` (the loop's figures from its first and last evaluation, when there are both). Every
        rank calls it; returns the summary."""
        out = None
        if model is not None:  # first: every rank takes part, whatever closing does after
            out = checkpoint.save_final(self.par, plain_copy(model) if is_lora(model) else model, self.tok,
                                        self.run_dir / "model")
        self.close()
        summary = {"run_dir": str(self.run_dir), "metrics": str(self.run_dir / "metrics.jsonl"),
                   "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                   "model": str(out) if out else None, "steps": self.step,
                   "first_eval": self.first_eval, "last_eval": self.last_eval, **extra}
        if self.par.main:
            from grpo.parts.logs import where

            lines = ["", f"done after {self.step} steps", *where(
                ("run dir", summary["run_dir"]), ("metrics", summary["metrics"]), ("checkpoint", summary["checkpoint"]),
                *([("model", out)] if out else []))]
            if headline and self.first_eval and self.last_eval:
                lines += headline(self.first_eval, self.last_eval)
            print("\n".join(lines))
        return summary

