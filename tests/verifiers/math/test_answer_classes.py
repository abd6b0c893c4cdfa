"""Four classes of answers the `math` verifier handles, each with the derivation of its verdict.

1. Self-correction: several boxes are graded by the final one (``multiple_boxed="last"``, the
   default); ``multiple_boxed="reject"`` keeps the strict rule.
2. Hedges written in words inside the answer ("at least 1", "1 \\text{ or more}", "approximately 3")
   get 0 with reason "hedged", in both modes, unless the gold says the same.
3. Number words as an explicit final answer ("The answer is three.", ``\\boxed{twenty-one}``).
4. Absolute values and moduli that sympy evaluates exactly (``|3+4i|`` = 5).

The session's verifiers (conftest, one per mode) serve the tests; each table is scored as one batch.
"""

from __future__ import annotations

import pytest

from grpo.verifiers.math import MathVerifier
from grpo.verifiers.math_extract import extract, read_number_words
from grpo.verifiers.registry import VerifierConfigError, build_verifier
from tests.verifiers.math.tables import boxed, run


# -- 1. self-correction: the final box is the answer -------------------------------------------

SELF_CORRECTION = [
    # Revised answers: only the final box is compared with the gold.
    ("6", "I first got \\boxed{5}. Wait, that's wrong, the answer is \\boxed{6}", 1.0, "correct"),  # final 6 == 6
    ("5", "I first got \\boxed{5}. Wait, that's wrong, the answer is \\boxed{6}", 0.0, "wrong"),  # final 6 != 5
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}, no: \\boxed{\\frac{1}{2}}", 1.0, "correct"),  # through sympy: 1/2 == 1/2
    ("\\frac{1}{3}", "\\boxed{\\frac{1}{3}}, no: \\boxed{\\frac{1}{2}}", 0.0, "wrong"),  # 1/2 != 1/3
    ("\\text{Evelyn}", "\\boxed{\\text{Carla}}. No, \\boxed{\\text{Evelyn}}", 1.0, "correct"),  # word answers too
    # "Final" means the last box written, even when it repeats an earlier one.
    ("4", "\\boxed{4}, then \\boxed{3}, then back to \\boxed{4}", 1.0, "correct"),  # final box is 4
    ("3", "\\boxed{4}, then \\boxed{3}, then back to \\boxed{4}", 0.0, "wrong"),  # 3 was not final
    # A hedged earlier box is superseded; a hedged final box is still a hedge.
    ("3", "\\boxed{3 \\text{ or } 4}. Checking: \\boxed{3}", 1.0, "correct"),  # final 3, one answer
    ("3", "\\boxed{3}. Or rather \\boxed{3 \\text{ or } 4}", 0.0, "hedged"),  # final box offers 3 and 4
    ("3", "\\boxed{3}. Or rather \\boxed{\\text{at least } 3}", 0.0, "hedged"),  # final box is a range
    # Thinking is still ignored: the boxes after </think> are the completion's answer.
    ("7", "<think>\\boxed{6}</think> \\boxed{8}, no, \\boxed{7}", 1.0, "correct"),
    # A gold with several parts ("find all roots"): separate boxes are its parts, compared as a set...
    ("-2, 1", "so $x = \\boxed{-2}$ or $x = \\boxed{1}$", 1.0, "correct"),  # {-2, 1} == {-2, 1}
    # ...else the final box alone, which may hold the whole revised list.
    ("-2, 1", "\\boxed{3}. Wrong sign; the roots are \\boxed{-2, 1}", 1.0, "correct"),  # {3,-2,1} no, {-2,1} yes
    ("-2, 1", "\\boxed{-2}, \\boxed{1}, \\boxed{5}", 0.0, "wrong"),  # {-2,1,5} != gold, and 5 != gold
]


def test_self_correction_grades_the_final_box(v):
    run(v, SELF_CORRECTION)


def test_final_box_is_what_info_reports(v):
    s = v.score(["\\boxed{5}. Wait, \\boxed{\\frac{12}{2}}"], [{"answer": "6"}])[0]
    # extracted is the graded answer (grpo eval's majority vote uses it), not "5, \frac{12}{2}"
    assert (s.reward, s.info["extracted"], s.info["reason"]) == (1.0, "\\frac{12}{2}", "correct")


