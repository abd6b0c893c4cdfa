"""HTTP service around the sandbox, so trainers on many nodes can share a sandbox fleet.

POST /run  {"program": str, "stdin": str, "limits": {...}, "files": {name: str}, "args": [str],
            "channel": bool, "secret_in": str}  ->  Result as JSON (outputs as UTF-8 text).
           Only "program" is required (null is the same as absent); a wrong type, an unknown field or
           limit, a limit over its maximum, NaN/Infinity, a lone surrogate or JSON nested too deeply
           is 400 with {"error": why}. The body is framed by one Content-Length only (no chunked).
GET /health -> {"ok": true, "busy": n, "queued": n, "connections": n, "max_limits": {...}}

Every answer sent before the body is read (404, 411, 413, 401, a 503 for the bodies buffered, a
GET with a body) closes the connection, so an unread body is never taken for a next request.

The service runs at most ``workers`` sandboxes at once and lets at most ``max_queue`` more
requests wait; beyond that it answers 503 at once (clients retry elsewhere). Bodies over
``max_body`` bytes get 413. A program crashing, timing out or flooding output only ends its own
sandbox.

Authentication: with a shared ``token`` every request must carry ``Authorization: Bearer <token>``
(compared in constant time); any other gets 401 before its body is read. A bind beyond loopback
without a token is refused unless ``insecure=True`` (``--insecure``): whoever reaches the port runs
code on the host.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from grpo.sandbox.core import Limits, Sandbox


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, bounded in total by the handler's ``read_deadline``: a client that
    sends its request line, headers or body slowly (a byte now and then) or not at all loses the
    connection at the deadline, whatever the pace; a per-read timeout alone would never fire."""

    def __init__(self, handler: "JSONHandler"):
        self._h = handler

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        sock = self._h.connection
        deadline = self._h.read_deadline
        left = (deadline - time.monotonic()) if deadline is not None else self._h.server.io_timeout
        if left <= 0:
            raise TimeoutError("request not received in time")
        sock.settimeout(left)
        return sock.recv_into(b)


class JSONHandler(BaseHTTPRequestHandler):
    """A request handler of a JSON service (a JSONServer): every read of a request within the
    server's ``request_timeout``, every write within its ``io_timeout``, the token checked before a
    body is read, one plain Content-Length only, bodies over ``max_body`` refused unread, JSON
    answers. GET /health answers the server's ``health()``; a POST goes to the route subclasses name
    in ``post_routes``. Shared by the sandbox service and other services of the package (stdlib only)."""

    server: "JSONServer"
    protocol_version = "HTTP/1.1"
    read_deadline: float | None = None

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per request is too many
        pass

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain buffered socket reader; the socket itself stays open
        self.rfile = io.BufferedReader(_DeadlineReader(self))

    def handle_one_request(self) -> None:
        # The request line, the headers and the body, all of them, within request_timeout (the wait
        # for the next request on a kept-alive connection too); then no read deadline while it runs.
        self.read_deadline = time.monotonic() + self.server.request_timeout
        super().handle_one_request()

    def _reply(self, code: int, obj: Any, *, close: bool = False, headers: dict[str, str] | None = None) -> None:
        """Answer `obj` as JSON with status `code` (and close the connection after it if `close`)."""
        body = json.dumps(obj).encode()
        self.connection.settimeout(self.server.io_timeout)  # a client that does not read loses it
        if close:
            self.close_connection = True
        self.send_response(code)
        if close:
            self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body_length(self) -> tuple[int | None, int, str]:
        """(length, status, error) of the request's body: (n, 0, "") for a body of n bytes (0: none),
        else (None, status, why). Only a single plain Content-Length frames a body; anything else
        (chunked, two lengths, "+5") is refused, and the connection closed, never guessed at."""
        if self.headers.get_all("Transfer-Encoding"):
            return None, 411, "Transfer-Encoding is not supported: send Content-Length"
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return (0, 0, "") if self.command != "POST" else (None, 411, "Content-Length required")
        if len(values) > 1 or not re.fullmatch(r"[0-9]{1,15}", values[0].strip()):
            return None, 400, "one Content-Length of digits only is accepted"
        return int(values[0]), 0, ""

    def _authorized(self) -> bool:
        """True if the service needs no token or the request carries it; else a 401 has been sent
        and the connection closes (its body unread)."""
        expected = self.server.token
        if expected is None:
            return True
        scheme, _, got = (self.headers.get("Authorization") or "").strip().partition(" ")
        ok = hmac.compare_digest(got.strip().encode("latin-1", "replace"), expected.encode()) and \
            scheme.lower() == "bearer"
        if not ok:
            service = self.server.service
            self._reply(401, {"error": f"this {service} needs its token: Authorization: Bearer <token>"},
                        close=True, headers={"WWW-Authenticate": f'Bearer realm="grpo {service.split()[0]}"'})
        return ok

    def post_routes(self) -> dict[str, Any]:
        """path -> handle(raw body bytes), which answers with ``_reply``: the service's POST routes."""
        return {}

    def do_GET(self) -> None:
        if not self._authorized():
            return
        length, status, why = self._body_length()
        if length != 0:  # a GET with a body: answered, and the body never read, so the connection ends
            self.close_connection = True
        if status:
            self._reply(status, {"error": why}, close=True)
        elif self.path == "/health":
            self._reply(200, self.server.health(), close=self.close_connection)
        else:
            self._reply(404, {"error": "not found"}, close=self.close_connection)

    def do_POST(self) -> None:
        if not self._authorized():
            return
        handle = self.post_routes().get(self.path)
        if handle is None:
            self._reply(404, {"error": "not found"}, close=True)
            return
        self._with_body(handle)

    def _with_body(self, handle) -> None:
        """Read a POST's body (framed, bounded, within the deadline, reserved against the server's
        ``max_buffered``) and call ``handle(raw bytes)``. Every answer sent before the body is read
        closes the connection: an unread body must never be parsed as the next request."""
        length, status, why = self._body_length()
        if length is None:
            self._reply(status, {"error": why}, close=True)
            return
        if length > self.server.max_body:
            self._reply(413, {"error": f"request over {self.server.max_body} bytes"}, close=True)  # body unread
            return
        if not self.server.reserve(length):  # what all the bodies being read or run may hold at once
            self._reply(503, {"error": "busy (request bodies)"}, close=True)
            return
        try:
            try:
                raw = self.rfile.read(length)
            except TimeoutError:
                self._reply(408, {"error": f"request body not received within {self.server.request_timeout} s"},
                            close=True)
                return
            self.read_deadline = None
            if len(raw) != length:  # the client closed early: nothing to answer
                self.close_connection = True
                return
            handle(raw)
        finally:
            self.server.unreserve(length)


