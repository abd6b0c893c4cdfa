import json
import logging

import pytest

from grpo.tasks.arithmetic import ArithmeticTask, is_held_out
from grpo.tasks.base import Sample, TaskError, build_task, render_prompt
from grpo.tasks.file import FileTask


def test_arithmetic_is_deterministic_and_answers_are_right():
    t1, t2 = ArithmeticTask(seed=3), ArithmeticTask(seed=3)
    for i in range(50):
        s = t1.train_sample(i)
        assert s == t2.train_sample(i)
        assert int(s.answer) == s.meta["a"] + s.meta["b"]
        assert s.prompt == f"What is {s.meta['a']} + {s.meta['b']}?"
    assert ArithmeticTask(seed=4).train_sample(0) != t1.train_sample(0) or ArithmeticTask(seed=4).train_sample(1) != t1.train_sample(1)


def test_held_out_problems_are_never_trained_on():
    t = ArithmeticTask(seed=0, eval_size=64)
    held = {(s.meta["a"], s.meta["op"], s.meta["b"]) for s in t.eval_samples()}
    assert all(is_held_out(a, op, b, 0.1) for a, op, b in held)
    train = {(s.meta["a"], s.meta["op"], s.meta["b"]) for s in (t.train_sample(i) for i in range(2000))}
    assert not held & train


def test_arithmetic_rejects_bad_options():
    with pytest.raises(TaskError, match="ops"):
        ArithmeticTask(ops=["/"])
    with pytest.raises(TaskError, match="unexpected keyword|bad option"):
        build_task({"_target_": "grpo.tasks.arithmetic.ArithmeticTask", "max_operandz": 3})


def test_build_task_unknown_target():
    with pytest.raises(TaskError, match="cannot import"):
        build_task({"_target_": "grpo.tasks.nope.Nope", "name": "nope"})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_file_task_jsonl_split_and_epochs(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": i, "extra": "x"} for i in range(10)]
    t = FileTask(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), eval_size=3, seed=1)
    assert len(t.eval_samples()) == 3 and len(t.train) == 7
    first_epoch = [t.train_sample(i).prompt for i in range(7)]
    assert sorted(first_epoch) == sorted(s.prompt for s in t.train)  # each row once per epoch
    assert {s.prompt for s in t.eval_samples()}.isdisjoint(first_epoch)
    s = t.train_sample(0)
    assert isinstance(s.answer, str) and s.fields()["extra"] == "x"


def test_file_task_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b", "c", "d"], "answer": ["1", "2", "3", "4"]}), tmp_path / "d.parquet")
    t = FileTask(path=str(tmp_path / "d.parquet"), eval_size=1)
    assert len(t.train) == 3 and t.eval_samples()[0].answer in {"1", "2", "3", "4"}
    # Parquet rows have no line: the third row is "row 3 (1-based)"
    pq.write_table(pa.table({"prompt": ["a", "b", None], "answer": ["1", "2", "3"]}), tmp_path / "bad.parquet")
    with pytest.raises(TaskError, match=r"bad.parquet: row 3 \(1-based\): missing field 'prompt'"):
        FileTask(path=str(tmp_path / "bad.parquet"))


def test_a_file_too_small_for_eval_size_says_what_it_holds_out(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)])
    with caplog.at_level(logging.WARNING, logger="grpo.tasks.file"):
        t = FileTask(path=str(path), eval_size=64)
    # at most half of 10 rows is held out: 5 for evaluation, 5 to train on
    assert len(t.eval_samples()) == 5 and len(t.train) == 5
    assert (f"{path} holds 10 rows, fewer than twice task.eval_size=64: holding out 5 for evaluation and "
            "training on 5") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grpo.tasks.file"):
        FileTask(path=str(path), eval_size=3)  # room for it: nothing to say
    assert caplog.text == ""


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q"}, r"d.jsonl: line 2: missing field 'answer'"),
        ({"answer": "3"}, r"d.jsonl: line 2: missing field 'prompt'"),
        ({"prompt": 5, "answer": "3"}, r"d.jsonl: line 2: field 'prompt' must be a string"),
    ],
)
def test_file_task_bad_rows_name_file_row_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "answer": "1"}, row])
    with pytest.raises(TaskError, match=message):
        FileTask(path=str(path))


