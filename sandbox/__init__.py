"""OS-level sandbox for untrusted programs; see sandbox/core.py for the threat model."""

from grpo.sandbox.core import Image, Limits, Result, Sandbox, SandboxUnavailable, default_sandbox, run

__all__ = ["Image", "Limits", "Result", "Sandbox", "SandboxUnavailable", "default_sandbox", "run"]
