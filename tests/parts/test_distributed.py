"""grpo train on several processes (torchrun, gloo on the CPU): DDP and FSDP2 give the update of one
process on the same global batch, checkpoints resume at another process count, and `grpo export`
turns a sharded checkpoint into a model folder with the same log-probs."""

import json

import pytest
import torch

from grpo.parts.distributed import Parallel, shard
from tests.conftest import ROOT, run_grpo, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model2(tmp_path_factory):
    """A randomly initialised 2-layer Llama (two blocks for FSDP2 to shard one by one)."""
    from grpo.commands.embedded import build_tokenizer, init_model

    out = tmp_path_factory.mktemp("model2")
    init_model(out, build_tokenizer(out), hidden=64, layers=2, seed=0)
    # a generation config of its own (a second EOS id) that an export must keep
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [1, 2]}))
    return out


def worker(world, mode, model, out, run_dir, *overrides):
    torchrun(world, str(ROOT / "tests" / "dist_worker.py"), mode, str(model), str(out), str(run_dir), *overrides)
    return torch.load(out, weights_only=False)


# ---- pure parts -------------------------------------------------------------------------------
def test_shard_splits_contiguously_and_unevenly():
    # 5 prompts over 3 ranks: 5 = 3 * 1 + 2, so ranks 0 and 1 take 2 and rank 2 takes 1.
    assert [shard(5, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]
    assert [shard(4, r, 2) for r in range(2)] == [(0, 2), (2, 4)]
    assert shard(7, 0, 1) == (0, 7)


def test_one_process_is_a_no_op():
    par = Parallel("fsdp2", "cpu")
    assert (par.world, par.rank, par.strategy, par.main) == (1, 0, "none", True)
    assert par.sum([1.5, 2.0]) == [1.5, 2.0]
    model = torch.nn.Linear(2, 2)
    assert par.wrap(model).model is model
    assert par.pad_micro_batches([slice(0, 2), slice(2, 3)]) == [(slice(0, 2), 1.0), (slice(2, 3), 1.0)]
    assert par.reduce_metrics({"a": 0.25}, 8) == {"a": 0.25}


def test_metrics_are_reduced_over_ranks_by_their_weights(tmp_path):
    got = worker(2, "metrics", "-", tmp_path / "m.pt", "-")
    # rank 0: 8 rows with mean 0, std 1, 3 errors, x = 1; rank 1: 24 rows with mean 10, std 1, no errors, x = 4.
    assert got["x"] == pytest.approx((8 * 1 + 24 * 4) / 32)  # 3.25: weighted, not (1 + 4) / 2
    assert got["a/mean"] == pytest.approx((8 * 0 + 24 * 10) / 32)  # 7.5
    # pooled: E[x^2] = (8 * (1 + 0) + 24 * (1 + 100)) / 32 = 76, minus 7.5^2 = 56.25 -> sqrt(19.75)
    assert got["a/std"] == pytest.approx(19.75 ** 0.5)
    assert got["v/errors"] == 3.0  # a count: summed


def test_generation_under_fsdp2_keeps_the_ranks_in_step(model2, tmp_path):
    """Rank 0 has one prompt and 2 tokens to go, rank 1 five prompts in chunks of 2 and 7 tokens:
    their numbers of forwards differ, and every forward of a sharded model is a collective. With
    Lockstep they finish, and each rank's greedy completions are the unsharded model's."""
    from grpo.parts.modeling import load_model, load_tokenizer
    from grpo.parts.rollout.base import SamplingParams
    from grpo.parts.rollout.hf import HFEngine
    from tests.dist_worker import GENERATE

    got = worker(2, "generate", model2, tmp_path / "gen.pt", "-")
    model, tok = load_model(str(model2)), load_tokenizer(str(model2))
    for rank, (prompts, batch, length) in GENERATE.items():
        want = HFEngine(model, tok, batch_size=batch).generate(prompts, 1, SamplingParams(temperature=0.0,
                                                                                          max_new_tokens=length))
        assert got[rank] == want.completion_ids
        assert max(len(c) for c in got[rank]) == length  # greedy on a random model: rows run to the end


# ---- one step on 1, 2 and 3 processes ---------------------------------------------------------
# SGD (no momentum, lr 0.5, no clipping): the weights move by lr * gradient, so a gradient off by the
# world size (a local normaliser, a missing * W) moves them by a different amount. AdamW would hide
# it: its step is nearly invariant to the gradient's scale. G = 3, B = 5 prompts: 3 + 2 on two
# ranks, 2 + 2 + 1 on three; micro-batches of 6 rows (two groups) give the ranks different numbers
# of micro-batches and tokens. beta > 0: the reference forwards run too.
STEP = ["optim.name=sgd", "optim.lr=0.5", "optim.warmup_steps=0", "optim.max_grad_norm=1e9", "algorithm.group_size=3",
        "trainer.prompts_per_step=5", "trainer.micro_batch_size=6", "algorithm.beta=0.1"]


@pytest.fixture(scope="module")
def one_process(model2, tmp_path_factory):
    cache = {}

    def get(agg, *algo, mode="step"):
        key = (agg, *algo, mode)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"one_{agg}")
            cache[key] = worker(1, mode, model2, d / "out.pt", d / "run", *STEP, f"algorithm.loss_agg={agg}", *algo)
        return cache[key]
    return get


