"""The procedural code task, its tests judged by the real code verifier, and code rows from a file."""

import json
import random

import pytest

from grpo.cli import compose_config
from grpo.tasks.base import TaskError, build_task
from grpo.tasks.code_functions import FAMILIES, CodeFunctionsTask, is_held_out, near_miss
from grpo.tasks.file import FileTask


def pair(s):
    return s.meta["family"], s.meta["k"]


def test_code_task_is_deterministic_and_seeded():
    a, b = CodeFunctionsTask(seed=3), CodeFunctionsTask(seed=3)
    for i in range(50):
        assert a.train_sample(i) == b.train_sample(i)
    assert a.eval_samples() == b.eval_samples()
    other = CodeFunctionsTask(seed=4)
    assert [other.train_sample(i) for i in range(5)] != [a.train_sample(i) for i in range(5)]


def test_held_out_pairs_are_never_trained_on():
    t = CodeFunctionsTask(seed=0, eval_size=64)
    held = {pair(s) for s in t.eval_samples()}
    assert all(is_held_out(f, k, t.fraction) for f, k in held)
    train = {pair(t.train_sample(i)) for i in range(3000)}
    assert not held & train
    assert len(train) > 150  # the draw reaches most training pairs, not a handful


def test_samples_are_well_formed_and_short():
    t = CodeFunctionsTask(seed=1, cases=4)
    for i in range(200):
        s = t.train_sample(i)
        call = s.tests["call"]
        assert call["fn_name"] == s.meta["fn_name"] and len(call["cases"]) == 4
        assert s.prompt.startswith(f"Write {s.meta['fn_name']}({s.meta['arg']}) that returns ")
        assert 18 <= len(s.meta["solution"]) <= 35
        json.dumps(s.tests)  # travels to the sandbox harness as JSON


def test_expected_values_match_the_reference_program_run_here():
    # Independent of the sandbox: exec the reference and call it on every case.
    t = CodeFunctionsTask(seed=2)
    for s in [t.train_sample(i) for i in range(300)] + t.eval_samples():
        env: dict = {}
        exec(s.meta["solution"], env)
        fn = env[s.meta["fn_name"]]
        for c in s.tests["call"]["cases"]:
            assert fn(*c["args"]) == c["expected"], (s.prompt, c)


def test_near_misses_are_wrong_on_some_case_and_right_on_some():
    t = CodeFunctionsTask(seed=0)
    rng = random.Random(0)
    partial = 0
    for i in range(300):
        s = t.train_sample(i)
        prog = near_miss(s, rng)
        assert prog != s.meta["solution"]
        env: dict = {}
        exec(prog, env)
        passed = 0
        for c in s.tests["call"]["cases"]:
            try:
                passed += env[s.meta["fn_name"]](*c["args"]) == c["expected"]
            except Exception:
                pass
        assert passed < len(s.tests["call"]["cases"]), (s.prompt, prog)
        partial += passed > 0
    assert partial > 20  # some cases are chosen so that near misses earn partial credit


def test_bad_options_are_reported():
    with pytest.raises(TaskError, match="families"):
        CodeFunctionsTask(families=["divide"])
    with pytest.raises(TaskError, match="cases"):
        CodeFunctionsTask(cases=0)
    cfg = compose_config("train", ["task=code"])["task"]
    assert cfg["verifiers"][0]["name"] == "code"
    assert isinstance(build_task(cfg), CodeFunctionsTask)


def test_experiment_config_leaves_room_for_the_longest_program():
    cfg = compose_config("train", ["+experiment=code"])
    assert cfg["task"]["name"] == "code" and cfg["model"]["path"] == "embedded-code"
    t = build_task(cfg["task"])
    longest = max(len(s.meta["solution"]) for s in [t.train_sample(i) for i in range(500)] + t.eval_samples())
    assert cfg["rollout"]["max_new_tokens"] > longest  # one token per character, plus EOS
    assert cfg["task"]["verifiers"][0] == {"name": "code", "parallelism": 2, "test_time": 4.0}


@pytest.fixture(scope="module")
def code_verifier():
    from grpo.verifiers.code import CodeVerifier

    v = CodeVerifier(parallelism=2)
    yield v


def test_reference_scores_one_and_near_miss_less_through_the_code_verifier(code_verifier):
    t = CodeFunctionsTask(seed=5)
    rng = random.Random(1)
    # One sample per family, so every family's tests go through the real sandbox once.
    by_family = {}
    for i in range(500):
        s = t.train_sample(i)
        by_family.setdefault(s.meta["family"], s)
    assert set(by_family) == set(FAMILIES)
    samples = list(by_family.values())
    comps = [s.meta["solution"] for s in samples] + [near_miss(s, rng) for s in samples]
    scores = code_verifier.score(comps, [s.fields() for s in samples] * 2)
    n = len(samples)
    assert [sc.reward for sc in scores[:n]] == [1.0] * n, [sc.info for sc in scores[:n]]
    assert all(sc.reward < 1.0 for sc in scores[n:]), [(c, sc.info) for c, sc in zip(comps[n:], scores[n:])]


