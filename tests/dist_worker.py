"""What tests/parts/test_distributed.py runs under torchrun (gloo, CPU): one mode per check, rank 0 writing
what the test compares to a file.

    torchrun --nproc_per_node W tests/dist_worker.py MODE MODEL_DIR OUT RUN_DIR [overrides ...]

step:   one optimizer step of grpo train's update on a fixed global batch (the same completions
        whatever W), each rank taking its share of the prompts; writes the whole parameters after it.
dynamic: the same with dynamic sampling over two fixed batches of B prompts whose groups 0, 2 (first)
        and 1 (second) have equal rewards: B groups kept and trained on, the rest carried in the buffer;
        writes the parameters, the buffer and the metrics.
lagged: rollout.max_staleness = 1 over two fixed batches (their sampling log-probs -1 per token, so the
        behaviour weights min(pi_prox / mu, cap) are not 1): step 0 draws both, trains on the first
        with the decoupled loss and holds the second; writes the parameters, the queue and the metrics.
save:   `grpo train` for the configured steps, then the whole model and optimizer state, the
        scheduler step, the data position and the log-probs of a fixed batch under the sharded model.
resume: a GRPO run resumed from RUN_DIR's checkpoint, no step taken; writes the same state as save.
metrics: Parallel.reduce_metrics of two ranks' known metrics (MODEL_DIR and RUN_DIR unused).
generate: greedy hf-engine generation under fsdp2 with Lockstep, the ranks given different numbers
        of prompts, chunk sizes and lengths (so different numbers of forwards); rank 0 writes every
        rank's completions.
"""

from __future__ import annotations

import random
import sys

import torch

from grpo.parts import config as C
from grpo.parts.batch import batch_logprobs, pack
from grpo.cli import compose_config
from grpo.parts.distributed import shard
from grpo.parts.rollout.base import Rollout
from grpo.commands.train import GRPO, Sampled, build, dynamic_sample, lagged_sample, train_step, update
from grpo.parts.run import Run

# mode generate: rank -> (prompts, hf engine batch size, max_new_tokens)
GENERATE = {0: ([[5, 6, 7]], 8, 2), 1: ([[5 + i, 6, 7][: 1 + i % 3] for i in range(5)], 2, 7)}


def fixed_batch(G: int, B: int, vocab: int, seed: int = 0) -> tuple[Rollout, torch.Tensor]:
    """B prompts of 2..7 tokens with G completions of 1..9 tokens each (ragged: the ranks hold
    different token counts), and their rewards [B * G] with both values in each group."""
    rng = random.Random(seed)
    prompts, completions, rewards = [], [], []
    for _ in range(B):
        p = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 7))]
        for g in range(G):
            prompts.append(p)
            completions.append([rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))])
            rewards.append(float(g % 2) if g < 2 else float(rng.random() < 0.5))
    n = len(completions)
    ro = Rollout(prompt_ids=prompts, completion_ids=completions, texts=[""] * n,
                 logprobs=[[-1.0] * len(c) for c in completions], finished=[True] * n)
    return ro, torch.tensor(rewards)


def part(ro: Rollout, lo: int, hi: int) -> Rollout:
    return Rollout(*(getattr(ro, f)[lo:hi] for f in ("prompt_ids", "completion_ids", "texts", "logprobs", "finished")))