@pytest.mark.parametrize("strategy,world,agg,extra", [
    ("ddp", 2, "token_mean", ""), ("ddp", 3, "token_mean", ""), ("fsdp2", 2, "token_mean", ""),
    ("fsdp2", 3, "token_mean", ""), ("ddp", 2, "seq_mean_token_mean", ""),
    ("fsdp2", 3, "seq_mean_token_sum_norm", ""),
    ("fsdp2", 2, "token_mean", "parallel.ref_on_cpu=true"),  # the reference whole, beside the sharded policy
    ("ddp", 2, "token_mean", "model.gradient_checkpointing=true"),
    # REINFORCE++ whitens its advantages over every real token of the step, on all ranks
    ("ddp", 2, "token_mean", "algorithm.adv_estimator=reinforce_pp"),
    ("fsdp2", 3, "token_mean", "algorithm.adv_estimator=reinforce_pp_baseline"),
    ("ddp", 3, "seq_mean_token_mean", "algorithm.is_level=sequence")])
def test_a_step_on_several_processes_equals_one(model2, one_process, tmp_path, strategy, world, agg, extra):
    from transformers import AutoModelForCausalLM

    algo = [extra] if extra.startswith("algorithm.") else []  # the one-process run has the same algorithm
    base = one_process(agg, *algo)
    many = worker(world, "step", model2, tmp_path / "out.pt", tmp_path / "run", *STEP, f"algorithm.loss_agg={agg}",
                  f"parallel={strategy}", *([extra] if extra else []))
    assert many["world"] == world
    init = AutoModelForCausalLM.from_pretrained(model2).state_dict()
    moved = max(float((base["model"][k] - init[k]).abs().max()) for k in base["model"])
    gap = max(float((many["model"][k] - base["model"][k]).abs().max()) for k in base["model"])
    # The step moves some weight by > 1e-3; a gradient scaled by 1/W or W would miss by half of that
    # or more, far above the float32 reordering noise between 1 and W processes (< 1e-6).
    assert moved > 1e-3
    assert gap < 1e-6, (gap, moved)
    # The step's loss and token metrics are global too.
    for k in ("loss", "kl", "entropy", "completion/len_mean"):
        assert many["metrics"][k] == pytest.approx(base["metrics"][k], rel=1e-5, abs=1e-7), k


def one_and_many(model2, one_process, tmp_path, mode: str, strategy: str, world: int, *extra: str):
    """tests/dist_worker.py's `mode` (token_mean, STEP, `extra`) on one process and on `world` under `strategy`."""
    base = one_process("token_mean", *extra, mode=mode)
    many = worker(world, mode, model2, tmp_path / "out.pt", tmp_path / "run", *STEP, "algorithm.loss_agg=token_mean",
                  *extra, f"parallel={strategy}")
    return base, many


