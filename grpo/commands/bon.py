"""`grpo bon`: best-of-N sampling against a reward model (rejection sampling), top to bottom.

For each prompt: N completions from the policy -> the reward model scores each (the verifiers
do when there is no reward model) -> the best one is kept. The kept rows
({"prompt", "completion", ...}) are what `grpo sft data.path=...` trains on, so
`bon.split=train` turns a reward model into SFT data (rejection sampling, as in Llama 2 and
Constitutional AI); `bon.split=eval` (default) measures what best-of-N buys on held-out prompts.

The judge is the reward `grpo train` would use with the same `reward_model` options: the reward
model's squashed score (plus the verifiers' when reward_model.verifier_weight != 0), or the
verifiers' alone with reward_model=none. Reported for k = 1, 2, 4, ..., N (best of the first k
samples, from the same draws):
- judge/mean: the judge's reward of the kept completions;
- rm/mean: the reward model's (normalised) score of the kept completions;
- true/mean: the task's verifiers' score of the kept completions (on the built-in preference
  task, the hidden rule);
- kl: the analytic KL of best-of-k from the policy, log k - (k - 1) / k (Stiennon et al., 2020;
  an upper bound, exact when the k scores have no ties).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from grpo.parts import config as C
from grpo.parts.config import ConfigError
from grpo.parts.evaluation import k_values, sample_and_score
from grpo.parts.logs import where
from grpo.parts.modeling import load_model, load_tokenizer, pick_device, resolve_model_dir
from grpo.parts.reward_sources import RewardInputs, build_rewards_from
from grpo.parts.rollout import build_engine_from, encode_prompts, sampling_params
from grpo.parts.seeding import seed_everything
from grpo.tasks.base import TaskError, build_task


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1) / n, in nats."""
    return math.log(n) - (n - 1) / n


def best_index(scores: list[float], k: int) -> int:
    """Index of the highest of the first k scores (ties: the earliest)."""
    return max(range(k), key=lambda j: (scores[j], -j))


def run_bon(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    cfg = C.parse(C.BonConfig, raw)
    opts, trainer, model_cfg = cfg.bon, cfg.trainer, cfg.model
    if cfg.rollout.temperature <= 0 and opts.n > 1:
        raise ConfigError("rollout.temperature=0 gives N identical samples: use a temperature > 0")
    if not cfg.task.get("verifiers") and not cfg.reward_model.path:
        raise ConfigError("best-of-N needs a judge: set reward_model.path or task.verifiers")
    if cfg.task.get("env"):
        raise ConfigError("grpo bon samples one completion per prompt: a task with task.env (multi-turn) is not "
                          "supported yet; use grpo eval or grpo train on it")
    seed_everything(trainer.seed)
    task = build_task(cfg.task, seed=trainer.seed)
    if opts.split == "eval":
        samples = task.eval_samples()[: opts.prompts]
    else:
        samples = [task.train_sample(i) for i in range(opts.prompts)]
    if not samples:
        raise TaskError(f"task {cfg.task.get('name')!r} has no {opts.split} prompts")
    model_dir = resolve_model_dir(model_cfg.path)
    tok = load_tokenizer(model_dir)
    device = pick_device(model_cfg.device)
    rm = cfg.reward_model
    # The judge is what `grpo train` would reward with the same options: the reward model (squashed),
    # plus the verifiers when reward_model.verifier_weight != 0; the verifiers alone without one.
    judge, verifiers, reward_model = build_rewards_from(cfg.task, cfg.verifier, rm, tok, device, model_cfg.dtype,
                                                        model_dir)
    engine = None
    try:
        policy = load_model(model_dir, model_cfg.dtype, device=device).eval()
        engine = build_engine_from(cfg.rollout, policy, tok, model_dir, model_cfg.dtype, model_cfg.device,
                                   lambda: samples, trainer.system_prompt)
        ro, judged = sample_and_score(engine, encode_prompts(tok, samples, trainer.system_prompt), samples, opts.n,
                                      sampling_params(cfg.rollout), judge, seed=trainer.seed, bar="bon")
        reward = judged.rewards  # [P * n] the judge's reward in [0, 1]
        # Picked by the judge's raw score (the reward model's unsquashed): a clipped reward would tie
        # every score above reward_model.scale at 1 and keep the earliest sample.
        select = judged.raw  # [P * n]
        rm_scores = judged.scores  # [P * n] the reward model's own scores, when there is one
        fields = [s.fields() for s in samples for _ in range(opts.n)]
        true = None
        if verifiers is not None:
            true = judged.rewards if judge is verifiers else verifiers(RewardInputs.from_rollout(ro, fields)).rewards
    finally:
        for part in {id(p): p for p in (judge, verifiers, engine) if p is not None}.values():
            part.close()

    P, n = len(samples), opts.n
    rows, table = [], []
    for k in k_values(n):
        picks = [i * n + best_index(select[i * n:(i + 1) * n], k) for i in range(P)]
        entry = {"k": k, "kl": best_of_n_kl(k), "judge/mean": sum(reward[j] for j in picks) / P}
        if rm_scores is not None:
            entry["rm/mean"] = sum(rm_scores[j] for j in picks) / P
        if true is not None:
            entry["true/mean"] = sum(true[j] for j in picks) / P
        table.append(entry)
        if k == n:
            for i, j in enumerate(picks):
                s = samples[i]
                rows.append({"prompt": s.prompt if s.messages is None else s.messages, "completion": ro.texts[j],
                             "judge_reward": reward[j], "rm_score": None if rm_scores is None else rm_scores[j],
                             "true_score": None if true is None else true[j], "finished": ro.finished[j]})
    output = Path(opts.output or Path(run_dir) / "best_of_n.jsonl")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    summary = {"model": model_cfg.path, "reward_model": rm.path, "task": cfg.task.get("name"), "split": opts.split,
               "prompts": P, "n": n, "temperature": cfg.rollout.temperature, "by_k": table, "output": str(output),
               "run_dir": str(run_dir)}
    summary_path = output.with_name(output.stem + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    judge_name = "reward model" if rm.path else "verifiers"
    print(f"grpo bon: {P} {opts.split} prompts x {n} samples, judged by the {judge_name}")
    print(f"  {'k':>4}  {'KL (nats)':>9}  {'judge':>8}  {'rm score':>8}  {'true':>8}")
    for entry in table:
        rv = f"{entry['rm/mean']:.4f}" if "rm/mean" in entry else "-"
        tv = f"{entry['true/mean']:.4f}" if "true/mean" in entry else "-"
        print(f"  {entry['k']:>4}  {entry['kl']:>9.3f}  {entry['judge/mean']:>8.4f}  {rv:>8}  {tv:>8}")
    print("\n".join(where(("run dir", run_dir), ("rows", f"{output} (for grpo sft)"), ("summary", summary_path))))
    return summary
