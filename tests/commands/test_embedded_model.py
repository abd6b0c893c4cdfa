"""The shipped default model and the default run that trains it."""

import json

import pytest

from grpo.cli import compose_config
from grpo.parts.modeling import EMBEDDED_MODEL_DIR, load_model, load_tokenizer, resolve_model_path


def test_embedded_model_is_small_vllm_shaped_and_has_a_chat_template():
    assert resolve_model_path("embedded") == str(EMBEDDED_MODEL_DIR)
    size = sum(f.stat().st_size for f in EMBEDDED_MODEL_DIR.iterdir())
    assert size < 10e6
    model, tok = load_model("embedded"), load_tokenizer("embedded")
    assert model.config.head_dim == 64  # vLLM's CPU attention needs 64
    assert model.config.model_type == "llama"
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>What is 1 + 2?<|end|><|assistant|>"
    ids = tok("\\boxed{12}", add_special_tokens=False)["input_ids"]
    assert len(ids) == 10 and tok.decode(ids) == "\\boxed{12}"  # one token per character


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """20 steps of the default config raise the held-out sampled reward.

    In a 120-step run the held-out reward went 0.44 -> 0.64 by step 20. Each evaluation scores 128
    samples (sd about sqrt(0.25/128) = 0.044), so the gap of two has sd about 0.06: a 0.08
    threshold is far below the expected +0.2 and far above noise.
    """
    from grpo.commands.train import train

    cfg = compose_config("train", ["logger=jsonl", "trainer.max_steps=20", "trainer.eval_every=20", "trainer.save_every=0"])
    summary = train(cfg, tmp_path)
    first, last = summary["first_eval"]["eval/reward/mean"], summary["last_eval"]["eval/reward/mean"]
    assert last - first >= 0.08, (first, last)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "eval/reward/mean" in r] == [0, 20]
