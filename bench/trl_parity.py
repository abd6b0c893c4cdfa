"""Our policy losses and advantages against TRL 1.16's GRPOTrainer (and RLOOTrainer) on one batch.

    .venv-bench/bin/python bench/trl_parity.py        # ~10 s on 2 cores; exit 1 if a row fails

What it proves: wherever TRL 1.16 offers a variant that this project also has (its GRPO loss types
grpo / bnpo / dapo / dr_grpo / cispo / luspo, clip-higher through epsilon_high, GSPO through
importance_sampling_level="sequence", beta > 0 with the k3 KL, gradient accumulation, reward scaling
group / batch / none, RLOO's leave-one-out advantages), `grpo.algorithm.losses.policy_loss` and
`grpo.algorithm.advantages` give the same loss (|diff| <= 1e-5) and the same gradient with respect to
the policy log-probs (max |diff| <= 1e-5) as TRL's own code, on one fixed random batch. The rows TRL has
and we do not (and the reverse) are listed by name, never faked.

How TRL is called. A real GRPOTrainer is built offline from a GRPOConfig per variant, on the shipped
0.9M-parameter embedded model (grpo/data/embedded_model), and its unmodified `compute_loss` runs. Only
its log-prob function `_get_per_token_logps_and_entropies` is replaced on the instance, to return the
prepared log-probs (a leaf tensor whose .grad we read) instead of a model forward: that isolates the
loss arithmetic, which is what is compared. old_per_token_logps, ref_per_token_logps, advantages,
completion_mask and num_items_in_batch go in as the `inputs` dict TRL's generation step would build.
The training loop sets `current_gradient_accumulation_steps` and puts the model in train mode; we do
both by hand. For the advantages, TRL's `_generate_and_score_completions` runs unmodified except for
`_generate` (returns fixed token ids) and `_calculate_rewards` (returns the prepared rewards), and the
advantages it returns are compared with ours. RLOO is a separate trainer in TRL 1.16 (RLOOTrainer);
its `_generate_and_score_completions` runs the same way (with a real forward of the tiny model for its
old log-probs, which do not enter the advantages when beta = 0).

The batch: N = 12 rows (B = 3 prompts x G = 4), T = 10 completion slots, ragged lengths with one empty
row (as mask_truncated_completions leaves them), float32; logp = old_logp + SCALES[row] (1e-5 to 0.4)
times noise, so some token ratios and some sequence ratios fall inside and some outside the clip ranges; ref_logp = old_logp + noise; padding slots hold finite log-prob-like values (as a model
forward gives) that must not matter; advantages = group-normalised rewards with one all-equal group.
With several processes, TRL's dapo/cispo divide num_items_in_batch by num_processes, as our train.py
divides the step's token count by the world size; this runs one process, so that part is not exercised.
Two mappings to know: TRL's cispo `epsilon_high` is the cap itself (5.0 = ours clip_high=4.0, clip_low=1.0,
as TRL has no lower bound), and TRL 1.16 defaults use_bias_correction_kl=True (KL term r_t * k3_t), so the
matching rows set it False; the default is shown among the rows that differ by design.
The script only runs TRL's code and ours; it copies no TRL code.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(k, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from grpo.algorithm.advantages import group_advantages, rloo_advantages  # noqa: E402
from grpo.algorithm.losses import policy_loss  # noqa: E402

TOL = 1e-5
N, G, T, MAX_COMPLETION = 12, 4, 10, 16  # rows, group size, completion slots, TRL's max_completion_length
LENGTHS = [10, 3, 7, 0, 10, 5, 1, 8, 9, 2, 6, 4]  # real tokens per row; row 3 is empty
REWARDS = [1.0, 0.0, 0.5, 1.0, 0.2, 0.2, 0.2, 0.2, 0.0, 0.9, 0.3, 1.0]  # group 1 all equal: advantage 0
# How far each row's policy is from the sampling policy (logp - old_logp = scale * noise): the rows at
# 1e-5 stay inside GSPO's clip range, the rows at 0.15-0.4 leave PPO's, on both sides of 1.
SCALES = [0.4, 0.35, 1e-5, 0.3, 0.3, 1e-4, 0.05, 0.2, 0.3, 2e-5, 0.15, 0.25]


def make_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()  # [N, T]
    old = torch.log(torch.rand(N, T, generator=g) * 0.9 + 0.05)  # [N, T] log-probs of sampled tokens
    scale = torch.tensor(SCALES)  # [N]
    logp = old + scale[:, None] * torch.randn(N, T, generator=g)  # [N, T]
    ref = old + 0.3 * torch.randn(N, T, generator=g)  # [N, T]
    pad = ~mask.bool()  # padding: other finite values, as a forward would give
    for t in (old, logp, ref):
        t[pad] = torch.log(torch.rand(int(pad.sum()), generator=g) * 0.9 + 0.05)
    rewards = torch.tensor(REWARDS)
    adv = group_advantages(rewards, G, "group", 1e-4)  # [N]
    return dict(mask=mask, old=old, logp=logp, ref=ref, rewards=rewards, adv=adv)


# ---- TRL ---------------------------------------------------------------------------------------
def quiet() -> None:
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("trl", "transformers", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def model_path() -> str:
    from grpo.parts.modeling import resolve_model_path

    return resolve_model_path("embedded")


def grpo_trainer(tmp: str, per_device: int = N, ga: int = 1, **cfg):
    """A real TRL GRPOTrainer on the tiny embedded model, with the given GRPOConfig fields."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=tmp, use_cpu=True, bf16=False, fp16=False, report_to="none", disable_tqdm=True,
        model_init_kwargs={"dtype": "float32"}, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=ga, num_generations=G, max_completion_length=MAX_COMPLETION,
        logging_steps=1, save_strategy="no", eval_strategy="no", **cfg)
    data = Dataset.from_list([{"prompt": "hi"}] * N)
    trainer = GRPOTrainer(model=model_path(), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=data)
    trainer.model.train()  # as the training loop does
    trainer.current_gradient_accumulation_steps = ga  # set by the training loop per accumulation window
    return trainer