CODE_ROWS = [
    {"prompt": "Write f(x) that returns x plus 3.", "tests": {"call": {"fn_name": "f", "cases": [
        {"args": [1], "expected": 4}, {"args": [0], "expected": 3}]}}},
    {"prompt": "Write f(s) that returns s reversed.", "tests": {"call": {"fn_name": "f", "cases": [
        {"args": ["ab"], "expected": "ba"}]}}},
    {"prompt": "Print the sum of two numbers.", "tests": {"stdio": [{"input": "1 2\n", "output": "3\n"}]}},
    {"prompt": "Write f(x) that returns x squared.", "tests": {"assert": ["assert f(3) == 9"]}},
]


def write_rows(tmp_path, rows):
    p = tmp_path / "code.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_file_task_code_rows_need_no_answer_field(tmp_path):
    path = write_rows(tmp_path, CODE_ROWS)
    with pytest.raises(TaskError, match="line 1: missing field 'answer'"):
        FileTask(path=str(path))
    cfg = compose_config("train", ["task=file", f"task.path={path}", "task.answer_field=null", "task.verifiers=[code]"])
    assert cfg["task"]["answer_field"] is None
    t = build_task(cfg["task"])
    rows = t.train + t.eval_samples()
    assert sorted(s.prompt for s in rows) == sorted(r["prompt"] for r in CODE_ROWS)
    tests_of = {r["prompt"]: r["tests"] for r in CODE_ROWS}
    for s in rows:
        assert s.answer is None and s.fields()["tests"] == tests_of[s.prompt]


def test_file_rows_score_through_the_code_verifier(tmp_path, code_verifier):
    t = FileTask(path=str(write_rows(tmp_path, CODE_ROWS)), answer_field=None, eval_size=0)
    by_prompt = {s.prompt: s for s in t.train}
    good = ["def f(x):\n    return x+3", "def f(s):\n    return s[::-1]",
            "a, b = map(int, input().split())\nprint(a + b)", "def f(x):\n    return x*x"]
    samples = [by_prompt[r["prompt"]].fields() for r in CODE_ROWS]
    assert [s.reward for s in code_verifier.score(good, samples)] == [1.0] * 4
    # Right on f(0) only: half the cases; the program is read from a ```python fence.
    half = ["```python\ndef f(x):\n    return 3 if x == 0 else 0\n```"]
    assert code_verifier.score(half, samples[:1])[0].reward == 0.5


@pytest.mark.slow
def test_grpo_train_on_a_code_file_runs_two_steps(tiny_model_dir, tmp_path):
    from tests.conftest import run_grpo

    path = write_rows(tmp_path, CODE_ROWS * 2)
    run = tmp_path / "run"
    p = run_grpo("train", f"model.path={tiny_model_dir}", "task=file", f"task.path={path}", "task.answer_field=null",
                 "task.eval_size=2", "task.verifiers=[{name: code, parallelism: 2}]", "logger=jsonl",
                 "trainer.max_steps=2", "trainer.prompts_per_step=2", "algorithm.group_size=2", "trainer.eval_every=0",
                 "trainer.save_every=0", "rollout.max_new_tokens=8", f"hydra.run.dir={run}", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval/reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    # The code verifier ran on every completion without errors; a random model earns nothing.
    assert all(r["verifier/code/errors"] == 0 and r["reward/code/mean"] == 0.0 for r in train)
    assert (run / "checkpoints" / "step_000002" / "model" / "config.json").exists()


def test_shipped_code_model_writes_held_out_programs_greedily():
    # The warm start GRPO relies on: the model's most likely program is right on unseen
    # (operation, constant) pairs, while sampling still spreads over near misses.
    import torch

    from grpo.parts.modeling import load_model, load_tokenizer, resolve_model_path
    from grpo.tasks.base import render_prompt

    assert resolve_model_path("embedded-code").endswith("embedded_code_model")
    tok, model = load_tokenizer("embedded-code"), load_model("embedded-code").eval()
    samples = CodeFunctionsTask(seed=0).eval_samples()[:12]
    right = 0
    for s in samples:
        ids = tok(render_prompt(tok, s), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False)
        right += tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == s.meta["solution"]
    assert right >= 10, right
