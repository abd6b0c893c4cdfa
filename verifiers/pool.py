"""A small pool of worker processes with a hard time bound per task.

Why not ``multiprocessing.Pool`` or ``concurrent.futures``: neither can stop one task that hangs
(a sympy simplification of ``5^{5^{5^{5^5}}}`` never returns); the only safe way is to kill the
process running it. Here each task has its own deadline; a worker that misses it is killed with
SIGKILL, reaped, and replaced, and the rest of its work goes to the others.

Design points, each for a reason:

- Workers are plain ``subprocess`` children running ``python -c`` (not multiprocessing's spawn or
  forkserver), so they never re-import the caller's ``__main__`` (a training script without an
  ``if __name__ == "__main__"`` guard would otherwise run again in every worker) and never inherit
  the trainer's threads or CUDA state (as ``fork`` would). This works from any thread and from a
  process that was itself started with 'spawn'.
- Tasks travel in chunks (one pipe write per chunk, not per task); results come back one message
  per task, so the caller always knows which task a worker is on and when it started it.
- A target module may define ``warm()``: each worker runs it once before it says it is ready, to
  pay lazy first-use costs (math-verify builds its parsers on the first comparison: 0.4-0.8 s) at
  start, not inside a task's deadline; with ``start()`` at a trainer's build, before any step.
- The pool starts lazily on the first ``map`` and is reused; ``close()`` and an ``atexit`` hook
  stop it. Workers also watch their parent and exit if it dies, so a crashed trainer leaves no
  orphans computing a power tower forever.

Outcomes are ``(status, value)`` with status "ok" (value is the function's return value), "error"
(the function raised; value is the message), "timeout" or "crashed" (the worker died, e.g. out of
memory). ``map`` itself never raises for a task's failure.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import grpo

_ROOT = str(Path(grpo.__file__).resolve().parents[1])  # the directory that holds the grpo package
_LIVE_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


def _close_all_pools() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close()


atexit.register(_close_all_pools)


class _Worker:
    """One child process and its two pipe ends (parent reads ``rx``, writes ``tx``)."""

    def __init__(self, target: str, memory_limit_mb: int | None):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
        code = (
            "import sys; from grpo.verifiers.pool import _worker_main; "
            f"_worker_main({to_child_r}, {from_child_w}, {target!r}, {memory_limit_mb!r}, {os.getpid()})"
        )
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.tx = Connection(to_child_w, readable=False)
        self.rx = Connection(from_child_r, writable=False)
        self.ready = False
        self.chunk: deque[int] = deque()  # task ids sent and not answered yet, in order
        self.deadline = float("inf")

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()  # reap: no zombies
        for c in (self.tx, self.rx):
            try:
                c.close()
            except OSError:
                pass

    def stop(self, grace: float = 1.0) -> None:
        """Ask the worker to exit (it finishes nothing more), kill it if it does not."""
        try:
            self.tx.send(None)
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class WorkerPool:
    """``map(payloads)`` runs ``target(payload)`` (a "module:function" path) in worker processes.

    Args:
        target: importable "module:function"; it receives one payload and returns a picklable value.
        num_workers: processes to run at once.
        timeout: seconds one task may run before its worker is killed.
        memory_limit_mb: address-space limit of each worker (None: unlimited); a task that exceeds
            it fails with "error"/"crashed" instead of taking the machine's memory.
        startup_timeout: seconds a new worker may take to import the target before it is replaced.
    """

    def __init__(
        self,
        target: str,
        num_workers: int = 2,
        timeout: float = 5.0,
        memory_limit_mb: int | None = 2048,
        startup_timeout: float = 60.0,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.target = target
        self.num_workers = num_workers
        self.timeout = float(timeout)
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout = startup_timeout
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()  # one map at a time; the trainer may call from any thread
        self._closed = False
        self.stats = {"timeouts": 0, "crashes": 0, "restarts": 0}
        self._failed_starts = 0  # workers in a row that died before saying "ready"
        _LIVE_POOLS.add(self)

    # -- lifecycle -----------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        w = _Worker(self.target, self.memory_limit_mb)
        w.deadline = time.monotonic() + self.startup_timeout
        return w

    def _ensure_started(self) -> None:
        if self._closed:
            raise RuntimeError("WorkerPool is closed")
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())

    def start(self) -> None:
        """Start the workers now (otherwise the first ``map`` does), without waiting for them."""
        with self._lock:
            self._ensure_started()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
        for w in workers:
            w.stop()

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the work ------------------------------------------------------------------------------

    def map(self, payloads: list[Any]) -> list[tuple[str, Any]]:
        with self._lock:
            self._ensure_started()
            return self._run(list(payloads))

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.stats["restarts"] += 1
        self._workers[self._workers.index(w)] = self._spawn()

    def _run(self, payloads: list[Any]) -> list[tuple[str, Any]]:
        n = len(payloads)
        results: list[tuple[str, Any] | None] = [None] * n
        pending = deque(range(n))
        done = 0
        while done < n:
            now = time.monotonic()
            # Hand out work to idle, ready workers: chunks small enough to balance the load.
            idle = [w for w in self._workers if w.ready and not w.chunk]
            for w in idle:
                if not pending:
                    break
                size = max(1, min(64, -(-len(pending) // (2 * len(self._workers)))))
                ids = [pending.popleft() for _ in range(min(size, len(pending)))]
                try:
                    w.tx.send([(i, payloads[i]) for i in ids])
                except (OSError, ValueError, pickle.PicklingError):
                    pending.extendleft(reversed(ids))
                    self.stats["crashes"] += 1
                    self._replace(w)
                    continue
                w.chunk.extend(ids)
                w.deadline = now + self.timeout
            waiting = [w for w in self._workers if w.chunk or not w.ready]
            if not waiting:  # nothing in flight and nothing to hand out cannot happen; be safe
                break
            wait_for = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            ready_conns = wait([w.rx for w in waiting], timeout=wait_for)
            by_conn = {id(w.rx): w for w in waiting}
            for conn in ready_conns:
                w = by_conn[id(conn)]
                try:
                    msg = w.rx.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is None:  # the worker died (out of memory, killed from outside, bug)
                    self.stats["crashes"] += 1
                    if not w.ready:
                        self._failed_starts += 1
                        if self._failed_starts >= 3:
                            # The target cannot even be imported: retrying forever would hang.
                            why = f"workers fail to start (exit code {w.proc.poll()}; see stderr)"
                            for j in range(n):
                                if results[j] is None:
                                    results[j] = ("crashed", why)
                            self._replace(w)
                            self._failed_starts = 0
                            return results  # type: ignore[return-value]
                    if w.chunk:
                        _fail_head(w, results, pending, "crashed", f"worker exited with code {w.proc.poll()}")
                        done += 1
                    self._replace(w)
                    continue
                if msg == "ready":
                    w.ready = True
                    self._failed_starts = 0
                    w.deadline = float("inf")
                    continue
                i, status, value = msg
                if w.chunk and w.chunk[0] == i:
                    w.chunk.popleft()
                    results[i] = (status, value)
                    done += 1
                    w.deadline = time.monotonic() + self.timeout if w.chunk else float("inf")
            now = time.monotonic()
            for w in list(self._workers):
                if (w.chunk or not w.ready) and now >= w.deadline:
                    if w.chunk:
                        self.stats["timeouts"] += 1
                        _fail_head(w, results, pending, "timeout", f"no result within {self.timeout:g} s")
                        done += 1
                    self._replace(w)
        return [r if r is not None else ("crashed", "not run") for r in results]


def _fail_head(w, results: list, pending, status: str, why: str) -> None:
    """The task a worker was on gets (status, why); the rest of its chunk goes back in the queue."""
    results[w.chunk.popleft()] = (status, why)
    pending.extendleft(reversed(w.chunk))
    w.chunk.clear()


# -- the worker side ---------------------------------------------------------------------------


def _watch_parent(parent_pid: int) -> None:
    # Exit when the parent is gone (reparented to init or a subreaper): a worker stuck in a long
    # computation would otherwise never notice that nobody wants its answer.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _worker_main(rx_fd: int, tx_fd: int, target: str, memory_limit_mb: int | None, parent_pid: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it closes us
    rx = Connection(rx_fd, writable=False)
    tx = Connection(tx_fd, readable=False)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    module, _, name = target.partition(":")
    mod = importlib.import_module(module)
    fn = getattr(mod, name)
    if memory_limit_mb:
        import resource

        limit = int(memory_limit_mb) * 1024 * 1024
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            pass  # a lower hard limit is already in force; keep it
    warm = getattr(mod, "warm", None)
    if callable(warm):
        try:
            warm()
        except Exception:  # noqa: BLE001 - a warm-up that fails costs its head start, never the worker
            pass
    tx.send("ready")
    while True:
        try:
            chunk = rx.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for i, payload in chunk:
            try:
                out = (i, "ok", fn(payload))
            except BaseException as e:  # noqa: BLE001 - report, never die on a task's error
                out = (i, "error", f"{type(e).__name__}: {str(e)[:200]}")
            try:
                tx.send(out)
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                tx.send((i, "error", f"unpicklable result: {e}"))
