"""``grpo sandbox ...``: run a file in the sandbox, or serve sandboxes over HTTP."""

from __future__ import annotations

import argparse
import json
import sys

from grpo.sandbox.core import Limits, Sandbox, SandboxUnavailable


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grpo sandbox", description="Run untrusted programs in an OS-level sandbox.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a Python file in a fresh sandbox")
    r.add_argument("file")
    r.add_argument("--stdin", help="file to feed on stdin")
    r.add_argument("--timeout", type=float, default=10.0, help="wall and CPU seconds")
    r.add_argument("--memory-mb", type=int, default=1024)
    r.add_argument("--json", action="store_true", help="print the whole result as JSON")
    s = sub.add_parser("serve", help="serve sandboxes over HTTP (a shared token beyond loopback)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8377)
    s.add_argument("--workers", type=int, default=2, help="sandboxes running at once")
    s.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait")
    s.add_argument("--max-body", type=int, default=16 << 20, help="largest request in bytes")
    s.add_argument("--token-file", help="file whose first line is the shared token clients must send "
                   "(default: $GRPO_SANDBOX_TOKEN, or the file named by $GRPO_SANDBOX_TOKEN_FILE)")
    s.add_argument("--token", help="the shared token itself (visible in `ps`: prefer --token-file or the variable)")
    s.add_argument("--insecure", action="store_true",
                   help="allow a bind beyond loopback without a token (anyone who reaches the port runs code)")
    s.add_argument("--max-connections", type=int, default=None,
                   help="connections served at once; more are answered 503 (default: workers + max-queue + 16)")
    s.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds a client has to send a whole request (line, headers and body)")
    s.add_argument("--max-limit", action="append", default=[], metavar="KEY=VALUE",
                   help="raise or lower the maximum of a run limit (repeatable), e.g. stdout_bytes=16777216")
    a = p.parse_args(argv)
    try:
        if a.cmd == "run":
            with open(a.file, "rb") as f:
                program = f.read()
            stdin = b""
            if a.stdin:
                with open(a.stdin, "rb") as f:
                    stdin = f.read()
            res = Sandbox().run(program, stdin, Limits(wall_time=a.timeout, cpu_time=a.timeout, memory_mb=a.memory_mb))
            if a.json:
                print(json.dumps(res.to_json(), indent=2))
            else:
                sys.stdout.buffer.write(res.stdout)
                sys.stderr.buffer.write(res.stderr)
                sys.stdout.flush()
                print(f"[sandbox] status={res.status} exit={res.exit_code} wall={res.wall_time}s", file=sys.stderr)
            return 0 if res.status == "ok" else (res.exit_code or 1)
        from grpo.sandbox.client import load_token
        from grpo.sandbox.server import serve
        serve(a.host, a.port, workers=a.workers, max_queue=a.max_queue, max_body=a.max_body,
              max_limits=_max_limits(a.max_limit), max_connections=a.max_connections,
              request_timeout=a.request_timeout, token=load_token(a.token, a.token_file), insecure=a.insecure)
        return 0
    except (SandboxUnavailable, ValueError) as e:
        print(f"grpo sandbox: {e}", file=sys.stderr)
        return 2


def _max_limits(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = int(value) if value.strip().isdigit() else float(value)
        except ValueError:
            raise ValueError(f"--max-limit {item!r}: expected KEY=NUMBER, e.g. stdout_bytes=16777216") from None
    return out
