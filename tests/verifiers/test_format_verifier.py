"""The `format` verifier: form only, a fraction of the enabled checks."""

import pytest

from grpo.verifiers.base import check_scores
from grpo.verifiers.format import FormatVerifier


def rewards(v, texts):
    return [s.reward for s in check_scores("format", v.score(texts, [{}] * len(texts)), len(texts))]


def test_boxed_check():
    v = FormatVerifier()
    texts = [
        "so \\boxed{3}",                          # one box
        "\\boxed{3} and again \\boxed{3}",        # the same answer restated: still one answer
        "\\boxed{3} or \\boxed{4}",               # two different answers
        "\\boxed{}",                              # empty
        "the answer is 3",                        # no box
        None,                                     # not text
    ]
    assert rewards(v, texts) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_think_check_and_fraction():
    v = FormatVerifier(boxed=True, think=True)
    texts = [
        "<think>hmm</think> so \\boxed{3}",       # both checks pass
        "hmm, the prompt opened it</think> \\boxed{3}",  # opening tag in the prompt: fine
        "<think>hmm \\boxed{3}",                  # never closed: the box is still found -> 1/2
        "<think>a</think><think>b</think> \\boxed{3}",  # two blocks -> think fails -> 1/2
        "<think>a</think>",                       # nothing after the thinking -> 0/2
    ]
    assert rewards(v, texts) == [1.0, 1.0, 0.5, 0.5, 0.0]
    s = v.score(["<think>hmm \\boxed{3}"], [{}])[0]
    assert s.info == {"think_closed": False, "one_boxed_answer": True, "reason": "think_closed"}


def test_box_inside_thinking_does_not_count():
    assert rewards(FormatVerifier(), ["<think>\\boxed{3}</think> I am not sure."]) == [0.0]


def test_needs_a_check():
    with pytest.raises(ValueError):
        FormatVerifier(boxed=False, think=False)