def assert_same_update(model2, base, many, moved: float) -> None:
    """The one-process step moved some weight by more than `moved` from the initial model, and the
    W-process step landed within 1e-6 of it (float32 reordering noise; a gradient scaled by 1/W or W
    would miss by half the move or more)."""
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(model2).state_dict()
    assert max(float((base["model"][k] - init[k]).abs().max()) for k in base["model"]) > moved  # the step moved
    gap = max(float((many["model"][k] - base["model"][k]).abs().max()) for k in base["model"])
    assert gap < 1e-6, gap


@pytest.mark.parametrize("strategy,world", [("ddp", 2), ("fsdp2", 3)])
def test_dynamic_sampling_on_several_processes_equals_one(model2, one_process, tmp_path, strategy, world):
    # Two fixed rollouts of B = 5 groups (tests/dist_worker.py): the first has 3 groups with differing
    # rewards (0, 2 equal), the second 4 (1 equal): 3 < 5 after the first, 7 after the second, so the
    # step trains on 5 (3 + the second's groups 0, 2) and carries 2 (its groups 3, 4) to the next.
    base, many = one_and_many(model2, one_process, tmp_path, "dynamic", strategy, world,
                              "algorithm.dynamic_sampling=true")
    for got in (base, many):
        assert (got["metrics"]["dapo/gen_batches"], got["metrics"]["dapo/kept_groups"], got["metrics"]["dapo/buffer"]) \
            == (2.0, 5.0, 2.0)
    assert many["buffer"] == base["buffer"] and len(base["buffer"]) == 2
    second = base["buffer"][0]["prompt_ids"], base["buffer"][1]["prompt_ids"]
    assert second[0] != second[1]
    assert_same_update(model2, base, many, moved=1e-3)
    assert many["metrics"]["loss"] == pytest.approx(base["metrics"]["loss"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("strategy,world", [("ddp", 2), ("fsdp2", 3)])
def test_lagged_rollouts_on_several_processes_equal_one(model2, one_process, tmp_path, strategy, world):
    # rollout.max_staleness = 1 (tests/dist_worker.py, mode lagged): step 0 draws two fixed batches of
    # B = 5 groups, trains on the first with the decoupled loss (mu = e^-1 per token, far from the
    # random model's pi_prox, so every weight is < 1 and the gradient is not the on-policy one) and
    # holds the second, every rank's groups on every rank.
    base, many = one_and_many(model2, one_process, tmp_path, "lagged", strategy, world, "rollout.max_staleness=1")
    for got in (base, many):
        assert got["metrics"]["async/generated"] == 2.0 and got["metrics"]["async/inflight_groups"] == 10.0
        assert got["metrics"]["offpolicy/weight_mean"] < 0.5  # mu = e^-1 > pi_prox on this vocabulary
    assert many["inflight"] == base["inflight"] and len(base["inflight"][0]["groups"]) == 5
    assert_same_update(model2, base, many, moved=1e-4)  # weights < 1: a smaller step
    for k in ("loss", "offpolicy/weight_mean"):
        assert many["metrics"][k] == pytest.approx(base["metrics"][k], rel=1e-5, abs=1e-7), k


# ---- a whole run, checkpoints, export ---------------------------------------------------------
def test_two_process_run_learns_and_logs_once(tmp_path):
    run = tmp_path / "run"
    p = torchrun(2, "-m", "grpo", "train", "logger=jsonl", "trainer.max_steps=40", "trainer.eval_every=0",
                 "trainer.save_every=0", f"hydra.run.dir={run}", timeout=900)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "reward/mean" in r] == list(range(1, 41))  # each step once
    evals = [r["eval/reward/mean"] for r in recs if "eval/reward/mean" in r]
    assert len(evals) == 2 and evals[1] > evals[0] + 0.1, evals
    assert p.stdout.count("done after 40 steps") == 1  # the summary from rank 0 only
    assert (run / "train.log").exists() and (run / "train.rank1.log").exists()


@pytest.fixture(scope="module")
def saved(model2, tmp_path_factory):
    """2 steps of AdamW on 2 processes under fsdp2, checkpointed at the end."""
    d = tmp_path_factory.mktemp("saved")
    state = worker(2, "save", model2, d / "saved.pt", d / "run", "trainer.max_steps=2", "trainer.eval_every=0",
                   "trainer.prompts_per_step=4", "algorithm.group_size=2", "optim.lr=1e-3", "parallel=fsdp2")
    return d, state


@pytest.mark.parametrize("world,strategy", [(1, "ddp"), (3, "fsdp2")])
def test_a_sharded_checkpoint_resumes_at_another_process_count(model2, saved, tmp_path, world, strategy):
    d, state = saved
    ckpt = d / "run" / "checkpoints" / "step_000002"
    assert (ckpt / "dcp" / ".metadata").exists() and not (ckpt / "model").exists()
    got = worker(world, "resume", model2, tmp_path / "resumed.pt", d / "run", "trainer.max_steps=2",
                 "trainer.eval_every=0", "trainer.prompts_per_step=4", "algorithm.group_size=2", "optim.lr=1e-3",
                 f"parallel={strategy}", "trainer.resume=true")
    assert (got["step"], got["data_pos"], got["sched"]) == (state["step"], state["data_pos"], state["sched"]) == (2, 8, 3)
    assert state["model"].keys() == got["model"].keys()
    for k, v in state["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert state["optim"].keys() == got["optim"].keys() and state["optim"]
    for name, per in state["optim"].items():
        for k, v in per.items():
            assert torch.equal(torch.as_tensor(got["optim"][name][k]), torch.as_tensor(v)), (name, k)


@pytest.mark.parametrize("name", ["dcp/__1_0.distcp", "rng/rank_00001.pt"])
def test_a_cut_file_of_another_rank_is_found(saved, tmp_path, name):
    """Rank 0 records every rank's files in the manifest, after they are all written."""
    import shutil

    from grpo.parts import checkpoint

    d, _ = saved
    ckpt = shutil.copytree(d / "run" / "checkpoints" / "step_000002", tmp_path / "step_000002")
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng/rank_00000.pt", "rng/rank_00001.pt"} <= files.keys()
    assert checkpoint.damaged_file(ckpt) is None
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) - 100])
    assert checkpoint.damaged_file(ckpt) == ckpt / name


