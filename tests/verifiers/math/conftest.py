"""One verifier per mode serves every math verifier test (each starts a worker pool)."""

import pytest

from grpo.verifiers.math import MathVerifier


@pytest.fixture(scope="session")
def v():
    with MathVerifier(timeout=10) as verifier:  # the defaults: multiple_boxed="last"
        yield verifier


@pytest.fixture(scope="session")
def strict():
    with MathVerifier(timeout=10, multiple_boxed="reject", num_workers=1) as verifier:
        yield verifier
