"""Token log-probs through the LM head a chunk of tokens at a time, so that the [rows, tokens, vocab]
float32 logits are never held: neither in the forward nor, by recomputing each chunk's logits, in the
backward. Pure tensor code (torch only); grpo/parts/batch.py feeds it the model's last hidden states.

    logp, entropy = chunked_logprobs(hidden, head.weight, head.bias, targets, temperature, 1024, True)

The chunks run over the N * T tokens flattened, not over rows: the extra memory is then [chunk, V]
whatever the shape of the batch (a long row is cut, many short rows share a chunk), and the number
of chunks is ceil(N * T / chunk), with no half-empty chunk at the end of every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     temperature: float = 1.0, chunk: int = 1024, with_entropy: bool = False):
    """log softmax(head(hidden) / temperature) at `targets`, `chunk` tokens at a time.

    hidden [N, T, H] (any dtype; a gradient flows back to it), weight [V, H] and bias [V] or None (the
    LM head's; gradients flow to them too), targets [N, T] token ids. Returns logp [N, T] float32 and,
    with `with_entropy`, entropy [N, T] float32 of the same distribution (no gradient). The values
    are those of `log_softmax(F.linear(hidden, weight, bias).float() / temperature)` gathered at
    targets; peak extra memory is a few [chunk, V] float32 buffers instead of [N, T, V] ones.
    chunk <= 0: all tokens in one chunk.
    """
    N, T, H = hidden.shape
    flat = hidden.reshape(N * T, H)  # [M, H]
    out = _ChunkedLogprobs.apply(flat, weight, bias, targets.reshape(N * T), float(temperature),
                                 int(chunk) if chunk > 0 else max(N * T, 1), bool(with_entropy))
    logp, entropy = out
    if not with_entropy:
        return logp.view(N, T)
    return logp.view(N, T), entropy.view(N, T)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """[c, V] float32 logits / temperature of the hidden states h [c, H], as the unchunked path takes them."""
    return F.linear(h, weight, bias).float() / temperature


class _ChunkedLogprobs(torch.autograd.Function):
    """(hidden [M, H], weight [V, H], bias [V] | None, targets [M]) -> (logp [M], entropy [M] or [0]).

    Backward: d logp_m / d z_m = onehot(y_m) - softmax(z_m) for z_m the tempered logits, so with the
    upstream gradient g [M]: dz = g * (onehot - p) / temperature per chunk, then dh = dz @ W and
    dW += dz^T @ h, db += sum(dz). Each chunk's logits are recomputed from h (one extra head matmul
    per chunk, the price of never keeping them)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy):
        M = hidden.shape[0]
        logp = torch.empty(M, dtype=torch.float32, device=hidden.device)  # [M]
        entropy = torch.empty(M if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for s in range(0, M, chunk):
                e = min(s + chunk, M)
                logp_all = torch.log_softmax(_logits(hidden[s:e], weight, bias, temperature), dim=-1)  # [c, V]
                logp[s:e] = logp_all.gather(-1, targets[s:e].unsqueeze(-1)).squeeze(-1)
                if with_entropy:
                    entropy[s:e] = -(logp_all.exp() * logp_all).sum(-1)
                del logp_all
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, _g_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        temperature, chunk = ctx.temperature, ctx.chunk
        M = hidden.shape[0]
        g_h = torch.empty_like(hidden) if need_h else None  # [M, H]
        g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # [V, H]
        g_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None  # [V]
        if need_h or need_w or need_b:
            for s in range(0, M, chunk):
                e = min(s + chunk, M)
                h = hidden[s:e]  # [c, H]
                g = g_logp[s:e].float().unsqueeze(-1)  # [c, 1]
                with torch.no_grad():
                    # as log_softmax's own backward: onehot * g - exp(logp_all) * g, then / temperature
                    dz = torch.log_softmax(_logits(h, weight, bias, temperature), dim=-1).exp_().mul_(-g)  # [c, V]
                    dz.scatter_add_(-1, targets[s:e].unsqueeze(-1), g)
                    dz = dz.div_(temperature).to(weight.dtype)  # the gradient of .float(): back to the head's dtype
                    if need_h:
                        g_h[s:e] = dz @ weight
                    if need_w and weight.dtype == torch.float32:
                        g_w.addmm_(dz.t(), h)  # [V, H], no temporary
                    elif need_w:  # a half-precision head: each chunk's product rounded once, summed in float32
                        g_w += (dz.t() @ h.to(weight.dtype)).float()
                    if need_b:
                        g_b += dz.float().sum(0)
                    del dz
        return (g_h, g_w.to(weight.dtype) if need_w else None, g_b.to(bias.dtype) if need_b else None,
                None, None, None, None)