def test_export_gives_the_sharded_models_logprobs(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    from grpo.parts.batch import batch_logprobs, pack
    from tests.dist_worker import fixed_batch

    d, state = saved
    out = tmp_path / "exported"
    p = run_grpo("export", str(d / "run"), str(out))
    assert p.returncode == 0, p.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    # the model's own generation config, not one made up from config.json
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 2]
    ro, _ = fixed_batch(2, 3, model.config.vocab_size - 1, seed=1)
    from grpo.parts.modeling import load_tokenizer

    batch = pack(ro.prompt_ids, ro.completion_ids, load_tokenizer(str(out)).pad_token_id)
    with torch.no_grad():
        logp = batch_logprobs(model, batch, 1.0)
    m = state["mask"]
    assert torch.allclose(logp * m, state["logp"] * m, atol=1e-5)
    # and a second export onto it is refused in one line
    p = run_grpo("export", str(d / "run"), str(out))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "not empty" in p.stderr


# ---- the other trainers -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory):
    """Rows of different lengths: the ranks' shares hold different numbers of completion tokens."""
    d = tmp_path_factory.mktemp("sft_data") / "rows.jsonl"
    words = ["cat", "a long answer here", "dog", "owl bee", "x", "seventeen words? no, four"]
    d.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": w}) + "\n" for i, w in enumerate(words)))
    return d


def test_sft_step_on_two_and_three_processes_equals_one(model2, sft_rows, tmp_path):
    from transformers import AutoModelForCausalLM

    # SGD, one step of 5 rows: 3 + 2 rows on two ranks (ddp), 2 + 2 + 1 on three (fsdp2).
    args = [f"model.path={model2}", f"data.path={sft_rows}", "trainer.max_steps=1", "trainer.batch_size=5",
            "optim.name=sgd", "optim.lr=0.5", "optim.warmup_steps=0", "optim.max_grad_norm=1e9"]
    weights = {}
    for world, strategy in ((1, "ddp"), (2, "ddp"), (3, "fsdp2")):
        run = tmp_path / f"w{world}"
        torchrun(world, "-m", "grpo", "sft", *args, f"parallel={strategy}", f"hydra.run.dir={run}")
        weights[world] = AutoModelForCausalLM.from_pretrained(run / "model").state_dict()
    init = AutoModelForCausalLM.from_pretrained(model2).state_dict()
    assert max(float((weights[1][k] - init[k]).abs().max()) for k in init) > 1e-3  # the step moved the model
    for world in (2, 3):
        gap = max(float((weights[world][k] - weights[1][k]).abs().max()) for k in init)
        assert gap < 1e-6, (world, gap)


