"""Weighted rewards from several verifiers, with each verifier's failures kept to its samples.

    reward_i = clip(sum_k weight_k * reward_k_i, 0, 1)

Weights are any finite numbers: a negative weight is a penalty, a zero weight runs the verifier
for its metrics only. The clip keeps the total a reward in [0, 1] whatever the weights sum to.
Each entry is known by a label: `label` if given, else the `name` it was asked for, else the
verifier's own `name`. Labels must be distinct (two `format` entries with different arguments
need a `label` each); they name the metrics `reward/<label>/mean` (the verifier's own mean reward,
before weighting), `verifier/<label>/errors` (samples that got 0 because of an error) and
`time/verifier/<label>`, and the key of the verifier's info in each sample's infos.

Isolation. A sample gets 0 and counts as an error when its verifier
- raises: the batch is retried one sample at a time, so only the samples that raise get 0;
- returns something that is not a finite reward in [0, 1] for it (the other samples keep theirs);
- runs past `timeout` seconds on the batch: every sample without a result by then gets 0;
- is still busy with an earlier call that timed out: every sample gets 0 until that call returns.
The first error of each kind per verifier is logged once, with its traceback (for a timeout: the
stack of the call that hung). `fail_fast=True` raises VerifierError at the first error instead.

How time limits work, and their limits. Each verifier gets one daemon worker thread and is always
called there, one call at a time; the caller waits on the result up to the deadline. Python cannot
kill a thread, so a call past its deadline is abandoned, not stopped: it keeps its thread, its CPU
and its memory, its late results are discarded, and the verifier is refused (its samples get 0)
until it returns, so a hung verifier never runs twice at once and never piles up threads. A
verifier stuck forever stays refused for the rest of the run; the daemon thread does not block
exit. A verifier that runs untrusted or unbounded work should bound it itself in a child process
it can kill (as `math` and `code` do). Async verifiers (`async def ascore`) run on one event loop
per verifier in that worker thread, under asyncio.wait_for, so a coroutine that awaits is
cancelled cleanly at the deadline; one that blocks the loop is abandoned like a sync call.
Different verifiers run concurrently, each in its own thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from grpo.verifiers.base import Score, VerifierOutputError, check_batch, check_score, has_score_method, is_async
from grpo.verifiers.registry import VerifierConfigError, build_verifier, spec_parts

log = logging.getLogger(__name__)

LABEL_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
ASYNC_GRACE = 1.0  # seconds past the deadline for a cancelled coroutine to unwind before abandoning it


class VerifierError(RuntimeError):
    """Raised under fail_fast at a verifier's first error; names the verifier."""


class VerifierTimeout(TimeoutError):
    """A verifier call ran past its deadline (used in logs and, under fail_fast, raised)."""


class VerifierBusy(VerifierTimeout):
    """A verifier was called while an earlier, timed-out call of it was still running."""


def _kind(exc: BaseException) -> str:
    if isinstance(exc, VerifierOutputError):
        return "bad output"
    if isinstance(exc, VerifierBusy):
        return "busy"
    if isinstance(exc, VerifierTimeout):
        return "timeout"
    return f"raised {type(exc).__name__}"


class _Call:
    """One verifier call on one batch: the worker fills results in, the caller reads them.

    After the deadline the caller closes it; an abandoned worker's late writes are then dropped.
    """

    def __init__(self, n: int):
        self.lock = threading.Lock()
        self.scores: list[Score | None] = [None] * n
        self.errors: dict[int, str] = {}
        self.events: list[tuple[str, BaseException, str]] = []  # (kind, exception, traceback text)
        self.closed = False
        self.started = time.monotonic()
        self.ended: float | None = None  # set by the worker when the call returns

    def put(self, i: int, score: Score) -> None:
        with self.lock:
            if not self.closed and i not in self.errors:
                self.scores[i] = score

    def fail(self, i: int, exc: BaseException, tb: str | None = None) -> None:
        with self.lock:
            if self.closed:
                return
            self.events.append((_kind(exc), exc, tb if tb is not None else "".join(traceback.format_exception(exc))))
            if i >= 0 and self.scores[i] is None:
                self.errors[i] = f"{_kind(exc)}: {exc}"[:500]

    def event(self, exc: BaseException) -> None:
        self.fail(-1, exc)


