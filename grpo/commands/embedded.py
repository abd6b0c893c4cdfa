"""The embedded default model: a ~1M-parameter Llama with a character-level tokenizer.

Rebuild it with `make embedded-model` (= `python -m grpo.commands.embedded`), which
  1. writes a character-level tokenizer with a chat template,
  2. initialises a LlamaForCausalLM from a config (head_dim 64, as vLLM's CPU backend needs),
  3. writes procedural SFT data from the arithmetic task's *training* split, and
  4. runs this project's own `grpo sft` on it, then copies the result into grpo/data/embedded_model.

`python -m grpo.commands.embedded --task chat` builds grpo/data/embedded_chat_model (`model.path=embedded-chat`), the
policy of the built-in preference task: the arithmetic model fine-tuned to answer in several styles
(terse and boxed, chatty, unboxed), right half of the time, so its samples vary in format, length
and correctness, which is what the task's simulated labellers care about.

`python -m grpo.commands.embedded --task rm` builds grpo/data/embedded_rm (`reward_model.path=embedded-rm`): the
default `grpo rm` (the embedded model plus a scalar head, trained on the built-in preference task's
rankings, grpo/data/prefs_train.jsonl), copied into the package.

`python -m grpo.commands.embedded --task code` builds grpo/data/embedded_code_model (`model.path=embedded-code`)
the same way from the code task's training split (tasks/code_functions.py), with near misses that
use a wrong constant or a wrong operation.

The SFT targets are right only `P_CORRECT` of the time (the rest are near misses such as
off-by-one or a wrong carry), on purpose: the model learns the answer format and a spread of
candidate answers, so sampling from it starts with a nonzero but clearly improvable reward, the
situation GRPO is for. The default GRPO run then sharpens it towards the right answers.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from grpo.parts.modeling import (EMBEDDED_CHAT_MODEL_DIR, EMBEDDED_CODE_MODEL_DIR, EMBEDDED_MODEL_DIR, EMBEDDED_RM_DIR,
                                 EMBEDDED_TOOLS_MODEL_DIR)
from grpo.tasks.arithmetic import ArithmeticTask

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|unk|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
P_CORRECT = 0.5
NEAR_MISSES = (-10, -2, -1, 1, 2, 10)


def build_tokenizer(out: Path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|end|>", pad_token="<|pad|>", unk_token="<|unk|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def init_model(out: Path, tok, hidden: int = 128, layers: int = 4, seed: int = 0):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
        max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    return model


def completion(answer: int) -> str:
    return f"\\boxed{{{answer}}}"


def half_right_rows(task, n: int, seed: int, right, near_miss) -> list[dict]:
    """SFT rows from a task's training split whose target is right(sample) with probability
    P_CORRECT and near_miss(sample, rng) otherwise."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s = task.train_sample(i)
        target = right(s) if rng.random() < P_CORRECT else near_miss(s, rng)
        rows.append({"prompt": s.prompt, "completion": target})
    return rows


def sft_rows(n: int, seed: int) -> list[dict]:
    """Arithmetic: the boxed sum, or the sum off by 1, 2 or 10."""
    task = ArithmeticTask(seed=seed + 1000)  # another stream than the GRPO run's, same split
    return half_right_rows(task, n, seed, lambda s: completion(int(s.answer)),
                           lambda s, rng: completion(int(s.answer) + rng.choice(NEAR_MISSES)))


def code_sft_rows(n: int, seed: int) -> list[dict]:
    """Code: the reference program, or one with a wrong constant or operation."""
    from grpo.tasks.code_functions import CodeFunctionsTask, near_miss

    task = CodeFunctionsTask(seed=seed + 1000)  # another stream than the GRPO run's, same split
    return half_right_rows(task, n, seed, lambda s: s.meta["solution"], near_miss)


def chat_sft_rows(n: int, seed: int) -> list[dict]:
    """Chat: the arithmetic answer (right half of the time, else a near miss) in one of several
    styles, from the terse `\\boxed{N}` to chatty or unboxed ones, so that the model's samples vary
    in what people's preferences are about: format, length and correctness (the built-in
    preference task, grpo/commands/prefs.py)."""
    task = ArithmeticTask(seed=seed + 2000)  # another stream than any training run's, same split
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s = task.train_sample(i)
        a, b = s.meta["a"], s.meta["b"]
        v = int(s.answer) if rng.random() < P_CORRECT else int(s.answer) + rng.choice(NEAR_MISSES)
        style = rng.choice(CHAT_STYLES)
        rows.append({"prompt": s.prompt, "completion": style.format(a=a, b=b, v=v, box=completion(v))})
    return rows


# Styles of the chat model's answers: boxed and terse, boxed with 5 to 20 extra characters, or unboxed.
CHAT_STYLES = ("{box}", "Sure! {box}", "{a}+{b}={v}. {box}", "The answer is {box}.", "{box} Hope this helps!",
               "{v}", "answer: {v}")


