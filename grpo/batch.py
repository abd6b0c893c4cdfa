"""The rollout batch as a named structure, and the one forward helper that scores it.

    ro = engine.generate(prompts, G, sampling)
    batch = pack(ro.prompt_ids, ro.completion_ids, pad_id).to(device)   # RolloutBatch
    logp = batch_logprobs(model, batch[rows], temperature)              # [n, T]
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class RolloutBatch:
    """N rows of prompt + completion; every completion starts at column P.

    input_ids, attention_mask, position_ids: [N, P+T] (prompts left-padded, completions right-padded)
    completion_ids, mask: [N, T]; mask is 1 on real completion tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_ids: torch.Tensor
    mask: torch.Tensor

    @property
    def T(self) -> int:
        return self.mask.shape[1]

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, rows: slice) -> RolloutBatch:
        return RolloutBatch(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> RolloutBatch:
    """Left-pad prompts and right-pad completions so every completion starts at column P.

    Positions count real tokens only, as generate() does with left padding, so both compute the
    same log-probs.
    """
    P = max(len(p) for p in prompts)
    T = max(1, max(len(c) for c in completions))
    N = len(prompts)
    ids = torch.full((N, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((N, P + T), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
        if c:
            ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[i, P:P + len(c)] = 1
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)  # [N, P+T]
    return RolloutBatch(ids, attn, pos, ids[:, P:], attn[:, P:].clone())


def token_logprobs(model, input_ids, attention_mask, position_ids, T: int, temperature: float = 1.0,
                   with_entropy: bool = False):
    """Log-probs of the last T tokens of each row under logits / temperature.

    input_ids, attention_mask, position_ids: [N, P+T]. Returns logp [N, T] (and entropy [N, T]).
    Only the T+1 last positions go through the LM head, which keeps memory at [N, T, V].
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=T + 1, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature  # [N, T, V]; position t predicts token t+1
    logp_all = torch.log_softmax(logits, dim=-1)  # [N, T, V]
    targets = input_ids[:, -T:]  # [N, T]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, T]
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # [N, T]
    return logp, entropy


def batch_logprobs(model, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False):
    """token_logprobs over a RolloutBatch: logp [N, T] (and entropy [N, T])."""
    return token_logprobs(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.T, temperature,
                          with_entropy)


def engine_logprobs(logprobs: list[list[float]], T: int, device) -> torch.Tensor:
    """A Rollout's ragged sampling log-probs as [N, T], aligned with pack()'s completion columns (0 on padding)."""
    out = torch.zeros(len(logprobs), T, device=device)
    for i, lp in enumerate(logprobs):
        out[i, :len(lp)] = torch.tensor(lp)
    return out
