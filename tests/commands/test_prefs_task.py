"""The built-in preference task: the hidden rule (verifiers/prefs_rule.py), the simulated labellers
and the data they write (grpo/commands/prefs.py), and the shipped files in grpo/data."""

import json
import math
import random
import re

import pytest

from grpo.commands.prefs import SHIPPED_EVAL, SHIPPED_TRAIN, build_dataset, flips, label, prefs_main
from grpo.tasks.arithmetic import is_held_out
from grpo.tasks.preference_data import read_preferences
from grpo.verifiers.base import check_scores
from grpo.verifiers.prefs_rule import rule
from grpo.verifiers.registry import build_verifier
from tests.conftest import ROOT


# completion, gold 85 -> (reward, reason); reward = 0.9 * max(0, 1 - stray / 16) + 0.1 / (1 + |n - 85|)
RULE_CASES = [
    ("\\boxed{85}", 1.0, "ok"),
    ("\\boxed{ 85 }\n", 1.0, "ok"),  # whitespace is not stray
    ("\\boxed{86}", 0.9 + 0.1 / 2, "wrong"),  # off by 1
    ("\\boxed{83}", 0.9 + 0.1 / 3, "wrong"),  # off by 2
    ("\\boxed{95}", 0.9 + 0.1 / 11, "wrong"),  # off by 10
    ("x\\boxed{86}", 0.9 * 15 / 16 + 0.1 / 2, "wrong"),  # off by 1, one stray character
    ("Sure! \\boxed{85}", 0.9 * 11 / 16 + 0.1, "ok"),  # "Sure!" is 5 stray characters
    ("The answer: \\boxed{85}", 0.9 * 6 / 16 + 0.1, "ok"),  # "Theanswer:" is 10 stray characters
    ("\\boxed{85}\\boxed{85}", 0.9 * 6 / 16 + 0.1, "ok"),  # the repeated box is 10 stray characters
    ("\\boxed{85} Hope this helps! Bye now", 0.1, "ok"),  # 19 stray characters: concision 0
    ("\\boxed{85}\\boxed{86}", 0.0, "several_answers"),
    ("85", 0.0, "no_box"),
    ("\\boxed{85", 0.0, "no_box"),  # unclosed
    ("\\boxed{eighty-five}", 0.0, "not_integer"),
    ("\\boxed{}", 0.0, "not_integer"),
]


@pytest.mark.parametrize("text,reward,reason", RULE_CASES)
def test_rule_on_hand_written_completions(text, reward, reason):
    got, info = rule(text, "85")
    assert got == pytest.approx(reward) and info["reason"] == reason


def test_rule_is_the_registered_prefs_rule_verifier():
    v = build_verifier("prefs_rule")
    assert v.name == "prefs_rule"
    scores = check_scores("prefs_rule", v.score(["\\boxed{86}", None, "\\boxed{3}"],
                                                [{"answer": "85"}, {"answer": "85"}, {"answer": None}]), 3)
    # off by 1 (0.9 + 0.1 / 2); not text; no gold answer
    assert [s.reward for s in scores] == [pytest.approx(0.95), 0.0, 0.0]
    assert [s.info["reason"] for s in scores] == ["wrong", "not_text", "no_gold"]
    assert scores[0].info == {"reason": "wrong", "distance": 1, "stray": 0}


def test_labeller_noise_rate():
    # Two responses whose true scores differ by 0.5 under Gumbel noise of scale 0.25 swap with
    # probability sigmoid(-0.5 / 0.25) = 1 / (1 + e^2) = 0.1192; 20000 seeded draws: sd 0.0023.
    rng = random.Random(0)
    swapped = sum(label([1.0, 0.5], 0.25, rng) == [1, 0] for _ in range(20000)) / 20000
    assert swapped == pytest.approx(1 / (1 + math.e ** 2), abs=0.01)
    # noise 0 is a perfect labeller: the rule's order, ties in the order given
    assert label([0.5, 1.0, 0.1, 1.0], 0.0, random.Random(0)) == [1, 3, 0, 2]


def test_flips_counts_adjacent_and_all_pairs():
    # true scores in the labeller's order: 0.5 above 1.0 is one flip (adjacent), 1.0 over 1.0 is a
    # tie (not counted), 0.1 last is right; all pairs with different scores: (0.5, 1), (0.5, 0.1),
    # (0.5, 1), (1, 0.1), (1, 0.1): two flipped
    assert flips([0.5, 1.0, 1.0, 0.1]) == (1, 2, 2, 5)


