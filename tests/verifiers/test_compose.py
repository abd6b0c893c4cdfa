"""Composed rewards and verifier isolation (verifiers/compose.py), on small verifiers written here."""

import asyncio
import logging
import threading
import time

import pytest

from grpo.verifiers.base import Score, check_scores
from grpo.verifiers.compose import RewardFunction, VerifierError
from grpo.verifiers.registry import VerifierConfigError, VerifierNotFound


class Fixed:
    """Reward = the sample's field `key` (so each test states the rewards it expects)."""

    def __init__(self, key="r", name=None):
        self.key, self.name = key, name or f"fixed_{key}"

    def score(self, completions, samples):
        return [Score(s[self.key], {"seen": c}) for c, s in zip(completions, samples)]


class RaisesOn:
    """Raises whenever the batch holds a completion equal to `bad`; reward 1 otherwise."""

    name = "raises_on"

    def __init__(self, bad="boom"):
        self.bad, self.calls = bad, 0

    def score(self, completions, samples):
        self.calls += 1
        if self.bad in completions:
            raise RuntimeError(f"cannot score {self.bad!r}")
        return [1.0] * len(completions)


class Returns:
    """Returns whatever it is told to, for the output checks."""

    name = "returns"

    def __init__(self, value):
        self.value = value

    def score(self, completions, samples):
        return self.value


class Hangs:
    """Blocks in score() until `release` is set; records when it returned."""

    name = "hangs"

    def __init__(self):
        self.release, self.returned = threading.Event(), threading.Event()

    def score(self, completions, samples):
        self.release.wait(30)
        self.returned.set()
        return [1.0] * len(completions)


SAMPLES = [{"r": 0.2, "q": 0.5}, {"r": 0.9, "q": 0.5}, {"r": 0.0, "q": 1.0}]
TEXTS = ["a", "b", "c"]


