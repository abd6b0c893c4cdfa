"""The GRPO loop, top to bottom.

One step:
    B prompts -> G completions each (rollout engine) -> rewards in [0, 1] (verifiers)
    -> group-normalised advantages -> token log-probs (policy, old policy when epochs > 1,
    reference when beta > 0) -> clipped policy loss + beta * KL -> clipped gradient step(s)
    -> push weights to the engine -> metrics; periodic evaluation and checkpoints.

Where this differs from the DeepSeekMath GRPO paper (Shao et al., 2024), and why:
- Loss aggregation is an option (`algorithm.loss_agg`). The default `token_mean` averages over all
  tokens of the batch (DAPO) instead of per sequence first (`seq_mean_token_mean`, the paper),
  which gives long wrong answers as much weight per token as short ones.
- The clip range may be asymmetric (`clip_high` > `clip_low`, DAPO's clip-higher).
- Advantages may skip the std division (`adv_scale=none`, Dr. GRPO) or use the batch std.
- The KL term uses the k3 estimator by default, as the paper does, but k1/k2 are options, and
  beta = 0 drops the reference model entirely (no extra forward pass).
- The reference model stays frozen for the whole run (the paper's iterative variant refreshes it).
- Rewards come from verifiers, not a learned reward model.
- Each of the `epochs` passes over a batch is one optimizer step on the whole batch (gradient
  accumulation over micro-batches), rather than shuffled mini-batches.
- Log-probs are taken at the sampling temperature (logits / T), matching what the engine sampled.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grpo import checkpoint
from grpo.advantages import SCALES, group_advantages
from grpo.kl import ESTIMATORS
from grpo.losses import AGGREGATIONS, policy_loss
from grpo.modeling import disable_dropout, load_model, load_tokenizer, pack, pick_device, token_logprobs
from grpo.rollout.base import SamplingParams
from grpo.tracking import build_logger
from grpo.tasks.base import TaskError, build_task, render_prompt
from grpo.verifiers.compose import RewardFunction

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value that cannot work; raised before training starts."""


def check_algorithm(a: dict[str, Any]) -> None:
    for key, allowed in (("adv_scale", SCALES), ("loss_agg", AGGREGATIONS), ("kl_estimator", ESTIMATORS)):
        if a[key] not in allowed:
            raise ConfigError(f"algorithm.{key}={a[key]!r}: use one of {', '.join(allowed)}")


def check_numbers(cfg: dict[str, Any]) -> None:
    """Values that must be numbers in range, checked before any model is loaded."""
    rules = [("trainer", "prompts_per_step", int, 1), ("trainer", "max_steps", int, 0), ("trainer", "eval_every", int, 0),
             ("trainer", "save_every", int, 0), ("trainer", "micro_batch_size", int, 0), ("trainer", "eval_size", int, 1),
             ("rollout", "max_new_tokens", int, 1), ("algorithm", "group_size", int, 1), ("algorithm", "epochs", int, 1),
             ("algorithm", "beta", float, 0), ("algorithm", "clip_low", float, 0), ("algorithm", "clip_high", float, 0),
             ("algorithm", "tis_cap", float, 0), ("optim", "lr", float, 0), ("rollout", "temperature", float, 0)]
    for group, key, kind, low in rules:
        v = cfg[group].get(key, low)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
        if not ok or v < low:
            what = "a whole number" if kind is int else "a number"
            raise ConfigError(f"{group}.{key}={v!r}: must be {what} >= {low}")
    if cfg["rollout"]["temperature"] <= 0 and cfg["algorithm"]["group_size"] > 1:
        raise ConfigError("rollout.temperature=0 makes the G samples of a prompt identical (no learning signal): "
                          "use a temperature > 0 for training")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(rcfg: dict[str, Any], model, tokenizer, model_cfg: dict[str, Any]):
    engine = rcfg.get("engine", "hf")
    if engine == "hf":
        from grpo.rollout.hf import HFEngine

        return HFEngine(model, tokenizer, batch_size=rcfg.get("batch_size", 256))
    if engine == "vllm":
        try:
            from grpo.rollout.vllm import VLLMEngine  # the only place vllm is imported
        except ImportError as e:  # its message says how to install vLLM
            raise ConfigError(str(e)) from e
        return VLLMEngine(model, tokenizer, model_cfg, rcfg)
    raise ConfigError(f"rollout.engine={engine!r}: use hf or vllm")


