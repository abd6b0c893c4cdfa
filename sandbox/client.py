"""Client of the sandbox service (``sandbox/server.py``); ``run`` mirrors ``Sandbox.run``."""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from typing import Any

from grpo.sandbox.core import Limits, Result


class SandboxServiceError(RuntimeError):
    pass


TOKEN_ENV = "GRPO_SANDBOX_TOKEN"
TOKEN_FILE_ENV = "GRPO_SANDBOX_TOKEN_FILE"


def load_token(token: str | None = None, token_file: str | None = None, env: str = TOKEN_ENV,
               file_env: str = TOKEN_FILE_ENV, what: str = "sandbox") -> str | None:
    """The shared token of the sandbox service(s): ``token``, else the first line of ``token_file``,
    else ``$GRPO_SANDBOX_TOKEN``, else the file named by ``$GRPO_SANDBOX_TOKEN_FILE``, else None.
    Another service's tokens: its own variables `env` and `file_env`, its name `what` in the errors."""
    if token:
        return token
    token_file = token_file or None
    if token_file is None:
        if os.environ.get(env):
            return os.environ[env].strip()
        token_file = os.environ.get(file_env) or None
    if token_file is None:
        return None
    try:
        with open(os.path.expanduser(token_file), encoding="utf-8") as f:
            tok = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} token file {token_file}: {e}") from None
    if not tok:
        raise ValueError(f"{what} token file {token_file} is empty")
    return tok


class SandboxClient:
    """Talks to one or more sandbox services; a busy (503) or unreachable one is retried on
    another (or the same, after a short backoff) up to ``retries`` times. ``token`` (default:
    ``load_token()``, i.e. ``$GRPO_SANDBOX_TOKEN`` or ``$GRPO_SANDBOX_TOKEN_FILE``) is sent as
    ``Authorization: Bearer`` to services started with one."""

    def __init__(self, urls: str | list[str], *, timeout: float = 120.0, retries: int = 5,
                 token: str | None = None, token_file: str | None = None):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.timeout = timeout
        self.retries = retries
        self._token = load_token(token, token_file)

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self._token:
            h["Authorization"] = f"Bearer {self._token}"
        return h

    @staticmethod
    def _refused(url: str, e: urllib.error.HTTPError) -> SandboxServiceError:
        detail = e.read()[:300]
        if e.code == 401:
            return SandboxServiceError(
                f"{url}: HTTP 401: the sandbox service wants its token (set {TOKEN_ENV} or {TOKEN_FILE_ENV}, or "
                f"the code verifier's sandbox_token_file; it is the one given to `grpo sandbox serve`)")
        return SandboxServiceError(f"{url}: HTTP {e.code}: {detail!r}")

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
            req = urllib.request.Request(url, data=data, headers=self._headers())
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    d = json.loads(resp.read())
                for k in ("stdout", "stderr", "channel"):
                    d[k] = d[k].encode("utf-8")
                return Result(**d)
            except urllib.error.HTTPError as e:
                if e.code not in (503, 502, 504):
                    raise self._refused(url, e) from None
                last = e
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last = e
            time.sleep(min(2.0, 0.05 * 2 ** attempt))
        raise SandboxServiceError(f"no sandbox service answered: {last}")

    def health(self) -> dict[str, Any]:
        url = self.urls[0] + "/health"
        req = urllib.request.Request(url, headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise self._refused(url, e) from None