# The tools model's demonstrations: a right call of the python tool, a wrong call, or a guess without it.
P_TOOL_RIGHT, P_TOOL_WRONG = 0.35, 0.3
PRODUCTS = {"ops": ["*"], "min_operand": 10, "max_operand": 999}  # the task of +experiment=tools


def tools_sft_rows(n: int, seed: int) -> list[dict]:
    """Tools: products of two- and three-digit numbers, which the model cannot work out itself, as
    multi-turn demonstrations (grpo sft learns the assistant's turns only). With probability
    P_TOOL_RIGHT the model calls the python tool with the right program and copies its result into
    the box; with P_TOOL_WRONG it calls it with a wrong program (a sum, an operand off by one or
    ten) and copies that; else it guesses: the product with one digit changed. The tool results are
    what the sandbox prints for each program (computed here the same way)."""
    task = ArithmeticTask(seed=seed + 3000, **PRODUCTS)  # another stream than any training run's, same split
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s = task.train_sample(i)
        a, b = s.meta["a"], s.meta["b"]
        u = rng.random()
        if u < P_TOOL_RIGHT + P_TOOL_WRONG:
            x, y, op = a, b, "*"
            if u >= P_TOOL_RIGHT:
                x, y, op = rng.choice([(a, b, "+"), (a + 1, b, "*"), (a, b - 1, "*"), (a, b + 10, "*")])
            value = x * y if op == "*" else x + y
            turns = [{"role": "assistant", "content": f"```python\nprint({x}{op}{y})\n```"},
                     {"role": "tool", "content": f"{value}\n"},
                     {"role": "assistant", "content": completion(value)}]
        else:
            digits = list(str(a * b))
            k = rng.randrange(len(digits))
            digits[k] = str((int(digits[k]) + rng.randint(1, 9)) % 10) if k or len(digits) == 1 else str(rng.randint(1, 9))
            turns = [{"role": "assistant", "content": completion(int("".join(digits)))}]
        rows.append({"prompt": s.prompt, "completion": turns})
    return rows


# task -> (output dir, SFT rows, SFT steps, SFT batch size, start from); the code data is learnt in
# less; the chat and tools models start from the arithmetic one, which already knows the format.
TASKS = {"arithmetic": (EMBEDDED_MODEL_DIR, sft_rows, 3000, 64, None),
         "code": (EMBEDDED_CODE_MODEL_DIR, code_sft_rows, 1500, 32, None),
         "chat": (EMBEDDED_CHAT_MODEL_DIR, chat_sft_rows, 1000, 64, EMBEDDED_MODEL_DIR),
         "tools": (EMBEDDED_TOOLS_MODEL_DIR, tools_sft_rows, 1500, 64, EMBEDDED_MODEL_DIR)}


def build(out_dir: Path, steps: int, rows: int, seed: int, extra: list[str], make_rows=sft_rows,
          batch_size: int = 64, init_from: Path | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init = tmp / "init"
        if init_from is not None:  # fine-tune a shipped model instead of starting from scratch
            shutil.copytree(init_from, init)
        else:
            tok = build_tokenizer(init)
            init_model(init, tok, seed=seed)
        data = tmp / "sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(rows, seed)))
        run = tmp / "run"
        cmd = [sys.executable, "-m", "grpo", "sft", f"model.path={init}", f"data.path={data}",
               f"trainer.max_steps={steps}", f"trainer.seed={seed}", f"trainer.batch_size={batch_size}", f"hydra.run.dir={run}", *extra]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(run / "model", out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(f"embedded model written to {out_dir} ({size / 1e6:.1f} MB)")


def build_rm(out_dir: Path, seed: int, extra: list[str]) -> None:
    """The default `grpo rm`, copied into the package."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "grpo", "rm", f"trainer.seed={seed}", f"hydra.run.dir={run}", *extra]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(run / "model", out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(f"embedded reward model written to {out_dir} ({size / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m grpo.commands.embedded", description="Rebuild the embedded default model.")
    ap.add_argument("--task", choices=sorted(TASKS) + ["rm"], default="arithmetic",
                    help="which SFT data (and default --out); rm = the embedded reward model")
    ap.add_argument("--out", type=Path, default=None, help="default: grpo/data/embedded_model, or grpo/data/embedded_code_model")
    ap.add_argument("--steps", type=int, default=None, help="default: 3000 (arithmetic), 1500 (code)")
    ap.add_argument("--rows", type=int, default=50000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for `grpo sft`")
    a = ap.parse_args(argv)
    if a.task == "rm":
        build_rm(a.out or EMBEDDED_RM_DIR, a.seed, a.overrides)
        return
    out, make_rows, steps, batch_size, init_from = TASKS[a.task]
    build(a.out or out, a.steps or steps, a.rows, a.seed, a.overrides, make_rows, batch_size, init_from)


if __name__ == "__main__":
    main()