def true_scores(prompt, texts):
    a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt).groups())
    return [rule(t, str(a + b))[0] for t in texts]


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefs")
    kw = dict(train_prompts=24, eval_prompts=8, k_min=2, k_max=4, seed=3)
    return out, build_dataset(out / "a", **kw), build_dataset(out / "b", **kw)


def test_small_build_is_deterministic(small_build):
    out, stats, again = small_build
    for name in ("train.jsonl", "eval.jsonl"):
        assert (out / "a" / name).read_bytes() == (out / "b" / name).read_bytes()
    stats.pop("seconds"), again.pop("seconds")
    assert stats == again


def test_small_build_training_rankings(small_build):
    out, stats, _ = small_build
    rows = [json.loads(line) for line in (out / "a" / "train.jsonl").read_text().splitlines()]
    assert stats["train"]["rows"] == len(rows) == 24 - stats["train"]["skipped"]
    flipped = total = 0
    for r in rows:
        assert set(r) == {"prompt", "responses"}  # no true scores for the trainer to see
        assert 2 <= len(r["responses"]) <= 4 and len(set(r["responses"])) == len(r["responses"])
        a, b = map(int, re.findall(r"\d+", r["prompt"]))
        assert not is_held_out(a, "+", b, 0.1)
        f = flips(true_scores(r["prompt"], r["responses"]))
        flipped, total = flipped + f[2], total + f[3]
    # the reported rate is the file's: pairs with different true scores that the labeller swapped
    assert stats["train"]["pair_flip_rate"] == round(flipped / total, 4)
    assert 0 < flipped < total / 2


def test_eval_pairs_are_strictly_ordered_and_held_out(small_build):
    out, stats, _ = small_build
    kind, recs = read_preferences(str(out / "a" / "eval.jsonl"))
    assert kind == "pairs" and len(recs) == stats["eval"]["rows"] > 0
    train_prompts = {json.loads(line)["prompt"] for line in (out / "a" / "train.jsonl").read_text().splitlines()}
    for r in recs:
        chosen, rejected = true_scores(r.sample.prompt, r.responses)
        assert chosen > rejected  # the rule's own order, no noise, no ties
        a, b = map(int, re.findall(r"\d+", r.sample.prompt))
        assert is_held_out(a, "+", b, 0.1) and r.sample.prompt not in train_prompts


def test_shipped_files_parse():
    kind, rankings = read_preferences(str(SHIPPED_TRAIN))
    assert kind == "rankings" and len(rankings) >= 1900
    assert all(2 <= len(r.responses) <= 9 for r in rankings)
    assert all(set(json.loads(line)) == {"prompt", "responses"} for line in SHIPPED_TRAIN.read_text().splitlines())
    kind, pairs = read_preferences(str(SHIPPED_EVAL))
    assert kind == "pairs" and len(pairs) >= 1000
    assert SHIPPED_TRAIN.stat().st_size + SHIPPED_EVAL.stat().st_size < 2_000_000
    held = {r.sample.prompt for r in pairs}
    assert held.isdisjoint(r.sample.prompt for r in rankings)


@pytest.mark.slow
def test_shipped_files_rebuild_byte_for_byte(tmp_path):
    build_dataset(tmp_path)  # the defaults, as `grpo prefs --ship` builds them (~1 min)
    assert (tmp_path / "train.jsonl").read_bytes() == SHIPPED_TRAIN.read_bytes()
    assert (tmp_path / "eval.jsonl").read_bytes() == SHIPPED_EVAL.read_bytes()


def test_prefs_main(tmp_path, capsys):
    assert prefs_main(["--out", str(tmp_path), "--train-prompts", "4", "--eval-prompts", "2", "--k-max", "4"]) == 0
    assert "train: 4 rankings" in capsys.readouterr().out
    assert (tmp_path / "train.jsonl").exists() and (tmp_path / "eval.jsonl").exists()
    with pytest.raises(SystemExit) as e:
        prefs_main(["--k-min", "5", "--k-max", "4"])
    assert e.value.code == 2 and "need 2 <= k_min <= k_max <= 9, got k_min=5, k_max=4" in capsys.readouterr().err


def test_task_config():
    from omegaconf import OmegaConf

    from grpo.tasks.arithmetic import ArithmeticTask
    from grpo.tasks.base import build_task

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "task" / "prefs.yaml"))
    arith = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "task" / "arithmetic.yaml"))
    assert cfg.pop("name") == "prefs" and cfg.pop("verifiers") == ["prefs_rule"]
    assert cfg == {k: v for k, v in arith.items() if k not in ("name", "verifiers")}
    assert isinstance(build_task(cfg), ArithmeticTask)
