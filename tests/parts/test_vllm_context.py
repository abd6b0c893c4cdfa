"""rollout=vllm on a model whose config allows a long context (Llama-3: 131072 positions).

vLLM reserves KV cache for its whole context, so the engine's context defaults to what the task
needs, and a context that cannot fit is one line naming the options, before vLLM starts.
"""

import json
import os

import pytest
from transformers import LlamaConfig

from grpo.parts.config import ConfigError
from grpo.parts.rollout import check_kv_cache, context_length, kv_cache_bytes
from tests.conftest import run_grpo

VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


def test_default_context_is_the_task_need_rounded_up():
    assert context_length(40, 16, 131072) == 256  # 56 tokens -> the next multiple of 256
    assert context_length(300, 16, None) == 512  # 316 -> 512; no model limit known
    assert context_length(250, 16, 256) == 256  # 266 would round to 512, but the model stops at 256


def test_kv_cache_size_of_a_llama_shape():
    c = LlamaConfig(num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, head_dim=64, hidden_size=128)
    # K and V, 4 layers, 2 KV heads of 64 dims, 4 bytes each (float32), 131072 positions:
    # 2 * 4 * 2 * 64 * 4 * 131072 = 512 MiB, the 0.5 GiB vLLM's own check reports for this shape
    assert kv_cache_bytes(c, "float32", 131072) == 512 << 20
    assert kv_cache_bytes(c, "bfloat16", 131072) == 256 << 20
    c.sliding_window = 4096  # a windowed cache is smaller than this count: no estimate, vLLM decides
    assert kv_cache_bytes(c, "float32", 131072) is None


def test_a_context_that_cannot_fit_names_the_options():
    c = LlamaConfig(num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, head_dim=64, hidden_size=128)
    # 4 KiB per position; 0.25 GiB holds 65536 of them
    with pytest.raises(ConfigError, match=r"rollout.max_model_len=131072 tokens needs 0.50 GiB of KV cache, more "
                                          r"than rollout.kv_cache_gib=0.25: lower rollout.max_model_len \(at most "
                                          r"65536 fits\) or raise rollout.kv_cache_gib"):
        check_kv_cache(c, "float32", 131072, 0.25)
    check_kv_cache(c, "float32", 65536, 0.25)  # fits exactly


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A 4-layer Llama with head_dim 64 whose config allows 131072 positions (0.5 GiB of float32 KV cache)."""
    from grpo.commands.embedded import build_tokenizer, init_model

    out = tmp_path_factory.mktemp("long_model")
    init_model(out, build_tokenizer(out), hidden=128, layers=4, seed=0)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 131072}))
    return out


ARGS = ["train", "rollout=vllm", "model.device=cpu", "logger=jsonl", "trainer.prompts_per_step=2",
        "algorithm.group_size=2", "trainer.max_steps=1", "trainer.eval_size=2", "task.eval_size=2",
        "rollout.max_new_tokens=4", "rollout.kv_cache_gib=0.0625",
        "task.verifiers=[{_target_: tests.toy_verifiers.DigitFraction}]"]


@pytest.mark.slow
def test_the_whole_context_asked_for_is_one_line_before_vllm_starts(long_model, tmp_path):
    pytest.importorskip("vllm", reason="vllm is not installed: `make setup-vllm` installs it (CI does)")
    r = run_grpo(*ARGS, f"model.path={long_model}", "rollout.max_model_len=131072", f"hydra.run.dir={tmp_path / 'run'}",
                 timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "grpo train: error: rollout=vllm: a context of rollout.max_model_len=131072 tokens needs 0.50 GiB of KV "
        "cache, more than rollout.kv_cache_gib=0.0625: lower rollout.max_model_len (at most 16384 fits) or raise "
        "rollout.kv_cache_gib"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_default_context_fits_where_the_model_maximum_would_not(long_model, tmp_path, monkeypatch):
    pytest.importorskip("vllm", reason="vllm is not installed: `make setup-vllm` installs it (CI does)")
    for k, v in VLLM_ENV.items():
        monkeypatch.setenv(k, os.environ.get(k, v))
    # rollout.max_model_len unset: the arithmetic prompts (< 40 tokens) + 4 new tokens -> 256 positions,
    # 1 MiB of cache where the model's 131072 would need 512 MiB of the 64 MiB given
    r = run_grpo(*ARGS, f"model.path={long_model}", f"hydra.run.dir={tmp_path}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 1]