def test_file_task_bad_json_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(TaskError, match=r"d.jsonl: line 2: not valid JSON"):
        FileTask(path=str(p))


def test_file_task_missing_file(tmp_path):
    with pytest.raises(TaskError, match="file not found"):
        FileTask(path=str(tmp_path / "nope.jsonl"))


def test_render_prompt_uses_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    s = Sample(prompt="What is 1 + 2?")
    assert render_prompt(tok, s) == "<|user|>What is 1 + 2?<|end|><|assistant|>"
    assert render_prompt(tok, s, "Be brief.") == "<|system|>Be brief.<|end|><|user|>What is 1 + 2?<|end|><|assistant|>"
    tok.chat_template = None
    assert render_prompt(tok, s) == "What is 1 + 2?"


def test_held_out_set_has_no_repeats_and_tiny_ranges_are_refused():
    t = ArithmeticTask(seed=0, eval_size=128)
    prompts = [s.prompt for s in t.eval_samples()]
    assert len(prompts) == 128 and len(set(prompts)) == 128
    # 0..20: 441 problems, about 44 held out: the set stops at what exists instead of repeating
    small = ArithmeticTask(seed=0, max_operand=20, eval_size=128).eval_samples()
    assert 20 < len(small) < 128 and len({s.prompt for s in small}) == len(small)
    with pytest.raises(TaskError, match="too few to split"):
        ArithmeticTask(min_operand=5, max_operand=6)  # 4 problems: a split would be empty


def test_file_task_reads_a_json_array(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"prompt": f"q{i}", "answer": str(i)} for i in range(6)], indent=1))
    t = FileTask(path=str(p), eval_size=2)
    assert len(t.train) == 4 and len(t.eval_samples()) == 2
    p.write_text('[{"prompt": "a", "answer": "1"}, 3]')
    with pytest.raises(TaskError, match=r"d.json: row 2 \(1-based\): expected a JSON object"):
        FileTask(path=str(p))


def test_bytes_that_are_not_utf8_are_one_line_naming_file_line_and_column(tmp_path):
    from grpo.tasks.file import located_rows, read_rows

    # line 1 fine, line 2 blank, line 3 holds a Latin-1 e-acute (0xe9) as its 16th byte
    lines = tmp_path / "rows.jsonl"
    lines.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(TaskError, match=r"rows.jsonl: line 3: not UTF-8 text \(byte 0xe9 at column 16\)"):
        located_rows(str(lines))
    # a JSON array: the line is counted in the whole file
    array = tmp_path / "rows.json"
    array.write_bytes(b'[{"prompt": "a"},\n {"prompt": "\xff"}]')
    with pytest.raises(TaskError, match=r"rows.json: line 2: not UTF-8 text \(byte 0xff at column 14\)"):
        read_rows(str(array))


@pytest.mark.parametrize("command", ["sft", "rm", "dpo"])
def test_a_non_utf8_data_file_stops_a_command_with_one_line_and_exit_2(tmp_path, command):
    from tests.conftest import run_grpo

    data = tmp_path / "d.jsonl"
    # the 0xe9 is byte 16 of the line: `{"prompt": "caf` is 15 bytes
    data.write_bytes(b'{"prompt": "caf\xe9", "completion": "x", "chosen": "a", "rejected": "b"}\n')
    p = run_grpo(command, f"data.path={data}", f"hydra.run.dir={tmp_path / 'run'}", "logger=jsonl", timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (f"grpo {command}: error: {data}: line 1: not UTF-8 text "
                                                 "(byte 0xe9 at column 16); save the file as UTF-8")
