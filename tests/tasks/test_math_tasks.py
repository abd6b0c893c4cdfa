"""The gsm8k and math tasks on small local files in the hub schemas (written here, not downloaded)."""

import json

import pytest

from grpo.cli import compose_config
from grpo.tasks.base import Sample, TaskError, build_task, render_prompt
from grpo.tasks.competition_math import MathTask, last_boxed
from grpo.tasks.gsm8k import DEFAULT_INSTRUCTION, GSM8KTask, gsm8k_answer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def gsm_row(i):
    # The openai/gsm8k schema: a worked solution whose last line is "#### <answer>".
    return {"question": f"Tom has {i} apples and buys 1000 more. How many now?",
            "answer": f"He has {i} + 1000 = <<{i}+1000={i + 1000}>>{i + 1000} apples.\n#### {i + 1000:,}"}


@pytest.mark.parametrize("solution, gold", [
    ("3 + 4 = 7\n#### 7", "7"),
    ("...\n#### 1,234", "1234"),        # thousands separators go
    ("...\n#### -5", "-5"),
    ("...\n#### $18.50.", "18.50"),     # a dollar sign and a final full stop go
    ("a #### 1\n#### 2", "2"),          # the last marker counts
    ("42", "42"),                       # a bare number is already the answer
    ("no marker here", None),
    ("...\n####   ", None),
])
def test_gsm8k_answer(solution, gold):
    assert gsm8k_answer(solution) == gold


def test_gsm8k_from_local_train_and_eval_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [gsm_row(i) for i in range(6)])
    test = write_parquet(tmp_path / "test.parquet", [gsm_row(i) for i in range(100, 105)])
    t = GSM8KTask(path=train, eval_path=test, eval_size=3, seed=0)
    assert len(t.train) == 6
    ev = t.eval_samples()
    # eval_size keeps the first rows of the eval file, in file order: 100, 101, 102 -> 1100, 1101, 1102.
    assert [s.answer for s in ev] == ["1100", "1101", "1102"]
    s = ev[0]
    assert s.prompt == f"Tom has 100 apples and buys 1000 more. How many now?\n\n{DEFAULT_INSTRUCTION}"
    assert s.meta["solution"].endswith("#### 1,100")
    assert s.fields()["answer"] == "1100"
    # Training draws each row once per epoch.
    assert sorted(t.train_sample(i).answer for i in range(6)) == [str(1000 + i) for i in range(6)]


