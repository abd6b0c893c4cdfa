"""Equivalence, extraction policy and anti-gaming rules of the `math` verifier.

The session's verifiers (conftest) serve the tests; each table is scored as one batch.
"""

from __future__ import annotations

import math

import pytest

from grpo.verifiers.math import MathVerifier
from grpo.verifiers.math_extract import extract, find_boxes, plain_number
from grpo.verifiers.base import check_scores
from tests.verifiers.math.tables import boxed, run


EQUIVALENT = [
    # numbers in any format
    ("85", boxed("85"), 1.0, "correct"),
    ("85", boxed("85.0"), 1.0, "correct"),
    ("7425000", boxed("7,425,000"), 1.0, "correct"),
    ("7425000", boxed("7{,}425{,}000"), 1.0, "correct"),
    ("1000", boxed("1\\,000"), 1.0, "correct"),
    ("0.5", boxed("\\frac{1}{2}"), 1.0, "correct"),
    ("\\frac{7}{2}", boxed("3\\frac{1}{2}"), 1.0, "correct"),  # mixed number: 3 + 1/2 = 7/2
    ("0.25", boxed("25\\%"), 1.0, "correct"),
    ("1500", boxed("1.5 \\times 10^{3}"), 1.0, "correct"),
    ("1500", "The final answer is 1.5e3. I hope it is correct.", 1.0, "correct"),
    ("\\frac{1}{6}", boxed("0.1\\overline{6}"), 1.0, "correct"),  # 0.1666... = 1/10 + 6/90 = 1/6
    ("\\frac{1}{3}", boxed("0.333333"), 1.0, "correct"),  # agrees to 6 decimals
    (12, boxed("12"), 1.0, "correct"),  # gold given as a number, not a string
    (0.5, boxed("\\frac12"), 1.0, "correct"),
    ("\\$10", boxed("10"), 1.0, "correct"),
    # expressions, equations, relations
    ("x^2-1", boxed("(x-1)(x+1)"), 1.0, "correct"),
    ("y = 2x + 1", boxed("2x+1"), 1.0, "correct"),
    ("x \\leq 5", boxed("5 \\geq x"), 1.0, "correct"),
    ("2 \\sin b \\cos a", boxed("\\sin(a+b) - \\sin(a-b)"), 1.0, "correct"),
    # intervals (bracket type matters), sets, multiple answers
    ("[1, 2)", boxed("[1,2)"), 1.0, "correct"),
    ("(-\\infty, 3]", boxed("(-\\infty,3]"), 1.0, "correct"),
    ("\\{1, 2\\}", boxed("\\{2, 1\\}"), 1.0, "correct"),
    ("-2, 1", boxed("1, -2"), 1.0, "correct"),
    ("-2, 1", "so $x = \\boxed{-2}$ or $x = \\boxed{1}$", 1.0, "correct"),
    ("1 \\pm \\sqrt{19}", boxed("1+\\sqrt{19}, 1-\\sqrt{19}"), 1.0, "correct"),
    ("(3, 4)", boxed("(3,4)"), 1.0, "correct"),
    # matrices
    ("\\begin{pmatrix}1 & 2\\\\3 & 4\\end{pmatrix}", boxed("\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}"), 1.0, "correct"),
    # units and plain text
    ("15\\mbox{ cm}^2", boxed("15"), 1.0, "correct"),
    ("125", boxed("125 \\text{ miles}"), 1.0, "correct"),
    ("\\text{Evelyn}", boxed("\\text{Evelyn}"), 1.0, "correct"),
    ("odd", boxed("\\text{Odd}"), 1.0, "correct"),
    # answers inside thinking do not count; the part after </think> does
    ("7", "<think>maybe \\boxed{6}</think> The answer is \\boxed{7}.", 1.0, "correct"),
]

NOT_EQUIVALENT = [
    ("85", boxed("86"), 0.0, "wrong"),
    ("\\frac{1}{3}", boxed("0.33"), 0.0, "wrong"),
    ("[1, 2)", boxed("[1,2]"), 0.0, "wrong"),
    ("(1, 2)", boxed("[1,2]"), 0.0, "wrong"),
    ("x^2+2x+1", boxed("x^3+2x+1"), 0.0, "wrong"),
    ("\\begin{pmatrix}1 & 2\\\\3 & 4\\end{pmatrix}", boxed("\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}"), 0.0, "wrong"),
    ("\\text{odd}", boxed("dod"), 0.0, "wrong"),  # sympy would read both as o*d*d
    ("x + 1", boxed("y + 1"), 0.0, "wrong"),  # variables matter
    ("-2, 1", boxed("-2"), 0.0, "wrong"),  # half of a multi-part answer
]


