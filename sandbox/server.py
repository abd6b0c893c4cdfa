"""HTTP service around the sandbox, so trainers on many nodes can share a sandbox fleet.

POST /run  {"program": str, "stdin": str, "limits": {...}, "files": {name: str}, "args": [str],
            "channel": bool, "secret_in": str}  ->  Result as JSON (outputs as UTF-8 text).
GET /health -> {"ok": true, "busy": n, "queued": n}

The service runs at most ``workers`` sandboxes at once and lets at most ``max_queue`` more
requests wait; beyond that it answers 503 at once (clients retry elsewhere). Bodies over
``max_body`` bytes get 413. A program crashing, timing out or flooding output only ends its own
sandbox. No authentication: bind it to loopback or a private network only.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from grpo.sandbox.core import Limits, Sandbox


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, bounded in total by the handler's ``read_deadline``: a client that
    sends its request line, headers or body slowly (a byte now and then) or not at all loses the
    connection at the deadline, whatever the pace; a per-read timeout alone would never fire."""

    def __init__(self, handler: "_Handler"):
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


class _Handler(BaseHTTPRequestHandler):
    server: "SandboxServer"
    protocol_version = "HTTP/1.1"
    read_deadline: float | None = None

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per run is too many
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

    def _reply(self, code: int, obj: Any, *, close: bool = False) -> None:
        body = json.dumps(obj).encode()
        self.connection.settimeout(self.server.io_timeout)  # a client that does not read loses it
        if close:
            self.close_connection = True
        self.send_response(code)
        if close:
            self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, {"ok": True, "busy": self.server.busy, "queued": self.server.queued,
                              "connections": self.server.connections,
                              "max_limits": self.server.max_limits})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path != "/run":
            self._reply(404, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if length < 0:
            self._reply(411, {"error": "Content-Length required"})
            return
        if length > self.server.max_body:
            self._reply(413, {"error": f"request over {self.server.max_body} bytes"}, close=True)  # body unread
            return
        if not self.server.reserve(length):  # what all the bodies being read or run may hold at once
            self._reply(503, {"error": "busy (request bodies)"}, close=True)
            return
        try:
            self._post(length)
        finally:
            self.server.unreserve(length)

    def _post(self, length: int) -> None:
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
        try:
            req = json.loads(raw)
            if not isinstance(req, dict) or not isinstance(req.get("program"), str):
                raise ValueError("'program' (a string) is required")
            limits = Limits.from_dict({**self.server.sandbox.limits.__dict__, **(req.get("limits") or {})})
            for k, cap in self.server.max_limits.items():
                if getattr(limits, k) > cap:
                    raise ValueError(f"limit {k} over the service's maximum {cap}")
            secret = req.get("secret_in")
            kwargs = {"files": req.get("files") or None, "args": tuple(req.get("args") or ()),
                      "channel": bool(req.get("channel")),
                      "secret_in": secret.encode() if isinstance(secret, str) else None}
            stdin = req.get("stdin") or ""
        except (ValueError, TypeError) as e:
            self._reply(400, {"error": str(e)[:300]})
            return
        if not self.server.admit():
            self._reply(503, {"error": "busy"})
            return
        try:
            result = self.server.sandbox.run(req["program"], stdin, limits, **kwargs)
            self._reply(200, result.to_json())
        except Exception as e:  # a failure of one run must not take the service down
            self._reply(500, {"error": f"{type(e).__name__}: {e}"[:300]})
        finally:
            self.server.release()


# Every limit has a maximum (a request over one gets 400): the run's resources (memory, /tmp in the
# host's shared memory, file sizes, descriptors) and what the server itself buffers (stdout and the
# channel, stderr) are bounded per run. Raise them with max_limits / `--max-limit KEY=VALUE`.
DEFAULT_MAX_LIMITS: dict[str, float] = {
    "wall_time": 60, "cpu_time": 60, "memory_mb": 4096, "max_procs": 256, "file_size_mb": 256,
    "open_files": 1024, "tmp_size_mb": 256, "stdout_bytes": 8 << 20, "stderr_bytes": 1 << 20,
}


_BUSY = b'{"error": "busy (too many connections)"}'
_TOO_MANY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
             b"Connection: close\r\n\r\n%s" % (len(_BUSY), _BUSY))


class SandboxServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog (socketserver's 5 drops connections of a burst for 1 s)

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, workers: int = 2, max_queue: int = 64,
                 max_body: int = 16 << 20, sandbox: Sandbox | None = None,
                 max_limits: dict[str, float] | None = None, max_connections: int | None = None,
                 request_timeout: float = 30.0, io_timeout: float = 60.0, max_buffered: int | None = None):
        for name, v in (("workers", workers), ("max_queue", max_queue), ("max_body", max_body),
                        ("request_timeout", request_timeout), ("io_timeout", io_timeout)):
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
        super().__init__((host, port), _Handler)
        self.max_body = max_body
        # Each connection holds a thread from its first byte: at most max_connections at once (the
        # others are answered 503 and closed at once), each reading its request within
        # request_timeout, all their bodies together at most max_buffered bytes.
        self.max_connections = max_connections or workers + max_queue + 16
        self.request_timeout = float(request_timeout)
        self.io_timeout = float(io_timeout)
        self.max_buffered = max_buffered or max(256 << 20, 2 * max_body)
        self._conn_slots = threading.BoundedSemaphore(self.max_connections)
        self.connections = 0
        self._buffered = 0
        self._slots = threading.Semaphore(workers)
        self._lock = threading.Lock()
        self._capacity = workers + max_queue
        self.busy = 0
        self.queued = 0

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

    def _conn_done(self) -> None:
        with self._lock:
            self.connections -= 1
        self._conn_slots.release()

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self._buffered + n > self.max_buffered:
                return False
            self._buffered += n
            return True

    def unreserve(self, n: int) -> None:
        with self._lock:
            self._buffered -= n

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

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def serve(host: str = "127.0.0.1", port: int = 8377, **kw: Any) -> None:
    srv = SandboxServer(host, port, **kw)
    print(f"sandbox service on {srv.url}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