def test_last_box_of_plain_numbers_takes_the_fast_path(v):
    # With a plain-number gold the final box is compared in the caller (no "parsed": no sympy);
    # forced through the pool (the boxes wrapped in \text{}), the verdicts must be the same.
    texts = ["\\boxed{5}. Wait: \\boxed{6}", "\\boxed{6}. Wait: \\boxed{5}", "\\boxed{6} \\boxed{6.0}"]
    golds = [{"answer": "6"}] * 3
    fast = v.score(texts, golds)
    slow = v.score([t.replace("}", "\\text{}}") for t in texts], golds)
    assert [s.reward for s in fast] == [s.reward for s in slow] == [1.0, 0.0, 1.0]
    assert all("parsed" not in s.info for s in fast)


# The strict rule: several different boxes against a single gold get 0, as before this option.
REJECT = [
    # one of the boxes is right: "multiple_boxed" (it would be a hedge to accept it)
    ("6", "I first got \\boxed{5}. Wait, that's wrong, the answer is \\boxed{6}", 0.0, "multiple_boxed"),
    ("3", "\\boxed{3} or \\boxed{4}", 0.0, "multiple_boxed"),
    ("3", "First guess \\boxed{4}. Hmm, no: \\boxed{3}", 0.0, "multiple_boxed"),
    ("3", "\\boxed{3}\\boxed{3}\\boxed{4}\\boxed{5}", 0.0, "multiple_boxed"),
    # none is right: plainly wrong
    ("7", "I first got \\boxed{5}. Wait, that's wrong, the answer is \\boxed{6}", 0.0, "wrong"),
    # the same answer twice is one answer; a multi-part gold still takes its parts from several boxes
    ("3", "So \\boxed{3}. **Final Answer** \\boxed{3}", 1.0, "correct"),
    ("-2, 1", "so $x = \\boxed{-2}$ or $x = \\boxed{1}$", 1.0, "correct"),
    # a single box is graded exactly as in "last" mode
    ("6", boxed("6"), 1.0, "correct"),
]


def test_reject_mode_keeps_the_strict_rule(strict):
    run(strict, REJECT)


def test_multiple_boxed_is_validated():
    with pytest.raises(ValueError, match="multiple_boxed"):
        MathVerifier(multiple_boxed="first")
    with pytest.raises(ValueError, match="multiple_boxed"):
        MathVerifier(multiple_boxed="LAST")
    # the same key from a config (task.verifiers: [{name: math, multiple_boxed: ...}])
    with pytest.raises(VerifierConfigError, match="multiple_boxed"):
        build_verifier({"name": "math", "multiple_boxed": "all"})
    assert MathVerifier().multiple_boxed == "last"
    assert build_verifier({"name": "math", "multiple_boxed": "reject"}).multiple_boxed == "reject"


def test_extraction_keeps_the_final_box_last():
    assert extract("\\boxed{4} \\boxed{3} \\boxed{4}").parts == ("3", "4")
    assert extract("\\boxed{3} \\boxed{4}").parts == ("3", "4")
    assert extract("\\boxed{3} \\boxed{} \\boxed{3}").parts == ("3",)  # empty boxes never count


# -- 2. hedges written in words ------------------------------------------------------------------

HEDGED = [
    # A range or an estimate is not the value; one phrase is enough for 0 even when the number
    # in it is right, so the verdict is the same whatever the number.
    ("1", boxed("1 \\text{ (or 2)}"), 0.0, "hedged"),  # a second answer in parentheses
    ("1", boxed("1 or more"), 0.0, "hedged"),  # the range [1, oo)
    ("1", boxed("at least 1"), 0.0, "hedged"),  # the same range
    ("1", boxed("1 \\text{ or more}"), 0.0, "hedged"),  # math-verify drops \text{}: it used to read "1"
    ("3", boxed("at most 3"), 0.0, "hedged"),  # (-oo, 3]
    ("3", boxed("3 or fewer"), 0.0, "hedged"),
    ("3", boxed("\\text{no more than } 3"), 0.0, "hedged"),
    ("3", boxed("\\geq 3"), 0.0, "hedged"),  # "at least 3" in symbols: no left side, so not an inequality
    ("5", boxed("at least 3"), 0.0, "hedged"),  # 5 is in the range, still a hedge
    # Chosen: an estimate is a hedge for an exact answer (it does not claim the exact value).
    ("3", boxed("approximately 3"), 0.0, "hedged"),
    ("3", boxed("\\approx 3"), 0.0, "hedged"),
    ("3", boxed("\\text{about } 3"), 0.0, "hedged"),
    ("3", boxed("x = \\text{roughly } 3"), 0.0, "hedged"),
    ("3", boxed("3 or so"), 0.0, "hedged"),
    ("3", boxed("3 \\text{ (probably)}"), 0.0, "hedged"),  # a guess
    ("3", "The final answer is at least 3. I hope it is correct.", 0.0, "hedged"),  # anchored spans too
    ("3", "The answer is at least three.", 0.0, "hedged"),  # number words do not hide it
]

