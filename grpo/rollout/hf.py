"""Rollouts with transformers' ``generate``: batched, KV cache, left padding, stops at EOS.

The engine holds the trainer's own model object, so there are no weights to sync.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from grpo.rollout.base import Rollout, SamplingParams


NEUTRAL_PROCESSING = dict(
    repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
    typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, min_p=0.0, suppress_tokens=[],
    begin_suppress_tokens=[], renormalize_logits=False,
)


def neutral_processing(generation_config) -> dict:
    """generate() overrides that switch off the logits processors a model's generation_config asks
    for (repetition penalties and the like): the trainer's log-probs see none of them, so the engine
    must not sample with them. Only the keys the model sets are overridden: passing a neutral value
    for an unset key is not free (``min_p=0`` or ``suppress_tokens=[]`` adds a processor that runs at
    every decoding step and does nothing, and transformers warns about the flag)."""
    return {k: v for k, v in NEUTRAL_PROCESSING.items() if getattr(generation_config, k, None) not in (None, v)}


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


class HFEngine:
    def __init__(self, model, tokenizer, batch_size: int = 256, prefill_once: bool = True):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.prefill_once = prefill_once  # the n samples of a prompt share one prefill (see _prefill)
        self.eos_ids = _eos_ids(model, tokenizer)
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
        finally:
            self.model.train(was_training)
        return out

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, n: int):
        """The KV cache of every prompt but its last token, computed once and copied for its n
        samples: generate() then feeds only the last token, so the prompt costs one forward per
        group instead of n. Positions count real tokens, as generate() counts them."""
        if not self.prefill_once or n == 1 or ids.shape[1] < 2:
            return None
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        cache = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                           use_cache=True).past_key_values
        if not hasattr(cache, "batch_repeat_interleave"):  # a cache type that cannot be copied per sample
            return None
        cache.batch_repeat_interleave(n)
        return cache

    def _generate_chunk(self, prompts: list[list[int]], n: int, sp: SamplingParams, out: Rollout) -> None:
        ids, mask = left_pad(prompts, self.pad_id)  # [b, P]
        cache = self._prefill(ids, mask, n)
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)  # [b * n, P] prompt-major
        greedy = sp.temperature <= 0
        kwargs = dict(
            do_sample=not greedy,
            max_new_tokens=sp.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_logits=True,
            use_cache=True,
            **neutral_processing(self.model.generation_config),
        )
        if not greedy:
            kwargs.update(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k or None)
        if sp.stop:
            kwargs.update(stop_strings=list(sp.stop), tokenizer=self.tokenizer)
        if cache is not None:
            kwargs["past_key_values"] = cache
        gen = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new = gen.sequences[:, ids.shape[1]:]  # [B, T]
        # Sampling log-probs at temperature, before truncation; greedy decoding uses T = 1.
        logits = torch.stack(gen.logits, dim=1).float()  # [B, T, V]
        temp = sp.temperature if not greedy else 1.0
        lp = torch.log_softmax(logits / temp, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)  # [B, T]
        for i in range(new.shape[0]):
            toks = new[i].tolist()
            # generate() pads finished rows; with pad == eos a stop-string row ends in padding that
            # looks like EOS, so the stop string is looked for first, then the first EOS.
            eos_at = next((t for t, tok in enumerate(toks) if tok in self.eos_ids), None)
            length, finished = (eos_at + 1, True) if eos_at is not None else (len(toks), False)
            if sp.stop:
                cut = _stop_end(toks[:length], sp.stop, self.tokenizer)
                if cut is not None:
                    length, finished = cut, True
            toks = toks[:length]
            out.completion_ids.append(toks)
            out.logprobs.append(lp[i, :length].tolist())
            out.texts.append(self.tokenizer.decode(toks, skip_special_tokens=True))
            out.finished.append(finished)

    def update_weights(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The engine shares the trainer's module: nothing to copy."""

    def close(self) -> None:
        pass


def _stop_end(toks: list[int], stops: list[str], tokenizer) -> int | None:
    """Number of tokens up to and including the one that completes the first stop string, if any."""
    for t in range(1, len(toks) + 1):
        if any(s in tokenizer.decode(toks[:t], skip_special_tokens=True) for s in stops):
            return t
    return None


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) + [tokenizer.eos_token_id]:
        if e is not None and e not in ids:
            ids.append(int(e))
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model's generation_config names none")
    return ids
