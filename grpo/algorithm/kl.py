"""Per-token KL estimators between the policy and a reference (Schulman's k1/k2/k3).

Samples come from the policy, so each estimates KL(policy || ref) per token.
Pure tensor code: imports only torch.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """logp, ref_logp: [N, T] log-probs of the sampled tokens. Returns [N, T].

    k1 = logp - ref_logp                              unbiased, can be negative
    k2 = (logp - ref_logp)^2 / 2                      biased, low variance
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 unbiased, always >= 0
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if estimator == "k3":
        # Clamp the exponent: a token the reference finds impossible must not give inf.
        d = (ref_logp - logp).clamp(-20.0, 20.0)  # [N, T]
        return torch.exp(d) - d - 1.0
    raise ValueError(f"kl_estimator must be one of {ESTIMATORS}, got {estimator!r}")
