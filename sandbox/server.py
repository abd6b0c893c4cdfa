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

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from grpo.sandbox.core import Limits, Sandbox


class _Handler(BaseHTTPRequestHandler):
    server: "SandboxServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per run is too many
        pass

    def _reply(self, code: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, {"ok": True, "busy": self.server.busy, "queued": self.server.queued,
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
            self.close_connection = True  # do not read the oversized body
            self._reply(413, {"error": f"request over {self.server.max_body} bytes"})
            return
        try:
            req = json.loads(self.rfile.read(length))
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


class SandboxServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, workers: int = 2, max_queue: int = 64,
                 max_body: int = 16 << 20, sandbox: Sandbox | None = None,
                 max_limits: dict[str, float] | None = None):
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
        self._slots = threading.Semaphore(workers)
        self._lock = threading.Lock()
        self._capacity = workers + max_queue
        self.busy = 0
        self.queued = 0

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
