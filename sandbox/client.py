"""Client of the sandbox service (``sandbox/server.py``); ``run`` mirrors ``Sandbox.run``."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from typing import Any

from grpo.sandbox.core import Limits, Result


class SandboxServiceError(RuntimeError):
    pass


class SandboxClient:
    """Talks to one or more sandbox services; a busy (503) or unreachable one is retried on
    another (or the same, after a short backoff) up to ``retries`` times."""

    def __init__(self, urls: str | list[str], *, timeout: float = 120.0, retries: int = 5):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.timeout = timeout
        self.retries = retries

    def run(self, program: bytes | str, stdin: bytes | str = b"", limits: Limits | dict | None = None, *,
            files: dict[str, bytes | str] | None = None, args: tuple[str, ...] = (), channel: bool = False,
            secret_in: bytes | None = None) -> Result:
        def text(x: bytes | str) -> str:
            return x.decode("utf-8") if isinstance(x, bytes) else x
        body = {"program": text(program), "stdin": text(stdin),
                "limits": asdict(limits) if isinstance(limits, Limits) else (limits or {}),
                "files": {k: text(v) for k, v in (files or {}).items()}, "args": list(args),
                "channel": channel, "secret_in": text(secret_in) if secret_in is not None else None}
        data = json.dumps(body).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            url = random.choice(self.urls) + "/run"
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    d = json.loads(resp.read())
                for k in ("stdout", "stderr", "channel"):
                    d[k] = d[k].encode("utf-8")
                return Result(**d)
            except urllib.error.HTTPError as e:
                if e.code not in (503, 502, 504):
                    raise SandboxServiceError(f"{url}: HTTP {e.code}: {e.read()[:300]!r}") from None
                last = e
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last = e
            time.sleep(min(2.0, 0.05 * 2 ** attempt))
        raise SandboxServiceError(f"no sandbox service answered: {last}")

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.urls[0] + "/health", timeout=10) as resp:
            return json.loads(resp.read())
