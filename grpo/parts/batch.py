"""The rollout batch as a named structure, the one forward helper that scores it, and the
micro-batches of a step; and prompt/completion rows as labelled tensors (grpo sft, PPO-ptx).

    ro = engine.generate(prompts, G, sampling)
    batch = pack(ro.prompt_ids, ro.completion_ids, pad_id).to(device)   # RolloutBatch
    logp = batch_logprobs(model, batch[rows], temperature)              # [n, T]
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from grpo.parts.chunked import chunked_logprobs
from grpo.parts.modeling import backbone
from grpo.tasks.base import Sample, TaskError, render_prompt
from grpo.tasks.file import to_sample


class _Tensors:
    """A dataclass of tensors that moves to a device as one."""

    @property
    def T(self) -> int:
        return self.mask.shape[1]

    def to(self, device):
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class RolloutBatch(_Tensors):
    """N rows of prompt + completion; every completion starts at column P.

    input_ids, attention_mask, position_ids: [N, P+T] (prompts left-padded, completions right-padded)
    completion_ids, mask: [N, T]; mask is 1 on real completion tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_ids: torch.Tensor
    mask: torch.Tensor

    def __getitem__(self, rows: slice) -> RolloutBatch:
        return RolloutBatch(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
         model_mask: list[list[int]] | None = None) -> RolloutBatch:
    """Left-pad prompts and right-pad completions so every completion starts at column P.

    Positions count real tokens only, as generate() does with left padding, so both compute the
    same log-probs. `model_mask` (a multi-turn Rollout's): the mask is 0 on the tokens the model did
    not sample (tool results, template), which then get no loss, KL, entropy or gradient.
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
    return RolloutBatch(ids, attn, pos, ids[:, P:], learned(attn[:, P:].clone(), model_mask))


def learned(mask: torch.Tensor, model_mask: list[list[int]] | None) -> torch.Tensor:
    """mask [N, T] (1 on real completion tokens) times a ragged model mask, 0 where the model did not sample."""
    if model_mask is not None:
        for i, m in enumerate(model_mask):
            mask[i, :len(m)] *= torch.tensor(m, dtype=mask.dtype)
    return mask


def token_logprobs(model, input_ids, attention_mask, position_ids, T: int, temperature: float = 1.0,
                   with_entropy: bool = False):
    """Log-probs of the last T tokens of each row under logits / temperature.

    input_ids, attention_mask, position_ids: [N, P+T]. Returns logp [N, T] (and entropy [N, T]).
    Only the T+1 last positions go through the LM head, which keeps memory at [N, T, V]; with a
    logprob chunk set on the model (set_logprob_chunk), at [chunk, V] (grpo/parts/chunked.py).
    """
    chunk = logprob_chunk(model)
    if chunk and not hasattr(model, "get_output_embeddings"):
        # A wrapper (DDP, FSDP2, the reference on the CPU, adapters off): the backbone and the head are
        # called separately, so go inside its forward, where its hooks see the pass (and FSDP2 has
        # gathered the head's weight).
        return model(input_ids, attention_mask, position_ids, T, temperature, with_entropy, fn=token_logprobs)
    if chunk and chunkable(model):
        hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state[:, -T - 1:-1]  # [N, T, H]; t predicts t+1
        head = model.get_output_embeddings()
        return chunked_logprobs(hidden, head.weight, head.bias, input_ids[:, -T:], temperature, chunk, with_entropy)
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


# ---- the shared-prompt layout --------------------------------------------------------------
@dataclass
class GroupBatch(_Tensors):
    """B groups of G completions of one prompt, one row per group: the prompt once, then its G
    completions one after another. Each completion attends to the prompt and to itself only, and
    its positions restart where the prompt ends, so every completion token gets the log-prob it
    gets in its own padded row, while the prompt is computed once per group instead of G times.

    input_ids, position_ids: [B, L] (right-padded to the longest group);
    prompt_lens [B], completion_lens [B, G], lengths [B] (real tokens per row);
    index: [N, T] the row position whose logits predict completion token t (the prompt's last
    position for t = 0); completion_ids, mask: [N, T], N = B * G prompt-major as in RolloutBatch.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    prompt_lens: torch.Tensor
    completion_lens: torch.Tensor
    lengths: torch.Tensor
    index: torch.Tensor
    completion_ids: torch.Tensor
    mask: torch.Tensor

    @property
    def G(self) -> int:
        return self.completion_lens.shape[1]

    def __getitem__(self, rows: slice) -> GroupBatch:
        """The groups whose completions are `rows` (a slice over N that starts and ends on a group),
        cut to their own longest row: a micro-batch costs its real tokens, not the batch's longest."""
        G = self.G
        if rows.start % G or rows.stop % G:
            raise ValueError(f"rows {rows} split a group of {G}")
        g = slice(rows.start // G, rows.stop // G)
        L = int(self.lengths[g].max())
        return GroupBatch(self.input_ids[g, :L], self.position_ids[g, :L], self.prompt_lens[g],
                          self.completion_lens[g], self.lengths[g], self.index[rows], self.completion_ids[rows],
                          self.mask[rows])

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, L, L] additive mask: 0 where query i may attend to key j, the dtype's minimum
        elsewhere. Causal within the prompt; a completion sees the prompt and its own past; padding
        sees itself (a row with no allowed key would give NaN)."""
        B, L = self.input_ids.shape
        seg = torch.full((B, L), -1, dtype=torch.long)  # -1 prompt, k completion k, -2 padding
        for b in range(B):
            start = int(self.prompt_lens[b])
            for k, n in enumerate(self.completion_lens[b].tolist()):
                seg[b, start:start + n] = k
                start += n
            seg[b, start:] = -2
        seg = seg.to(self.input_ids.device)
        q, k = seg.unsqueeze(2), seg.unsqueeze(1)  # [B, L, 1], [B, 1, L]
        idx = torch.arange(L, device=seg.device)
        causal = idx.view(1, L, 1) >= idx.view(1, 1, L)
        allowed = causal & ((k == -1) | (q == k)) & (q != -2)
        allowed |= torch.eye(L, dtype=torch.bool, device=seg.device).unsqueeze(0)
        bias = torch.zeros(B, 1, L, L, dtype=dtype, device=seg.device)
        return bias.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)


def pack_groups(prompts: list[list[int]], completions: list[list[int]], G: int, pad_id: int,
                model_mask: list[list[int]] | None = None) -> GroupBatch:
    """The rollout (N = B * G rows, prompt-major: rows b*G .. b*G+G-1 share prompts[b*G]) in the
    shared-prompt layout; `model_mask` as in pack."""
    N = len(completions)
    if N % G:
        raise ValueError(f"{N} completions are not whole groups of {G}")
    B = N // G
    T = max(1, max(len(c) for c in completions))
    group_prompts = [prompts[b * G] for b in range(B)]
    lengths = [len(group_prompts[b]) + sum(len(c) for c in completions[b * G:(b + 1) * G]) for b in range(B)]
    L = max(lengths)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    index = torch.zeros((N, T), dtype=torch.long)
    comp = torch.full((N, T), pad_id, dtype=torch.long)
    mask = torch.zeros((N, T), dtype=torch.long)
    for b in range(B):
        p = group_prompts[b]
        P = len(p)
        ids[b, :P] = torch.tensor(p, dtype=torch.long)
        pos[b, :P] = torch.arange(P)
        start = P
        for i in range(b * G, (b + 1) * G):
            c = completions[i]
            n = len(c)
            if n:
                ids[b, start:start + n] = torch.tensor(c, dtype=torch.long)
                pos[b, start:start + n] = torch.arange(P, P + n)
                comp[i, :n] = torch.tensor(c, dtype=torch.long)
                mask[i, :n] = 1
                # token 0 is predicted at the prompt's last position, token t at the completion's t-1
                index[i, 0] = P - 1
                index[i, 1:n] = torch.arange(start, start + n - 1)
            else:
                index[i, :] = P - 1
            index[i, n:] = index[i, max(n - 1, 0)]  # padding columns read a real position (masked out)
            start += n
    prompt_lens = torch.tensor([len(p) for p in group_prompts])
    comp_lens = torch.tensor([[len(c) for c in completions[b * G:(b + 1) * G]] for b in range(B)])
    return GroupBatch(ids, pos, prompt_lens, comp_lens, torch.tensor(lengths), index, comp, learned(mask, model_mask))


def head_is_last(model) -> bool:
    """Whether the model's logits are its LM head applied to the backbone's last hidden state, with no
    final soft-capping (Gemma 2) or scaling (Cohere's logit_scale, Granite's logits_scaling) after it:
    then the head may be called apart from the model's forward."""
    config = model.config
    head = model.get_output_embeddings()
    base = getattr(model, "base_model", None) and backbone(model)
    return (head is not None and base is not None and base is not model
            and not getattr(config.get_text_config(), "final_logit_softcapping", None)
            and getattr(config, "logit_scale", None) in (None, 1, 1.0)
            and getattr(config, "logits_scaling", None) in (None, 1, 1.0))


