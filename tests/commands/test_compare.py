"""`grpo compare` and the KL it plots."""

import json
import math

import pytest
import torch

from grpo.commands.compare import compare_main, curve


def write_run(path, evals):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return path


def test_curves_of_a_run_and_of_a_best_of_n_summary(tmp_path):
    run = write_run(tmp_path / "dpo", [
        {"step": 0, "eval/reward/mean": 0.3, "eval/kl": 0.0},
        {"step": 1, "loss": 0.69},  # a training record: not a point
        {"step": 20, "eval/reward/mean": 0.8, "eval/kl": 2.5, "eval/rm_score": 1.5},
    ])
    c = curve(run)
    assert c["kl"] == [0.0, 2.5] and c["true"] == [0.3, 0.8] and c["rm"] == [None, 1.5]
    bon = tmp_path / "bon"
    bon.mkdir()
    (bon / "best_of_n.summary.json").write_text(json.dumps({"by_k": [
        {"k": 1, "kl": 0.0, "judge/mean": 0.4, "rm/mean": 0.1, "true/mean": 0.37},
        {"k": 4, "kl": math.log(4) - 0.75, "judge/mean": 0.8, "rm/mean": 2.3, "true/mean": 0.7}]}))
    b = curve(bon)
    assert b["kind"] == "best-of-N" and b["true"] == [0.37, 0.7] and b["rm"] == [0.1, 2.3]
    out = tmp_path / "fig.png"
    assert compare_main([str(run), str(bon), "--label", "DPO", "best-of-N", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inputs_it_cannot_plot_are_one_line_errors(tmp_path):
    from grpo.parts.config import UserError

    run = write_run(tmp_path / "r", [{"step": 0, "eval/reward/mean": 0.3}])
    with pytest.raises(UserError, match="no evaluation records with eval/kl"):
        curve(run)
    bon = tmp_path / "best_of_n.summary.json"
    bon.write_text(json.dumps({"by_k": [{"k": 1, "kl": 0.0, "judge/mean": 0.4}]}))  # a run without verifiers
    with pytest.raises(UserError, match="not a grpo bon summary with true scores"):
        curve(bon)
    other = tmp_path / "eval_samples.summary.json"
    other.write_text(json.dumps({"reward/mean": 0.5}, indent=2))  # grpo eval's summary
    with pytest.raises(UserError, match="not a grpo bon summary"):
        curve(other)
    with pytest.raises(UserError, match="no such run dir"):
        curve(tmp_path / "missing")


def test_sequence_kl_is_the_mean_summed_log_ratio(tiny_model_dir):
    from grpo.parts.batch import pack, token_logprobs
    from grpo.parts.evaluation import sequence_kl
    from grpo.parts.modeling import load_model
    from grpo.parts.rollout.base import Rollout

    policy, ref = load_model(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    ro = Rollout(prompt_ids=[[5, 6], [7]], completion_ids=[[8, 9, 1], [10]], texts=["", ""], logprobs=[[], []],
                 finished=[True, False])
    assert sequence_kl(policy, ref, ro, pad_id=0) == 0.0  # the same weights: every log-ratio is 0
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # By hand: per row, the sum over its real completion tokens of logp_policy - logp_ref, then the mean of the 2 rows.
    b = pack(ro.prompt_ids, ro.completion_ids, 0)
    lp = token_logprobs(policy, b.input_ids, b.attention_mask, b.position_ids, b.T)
    lr = token_logprobs(ref, b.input_ids, b.attention_mask, b.position_ids, b.T)
    expected = float(((lp - lr) * b.mask).sum().detach() / 2)
    assert sequence_kl(policy, ref, ro, pad_id=0, batch_size=1) == pytest.approx(expected, rel=1e-5)


def write_bon(run, true_means, mtime):
    """A grpo bon run dir whose summary was written at `mtime` (seconds since the epoch)."""
    import os

    run.mkdir(parents=True)
    summary = run / "best_of_n.summary.json"
    summary.write_text(json.dumps({"by_k": [{"k": 2 ** i, "kl": math.log(2 ** i) - (2 ** i - 1) / 2 ** i,
                                             "judge/mean": t, "true/mean": t} for i, t in enumerate(true_means)]}))
    os.utime(summary, (mtime, mtime))
    return run


def test_a_folder_of_runs_stands_for_its_newest_and_the_table_names_each_run(tmp_path, capsys):
    """`grpo bon` (and ppo, dpo) without hydra.run.dir write runs/bon/<date>/: `grpo compare runs/bon`
    reads the newest run there, the one whose record was written last, and says which it read."""
    bon = tmp_path / "runs" / "bon"
    write_bon(bon / "2025-01-02_10-00-00", [0.1, 0.2], mtime=2_000)
    write_bon(bon / "2025-01-03_09-00-00", [0.3, 0.5], mtime=3_000)  # the newest
    write_bon(bon / "2025-01-01_08-00-00", [0.9, 0.9], mtime=1_000)
    (bon / "notes").mkdir()  # not a run: left out of the count
    ppo = tmp_path / "runs" / "ppo"
    write_run(ppo / "2025-01-01_00-00-00", [{"step": 0, "eval/reward/mean": 0.3, "eval/kl": 0.0}])
    c = curve(bon)
    assert c["true"] == [0.3, 0.5] and c["run"] == str(bon / "2025-01-03_09-00-00") and c["of"] == 3
    out = tmp_path / "fig.png"
    assert compare_main([str(bon), str(ppo), str(ppo / "2025-01-01_00-00-00"), "-o", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"bon: {bon / '2025-01-03_09-00-00'} (the newest of 3 runs in {bon})" in lines
    assert f"ppo: {ppo / '2025-01-01_00-00-00'} (the only run in {ppo})" in lines
    assert f"2025-01-01_00-00-00: {ppo / '2025-01-01_00-00-00'}" in lines  # a run dir given as itself
    (tmp_path / "empty").mkdir()
    from grpo.parts.config import UserError

    with pytest.raises(UserError, match="empty: no run in it or in its sub-folders"):
        curve(tmp_path / "empty")
