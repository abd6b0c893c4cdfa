"""The scalar-head reward model (grpo.parts.reward_model) on the tiny config-built Llama from conftest."""

import json
import logging
import math

import pytest
import torch

from grpo.parts.modeling import ModelError, load_tokenizer
from grpo.parts.reward_model import (batch_sequences, fit_normalizer, init_reward_model, load_reward_model, raw_scores,
                               save_reward_model, sequence_scores)

PAD, EOS = 0, 1  # the tiny model's tokenizer: <|pad|> = 0, <|end|> = 1


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def seqs(tok):
    # Different lengths, every one ending with EOS: with pad == eos the right padding looks like more EOS.
    return [tok.encode(t) + [EOS] for t in ("1+2=3", "7", "12*3=36", "ab")]


def left_pad(seqs, pad_id):
    L = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (L - len(s)) + s for s in seqs])
    attn = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    return ids, attn


def unpadded_reference(model, seqs):
    """The head on the last hidden state of each sequence run alone: no padding, nothing to locate."""
    out = []
    with torch.no_grad():
        for s in seqs:
            h = model.model(input_ids=torch.tensor([s])).last_hidden_state[0, -1]  # [H]
            out.append(model.score(h).squeeze(-1))
    return torch.stack(out).float()  # [N]


@pytest.mark.parametrize("pad_id", [PAD, EOS], ids=["pad!=eos", "pad==eos"])
def test_score_is_the_last_real_token_with_either_padding(tiny_model_dir, seqs, pad_id):
    model = init_reward_model(str(tiny_model_dir), pad_token_id=pad_id)
    assert model.config.pad_token_id == pad_id and model.config.num_labels == 1
    ref = unpadded_reference(model, seqs)
    with torch.no_grad():
        right = sequence_scores(model, *batch_sequences(seqs, pad_id))
        left = sequence_scores(model, *left_pad(seqs, pad_id))
    assert right.dtype == torch.float32 and right.shape == (len(seqs),)
    torch.testing.assert_close(right, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, ref, atol=1e-5, rtol=0)
    assert ref.std() > 1e-3  # the sequences do score differently, so a wrong index would show


def test_unpadded_score_matches_transformers_forward_when_unambiguous(tiny_model_dir, seqs):
    # pad != eos and no padding: transformers' own pooling picks the last token too, so both agree
    model = init_reward_model(str(tiny_model_dir))
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            hf = model(input_ids=ids).logits[:, 0]  # [1]
            torch.testing.assert_close(raw_scores(model, ids, torch.ones_like(ids)), hf.float())


def test_init_loads_the_trunk_and_sets_pad(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = init_reward_model(str(tiny_model_dir))
    torch.testing.assert_close(model.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert model.config.pad_token_id == PAD  # from the config when not given
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def test_init_is_quiet_about_the_new_head(tiny_model_dir, caplog):
    from transformers import AutoModelForSequenceClassification

    def reported():
        return any("score.weight" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING):
        AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
        assert reported()  # control: plain from_pretrained does report the new head
        caplog.clear()
        init_reward_model(str(tiny_model_dir))
        assert not caplog.records  # nothing else either
        AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
        assert reported()  # the report is back after init


def test_normalisation_by_hand(tiny_model_dir, seqs):
    # score = (raw - bias) / scale with bias 2, scale 4
    model = init_reward_model(str(tiny_model_dir))
    ids, attn = batch_sequences(seqs, PAD)
    with torch.no_grad():
        raw = raw_scores(model, ids, attn)
        torch.testing.assert_close(sequence_scores(model, ids, attn), raw)  # defaults 0 and 1
        model.config.reward_bias, model.config.reward_scale = 2.0, 4.0
        torch.testing.assert_close(sequence_scores(model, ids, attn), (raw - 2.0) / 4.0)


def test_fit_normalizer_by_hand(tiny_model_dir):
    # raw [1, 2, 3, 6]: mean 3; unbiased std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14 / 3)
    model = init_reward_model(str(tiny_model_dir))
    raw = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert fit_normalizer(model, raw) == {"reward_bias": 3.0, "reward_scale": 1.0}
    out = fit_normalizer(model, raw, with_scale=True)
    assert out["reward_bias"] == 3.0 and out["reward_scale"] == pytest.approx(math.sqrt(14 / 3))
    assert model.config.reward_scale == out["reward_scale"]
    with pytest.raises(ValueError, match="std is 0"):
        fit_normalizer(model, torch.ones(3), with_scale=True)


@pytest.mark.parametrize("with_scale", [False, True])
def test_fit_normalizer_centres_the_reference_scores(tiny_model_dir, seqs, with_scale):
    model = init_reward_model(str(tiny_model_dir))
    ids, attn = batch_sequences(seqs, PAD)
    with torch.no_grad():
        fit_normalizer(model, raw_scores(model, ids, attn), with_scale=with_scale)
        s = sequence_scores(model, ids, attn)
    assert s.mean().item() == pytest.approx(0.0, abs=1e-6)
    if with_scale:
        assert s.std().item() == pytest.approx(1.0, abs=1e-5)


def test_normalisation_survives_save_and_reload(tiny_model_dir, seqs, tok, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = init_reward_model(str(tiny_model_dir))
    ids, attn = batch_sequences(seqs, PAD)
    with torch.no_grad():
        fit = fit_normalizer(model, raw_scores(model, ids, attn), with_scale=True)
        before = sequence_scores(model, ids, attn)
    out = save_reward_model(model, tok, tmp_path / "rm")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["reward_bias"] == fit["reward_bias"] and cfg["reward_scale"] == fit["reward_scale"]

    loaded = load_reward_model(str(out))
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(loaded, ids, attn), before)
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    assert plain.config.reward_bias == fit["reward_bias"] and plain.config.reward_scale == fit["reward_scale"]
    assert load_tokenizer(str(out)).pad_token_id == PAD


def test_load_rejects_a_causal_lm(tiny_model_dir):
    with pytest.raises(ModelError, match=r"score.*head") as e:
        load_reward_model(str(tiny_model_dir))
    assert str(tiny_model_dir) in str(e.value) and "\n" not in str(e.value)


def test_load_rejects_num_labels_2(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, LlamaForSequenceClassification

    LlamaForSequenceClassification(AutoConfig.from_pretrained(tiny_model_dir, num_labels=2)).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="num_labels=2"):
        load_reward_model(str(tmp_path))


def test_scores_need_a_head_and_a_real_token(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    ids, attn = batch_sequences([[5, 6, EOS]], PAD)
    with pytest.raises(ModelError, match="no `score` head"):
        sequence_scores(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids, attn)
    with pytest.raises(ValueError, match="no real token"):
        sequence_scores(init_reward_model(str(tiny_model_dir)), ids, torch.zeros_like(attn))


def test_gradients_reach_head_and_trunk(tiny_model_dir, seqs):
    model = init_reward_model(str(tiny_model_dir))
    sequence_scores(model, *batch_sequences(seqs, PAD)).sum().backward()
    assert model.score.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_batch_sequences_right_pads():
    ids, attn = batch_sequences([[5, 6, 7], [8]], pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]]
    assert attn.tolist() == [[1, 1, 1], [1, 0, 0]]