def test_reward_is_the_weighted_sum_clipped_and_each_verifier_is_logged_before_weighting():
    with RewardFunction([Fixed("r"), Fixed("q")], timeout=10) as rf:
        rf.entries[0].weight, rf.entries[1].weight = 1.0, 0.5
        rewards, infos, m = rf(TEXTS, SAMPLES)
    # 0.2 + 0.25 = 0.45; 0.9 + 0.25 = 1.15 -> clipped to 1; 0.0 + 0.5 = 0.5
    assert rewards == pytest.approx([0.45, 1.0, 0.5])
    assert m["reward/fixed_r/mean"] == pytest.approx((0.2 + 0.9 + 0.0) / 3)  # unweighted
    assert m["reward/fixed_q/mean"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert m["verifier/fixed_r/errors"] == 0 and m["verifier/fixed_q/errors"] == 0
    assert infos[1] == {"fixed_r": {"seen": "b"}, "fixed_q": {"seen": "b"}}


def test_a_negative_weight_is_a_penalty_and_the_total_never_goes_below_zero():
    with RewardFunction([Fixed("r"), Fixed("q")]) as rf:
        rf.entries[1].weight = -0.5
        rewards, _, _ = rf(TEXTS, SAMPLES)
    # 0.2 - 0.25 -> 0; 0.9 - 0.25 = 0.65; 0.0 - 0.5 -> 0
    assert rewards == pytest.approx([0.0, 0.65, 0.0])


def test_weights_and_labels_come_from_the_spec(tmp_path):
    specs = [{"name": "format", "weight": 1.0},
             {"name": "format", "label": "format_think", "weight": 0.5, "think": True, "boxed": False}]
    text = "<think>hm</think> so \\boxed{4}"
    with RewardFunction(specs) as rf:
        rewards, infos, m = rf([text, "no box"], [{}, {}])
    assert rf.labels == ["format", "format_think"]
    assert m["reward/format/mean"] == 0.5 and m["reward/format_think/mean"] == 0.5
    assert rewards == [1.0, 0.0]  # 1 + 0.5 clipped; nothing passes for "no box"
    assert set(infos[0]) == {"format", "format_think"}


def test_two_entries_with_one_label_are_refused_with_a_hint():
    with pytest.raises(VerifierConfigError, match=r"entries 0 and 1 are both labelled 'format'.*label"):
        RewardFunction([{"name": "format"}, {"name": "format", "think": True}])


@pytest.mark.parametrize("spec, message", [
    ({"name": "nope"}, r"unknown verifier 'nope'; known: .*format.*math"),
    ({"name": "format", "weight": "heavy"}, r"verifier 'format': weight 'heavy' is not a finite number"),
    ({"name": "format", "weight": float("nan")}, r"weight nan is not a finite number"),
    ({"name": "format", "label": "a/b"}, r"label 'a/b' may hold only"),
    ({"name": "format", "colour": "red"}, r"verifier 'format': bad arguments \{'colour': 'red'\}"),
    ({"name": "format", "boxed": False}, r"verifier 'format': construction failed: ValueError"),
    ({"name": "format", "_target_": "grpo.verifiers.format.FormatVerifier"}, r"give `name` or `_target_`, not both"),
    ({"weight": 1.0}, r"needs `name` or `_target_`"),
    ({"_target_": "tests.nowhere.Thing"}, r"cannot import module 'tests.nowhere'"),
    ({"_target_": "tests.verifiers.test_compose:Nothing"}, r"has no attribute 'Nothing'"),
    ({"_target_": "tests.verifiers.test_compose:SAMPLES"}, r"list is not a class or factory to call"),
    ({"_target_": "builtins:dict"}, r"verifier 'builtins:dict' \(dict\) has neither score\(completions, samples\) nor"),
])
def test_bad_specs_fail_at_construction_naming_the_verifier(spec, message):
    with pytest.raises(VerifierConfigError, match=message):
        RewardFunction([spec])


def test_target_takes_dotted_and_colon_paths_and_labels_by_the_verifiers_own_name():
    with RewardFunction([{"_target_": "tests.verifiers.test_compose.Fixed", "key": "q"},
                         {"_target_": "tests.verifiers.test_compose:Fixed", "key": "r", "label": "r"}]) as rf:
        _, _, m = rf(TEXTS, SAMPLES)
    assert rf.labels == ["fixed_q", "r"]
    assert "reward/r/mean" in m


def test_a_raising_verifier_costs_only_the_samples_that_raise(caplog):
    v = RaisesOn("boom")
    with RewardFunction([v, Fixed("q")], timeout=10) as rf:
        with caplog.at_level(logging.WARNING, logger="grpo.verifiers.compose"):
            rewards, infos, m = rf(["ok", "boom", "fine"], SAMPLES)
            rf(["boom", "ok", "boom"], SAMPLES)
    # The batch raised, so each sample was retried alone: only "boom" gets 0 (plus q=0.5 each).
    assert rewards == pytest.approx([1.0, 0.5, 1.0])
    assert m["verifier/raises_on/errors"] == 1 and m["reward/raises_on/mean"] == pytest.approx(2 / 3)
    assert infos[1]["raises_on"]["error"].startswith("raised RuntimeError: cannot score 'boom'")
    # First error of each kind is logged once, with its traceback, and names the verifier.
    logged = [r for r in caplog.records if "raises_on" in r.getMessage()]
    assert len(logged) == 1
    assert "raised RuntimeError" in logged[0].getMessage() and "Traceback" in logged[0].getMessage()


@pytest.mark.parametrize("value, message", [
    ([Score(0.5), Score(float("nan")), Score(1.0)], r"verifier 'returns': reward nan of item 1 is not in \[0, 1\]"),
    ([0.5, 1.5, 1.0], r"reward 1.5 of item 1 is not in \[0, 1\]"),
    ([0.5, -0.1, 1.0], r"reward -0.1 of item 1"),
    ([0.5, "1", 1.0], r"item 1 is str; return a Score"),
    ([0.5, Score(1.0, info=["x"]), 1.0], r"info of item 1 is list"),
])
def test_a_bad_value_costs_only_its_sample(value, message):
    with RewardFunction([Returns(value)]) as rf:
        rewards, infos, m = rf(TEXTS, SAMPLES)
    assert rewards == [0.5, 0.0, 1.0]
    assert m["verifier/returns/errors"] == 1
    assert infos[1]["returns"]["error"].startswith("bad output")
    with pytest.raises(ValueError, match=message):
        check_scores("returns", value, 3)


def test_a_wrong_number_of_scores_is_rejected_for_the_whole_batch():
    with RewardFunction([Returns([1.0])]) as rf:  # the single-sample retries then succeed, one each
        rewards, _, m = rf(TEXTS, SAMPLES)
    assert rewards == [1.0, 1.0, 1.0] and m["verifier/returns/errors"] == 0
    with RewardFunction([Returns(0.7)]) as rf:
        rewards, infos, m = rf(TEXTS, SAMPLES)
    assert rewards == [0.0] * 3 and m["verifier/returns/errors"] == 3
    assert "returned float; score() must return a list" in infos[0]["returns"]["error"]


def test_bools_and_numpy_numbers_are_rewards():
    import numpy as np

    with RewardFunction([Returns([True, np.float32(0.25), Score(np.bool_(True))])]) as rf:
        rewards, _, m = rf(TEXTS, SAMPLES)
    assert rewards == [1.0, 0.25, 1.0] and m["verifier/returns/errors"] == 0


def test_fail_fast_stops_at_the_first_error_naming_the_verifier():
    with RewardFunction([RaisesOn("boom")], fail_fast=True) as rf:
        assert rf(["ok"], SAMPLES[:1])[0] == [1.0]
        with pytest.raises(VerifierError, match=r"verifier 'raises_on': raised RuntimeError: cannot score") as e:
            rf(["ok", "boom"], SAMPLES[:2])
    assert isinstance(e.value.__cause__, RuntimeError)
    rf = RewardFunction([Returns([0.5, 2.0, 0.5])], fail_fast=True)
    with rf, pytest.raises(VerifierError, match="verifier 'returns': bad output"):
        rf(TEXTS, SAMPLES)


def test_a_hanging_verifier_costs_its_samples_and_is_refused_until_it_returns(caplog):
    h = Hangs()
    with RewardFunction([h, Fixed("q")], timeout=0.3) as rf:
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="grpo.verifiers.compose"):
            rewards, infos, m = rf(TEXTS, SAMPLES)
        assert time.monotonic() - t0 < 2.0
        assert rewards == [0.5, 0.5, 1.0]  # the other verifier still counts
        assert m["verifier/hangs/errors"] == 3 and m["verifier/fixed_q/errors"] == 0
        assert "did not finish a batch of 3 within 0.3s" in infos[0]["hangs"]["error"]
        # The log shows where it hung: the stack of the worker thread inside Hangs.score.
        assert any("timeout" in r.getMessage() and "in score" in r.getMessage() for r in caplog.records)

        # Still hung: refused at once, not called a second time in parallel.
        t0 = time.monotonic()
        rewards, infos, m = rf(TEXTS, SAMPLES)
        assert time.monotonic() - t0 < 0.2
        assert m["verifier/hangs/errors"] == 3 and infos[0]["hangs"]["error"].startswith("busy")

        h.release.set()
        rf.entries[0].pending.result(timeout=5)  # the abandoned call has returned (its result is discarded)
        rewards, _, m = rf(TEXTS, SAMPLES)  # it returned: it is used again
        assert m["verifier/hangs/errors"] == 0 and rewards == [1.0, 1.0, 1.0]


