"""Function tools for the tests: self-contained, standard library only (they run in the sandbox)."""

import os


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    The rest of the docstring is not in the schema."""
    return a * b


def where_am_i() -> str:
    """The process's working directory and whether the host's /work is visible."""
    return f"{os.getcwd()} {os.path.exists('/work')}"
