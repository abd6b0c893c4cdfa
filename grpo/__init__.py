"""GRPO: reinforcement learning from verifiable rewards for language models."""

from grpo.advantages import group_advantages
from grpo.kl import kl_penalty
from grpo.losses import aggregate, policy_loss

__all__ = ["group_advantages", "kl_penalty", "policy_loss", "aggregate"]
__version__ = "0.1.0"
