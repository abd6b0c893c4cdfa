"""Best-of-N: the pure parts by hand, and `grpo bon` end to end on a tiny model."""

import json
import math

import pytest

from grpo.commands.bon import best_index, best_of_n_kl, run_bon
from grpo.cli import compose_config

TOY = "task.verifiers=[{_target_: tests.toy_verifiers.DigitFraction}]"


def test_best_of_n_kl():
    # log n - (n - 1) / n: n = 1 -> 0; n = 2 -> log 2 - 1/2 = 0.19315; n = 16 -> log 16 - 15/16 = 1.83004
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(2.7725887 - 0.9375)


def test_best_index_looks_at_the_first_k_and_breaks_ties_early():
    scores = [0.2, 0.7, 0.7, 0.9]
    assert best_index(scores, 1) == 0
    assert best_index(scores, 3) == 1  # 0.7 twice: the earlier one
    assert best_index(scores, 4) == 3


@pytest.mark.slow
def test_bon_with_verifiers_as_judge_is_monotone_and_writes_sft_rows(tiny_model_dir, tmp_path, capfd):
    cfg = compose_config("bon", [f"model.path={tiny_model_dir}", "task=arithmetic", TOY, "reward_model=none",
                                 "bon.n=8", "bon.prompts=12", "bon.split=train", "rollout.max_new_tokens=6"])
    summary = run_bon(cfg, tmp_path)
    out, err = capfd.readouterr()
    assert "bon: 100%" in err  # a bar over the 12 prompts while it samples
    # where it went, in the trainers' summary's own column (grpo.parts.logs.where)
    assert out.splitlines()[-3:] == [f"run dir:     {tmp_path}", f"rows:        {tmp_path / 'best_of_n.jsonl'} (for "
                                     "grpo sft)", f"summary:     {tmp_path / 'best_of_n.summary.json'}"]
    by_k = summary["by_k"]
    assert [e["k"] for e in by_k] == [1, 2, 4, 8]
    # The judge is the true score here, and the first k samples are nested: best-of-k never drops.
    true = [e["true/mean"] for e in by_k]
    assert all(a <= b for a, b in zip(true, true[1:])) and true[-1] > true[0]
    assert [e["judge/mean"] for e in by_k] == true and all("rm/mean" not in e for e in by_k)
    rows = [json.loads(x) for x in (tmp_path / "best_of_n.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["prompt"].startswith("What is") for r in rows)
    # Readable by grpo sft as prompt/completion rows.
    from grpo.parts.modeling import load_tokenizer
    from grpo.parts.batch import encode_rows

    nonempty = [("bon.jsonl", r) for r in rows if r["completion"]]
    assert encode_rows(load_tokenizer(str(tiny_model_dir)), nonempty, "prompt", "completion")


@pytest.mark.slow
def test_bon_with_a_reward_model_reports_its_scores_and_the_true_score(tiny_model_dir, tiny_rm_dir, tmp_path):
    rm_dir = tiny_rm_dir
    cfg = compose_config("bon", [f"model.path={tiny_model_dir}", "task=arithmetic", TOY, f"reward_model.path={rm_dir}",
                                 "bon.n=4", "bon.prompts=6", "rollout.max_new_tokens=6"])
    summary = run_bon(cfg, tmp_path / "run")
    rm_means = [e["rm/mean"] for e in summary["by_k"]]
    # The reward model is the judge: its mean score of the kept samples never drops as k grows.
    assert all(a <= b + 1e-6 for a, b in zip(rm_means, rm_means[1:]))
    assert all(0.0 <= e["true/mean"] <= 1.0 for e in summary["by_k"])
    # reward_model.weight 0 and verifier_weight 1: the judge is the verifier alone (as grpo train's
    # reward would be), so the judge's mean of the kept samples is their true score at every k.
    cfg = compose_config("bon", [f"model.path={tiny_model_dir}", "task=arithmetic", TOY, f"reward_model.path={rm_dir}",
                                 "reward_model.weight=0", "reward_model.verifier_weight=1", "bon.n=4", "bon.prompts=6",
                                 "rollout.max_new_tokens=6"])
    mixed = run_bon(cfg, tmp_path / "run2")["by_k"]
    assert [e["judge/mean"] for e in mixed] == pytest.approx([e["true/mean"] for e in mixed])


@pytest.mark.slow
def test_bon_picks_by_the_reward_model_s_raw_score_whatever_the_squash(tiny_model_dir, tiny_rm_dir, tmp_path):
    """With squash=clip and a small scale every score above it is reward 1: picking by that reward
    would keep the earliest of the tied samples. Picking by the raw score keeps the reward model's
    best, so the kept samples' rm/mean is the same under clip as under sigmoid (a monotone squash),
    and it never drops as k grows. (Before the fix the clip run kept the earliest: lower rm/mean.)"""
    common = [f"model.path={tiny_model_dir}", "task=arithmetic", TOY, f"reward_model.path={tiny_rm_dir}",
              "bon.n=8", "bon.prompts=8", "rollout.max_new_tokens=6"]
    sigmoid = run_bon(compose_config("bon", common), tmp_path / "sigmoid")["by_k"]
    clip = run_bon(compose_config("bon", [*common, "reward_model.squash=clip", "reward_model.scale=1e-6"]),
                   tmp_path / "clip")["by_k"]
    # the same seed draws the same samples; the picks are the same, so are their scores
    assert [e["rm/mean"] for e in clip] == pytest.approx([e["rm/mean"] for e in sigmoid])
    assert all(a <= b + 1e-6 for a, b in zip([e["rm/mean"] for e in clip], [e["rm/mean"] for e in clip][1:]))
    rows = [json.loads(x) for x in (tmp_path / "clip" / "best_of_n.jsonl").read_text().splitlines()]
    assert {r["judge_reward"] for r in rows} <= {0.0, 1.0}  # the clipped rewards tie: raw scores break the tie


@pytest.mark.slow
def test_a_bad_reward_model_path_is_one_line_naming_reward_model_path(tiny_model_dir, tmp_path):
    """A missing reward model is named by its own setting (it was reported as model.path=...), and a
    causal LM given as one points at the command that trains a reward model from it (it named a
    Python function)."""
    from tests.conftest import run_grpo

    common = [f"model.path={tiny_model_dir}", "task=arithmetic", "bon.n=2", "bon.prompts=2"]
    missing = tmp_path / "no_rm"
    p = run_grpo("bon", *common, f"reward_model.path={missing}", f"hydra.run.dir={tmp_path / 'a'}")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"grpo bon: error: reward_model.path='{missing}': no such directory"]
    p = run_grpo("bon", *common, f"reward_model.path={tiny_model_dir}", f"hydra.run.dir={tmp_path / 'b'}")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.strip().startswith(f"grpo bon: error: reward_model.path='{tiny_model_dir}': no trained `score` head")
    assert p.stderr.strip().endswith(f"Train a reward model from it first: grpo rm model.path={tiny_model_dir}")


def test_the_bar_samples_in_the_engine_s_own_chunks_so_the_draws_are_one_call_s(tiny_model_dir, capfd):
    """generate_with_bar (grpo bon's and grpo eval's bar) hands the hf engine the chunks it makes
    itself: batch_size 8 // n 4 = 2 prompts a chunk, 5 prompts -> 3 calls; from the same seed they
    draw exactly what one call draws, and the bar counts the 5 prompts."""
    import torch

    from grpo.parts.evaluation import generate_with_bar
    from grpo.parts.modeling import load_model, load_tokenizer
    from grpo.parts.rollout.base import SamplingParams
    from grpo.parts.rollout.hf import HFEngine

    tok = load_tokenizer(str(tiny_model_dir))
    engine = HFEngine(load_model(str(tiny_model_dir)), tok, batch_size=8)
    prompts = [tok(f"What is {i} + {i}?", add_special_tokens=False)["input_ids"] for i in range(5)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=5)
    torch.manual_seed(3)
    one = engine.generate(prompts, 4, sp)
    torch.manual_seed(3)
    barred = generate_with_bar(engine, prompts, 4, sp, [None] * 5, "bon")
    assert barred == one and len(one.texts) == 20
    err = capfd.readouterr().err
    assert "bon: 100%" in err and "5/5" in err
