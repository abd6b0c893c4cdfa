"""Multi-turn, tool-using training end to end: GRPO and PPO on task=tools with the embedded tools
model, exact resume in the middle of a multi-turn run, `grpo eval` writing whole conversations, and
grpo sft on multi-turn demonstrations (only the assistant's tokens learn)."""

import json

import pytest

from grpo.cli import compose_config
from grpo.commands.eval import run_eval
from grpo.commands.ppo import run_ppo
from grpo.commands.train import train
from grpo.parts.batch import batch_tensors, encode_rows
from grpo.parts.modeling import EMBEDDED_TOOLS_MODEL_DIR, load_tokenizer
from tests.conftest import assert_resumed_exactly, run_interrupted, torchrun

SMALL = ["logger=jsonl", "trainer.prompts_per_step=4", "algorithm.group_size=4", "trainer.eval_size=8",
         "task.eval_size=8"]


def cfg(*overrides):
    return compose_config("train", ["+experiment=tools", *SMALL, *overrides])


def records(run_dir, key):
    return [r for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.mark.slow
def test_grpo_trains_on_conversations_and_logs_them(tmp_path):
    train(cfg("trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0"), tmp_path)
    steps = records(tmp_path, "loss")
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["tool/calls_mean"] > 0 and r["env/turns_mean"] > 1 and r["tool/error_frac"] == 0
        assert r["tool/time"] > 0 and r["env/end/answered_frac"] == 1.0 and r["env/end/tool_cap_frac"] == 0
        # the engine samples from the trainer's own module: the gap over the model's tokens is float noise
        assert r["rollout/logprob_abs_diff/max"] < 1e-4
    evals = records(tmp_path, "eval/reward/mean")
    assert evals[0]["eval/tool/calls_mean"] > 0 and "eval/env/end/answered_frac" in evals[0]


@pytest.mark.slow
@pytest.mark.parametrize("eta", [0, 1])
def test_resume_in_the_middle_of_a_multi_turn_run_is_exact(tmp_path, eta):
    # eta = 1: the checkpoint after step 2 holds the conversations step 3 trains on (tool turns,
    # the mask of the model's tokens); the resumed run must train on them as they were
    common = ["trainer.eval_every=0", "trainer.save_every=2", "optim.lr=1e-3", f"rollout.max_staleness={eta}"]
    full, part, _ = run_interrupted(train, lambda *o: cfg(*o, *common), tmp_path, 4, 2)
    assert_resumed_exactly(full, part, (3, 4), ("reward/mean", "loss", "tool/calls_mean", "env/turns_mean",
                                                "completion/len_mean"), 4)
    if eta:
        steps = records(part, "loss")
        assert [r["async/staleness"] for r in steps] == [0, 1, 1, 1]  # the part run's 2 steps, then the resumed 2
        # step 1 trains on the initial policy's conversations with the initial policy: the gap over the
        # model's tokens is float noise, as on-policy (tool tokens would add whole log-probs)
        assert steps[0]["rollout/logprob_abs_diff/max"] < 1e-4 and steps[2]["tool/calls_mean"] > 0


@pytest.mark.slow
def test_fsdp2_ranks_taking_different_numbers_of_turns_stay_in_step(tmp_path):
    # rank 0's conversations last 1 turn, rank 1's 2: the sharded model's forwards stay paired
    torchrun(2, "-m", "grpo", "train", "model.path=embedded-tools", "rollout.max_new_tokens=32", *SMALL,
             "parallel=fsdp2", "trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0",
             "+task.env={_target_: tests.envs.sample_tools:RankTurns}",
             f"hydra.run.dir={tmp_path}", timeout=300)
    steps = records(tmp_path, "loss")
    assert [r["step"] for r in steps] == [1, 2]
    # the metrics are the two ranks' means: half the conversations took 1 turn, half 2
    assert all(r["env/turns_mean"] == 1.5 for r in steps)


@pytest.mark.slow
def test_ppo_trains_on_conversations(tmp_path):
    run_ppo(compose_config("ppo", ["model.path=embedded-tools", "task=tools", "reward_model=none", "logger=jsonl",
                                   "trainer.prompts_per_step=4", "ppo.samples=2", "trainer.eval_size=8",
                                   "task.eval_size=8", "trainer.eval_every=0", "trainer.max_steps=2"]), tmp_path)
    steps = records(tmp_path, "objective/scores")
    assert len(steps) == 2
    for r in steps:
        assert r["tool/calls_mean"] > 0 and r["env/turns_mean"] > 1
        assert r["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5)  # trainer and sampler agree on the model's tokens
        assert all(v == v for k, v in r.items() if isinstance(v, float))  # nothing NaN


@pytest.mark.slow
def test_eval_writes_whole_conversations(tmp_path):
    s = run_eval(compose_config("eval", ["model.path=embedded-tools", "task=tools", "task.eval_size=8",
                                         "rollout.max_new_tokens=32", "eval.samples=2"]), tmp_path)
    assert s["tool/calls_mean"] > 0 and s["env/end/answered_frac"] == 1.0
    recs = [json.loads(line) for line in open(s["output"], encoding="utf-8")]
    called = [r for r in recs if r["tool_calls"]]
    assert called and called[0]["conversation"][1]["role"] == "tool"
    assert called[0]["conversation"][-1]["content"] == called[0]["completion"] and called[0]["end"] == "answered"


def test_sft_learns_only_the_assistants_turns_of_a_demonstration():
    tok = load_tokenizer(str(EMBEDDED_TOOLS_MODEL_DIR))
    turns = [{"role": "assistant", "content": "```python\nprint(2*3)\n```"}, {"role": "tool", "content": "6\n"},
             {"role": "assistant", "content": "\\boxed{6}"}]
    rows = encode_rows(tok, [("d.jsonl:1", {"prompt": "What is 2 * 3?", "completion": turns})], "prompt", "completion")
    (p, c, learn), = rows
    ids, attn, labels = batch_tensors(rows, tok.pad_token_id)
    learnt = tok.decode([t for t in labels[0].tolist() if t != -100])
    # the two assistant messages, each with its end token (one character per token here)
    assert learnt == "```python\nprint(2*3)\n```<|end|>\\boxed{6}<|end|>"
    # the tool's turn and the next header are in the sequence, unlearnt
    assert tok.decode(c) == "```python\nprint(2*3)\n```<|end|><|tool|>6\n<|end|><|assistant|>\\boxed{6}<|end|>"
    from grpo.tasks.base import TaskError

    with pytest.raises(TaskError, match="d.jsonl:1: field 'completion': a demonstration's turns must end"):
        encode_rows(tok, [("d.jsonl:1", {"prompt": "x", "completion": turns[:2]})], "prompt", "completion")