def trl_loss(trainer, b: dict, rows: slice, beta: bool) -> tuple[float, torch.Tensor]:
    """TRL's compute_loss on rows `rows` of the batch; returns (loss, d loss / d logp [n, T])."""
    lp = b["logp"][rows].clone().requires_grad_(True)  # [n, T]
    n = lp.shape[0]
    trainer._get_per_token_logps_and_entropies = lambda model, *a, **k: (lp, torch.zeros_like(lp), None)
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, T, dtype=torch.long), "completion_mask": b["mask"][rows],
        "advantages": b["adv"][rows], "old_per_token_logps": b["old"][rows],
        "num_items_in_batch": b["mask"].sum(),  # the whole generation batch's tokens, as TRL computes it
    }
    if beta:
        inputs["ref_per_token_logps"] = b["ref"][rows]
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return float(loss), lp.grad


# ---- ours --------------------------------------------------------------------------------------
def our_loss(b: dict, rows: slice, **kw) -> tuple[float, torch.Tensor, dict]:
    lp = b["logp"][rows].clone().requires_grad_(True)
    beta = kw.get("beta", 0.0)
    loss, metrics = policy_loss(lp, b["old"][rows], b["adv"][rows], b["mask"][rows],
                                ref_logp=b["ref"][rows] if beta else None, kl_estimator="k3", **kw)
    loss.backward()
    return float(loss), lp.grad, metrics