def test_gsm8k_single_file_holds_out_rows_and_ignores_splits(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", [gsm_row(i) for i in range(10)])
    t = GSM8KTask(path=path, eval_split="test", eval_size=4, seed=1)  # a single file has no "test" split
    assert len(t.eval) == 4 and len(t.train) == 6
    assert {s.answer for s in t.eval}.isdisjoint(s.answer for s in t.train)
    assert GSM8KTask(path=path, eval_size=4, seed=1).eval == t.eval  # seeded: the same rows again


def test_gsm8k_prompt_goes_through_the_chat_template(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    t = GSM8KTask(path=write_jsonl(tmp_path / "g.jsonl", [gsm_row(1), gsm_row(2)]), eval_size=1,
                  instruction="Box it.")
    s = t.eval_samples()[0]
    assert render_prompt(tok, s) == f"<|user|>{s.prompt}<|end|><|assistant|>"
    assert s.prompt.endswith("?\n\nBox it.")
    # Chat-message rows get the instruction in the last user turn.
    rows = [{"question": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
             "answer": "#### 2"}] * 2
    t = GSM8KTask(path=write_jsonl(tmp_path / "m.jsonl", rows), eval_size=1, instruction="Box it.")
    msgs = t.eval_samples()[0].messages
    assert msgs == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?\n\nBox it."}]
    assert rows[0]["question"][1]["content"] == "1+1?"  # the row itself is left alone


@pytest.mark.parametrize("bad, message", [
    ({"answer": "#### 3"}, r"g.jsonl: line 3: missing field 'question'"),
    ({"question": "q"}, r"g.jsonl: line 3: missing field 'answer'"),
    ({"question": "q", "answer": "three, I think"}, r"g.jsonl: line 3: field 'answer' has no final '#### <number>' line"),
])
def test_gsm8k_bad_rows_name_file_row_field(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "g.jsonl", [gsm_row(0), gsm_row(1), bad, gsm_row(3)])
    with pytest.raises(TaskError, match=message):
        GSM8KTask(path=path)


def test_bad_row_in_eval_file_is_named(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [gsm_row(0)])
    test = write_jsonl(tmp_path / "test.jsonl", [gsm_row(1), {"question": "q", "answer": "#### "}])
    with pytest.raises(TaskError, match=r"test.jsonl: line 2: field 'answer'"):
        GSM8KTask(path=train, eval_path=test)


def test_hub_dataset_out_of_reach_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest sets it too; no network here either way
    with pytest.raises(TaskError, match=r"openai/gsm8k: cannot load dataset \(config 'main', split 'train'\).*"
                                        r"local \.jsonl/\.parquet copy"):
        GSM8KTask(path="openai/gsm8k", config="main")


@pytest.mark.parametrize("text, inner", [
    (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),           # nested braces
    (r"\boxed{3} first, then \boxed{4}", "4"),                     # the last box
    (r"the answer is $\fbox{12}$", "12"),
    (r"thus $\boxed 5$.", "5"),                                    # the brace-less form
    (r"\boxed{ \{1, 2\} }", r"\{1, 2\}"),
    (r"\boxed{1} and \boxedx", "1"),                               # \boxedx is not a box
    (r"no box at all", None),
    (r"\boxed{unbalanced", None),
    (r"\boxed{}", None),
])
def test_last_boxed(text, inner):
    assert last_boxed(text) == inner


MATH500 = [  # HuggingFaceH4/MATH-500 columns
    {"problem": "What is $\\frac{2}{4}$ in lowest terms?", "solution": "It is $\\boxed{\\frac{1}{2}}$.",
     "answer": "\\frac{1}{2}", "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": "Solve $x^2=4$, $x>0$.", "solution": "$x=\\boxed{2}$", "answer": "2", "subject": "Algebra",
     "level": 2, "unique_id": "test/algebra/2.json"},
]
HENDRYCKS = [  # hendrycks/competition_math columns: the gold lives only in the solution
    {"problem": "Compute $1+1$.", "level": "Level 1", "type": "Prealgebra",
     "solution": "First $\\boxed{1}$ is wrong; $1+1=\\boxed{2}$."},
    {"problem": "Compute $2+3$.", "level": "Level 1", "type": "Prealgebra", "solution": "$2+3=\\boxed{5}$"},
    {"problem": "Compute $\\sqrt{9}$.", "level": "Level 2", "type": "Algebra",
     "solution": "$\\sqrt{9} = \\boxed{3}$"},
    {"problem": "Compute $3 \\cdot 3$.", "level": "Level 1", "type": "Prealgebra", "solution": "$\\boxed{9}$"},
]


def test_math_train_hendrycks_parquet_eval_math500_jsonl(tmp_path):
    t = MathTask(path=write_parquet(tmp_path / "train.parquet", HENDRYCKS),
                 eval_path=write_jsonl(tmp_path / "math500.jsonl", MATH500), seed=0)
    # The gold of a solution-only row is its last box (the first box of row 0 is a distractor).
    assert [s.answer for s in t.train] == ["2", "5", "3", "9"]
    assert t.train[0].meta["solution"].startswith("First") and t.train[0].meta["type"] == "Prealgebra"
    ev = t.eval_samples()
    assert [s.answer for s in ev] == ["\\frac{1}{2}", "2"]  # the answer column wins
    assert ev[0].prompt == f"What is $\\frac{{2}}{{4}}$ in lowest terms?\n\n{DEFAULT_INSTRUCTION}"
    assert ev[0].meta["unique_id"] == "test/prealgebra/1.json" and "answer" not in ev[0].meta


def test_math_empty_answer_falls_back_to_the_solution(tmp_path):
    rows = [dict(MATH500[1], answer=""), MATH500[0]]
    t = MathTask(path=write_jsonl(tmp_path / "m.jsonl", rows), eval_path=None, eval_size=1)
    assert sorted(s.answer for s in t.train + t.eval) == ["2", "\\frac{1}{2}"]


@pytest.mark.parametrize("bad, message", [
    ({"problem": "p", "solution": "no box"}, r"m.jsonl: line 2: field 'solution' has no \\boxed\{\} answer"),
    ({"problem": "p"}, r"m.jsonl: line 2: missing field 'answer' or 'solution'"),
    ({"solution": "\\boxed{1}"}, r"m.jsonl: line 2: missing field 'problem'"),
])
def test_math_bad_rows_name_file_row_field(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "m.jsonl", [HENDRYCKS[0], bad])
    with pytest.raises(TaskError, match=message):
        MathTask(path=path, eval_path=None)


def test_configs_build_both_tasks_from_local_files(tmp_path):
    g = write_jsonl(tmp_path / "g.jsonl", [gsm_row(i) for i in range(4)])
    cfg = compose_config("train", ["task=gsm8k", f"task.path={g}", "task.eval_size=1"])
    assert cfg["task"]["verifiers"] == ["math"] and cfg["task"]["config"] == "main"
    t = build_task(cfg["task"], seed=0)
    assert isinstance(t, GSM8KTask) and len(t.eval_samples()) == 1 and len(t.train) == 3

    m = write_jsonl(tmp_path / "m.jsonl", HENDRYCKS)
    cfg = compose_config("train", ["task=math", f"task.path={m}", "task.eval_path=null", "task.eval_size=2"])
    assert cfg["task"]["name"] == "math" and cfg["task"]["eval_path"] is None
    t = build_task(cfg["task"], seed=0)
    assert isinstance(t, MathTask) and len(t.eval_samples()) == 2
    assert all(isinstance(s, Sample) and s.prompt.endswith("\\boxed{}.") for s in t.eval_samples())
