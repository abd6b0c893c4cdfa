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
        ('{"completion": "a"}\n{"answer": "1"}\n', "c.jsonl: row 1: missing field 'completion'"),
        ('{"completion": "a"}\n{oops\n', "c.jsonl: line 2: not valid JSON"),
    ],
)
def test_verify_bad_input_names_file_and_row(tmp_path, capsys, text, message):
    f = tmp_path / "c.jsonl"
    f.write_text(text)
    code, out, err = run_cli(capsys, "verify", "--verifier", "tests.toy_verifiers:BoxedExact", str(f))
    assert code == 2 and message in err and out == ""


def test_unknown_command_and_help(capsys):
    code, _, err = run_cli(capsys, "trian")
    assert code == 2 and "unknown command 'trian'" in err
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "grpo <command>" in out
