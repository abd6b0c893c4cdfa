"""`grpo eval`: the pass@k / maj@k arithmetic by hand, then real runs of a tiny model and of checkpoints."""

import itertools
import json
from collections import Counter

import pytest
import torch

from grpo.cli import compose_config
from grpo.commands.eval import run_eval
from grpo.parts.evaluation import k_values, majority_index, pass_at_k, summarize, vote_key
from grpo.parts.modeling import EMBEDDED_MODEL_DIR
from grpo.parts.config import ConfigError
from tests.conftest import run_grpo
from grpo.verifiers.base import Score


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 1, 1 - 3 / 4),     # 1 - C(3,1)/C(4,1)
    (4, 1, 2, 1 - 3 / 6),     # 1 - C(3,2)/C(4,2)
    (4, 2, 2, 1 - 1 / 6),     # 1 - C(2,2)/C(4,2)
    (4, 0, 4, 0.0),           # nothing correct
    (4, 3, 2, 1.0),           # n - c = 1 < k: every pair holds a correct one
    (5, 2, 3, 1 - 1 / 10),    # 1 - C(3,3)/C(5,3)
    (10, 3, 1, 0.3),          # pass@1 = c / n
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_the_mean_over_all_k_subsets():
    # The estimator's definition: the share of the C(n, k) subsets that contain a correct completion.
    outcomes = [0, 1, 0, 0, 1, 0, 0]
    n, c = len(outcomes), sum(outcomes)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_k_values():
    assert k_values(1) == [1]
    assert k_values(8) == [1, 2, 4, 8]
    assert k_values(6) == [1, 2, 4, 6]


def test_votes_compare_numbers_by_value_and_ignore_whitespace():
    assert vote_key("1,000") == vote_key("1000") == vote_key("$1000$")
    assert vote_key("x + 1") == vote_key("x+1") != vote_key("x+2")
    assert vote_key(None) is None and vote_key("  ") is None
    assert majority_index(["3", "7", "7", "3"]) == 0             # 2-2 tie: the answer seen first
    assert majority_index(["3", "7", " 7 ", "x"]) == 1           # "7" twice
    assert majority_index([None, "5", None, None]) == 1          # no answer, no vote
    assert majority_index([None, None]) is None


