"""`grpo rm` end to end on a tiny config-built model and a rule it can learn in seconds."""

import json

import pytest
import torch

from grpo.cli import compose_config
from grpo.parts.reward_model import load_reward_model
from grpo.commands.rm import run_rm
from tests.conftest import run_grpo, run_interrupted

pytestmark = pytest.mark.slow


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data(tmp_path):
    # Rankings best first: "yes" > "maybe" > "no", whatever the prompt; held-out pairs on other prompts.
    train = write(tmp_path / "train.jsonl", [{"prompt": f"q{i}?", "responses": ["yes", "maybe", "no"]} for i in range(40)])
    held = write(tmp_path / "eval.jsonl", [{"prompt": f"other {i}", "chosen": c, "rejected": r}
                                           for i in range(6) for c, r in (("yes", "no"), ("yes", "maybe"), ("maybe", "no"))])
    return train, held


def cfg(model_dir, train, held, *extra):
    return compose_config("rm", [f"model.path={model_dir}", f"data.path={train}", f"data.eval_path={held}",
                                 "trainer.batch_size=8", "trainer.eval_every=10", "trainer.log_every=5",
                                 "optim.lr=3e-3", "optim.warmup_steps=2", *extra])


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rm_learns_rankings_and_saves_a_normalised_reward_model(tiny_model_dir, data, tmp_path, capsys):
    train, held = data
    run = tmp_path / "run"
    summary = run_rm(cfg(tiny_model_dir, train, held, "trainer.max_steps=40"), run)
    # the summary says what the held-out figure is over: 6 prompts x 3 pairs
    assert capsys.readouterr().out.splitlines()[-1].startswith("held-out pairwise accuracy over 18 pairs: ")
    evals = [r for r in metrics(run) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]
    assert evals[-1]["eval/accuracy"] == 1.0 and evals[-1]["eval/margin"] > 0
    # Reloaded the strict way, the stored bias puts the training responses' scores at mean 0:
    # every training prompt has the same three responses, so their three scores average to 0
    # (the prompts differ only in a digit, so up to a small spread).
    rm = load_reward_model(str(run / "model"))
    from grpo.parts.reward_model import batch_sequences, sequence_scores
    from grpo.parts.modeling import load_tokenizer

    tok = load_tokenizer(str(run / "model"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "q3?"}], add_generation_prompt=True, tokenize=False)
    seqs = [tok(prompt + r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in ("yes", "maybe", "no")]
    ids, attn = batch_sequences(seqs, tok.pad_token_id)
    with torch.no_grad():
        s = sequence_scores(rm, ids, attn)
    assert s[0] > s[1] > s[2]
    assert abs(float(s.mean())) < 0.25 * float(s[0] - s[2])
    assert summary["normalizer"]["reward_bias"] == pytest.approx(rm.config.reward_bias)


def test_rm_resume_reproduces_the_uninterrupted_run(tiny_model_dir, data, tmp_path):
    train, held = data
    common = ["trainer.save_every=3", "trainer.log_every=1", "optim.schedule=constant_with_warmup"]
    full, part, (whole, resumed) = run_interrupted(run_rm, lambda *o: cfg(tiny_model_dir, train, held, *o, *common),
                                                   tmp_path, 6, 3)
    # the summary after the resume starts from the run's first evaluation, made before the stop
    assert resumed["first_eval"]["eval/accuracy"] == whole["first_eval"]["eval/accuracy"]
    assert resumed["first_eval"]["step"] == 0
    a = {r["step"]: r["loss"] for r in metrics(full) if "loss" in r}
    b = {r["step"]: r["loss"] for r in metrics(part) if "loss" in r}
    assert sorted(b) == [1, 2, 3, 4, 5, 6] and a == b
    wa, wb = load_reward_model(str(full / "model")).state_dict(), load_reward_model(str(part / "model")).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_preference_row_is_one_line_with_exit_2(tiny_model_dir, tmp_path):
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "x"}])
    r = run_grpo("rm", f"model.path={tiny_model_dir}", f"data.path={bad}", "data.eval_path=null",
                 f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_steps=1")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("grpo rm: error:") and "bad.jsonl" in last and "line 2" in last and "rejected" in last


def test_micro_batches_give_the_whole_batch_gradient(tiny_model_dir):
    # Ragged rankings (K = 2, 3, 4) split into micro-batches of 2 prompts: the weighted micro-batch
    # losses add up to the whole batch's, so the gradients match (compared directly: AdamW would
    # hide a wrong factor).
    from grpo.parts.modeling import load_tokenizer
    from grpo.parts.reward_model import init_reward_model
    from grpo.commands.rm import Encoded, backward

    tok = load_tokenizer(str(tiny_model_dir))
    batch = [Encoded([[5, 6, 1], [5, 7, 1]]), Encoded([[8, 9, 10, 1], [8, 1], [8, 11, 1]]),
             Encoded([[12, 1], [13, 1], [14, 15, 1], [16, 1]])]
    grads = []
    for micro in (0, 2, 1):
        model = init_reward_model(str(tiny_model_dir))
        torch.manual_seed(0)  # the same fresh head every time
        torch.nn.init.normal_(model.score.weight)
        loss, metrics = backward(model, batch, micro, "rankings", tok.pad_token_id, "cpu", 0.0)
        grads.append((loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    for loss, g in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-6)
        # float32 sums in another order: equal to 1e-5 of the largest gradient entry (a wrong micro-batch
        # weight would be off by a factor of 2 or 3)
        assert (g - grads[0][1]).abs().max() <= 1e-5 * grads[0][1].abs().max()


def test_held_out_split_keeps_every_row_of_a_prompt_together():
    from grpo.commands.rm import split_held_out
    from grpo.tasks.base import Sample
    from grpo.tasks.preference_data import Ranking

    rows = [Ranking(Sample(prompt=f"p{i % 10}"), ["a", "b"], None, "") for i in range(60)]  # 6 rows per prompt
    train, held = split_held_out(rows, 0.2, seed=0)
    held_prompts = {r.sample.prompt for r in held}
    assert len(held_prompts) == 2 and len(held) == 12  # 20% of 10 prompts, all 6 rows of each
    assert not held_prompts & {r.sample.prompt for r in train}


def test_zero_steps_is_refused_before_anything_is_saved(tiny_model_dir, data, tmp_path):
    """trainer.max_steps=0 used to write <run dir>/model with the head as drawn at random, a reward
    model that scores noise; it is a config error now, and nothing is written."""
    from grpo.parts.config import ConfigError

    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^trainer.max_steps=0: grpo rm would save a reward model whose head was "
                                          r"never trained"):
        run_rm(cfg(tiny_model_dir, *data, "trainer.max_steps=0"), run_dir)
    assert not run_dir.exists()


def test_score_data_trains_the_pointwise_loss_and_the_summary_gives_the_held_out_mse(tiny_model_dir, tmp_path, capsys):
    """Rows of `score`: the summary's last line is the held-out MSE, and says over how many rows:
    20 prompts with 2 scored rows each, eval_fraction 0.2 holds out round(20 x 0.2) = 4 prompts = 8 rows."""
    rows = [{"prompt": f"q{i}?", "response": r, "score": v} for i in range(20) for r, v in (("yes", 1.0), ("no", 0.0))]
    run = tmp_path / "run"
    run_rm(compose_config("rm", [f"model.path={tiny_model_dir}", f"data.path={write(tmp_path / 's.jsonl', rows)}",
                                 "data.eval_fraction=0.2", "trainer.batch_size=4", "trainer.max_steps=2"]), run)
    evals = [r for r in metrics(run) if "eval/mse" in r]
    assert [r["step"] for r in evals] == [0, 2]
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"held-out MSE over 8 rows: {evals[0]['eval/mse']:.4f} -> {evals[1]['eval/mse']:.4f}"