# The variants both have: (name, TRL GRPOConfig fields, our policy_loss arguments, micro-batches).
# With micro-batches (gradient accumulation), both losses are summed over the micro-batches and the
# gradients concatenated; ours gets the whole step's normaliser (num_tokens / num_rows), as train.py passes it.
ALL_TOK = sum(LENGTHS)
CASES = [
    ("grpo", dict(loss_type="grpo"),
     dict(agg="seq_mean_token_mean", clip_low=0.2, clip_high=0.2), 1),
    ("bnpo", dict(loss_type="bnpo"),
     dict(agg="token_mean", clip_low=0.2, clip_high=0.2), 1),
    ("dapo", dict(loss_type="dapo"),
     dict(agg="token_mean", clip_low=0.2, clip_high=0.2), 1),
    ("dr_grpo", dict(loss_type="dr_grpo"),
     dict(agg="seq_mean_token_sum_norm", max_len=MAX_COMPLETION, clip_low=0.2, clip_high=0.2), 1),
    ("clip-higher", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28),
     dict(agg="token_mean", clip_low=0.2, clip_high=0.28), 1),
    ("k3 KL, beta", dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False),
     dict(agg="token_mean", clip_low=0.2, clip_high=0.2, beta=0.04), 1),
    ("k3 KL, grpo", dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False),
     dict(agg="seq_mean_token_mean", clip_low=0.2, clip_high=0.2, beta=0.04), 1),
    ("GSPO", dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
     dict(agg="seq_mean_token_mean", is_level="sequence", clip_low=3e-4, clip_high=4e-4), 1),
    ("GSPO, dapo agg", dict(loss_type="dapo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
     dict(agg="token_mean", is_level="sequence", clip_low=3e-4, clip_high=4e-4), 1),
    ("GSPO + KL", dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4,
                       beta=0.04, use_bias_correction_kl=False),
     dict(agg="seq_mean_token_mean", is_level="sequence", clip_low=3e-4, clip_high=4e-4, beta=0.04), 1),
    ("LUSPO", dict(loss_type="luspo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
     dict(agg="seq_mean_token_sum", is_level="sequence", clip_low=3e-4, clip_high=4e-4), 1),
    ("luspo, token level", dict(loss_type="luspo"),
     dict(agg="seq_mean_token_sum", clip_low=0.2, clip_high=0.2), 1),
    ("CISPO", dict(loss_type="cispo", epsilon_high=5.0),
     dict(objective="cispo", agg="token_mean", clip_low=1.0, clip_high=4.0), 1),
    ("CISPO, cap bites", dict(loss_type="cispo", epsilon_high=1.1),
     dict(objective="cispo", agg="token_mean", clip_low=1.0, clip_high=0.1), 1),
    ("grpo, 2 micro-batches", dict(loss_type="grpo"),
     dict(agg="seq_mean_token_mean", clip_low=0.2, clip_high=0.2, num_rows=N), 2),
    ("dapo, 2 micro-batches", dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False),
     dict(agg="token_mean", clip_low=0.2, clip_high=0.2, beta=0.04, num_tokens=ALL_TOK), 2),
    ("dr_grpo, 2 micro-batches", dict(loss_type="dr_grpo"),
     dict(agg="seq_mean_token_sum_norm", max_len=MAX_COMPLETION, clip_low=0.2, clip_high=0.2, num_rows=N), 2),
]
# TRL settings with a near setting of ours that is deliberately not the same: shown with their difference,
# not counted as a failure.
DIFFERENT = [
    ("KL x ratio (TRL default)", dict(loss_type="dapo", beta=0.04),
     dict(agg="token_mean", clip_low=0.2, clip_high=0.2, beta=0.04), 1,
     "TRL 1.16 defaults use_bias_correction_kl=True: its KL term is r_t * k3_t (DeepSeek-V3.2); ours is k3_t"),
    ("bnpo, 2 micro-batches", dict(loss_type="bnpo"),
     dict(agg="token_mean", clip_low=0.2, clip_high=0.2, num_tokens=ALL_TOK), 2,
     "TRL bnpo divides each micro-batch by its own token count / accumulation steps; ours by the step's count"),
    ("two-sided clip (delta)", dict(loss_type="dapo", delta=1.15),
     dict(agg="token_mean", clip_low=0.2, clip_high=0.2), 1,
     "INTELLECT-2 caps the unclipped ratio at delta (bites where A < 0 and r > delta): not in ours"),
]
NOT_IN_OURS = [
    ("loss_type='sapo'", "soft sigmoid gate instead of the clip (SAPO)"),
    ("loss_type='vespo'", "Gamma weighting of the sequence ratio (VESPO)"),
    ("off_policy_mask_threshold", "DeepSeek-V3.2 off-policy sequence mask: drops A < 0 rows whose mean KL to "
                                  "the sampler exceeds delta (ours: mismatch_mask drops by the ratio, any A)"),
    ("top_entropy_quantile < 1", "loss only on the highest-entropy tokens"),
    ("entropy_coef", "entropy bonus (static or adaptive)"),
    ("multi_objective_aggregation='normalize_then_sum'", "GDPO: normalise each reward function, then sum"),
    ("RLOOTrainer's loss", "one ratio per sequence exp(sum_t(logp - old)), the product of token ratios (ours: "
                           "GSPO's geometric mean); only its advantages are compared (above)"),
    ("vllm_importance_sampling_correction", "TRL computes it from vLLM's log-probs only (ours: tis_cap, "
                                            "mismatch_mask): not reachable without vLLM, not compared"),
]
NOT_IN_TRL = [
    ("is_level='sequence_token'", "GSPO-token: TRL 1.16 has importance_sampling_level token and sequence only"),
    ("loss=cispo with clip_low < 1", "TRL's cispo caps r from above only (epsilon_high is the cap itself, "
                                     "ScaleRL's eps_max); MiniMax-M1's lower bound 1 - eps_low has no TRL setting"),
    ("loss_agg=seq_mean_token_sum at token level", "same arithmetic as TRL luspo at token level (row above)"),
    ("adv_estimator=reinforce_pp", "REINFORCE++ (TRL 1.16 has no such option in GRPO)"),
]