def _score_sync(v: Any, label: str, call: _Call, completions: list[str], samples: list[Mapping], fail_fast: bool):
    n = len(completions)
    try:
        out = check_batch(label, v.score(completions, samples), n)
    except Exception as e:  # noqa: BLE001 - a verifier must never end the run
        call.event(e)
        if fail_fast:
            return
        for i in range(n):  # retry one sample at a time: only the samples that fail get 0
            if call.closed:
                return
            try:
                call.put(i, check_score(label, check_batch(label, v.score([completions[i]], [samples[i]]), 1)[0], i))
            except Exception as e1:  # noqa: BLE001
                call.fail(i, e1)
        return
    _put_all(call, label, out)


def _put_all(call: _Call, label: str, out: list) -> None:
    """Record a batch's scores; a bad value costs only its own sample."""
    for i, s in enumerate(out):
        try:
            call.put(i, check_score(label, s, i))
        except VerifierOutputError as e:
            call.fail(i, e)


async def _score_async(v: Any, label: str, call: _Call, completions: list[str], samples: list[Mapping],
                       fail_fast: bool, deadline: float | None):
    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    n = len(completions)
    try:
        out = check_batch(label, await asyncio.wait_for(v.ascore(completions, samples), left()), n)
    except Exception as e:  # noqa: BLE001
        if deadline is not None and time.monotonic() >= deadline:
            return  # the caller reports the timeout for every sample without a result
        call.event(e)
        if fail_fast:
            return

        async def one(i: int) -> None:
            try:
                r = check_batch(label, await v.ascore([completions[i]], [samples[i]]), 1)[0]
                call.put(i, check_score(label, r, i))
            except Exception as e1:  # noqa: BLE001
                call.fail(i, e1)

        try:  # the retries run concurrently, under what is left of the deadline
            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), left())
        except asyncio.TimeoutError:  # the caller reports the samples left without a result
            pass
        return
    _put_all(call, label, out)


