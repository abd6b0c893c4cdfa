import torch

from grpo.parts.batch import pack, token_logprobs
from grpo.parts.modeling import load_model, load_tokenizer
from grpo.parts.rollout.base import SamplingParams
from grpo.parts.rollout.hf import HFEngine, left_pad


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def engine(path):
    tok = load_tokenizer(str(path))
    model = load_model(str(path))
    return tok, model, HFEngine(model, tok)


def test_greedy_is_independent_of_batch_padding(tiny_model_dir):
    tok, model, eng = engine(tiny_model_dir)
    short = tok("<|user|>1+1<|end|><|assistant|>", add_special_tokens=False)["input_ids"]
    long = tok("<|user|>What is 12 + 34 and more text?<|end|><|assistant|>", add_special_tokens=False)["input_ids"]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    alone = eng.generate([short], 1, greedy)
    batched = eng.generate([long, short], 1, greedy)
    # Left padding with correct position ids: the short prompt decodes the same with or without a longer neighbour.
    assert batched.completion_ids[1] == alone.completion_ids[0]
    torch.testing.assert_close(torch.tensor(batched.logprobs[1]), torch.tensor(alone.logprobs[0]), atol=1e-5, rtol=0)


def test_sampling_shapes_and_logprobs_match_the_trainer(tiny_model_dir):
    tok, model, eng = engine(tiny_model_dir)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("<|user|>a<|end|><|assistant|>", "<|user|>bcd<|end|>")]
    torch.manual_seed(0)
    ro = eng.generate(prompts, 3, SamplingParams(temperature=0.7, max_new_tokens=6))
    assert len(ro.completion_ids) == 6 and ro.prompt_ids[0] == ro.prompt_ids[2] == prompts[0] and ro.prompt_ids[3] == prompts[1]
    for ids, lps, fin in zip(ro.completion_ids, ro.logprobs, ro.finished):
        assert len(ids) == len(lps) and 1 <= len(ids) <= 6
        assert fin == (ids[-1] == tok.eos_token_id)
        assert all(lp <= 0 for lp in lps)
    # The trainer's forward (left-padded prompts, right-padded completions) gives the same log-probs.
    b = pack(ro.prompt_ids, ro.completion_ids, tok.pad_token_id)
    ids, attn, pos, comp, mask = b.input_ids, b.attention_mask, b.position_ids, b.completion_ids, b.mask
    with torch.no_grad():
        logp = token_logprobs(model, ids, attn, pos, comp.shape[1], temperature=0.7)
    for i, lps in enumerate(ro.logprobs):
        torch.testing.assert_close(logp[i, : len(lps)], torch.tensor(lps), atol=1e-4, rtol=0)


def test_stops_at_eos(tiny_model_dir):
    tok, model, eng = engine(tiny_model_dir)
    # An LM head whose only output is a large EOS bias: every completion must be exactly [EOS].
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 50.0
    model.lm_head = head
    ro = eng.generate([[tok.convert_tokens_to_ids("a")]], 4, SamplingParams(temperature=1.0, max_new_tokens=5))
    assert all(c == [tok.eos_token_id] for c in ro.completion_ids)
    assert ro.texts == [""] * 4 and all(ro.finished)


def test_generation_config_eos_ids_count_however_the_model_is_wrapped(tiny_model_dir):
    # A chat model may end its turn with a token that only its generation_config names (Llama-3's
    # <|eot_id|>): the engine stops at it on a bare model, inside the torchrun wrapper and under LoRA.
    from grpo.parts.distributed import Forward
    from grpo.parts.modeling import apply_lora

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    extra = tok.convert_tokens_to_ids("a")
    model.generation_config.eos_token_id = [tok.eos_token_id, extra]
    want = [tok.eos_token_id, extra]
    assert HFEngine(model, tok).eos_ids == want
    assert HFEngine(Forward(model), tok).eos_ids == want
    assert HFEngine(apply_lora(model, 2, 4.0, 0.0, ["all-linear"]), tok).eos_ids == want


