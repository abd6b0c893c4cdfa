"""Starts the sandboxes' ``bwrap`` processes from a helper that reaps everything below them.

Why a helper
------------
``bwrap --unshare-pid`` runs as two host processes: the outer bwrap (our child) and, below it,
the sandbox's init (PID 1 of the new PID namespace), which waits for the program. When the
program exits, the init writes its status to the outer bwrap and then waits for the sandbox's
other processes; the outer bwrap exits as soon as it has that status, *without waiting for its
init*. The init (killed at once by ``--die-with-parent``) is then an orphan, re-parented to the
nearest subreaper or to PID 1, and stays a ``[bwrap] <defunct>`` zombie until that process reaps
it. The same happens when we SIGKILL the outer bwrap at a deadline. So every run left one zombie
to PID 1: harmless where PID 1 is a real init, but a trainer that *is* PID 1 (``docker run``
without ``--init``) never reaps them, and at ~100 runs/s the PID table fills. (Processes inside
the sandbox never escape: when the init dies the kernel kills and reaps its whole namespace.)

Making the trainer itself a subreaper (``PR_SET_CHILD_SUBREAPER``) would bring those inits to it,
but the flag is process-wide: every orphan of every other subprocess tree of the trainer would
be re-parented to it as well, and the trainer cannot reap those with ``waitpid(-1)`` without
stealing the exit status of children that other code (``subprocess``, multiprocessing, C
libraries) waits for. A reaper process per run would keep that isolation but costs a Python
start (~10 ms of CPU) on every run, about half the cost of a run itself (this helper costs
under 1 ms of CPU per run).

So one small helper process per host process (started on the first run, stdlib only) does it:

* it is a subreaper, and its only children are the outer bwraps it starts, so it may, and does,
  reap with ``waitpid(-1)``: the outer bwraps (whose exit status it sends back) and every init
  re-parented to it. Nothing of a sandbox is ever re-parented to the trainer or to PID 1. It
  SIGKILLs each adopted init (``--die-with-parent`` normally has, but an outer bwrap killed during
  its setup leaves its child blocked for good, before it armed that), and sends a run's status
  only once the inits adopted with it are reaped too: when ``Sandbox.run`` returns, nothing of
  the run is left, not even a zombie;
* the trainer sends it the argv and the descriptors of a run (stdin, the output pipes, the
  memfds of ``--ro-bind-data``, ...) over a Unix socket (``SCM_RIGHTS``) plus one socket per run;
  the helper maps them onto the same descriptor numbers in the new process (``posix_spawn``), so
  the argv is unchanged. On that per-run socket it answers the pid, then the wait status; a
  ``k`` from the trainer, or the trainer closing the socket, SIGKILLs that run's outer bwrap
  (the init follows by ``--die-with-parent``, the rest of the sandbox with its namespace);
* it dies with the trainer: on end of file on its socket, on ``SIGTERM``, and through
  ``PR_SET_PDEATHSIG`` (armed by a thread of the trainer that lives as long as the helper, so a
  worker thread that happened to start the helper can exit) it SIGKILLs the runs still going,
  reaps them and exits. It runs in its own session, so a Ctrl-C on the terminal reaches only the
  trainer, which decides.

The helper runs this file as a script under the trainer's interpreter (``-I -S``: no site, no
environment, no current directory on the path).
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import subprocess
import sys
import threading

__all__ = ["Child", "SpawnError", "spawn", "helper_pid", "shutdown"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_MAX_FDS = 250  # SCM_RIGHTS carries at most 253 descriptors per message


class SpawnError(OSError):
    """The helper could not start the process (or is not running)."""


class Child:
    """A process started by the helper. ``wait`` returns its raw wait status."""

    def __init__(self, conn: socket.socket, pid: int):
        self.conn = conn
        self.pid = pid
        self.status: int | None = None
        self._lock = threading.Lock()

    def kill(self) -> None:
        """SIGKILL the process (a no-op once it has been reaped)."""
        try:
            self.conn.send(b"k")
        except OSError:
            pass

    def wait(self, timeout: float | None = None) -> int | None:
        """The wait status once the helper has reaped the process; None if the helper died first.
        Raises TimeoutError after ``timeout`` seconds."""
        with self._lock:
            if self.status is not None or self.conn.fileno() < 0:
                return self.status
            self.conn.settimeout(timeout)
            try:
                msg = self.conn.recv(64)
            except (TimeoutError, BlockingIOError):  # BlockingIOError: timeout 0
                raise TimeoutError(f"process {self.pid} still running") from None
            except OSError:
                msg = b""
            if msg.startswith(b"x"):
                self.status = int(msg[1:])
            self.conn.close()
            return self.status

    def close(self) -> None:
        """Forget the process; the helper SIGKILLs it if it still runs."""
        self.conn.close()


class _Helper:
    def __init__(self) -> None:
        self.owner = os.getpid()
        self.dead = False
        self.proc: subprocess.Popen | None = None
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        started = threading.Event()
        error: list[BaseException] = []

        def keeper() -> None:
            # The helper's PR_SET_PDEATHSIG fires when the *thread* that started it exits: start it
            # from this thread, which lives as long as the helper does and then reaps it.
            try:
                self.proc = subprocess.Popen(
                    [_python(), "-I", "-S", os.path.abspath(__file__), str(theirs.fileno()), str(self.owner)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                    env={}, start_new_session=True)
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                error.append(e)
                self.dead = True
                return
            finally:
                theirs.close()
                started.set()
            self.proc.wait()
            self.dead = True

        threading.Thread(target=keeper, name="grpo-sandbox-reaper", daemon=True).start()
        started.wait()
        if error:
            self.sock.close()
            raise SpawnError(f"cannot start the sandbox helper: {error[0]}")
        self.sock.settimeout(60)
        try:
            hello = self.sock.recv(4096)
        except OSError as e:
            hello = f"e{e}".encode()
        finally:
            self.sock.settimeout(None)
        if hello != b"ok":
            self.close()
            raise SpawnError("cannot start the sandbox helper: " + (hello[1:].decode(errors="replace") or "it exited"))

    def spawn(self, argv: list[str], fds: dict[int, int]) -> Child:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            targets = sorted(fds)
            msg = json.dumps({"argv": argv, "fds": targets}).encode()
            socket.send_fds(self.sock, [msg], [theirs.fileno()] + [fds[t] for t in targets])
        except OSError as e:
            mine.close()
            if isinstance(e, ConnectionError) or e.errno in (errno.EBADF, errno.ENOTCONN):
                self.dead = True
                raise SpawnError(f"the sandbox helper is gone: {e}") from e
            raise SpawnError(f"cannot send the run to the sandbox helper: {e}") from e
        finally:
            theirs.close()
        try:
            reply = mine.recv(4096)
        except OSError:
            reply = b""
        if reply.startswith(b"p"):
            return Child(mine, int(reply[1:]))
        mine.close()
        if not reply:
            self.dead = True
            raise SpawnError("the sandbox helper is gone")
        raise SpawnError(reply[1:].decode(errors="replace"))

    def close(self, timeout: float = 10.0) -> None:
        """Make the helper kill what still runs, reap it and exit; wait for it."""
        self.dead = True
        self.sock.close()
        if self.proc is not None and self.owner == os.getpid():
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_helper: _Helper | None = None
_helper_lock = threading.Lock()


def _python() -> str:
    exe = sys.executable
    if exe and os.access(exe, os.X_OK):
        return exe
    import shutil

    found = shutil.which("python3")
    if not found:
        raise SpawnError("no Python interpreter to run the sandbox helper with")
    return found


def _get() -> _Helper:
    global _helper
    with _helper_lock:
        h = _helper
        if h is None or h.dead or h.owner != os.getpid():  # a forked child starts its own helper
            if h is not None and h.owner == os.getpid():
                h.close(timeout=0.1)
            _helper = h = _Helper()
        return h


def spawn(argv: list[str], fds: dict[int, int]) -> Child:
    """Start ``argv`` (argv[0] an absolute path) from the helper, with an empty environment and
    exactly the descriptors of ``fds`` (number in the child -> descriptor here; 0, 1 and 2
    required). Raises SpawnError when the helper or the exec fails."""
    if not {0, 1, 2} <= set(fds):
        raise ValueError("stdin, stdout and stderr are required")
    if len(fds) > _MAX_FDS:
        raise SpawnError(f"too many descriptors for one process ({len(fds)} > {_MAX_FDS})")
    h = _get()
    try:
        return h.spawn(argv, fds)
    except SpawnError:
        if not h.dead:
            raise
    return _get().spawn(argv, fds)  # the helper had died (killed?): one retry with a new one


def helper_pid() -> int | None:
    """The running helper's pid (None when there is none in this process)."""
    h = _helper
    if h is None or h.dead or h.owner != os.getpid() or h.proc is None:
        return None
    return h.proc.pid


