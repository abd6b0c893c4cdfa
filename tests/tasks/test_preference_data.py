"""Reading preference data (tasks/preference_data.py): pairs, rankings and scores, their forms and errors."""

import json

import pytest

from grpo.tasks.base import Sample, TaskError, render_prompt
from grpo.tasks.file import jsonl_lines, read_rows
from grpo.tasks.preference_data import Ranking, Scored, ranking_pairs, read_preferences

USER_Q = {"role": "user", "content": "What is 2 + 2?"}


def write_jsonl(tmp_path, rows, name="prefs.jsonl", blank_after_first=False):
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "")  # a blank line still counts in line numbers
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_jsonl_lines_numbers_lines_from_1_and_skips_blank_ones(tmp_path):
    path = write_jsonl(tmp_path, [{"a": 1}, {"a": 2}], blank_after_first=True)
    # line 1 holds row 1, line 2 is blank, line 3 holds row 2
    assert list(jsonl_lines(path)) == [(1, {"a": 1}), (3, {"a": 2})]
    assert read_rows(path) == [{"a": 1}, {"a": 2}]  # read_rows reads through it, unchanged


def test_pairs_with_prompt_and_margin(tmp_path):
    path = write_jsonl(tmp_path, [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "margin": 2, "source": "x"},
        {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"},
    ], blank_after_first=True)
    kind, recs = read_preferences(path)
    assert kind == "pairs"
    assert recs[0] == Ranking(Sample(prompt="What is 2 + 2?", meta={"source": "x"}), ["4", "5"], 2.0, f"{path}: line 1")
    assert recs[1].margin is None and recs[1].where == f"{path}: line 3"  # line 2 is blank


def test_conversational_pairs_trl_form(tmp_path):
    # prompt as messages, chosen/rejected hold only the assistant's answer
    path = write_jsonl(tmp_path, [{"prompt": [USER_Q], "chosen": [{"role": "assistant", "content": "4"}],
                                   "rejected": [{"role": "assistant", "content": "5"}]}])
    _, [r] = read_preferences(path)
    assert r.sample.messages == [USER_Q] and r.sample.prompt is None and r.responses == ["4", "5"]


def test_conversational_pairs_that_repeat_the_prompt_are_not_doubled(tmp_path):
    # UltraFeedback: a string prompt, and chosen/rejected are the whole conversation starting with it
    path = write_jsonl(tmp_path, [{"prompt": "What is 2 + 2?", "chosen": [USER_Q, {"role": "assistant", "content": "4"}],
                                   "rejected": [USER_Q, {"role": "assistant", "content": "5"}]}])
    _, [r] = read_preferences(path)
    assert r.sample.messages == [USER_Q] and r.responses == ["4", "5"]


def test_conversational_pairs_continue_the_prompt(tmp_path):
    # the messages before the final answer are not the prompt's start: they follow it
    more = [{"role": "assistant", "content": "Sure?"}, {"role": "user", "content": "Yes"}]
    path = write_jsonl(tmp_path, [{"prompt": [USER_Q], "chosen": more + [{"role": "assistant", "content": "4"}],
                                   "rejected": more + [{"role": "assistant", "content": "5"}]}])
    _, [r] = read_preferences(path)
    assert r.sample.messages == [USER_Q] + more


def test_implicit_prompt_message_lists(tmp_path):
    # no prompt field: the prompt is the leading messages both conversations share
    turns = [USER_Q, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}]
    path = write_jsonl(tmp_path, [{"chosen": turns + [{"role": "assistant", "content": "6"}],
                                   "rejected": turns + [{"role": "assistant", "content": "7"}]}])
    _, [r] = read_preferences(path)
    assert r.sample.messages == turns and r.responses == ["6", "7"]


def test_implicit_prompt_strings_hh(tmp_path):
    # Anthropic HH: the common prefix runs on into " I " of both answers, and is cut back to just
    # after the last "Assistant:"; "Assistant:" inside an earlier turn does not end it early
    head = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Can you help?\n\nAssistant:"
    path = write_jsonl(tmp_path, [{"chosen": head + " I can, gladly.", "rejected": head + " I cannot."}])
    kind, [r] = read_preferences(path)
    assert kind == "pairs"
    assert r.sample.prompt == head and r.responses == [" I can, gladly.", " I cannot."]