def test_equivalent_answers_score_1(v):
    run(v, EQUIVALENT)


def test_different_answers_score_0(v):
    run(v, NOT_EQUIVALENT)


# Each anti-gaming rule, attacked directly. All golds are single values unless said otherwise.
GAMING = [
    # hedging: several alternatives in one answer
    ("3", boxed("3 \\text{ or } 4"), 0.0, "hedged"),
    ("3", boxed("3 or 4"), 0.0, "hedged"),
    ("3", boxed("3, 4"), 0.0, "hedged"),
    ("3", boxed("\\{3, 4\\}"), 0.0, "hedged"),
    ("3", boxed("\\pm 3"), 0.0, "hedged"),
    ("x = 3", boxed("x = 3 \\text{ or } x = 4"), 0.0, "hedged"),
    ("3", "The final answer is 3 or 4. I hope it is correct.", 0.0, "hedged"),
    # several different boxes: by default (multiple_boxed="last") only the final box is graded, so
    # boxing extra candidates gains nothing. The strict "reject" rule these rows used to assert
    # ("multiple_boxed" for all three) is tested in tests/verifiers/math/test_answer_classes.py.
    ("3", "\\boxed{3} or \\boxed{4}", 0.0, "wrong"),  # the final box, 4, is graded
    ("3", "First guess \\boxed{4}. Hmm, no: \\boxed{3}", 1.0, "correct"),  # a revision: the final box is 3
    ("3", "\\boxed{3}\\boxed{3}\\boxed{4}\\boxed{5}", 0.0, "wrong"),  # the final box is 5
    # the same answer boxed twice is not a hedge (a restated final answer)
    ("3", "So \\boxed{3}. **Final Answer** \\boxed{3}", 1.0, "correct"),
    ("0.5", "\\boxed{\\frac{1}{2}} i.e. \\boxed{0.5}", 1.0, "correct"),  # equal values, written twice
    # empty boxes
    ("3", "The answer is \\boxed{}.", 0.0, "empty_box"),
    ("3", "The answer is \\boxed{ }.", 0.0, "empty_box"),
    # an interval or set that merely contains the answer
    ("3", boxed("[2, 4]"), 0.0, "wrong"),
    ("3", boxed("(-\\infty, \\infty)"), 0.0, "wrong"),
    ("3", boxed("\\mathbb{R}"), 0.0, None),
    ("3", boxed("x \\geq 3"), 0.0, "wrong"),
    ("[2, 4]", boxed("[1, 5]"), 0.0, "wrong"),
    # no tolerance-based float matching: Qwen-style 1e-4 relative tolerance accepts these
    ("1000000", boxed("1000001"), 0.0, "wrong"),
    ("1000000", boxed("1000000.4"), 0.0, "wrong"),
    ("3.14159", boxed("3.1416"), 0.0, "wrong"),
    ("12", boxed("12.0000001"), 0.0, "wrong"),
    # no answer at all: the last number in the text is not used unless asked for
    ("3", "I think it is 3", 0.0, "no_answer"),
    ("3", "", 0.0, "no_answer"),
    # a power tower returns 0 quickly (never evaluated), not after the time limit
    ("3", boxed("5^{5^{5^{5^5}}}"), 0.0, "too_large"),
    ("3", boxed("10^{10^{10}}"), 0.0, "too_large"),
]


def test_anti_gaming_rules(v):
    run(v, GAMING)


def test_multi_part_gold_accepts_the_full_set_only(v):
    run(v, [
        ("3, 4", boxed("3 \\text{ or } 4"), 1.0, "correct"),
        ("3, 4", "\\boxed{3} and \\boxed{4}", 1.0, "correct"),
        ("3, 4", boxed("3"), 0.0, "wrong"),
        ("3, 4", boxed("3, 4, 5"), 0.0, "wrong"),
    ])