def test_dpo_step_on_two_and_three_processes_equals_one(model2, tmp_path):
    from transformers import AutoModelForCausalLM

    # Pairs of different lengths; one SGD step on 5 pairs in micro-batches of 2: on two ranks 3 + 2
    # pairs (2 and 1 micro-batches), on three 2 + 2 + 1. The NLL term's token mean is global too.
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?" + " why" * (i % 3), "chosen": "yes" + " indeed" * (i % 4),
                                        "rejected": "no" + " never" * (i % 2)}) + "\n" for i in range(12)))
    args = [f"model.path={model2}", f"data.path={data}", "task=arithmetic",
            "task.verifiers=[{_target_: tests.toy_verifiers.DigitFraction}]", "task.eval_size=6",
            "trainer.eval_size=6", "rollout.max_new_tokens=4", "trainer.max_steps=1", "trainer.batch_size=5",
            "trainer.micro_batch_size=2", "trainer.eval_every=0", "dpo.nll_coef=0.5", "optim.name=sgd",
            "optim.lr=0.5", "optim.warmup_steps=0", "optim.max_grad_norm=1e9"]
    weights = {}
    for world, extra in ((1, []), (2, ["parallel=ddp", "dpo.precompute_ref=true"]), (3, ["parallel=fsdp2"])):
        run = tmp_path / f"w{world}"
        torchrun(world, "-m", "grpo", "dpo", *args, *extra, f"hydra.run.dir={run}")
        weights[world] = AutoModelForCausalLM.from_pretrained(run / "model").state_dict()
    init = AutoModelForCausalLM.from_pretrained(model2).state_dict()
    assert max(float((weights[1][k] - init[k]).abs().max()) for k in init) > 1e-3
    for world in (2, 3):
        gap = max(float((weights[world][k] - weights[1][k]).abs().max()) for k in init)
        assert gap < 1e-6, (world, gap)


def test_rm_step_on_two_and_three_processes_equals_one(model2, tmp_path):
    from transformers import AutoModelForSequenceClassification

    # Rankings of K = 2, 3 and 4 responses of different lengths; one SGD step on 5 prompts in
    # micro-batches of 2 (3 + 2 prompts on two ranks, 2 + 2 + 1 on three).
    def write(path, rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    answers = ["yes", "yes indeed", "maybe so", "no", "never ever"]
    train = write(tmp_path / "train.jsonl", [{"prompt": f"q{i}?", "responses": answers[:2 + i % 3]} for i in range(12)])
    held = write(tmp_path / "eval.jsonl", [{"prompt": f"other {i}", "chosen": "yes", "rejected": "no"} for i in range(3)])
    args = [f"model.path={model2}", f"data.path={train}", f"data.eval_path={held}", "trainer.max_steps=1",
            "trainer.batch_size=5", "trainer.micro_batch_size=2", "optim.name=sgd", "optim.lr=0.5",
            "optim.warmup_steps=0", "optim.max_grad_norm=1e9", "rm.normalize=false"]
    weights = {}
    for world, strategy in ((1, "ddp"), (2, "ddp"), (3, "fsdp2")):
        run = tmp_path / f"w{world}"
        torchrun(world, "-m", "grpo", "rm", *args, f"parallel={strategy}", f"hydra.run.dir={run}")
        weights[world] = AutoModelForSequenceClassification.from_pretrained(run / "model").state_dict()
    init = weights[1]  # a fresh head: compare moved weights against the trunk the runs started from
    from transformers import AutoModelForCausalLM

    trunk = AutoModelForCausalLM.from_pretrained(model2).state_dict()
    moved = max(float((init[k] - trunk[k]).abs().max()) for k in init if k in trunk)
    assert moved > 1e-3
    for world in (2, 3):
        gap = max(float((weights[world][k] - weights[1][k]).abs().max()) for k in init)
        assert gap < 1e-6, (world, gap)
    # The sharded checkpoint of the 3-process run exports as a reward model equal to its final model.
    p = run_grpo("export", str(tmp_path / "w3"), str(tmp_path / "exported"))
    assert p.returncode == 0, p.stderr
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported").state_dict()
    assert all(torch.equal(exported[k], weights[3][k]) for k in weights[3])


@pytest.fixture(scope="module")
def rm2(model2, tmp_path_factory):
    """A reward model on model2's trunk with a random head: its scores (and, as the critic's start,
    its values) differ from completion to completion."""
    from grpo.parts.modeling import load_tokenizer
    from grpo.parts.reward_model import init_reward_model, save_reward_model

    out = tmp_path_factory.mktemp("rm2")
    model = init_reward_model(str(model2))
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight)
    save_reward_model(model, load_tokenizer(str(model2)), out)
    return out