NOT_HEDGED = [
    # Words that are the answer, units and choices still pass.
    ("\\text{Monday}", boxed("\\text{Monday}"), 1.0, "correct"),
    ("5 \\text{ cm}", boxed("5"), 1.0, "correct"),
    ("5", boxed("5 \\text{ cm}"), 1.0, "correct"),
    ("x \\in [1, 2]", boxed("x \\in [1,2]"), 1.0, "correct"),
    ("(A)", boxed("(A)"), 1.0, "correct"),
    ("A", boxed("\\text{(A)}"), 1.0, "correct"),
    # With a left side, a relation is the answer's form, not a hedge ("x \geq 3" is the inequality).
    ("k \\ge 2", boxed("k \\ge 2"), 1.0, "correct"),
    ("3", boxed("x \\geq 3"), 0.0, "wrong"),  # an inequality, not the value: wrong, as before
    # "\approx" after an exact value or a variable annotates it; the value is compared as before
    # (public equivalence suites count these as correct).
    ("\\frac{\\sqrt{3}}{3}", boxed("\\frac{\\sqrt{3}}{3} \\approx 0.577"), 1.0, "correct"),
    ("11", boxed("x \\approx 11"), 1.0, "correct"),
    # Hedge words in the reasoning do not count: only the answer span is read.
    ("3", "It is at least 3, and checking gives \\boxed{3}", 1.0, "correct"),
    # A gold that itself says "at least 1": the same kind of phrase matches, compared without it.
    ("at least 1", boxed("at least 1"), 1.0, "correct"),
    ("at least 1", boxed("1 \\text{ or more}"), 1.0, "correct"),  # the same range, said differently
    ("\\text{at least } 1", boxed("\\geq 1"), 1.0, "correct"),
    ("\\approx 3.14", boxed("approximately 3.14"), 1.0, "correct"),  # an approximate gold
    ("at least 1", boxed("at least 2"), 0.0, "wrong"),  # same kind, different bound
    ("at least 1", boxed("1"), 0.0, "wrong"),  # a value is not a range
    ("at least 1", boxed("at most 1"), 0.0, "hedged"),  # a kind of hedge the gold does not have
]


def test_hedge_words_get_0_in_both_modes(v, strict):
    run(v, HEDGED)
    run(strict, HEDGED)


def test_words_that_are_not_hedges_still_pass(v, strict):
    run(v, NOT_HEDGED)
    run(strict, NOT_HEDGED)


# -- 3. number words as the final answer -----------------------------------------------------------