def test_fail_fast_turns_a_timeout_into_an_error():
    h = Hangs()
    try:
        rf = RewardFunction([h], timeout=0.2, fail_fast=True)
        with rf, pytest.raises(VerifierError, match="verifier 'hangs': timeout"):
            rf(TEXTS, SAMPLES)
    finally:
        h.release.set()


class AsyncJudge:
    """An async verifier: awaits a 'service' per sample; hangs on 'slow', blocks the loop on 'block'."""

    name = "judge"

    def __init__(self):
        self.loops, self.cancelled = set(), 0
        self.unblock = threading.Event()

    async def ascore(self, completions, samples):
        self.loops.add(id(asyncio.get_running_loop()))
        if "block" in completions:
            self.unblock.wait(30)  # a blocking call inside async code: only the thread deadline catches it
        try:
            if "slow" in completions:
                await asyncio.sleep(30)
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if "raise" in completions:
            raise ConnectionError("service down")
        return [Score(1.0, {"len": len(c)}) for c in completions]


def test_an_async_verifier_runs_on_one_loop_and_is_cancelled_at_its_deadline():
    j = AsyncJudge()
    with RewardFunction([j], timeout=0.3) as rf:
        rewards, infos, _ = rf(["ab", "c"], SAMPLES[:2])
        assert rewards == [1.0, 1.0] and infos[0]["judge"] == {"len": 2}
        rf(["d"], SAMPLES[:1])
        assert len(j.loops) == 1  # one persistent loop: clients made inside ascore can be reused

        rewards, _, m = rf(["ok", "raise"], SAMPLES[:2])  # batch fails; per-sample retries run concurrently
        assert rewards == [1.0, 0.0] and m["verifier/judge/errors"] == 1

        t0 = time.monotonic()
        rewards, infos, m = rf(["ok", "slow"], SAMPLES[:2])
        assert time.monotonic() - t0 < 1.5
        assert rewards == [0.0, 0.0] and m["verifier/judge/errors"] == 2
        assert j.cancelled >= 1  # the coroutine was cancelled, not left running
        assert infos[1]["judge"]["error"].startswith("timeout")
        rewards, _, _ = rf(["ok"], SAMPLES[:1])  # and the verifier is usable straight away
        assert rewards == [1.0]


def test_an_async_verifier_that_blocks_its_loop_is_abandoned_like_a_sync_one():
    j = AsyncJudge()
    with RewardFunction([j], timeout=0.2) as rf:
        try:
            t0 = time.monotonic()
            rewards, _, m = rf(["block"], SAMPLES[:1])
            assert time.monotonic() - t0 < 0.2 + 1.0 + 0.5  # deadline + grace, then abandoned
            assert rewards == [0.0] and m["verifier/judge/errors"] == 1
            _, infos, _ = rf(["ok"], SAMPLES[:1])
            assert infos[0]["judge"]["error"].startswith("busy")
        finally:
            j.unblock.set()
        rf.entries[0].pending.result(timeout=5)
        assert rf(["ok"], SAMPLES[:1])[0] == [1.0]  # the loop is free again


def test_close_reaches_each_verifier():
    closed = []

    class Closing(Fixed):
        def close(self):
            closed.append(self.name)

    rf = RewardFunction([Closing("r"), Closing("q")])
    rf(TEXTS, SAMPLES)
    rf.close()
    assert closed == ["fixed_r", "fixed_q"]


def test_an_empty_verifier_list_is_refused():
    with pytest.raises(VerifierConfigError, match="at least one verifier"):
        RewardFunction([])


def test_unknown_names_are_not_found_errors():
    with pytest.raises(VerifierNotFound):
        RewardFunction(["definitely_not_a_verifier"])
