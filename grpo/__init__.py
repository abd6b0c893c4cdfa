"""GRPO: reinforcement learning for language models, from verifiable rewards and from human preferences.

`grpo` is the only top-level import name this project installs. The repository keeps the folders
verifiers/, tasks/, sandbox/ and conf/ beside grpo/; the wheel installs them as grpo.verifiers,
grpo.tasks, grpo.sandbox and grpo.conf (pyproject's package-dir). In a source checkout the next
lines give the same names by letting the `grpo` package also look in the checkout's root.
"""

from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
if not (_here / "verifiers").is_dir() and (_here.parent / "verifiers" / "__init__.py").is_file() \
        and (_here.parent / "pyproject.toml").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 - a package's __path__: grpo.verifiers -> <root>/verifiers

# The public tensor functions, imported on first use: `import grpo.verifiers...` (the math verifier's
# worker processes) must not pay for importing torch.
_PUBLIC = {
    "group_advantages": "grpo.algorithm.advantages", "kl_penalty": "grpo.algorithm.kl", "policy_loss": "grpo.algorithm.losses",
    "aggregate": "grpo.algorithm.losses",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'grpo' has no attribute {name!r}")
