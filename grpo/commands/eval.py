"""`grpo eval`: sample k completions per held-out prompt and report mean reward, pass@k and maj@k.

    grpo eval model.path=runs/<run>/checkpoints/step_000120/model task=gsm8k eval.samples=8

It samples and scores through `sample_and_score` (grpo/parts/evaluation.py), the one evaluation path
that every trainer's periodic evaluation (`policy_eval`) uses too, so a score here is the score the
training run's evaluation would give; the metrics are defined there. It writes one JSON line per
completion and a summary JSON next to it, and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from grpo.parts import config as C
from grpo.parts.seeding import seed_everything
from grpo.parts.config import ConfigError
from grpo.parts.evaluation import k_values, sample_and_score, summarize
from grpo.parts.logs import where
from grpo.parts.modeling import eos_ids, load_model, load_tokenizer, pick_device, resolve_model_dir
from grpo.parts.reward_sources import build_rewards_from
from grpo.parts.rollout import build_engine_from, encode_prompts, sampling_params, tools_of
from grpo.parts.rollout.multiturn import context_tokens, conversation_metrics, environment, with_env
from grpo.tasks.base import TaskError, build_task


def extracted_answers(infos: list[dict[str, Any]]) -> tuple[str | None, list[Any] | None]:
    """The first verifier (in config order) whose infos carry an `extracted` answer, and those answers.

    infos[j] maps each verifier's label to its info for completion j, in the order of task.verifiers.
    """
    names = list(dict.fromkeys(name for i in infos for name in i))
    for name in names:
        if any(isinstance(i.get(name), dict) and "extracted" in i[name] for i in infos):
            return name, [(i.get(name) or {}).get("extracted") for i in infos]
    return None, None


def format_table(s: dict[str, Any]) -> str:
    lines = [f"grpo eval: {s['model']} on {s['task']}: {s['prompts']} prompts x {s['samples']} samples "
             f"(temperature {s['temperature']})",
             f"  reward/mean  {s['reward/mean']:.4f}"]
    if not s.get("passes", True):  # a score (prefs_rule): its share of 1s reads like a failure
        lines.append("  pass@k, maj@k: none (the verifiers give a score, not a pass)")
    else:
        lines.append(f"  {'k':>4}  {'pass@k':>8}  {'maj@k':>8}")
        for k in k_values(s["samples"]):
            maj = s.get(f"maj@{k}")
            lines.append(f"  {k:>4}  {s[f'pass@{k}']:>8.4f}  {'-' if maj is None else f'{maj:.4f}':>8}")
        if s.get("answers_from") is None:
            lines.append("  maj@k: no verifier reports extracted answers")
    lines.append(f"  completion length {s['completion/len_mean']:.1f} tokens, "
                 f"{s['completion/truncated_frac']:.1%} cut at max_new_tokens")
    lines += where(("run dir", s["run_dir"]), ("samples", s["output"]), ("summary", s["summary"]))
    return "\n".join(lines)


def run_eval(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    cfg = C.parse(C.EvalConfig, raw)
    opts, trainer, model_cfg = cfg.eval, cfg.trainer, cfg.model
    n = opts.samples
    temperature = cfg.rollout.temperature if opts.temperature is None else opts.temperature
    if temperature <= 0 and n > 1:
        raise ConfigError(f"eval.temperature=0 is greedy decoding: all {n} samples would be the same; "
                          "use eval.samples=1 or a temperature > 0")
    if not cfg.task.get("verifiers"):
        raise ConfigError("task.verifiers is not set: name at least one verifier, e.g. task.verifiers=[math]")
    cfg.rollout.temperature = temperature  # the engine (vLLM's log-prob mode) samples at the eval temperature
    seed_everything(trainer.seed)

    task = build_task(cfg.task, seed=trainer.seed)
    samples = task.eval_samples()
    if opts.max_prompts:
        samples = samples[: opts.max_prompts]
    if not samples:
        raise TaskError(f"task {cfg.task.get('name')!r} holds out no samples to evaluate")
    model_dir = resolve_model_dir(model_cfg.path)
    tok = load_tokenizer(model_dir)
    device = pick_device(model_cfg.device)
    _, verifiers, _ = build_rewards_from(cfg.task, cfg.verifier, None, tok, device)
    passes = bool(getattr(verifiers, "passes", True))  # false: a score, pass@k and maj@k are not shown
    engine = None
    try:
        model = load_model(model_dir, model_cfg.dtype, device=device).eval()
        env, caps = environment(cfg.task.get("env"))
        sized = dataclasses.replace(cfg.rollout, max_new_tokens=context_tokens(env, caps, cfg.rollout.max_new_tokens))
        engine = build_engine_from(sized, model, tok, model_dir, model_cfg.dtype, model_cfg.device,
                                   lambda: samples, trainer.system_prompt, tools=getattr(env, "tools", None))
        engine = with_env(engine, env, caps, tok, eos_ids(tok, model), trainer.system_prompt)  # multi-turn: conversations
        sp = sampling_params(cfg.rollout, greedy=temperature <= 0)
        t0 = time.time()
        seed_everything(trainer.seed)  # the samples depend on the seed, not on what loading drew
        prompts = encode_prompts(tok, samples, trainer.system_prompt, tools_of(engine))
        ro, scored = sample_and_score(engine, prompts, samples, n, sp, verifiers, bar="eval")
        rewards, infos, rmetrics = scored.rewards, scored.infos, scored.metrics
        t2 = time.time()
    finally:
        verifiers.close()
        if engine is not None:
            engine.close()
            if hasattr(engine, "env"):  # a multi-turn engine: then the engine it holds conversations through
                engine.engine.close()
    source, answers = extracted_answers(infos)

    P = len(samples)
    grid = [rewards[i * n:(i + 1) * n] for i in range(P)]  # [P][n]
    agrid = [answers[i * n:(i + 1) * n] for i in range(P)] if answers is not None else None
    output = Path(opts.output or Path(run_dir) / "eval_samples.jsonl")
    summary_path = output.with_name(output.stem + ".summary.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as f:
        for j, (text, ids, fin, r, info) in enumerate(zip(ro.texts, ro.completion_ids, ro.finished, rewards, infos)):
            s = samples[j // n]
            rec = {"prompt_index": j // n, "sample_index": j % n,
                   "prompt": s.prompt if s.messages is None else s.messages, "answer": s.answer,
                   "completion": text, "reward": r, "correct": r >= 1.0, "finished": fin,
                   "completion_tokens": len(ids), "info": info}
            if ro.conversations is not None:  # the whole conversation, and why it ended
                conv = ro.conversations[j]
                rec.update(conversation=conv["messages"][len(s.chat(trainer.system_prompt)):], end=conv["reason"],
                           turns=conv["turns"], tool_calls=conv["tool_calls"])
            f.write(json.dumps(rec, default=str) + "\n")

    summary = {
        "model": str(model_cfg.path), "model_dir": model_dir, "task": cfg.task.get("name"),
        "prompts": P, "samples": n, "temperature": temperature,
        "max_new_tokens": cfg.rollout.max_new_tokens, "engine": cfg.rollout.engine, "seed": trainer.seed,
        **summarize(grid, agrid),
        "passes": passes,
        "answers_from": source,
        **{k: v for k, v in rmetrics.items() if k.startswith(("reward/", "verifier/"))},
        "completion/len_mean": sum(len(c) for c in ro.completion_ids) / len(ro.completion_ids),
        "completion/truncated_frac": 1.0 - sum(ro.finished) / len(ro.finished),
        **(conversation_metrics(ro.conversations) if ro.conversations is not None else {}),
        "time/generate_and_score": t2 - t0,
        "output": str(output), "summary": str(summary_path), "run_dir": str(run_dir),
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary), flush=True)
    return summary