def test_model_generation_config_penalties_do_not_change_sampling(tiny_model_dir):
    # A repetition penalty in the model's generation_config would make generate() sample from a
    # distribution the trainer never computes; the engine neutralises it, so greedy decoding is
    # the argmax of the raw logits and the reported log-probs match the trainer's.
    tok, model, eng = engine(tiny_model_dir)
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("<|user|>aaaa<|end|><|assistant|>", "<|user|>1<|end|>")]
    ro = eng.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=8))
    b = pack(ro.prompt_ids, ro.completion_ids, tok.pad_token_id)
    ids, attn, pos, comp, mask = b.input_ids, b.attention_mask, b.position_ids, b.completion_ids, b.mask
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -comp.shape[1] - 1:-1]
    for i, c in enumerate(ro.completion_ids):
        assert out[i, : len(c)].argmax(-1).tolist() == c


def test_stop_string_cut_when_pad_is_eos(tiny_model_dir):
    tok, model, eng = engine(tiny_model_dir)
    eng.pad_id = tok.eos_token_id  # as for tokenizers without a pad token
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():  # the model always says "5": the stop string ends the row after one token
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.convert_tokens_to_ids("5")] = 50.0
    model.lm_head = head
    ro = eng.generate([[tok.convert_tokens_to_ids("a")], [tok.convert_tokens_to_ids("b")] * 3], 1,
                      SamplingParams(temperature=1.0, max_new_tokens=4, stop=["5"]))
    five = tok.convert_tokens_to_ids("5")
    assert ro.completion_ids == [[five], [five]] and ro.finished == [True, True] and ro.texts == ["5", "5"]
    assert all(len(lp) == 1 for lp in ro.logprobs)  # no EOS the model never sampled


def test_samples_follow_temperature_top_k_and_top_p():
    from grpo.parts.rollout.hf import pick

    # logits for 4 tokens; at T = 1 the probabilities are 0.4, 0.3, 0.2, 0.1
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(4000, 1)
    torch.manual_seed(0)
    tok, lp = pick(logits, SamplingParams(temperature=1.0, top_p=0.7))
    # top_p 0.7: token 0 (0.4) is not enough, tokens {0, 1} (0.7) are: renormalised 4/7, 3/7
    assert set(tok.tolist()) == {0, 1} and abs(float((tok == 0).float().mean()) - 4 / 7) < 0.03
    # the log-probs are those before truncation: log 0.4 and log 0.3
    assert torch.allclose(lp[tok == 0], torch.tensor(0.4).log()) and torch.allclose(lp[tok == 1], torch.tensor(0.3).log())
    tok, _ = pick(logits, SamplingParams(temperature=1.0, top_k=3))
    assert set(tok.tolist()) == {0, 1, 2}
    tok, lp = pick(logits, SamplingParams(temperature=0.0))
    assert set(tok.tolist()) == {0} and torch.allclose(lp, torch.tensor(0.4).log())
    # T = 0.5 squares the odds: 0.16 / (0.16 + 0.09 + 0.04 + 0.01) = 8/15 for token 0
    tok, lp = pick(logits, SamplingParams(temperature=0.5))
    assert abs(float((tok == 0).float().mean()) - 8 / 15) < 0.03
    assert torch.allclose(lp[tok == 0], torch.tensor(8 / 15).log(), atol=1e-5)


def test_finished_rows_leave_the_batch_and_the_rest_decode_as_alone():
    # Each row decoded in a batch with rows that stop early gets the tokens and log-probs it gets
    # decoded alone: dropping finished rows from the cache does not disturb the others. The
    # embedded model answers \\boxed{7} and \\boxed{579} (+ EOS): rows of different lengths.
    from grpo.parts.modeling import load_model, load_tokenizer
    from grpo.parts.rollout import encode_prompts
    from grpo.parts.rollout.hf import HFEngine
    from grpo.tasks.base import Sample

    tok, model = load_tokenizer("embedded"), load_model("embedded")
    eng = HFEngine(model, tok)
    prompts = encode_prompts(tok, [Sample(prompt=f"What is {q}?") for q in ("3 + 4", "123 + 456", "50 + 50")])
    for sp in (SamplingParams(temperature=0.0, max_new_tokens=12), SamplingParams(temperature=1.0, max_new_tokens=12)):
        together = eng.generate(prompts, 1, sp)
        assert len({len(c) for c in together.completion_ids}) > 1  # rows did stop at different steps
        if sp.temperature > 0:
            continue  # sampled rows draw in a different order alone; the greedy check covers decoding
        for i, p in enumerate(prompts):
            alone = eng.generate([p], 1, sp)
            assert alone.completion_ids[0] == together.completion_ids[i] and together.finished[i]
            assert max(abs(a - b) for a, b in zip(alone.logprobs[0], together.logprobs[i])) < 1e-5