def test_summarize_hand_made_example():
    rewards = [
        [1, 0, 0, 1],         # c = 2
        [0, 0.5, 1, 0],       # c = 1 (0.5 is not correct)
        [0, 0, 1, 0],         # c = 1
    ]
    answers = [
        ["7", "3", "3", "7"],          # gold 7; 2-2 tie at k=4 goes to the first, "7"
        ["12", None, "10", "12"],      # gold 10; "12" wins at every k
        [None, None, "3", None],       # gold 3; at k <= 2 nobody votes, at k = 4 "3" is alone
    ]
    s = summarize(rewards, answers)
    assert s["reward/mean"] == pytest.approx((2 + 1.5 + 1) / 12)  # row sums over 12 completions
    assert s["pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)
    # pass@2: 1 - C(2,2)/C(4,2) = 5/6 for c = 2; 1 - C(3,2)/C(4,2) = 1/2 for c = 1.
    assert s["pass@2"] == pytest.approx((5 / 6 + 1 / 2 + 1 / 2) / 3)
    assert s["pass@4"] == pytest.approx(1.0)
    # maj@1: "7" right, "12" wrong, no vote -> 1/3; maj@2: same; maj@4: "7", "12", "3" -> 2/3.
    assert (s["maj@1"], s["maj@2"], s["maj@4"]) == pytest.approx((1 / 3, 1 / 3, 2 / 3))
    assert "maj@1" not in summarize(rewards, None)


class HasDigit:
    """Test verifier: reward 1 when the completion holds a digit; its first character is the "answer".

    Binary and varied even for a random model, so every metric is exercised."""

    name = "has_digit"

    def score(self, completions, samples):
        return [Score(float(any(ch.isdigit() for ch in c)), {"extracted": c[:1] or None}) for c in completions]


TINY = ["task.eval_size=12", "eval.samples=4", "rollout.max_new_tokens=6"]
HAS_DIGIT = "task.verifiers=[{_target_: tests.commands.test_evaluate.HasDigit}]"


def eval_cfg(model, *overrides):
    return compose_config("eval", [f"model.path={model}", *TINY, *overrides])


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_eval_writes_samples_and_a_summary_that_agree(tiny_model_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    s = run_eval(eval_cfg(tiny_model_dir, HAS_DIGIT), tmp_path)
    recs = read_jsonl(tmp_path / "eval_samples.jsonl")
    assert len(recs) == 12 * 4 and s["prompts"] == 12 and s["samples"] == 4
    assert [(r["prompt_index"], r["sample_index"]) for r in recs[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert recs[0]["prompt"].startswith("What is ") and recs[0]["answer"].isdigit()
    assert all(r["info"]["has_digit"]["extracted"] == (r["completion"][:1] or None) for r in recs)
    # Recompute from the per-sample file, directly from the definitions.
    by_prompt = [recs[i * 4:(i + 1) * 4] for i in range(12)]
    assert s["reward/mean"] == pytest.approx(sum(r["reward"] for r in recs) / 48)
    assert 0 < s["reward/mean"] < 1  # the check below is not vacuous
    assert s["pass@1"] == pytest.approx(sum(r["correct"] for r in recs) / 48)
    assert s["pass@4"] == pytest.approx(sum(any(r["correct"] for r in g) for g in by_prompt) / 12)
    maj = 0
    for g in by_prompt:
        votes = Counter("".join(r["completion"][:1].split()) for r in g)
        votes.pop("", None)
        if votes:
            top = votes.most_common(1)[0][0]  # ties: first seen, as most_common keeps insertion order
            maj += next(r for r in g if r["completion"][:1] == top)["correct"]
    assert s["maj@4"] == pytest.approx(maj / 12)
    assert s["answers_from"] == "has_digit"
    assert json.loads((tmp_path / "eval_samples.summary.json").read_text()) == s
    out = capsys.readouterr().out
    assert "pass@k" in out and f"{s['pass@4']:.4f}" in out
    # where it went, in the trainers' summary's own column (grpo.parts.logs.where)
    assert out.splitlines()[-3:] == [f"run dir:     {tmp_path}", f"samples:     {tmp_path / 'eval_samples.jsonl'}",
                                     f"summary:     {tmp_path / 'eval_samples.summary.json'}"]


def test_checkpoint_model_dir_checkpoint_dir_and_run_dir_all_evaluate_the_same_weights(tiny_model_dir, tmp_path):
    torch.set_num_threads(1)
    from grpo.parts import checkpoint
    from grpo.parts.modeling import load_model, load_tokenizer

    run = tmp_path / "run"
    ckpt = checkpoint.save(run, 7, {"model": load_model(str(tiny_model_dir))}, load_tokenizer(str(tiny_model_dir)), {})
    assert ckpt == run / "checkpoints" / "step_000007"
    base = run_eval(eval_cfg(tiny_model_dir), tmp_path / "base")
    texts = [r["completion"] for r in read_jsonl(base["output"])]
    assert len(set(texts)) > 1  # sampled, not all alike
    for path in (ckpt / "model", ckpt, run):
        s = run_eval(eval_cfg(path), tmp_path / path.name)
        assert s["model_dir"] == str(ckpt / "model")
        # Same weights and seed: the very same samples.
        assert [r["completion"] for r in read_jsonl(s["output"])] == texts


def test_greedy_needs_exactly_one_sample(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="eval.samples=1"):
        run_eval(eval_cfg(tiny_model_dir, "eval.temperature=0"), tmp_path)
    s = run_eval(eval_cfg(tiny_model_dir, "eval.temperature=0", "eval.samples=1", "eval.max_prompts=5"), tmp_path)
    assert s["prompts"] == 5 and s["samples"] == 1 and s["temperature"] == 0
    assert [k for k in s if k.startswith(("pass@", "maj@"))] == ["pass@1", "maj@1"]


def test_cli_eval_prints_the_table_and_reports_config_errors(tiny_model_dir, tmp_path):
    out = tmp_path / "custom" / "samples.jsonl"
    r = run_grpo("eval", f"model.path={tiny_model_dir}", *TINY, f"eval.output={out}", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "pass@k" in r.stdout and "maj@k" in r.stdout
    assert len(read_jsonl(out)) == 48 and (tmp_path / "custom" / "samples.summary.json").exists()
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    r = run_grpo("eval", f"model.path={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'b'}")
    assert r.returncode == 2 and "model.path=" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "config.json").exists(), reason="the embedded model is not built yet")
def test_embedded_model_on_arithmetic_with_the_math_verifier(tmp_path):
    torch.set_num_threads(1)
    s = run_eval(compose_config("eval", ["task.eval_size=32", "eval.samples=4"]), tmp_path)
    # The embedded model is SFT-ed to box a near-miss answer about half of the time, so samples are
    # sometimes right and sometimes wrong; more samples can only help pass@k.
    assert 0.05 < s["pass@1"] < 0.95
    assert s["pass@1"] <= s["pass@2"] <= s["pass@4"]
    assert s["answers_from"] == "math" and s["verifier/math/errors"] == 0
    recs = read_jsonl(s["output"])
    assert any(r["info"]["math"]["reason"] == "correct" for r in recs)


def test_pass_at_k_is_reported_where_a_reward_of_1_is_a_pass():
    """The summary line of grpo train, ppo and dpo says over how many held-out prompts. Math's and code's rewards have a pass (1: right, every test passed; code's partial credit
    lies between), prefs_rule's and a reward model's are scores. The trainers' summaries and
    `grpo eval` show pass@k only for the first: a code run whose greedy rewards were 1/3, 2/3 and
    1 keeps its pass@1 (0.25 -> 0.5 here), where the share of 1s among scores read like a failure."""
    from grpo.commands.eval import format_table
    from grpo.parts.evaluation import eval_headline
    from grpo.parts.reward_sources import Mixture, ModelRewards, VerifierRewards

    def ev(mean, greedy, pass1=None):
        out = {"eval/reward/mean": mean, "eval/greedy/reward/mean": greedy, "eval/prompts": 64}
        return out if pass1 is None else {**out, "eval/pass@1": pass1}

    code = eval_headline(ev(0.40, 0.55, 0.25), ev(0.70, 0.80, 0.5))  # partial credit: greedy mean > pass@1
    assert code == ["eval reward over 64 held-out prompts: 0.400 -> 0.700   greedy pass@1: 0.250 -> 0.500"]
    score = eval_headline(ev(0.302, 0.41), ev(0.951, 0.93))  # no eval/pass@1: a score
    assert score == ["eval reward over 64 held-out prompts: 0.302 -> 0.951"]
    binary = eval_headline(ev(0.3, 0.25, 0.25), {**ev(0.8, 0.5, 0.5), "eval/kl": 2.345}, "eval true score")
    assert binary == ["eval true score over 64 held-out prompts: 0.300 -> 0.800   greedy pass@1: 0.250 -> 0.500   "
                      "KL 2.35"]

    prefs, math = VerifierRewards(["prefs_rule"]), VerifierRewards(["math"])
    try:
        assert not prefs.passes and math.passes
        assert not Mixture([(1.0, math), (0.5, ModelRewards.__new__(ModelRewards))]).passes
        assert Mixture([(1.0, math), (0.0, prefs)]).passes  # weight 0: scored for its metrics only
    finally:
        prefs.close(), math.close()

    s = {"model": "m", "task": "prefs", "prompts": 2, "samples": 4, "temperature": 1.0, "reward/mean": 0.5,
         "pass@1": 0.0, "pass@2": 0.0, "pass@4": 0.0, "answers_from": None, "passes": False,
         "completion/len_mean": 3.0, "completion/truncated_frac": 0.0, "run_dir": "r", "output": "o", "summary": "s"}
    table = format_table(s)
    assert "pass@k, maj@k: none (the verifiers give a score, not a pass)" in table and "0.0000" not in table
    assert "   4    0.0000" in format_table({**s, "passes": True})
