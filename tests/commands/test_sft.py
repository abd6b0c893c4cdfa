import json

import pytest
import torch

from grpo.cli import compose_config
from grpo.commands.sft import run_sft
from grpo.parts.batch import batch_tensors, encode_rows
from grpo.tasks.file import located_rows
from grpo.parts.modeling import load_tokenizer
from grpo.tasks.base import TaskError
from tests.conftest import run_interrupted


def test_labels_cover_only_the_completion_and_eos(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    pairs = encode_rows(tok, [("x.jsonl", {"prompt": "1+1", "completion": "2"}),
                              ("x.jsonl", {"prompt": "10+10", "completion": "20"})], "prompt", "completion")
    # "<|user|>1+1<|end|><|assistant|>" = 1 + 3 + 2 tokens; completion "2" + EOS = 2 tokens
    assert [len(p) for p, _, _ in pairs] == [6, 8] and [len(c) for _, c, _ in pairs] == [2, 3]
    ids, attn, labels = batch_tensors(pairs, tok.pad_token_id)
    assert ids.shape == (2, 11)  # the longer row: 8 + 3
    assert labels[0].tolist() == [-100] * 6 + [tok.convert_tokens_to_ids("2"), tok.eos_token_id] + [-100] * 3
    assert (labels[1] != -100).sum() == 3 and attn[0].sum() == 8


def test_rows_without_completion_are_named_by_their_editor_line(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    path = tmp_path / "d.jsonl"
    # line 1 is fine, line 2 is blank (skipped but counted), line 3 lacks the completion
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n')
    with pytest.raises(TaskError, match=r"d.jsonl: line 3: missing field 'completion'"):
        encode_rows(tok, located_rows(str(path)), "prompt", "completion")


@pytest.mark.slow
def test_sft_learns_a_fixed_mapping(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"say {w}", "completion": w.upper()} for w in ("cat", "dog", "owl", "bee")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config("sft", [f"model.path={tiny_model_dir}", f"data.path={data}", "trainer.max_steps=150",
                                 "trainer.batch_size=8", "trainer.log_every=10", "optim.lr=3e-3", "optim.warmup_steps=5"])
    out = run_sft(cfg, tmp_path)["model"]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # A random model starts near ln(vocab ~ 102) = 4.6 nats; four fixed 4-token targets are memorised.
    assert losses[0] > 2.0 and losses[-1] < 0.3
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = load_tokenizer(str(out))
    ids = tok("<|user|>say owl<|end|><|assistant|>", add_special_tokens=False, return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True) == "OWL"


@pytest.mark.slow
def test_sft_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w}", "completion": w}) + "\n" for w in ("ab", "cd", "ef")))

    def cfg(*extra):
        return compose_config("sft", [f"model.path={tiny_model_dir}", f"data.path={data}", "trainer.batch_size=4", "trainer.log_every=1", "trainer.save_every=2",
                                      "optim.warmup_steps=2", "optim.schedule=constant_with_warmup", *extra])

    # The interrupted run stops after 2 of 5 steps; a constant schedule (after warm-up) does not
    # depend on max_steps, so the 2-step run is exactly the first 2 steps of the 5-step one.
    full, part, _ = run_interrupted(run_sft, cfg, tmp_path, 5, 2)
    a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]  # the resumed log has each step once
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["lr"] for r in a] == [r["lr"] for r in b]
    from transformers import AutoModelForCausalLM

    wa = AutoModelForCausalLM.from_pretrained(full / "model").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(part / "model").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