NUMBER_WORDS = [
    # An explicit anchor or a box whose whole content is a cardinal: read as its digits.
    ("3", "The answer is three.", 1.0, "correct"),
    ("12", "The final answer is twelve", 1.0, "correct"),
    ("21", "Answer: twenty-one", 1.0, "correct"),
    ("105", "the answer is one hundred and five", 1.0, "correct"),  # "and" after hundred
    ("0", "The answer is zero.", 1.0, "correct"),
    ("19", "**Final Answer:** Nineteen", 1.0, "correct"),
    ("90", "The answer is ninety.", 1.0, "correct"),
    ("1000", "The answer is a thousand.", 1.0, "correct"),
    ("2024", "The answer is two thousand twenty-four.", 1.0, "correct"),
    ("-5", "The answer is negative five.", 1.0, "correct"),
    ("3", boxed("three"), 1.0, "correct"),
    ("3", boxed("\\text{Three}"), 1.0, "correct"),
    # One trailing word is judged as it is after digits: "3 apples" is accepted for 3, so is this.
    ("3", "The answer is 3 apples.", 1.0, "correct"),
    ("3", "The answer is three apples.", 1.0, "correct"),
    # A gold in words is read the same way.
    ("three", boxed("3"), 1.0, "correct"),
    ("\\text{three}", boxed("three"), 1.0, "correct"),
    # Wrong numbers are wrong.
    ("4", "The answer is three.", 0.0, "wrong"),  # 3 != 4
    ("21", "Answer: twenty", 0.0, "wrong"),  # 20 != 21
    ("105", "the answer is one hundred and fifty", 0.0, "wrong"),  # 150 != 105
    # Not an answer span: free text is never read for number words.
    ("3", "There are three of them.", 0.0, "no_answer"),
    # Not a single cardinal: left as words, which do not equal a number.
    ("3", "The answer is three or four.", 0.0, None),
    ("0.75", "The answer is three quarters.", 0.0, None),  # fractions are not read (cardinals only)
    ("3", "The answer is third.", 0.0, None),  # nor ordinals
]


def test_number_words_as_the_final_answer(v):
    scores = run(v, NUMBER_WORDS)
    assert scores[0].info["extracted"] == "three" and scores[0].info["read_as"] == "3"


@pytest.mark.parametrize("words, digits", [
    ("three", "3"), ("Twelve.", "12"), ("twenty-one", "21"), ("twenty one", "21"), ("forty", "40"),
    ("one hundred and five", "105"), ("one hundred five", "105"), ("a hundred", "100"),
    ("twelve hundred", "1200"), ("nineteen hundred eighty-four", "1984"), ("ten thousand", "10000"),
    ("a thousand and one", "1001"), ("five hundred and twelve thousand", "512000"),
    ("two million three hundred thousand and five", "2300005"), ("minus seven", "-7"),
    ("three apples", "3 apples"), ("\\textbf{Zero}", "0"), ("$eleven$", "11"),
])
def test_read_number_words(words, digits):
    assert read_number_words(words) == digits


@pytest.mark.parametrize("text", [
    "three four", "three or four", "one of them", "one-to-one", "a half", "three quarters", "two thirds",
    "third", "hundred", "one hundred and", "one thousand two thousand", "twenty zero", "3", "x", "",
])
def test_not_number_words(text):
    assert read_number_words(text) is None


# -- 4. absolute values evaluated exactly ----------------------------------------------------------

MODULI = [
    # |a+bi| = sqrt(a^2+b^2): i inside an absolute value with no other variable is the imaginary unit.
    ("5", boxed("|3+4i|"), 1.0, "correct"),  # sqrt(9+16) = 5
    ("5", boxed("\\left|3+4i\\right|"), 1.0, "correct"),
    ("5", boxed("\\lvert 3-4i \\rvert"), 1.0, "correct"),  # sqrt(9+16) = 5
    ("\\sqrt{2}", boxed("|1+i|"), 1.0, "correct"),  # sqrt(1+1)
    ("1", boxed("\\left|\\frac{3+4i}{5}\\right|"), 1.0, "correct"),  # 5/5
    ("3", boxed("||3+4i|-2|"), 1.0, "correct"),  # |5-2|
    ("|3+4i|", boxed("5"), 1.0, "correct"),  # on the gold side too
    # real absolute values
    ("7", boxed("|-7|"), 1.0, "correct"),
    ("\\frac{3}{4}", boxed("\\left|-\\frac{3}{4}\\right|"), 1.0, "correct"),
    ("4", boxed("\\sqrt{16}"), 1.0, "correct"),
    ("|x|", boxed("|x|"), 1.0, "correct"),  # a symbolic modulus stays symbolic
    # wrong values
    ("7", boxed("|3+4i|"), 0.0, "wrong"),  # 3+4 is not the modulus
    ("25", boxed("|3+4i|"), 0.0, "wrong"),  # nor is its square
    ("5", boxed("|3+4x|"), 0.0, "wrong"),  # another variable: no number
    ("5", boxed("3+4i"), 0.0, "wrong"),  # no absolute value: the complex number itself
    ("5", boxed("|5^{5^{5^{5^5}}} i|"), 0.0, "too_large"),  # refused, never evaluated
]


def test_absolute_values_are_evaluated(v):
    run(v, MODULI)
