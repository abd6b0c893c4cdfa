"""The plugin's own tests: run with `pytest` once the package and grpo are installed."""

import pytest

from grpo_concise import ConciseVerifier
from grpo.verifiers.base import check_scores


def test_reward_is_one_within_budget_and_falls_linearly_to_zero_at_twice_it():
    v = ConciseVerifier(max_chars=10)
    texts = ["x" * 10, "x" * 15, "x" * 20, "x" * 50, "  " + "x" * 10 + "\n"]
    scores = check_scores(v.name, v.score(texts, [{}] * len(texts)), len(texts))  # the trainer's own check
    assert [s.reward for s in scores] == [1.0, 0.5, 0.0, 0.0, 1.0]  # 15 chars: 5 over a budget of 10
    assert scores[1].info == {"chars": 15, "budget": 10}


def test_a_row_can_set_its_own_budget():
    v = ConciseVerifier(max_chars=100)
    assert v.score(["x" * 30], [{"max_chars": 20}])[0].reward == 0.5


def test_a_budget_below_one_is_refused():
    with pytest.raises(ValueError, match="max_chars=0"):
        ConciseVerifier(max_chars=0)