def supports_shared_prompt(model) -> bool:
    """Whether the shared-prompt layout gives this model the padded layout's log-probs: it needs a
    custom 4D attention mask (eager or sdpa attention; flash attention takes none) and logits that
    are the LM head of the last hidden state (head_is_last)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return impl in ("eager", "sdpa") and head_is_last(model)


# ---- chunked log-probs: the LM head a chunk of tokens at a time ------------------------------------
def set_logprob_chunk(model, tokens: int) -> None:
    """Have token_logprobs and group_logprobs run `model`'s LM head and log-softmax `tokens` tokens at a
    time (trainer.logprob_chunk; 0 = all at once), in the forward and the backward, where the model
    allows it (chunkable). Set on the bare model; the wrappers around it find it there."""
    model.logprob_chunk = int(tokens)


def logprob_chunk(model) -> int:
    """The chunk set_logprob_chunk put on `model` or on the model inside its wrappers (0 = none)."""
    for _ in range(8):  # DDP(.module) -> Forward(.model) -> the model; OnDevice(.model); AdaptersOff(.wrapped)
        if hasattr(model, "get_output_embeddings"):
            return int(getattr(model, "logprob_chunk", 0) or 0)
        inner = [m for m in (getattr(model, k, None) for k in ("module", "model", "wrapped"))
                 if isinstance(m, torch.nn.Module)]
        if not inner:
            return 0
        model = inner[0]
    return 0


def chunkable(model) -> bool:
    """Whether chunked_logprobs gives `model`'s log-probs: its logits are a plain linear head of the last
    hidden state (a LoRA-adapted head, or soft-capped / scaled logits, take the whole-logits path)."""
    return head_is_last(model) and isinstance(model.get_output_embeddings(), torch.nn.Linear)


def group_logprobs(model, batch: GroupBatch, temperature: float = 1.0, with_entropy: bool = False):
    """token_logprobs for a GroupBatch: logp [N, T] (and entropy [N, T]), each completion token's
    log-prob under logits / temperature. Only the [N, T] positions that predict a completion token
    go through the LM head, as in the padded path (a chunk at a time with set_logprob_chunk)."""
    head = model.get_output_embeddings()
    dtype = head.weight.dtype
    hidden = backbone(model)(input_ids=batch.input_ids, attention_mask=batch.attention_bias(dtype),
                              position_ids=batch.position_ids, use_cache=False).last_hidden_state  # [B, L, H]
    rows = torch.arange(batch.index.shape[0], device=hidden.device) // batch.G  # [N] group of each completion
    h = hidden[rows.unsqueeze(1), batch.index]  # [N, T, H]
    chunk = logprob_chunk(model)
    if chunk and isinstance(head, torch.nn.Linear):
        return chunked_logprobs(h, head.weight, head.bias, batch.completion_ids, temperature, chunk, with_entropy)
    logits = head(h).float() / temperature  # [N, T, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)  # [N, T]
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # [N, T]
    return logp, entropy


def micro_batches(lengths: list[int], unit: int, size: int = 0, budget: int = 0) -> list[slice]:
    """Slices over the N = len(lengths) * unit rows of a step, each a run of whole units (a group
    in the shared-prompt layout, one row in the padded one) of at most `size` rows (0 = no limit,
    at least one unit) and, with a budget, at most `budget` tokens as the forward pays for them:
    units x the longest unit's length (at least one unit)."""
    per = max(1, size // unit) if size else len(lengths)
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        count = i - start
        if count and (count >= per or (budget and (count + 1) * max(longest, n) > budget)):
            out.append(slice(start * unit, i * unit))
            start, longest = i, 0
        longest = max(longest, n)
    out.append(slice(start * unit, len(lengths) * unit))
    return out


# ---- prompt/completion rows (grpo sft, PPO-ptx) ----------------------------------------------
def encode_rows(tokenizer, rows: list[tuple[str, dict[str, Any]]], prompt_field: str, completion_field: str,
                system_prompt: str | None = None) -> list[tuple[list[int], list[int], list[int] | None]]:
    """(prompt ids, completion ids, which completion ids learn) per row; ``rows`` are (where, row) from
    `located_rows`, so a bad row's error names its file and line. A completion is a string (its ids
    and EOS all learn) or a multi-turn demonstration, a list of messages that starts and ends with
    the assistant's (tool results between them): its ids are built as a rollout builds them
    (grpo/parts/rollout/multiturn.py, conversation_ids) and only the assistant's tokens learn."""
    from grpo.parts.rollout.multiturn import NotExtension, conversation_ids

    eos = tokenizer.eos_token_id
    out = []
    for where, row in rows:
        sample: Sample = to_sample(row, where, prompt_field, None)
        target = row.get(completion_field)
        p = tokenizer(render_prompt(tokenizer, sample, system_prompt), add_special_tokens=False)["input_ids"]
        if isinstance(target, list) and target:
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in target):
                raise TaskError(f"{where}: field {completion_field!r} must be a string or a list of {{role, content}} messages")
            try:
                c, learn = conversation_ids(tokenizer, sample.chat(system_prompt), target, eos)
            except (ValueError, NotExtension) as e:
                raise TaskError(f"{where}: field {completion_field!r}: {e}") from None
            out.append((p, c, learn))
            continue
        if not isinstance(target, str) or not target:
            raise TaskError(f"{where}: missing field {completion_field!r}")
        out.append((p, tokenizer(target, add_special_tokens=False)["input_ids"] + [eos], None))
    return out


def batch_tensors(rows: list[tuple[list[int], list[int], list[int] | None]], pad_id: int):
    """Right-padded input_ids [B, L], attention_mask [B, L], labels [B, L] (-100 off the completion's
    learnt tokens) from encode_rows' (prompt, completion, learn mask or None = all) rows."""
    L = max(len(p) + len(c) for p, c, _ in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, c, learn) in enumerate(rows):
        seq = torch.tensor(p + c, dtype=torch.long)
        ids[i, :len(seq)] = seq
        attn[i, :len(seq)] = 1
        target = seq[len(p):].clone()
        if learn is not None:
            target[torch.tensor(learn) == 0] = -100
        labels[i, len(p):len(seq)] = target
    return ids, attn, labels