def sampling_params(rcfg: dict[str, Any], greedy: bool = False) -> SamplingParams:
    return SamplingParams(
        temperature=0.0 if greedy else float(rcfg["temperature"]), top_p=float(rcfg["top_p"]),
        top_k=int(rcfg["top_k"]), max_new_tokens=int(rcfg["max_new_tokens"]), stop=list(rcfg.get("stop") or []))


def encode_prompts(tokenizer, samples, system_prompt: str | None = None) -> list[list[int]]:
    """Prompt token ids as the engines see them: chat template applied, no extra special tokens."""
    return [tokenizer(render_prompt(tokenizer, s, system_prompt), add_special_tokens=False)["input_ids"]
            for s in samples]


class Trainer:
    def __init__(self, cfg: dict[str, Any], run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.t, self.a, self.r = cfg["trainer"], cfg["algorithm"], cfg["rollout"]
        check_numbers(cfg)
        check_algorithm(self.a)
        if "verifiers" not in cfg["task"]:
            raise ConfigError("task.verifiers is not set: name at least one verifier, e.g. task.verifiers=[math]")
        self.G, self.B = int(self.a["group_size"]), int(self.t["prompts_per_step"])
        seed_everything(self.t["seed"])

        # Everything that can fail on user input is built before the first step.
        self.task = build_task(cfg["task"], seed=self.t["seed"])
        self.reward_fn = RewardFunction(cfg["task"]["verifiers"], **cfg.get("verifier", {}))
        self.eval_set = self.task.eval_samples()[: self.t["eval_size"]]
        if not self.eval_set:
            raise TaskError("the task holds out no samples for evaluation")

        mcfg = cfg["model"]
        self.device = pick_device(mcfg.get("device", "auto"))
        self.ckpt = checkpoint.find(self.run_dir, self.t.get("resume"))
        if not self.ckpt and (self.run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"{self.run_dir} already holds a run: continue it with trainer.resume=true, "
                              "or start a new one in another hydra.run.dir")
        policy_src = str(self.ckpt / "model") if self.ckpt else mcfg["path"]
        self.tok = load_tokenizer(mcfg["path"])
        self.policy = load_model(policy_src, mcfg["dtype"], mcfg.get("gradient_checkpointing", False), self.device)
        disable_dropout(self.policy)
        self.policy.train()
        self.ref = None
        if self.a["beta"] > 0:
            self.ref = load_model(mcfg["path"], mcfg["dtype"], device=self.device).eval().requires_grad_(False)
        self.engine = build_engine(self.r, self.policy, self.tok, mcfg)

        o = cfg["optim"]
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=o["lr"], betas=tuple(o["betas"]),
                                     weight_decay=o["weight_decay"])
        warm = max(1, int(o["warmup_steps"]))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))
        self.step, self.data_pos = 0, 0
        if self.ckpt:
            st = checkpoint.load_state(self.ckpt)
            self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
            self.step, self.data_pos = st["step"], st["data_pos"]
            checkpoint.set_rng_state(st["rng"])
            log.info("resumed from %s at step %d", self.ckpt, self.step)
        self.logger = build_logger(cfg["logger"], self.run_dir, cfg, self.step if self.ckpt else None)
        self.sampling = sampling_params(self.r)

    # ---- one step -------------------------------------------------------------------------
    def encode_prompts(self, samples) -> list[list[int]]:
        return encode_prompts(self.tok, samples, self.t.get("system_prompt"))

    def logprobs(self, model, batch, rows: slice, T: int, with_entropy: bool = False):
        ids, attn, pos = (x[rows] for x in batch[:3])
        return token_logprobs(model, ids, attn, pos, T, self.sampling.temperature or 1.0, with_entropy)

    def micro_batches(self, N: int) -> list[slice]:
        mb = int(self.t.get("micro_batch_size") or 0) or N
        return [slice(i, min(N, i + mb)) for i in range(0, N, mb)]

    def train_step(self) -> dict[str, float]:
        t0 = time.time()
        samples = [self.task.train_sample(self.data_pos + i) for i in range(self.B)]
        self.data_pos += self.B
        ro = self.engine.generate(self.encode_prompts(samples), self.G, self.sampling)
        t1 = time.time()
        fields = [s.fields() for s in samples for _ in range(self.G)]  # [N] prompt-major, like ro
        rewards, _, rmetrics = self.reward_fn(ro.texts, fields)
        rewards_t = torch.tensor(rewards)  # [N]
        adv = group_advantages(rewards_t, self.G, self.a["adv_scale"], self.a["adv_eps"]).to(self.device)  # [N]
        t2 = time.time()

        batch = [x.to(self.device) for x in pack(ro.prompt_ids, ro.completion_ids, self.tok.pad_token_id)]
        mask = batch[4]  # [N, T]
        N, T = mask.shape
        n_tok = mask.sum().clamp(min=1)
        mbs = self.micro_batches(N)
        with torch.no_grad():
            old_logp = torch.cat([self.logprobs(self.policy, batch, s, T) for s in mbs]) if self.a["epochs"] > 1 else None
            ref_logp = torch.cat([self.logprobs(self.ref, batch, s, T) for s in mbs]) if self.ref is not None else None

        # The engine's sampling log-probs of the sampled tokens, [N, T] like the trainer's.
        eng = torch.zeros(N, T, device=self.device)
        for i, lp in enumerate(ro.logprobs):
            eng[i, :len(lp)] = torch.tensor(lp)
        tis_cap = float(self.a.get("tis_cap") or 0.0)

        agg = self.a["loss_agg"]
        first_logp = torch.zeros(N, T, device=self.device)
        acc: dict[str, float] = {}
        last_epoch = int(self.a["epochs"]) - 1
        for epoch in range(last_epoch + 1):
            self.opt.zero_grad(set_to_none=True)
            for s in mbs:
                logp, ent = self.logprobs(self.policy, batch, s, T, with_entropy=True)  # [n, T]
                old = old_logp[s] if old_logp is not None else logp.detach()
                # Truncated importance sampling: reweight tokens the engine sampled with a slightly
                # different distribution than the trainer's (off when tis_cap = 0).
                tis = (old - eng[s]).exp().clamp(max=tis_cap) if tis_cap > 0 else None
                loss, m = policy_loss(
                    logp, old, adv[s], mask[s], self.a["clip_low"], self.a["clip_high"],
                    ref_logp[s] if ref_logp is not None else None, self.a["beta"], agg,
                    max_len=self.sampling.max_new_tokens, kl_estimator=self.a["kl_estimator"], is_weights=tis)
                # Weight each micro-batch so the sum equals the loss over the whole batch.
                share = mask[s].sum() / n_tok if agg == "token_mean" else (s.stop - s.start) / N
                (loss * share).backward()
                w = float(mask[s].sum() / n_tok)
                if epoch == last_epoch:  # clipping only happens after the first update
                    for k, v in m.items():
                        if k.startswith(("clip/", "ratio/")):
                            acc[k] = acc.get(k, 0.0) + w * v
                if epoch == 0:
                    first_logp[s] = logp.detach()
                    acc["kl"] = acc.get("kl", 0.0) + w * m["kl"]
                    acc["entropy"] = acc.get("entropy", 0.0) + float((ent * mask[s]).sum() / n_tok)
                    acc["loss"] = acc.get("loss", 0.0) + float(loss.detach()) * float(share)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg["optim"]["max_grad_norm"])
            lr = self.sched.get_last_lr()[0]  # the rate this step uses
            self.opt.step()
            self.sched.step()
        self.engine.update_weights(self.policy.named_parameters())
        t3 = time.time()

        # The engine's log-probs against the trainer's for the same tokens, before the update.
        gap = (eng - first_logp).abs() * mask  # [N, T]
        groups = rewards_t.view(-1, self.G)
        lengths = mask.sum(1).float()
        return {
            "reward/mean": float(rewards_t.mean()),
            "reward/std": float(rewards_t.std()) if N > 1 else 0.0,
            **rmetrics,
            "groups/zero_std_frac": float((groups.std(1) == 0).float().mean()) if self.G > 1 else 1.0,
            **acc,
            "grad_norm": float(grad_norm),
            "lr": lr,
            "completion/len_mean": float(lengths.mean()),
            "completion/len_max": float(lengths.max()),
            "completion/truncated_frac": 1.0 - sum(ro.finished) / N,
            "rollout/logprob_abs_diff/mean": float(gap.sum() / n_tok),
            "rollout/logprob_abs_diff/max": float(gap.max()),
            "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2, "time/step": t3 - t0,
        }

    # ---- evaluation ----------------------------------------------------------------------
    def evaluate(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Mean reward of one sampled completion per held-out prompt, and greedy pass@1.

        Runs under its own RNG fork, so evaluating more or less often never changes training.
        """
        prompts = self.encode_prompts(self.eval_set)
        fields = [s.fields() for s in self.eval_set]
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.manual_seed(self.t["seed"] + 1_000_003 * (self.step + 1))
            sampled = self.engine.generate(prompts, 1, self.sampling)
            greedy = self.engine.generate(prompts, 1, sampling_params(self.r, greedy=True))
        rs, _, per_verifier = self.reward_fn(sampled.texts, fields)
        rg, _, _ = self.reward_fn(greedy.texts, fields)
        metrics = {
            "eval/reward/mean": sum(rs) / len(rs),
            **{f"eval/{k}": v for k, v in per_verifier.items() if k.startswith(("reward/", "verifier/"))},
            "eval/greedy/reward/mean": sum(rg) / len(rg),
            "eval/pass@1": sum(r >= 1.0 for r in rg) / len(rg),
            "eval/completion/len_mean": sum(len(c) for c in sampled.completion_ids) / len(rs),
        }
        k = int(self.t.get("log_samples", 0))
        table = [{"prompt": s.prompt or str(s.messages), "answer": str(s.answer if s.answer is not None else s.tests), "completion": c, "reward": r}
                 for s, c, r in list(zip(self.eval_set, sampled.texts, rs))[:k]]
        return metrics, table

    def run_eval(self) -> dict[str, float]:
        t0 = time.time()
        metrics, table = self.evaluate()
        metrics["time/eval"] = time.time() - t0
        self.logger.log(metrics, self.step)
        self.logger.log_samples(table, self.step)
        return metrics

    def save(self) -> Path:
        state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "data_pos": self.data_pos}
        return checkpoint.save(self.run_dir, self.step, self.policy, self.tok, state, self.t.get("keep_checkpoints", 2))

    # ---- the loop ------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        max_steps, eval_every, save_every = self.t["max_steps"], self.t["eval_every"], self.t["save_every"]
        first_eval = last_eval = None
        if not self.ckpt:
            first_eval = last_eval = self.run_eval()
        bar = tqdm(total=max_steps, initial=self.step, desc="grpo", unit="step", dynamic_ncols=True)
        last_ckpt = self.ckpt  # a resumed run with nothing left to do still names its checkpoint
        try:
            while self.step < max_steps:
                metrics = self.train_step()
                self.step += 1
                self.logger.log(metrics, self.step)
                post = {"reward": f"{metrics['reward/mean']:.3f}"}
                if (eval_every and self.step % eval_every == 0) or self.step == max_steps:
                    last_eval = self.run_eval()
                    first_eval = first_eval or last_eval
                if last_eval:
                    post["eval"] = f"{last_eval['eval/reward/mean']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
                if (save_every and self.step % save_every == 0) or self.step == max_steps:
                    last_ckpt = self.save()
        finally:
            bar.close()
            self.logger.close()
            self.reward_fn.close()
            self.engine.close()
        return {"run_dir": str(self.run_dir), "checkpoint": str(last_ckpt) if last_ckpt else None,
                "first_eval": first_eval, "last_eval": last_eval, "steps": self.step}


def train(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    trainer = Trainer(cfg, run_dir)
    summary = trainer.fit()
    fe, le = summary["first_eval"], summary["last_eval"]
    lines = [f"run dir:     {summary['run_dir']}", f"metrics:     {Path(summary['run_dir']) / 'metrics.jsonl'}",
             f"checkpoint:  {summary['checkpoint']}"]
    if fe and le:
        lines.append(f"eval reward: {fe['eval/reward/mean']:.3f} -> {le['eval/reward/mean']:.3f}   "
                     f"greedy pass@1: {fe['eval/pass@1']:.3f} -> {le['eval/pass@1']:.3f}")
    print("\n".join(["", "done after %d steps" % summary["steps"], *lines]))
    return summary