def shutdown(timeout: float = 10.0) -> None:
    """Stop this process's helper: runs still going are killed, everything is reaped. The next
    spawn starts a new helper. Called at interpreter exit."""
    global _helper
    with _helper_lock:
        h, _helper = _helper, None
    if h is not None and h.owner == os.getpid():
        h.close(timeout)


def _after_fork_in_child() -> None:
    # A forked child starts a helper of its own if it runs sandboxes (the lock may have been
    # held by another thread at the fork).
    global _helper, _helper_lock
    _helper, _helper_lock = None, threading.Lock()


atexit.register(shutdown)
os.register_at_fork(after_in_child=_after_fork_in_child)


# ---- the helper process ---------------------------------------------------------------------
def _helper_main(sock_fd: int, owner: int) -> None:  # pragma: no cover - runs in the helper
    import array
    import ctypes
    import fcntl
    import selectors
    import signal
    import time

    sock = socket.socket(fileno=sock_fd)
    os.set_inheritable(sock_fd, False)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, lambda *_: None)  # the C handler writes to wake_w; the loop acts on it
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sock.send(b"ePR_SET_CHILD_SUBREAPER failed: " + os.strerror(ctypes.get_errno()).encode())
        return
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != owner:
        return  # the trainer died before we armed the death signal
    sock.send(b"ok")
    # Python ignores these; the sandboxes must start with the default actions (as subprocess does).
    sigdef = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, None)
    sel.register(wake_r, selectors.EVENT_READ, None)
    runs: dict[int, socket.socket | None] = {}  # outer bwrap pid -> its per-run socket (None: forgotten)

    def forget(conn: socket.socket) -> None:
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def recv(sock: socket.socket) -> tuple[bytes, list[int]]:
        # Not socket.recv_fds: Python 3.11's drops its flags, and every descriptor we hold must be
        # close-on-exec, or the next sandbox would inherit it (another run's socket, its files).
        msg, anc, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(_MAX_FDS * 4 + 16), socket.MSG_CMSG_CLOEXEC)
        fds: list[int] = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array("i", data[: len(data) - len(data) % 4])
        for fd in fds:
            os.set_inheritable(fd, False)
        return msg, fds

    def close_all(fds: list[int]) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def start(msg: bytes, fds: list[int]) -> None:
        conn, srcs = socket.socket(fileno=fds[0]), fds[1:]
        high: list[int] = []
        try:
            try:
                req = json.loads(msg)
                argv, targets = req["argv"], req["fds"]
                if len(targets) != len(srcs):
                    raise OSError("descriptors lost in transit")
                # Move the received descriptors above every target number, so that no dup2 onto
                # a target can clobber a source; the copies are close-on-exec, the targets not.
                base = max(targets) + 1
                high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in srcs]
            finally:
                close_all(srcs)
            pid = os.posix_spawn(argv[0], argv, {}, file_actions=[
                (os.POSIX_SPAWN_DUP2, h, t) for h, t in zip(high, targets)], setsigdef=sigdef, setsigmask=())
        except Exception as e:  # noqa: BLE001 - reported to the trainer
            try:
                conn.send(f"e{type(e).__name__}: {e}".encode())
            except OSError:
                pass
            conn.close()
            return
        finally:
            close_all(high)
        runs[pid] = conn
        try:
            conn.send(b"p%d" % pid)
            sel.register(conn, selectors.EVENT_READ, pid)
        except OSError:  # the trainer gave up on this run already
            os.kill(pid, 9)
            runs[pid] = None
            conn.close()

    me = os.getpid()

    def children() -> set[int]:
        try:
            with open(f"/proc/{me}/task/{me}/children") as f:  # single-threaded: one task
                return {int(pid) for pid in f.read().split()}
        except OSError:  # a kernel without CONFIG_PROC_CHILDREN
            found = set()
            for name in os.listdir("/proc"):
                try:
                    with open(f"/proc/{name}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                if int(stat[stat.rindex(")") + 2:].split()[1]) == me:
                    found.add(int(name))
            return found

    adopted: set[int] = set()  # sandbox inits adopted (and killed), not reaped yet
    pending: list[tuple[socket.socket, int, set[int], float]] = []  # exit reports waiting for inits

    def reap() -> None:
        finished: list[tuple[socket.socket | None, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            adopted.discard(pid)
            if pid in runs:  # an outer bwrap: its init is ours now
                finished.append((runs.pop(pid), status))
        if finished:
            # Every child that is not an outer bwrap we started is a sandbox's init, adopted when
            # its bwrap exited. --die-with-parent kills it, except when bwrap was killed before
            # the init had armed that (it then waits forever for its uid maps): kill it here.
            # These are unreaped children of ours, so their pids cannot have been reused.
            orphans = children() - set(runs)
            for pid in orphans:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            adopted.update(orphans)
            # Report a run's end once the inits adopted with it are reaped too: when run() returns,
            # nothing of that run is left, not even a zombie.
            for conn, status in finished:
                if conn is not None:
                    sel.unregister(conn)  # the pid may be reused now: no more kills through it
                    pending.append((conn, status, orphans, time.monotonic() + 2.0))
        flush()

    def flush(force: bool = False) -> None:
        now = time.monotonic()
        for item in list(pending):
            conn, status, waiting, deadline = item
            if waiting & adopted and now < deadline and not force:
                continue
            pending.remove(item)
            try:
                conn.send(b"x%d" % status)
            except OSError:
                pass
            conn.close()

    stop = False
    while not stop:
        for key, _ in sel.select(0.05 if pending else None):
            if key.fileobj is sock:
                try:
                    msg, fds = recv(sock)
                except OSError:
                    msg, fds = b"", []
                if not msg and not fds:
                    stop = True  # the trainer closed its end or died
                elif fds:
                    start(msg, fds)
            elif key.fileobj == wake_r:
                try:
                    sigs = os.read(wake_r, 4096)
                except BlockingIOError:
                    sigs = b""
                if any(int(s) in sigs for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)):
                    stop = True
                reap()
            else:
                conn, pid = key.fileobj, key.data
                try:
                    data = conn.recv(64)
                except OSError:
                    data = b""
                if pid in runs and (b"k" in data or not data):
                    os.kill(pid, 9)  # still our unreaped child: the pid cannot have been reused
                if not data:  # the trainer is done with this run (or gone): stop listening
                    if pid in runs:
                        runs[pid] = None
                    forget(conn)
        flush()
    while True:  # kill and reap every child (bwraps, adopted inits) until there is none
        for pid in children():
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    adopted.clear()
    flush(force=True)


if __name__ == "__main__":  # pragma: no cover - the helper process
    _helper_main(int(sys.argv[1]), int(sys.argv[2]))
