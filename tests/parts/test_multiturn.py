"""Multi-turn rollouts (grpo/parts/rollout/multiturn.py): token in, token out; only the model's tokens
learn; caps end conversations with the right reason. On the embedded tools model, whose turns end
with its end-of-turn token, and a BPE tokenizer with a Qwen-style template for the boundary rules."""

from __future__ import annotations

import os

import pytest
import torch

from grpo.algorithm.losses import policy_loss
from grpo.envs.base import Turn
from grpo.envs.tools import ToolEnv
from grpo.parts.batch import batch_logprobs, pack, pack_groups, group_logprobs
from grpo.parts.modeling import EMBEDDED_TOOLS_MODEL_DIR, eos_ids, load_model, load_tokenizer
from grpo.parts.rollout import encode_prompts, tools_of
from grpo.parts.rollout.base import SamplingParams
from grpo.parts.rollout.hf import HFEngine
from grpo.parts.rollout.multiturn import (Caps, Conversations, NotExtension, chat_text, conversation_metrics,
                                          render_turn)
from grpo.tasks.arithmetic import ArithmeticTask

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=32)


class Again:
    """An environment that never ends a conversation: after every assistant message a tool result
    ("again", or `text`). It makes every conversation run to the caps."""

    tools: list = []
    reward_names = ["step"]

    def __init__(self, text: str = "again"):
        self.text = text

    def reset(self, sample):
        return None

    def step(self, state, message):
        return Turn(messages=[{"role": "tool", "content": self.text}], rewards={"step": 0.25})

    def close(self):
        pass


