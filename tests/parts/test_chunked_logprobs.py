"""Chunked log-probs (grpo/parts/chunked.py, trainer.logprob_chunk): the LM head and log-softmax a
chunk of tokens at a time give the whole-logits path's log-probs, entropies and gradients (float32,
max abs difference < 1e-6), in both layouts, through the wrappers, with LoRA, and in a training step."""

import math

import pytest
import torch

from grpo.parts.batch import (batch_logprobs, chunkable, group_logprobs, logprob_chunk, pack, pack_groups,
                              set_logprob_chunk, token_logprobs)
from grpo.parts.chunked import chunked_logprobs
from grpo.parts.distributed import Forward
from grpo.parts.modeling import AdaptersOff, apply_lora, backbone, load_model

G = 3
TEMP = 0.7
CHUNKS = [1, 4, 7, 1024]  # over the 6 x 7 = 42 completion tokens: 4 does not divide them, 7 does, 1024 > 42


# ---- the pure function ---------------------------------------------------------------------------
def test_hand_derived_tiny_case():
    # V = 3, H = 2: W = [[1, 0], [0, 1], [0, 0]], b = 0, temperature 2, one row of two tokens.
    # token 0: h = (2 ln 2, 0), z / 2 = (ln 2, 0, 0) -> p = (2, 1, 1) / 4 = (1/2, 1/4, 1/4); target 0: logp = -ln 2
    # token 1: h = (0, 2 ln 2), z / 2 = (0, ln 2, 0) -> p = (1/4, 1/2, 1/4);               target 2: logp = -ln 4
    # both entropies: -(1/2 ln 1/2 + 2 * 1/4 ln 1/4) = 1.5 ln 2
    # d logp / d z = (onehot - p) / 2:  token 0: (1/4, -1/8, -1/8);  token 1: (-1/8, -1/4, 3/8)
    # d h = W^T dz:                     token 0: (1/4, -1/8);         token 1: (-1/8, -1/4)
    # d W = sum_t dz_t h_t^T = ln 2 * [[1/2, -1/4], [-1/4, -1/2], [-1/4, 3/4]];  d b = sum_t dz_t = (1/8, -3/8, 1/4)
    ln2 = math.log(2)
    hidden = torch.tensor([[[2 * ln2, 0.0], [0.0, 2 * ln2]]], requires_grad=True)  # [1, 2, 2]
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], requires_grad=True)  # [3, 2]
    bias = torch.zeros(3, requires_grad=True)
    targets = torch.tensor([[0, 2]])
    logp, ent = chunked_logprobs(hidden, weight, bias, targets, temperature=2.0, chunk=1, with_entropy=True)
    assert torch.allclose(logp, torch.tensor([[-ln2, -2 * ln2]]), atol=1e-7)
    assert torch.allclose(ent, torch.tensor([[1.5 * ln2, 1.5 * ln2]]), atol=1e-7)
    assert not ent.requires_grad
    logp.sum().backward()
    assert torch.allclose(hidden.grad, torch.tensor([[[1 / 4, -1 / 8], [-1 / 8, -1 / 4]]]), atol=1e-7)
    assert torch.allclose(weight.grad, ln2 * torch.tensor([[1 / 2, -1 / 4], [-1 / 4, -1 / 2], [-1 / 4, 3 / 4]]), atol=1e-7)
    assert torch.allclose(bias.grad, torch.tensor([1 / 8, -3 / 8, 1 / 4]), atol=1e-7)


def whole(hidden, weight, bias, targets, temperature):
    """Today's path: the [N, T, V] logits at once."""
    logp_all = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias).float() / temperature, dim=-1)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("chunk", [1, 4, 6, 30, 0])  # over N * T = 30 tokens: 4 does not divide them, 6 does
