"""`grpo sandbox run|serve`: the sandbox's own command line (grpo/sandbox/cli.py), reached from `grpo`."""

from __future__ import annotations

from grpo.parts.config import UserError


def sandbox_main(argv: list[str]) -> int:
    try:
        from grpo.sandbox.cli import cli_main
    except ImportError as e:
        raise UserError(f"the sandbox is not available: {e}") from e
    return cli_main(argv)