class Recording:
    """Passes generate() through to an engine and keeps what went in and came out of each call."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompt_ids, n, sampling):
        ro = self.engine.generate(prompt_ids, n, sampling)
        self.calls.append(([p for p in prompt_ids for _ in range(n)], ro.completion_ids))
        return ro


@pytest.fixture(scope="module")
def tools_model():
    tok = load_tokenizer(str(EMBEDDED_TOOLS_MODEL_DIR))
    model = load_model(str(EMBEDDED_TOOLS_MODEL_DIR), "float32", device="cpu").eval()
    return tok, model


def samples(k: int = 4):
    return ArithmeticTask(ops=["*"], min_operand=10, max_operand=999).eval_samples()[:k]


def converse(tok, model, env, caps=Caps(), n=2, k=4, engine=None, seed=0):
    conv = Conversations(engine or HFEngine(model, tok), env, tok, caps, eos_ids(tok, model))
    s = samples(k)
    torch.manual_seed(seed)
    try:
        return conv.generate(encode_prompts(tok, s, None, tools_of(conv)), n, SAMPLING, s)
    finally:
        conv.close()


def check_token_in_token_out(ro, calls):
    """Each turn of each conversation is one engine call's row: its input is a prefix of the ids the
    trainer scores and its sampled ids follow it unchanged, marked as the model's; everything else
    after the prompt is marked not the model's. (Rows are found by content, so conversations that
    ended earlier and left the batch are checked too.)"""
    for i, (prompt, ids, mask) in enumerate(zip(ro.prompt_ids, ro.completion_ids, ro.model_mask)):
        full = prompt + ids
        sampled = [0] * len(ids)
        turns = 0
        for inputs, outputs in calls:
            rows = [(x, y) for x, y in zip(inputs, outputs) if full[:len(x)] == x and len(x) >= len(prompt)
                    and full[len(x):len(x) + len(y)] == y and mask[len(x) - len(prompt):][:1] == [1]]
            if not rows:
                continue
            x, y = rows[0]
            start = len(x) - len(prompt)
            sampled[start:start + len(y)] = [1] * len(y)
            turns += 1
        assert mask == sampled and turns == ro.conversations[i]["turns"], i


def test_three_turns_token_in_token_out_on_the_hf_engine(tools_model):
    tok, model = tools_model
    rec = Recording(HFEngine(model, tok))
    ro = converse(tok, model, Again(), Caps(max_turns=3, max_tokens=200), engine=rec)
    assert [c["turns"] for c in ro.conversations] == [3] * 8
    assert {c["reason"] for c in ro.conversations} == {"turns"}
    assert len(rec.calls) == 3
    check_token_in_token_out(ro, rec.calls)
    # between two turns: the environment's message and the next header, rendered once
    text = tok.decode(ro.completion_ids[0])
    assert text.count("<|tool|>again<|end|><|assistant|>") == 2
    # the environment's per-turn terms, summed over the two steps that continued and the last one
    assert ro.conversations[0]["rewards"] == {"step": 0.75}


class Varied(Again):
    """Conversations that last 1, 2 or 3 turns, by their first operand: some leave the batch early."""

    def reset(self, sample):
        return {"left": int(sample.meta["a"]) % 3}

    def step(self, state, message):
        if state["left"] == 0:
            return Turn(done=True, reason="answered")
        state["left"] -= 1
        return super().step(state, message)


def test_conversations_that_end_early_keep_the_rest_aligned(tools_model):
    tok, model = tools_model
    rec = Recording(HFEngine(model, tok))
    s = samples(6)
    ro = converse(tok, model, Varied(), Caps(max_turns=3, max_tokens=200), k=6, engine=rec)
    want = [1 + int(x.meta["a"]) % 3 for x in s for _ in range(2)]  # prompt-major, 2 samples each
    assert [c["turns"] for c in ro.conversations] == want and len(set(want)) == 3
    assert [len(inputs) for inputs, _ in rec.calls] == [12, sum(w > 1 for w in want), sum(w > 2 for w in want)]
    check_token_in_token_out(ro, rec.calls)


def test_engine_and_trainer_log_probs_agree_on_the_models_tokens(tools_model):
    tok, model = tools_model
    ro = converse(tok, model, Again(), Caps(max_turns=3, max_tokens=200))
    batch = pack(ro.prompt_ids, ro.completion_ids, tok.pad_token_id, ro.model_mask)
    with torch.no_grad():
        logp = batch_logprobs(model, batch)  # [N, T]
    eng = torch.zeros_like(logp)
    for i, lp in enumerate(ro.logprobs):
        eng[i, :len(lp)] = torch.tensor(lp)
    gap = ((logp - eng).abs() * batch.mask).max()
    assert gap < 1e-3
    # the shared-prompt layout masks the same tokens and gives the same log-probs
    grouped = pack_groups(ro.prompt_ids, ro.completion_ids, 2, tok.pad_token_id, ro.model_mask)
    assert torch.equal(grouped.mask, batch.mask)
    with torch.no_grad():
        assert ((group_logprobs(model, grouped) - logp).abs() * batch.mask).max() < 1e-4


def test_tool_and_template_tokens_get_exactly_zero_gradient(tools_model):
    tok, model = tools_model
    ro = converse(tok, model, Again(), Caps(max_turns=3, max_tokens=200))
    batch = pack(ro.prompt_ids, ro.completion_ids, tok.pad_token_id, ro.model_mask)
    real = torch.zeros_like(batch.mask)
    for i, c in enumerate(ro.completion_ids):
        real[i, :len(c)] = 1
    env_tokens = (real == 1) & (batch.mask == 0)
    assert env_tokens.sum() > 0
    logp, ent = batch_logprobs(model, batch, with_entropy=True)  # [N, T]
    logp.retain_grad()
    ref = logp.detach() - 0.1  # a reference that differs, so the KL term has a gradient
    adv = torch.linspace(-1, 1, len(ro.completion_ids))
    loss, _ = policy_loss(logp, logp.detach(), adv, batch.mask, 0.2, 0.2, ref, 0.1, "token_mean")
    loss.backward()
    assert (logp.grad[env_tokens] == 0).all()  # no loss or KL at the environment's tokens
    assert (logp.grad[batch.mask == 1] != 0).any()


def test_caps_end_conversations_with_their_reason(tools_model):
    tok, model = tools_model
    ro = converse(tok, model, Again(), Caps(max_turns=2, max_tokens=200))
    assert {c["reason"] for c in ro.conversations} == {"turns"} and {c["turns"] for c in ro.conversations} == {2}
    # 12 tokens after the prompt: an answer of ~12 characters or the room for the next turn runs out
    ro = converse(tok, model, Again(), Caps(max_turns=5, max_tokens=12))
    assert {c["reason"] for c in ro.conversations} == {"length"} and not any(ro.finished)
    assert max(len(c) for c in ro.completion_ids) <= 12
    for text, ids, c in zip(ro.texts, ro.completion_ids, ro.conversations):
        if c["turns"] == 1:  # a first turn cut at the cap: its text is what was kept, nothing beyond
            assert text == tok.decode(ids, skip_special_tokens=True)
    # a long tool result is cut at 5 tokens (one character each here), with a marker
    ro = converse(tok, model, Again("0123456789" * 3), Caps(max_turns=2, max_tool_tokens=5))
    tool = [m for m in ro.conversations[0]["messages"] if m["role"] == "tool"][0]["content"]
    assert tool == "01234\n[cut: 25 more tokens]"
    m = conversation_metrics(ro.conversations)
    assert m["env/end/turns_frac"] == 1.0 and m["env/turns_mean"] == 2.0 and m["env/reward/step"] == 0.5
    assert m["env/reward"] == 0.5 and m["env/end/other_frac"] == 0.0


def test_the_tools_model_calls_the_sandbox_and_the_tool_cap_ends_it(tools_model):
    tok, model = tools_model
    ro = converse(tok, model, ToolEnv(max_tool_calls=2), Caps(max_turns=3), n=4, k=8)
    called = [c for c in ro.conversations if c["tool_calls"]]
    assert called and all(c["reason"] == "answered" for c in ro.conversations)
    for c in called:  # the sandbox's output came back as the tool's message
        code = c["messages"][1]["content"].split("print(")[1].split(")")[0]
        assert c["messages"][2] == {"role": "tool", "name": "python", "content": f"{eval(code)}\n",
                                    "tool_call_id": "call_1"}
    ro = converse(tok, model, ToolEnv(max_tool_calls=0), Caps(max_turns=3), n=4, k=8)
    reasons = [c["reason"] for c in ro.conversations]
    assert "tool_cap" in reasons and set(reasons) <= {"tool_cap", "answered"}
    assert all(c["tool_calls"] == 0 for c in ro.conversations)


def test_an_environment_that_raises_costs_its_conversation(tools_model):
    tok, model = tools_model

    class Flaky(Again):
        def step(self, state, message):
            if "\\boxed" in message["content"]:
                raise RuntimeError("boom")
            return super().step(state, message)

    ro = converse(tok, model, Flaky(), Caps(max_turns=3))
    assert {c["reason"] for c in ro.conversations} <= {"env_error", "turns"}
    assert "env_error" in {c["reason"] for c in ro.conversations}


def test_a_template_that_rewrites_earlier_turns_ends_the_conversation(tools_model):
    tok, model = tools_model
    tok = load_tokenizer(str(EMBEDDED_TOOLS_MODEL_DIR))
    # the last assistant message is rendered differently from earlier ones: not an extension
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{% if loop.last and m['role'] == 'assistant' %}"
                         "{{ m['content'] }}{% else %}{{ m['content'] | trim }} {% endif %}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ro = converse(tok, model, Again(), Caps(max_turns=3))
    assert {c["reason"] for c in ro.conversations} == {"template"}
    assert all(c["turns"] == 1 and all(ro.model_mask[i]) for i, c in enumerate(ro.conversations))


# ---- the boundary rules on a BPE tokenizer -------------------------------------------------------
QWEN_LIKE = ("{% for m in messages %}{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}"
             "\n</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
             "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer whose merges join `print(` and digits, with a Qwen-style template
    (a newline after <|im_end|>, tool results inside a user turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["print(12*34)\n" * 40, "<tool_response>\n408\n</tool_response>\n" * 40,
                              "user assistant What is 12 * 34?" * 40], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.chat_template = QWEN_LIKE
    return tok


def test_the_boundary_keeps_the_sampled_ids_and_the_templates_newline(bpe):
    tok = bpe
    start = [{"role": "user", "content": "What is 12 * 34?"}]
    prompt = tok(chat_text(tok, start, None, True), add_special_tokens=False)["input_ids"]
    # the engine sampled "print(12*34)" one character at a time (BPE would merge them), then <|im_end|>
    sampled = [tok.convert_tokens_to_ids(ch) for ch in "print(12*34)"] + [tok.eos_token_id]
    assert tok(tok.decode(sampled[:-1]), add_special_tokens=False)["input_ids"] != sampled[:-1]
    messages = start + [{"role": "assistant", "content": tok.decode(sampled, skip_special_tokens=True)}]
    new = [{"role": "tool", "content": "408"}]
    after = render_turn(tok, messages, new, None, sampled[-1], [tok.eos_token_id])
    ids = prompt + sampled + after
    # the text is exactly the template's render of the longer conversation, with the generation prompt
    assert tok.decode(ids) == chat_text(tok, messages + new, None, True)
    assert tok.decode(after).startswith("\n<|im_start|>user\n<tool_response>\n408")  # the newline after <|im_end|> kept
    # re-tokenising that text would have changed the model's tokens; ours are the sampled ones
    retokenised = tok(tok.decode(ids), add_special_tokens=False)["input_ids"]
    assert retokenised != ids and ids[len(prompt):len(prompt) + len(sampled)] == sampled


def test_a_turn_cut_by_a_stop_string_gets_the_templates_end(bpe):
    tok = bpe
    start = [{"role": "user", "content": "hi"}]
    sampled = tok("print(1)", add_special_tokens=False)["input_ids"]  # no <|im_end|>: a stop string ended it
    messages = start + [{"role": "assistant", "content": "print(1)"}]
    after = render_turn(tok, messages, [{"role": "tool", "content": "1"}], None, sampled[-1], [tok.eos_token_id])
    assert tok.decode(after).startswith("<|im_end|>\n<|im_start|>user")


def test_render_turn_refuses_a_template_whose_longer_render_is_not_an_extension():
    tok = load_tokenizer(str(EMBEDDED_TOOLS_MODEL_DIR))
    # a longer conversation gets a mark in front: its render does not start with the shorter one's
    tok.chat_template = "{% if messages | length > 2 %}!{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(NotExtension):
        render_turn(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                    [{"role": "tool", "content": "c"}], None, tok.eos_token_id, [tok.eos_token_id])


# ---- vLLM -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_three_turns_token_in_token_out_on_vllm(tools_model):
    pytest.importorskip("vllm", reason="vllm is not installed: `make setup-vllm` installs it (CI does)")
    from grpo.parts.rollout.vllm import VLLMEngine

    tok, model = tools_model
    env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, os.environ.get(k, v))
        engine = VLLMEngine(model, tok, str(EMBEDDED_TOOLS_MODEL_DIR), "float32", "cpu", temperature=1.0, top_p=1.0,
                            top_k=0, kv_cache_gib=0.0625, max_num_seqs=64, max_model_len=256)
    try:
        rec = Recording(engine)
        ro = converse(tok, model, Again(), Caps(max_turns=3, max_tokens=200), engine=rec)
        assert [c["turns"] for c in ro.conversations] == [3] * 8 and len(rec.calls) == 3
        check_token_in_token_out(ro, rec.calls)
        batch = pack(ro.prompt_ids, ro.completion_ids, tok.pad_token_id, ro.model_mask)
        with torch.no_grad():
            logp = batch_logprobs(model, batch)
        eng = torch.zeros_like(logp)
        for i, lp in enumerate(ro.logprobs):
            eng[i, :len(lp)] = torch.tensor(lp)
        assert ((logp - eng).abs() * batch.mask).max() < 1e-3
        # the tools model with the python tool: the same semantics as on the hf engine
        ro = converse(tok, model, ToolEnv(max_tool_calls=2), Caps(max_turns=3), n=4, k=8, engine=engine)
        assert any(c["tool_calls"] for c in ro.conversations)
        assert all(c["reason"] == "answered" for c in ro.conversations)
    finally:
        engine.close()
