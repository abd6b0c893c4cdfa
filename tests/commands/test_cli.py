import json

import pytest

from grpo.cli import main


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_verify_scores_each_line(tmp_path, capsys):
    f = tmp_path / "c.jsonl"
    f.write_text('{"completion": "\\\\boxed{7}", "answer": "7"}\n\n{"completion": "\\\\boxed{8}", "answer": "7"}\n')
    code, out, _ = run_cli(capsys, "verify", "--verifier", "tests.toy_verifiers:BoxedExact", str(f))
    assert code == 0
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["reward"] for x in lines] == [1.0, 0.0]  # the blank line is skipped, not scored
    assert lines[1]["info"]["extracted"] == "8"


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"completion": "a"}\n{"answer": "1"}\n', "c.jsonl: line 2: missing field 'completion'"),
        ('{"completion": "a"}\n{oops\n', "c.jsonl: line 2: not valid JSON"),
    ],
)
def test_verify_bad_input_names_file_and_row(tmp_path, capsys, text, message):
    f = tmp_path / "c.jsonl"
    f.write_text(text)
    code, out, err = run_cli(capsys, "verify", "--verifier", "tests.toy_verifiers:BoxedExact", str(f))
    assert code == 2 and message in err and out == ""


@pytest.mark.parametrize("verifier", ["prefs_rule", "math"])
def test_verify_row_without_a_field_the_verifier_needs_is_an_error(tmp_path, capsys, verifier):
    # Both verifiers read the gold from `answer`; line 3 has none. grpo train stops on such a row, so
    # grpo verify does too, instead of scoring it 0 as a bad gold.
    f = tmp_path / "c.jsonl"
    f.write_text('{"completion": "\\\\boxed{7}", "answer": "7"}\n\n{"completion": "\\\\boxed{8}"}\n')
    code, out, err = run_cli(capsys, "verify", "--verifier", verifier, str(f))
    assert code == 2 and out == ""
    assert err.strip() == f"grpo verify: error: {f}: line 3: missing field 'answer' (verifier {verifier!r} needs it)"


def test_unknown_command_and_help(capsys):
    code, _, err = run_cli(capsys, "trian")
    assert code == 2 and "unknown command 'trian'" in err
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "grpo [-v] <command>" in out


def test_a_mapping_that_would_add_keys_to_an_existing_one_says_how_to_replace_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", "task=tools", "task.env={_target_: m:Env}")
    assert code == 2 and err.strip() == ("grpo train: error: task.env: a mapping merges into the existing task.env and "
                                         "cannot add keys to it; set them one by one (task.env.<name>=...) or replace "
                                         "it whole: ~task.env +task.env={_target_: m:Env}")


@pytest.mark.parametrize("override, message", [
    # a typo'd key: the one beside it is suggested
    ("trainer.max_step=3", "trainer.max_step: no such key; did you mean trainer.max_steps? "
                           "(a new key needs a +: +trainer.max_step=3)"),
    ("nosuchkey=1", "nosuchkey: no such key; a new key needs a +: +nosuchkey=1"),
    # a group option that does not exist: the ones that do are listed
    ("task=nosuch", "task=nosuch: no such option; task is one of arithmetic, code, file, gsm8k, math, prefs, tools"),
    ("task.path", "task.path: not a valid override (missing EQUAL at '<EOF>')"),
])
def test_hydra_errors_are_one_line_with_exit_2_and_leave_no_run_dir(tmp_path, capsys, monkeypatch, override, message):
    monkeypatch.chdir(tmp_path)  # where runs/<date> would be made
    code, out, err = run_cli(capsys, "train", override)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"grpo train: error: {message}"), err
    assert list(tmp_path.iterdir()) == []
