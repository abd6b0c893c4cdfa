"""Run an untrusted program in a throw-away, OS-level sandbox (bubblewrap + rlimits).

Design
------
Every run is a fresh ``bwrap`` invocation, so nothing is shared between two runs:

* new user, PID, network, IPC, UTS and cgroup namespaces (``--unshare-*``), and no further
  user namespaces inside (``--disable-userns``);
* a filesystem view built from scratch (read-only but for /tmp): the host's ``/usr`` (and the ``/bin``, ``/lib*``
  links to it) read-only, a synthetic ``/etc`` (passwd, group, hosts; nothing from the host
  but the dynamic loader cache), a private ``/proc`` showing only the sandbox's processes, a
  minimal ``/dev``, a size-capped tmpfs at ``/tmp`` (the working directory), and the program
  itself read-only under ``/box``; no host home, no host ``/tmp``, nothing of the trainer;
* an empty environment (``--clearenv``; only ``PATH``, ``HOME``, ``LANG`` set by us);
* hard resource limits (soft = hard, so the program cannot raise them) set by ``prlimit``
  *inside* the new user namespace: CPU seconds, address space, processes/threads (counted
  per sandbox because the kernel counts ``RLIMIT_NPROC`` per user namespace), file size and
  open files; a wall-clock deadline enforced by the host; stdout/stderr capped by the host;
* the sandbox's PID 1 is bwrap's init, which dies with its parent (``--die-with-parent``): at
  the deadline the outer bwrap is SIGKILLed, PID 1 receives SIGKILL, and the kernel kills
  every process of the PID namespace, including those that called ``setsid`` or double-forked;
* every process a run starts is reaped: bwrap is started by a small helper process
  (``reaper.py``, one per host process) that is a subreaper and waits for everything below it,
  since the outer bwrap exits without waiting for its init. Nothing of a sandbox is re-parented
  to the host or to PID 1 (a trainer that is PID 1 in a container would never reap it), and the
  helper kills the runs still going when the host dies.

When the host process runs as root we first drop to an unprivileged uid (``setpriv``,
default 65534) so that the kernel enforces ``RLIMIT_NPROC`` (it never does for uid 0) and the
sandbox holds no capability in the initial user namespace.

Threat model
------------
The program is hostile: it may loop, sleep, fork or thread bomb, allocate without bound, flood
its outputs, fill the disk, exhaust descriptors, ignore SIGTERM, detach children, try to signal
or kill other processes, read host files (``/etc/passwd``, ``/proc/*/environ``, home secrets,
the hidden tests), write or delete host files, talk to services on the host's loopback, or
leave state behind for the next run. All of these are contained by the mechanisms above.

NOT covered
-----------
* Kernel vulnerabilities: the sandbox shares the host kernel (no seccomp filter, no VM); a
  kernel exploit reachable from an unprivileged user namespace escapes. Use microVMs (or run
  the service on dedicated nodes) where that matters.
* Aggregate memory of a process tree: ``RLIMIT_AS`` is per process, so the worst case is
  ``max_procs * memory_mb`` (plus the tmpfs size). We do not use cgroups because they are not
  available unprivileged on most hosts (cgroup v2 delegation would tighten this).
* Side channels and resource contention (CPU caches, timing, memory bandwidth) with other runs.
* Anything readable under the read-only ``/usr`` (it is the host's, so do not keep secrets
  there); ``/proc/cpuinfo``-style host information.
* Cheating that happens inside the judged process itself: see ``verifiers/code.py`` for what
  the code verifier does about it.

Host requirements: Linux with unprivileged user namespaces enabled, ``bwrap`` (Debian package
``bubblewrap``), ``prlimit`` and, when running as root, ``setpriv`` (both ``util-linux``).
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from grpo.sandbox import reaper

__all__ = ["Limits", "Image", "Result", "Sandbox", "SandboxUnavailable", "run", "default_sandbox"]


class SandboxUnavailable(RuntimeError):
    """The host cannot create sandboxes (missing bwrap, user namespaces disabled, ...)."""


@dataclass
class Limits:
    """Per-run limits. Sizes in MiB, times in seconds."""

    wall_time: float = 10.0
    cpu_time: float = 10.0
    memory_mb: int = 1024  # address space of each process (RLIMIT_AS)
    max_procs: int = 32  # processes + threads in the sandbox, bwrap's init included
    file_size_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE)
    open_files: int = 64
    tmp_size_mb: int = 32  # the writable /tmp tmpfs (memory-backed, hence capped)
    stdout_bytes: int = 1 << 20  # beyond this the run is killed: status "output_limit"
    stderr_bytes: int = 64 << 10  # beyond this stderr is truncated (the run goes on)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Limits":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown limits: {sorted(unknown)}")
        lim = cls(**d)
        lim.validate()
        return lim

    def validate(self) -> None:
        for k, v in asdict(self).items():
            if k in ("wall_time", "cpu_time"):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                    raise ValueError(f"limit {k} must be a positive finite number, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, int) or not v > 0:
                # sizes and counts go to rlimits and slices: a float (even 512.0) is refused here,
                # not met later as a TypeError
                raise ValueError(f"limit {k} must be a positive whole number, got {v!r}")


@dataclass
class Image:
    """What the sandbox sees and how a program is started.

    ``language="python"``: the program runs under ``interpreter`` through a small launcher
    that sets the hard limits inside the interpreter before any program code runs (this saves
    one exec per run) and reports its CPU time and peak memory on exit. Any other language:
    ``command`` is the argv (``{program}`` is replaced by the program's path) and ``prlimit``
    sets the limits before exec. ``ro_binds`` are host paths mounted read-only at the same place;
    an interpreter outside /usr needs its prefix here (keep secrets out of them).
    """

    language: str = "python"
    interpreter: str = "/usr/bin/python3"
    # -S skips site (no dist-packages, but ~3 ms faster); the launcher restores exit()/quit().
    python_flags: tuple[str, ...] = ("-I", "-S", "-B")
    command: tuple[str, ...] = ()
    program_name: str = "main.py"
    ro_binds: tuple[str, ...] = ("/usr",)
    host_files: tuple[str, ...] = ("/etc/ld.so.cache",)  # copied in; the loader cache speeds up linking


# Runs inside the sandbox before the program (python images). argv: limits, program path, args.
# The limits are set with soft == hard so the program cannot raise them again.
_PY_LAUNCHER = r"""
import sys, resource as R, builtins
c, a, p, f, n = map(int, sys.argv[1].split(","))
for k, v in ((R.RLIMIT_CPU, (c, c + 1)), (R.RLIMIT_AS, (a, a)), (R.RLIMIT_NPROC, (p, p)),
             (R.RLIMIT_FSIZE, (f, f)), (R.RLIMIT_NOFILE, (n, n)), (R.RLIMIT_CORE, (0, 0))):
    R.setrlimit(k, v)
def _quit(code=None):
    raise SystemExit(code)
builtins.exit = builtins.quit = _quit
del c, a, p, f, n, k, v, _quit
path = sys.argv[2]
sys.argv = sys.argv[2:]
with open(path, "rb") as fh:
    code = compile(fh.read(), path, "exec")
del fh
g = {"__name__": "__main__", "__file__": path, "__builtins__": builtins}
del path
import os as _os
_sfd = int(_os.environ.pop("GRPO_STATS_FD", "-1"))
try:
    exec(code, g)
finally:
    # Informational only: the program can forge or suppress this line.
    if _sfd >= 0:
        s, ch = R.getrusage(R.RUSAGE_SELF), R.getrusage(R.RUSAGE_CHILDREN)
        try:
            _os.write(_sfd, b"%f %d\n" % (s.ru_utime + s.ru_stime + ch.ru_utime + ch.ru_stime, max(s.ru_maxrss, ch.ru_maxrss)))
        except OSError:
            pass
"""
@dataclass
class Result:
    """Outcome of one run.

    status: "ok" (exit 0), "error" (non-zero exit), "signal" (killed by a signal, e.g. a
    segfault), "timeout" (wall or CPU time), "output_limit" (stdout over its cap) or
    "sandbox_error" (the sandbox itself could not start the program).
    """

    status: str
    exit_code: int | None
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    wall_time: float = 0.0
    # Reported by the python launcher when the program ends normally; None otherwise. The
    # program could forge them: informational, never used to judge.
    cpu_time: float | None = None
    max_rss_kb: int | None = None
    channel: bytes = b""  # what the program wrote on the result channel (harness use)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("stdout", "stderr", "channel"):
            d[k] = d[k].decode("utf-8", "replace")
        return d


_ETC_PASSWD = b"root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:65534:65534:sandbox:/tmp:/usr/sbin/nologin\n"
_ETC_GROUP = b"root:x:0:\nsandbox:x:65534:\n"
_ETC_HOSTS = b"127.0.0.1 localhost\n::1 localhost\n"


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class Sandbox:
    """Creates sandboxes. Thread-safe: ``run`` may be called from many threads at once."""

    def __init__(self, image: Image | None = None, limits: Limits | None = None, *,
                 drop_uid: int | None = 65534, bwrap: str | None = None):
        self.image = image or Image()
        self.limits = limits or Limits()
        self.limits.validate()
        # Only meaningful as root: the uid the sandbox runs as (None keeps root, which loses
        # the process limit; see the module docstring).
        self.drop_uid = drop_uid if os.geteuid() == 0 else None
        self.bwrap = bwrap or shutil.which("bwrap") or "/usr/bin/bwrap"
        self._host_files = {}
        for p in self.image.host_files:
            try:
                with open(p, "rb") as f:
                    self._host_files[p] = f.read()
            except OSError:
                pass  # optional speed-ups; a missing one costs nothing but time
        self._checked = False
        self._check_lock = threading.Lock()

    # -- host checks -----------------------------------------------------------------------
    def check(self) -> None:
        """Raise SandboxUnavailable with an actionable message if sandboxes cannot be made."""
        if self._checked:
            return
        with self._check_lock:
            if self._checked:
                return
            missing = [t for t in ("prlimit",) + (("setpriv",) if self.drop_uid is not None else ())
                       if shutil.which(t, path="/usr/bin:/bin:/usr/sbin:/sbin") is None]
            if not os.path.exists(self.bwrap):
                raise SandboxUnavailable(
                    "bubblewrap (bwrap) is not installed; install it, e.g. `apt-get install -y bubblewrap`")
            if missing:
                raise SandboxUnavailable(f"missing host tools {missing} (Debian package util-linux)")
            interp = self.image.interpreter if self.image.language == "python" else self.image.command[0]
            if not os.path.exists(interp):
                raise SandboxUnavailable(f"sandbox interpreter {interp} does not exist on the host")
            r = self._run(b"", b"", Limits(wall_time=10), files=None, argv_override=("/bin/true",))
            if r.status != "ok":
                raise SandboxUnavailable(
                    "cannot create a sandbox (are unprivileged user namespaces enabled? e.g. "
                    "`sysctl -w kernel.unprivileged_userns_clone=1`, `user.max_user_namespaces>0`, "
                    "or on Ubuntu >= 23.10 `kernel.apparmor_restrict_unprivileged_userns=0`): "
                    + r.stderr.decode("utf-8", "replace").strip())
            self._checked = True

    # -- running -----------------------------------------------------------------------------
    def run(self, program: bytes | str, stdin: bytes | str = b"", limits: Limits | dict | None = None,
            *, files: dict[str, bytes | str] | None = None, args: tuple[str, ...] = (),
            channel: bool = False, secret_in: bytes | None = None) -> Result:
        """Run ``program`` (source for the image's interpreter) with ``stdin``.

        ``files``: extra read-only files under /box (name -> content). ``args``: extra argv.
        ``channel``: open a result pipe for a harness; its fd number is in ``$GRPO_CHANNEL_FD``.
        ``secret_in``: bytes put in a pipe whose fd is in ``$GRPO_SECRET_FD`` (see the verifier).
        """
        self.check()
        lim = limits if isinstance(limits, Limits) else (
            self.limits if limits is None else Limits.from_dict({**asdict(self.limits), **limits}))
        lim.validate()
        if isinstance(program, str):
            program = program.encode("utf-8")
        if isinstance(stdin, str):
            stdin = stdin.encode("utf-8")
        return self._run(program, stdin, lim, files=files, args=args, channel=channel, secret_in=secret_in)

    def _build_argv(self, lim: Limits, files: dict[str, int], extra_env: dict[str, str],
                    command: tuple[str, ...], raw: bool) -> list[str]:
        argv: list[str] = []
        if self.drop_uid is not None:
            u = str(self.drop_uid)
            argv += ["/usr/bin/setpriv", f"--reuid={u}", f"--regid={u}", "--clear-groups", "--no-new-privs", "--"]
        argv += [self.bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                 "--unshare-uts", "--unshare-cgroup", "--disable-userns", "--die-with-parent",
                 "--new-session", "--clearenv", "--hostname", "sandbox"]
        for p in self.image.ro_binds:
            argv += ["--ro-bind", p, p]
        for link in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            # merged-/usr hosts have these as links into /usr; others get them bound.
            if os.path.islink(link):
                argv += ["--symlink", os.readlink(link), link]
            elif os.path.isdir(link) and link not in self.image.ro_binds:
                argv += ["--ro-bind", link, link]
        argv += ["--proc", "/proc", "--dev", "/dev",
                 "--size", str(lim.tmp_size_mb << 20), "--perms", "1777", "--tmpfs", "/tmp",
                 "--dir", "/box"]
        for dest, fd in files.items():
            argv += ["--perms", "0444", "--ro-bind-data", str(fd), dest]
        argv += ["--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/tmp",
                 "--setenv", "LANG", "C.UTF-8"]
        for k, v in extra_env.items():
            argv += ["--setenv", k, v]
        # The root is bwrap's own (uncapped) tmpfs: make it read-only so only /tmp is writable.
        argv += ["--remount-ro", "/", "--chdir", "/tmp", "--"]
        cpu = max(1, int(lim.cpu_time + 0.999))
        if self.image.language == "python" and not raw:
            nums = (cpu, lim.memory_mb << 20, lim.max_procs, lim.file_size_mb << 20, lim.open_files)
            argv += [self.image.interpreter, *self.image.python_flags, "-c", _PY_LAUNCHER,
                     ",".join(map(str, nums)), *command]
        else:
            argv += ["/usr/bin/prlimit", f"--cpu={cpu}:{cpu + 1}", f"--as={lim.memory_mb << 20}",
                     f"--nproc={lim.max_procs}", f"--fsize={lim.file_size_mb << 20}",
                     f"--nofile={lim.open_files}", "--core=0", "--", *command]
        return argv

    def _run(self, program: bytes, stdin: bytes, lim: Limits, *, files: dict[str, bytes | str] | None,
             args: tuple[str, ...] = (), channel: bool = False, secret_in: bytes | None = None,
             argv_override: tuple[str, ...] | None = None) -> Result:
        to_close: list[int] = []
        pass_fds: list[int] = []
        try:
            file_fds: dict[str, int] = {}
            contents: dict[str, bytes] = dict(self._host_files)
            contents["/etc/passwd"] = _ETC_PASSWD
            contents["/etc/group"] = _ETC_GROUP
            contents["/etc/hosts"] = _ETC_HOSTS
            prog_path = "/box/" + self.image.program_name
            contents[prog_path] = program
            for name, data in (files or {}).items():
                if "/" in name or name in ("", ".", ".."):
                    raise ValueError(f"bad file name {name!r}")
                contents["/box/" + name] = data.encode("utf-8") if isinstance(data, str) else data
            for dest, data in contents.items():
                fd = _memfd("f", data)
                to_close.append(fd)
                pass_fds.append(fd)
                file_fds[dest] = fd
            env: dict[str, str] = {}
            chan_r = -1
            if channel:
                chan_r, chan_w = os.pipe()
                to_close += [chan_r, chan_w]
                pass_fds.append(chan_w)
                env["GRPO_CHANNEL_FD"] = str(chan_w)
            stats_r = -1
            if self.image.language == "python" and not argv_override:
                stats_r, stats_w = os.pipe()
                to_close += [stats_r, stats_w]
                pass_fds.append(stats_w)
                env["GRPO_STATS_FD"] = str(stats_w)
            sec_w = -1
            if secret_in is not None:
                # A pipe holds 64 KiB and nobody reads it before the program starts (or ever, if it
                # does not want to): the secret is written from _collect's loop as the program reads
                # it, never blocking, so the run's wall_time bounds it like everything else.
                sec_r, sec_w = os.pipe()
                to_close += [sec_r, sec_w]
                os.set_blocking(sec_w, False)
                pass_fds.append(sec_r)
                env["GRPO_SECRET_FD"] = str(sec_r)
            stdin_fd = _memfd("stdin", stdin)
            to_close.append(stdin_fd)
            if argv_override:
                command = argv_override
            elif self.image.language == "python":
                command = (prog_path, *args)
            else:
                command = tuple(a.replace("{program}", prog_path) for a in self.image.command) + tuple(args)
            argv = self._build_argv(lim, file_fds, env, command, raw=bool(argv_override))
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            to_close += [out_r, out_w, err_r, err_w]
            t0 = time.monotonic()
            # Started by the sandbox helper, which reaps bwrap and the sandbox's init: see reaper.py.
            try:
                child = reaper.spawn(argv, {0: stdin_fd, 1: out_w, 2: err_w, **{fd: fd for fd in pass_fds}})
            except OSError as e:
                return Result("sandbox_error", None, stderr=f"cannot start bwrap: {e}".encode())
            # The child holds its own copies now; closing ours makes the pipes hit EOF when
            # the sandbox ends.
            for fd in list(to_close):
                if fd not in (chan_r, stats_r, out_r, err_r, sec_w):
                    os.close(fd)
                    to_close.remove(fd)
            if sec_w >= 0:
                to_close.remove(sec_w)  # _collect closes it (exactly once: fd numbers are reused)
            try:
                return self._collect(child, lim, t0, out_r, err_r, chan_r, stats_r,
                                     sec_w, secret_in or b"")
            finally:
                child.close()  # a no-op once reaped; kills the run if _collect was interrupted
        finally:
            for fd in to_close:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _collect(self, proc: reaper.Child, lim: Limits, t0: float, out_r: int, err_r: int, chan_r: int,
                 stats_r: int, sec_w: int = -1, secret: bytes = b"") -> Result:
        deadline = t0 + lim.wall_time
        out = bytearray()
        err = bytearray()
        chan = bytearray()
        stats = bytearray()
        out_trunc = err_trunc = False
        killed_for: str | None = None
        sel = selectors.DefaultSelector()
        sel.register(out_r, selectors.EVENT_READ, "out")
        sel.register(err_r, selectors.EVENT_READ, "err")
        if chan_r >= 0:
            sel.register(chan_r, selectors.EVENT_READ, "chan")
        if stats_r >= 0:
            sel.register(stats_r, selectors.EVENT_READ, "stats")
        open_streams = len(sel.get_map())
        # The secret's pipe (non-blocking write end, ours to close): fed as the program reads it.
        pending = memoryview(secret)

        def close_secret() -> None:
            nonlocal sec_w
            if sec_w >= 0:
                if sec_w in sel.get_map():
                    sel.unregister(sec_w)
                os.close(sec_w)
                sec_w = -1

        def feed_secret() -> None:
            nonlocal pending
            try:
                while pending:
                    pending = pending[os.write(sec_w, pending[:1 << 16]):]
            except BlockingIOError:
                return  # the pipe is full: wait until the program reads
            except OSError:
                pending = pending[:0]  # EPIPE: the program is gone or closed its end
            close_secret()  # all written: the program reads end of file after it

        def kill() -> None:
            proc.kill()  # SIGKILL to the outer bwrap; its init follows (pdeathsig), then the namespace

        try:
            if sec_w >= 0:
                feed_secret()
                if sec_w >= 0:
                    sel.register(sec_w, selectors.EVENT_WRITE, "secret")
            while open_streams:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if killed_for is None:
                        killed_for = "timeout"
                        kill()
                    # The kernel tears the namespace down right after; give the pipes a moment.
                    remaining = 2.0 if remaining > -2.0 else 0
                    if remaining == 0:
                        break
                events = sel.select(min(remaining, 1.0))
                for key, _ in events:
                    fd = key.fd
                    if key.data == "secret":
                        feed_secret()
                        continue
                    try:
                        data = os.read(fd, 65536)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(key.fileobj)
                        open_streams -= 1
                        continue
                    if key.data == "out":
                        room = lim.stdout_bytes - len(out)
                        out += data[:max(room, 0)]
                        if len(data) > room:
                            out_trunc = True
                            if killed_for is None:
                                killed_for = "output_limit"
                                kill()
                    elif key.data == "err":
                        room = lim.stderr_bytes - len(err)
                        if room > 0:
                            err += data[:room]
                        if len(data) > room:
                            err_trunc = True
                    elif key.data == "stats":
                        if len(stats) < 256:
                            stats += data[:256]
                    else:
                        room = lim.stdout_bytes - len(chan)
                        chan += data[:max(room, 0)]
        finally:
            close_secret()
            sel.close()
        # Pipes are closed once every sandbox process is gone; the helper reaps bwrap (and the
        # sandbox's init) and sends bwrap's wait status.
        if killed_for is None and time.monotonic() > deadline:
            try:
                proc.wait(0)
            except TimeoutError:
                killed_for = "timeout"
                kill()
        try:
            status = proc.wait(10.0)
        except TimeoutError:  # cannot happen unless bwrap hangs: kill it and give up on its status
            kill()
            try:
                status = proc.wait(10.0)
            except TimeoutError:
                status = None
        wall = time.monotonic() - t0
        # The python launcher's self-report is all we have of the program's resource use.
        cpu: float | None = None
        rss: int | None = None
        try:
            c_s, r_s = stats.split(b"\n")[0].split()
            cpu, rss = round(float(c_s), 4), int(r_s)
        except ValueError:
            pass
        rc = os.waitstatus_to_exitcode(status) if status is not None else None
        sig = None
        if killed_for is not None:
            status_s, code = killed_for, None
        elif rc is None or rc < 0:
            status_s, code = "sandbox_error", rc
        elif rc == 0:
            status_s, code = "ok", 0
        elif rc > 128:
            # bwrap's init reports a child killed by signal N as exit status 128 + N.
            sig, code = rc - 128, None
            # SIGXCPU is the soft CPU limit; SIGKILL after at least that long is the hard one.
            cpu_out = sig == signal.SIGXCPU or (sig == signal.SIGKILL and wall >= int(lim.cpu_time + 0.999))
            status_s = "timeout" if cpu_out else "signal"
        elif rc == 1 and err.startswith(b"bwrap:"):
            status_s, code = "sandbox_error", 1
        else:
            status_s, code = "error", rc
        return Result(status_s, code, sig, bytes(out), bytes(err), out_trunc, err_trunc,
                      round(wall, 4), cpu, rss, bytes(chan))


_default: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox() -> Sandbox:
    global _default
    with _default_lock:
        if _default is None:
            _default = Sandbox()
        return _default


def run(program: bytes | str, stdin: bytes | str = b"", limits: Limits | dict | None = None, **kw: Any) -> Result:
    """Run ``program`` with the default Python image; see :meth:`Sandbox.run`."""
    return default_sandbox().run(program, stdin, limits, **kw)