def test_ppo_step_on_two_and_three_processes_equals_one(model2, rm2, sft_rows, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # Greedy rollouts, so every process count sees the same completions. One step of 5 prompts
    # (3 + 2 on two ranks, 2 + 2 + 1 on three) in 2 shuffled minibatches, so some rank may hold no
    # row of a minibatch; advantages whitened over the whole batch; PPO-ptx on; SGD. The score is
    # rm2's (scores differ between completions: the advantages are not all 0) and the critic starts
    # as its copy (values not 0): both the policy and the critic are compared.
    args = [f"model.path={model2}", "task=arithmetic", "task.verifiers=[{_target_: tests.toy_verifiers.DigitFraction}]",
            f"reward_model.path={rm2}", "task.eval_size=6", "trainer.eval_size=6", "rollout.max_new_tokens=5",
            "rollout.temperature=0", "trainer.max_steps=1", "trainer.prompts_per_step=5", "trainer.eval_every=0",
            "ppo.epochs=1", "ppo.minibatches=2", "ppo.ptx_coef=0.5", f"ppo.ptx_path={sft_rows}", "ppo.ptx_batch_size=2",
            "optim.name=sgd", "optim.lr=0.5", "optim.warmup_steps=0", "optim.max_grad_norm=1e9"]
    got = {}
    for world, strategy in ((1, "ddp"), (2, "ddp"), (3, "fsdp2")):
        run = tmp_path / f"w{world}"
        torchrun(world, "-m", "grpo", "ppo", *args, f"parallel={strategy}", f"hydra.run.dir={run}")
        for module, auto in (("model", AutoModelForCausalLM), ("value", AutoModelForSequenceClassification)):
            out = tmp_path / f"w{world}_{module}"
            p = run_grpo("export", str(run), str(out), "--module", module)
            assert p.returncode == 0, p.stderr
            got[world, module] = auto.from_pretrained(out).state_dict()
    for world in (2, 3):  # the batch's first-minibatch ratio, before any update: 1
        rec = [json.loads(x) for x in (tmp_path / f"w{world}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["policy/first_ratio"] for r in rec if "policy/first_ratio" in r] == [pytest.approx(1.0, abs=1e-5)]
    # The 2-process run's sharded checkpoint (policy and critic) resumes on one process.
    torchrun(1, "-m", "grpo", "ppo", *[a for a in args if a != "trainer.max_steps=1"], "trainer.max_steps=2",
             "trainer.resume=true", f"hydra.run.dir={tmp_path / 'w2'}")
    rec = [json.loads(x) for x in (tmp_path / "w2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec if "loss/policy" in r] == [1, 2]
    start = {"model": AutoModelForCausalLM.from_pretrained(model2).state_dict(),
             "value": AutoModelForSequenceClassification.from_pretrained(rm2).state_dict()}
    for module in ("model", "value"):
        moved = max(float((got[1, module][k] - v).abs().max()) for k, v in start[module].items())
        assert moved > 1e-2, (module, moved)
        for world in (2, 3):
            a, b = got[world, module], got[1, module]
            gap = max(float((a[k] - b[k]).abs().max()) for k in b)
            # Whitening divides by the batch's std, so float32 reordering noise grows to ~1e-5 of the
            # step here; a gradient off by a factor of W would miss by ~half the step.
            assert gap < 1e-4 * moved, (module, world, gap, moved)


def test_lagged_ppo_on_two_processes_equals_one(model2, rm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # rollout.max_staleness = 1 in grpo ppo, greedy rollouts (every process count sees the same
    # completions), B = 5 prompts (3 + 2 on two ranks), 2 shuffled minibatches, SGD, advantages not
    # whitened (no division by a batch std to amplify the reordering noise). Step 1 draws the rollouts
    # for steps 1 and 2 with the initial policy and trains on the first (pi_prox = mu); step 2 trains
    # on the second, every rank's groups gathered then split again, with the policy after step 1:
    # pi_prox != mu, the behaviour weights off 1 (rm2's scores are ~-8 and not whitened: a small
    # rate keeps step 1 from moving pi_prox so far that every weight hits the cap). Both the policy
    # and the critic are compared.
    args = [f"model.path={model2}", "task=arithmetic", "task.verifiers=[{_target_: tests.toy_verifiers.DigitFraction}]",
            f"reward_model.path={rm2}", "task.eval_size=6", "trainer.eval_size=6", "rollout.max_new_tokens=5",
            "rollout.temperature=0", "rollout.max_staleness=1", "trainer.max_steps=2", "trainer.prompts_per_step=5",
            "trainer.eval_every=0", "ppo.epochs=1", "ppo.minibatches=2", "ppo.whiten_advantages=false",
            "optim.name=sgd", "optim.lr=2e-3", "optim.warmup_steps=0", "optim.max_grad_norm=1e9"]
    got, rec, held = {}, {}, {}
    for world in (1, 2):
        run = tmp_path / f"w{world}"
        torchrun(world, "-m", "grpo", "ppo", *args, "parallel=ddp", f"hydra.run.dir={run}")
        rec[world] = {r["step"]: r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())
                      if "loss/policy" in r}
        ckpt = run / "checkpoints" / "step_000002"
        held[world] = torch.load(ckpt / "state.pt", weights_only=False)["inflight"]
        for module, auto in (("model", AutoModelForCausalLM), ("value", AutoModelForSequenceClassification)):
            out = ckpt / module  # one process: the folders; two: the sharded checkpoint, exported
            if world > 1:
                out = tmp_path / f"w{world}_{module}"
                p = run_grpo("export", str(run), str(out), "--module", module)
                assert p.returncode == 0, p.stderr
            got[world, module] = auto.from_pretrained(out).state_dict()
    # both hold step 3's rollout (version 1's, greedy): the same completions, every rank's groups
    assert [e["version"] for e in held[1]] == [e["version"] for e in held[2]] == [1]
    assert [g["completion_ids"] for g in held[2][0]["groups"]] == [g["completion_ids"] for g in held[1][0]["groups"]]
    assert len(held[1][0]["groups"]) == 5
    for world in (1, 2):
        assert [rec[world][s]["async/staleness"] for s in (1, 2)] == [0.0, 1.0]
        assert rec[world][2]["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5)  # the ratio is to pi_prox
        assert abs(rec[world][2]["offpolicy/weight_mean"] - 1.0) > 1e-3
    for k in ("loss/policy", "loss/value", "offpolicy/weight_mean", "objective/scores"):
        assert rec[2][2][k] == pytest.approx(rec[1][2][k], rel=1e-5, abs=1e-7), k
    start = {"model": AutoModelForCausalLM.from_pretrained(model2).state_dict(),
             "value": AutoModelForSequenceClassification.from_pretrained(rm2).state_dict()}
    for module in ("model", "value"):
        moved = max(float((got[1, module][k] - v).abs().max()) for k, v in start[module].items())
        gap = max(float((got[2, module][k] - got[1, module][k]).abs().max()) for k in got[1, module])
        # float32 reordering noise between 1 and 2 processes (< 1e-6); a gradient scaled by 1/W or W,
        # or a rank training on another rank's groups, would miss by a share of the move (> 1e-3)
        assert moved > 1e-3 and gap < 1e-6, (module, moved, gap)
