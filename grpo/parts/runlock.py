"""One writer per run dir: a training command holds an OS lock on `<run dir>/.lock` while it runs.

The lock is flock(2) on an open file, so the kernel lets go of it when the process ends, however it
ends (an exception, SIGKILL, the OOM killer): a lock file left behind never blocks the next start.
The file holds the holder's PID, which a refused start names. Under torchrun rank 0 holds it for
the launch, and every rank refuses together. A process asking again for a run dir it holds already
(the CLI, then the Run it builds) is let through.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from grpo.parts.config import UserError

LOCK = ".lock"

_held: dict[str, int] = {}  # the lock file's resolved path -> its open descriptor, in this process


class RunDirBusy(UserError):
    """Another process holds the run dir (exit status 2, one line naming its PID)."""


def _holder(fd: int) -> str:
    """The PID written in the lock file by its holder (which writes it just after locking)."""
    text = ""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            break
        time.sleep(0.05)
    if not text.isdigit():
        return "an unknown process"
    pid = int(text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:  # it ended; a process it started (a forked worker) still holds the lock
        return f"pid {pid}, which has ended; a process it started still holds it"
    except PermissionError:  # alive, another user's
        pass
    return f"pid {pid}"


def acquire(run_dir: Path) -> bool:
    """Lock run_dir (created if missing) for this process. Returns True if this call took the lock
    (the caller releases it), False if this process held it already; raises RunDirBusy if another
    process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.resolve() / LOCK
    if str(path) in _held:
        return False
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirBusy(f"{run_dir} is in use by another run ({holder}): two runs in one run dir would "
                         "overwrite each other's checkpoints and metrics; wait for it to end or stop it") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[str(path)] = fd
    return True


def release(run_dir: Path) -> None:
    """Let go of run_dir's lock if this process holds it (the file stays: removing it while another
    process waits on it would let a third lock a new file beside them)."""
    fd = _held.pop(str(Path(run_dir).resolve() / LOCK), None)
    if fd is not None:
        os.close(fd)


def hold(run_dir: Path) -> bool:
    """acquire() on rank 0 of a torchrun launch (or the one process), with every rank raising
    RunDirBusy if it is refused. Called by every rank; returns whether this call took the lock."""
    from grpo.parts import distributed

    taken, refused = False, None
    if distributed.is_main():
        try:
            taken = acquire(run_dir)
        except RunDirBusy as e:
            refused = str(e)
    refused = distributed.broadcast(refused)
    if refused:
        raise RunDirBusy(refused)
    return taken
