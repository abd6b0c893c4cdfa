"""GRPO: reinforcement learning for language models, from verifiable rewards and from human preferences.

`grpo` is the only top-level import name this project installs. Inside it:
    grpo.algorithm   the algorithm as pure tensor functions (importable from `grpo` itself, below)
    grpo.parts       the shared run parts: the run skeleton, configs, checkpoints, engines, ...
    grpo.commands    one file per `grpo` command
and the repository's verifiers/, tasks/, sandbox/ and conf/ folders, which pyproject's package-dir
installs as grpo.verifiers, grpo.tasks, grpo.sandbox and grpo.conf (an editable install maps them
to the checkout's folders; nothing else in the checkout becomes importable as grpo.*).
"""

# The public tensor functions and estimators: `from grpo import gae, dpo_loss, ...`. Imported on first
# use, so that `import grpo.verifiers...` (the math verifier's worker processes) does not pay for torch.
# Each is documented in the README's "The algorithm, as functions" (tests/algorithm/test_public_api.py checks both).
_PUBLIC = {
    "group_advantages": "grpo.algorithm.advantages", "rloo_advantages": "grpo.algorithm.advantages",
    "reinforce_pp_advantages": "grpo.algorithm.advantages", "varied_groups": "grpo.algorithm.advantages",
    "overlong_penalty": "grpo.algorithm.advantages",
    "kl_penalty": "grpo.algorithm.kl",
    "aggregate": "grpo.algorithm.losses", "policy_loss": "grpo.algorithm.losses",
    "sequence_ratio": "grpo.algorithm.losses", "mismatch_mask": "grpo.algorithm.losses",
    "last_index": "grpo.algorithm.value", "ppo_rewards": "grpo.algorithm.value", "gae": "grpo.algorithm.value",
    "whiten": "grpo.algorithm.value", "value_loss": "grpo.algorithm.value", "AdaptiveKL": "grpo.algorithm.value",
    "pairwise_loss": "grpo.algorithm.preference_losses", "ranking_loss": "grpo.algorithm.preference_losses",
    "pointwise_loss": "grpo.algorithm.preference_losses", "dpo_loss": "grpo.algorithm.preference_losses",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'grpo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