def test_rankings_and_their_pairs(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "q", "responses": ["a", "b", "c", "d"]},
                                  {"prompt": [USER_Q], "responses": ["4", "5"]}])
    kind, recs = read_preferences(path)
    assert kind == "rankings" and recs[0].responses == ["a", "b", "c", "d"] and recs[0].margin is None
    assert recs[1].sample.messages == [USER_Q]
    pairs = ranking_pairs(recs)
    # C(4, 2) = 6 pairs from the first, C(2, 2) = 1 from the second; better always first
    assert [(c, r) for _, c, r in pairs] == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"),
                                             ("c", "d"), ("4", "5")]
    assert pairs[0][0] is recs[0].sample and pairs[-1][0] is recs[1].sample


def test_scores(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "q", "response": "a", "score": 3}, {"prompt": "q", "response": "b",
                                                                                "score": -0.5}])
    kind, recs = read_preferences(path)
    assert kind == "scores"
    assert recs == [Scored(Sample(prompt="q"), "a", 3.0, f"{path}: line 1"),
                    Scored(Sample(prompt="q"), "b", -0.5, f"{path}: line 2")]


def test_records_render_with_the_embedded_chat_template(tmp_path):
    from grpo.parts.modeling import load_tokenizer

    path = write_jsonl(tmp_path, [{"prompt": "What is 2 + 2?", "responses": ["4", "5"]}])
    _, [r] = read_preferences(path)
    assert render_prompt(load_tokenizer("embedded"), r.sample) == "<|user|>What is 2 + 2?<|end|><|assistant|>"


def test_parquet_and_json_array(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["q1", "q2"], "responses": [["a", "b", "c"], ["x", "y"]]}),
                   tmp_path / "r.parquet")
    kind, recs = read_preferences(str(tmp_path / "r.parquet"))
    assert kind == "rankings" and [r.responses for r in recs] == [["a", "b", "c"], ["x", "y"]]
    assert recs[1].where == f"{tmp_path / 'r.parquet'}: row 2 (1-based)"

    pq.write_table(pa.table({"prompt": ["q1", "q2"], "responses": [["a", "b"], ["x", "x"]]}), tmp_path / "bad.parquet")
    with pytest.raises(TaskError, match=r"bad\.parquet: row 2 \(1-based\): field 'responses': item 2 repeats item 1"):
        read_preferences(str(tmp_path / "bad.parquet"))

    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "q", "response": "a", "score": 1.0}]))
    _, [s] = read_preferences(str(tmp_path / "a.json"))
    assert s.where == f"{tmp_path / 'a.json'}: row 1 (1-based)"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


GOOD_PAIR = {"prompt": "q", "chosen": "a", "rejected": "b"}
GOOD_RANKING = {"prompt": "q", "responses": ["a", "b"]}
GOOD_SCORE = {"prompt": "q", "response": "a", "score": 1}