def whole_state(grpo: GRPO, run: Run) -> dict:
    """The whole (unsharded) model and optimizer state on rank 0, by parameter name (every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, optim = get_state_dict(grpo.policy.model, grpo.opt, options=opts)
    return {"model": model, "optim": optim["state"] if optim else {}, "sched": grpo.sched.last_epoch,
            "data_pos": grpo.progress["data_pos"], "step": run.step}


def main() -> None:
    mode, model_dir, out, run_dir, *overrides = sys.argv[1:]
    if mode == "metrics":
        from grpo.parts.distributed import Parallel

        par = Parallel("ddp")
        mine = [{"a/mean": 0.0, "a/std": 1.0, "v/errors": 3.0, "x": 1.0},
                {"a/mean": 10.0, "a/std": 1.0, "v/errors": 0.0, "x": 4.0}][par.rank]
        got = par.reduce_metrics(mine, [8, 24][par.rank])
        if par.main:
            torch.save(got, out)
        return par
    if mode == "generate":
        from grpo.parts.distributed import Lockstep, Parallel
        from grpo.parts.modeling import load_model, load_tokenizer
        from grpo.parts.rollout.base import SamplingParams
        from grpo.parts.rollout.hf import HFEngine

        par = Parallel("fsdp2")
        tok = load_tokenizer(model_dir)
        prompts, batch, length = GENERATE[par.rank]
        engine = HFEngine(par.wrap(load_model(model_dir)), tok, batch_size=batch, lockstep=Lockstep(par, tok.pad_token_id))
        ro = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=length))
        everyone = par.gather(ro.completion_ids)
        if par.main:
            torch.save(everyone, out)
        return par
    raw = compose_config("train", [f"model.path={model_dir}", "logger=jsonl", "trainer.eval_size=4",
                                   "task.eval_size=4", "rollout.max_new_tokens=6", *overrides])
    cfg = C.parse(C.TrainConfig, raw)
    with Run.from_config("grpo", cfg, raw, run_dir) as run:
        grpo, par = build(cfg, run), run.par
        G, B = cfg.algorithm.group_size, cfg.trainer.prompts_per_step
        result: dict = {}
        if mode == "step":
            ro, rewards = fixed_batch(G, B, len(run.tok) - 1)
            first, last = shard(B, par.rank, par.world)
            result["metrics"] = update(grpo, run, part(ro, first * G, last * G), rewards, first * G)
            result["model"] = whole_state(grpo, run)["model"]
        elif mode == "dynamic":
            batches = [fixed_batch(G, B, len(run.tok) - 1, seed=s) for s in (0, 1)]
            for (ro, rewards), flat in zip(batches, ([0, 2], [1])):
                for b in flat:
                    rewards[b * G:(b + 1) * G] = 0.5
            first, last = shard(B, par.rank, par.world)
            draws = iter([Sampled(part(ro, first * G, last * G), rewards, rewards, {"reward/mean": float(rewards.mean())})
                          for ro, rewards in batches])
            mine, shaped, offset, result["metrics"] = dynamic_sample(grpo, run, lambda *_: next(draws))
            result["metrics"].update(update(grpo, run, mine, shaped, offset))
            result["model"] = whole_state(grpo, run)["model"]
            result["buffer"] = grpo.progress["buffer"]
        elif mode == "lagged":
            first, last = shard(B, par.rank, par.world)
            draws = iter([Sampled(part(ro, first * G, last * G), rewards, rewards,
                                  {"reward/mean": float(rewards.mean()), "time/reward": 0.0})
                          for ro, rewards in (fixed_batch(G, B, len(run.tok) - 1, seed=s) for s in (0, 1))])
            mine, shaped, offset, result["metrics"] = lagged_sample(grpo, run, lambda *_: next(draws))
            result["metrics"].update(update(grpo, run, mine, shaped, offset, behaviour=True))
            result["model"] = whole_state(grpo, run)["model"]
            result["inflight"] = grpo.progress["inflight"]
        elif mode == "save":
            for step in run.steps():  # what `grpo train` runs
                step.done(train_step(grpo, run))
            result = whole_state(grpo, run)
            ro, _ = fixed_batch(2, 3, len(run.tok) - 1, seed=1)
            batch = pack(ro.prompt_ids, ro.completion_ids, run.tok.pad_token_id)
            with torch.no_grad():
                result["logp"] = grpo.policy.fwd(batch, 1.0, fn=batch_logprobs)
            result["mask"] = batch.mask
        elif mode == "resume":
            result = whole_state(grpo, run)
    if par.main:
        result["world"] = par.world
        torch.save(result, out)
    return par


def finish(par) -> None:
    """Every rank done before any leaves the process group."""
    from grpo.parts.distributed import close

    par.barrier()
    close()


if __name__ == "__main__":
    finish(main())  # main's models are released before the process group is left (distributed.close)