def fmt_cfg(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


def run_case(tmp: str, b: dict, trl_cfg: dict, ours: dict, micro: int):
    trainer = grpo_trainer(tmp, per_device=N // micro, ga=micro, **trl_cfg)
    beta = trl_cfg.get("beta", 0.0) != 0.0
    parts = [slice(i * N // micro, (i + 1) * N // micro) for i in range(micro)]
    trl = [trl_loss(trainer, b, s, beta) for s in parts]
    us = [our_loss(b, s, **ours) for s in parts]
    lt, lo = sum(x[0] for x in trl), sum(x[0] for x in us)
    gt, go = torch.cat([x[1] for x in trl]), torch.cat([x[1] for x in us])
    pad_grad = float(go[~b["mask"].bool()].abs().max())
    whole = {k: v for k, v in ours.items() if k not in ("num_tokens", "num_rows")}
    clipped = round(our_loss(b, slice(None), **whole)[2]["clip/frac"] * ALL_TOK)  # tokens whose clip bit
    return lt, lo, abs(lt - lo), float((gt - go).abs().max()), pad_grad, clipped


def table(header: list[str], rows: list[list[str]]) -> None:
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(x) for h, x in zip(header, w)))
    print("-+-".join("-" * x for x in w))
    for r in rows:
        print(" | ".join(c.ljust(x) for c, x in zip(r, w)))


def trl_advantages(tmp: str, rewards: torch.Tensor, rloo: bool = False, **cfg) -> torch.Tensor:
    """The advantages TRL's own generation-and-scoring step computes from these rewards."""
    lengths = [max(x, 1) for x in LENGTHS]
    comp_ids = [[5] * n for n in lengths]
    if rloo:
        from datasets import Dataset
        from trl import RLOOConfig, RLOOTrainer

        args = RLOOConfig(output_dir=tmp, use_cpu=True, bf16=False, fp16=False, report_to="none", disable_tqdm=True,
                          model_init_kwargs={"dtype": "float32"}, per_device_train_batch_size=N, num_generations=G,
                          max_completion_length=MAX_COMPLETION, beta=0.0, save_strategy="no", **cfg)
        trainer = RLOOTrainer(model=model_path(), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, train_dataset=Dataset.from_list([{"prompt": "hi"}] * N))
        trainer._generate = lambda prompts: ([[5, 6]] * N, comp_ids, ["x"] * N)
    else:
        trainer = grpo_trainer(tmp, **cfg)
        trainer._generate = lambda prompts: ([[5, 6]] * N, comp_ids, None, ["x"] * N, None, {}, None, None)
    trainer.model.train()
    trainer._calculate_rewards = lambda *a, **k: rewards[:, None].clone()
    out = trainer._generate_and_score_completions([{"prompt": "hi"} for _ in range(N)])
    return out["advantages"].float()


def main() -> int:
    quiet()
    import transformers
    import trl

    b = make_batch()
    fails = 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="trl-parity-") as tmp:
        for name, trl_cfg, ours, micro in CASES:
            lt, lo, d, dg, pg, nc = run_case(tmp, b, trl_cfg, ours, micro)
            ok = d <= TOL and dg <= TOL and pg == 0.0
            fails += not ok
            rows.append([name, fmt_cfg(trl_cfg) + (f" GA={micro}" if micro > 1 else ""), fmt_cfg(ours),
                         f"{nc}", f"{lt:.8f}", f"{lo:.8f}", f"{d:.1e}", f"{dg:.1e}", "pass" if ok else "FAIL"])
        for name, trl_cfg, ours, micro, why in DIFFERENT:
            lt, lo, d, dg, _, nc = run_case(tmp, b, trl_cfg, ours, micro)
            rows.append([name, fmt_cfg(trl_cfg) + (f" GA={micro}" if micro > 1 else ""), fmt_cfg(ours) + " (nearest)",
                         f"{nc}", f"{lt:.8f}", f"{lo:.8f}", f"{d:.1e}", f"{dg:.1e}", "differs by design"])

        adv_rows = []
        for scale in ("group", "batch", "none"):
            a_trl = trl_advantages(tmp, b["rewards"], scale_rewards=scale)
            a_us = group_advantages(b["rewards"], G, scale, 1e-4)
            d = float((a_trl - a_us).abs().max())
            fails += d > TOL
            adv_rows.append([f"scale {scale}", f"GRPOConfig scale_rewards={scale!r}",
                             f"group_advantages(scale={scale!r}, eps=1e-4)", f"{float(a_us.abs().max()):.6f}",
                             f"{d:.1e}", "pass" if d <= TOL else "FAIL"])
        a_trl = trl_advantages(tmp, b["rewards"], rloo=True)
        a_us = rloo_advantages(b["rewards"], G)
        d = float((a_trl - a_us).abs().max())
        fails += d > TOL
        adv_rows.append(["RLOO", "RLOOTrainer normalize_advantages=False beta=0", "rloo_advantages(G)",
                         f"{float(a_us.abs().max()):.6f}", f"{d:.1e}", "pass" if d <= TOL else "FAIL"])

    print(f"TRL {trl.__version__} (GRPOTrainer.compute_loss, RLOOTrainer) vs grpo.algorithm | torch "
          f"{torch.__version__}, transformers {transformers.__version__} | float32, N={N} rows (B={N // G} x G={G}), "
          f"T={T} slots, {ALL_TOK} real tokens, one empty row, max_completion_length={MAX_COMPLETION} | tolerance "
          f"{TOL:g}")
    print()
    print("Policy loss: same batch, same advantages; clipped = real tokens where the clip changed the objective "
          "(ours' clip/frac; cispo: weights capped); dgrad = max |d loss/d logp| difference over all slots (ours' "
          "gradient is also checked to be exactly 0 at padding)")
    table(["variant", "TRL setting", "ours setting", "clipped", "TRL loss", "our loss", "|diff|", "dgrad", "result"],
          rows)
    print()
    print("Advantages: the same rewards through TRL's _generate_and_score_completions and ours (max |A| of ours)")
    table(["variant", "TRL setting", "ours", "max |A|", "max |diff|", "result"], adv_rows)
    print()
    print("In TRL 1.16, not in ours (not compared):")
    for k, v in NOT_IN_OURS:
        print(f"  {k}: {v}")
    print("In ours, not in TRL 1.16:")
    for k, v in NOT_IN_TRL:
        print(f"  {k}: {v}")
    print()
    print(f"{'FAIL' if fails else 'PASS'}: {fails} row(s) beyond {TOL:g}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