def test_bad_inputs_never_raise(v):
    completions = [boxed("3"), None, 42, boxed("3"), boxed("3"), boxed("3"), boxed("\\frac{"), boxed("3")]
    samples = [{"answer": None}, {"answer": "3"}, {"answer": "3"}, {}, "not a mapping",
               {"answer": float("nan")}, {"answer": "3"}, {"answer": "\\frac{"}]
    scores = check_scores("math", v.score(completions, samples), len(samples))
    assert [s.reward for s in scores] == [0.0] * len(samples)
    reasons = [s.info["reason"] for s in scores]
    assert reasons[:6] == ["bad_gold", "no_answer", "no_answer", "bad_gold", "bad_gold", "bad_gold"]
    # A broken formula may survive only as raw text (then it is compared as text and differs).
    assert reasons[6] in ("unparsable", "wrong") and reasons[7] in ("gold_unparsable", "wrong")


def test_mismatched_batch_is_reported_not_raised(v):
    scores = v.score([boxed("1"), boxed("2")], [{"answer": "1"}])
    assert [s.info["reason"] for s in scores] == ["bad_batch", "bad_batch"]


def test_overlong_answer_is_refused(v):
    s = v.score([boxed("1+" * 600 + "1")], [{"answer": "601"}])[0]
    assert (s.reward, s.info["reason"]) == (0.0, "answer_too_long")


def test_info_says_what_was_compared(v):
    s = v.score([boxed("\\frac{2}{4}")], [{"answer": "0.5"}])[0]
    assert s.reward == 1.0
    assert s.info["extracted"] == "\\frac{2}{4}" and s.info["gold"] == "0.5" and s.info["source"] == "boxed"
    assert s.info["parsed"] == "1/2"


# -- extraction policy -----------------------------------------------------------------------


def test_extraction_order_boxed_then_anchor():
    text = "The final answer is 4. I hope it is correct. Actually \\boxed{5}"
    assert extract(text, ("boxed", "anchor")).parts == ("5",)
    assert extract(text, ("anchor", "boxed")).parts == ("4",)
    assert extract("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.",
                   ("boxed", "anchor")).parts == ("$\\frac{1}{2}$",)


def test_last_number_fallback_is_opt_in(v):
    text = "37 + 48 = 85, so she has 85 apples"
    assert extract(text).reason == "no_answer"
    assert extract(text, ("boxed", "anchor", "last_number")).parts == ("85",)
    with MathVerifier(extraction=("boxed", "last_number")) as lenient:
        assert lenient.score([text], [{"answer": "85"}])[0].reward == 1.0


def test_nested_braces_and_unclosed_box():
    assert [c for _, _, c in find_boxes("\\boxed{\\frac{1}{2}} and \\boxed{x^{2}}")] == ["\\frac{1}{2}", "x^{2}"]
    assert [c for _, _, c in find_boxes("\\boxed{\\frac{1}{2")] == ["\\frac{1}{2"]


def test_unknown_extraction_rule_is_a_config_error():
    with pytest.raises(ValueError, match="extraction"):
        MathVerifier(extraction=("boxed", "lastnumber"))


def test_fast_path_only_takes_plain_decimals():
    assert plain_number("1,234.5") == 1234.5
    assert plain_number("$-0$") == 0
    # decimal comma, more than 6 decimals, fractions: math-verify decides those
    assert plain_number("1,22") is None
    assert plain_number("0.1234567") is None
    assert plain_number("1/2") is None


def test_fast_path_agrees_with_the_pool(v):
    # The same pairs scored with the fast path (plain numbers) and forced through sympy (the
    # answers wrapped in \text{} no longer look like plain numbers) must get the same verdicts.
    pairs = [("85", "85"), ("85", "85.0"), ("85", "86"), ("1000", "1,000"), ("0.5", "0.50"),
             ("033", "33"), ("-0", "0"), ("2.5", "2.50001")]
    fast = v.score([boxed(p) for _, p in pairs], [{"answer": g} for g, _ in pairs])
    slow = v.score([boxed(f"{p}\\text{{}}") for _, p in pairs], [{"answer": g} for g, _ in pairs])
    assert [s.reward for s in fast] == [s.reward for s in slow] == [1, 1, 0, 1, 1, 1, 1, 0]
    assert all("parsed" not in s.info for s in fast)  # really took the fast path


def test_rewards_are_valid_floats(v):
    scores = v.score([boxed("1"), boxed("2")], [{"answer": "1"}, {"answer": "1"}])
    assert all(isinstance(s.reward, float) and not math.isnan(s.reward) for s in scores)