# (first row, which sets the file's shape; the bad row at line 2; what the message says after "line 2: ")
ERRORS = [
    (GOOD_PAIR, {"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    (GOOD_PAIR, {"prompt": "q", "chosen": " ", "rejected": "b"}, "field 'chosen' is empty"),
    (GOOD_PAIR, {"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
    (GOOD_PAIR, {"prompt": 7, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string, got int"),
    (GOOD_PAIR, {"prompt": "q", "chosen": 1, "rejected": "b"}, "field 'chosen' must be a string, got int"),
    (GOOD_PAIR, {"prompt": "q", "chosen": "a", "rejected": msgs(("assistant", "b"))},
     "fields 'chosen' and 'rejected' must both be strings or both message lists"),
    (GOOD_PAIR, {"prompt": "q", "chosen": "a", "rejected": "a"}, "fields 'chosen' and 'rejected' hold the same response"),
    (GOOD_PAIR, {**GOOD_PAIR, "margin": "big"}, "field 'margin' must be a number, got str"),
    (GOOD_PAIR, {**GOOD_PAIR, "margin": True}, "field 'margin' must be a number, got bool"),
    (GOOD_PAIR, {"chosen": "Human: hi. Bot: yes", "rejected": "Human: hi. Bot: no"},
     "no field 'prompt', and the common start of 'chosen' and 'rejected' has no 'Assistant:'"),
    (GOOD_PAIR, {"chosen": "Human: hi Assistant: yes", "rejected": "Human: hi Assistant:"},
     "field 'rejected' has an empty response after the prompt"),
    (GOOD_PAIR, {"prompt": "q", "chosen": msgs(("user", "a")), "rejected": msgs(("assistant", "b"))},
     "field 'chosen': the last message must be the assistant's response, got role 'user'"),
    (GOOD_PAIR, {"prompt": "q", "chosen": msgs(("assistant", "")), "rejected": msgs(("assistant", "b"))},
     "field 'chosen': the final assistant message is empty"),
    (GOOD_PAIR, {"chosen": msgs(("user", "x"), ("assistant", "a")), "rejected": msgs(("user", "y"), ("assistant", "b"))},
     "fields 'chosen' and 'rejected' differ before their final assistant message"),
    (GOOD_PAIR, {"chosen": msgs(("assistant", "a")), "rejected": msgs(("assistant", "b"))},
     "no field 'prompt', and 'chosen' holds only the response"),
    (GOOD_PAIR, {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
     "field 'prompt': message 1 must be a {role, content} object of strings"),
    (GOOD_PAIR, {"prompt": [], "chosen": "a", "rejected": "b"}, "field 'prompt' is an empty message list"),
    (GOOD_PAIR, GOOD_RANKING, "a rankings row (fields ['prompt', 'responses']) in a file of pairs"),
    (GOOD_RANKING, {"prompt": "q", "responses": ["a"]}, "field 'responses' has 1 responses; a ranking needs 2 to 9"),
    (GOOD_RANKING, {"prompt": "q", "responses": list("abcdefghij")},
     "field 'responses' has 10 responses; a ranking needs 2 to 9"),
    (GOOD_RANKING, {"prompt": "q", "responses": ["a", "b", "a"]}, "field 'responses': item 3 repeats item 1"),
    (GOOD_RANKING, {"prompt": "q", "responses": ["a", 2]}, "field 'responses': item 2 must be a string, got int"),
    (GOOD_RANKING, {"prompt": "q", "responses": ["a", ""]}, "field 'responses': item 2 is empty"),
    (GOOD_RANKING, {"prompt": "q", "responses": "ab"}, "field 'responses' must be a list of strings, got str"),
    (GOOD_RANKING, {"responses": ["a", "b"]}, "missing field 'prompt'"),
    (GOOD_SCORE, {"prompt": "q", "response": "a", "score": "high"}, "field 'score' must be a number, got str"),
    (GOOD_SCORE, {"prompt": "q", "response": "a", "score": float("nan")}, "field 'score' must be finite, got nan"),
    (GOOD_SCORE, {"prompt": "q", "score": 1}, "missing field 'response'"),
    (GOOD_SCORE, {"prompt": "q", "text": "a"}, "cannot tell the preference format from fields ['prompt', 'text']"),
    (GOOD_SCORE, {**GOOD_SCORE, "responses": ["a", "b"]},
     "fields ['prompt', 'response', 'responses', 'score'] mix the rankings and scores formats"),
]


@pytest.mark.parametrize("first,bad,message", ERRORS, ids=[m[:40] for _, _, m in ERRORS])
def test_errors_name_file_line_and_field(tmp_path, first, bad, message):
    path = write_jsonl(tmp_path, [first, bad])
    with pytest.raises(TaskError) as e:
        read_preferences(path)
    assert str(e.value).startswith(f"{path}: line 2: {message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_file_level_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskError, match=r"empty\.jsonl: no rows"):
        read_preferences(str(tmp_path / "empty.jsonl"))
    (tmp_path / "broken.jsonl").write_text(json.dumps(GOOD_PAIR) + "\n{not json\n")
    with pytest.raises(TaskError, match=r"broken\.jsonl: line 2: not valid JSON"):
        read_preferences(str(tmp_path / "broken.jsonl"))
    with pytest.raises(TaskError, match=r"missing\.jsonl: file not found"):
        read_preferences(str(tmp_path / "missing.jsonl"))
