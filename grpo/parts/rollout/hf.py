"""Rollouts with the trainer's own transformers model: batched, KV cache, left padding, stops at EOS.

The engine holds the trainer's own model object, so there are no weights to sync. It runs its own
decoding loop on the model's forward rather than ``generate()``, for three reasons:
  - a prompt is prefilled once and its KV cache copied to its n samples (not prefilled n times);
  - a row that finished (EOS or a stop string) leaves the batch and its cache, so the remaining
    steps cost the rows still going, not the longest row times all;
  - nothing touches the logits but temperature, top-k and top-p: no logits processor from the
    model's generation_config (repetition penalties ...), whose distribution the trainer's
    log-probs would never see.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from grpo.parts.rollout.base import Rollout, SamplingParams


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] ragged -> input_ids [B, L], attention_mask [B, L], padded on the left."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, L - len(s):] = 1
    return ids, mask


def pick(logits: torch.Tensor, sp: SamplingParams, rows: torch.Tensor | None = None,
         total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row and its log-prob at temperature before truncation.

    logits: [k, V] float. Greedy (temperature 0): the argmax, with its T = 1 log-prob. Otherwise
    logits / T, then top-k, then top-p (the smallest set of most likely tokens whose probability
    reaches top_p), then one draw from what is left. Returns tokens [k], logprobs [k].

    `rows` [k] places the k rows among `total` (rows that finished are gone): the draw is made
    for all `total` rows, the finished ones from a point mass, so the random stream a batch
    consumes does not depend on when its rows finish (the same samples as decoding every row to
    the end, as generate() does, under the same seed)."""
    if sp.temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(1)
    scaled = logits / sp.temperature
    logp = torch.log_softmax(scaled, -1)  # [k, V]
    keep = scaled
    if sp.top_k and sp.top_k < scaled.shape[-1]:
        kth = scaled.topk(sp.top_k, -1).values[:, -1:]  # [k, 1]
        keep = keep.masked_fill(scaled < kth, float("-inf"))
    if sp.top_p < 1.0:
        probs, order = torch.softmax(keep, -1).sort(-1, descending=True)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop = torch.zeros_like(keep, dtype=torch.bool).scatter_(-1, order, before >= sp.top_p)
        keep = keep.masked_fill(drop, float("-inf"))
    probs = torch.softmax(keep, -1)  # [k, V]
    if rows is not None and total is not None and total > len(rows):
        full = torch.zeros(total, probs.shape[1], dtype=probs.dtype, device=probs.device)
        full[:, 0] = 1.0
        full[rows] = probs
        tok = torch.multinomial(full, 1).squeeze(1)[rows]
    else:
        tok = torch.multinomial(probs, 1).squeeze(1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(1)


class HFEngine:
    """`lockstep` (grpo.parts.distributed.Lockstep): for a model sharded over ranks, whose every forward
    is a collective; the ranks then run as many forwards each, whatever their prompts."""

    def __init__(self, model, tokenizer, batch_size: int = 256, lockstep=None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.lockstep = lockstep
        from grpo.parts.distributed import Forward
        from grpo.parts.modeling import eos_ids

        self.eos_ids = eos_ids(tokenizer, model.model if isinstance(model, Forward) else model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        rows = [p for p in prompt_ids for _ in range(n)]  # [N] prompt-major
        out = Rollout(prompt_ids=rows, completion_ids=[], texts=[], logprobs=[], finished=[])
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        was_training = self.model.training
        self.model.eval()
        per = max(1, self.batch_size // n)  # whole prompts per chunk: their n samples share one prefill
        try:
            for start in range(0, len(prompt_ids), per):
                self._generate_chunk(prompt_ids[start:start + per], n, sampling, out)
            if self.lockstep is not None:
                self.lockstep.drain(self.model, next(self.model.parameters()).device)
        finally:
            self.model.train(was_training)
        return out

    def _forward(self, **kwargs):
        if self.lockstep is not None:
            self.lockstep.before_forward()
        return self.model(**kwargs)

    def _generate_chunk(self, prompts: list[list[int]], n: int, sp: SamplingParams, out: Rollout) -> None:
        ids, mask = left_pad(prompts, self.pad_id)  # [b, P]
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # positions count real tokens only
        res = self._forward(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits = res.past_key_values, res.logits[:, -1].float()  # logits [b, V]
        if n > 1:  # the n samples of a prompt continue one prefill
            cache.batch_repeat_interleave(n)
            logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        N = logits.shape[0]
        nxt = mask.sum(1, keepdim=True)  # [N, 1] the next token's position
        live = torch.arange(N, device=device)  # rows still decoding, as indices into the chunk
        toks: list[list[int]] = [[] for _ in range(N)]
        lps: list[list[float]] = [[] for _ in range(N)]
        finished = [False] * N
        eos = torch.tensor(self.eos_ids, device=device)
        for step in range(sp.max_new_tokens):
            tok, lp = pick(logits, sp, live, N)  # [k], [k]
            done = torch.isin(tok, eos)
            for j, (i, t, v) in enumerate(zip(live.tolist(), tok.tolist(), lp.tolist())):
                toks[i].append(t)
                lps[i].append(v)
                if not done[j] and sp.stop:
                    tail = self.tokenizer.decode(toks[i][-_STOP_WINDOW:], skip_special_tokens=True)
                    done[j] = any(s in tail for s in sp.stop)
            for i in live[done].tolist():
                finished[i] = True
            if step == sp.max_new_tokens - 1 or bool(done.all()):
                break
            if bool(done.any()):  # finished rows leave the batch and the cache
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                live, tok, mask, nxt = live[keep], tok[keep], mask[keep], nxt[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            res = self._forward(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt, past_key_values=cache,
                             use_cache=True)
            cache, logits = res.past_key_values, res.logits[:, -1].float()
            nxt = nxt + 1
        for i in range(N):
            length = len(toks[i])
            if sp.stop and finished[i] and toks[i][-1] not in self.eos_ids:
                length = _stop_end(toks[i], sp.stop, self.tokenizer) or length
            out.completion_ids.append(toks[i][:length])
            out.logprobs.append(lps[i][:length])
            out.texts.append(self.tokenizer.decode(toks[i][:length], skip_special_tokens=True))
            out.finished.append(finished[i])

    def update_weights(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The engine shares the trainer's module: nothing to copy."""

    @torch.no_grad()
    def load_weights_file(self, path: str) -> None:
        """Copy a safetensors file of plain transformers-named tensors (what a trainer's
        `whole_parameters` gives) into the model, cast to its dtype: how a rollout server
        (grpo/parts/rollout/server.py) takes the trainer's pushes. A file that does not hold exactly
        the model's parameters, at their shapes, is a ValueError naming them; nothing is copied then."""
        from safetensors.torch import load_file

        state = load_file(path)
        params = dict(self.model.named_parameters())  # a tied parameter once, under its first name
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        wrong = sorted(k for k in set(params) & set(state) if state[k].shape != params[k].shape)
        if missing or extra or wrong:
            raise ValueError(f"the weights do not fit the served model: missing {missing[:4]}, unknown {extra[:4]}, "
                             f"other shapes {wrong[:4]} (the trainer's model.path is another model?)")
        for name, p in params.items():
            p.copy_(state[name])

    def close(self) -> None:
        pass


# Tokens decoded to look for a stop string as a row grows: enough for any stop string of up to 16
# tokens (a stop string already seen would have ended the row earlier).
_STOP_WINDOW = 16


def _stop_end(toks: list[int], stops: list[str], tokenizer) -> int | None:
    """Number of tokens up to and including the one that completes the first stop string, if any."""
    for t in range(1, len(toks) + 1):
        if any(s in tokenizer.decode(toks[:t], skip_special_tokens=True) for s in stops):
            return t
    return None