class _Worker:
    """The one daemon thread a verifier is called in (an event loop for async verifiers)."""

    def __init__(self, label: str, use_loop: bool):
        self.loop = asyncio.new_event_loop() if use_loop else None
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        target = self.loop.run_forever if self.loop else self._serve
        self.thread = threading.Thread(target=target, name=f"verifier-{label}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (item := self._q.get()) is not None:
            fut, fn = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((fut, fn))
        return fut

    def submit_coro(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stack(self) -> str:
        frame = sys._current_frames().get(self.thread.ident)
        return "".join(traceback.format_stack(frame)) if frame is not None else "(no stack: the thread has ended)\n"

    async def _drain(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        asyncio.get_running_loop().stop()

    def stop(self, wait: bool = True) -> None:
        if self.loop is not None:
            asyncio.run_coroutine_threadsafe(self._drain(), self.loop)
        else:
            self._q.put(None)
        if wait:
            self.thread.join(timeout=2.0)
        if self.loop is not None and not self.thread.is_alive():
            self.loop.close()


class Entry:
    """One verifier in the composition: its label, weight, the object and its worker."""

    def __init__(self, label: str, weight: float, verifier: Any):
        self.label, self.weight, self.verifier = label, weight, verifier
        self.is_async = is_async(verifier)
        self.worker: _Worker | None = None
        self.pending: concurrent.futures.Future | None = None  # a call abandoned at its deadline
        self.pending_since = 0.0
        self.seen_kinds: set[str] = set()

    def start(self, completions: list[str], samples: list[Mapping], deadline: float | None, fail_fast: bool):
        call = _Call(len(completions))
        if self.pending is not None and not self.pending.done():
            waited = time.monotonic() - self.pending_since
            exc = VerifierBusy(f"verifier {self.label!r} is still running a call that timed out {waited:.0f}s "
                               "ago; its samples get 0 until that call returns")
            call.events.append(("busy", exc, f"{exc}\n"))
            call.errors = {i: f"busy: {exc}" for i in range(len(completions))}
            call.ended = call.started
            return call, None
        self.pending = None
        if self.worker is None:
            self.worker = _Worker(self.label, self.is_async)
        if self.is_async:
            fut = self.worker.submit_coro(
                _score_async(self.verifier, self.label, call, completions, samples, fail_fast, deadline))
        else:
            fut = self.worker.submit(
                lambda: _score_sync(self.verifier, self.label, call, completions, samples, fail_fast))
        fut.add_done_callback(lambda _: setattr(call, "ended", time.monotonic()))
        return call, fut

    def finish(self, call: _Call, fut: concurrent.futures.Future | None, deadline: float | None,
               timeout: float | None) -> tuple[list[Score], int]:
        if fut is not None:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if wait is not None and self.is_async:
                wait += ASYNC_GRACE
            try:
                fut.result(timeout=wait)
            except concurrent.futures.TimeoutError:
                self.pending, self.pending_since = fut, time.monotonic()
                stack = self.worker.stack() if self.worker else ""
                with call.lock:
                    call.closed = True  # the abandoned worker's late results are dropped from here on
                self._timeout(call, timeout, stack)
            except Exception as e:  # noqa: BLE001 - a bug in the isolation itself still costs only samples
                for i in range(len(call.scores)):
                    call.fail(i, e)
            else:
                unscored = any(s is None and i not in call.errors for i, s in enumerate(call.scores))
                if self.is_async and unscored and deadline is not None and time.monotonic() >= deadline:
                    self._timeout(call, timeout, "")  # a coroutine cancelled cleanly at its deadline
        with call.lock:
            call.closed = True
            scores, errors = [], 0
            for i, s in enumerate(call.scores):
                if s is None:
                    errors += 1
                    s = Score(0.0, {"error": call.errors.get(i, "no result")})
                scores.append(s)
        return scores, errors

    def _timeout(self, call: _Call, timeout: float | None, stack: str) -> None:
        exc = VerifierTimeout(f"verifier {self.label!r} did not finish a batch of {len(call.scores)} within "
                              f"{timeout}s (verifier.timeout)")
        tb = f"{exc}\nwhere it was:\n{stack}" if stack else f"{exc}\n"
        with call.lock:
            call.events.append(("timeout", exc, tb))
            for i, s in enumerate(call.scores):
                if s is None and i not in call.errors:
                    call.errors[i] = f"timeout: {exc}"

    def report(self, call: _Call, fail_fast: bool) -> None:
        """Log the first error of each kind, or raise it under fail_fast."""
        for kind, exc, tb in call.events:
            if fail_fast:
                raise VerifierError(f"verifier {self.label!r}: {kind}: {exc} (verifier.fail_fast=true)") from exc
            if kind not in self.seen_kinds:
                self.seen_kinds.add(kind)
                log.warning("verifier %r: %s; its sample(s) get reward 0, later errors of this kind are only "
                            "counted in verifier/%s/errors:\n%s", self.label, kind, self.label, tb)

    def close(self) -> None:
        v = self.verifier
        try:
            aclose = getattr(v, "aclose", None)
            if self.is_async and self.worker and self.pending is None and asyncio.iscoroutinefunction(aclose):
                self.worker.submit_coro(aclose()).result(timeout=10)
            close = getattr(v, "close", None)
            if callable(close):
                close()
        except Exception as e:  # noqa: BLE001 - closing must not hide the run's result
            log.warning("verifier %r: close() failed: %s: %s", self.label, type(e).__name__, e)
        if self.worker is not None:  # a hung call is not waited for: its daemon thread is left behind
            self.worker.stop(wait=self.pending is None or self.pending.done())
            self.worker = None


def _entry_from_spec(spec: Any, index: int) -> Entry:
    if isinstance(spec, (str, Mapping)):
        name, target, _ = spec_parts(spec)
        weight = spec.get("weight", 1.0) if isinstance(spec, Mapping) else 1.0
        label = spec.get("label") if isinstance(spec, Mapping) else None
        v = build_verifier(spec)
    elif has_score_method(spec):  # an already-built verifier object (Python use, tests)
        name, weight, label, v = None, 1.0, None, spec
    else:
        raise VerifierConfigError(f"verifier entry {index}: {spec!r} is neither a name, a mapping nor a verifier")
    if label is None:
        own = getattr(v, "name", None)
        label = name or (own if isinstance(own, str) and own else type(v).__name__)
    label = str(label)
    if not LABEL_RE.match(label):
        raise VerifierConfigError(f"verifier entry {index}: label {label!r} may hold only letters, digits, '_', '.' "
                                  "and '-' (it names metrics)")
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight):
        raise VerifierConfigError(f"verifier {label!r}: weight {spec.get('weight')!r} is not a finite number")
    return Entry(label, weight, v)


class RewardFunction:
    """The task's verifiers as one reward: call it on (completions [N], samples [N])."""

    def __init__(self, specs: Sequence[Any], fail_fast: bool = False, timeout: float | None = 120.0):
        if not specs:
            raise VerifierConfigError("a task needs at least one verifier (task.verifiers)")
        self.fail_fast = bool(fail_fast)
        self.timeout = float(timeout) if timeout and float(timeout) > 0 else None  # None/0: no limit
        self.entries: list[Entry] = []
        try:
            for i, spec in enumerate(specs):
                e = _entry_from_spec(spec, i)
                clash = [j for j, other in enumerate(self.entries) if other.label == e.label]
                if clash:
                    raise VerifierConfigError(
                        f"task.verifiers: entries {clash[0]} and {i} are both labelled {e.label!r}; give them "
                        f"distinct labels, e.g. {{name: {e.label}, label: {e.label}_2, ...}}")
                self.entries.append(e)
        except BaseException:
            self.close()
            raise

    @property
    def labels(self) -> list[str]:
        return [e.label for e in self.entries]

    @property
    def passes(self) -> bool:
        """Whether a reward of 1 is a pass (pass@k means something): true unless every weighted
        verifier declares `passes = False` (a score, such as prefs_rule's)."""
        return any(getattr(e.verifier, "passes", True) for e in self.entries if e.weight)

    def missing_field(self, sample: Mapping) -> str | None:
        """The first field a verifier declares in ``required_fields`` that ``sample`` lacks (absent,
        null or empty), as "'answer' (verifier 'math' needs it)"; None when nothing is missing."""
        for e in self.entries:
            for name in getattr(e.verifier, "required_fields", ()):
                if sample.get(name) in (None, "", [], {}):
                    return f"{name!r} (verifier {e.label!r} needs it)"
        return None

    def __call__(self, completions: Sequence[str],
                 samples: Sequence[Mapping]) -> tuple[list[float], list[dict], dict[str, float]]:
        """Returns (rewards [N] in [0, 1], infos [N] as {label: info}, metrics)."""
        completions, samples = list(completions), list(samples)
        n = len(completions)
        if len(samples) != n:
            raise ValueError(f"{n} completions but {len(samples)} samples")
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        started = [(e, *e.start(completions, samples, deadline, self.fail_fast)) for e in self.entries]
        total = [0.0] * n
        infos: list[dict] = [{} for _ in range(n)]
        metrics: dict[str, float] = {}
        for e, call, fut in started:
            scores, errors = e.finish(call, fut, deadline, self.timeout)
            metrics[f"time/verifier/{e.label}"] = (call.ended or time.monotonic()) - call.started
            e.report(call, self.fail_fast)
            for i, s in enumerate(scores):
                total[i] += e.weight * s.reward
                infos[i][e.label] = s.info
            metrics[f"reward/{e.label}/mean"] = sum(s.reward for s in scores) / max(1, n)
            metrics[f"verifier/{e.label}/errors"] = float(errors)
        return [min(1.0, max(0.0, r)) for r in total], infos, metrics

    def warmup(self) -> None:
        """Start what the verifiers start lazily (a worker pool), without waiting for it: a trainer
        calls this at build, so its first step does not pay for the workers' imports."""
        for e in self.entries:
            warm = getattr(e.verifier, "warmup", None)
            if callable(warm):
                warm()

    def close(self) -> None:
        for e in self.entries:
            e.close()

    def __enter__(self) -> "RewardFunction":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