def parse_json(raw: bytes) -> Any:
    """A request body as JSON: NaN/Infinity and nesting too deep are a ValueError (a 400), like bad JSON."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


class _Handler(JSONHandler):
    server: "SandboxServer"

    def post_routes(self) -> dict[str, Any]:
        return {"/run": self._run}

    def _run(self, raw: bytes) -> None:
        try:
            program, stdin, limits, kwargs = _parse_run(raw, self.server)
        except (ValueError, TypeError) as e:
            self._reply(400, {"error": str(e)[:300]})
            return
        del raw
        if not self.server.admit():
            self._reply(503, {"error": "busy"})
            return
        try:
            result = self.server.sandbox.run(program, stdin, limits, **kwargs)
            self._reply(200, result.to_json())
        except Exception as e:  # a failure of one run must not take the service down
            self._reply(500, {"error": f"{type(e).__name__}: {e}"[:300]})
        finally:
            self.server.release()


_FIELDS = ("program", "stdin", "limits", "files", "args", "channel", "secret_in")
MAX_FILES = 128
MAX_ARGS = 256


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _utf8(field: str, v: Any) -> bytes:
    if not isinstance(v, str):
        raise ValueError(f"{field} must be a string, got {type(v).__name__}")
    try:
        return v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field} is not valid Unicode (a lone surrogate)") from None


def _parse_run(raw: bytes, server: "SandboxServer") -> tuple[bytes, bytes, Limits, dict[str, Any]]:
    """A /run body, checked field by field: (program, stdin, limits, Sandbox.run keywords). Any
    wrong type, value or encoding is a ValueError (400), never an error inside the run (500)."""
    req = parse_json(raw)
    if not isinstance(req, dict):
        raise ValueError(f"the body must be a JSON object, got {type(req).__name__}")
    unknown = set(req) - set(_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)[:5]} (known: {list(_FIELDS)})")
    if "program" not in req:
        raise ValueError("'program' (a string) is required")
    program = _utf8("'program'", req["program"])
    stdin = b"" if req.get("stdin") is None else _utf8("'stdin'", req["stdin"])
    lim = req.get("limits")
    if lim is None:
        lim = {}
    if not isinstance(lim, dict):
        raise ValueError(f"'limits' must be an object, got {type(lim).__name__}")
    limits = Limits.from_dict({**server.sandbox.limits.__dict__, **lim})
    for k, cap in server.max_limits.items():
        if getattr(limits, k) > cap:
            raise ValueError(f"limit {k}={getattr(limits, k)} is over the service's maximum {cap}")
    files = req.get("files")
    if files is None:
        files = {}
    if not isinstance(files, dict):
        raise ValueError(f"'files' must be an object (name -> text), got {type(files).__name__}")
    if len(files) > MAX_FILES:
        raise ValueError(f"at most {MAX_FILES} files")
    out_files: dict[str, bytes] = {}
    for name, content in files.items():
        if (name in ("", ".", "..") or "/" in name or "\0" in name or len(_utf8("a file name", name)) > 255):
            raise ValueError(f"bad file name {name[:100]!r}: a plain name of 1 to 255 bytes")
        out_files[name] = _utf8(f"the content of file {name[:100]!r}", content)
    args = req.get("args")
    if args is None:
        args = []
    if not isinstance(args, list):
        raise ValueError(f"'args' must be a list of strings, got {type(args).__name__}")
    if len(args) > MAX_ARGS:
        raise ValueError(f"at most {MAX_ARGS} args")
    for a in args:
        if b"\0" in _utf8("each of 'args'", a):
            raise ValueError("an argument may not hold a NUL character")
    channel = req.get("channel")
    if channel is not None and not isinstance(channel, bool):
        raise ValueError(f"'channel' must be true or false, got {type(channel).__name__}")
    secret = req.get("secret_in")
    secret_b = None if secret is None else _utf8("'secret_in'", secret)
    return program, stdin, limits, {"files": out_files or None, "args": tuple(args), "channel": bool(channel),
                                    "secret_in": secret_b}


# Every limit has a maximum (a request over one gets 400): the run's resources (memory, /tmp in the
# host's shared memory, file sizes, descriptors) and what the server itself buffers (stdout and the
# channel, stderr) are bounded per run. Raise them with max_limits / `--max-limit KEY=VALUE`.
DEFAULT_MAX_LIMITS: dict[str, float] = {
    "wall_time": 60, "cpu_time": 60, "memory_mb": 4096, "max_procs": 256, "file_size_mb": 256,
    "open_files": 1024, "tmp_size_mb": 256, "stdout_bytes": 8 << 20, "stderr_bytes": 1 << 20,
}


def check_token(token: str, service: str = "sandbox service") -> None:
    """A shared token is 16 to 4096 visible ASCII characters; else a ValueError naming the service."""
    if not isinstance(token, str) or not re.fullmatch(r"[\x21-\x7e]{16,4096}", token):
        raise ValueError(f"the {service.split()[0]} token must be 16 to 4096 visible ASCII characters (no spaces), "
                         "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not host:
        return False  # "" is every interface
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


_BUSY = b'{"error": "busy (too many connections)"}'
_TOO_MANY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
             b"Connection: close\r\n\r\n%s" % (len(_BUSY), _BUSY))


class JSONServer(ThreadingHTTPServer):
    """The hardened HTTP server under a JSON service (its handler a JSONHandler subclass): at most
    ``max_connections`` connections at once (more are answered 503 and closed at once), each reading
    its request within ``request_timeout``, all their bodies together at most ``max_buffered`` bytes;
    a ``token`` (or, beyond loopback, ``insecure``) required. ``service`` names it in its messages,
    ``exposure`` says what a stranger on the port could do, ``token_hint`` how to give a token."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog (socketserver's 5 drops connections of a burst for 1 s)
    service = "service"
    exposure = "could use it"
    token_hint = "--token-file FILE"

    def __init__(self, host: str, port: int, handler: type[JSONHandler], *, max_body: int, max_connections: int,
                 request_timeout: float = 30.0, io_timeout: float = 60.0, max_buffered: int | None = None,
                 token: str | None = None, insecure: bool = False):
        self.check_access(host, token, insecure)
        self.token = token
        for name, v in (("max_body", max_body), ("request_timeout", request_timeout), ("io_timeout", io_timeout)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 1e-3:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        super().__init__((host, port), handler)
        self.max_body = max_body
        self.max_connections = max_connections
        self.request_timeout = float(request_timeout)
        self.io_timeout = float(io_timeout)
        self.max_buffered = max_buffered or max(256 << 20, 2 * max_body)
        self._conn_slots = threading.BoundedSemaphore(self.max_connections)
        self.connections = 0
        self._buffered = 0
        self._lock = threading.Lock()

    @classmethod
    def check_access(cls, host: str, token: str | None, insecure: bool) -> None:
        """A well-formed token, or loopback, or `insecure`: else a ValueError saying why (before anything starts)."""
        if token is not None:
            check_token(token, cls.service)
        elif not insecure and not is_loopback(host):
            raise ValueError(
                f"refusing to serve on {host or 'all interfaces'} without a token: anyone who reaches the port "
                f"{cls.exposure}; give {cls.token_hint}, or --insecure on a network you trust")

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._conn_slots.acquire(blocking=False):
            try:  # a few bytes to a fresh socket: never blocks the accepting thread
                request.setblocking(False)
                request.send(_TOO_MANY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._lock:
            self.connections += 1
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread: give the slot back
            self._conn_done()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._conn_done()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that reset or went away: no traceback per hostile connection
        super().handle_error(request, client_address)

    def _conn_done(self) -> None:
        with self._lock:
            self.connections -= 1
        self._conn_slots.release()

    def reserve(self, n: int) -> bool:
        """Hold n bytes of request body against max_buffered; False (answer 503) when they do not fit."""
        with self._lock:
            if self._buffered + n > self.max_buffered:
                return False
            self._buffered += n
            return True

    def unreserve(self, n: int) -> None:
        """Give back what `reserve` held."""
        with self._lock:
            self._buffered -= n

    def run(self, about: str = "") -> None:
        """Print "<service> on <url> <about>" (and a warning when it has no token beyond loopback),
        then serve until KeyboardInterrupt; the socket is closed on the way out."""
        if self.token is None and not is_loopback(self.server_address[0]):
            print(f"WARNING: the {self.service} on {self.url} has no token (--insecure): anyone who reaches "
                  f"the port {self.exposure}", file=sys.stderr, flush=True)
        print(f"{self.service} on {self.url}{about}" + (" (token required)" if self.token else ""), flush=True)
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.server_close()

    def health(self) -> dict[str, Any]:
        """What GET /health answers."""
        return {"ok": True, "connections": self.connections}

    @property
    def url(self) -> str:
        """http://host:port of the bound socket."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class SandboxServer(JSONServer):
    service = "sandbox service"
    exposure = "could run code here"
    token_hint = "--token-file FILE (or GRPO_SANDBOX_TOKEN)"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, workers: int = 2, max_queue: int = 64,
                 max_body: int = 16 << 20, sandbox: Sandbox | None = None,
                 max_limits: dict[str, float] | None = None, max_connections: int | None = None,
                 request_timeout: float = 30.0, io_timeout: float = 60.0, max_buffered: int | None = None,
                 token: str | None = None, insecure: bool = False):
        self.check_access(host, token, insecure)
        for name, v in (("workers", workers), ("max_queue", max_queue)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= (0 if name == "max_queue" else 1e-3):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        self.sandbox = sandbox or Sandbox()
        unknown = set(max_limits or {}) - set(DEFAULT_MAX_LIMITS)
        if unknown:
            raise ValueError(f"unknown limits in max_limits: {sorted(unknown)} (known: {sorted(DEFAULT_MAX_LIMITS)})")
        self.max_limits = {**DEFAULT_MAX_LIMITS, **(max_limits or {})}
        for k, cap in self.max_limits.items():
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
                raise ValueError(f"maximum of {k} must be a positive number, got {cap!r}")
            default = getattr(self.sandbox.limits, k)
            if default > cap:
                raise ValueError(f"the sandbox's default {k}={default} is over its maximum {cap}")
        self.sandbox.check()
        super().__init__(host, port, _Handler, max_body=max_body,
                         max_connections=max_connections or workers + max_queue + 16,
                         request_timeout=request_timeout, io_timeout=io_timeout, max_buffered=max_buffered,
                         token=token, insecure=insecure)
        self._slots = threading.Semaphore(workers)
        self._capacity = workers + max_queue
        self.busy = 0
        self.queued = 0

    def health(self) -> dict[str, Any]:
        """What GET /health answers: the runs going and waiting, the limits' maximums."""
        return {"ok": True, "busy": self.busy, "queued": self.queued, "connections": self.connections,
                "max_limits": self.max_limits}

    def admit(self) -> bool:
        with self._lock:
            if self.busy + self.queued >= self._capacity:
                return False
            self.queued += 1
        self._slots.acquire()
        with self._lock:
            self.queued -= 1
            self.busy += 1
        return True

    def release(self) -> None:
        with self._lock:
            self.busy -= 1
        self._slots.release()


def serve(host: str = "127.0.0.1", port: int = 8377, **kw: Any) -> None:
    SandboxServer(host, port, **kw).run()