@pytest.mark.parametrize("with_bias", [False, True])
def test_same_values_and_gradients_as_whole_logits(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    N, T, H, V = 3, 10, 8, 50
    hidden = torch.randn(N, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5  # logits of std ~1, as a trained head gives: log-probs
    bias = torch.randn(V, generator=g) if with_bias else None  # of a few units, where float32's step is < 1e-6
    targets = torch.randint(0, V, (N, T), generator=g)
    upstream = torch.randn(N, T, generator=g)  # any loss: its gradient w.r.t. logp
    upstream[1, 6:] = 0  # padding: the loss multiplies it by a zero mask

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
        logp, ent = fn(leaves[0], leaves[1], leaves[2] if with_bias else None)
        (logp * upstream).sum().backward()
        return logp.detach(), ent, [t.grad for t in leaves]

    a, ea, ga = run(lambda h, w, b: whole(h, w, b, targets, TEMP))
    b, eb, gb = run(lambda h, w, b: chunked_logprobs(h, w, b, targets, TEMP, chunk, with_entropy=True))
    assert (a - b).abs().max() < 1e-6 and (ea - eb).abs().max() < 1e-6
    assert max(float((x - y).abs().max()) for x, y in zip(ga, gb)) < 1e-6
    assert torch.all(gb[0][1, 6:] == 0)  # gradients at padding positions are exactly 0


def test_backward_keeps_no_vocab_sized_tensor():
    # what autograd keeps between forward and backward: the inputs only, never [N, T, V] (nor [chunk, V])
    N, T, H, V = 2, 16, 4, 64
    hidden, weight = torch.randn(N, T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, (N, T))

    def saved_by(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out = fn()
        return out, sizes

    logp, chunked_saved = saved_by(lambda: chunked_logprobs(hidden, weight, None, targets, 1.0, chunk=4))
    _, whole_saved = saved_by(lambda: whole(hidden, weight, None, targets, 1.0))
    assert max(chunked_saved) == V * H and max(whole_saved) >= N * T * V
    logp.sum().backward()
    assert hidden.grad.shape == (N, T, H) and weight.grad.shape == (V, H)


def test_no_gradient_for_frozen_inputs_and_half_precision():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 8, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(40, 8, generator=g).bfloat16()  # frozen (a LoRA run's head)
    targets = torch.randint(0, 40, (2, 5), generator=g)
    logp = chunked_logprobs(hidden, weight, None, targets, TEMP, chunk=3)
    ref, _ = whole(hidden, weight, None, targets, TEMP)
    assert logp.dtype == torch.float32 and (logp - ref).abs().max() < 1e-6
    logp.sum().backward()
    h2 = hidden.detach().clone().requires_grad_()
    whole(h2, weight, None, targets, TEMP)[0].sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and (hidden.grad.float() - h2.grad.float()).abs().max() < 1e-2


# ---- through a model: both layouts -------------------------------------------------------------
def rollout(vocab: int):
    """Two groups of 3 with ragged prompts (5 and 9 tokens: left padding) and completions (4, 1, 7 |
    3, 0, 6: right padding)."""
    g = torch.Generator().manual_seed(0)
    group_prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (5, 9)]
    completions = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (4, 1, 7, 3, 0, 6)]
    return [group_prompts[i // G] for i in range(6)], completions


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = load_model(str(tiny_model_dir))
    assert chunkable(m)
    return m


def logp_and_grads(model, fn, batch, chunk):
    set_logprob_chunk(model, chunk)
    try:
        model.zero_grad()
        logp, ent = fn(model, batch, TEMP, with_entropy=True)
        (logp * batch.mask).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return logp.detach() * batch.mask, ent * batch.mask, grads
    finally:
        set_logprob_chunk(model, 0)


def close(p: torch.Tensor, q: torch.Tensor) -> bool:
    """Within 1e-6 of each other, relative to the tensor's scale where it exceeds 1: the tied embedding's
    gradient reaches ~7 here, where float32's step is 4.8e-7, and summing 42 tokens' contributions in
    another order moves it by a step or two (the unchunked path is itself ~2e-6 from a float64 run)."""
    return float((p - q).abs().max()) < 1e-6 * max(1.0, float(p.abs().max()))


def assert_same(x, y):
    (a, ea, ga), (b, eb, gb) = x, y
    assert (a - b).abs().max() < 1e-6
    assert (ea - eb).abs().max() < 1e-6
    assert len(ga) == len(gb) > 0
    assert all(close(p, q) for p, q in zip(ga, gb))


@pytest.mark.parametrize("layout", ["padded", "shared"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_model_logprobs_and_gradients_equal_unchunked(model, layout, chunk):
    prompts, completions = rollout(model.config.vocab_size)
    if layout == "padded":
        fn, batch = batch_logprobs, pack(prompts, completions, 0)
    else:
        fn, batch = group_logprobs, pack_groups(prompts, completions, G, 0)
    assert batch.mask.shape == (6, 7)  # 42 tokens
    assert_same(logp_and_grads(model, fn, batch, 0), logp_and_grads(model, fn, batch, chunk))


def test_gradient_at_padding_positions_is_exactly_zero(model):
    prompts, completions = rollout(model.config.vocab_size)
    batch = pack(prompts, completions, 0)
    grads = []

    def keep_grad(module, args, out):  # the gradient reaching the backbone's last hidden state [N, P+T, H]
        out.last_hidden_state.register_hook(grads.append)

    hook = backbone(model).register_forward_hook(keep_grad)
    set_logprob_chunk(model, 5)
    try:
        (batch_logprobs(model, batch, TEMP) * batch.mask).sum().backward()
    finally:
        hook.remove()
        set_logprob_chunk(model, 0)
        model.zero_grad()
    P = batch.input_ids.shape[1] - batch.T
    g = grads[0][:, P - 1:-1].abs().sum(-1)  # [N, T]: the positions that predict completion token t
    assert torch.all(g[batch.mask == 0] == 0) and torch.all(g[batch.mask == 1] > 0)
    assert torch.all(grads[0][:, :P - 1] == 0) and torch.all(grads[0][:, -1] == 0)  # no head there


def test_through_the_forward_wrapper_and_with_lora(tiny_model_dir):
    """PPO, DPO and the evaluation pass a wrapper (Forward under DDP / FSDP2, AdaptersOff for LoRA's
    reference): the chunk set on the bare model is found, and the pass goes inside the wrapper."""
    policy = apply_lora(load_model(str(tiny_model_dir)), 4, 8.0, 0.0, ["all-linear"])
    prompts, completions = rollout(policy.config.vocab_size)
    batch = pack(prompts, completions, 0)
    with torch.no_grad():  # adapters that change the output (peft starts B at 0)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    fwd = Forward(policy)
    calls = []
    fwd.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs.get("fn")), with_kwargs=True)
    results = {}
    for chunk in (0, 5):
        set_logprob_chunk(policy, chunk)
        assert logprob_chunk(fwd) == logprob_chunk(AdaptersOff(fwd, policy)) == chunk
        policy.zero_grad()
        logp = batch_logprobs(fwd, batch, TEMP)
        (logp * batch.mask).sum().backward()
        with torch.no_grad():
            ref = batch_logprobs(AdaptersOff(fwd, policy), batch, TEMP)
        grads = [p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad]
        results[chunk] = (logp.detach() * batch.mask, ref * batch.mask, grads)
    assert calls == [None, None, token_logprobs, token_logprobs]  # off: the model's forward; on: inside the wrapper
    (a, ra, ga), (b, rb, gb) = results[0], results[5]
    assert (a - b).abs().max() < 1e-6 and (ra - rb).abs().max() < 1e-6
    assert (a - ra).abs().max() > 1e-3  # the adapters matter, and were off for the reference
    assert len(ga) > 0 and all(close(x, y) for x, y in zip(ga, gb))


def test_logits_not_plain_head_fall_back(tiny_model_dir):
    m = load_model(str(tiny_model_dir))
    prompts, completions = rollout(m.config.vocab_size)
    batch = pack(prompts, completions, 0)
    off = batch_logprobs(m, batch, TEMP)
    m.config.logit_scale = 0.5  # logits scaled after the head (Cohere): the head alone would be wrong
    assert not chunkable(m)
    set_logprob_chunk(m, 5)
    assert torch.equal(batch_logprobs(m, batch, TEMP), off)  # the whole-logits path, as before


# ---- a training step ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_a_training_step_is_the_same_chunked(tiny_model_dir, tmp_path, shared):
    from grpo.commands.train import build, train_step
    from grpo.parts import config as C
    from grpo.parts.run import Run
    from tests.commands.test_train_e2e import cfg_for

    steps = {}
    for chunk in (0, 5):
        raw = cfg_for(tiny_model_dir, "trainer.max_steps=1", "algorithm.beta=0.1", "algorithm.epochs=2",
                      f"trainer.shared_prompt={shared}", f"trainer.logprob_chunk={chunk}")
        cfg = C.parse(C.TrainConfig, raw)
        with Run.from_config("grpo", cfg, raw, tmp_path / str(chunk)) as run:
            grpo = build(cfg, run)
            assert logprob_chunk(grpo.policy.fwd) == chunk and logprob_chunk(grpo.policy.ref) == chunk
            steps[chunk] = (train_step(grpo, run),
                            torch.cat([p.detach().flatten() for p in grpo.policy.model.parameters()]))
    (ma, wa), (mb, wb) = steps[0], steps[5]
    for key in ("loss", "kl", "entropy", "grad_norm", "clip/frac", "rollout/logprob_abs_diff/max"):
        assert ma[key] == pytest.approx(mb[key], abs=1e-6), key
    assert (wa - wb).abs().max() < 1e-6


@pytest.mark.slow
def test_a_step_under_fsdp2_is_the_same_chunked(tmp_path_factory):
    """Two processes under FSDP2, chunked, padded rows (the pass re-enters the sharded wrapper; the head's
    weight is the gathered one inside it), against one process with whole logits: the same weights."""
    from grpo.commands.embedded import build_tokenizer, init_model
    from tests.parts.test_distributed import STEP, worker

    model2 = tmp_path_factory.mktemp("model2")
    init_model(model2, build_tokenizer(model2), hidden=64, layers=2, seed=0)
    one, many = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("many")
    base = worker(1, "step", model2, one / "out.pt", one / "run", *STEP, "trainer.shared_prompt=false")
    got = worker(2, "step", model2, many / "out.pt", many / "run", *STEP, "trainer.shared_prompt=false",
                 "parallel=fsdp2", "trainer.logprob_chunk=7")
    assert got["world"] == 2
    gap = max(float((got["model"][k] - base["model"][k]).abs().max()) for k in base["model"])
    assert gap < 1e-6, gap
    for k in ("loss", "kl", "entropy"):
        assert got["metrics"][k] == pytest.approx(base["metrics"][k], rel=1e-5, abs=1e-7), k
