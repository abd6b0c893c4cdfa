"""An example grpo verifier plugin (see verifier.py)."""

from grpo_concise.verifier import ConciseVerifier

__all__ = ["ConciseVerifier"]
