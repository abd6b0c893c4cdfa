"""LoRA through peft (model.lora.*): only the adapters train, the reference is the base model with
the adapters off, checkpoints hold the adapters (and merged weights on request), export merges."""

import math

import pytest
import torch

from grpo.parts import config as C
from grpo.parts.batch import batch_logprobs, pack
from grpo.cli import compose_config
from grpo.parts.modeling import AdaptersOff, load_model, load_tokenizer
from grpo.commands.train import build, train, train_step
from grpo.parts.run import Run
from tests.conftest import run_interrupted
from tests.dist_worker import fixed_batch

pytestmark = pytest.mark.slow
TOY = "task.verifiers=[{_target_: tests.toy_verifiers.DigitFraction}]"


def cfg_for(model_dir, *overrides):
    return compose_config("train", [
        f"model.path={model_dir}", "logger=jsonl", "trainer.prompts_per_step=4", "algorithm.group_size=4",
        "rollout.max_new_tokens=6", "trainer.eval_size=4", "task.eval_size=4", "trainer.eval_every=0", TOY,
        "model.lora.r=4", "model.lora.alpha=8", "algorithm.beta=0.1", "optim.lr=1e-2", "optim.warmup_steps=0",
        *overrides])


def test_lora_trains_only_adapters_against_the_base_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from grpo.commands.export import export

    raw = cfg_for(tiny_model_dir, "trainer.max_steps=2", "model.lora.save_merged=true")
    cfg = C.parse(C.TrainConfig, raw)
    with Run.from_config("grpo", cfg, raw, tmp_path / "run") as run:
        grpo = build(cfg, run)
        policy = grpo.policy
        trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        assert isinstance(policy.ref, AdaptersOff)  # the reference is the policy itself: no second copy is loaded
        before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
        for step in run.steps():
            step.done(train_step(grpo, run))
    changed = [n for n, p in policy.model.named_parameters() if not torch.equal(before[n], p)]
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed)

    base = load_model(str(tiny_model_dir))
    pad = load_tokenizer(str(tiny_model_dir)).pad_token_id
    ro, _ = fixed_batch(2, 3, base.config.vocab_size - 1)
    batch = pack(ro.prompt_ids, ro.completion_ids, pad)
    m = batch.mask
    with torch.no_grad():
        want = batch_logprobs(base, batch) * m
        ref = policy.ref(batch, 1.0, fn=batch_logprobs) * m
        pol = policy.fwd(batch, 1.0, fn=batch_logprobs) * m
    assert torch.allclose(ref, want, atol=1e-6)  # the reference is the base model
    assert float((pol - want).abs().max()) > 1e-4  # the adapters have moved the policy

    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert (ckpt / "model" / "adapter_config.json").exists()
    assert not (ckpt / "model" / "model.safetensors").exists()  # the adapters only, not the base again
    out = export(str(tmp_path / "run"), str(tmp_path / "exported"))
    for folder in (ckpt / "merged", out):  # base + adapters as one plain model, two ways
        merged = AutoModelForCausalLM.from_pretrained(folder)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        with torch.no_grad():
            assert torch.allclose(batch_logprobs(merged, batch) * m, pol, atol=1e-5), folder


@pytest.mark.parametrize("eta", [0, 1])
def test_lora_run_resumes_exactly(tiny_model_dir, tmp_path, eta):
    # eta = 1: the 2-step run's checkpoint holds the rollout step 3 trains on (made at the start of
    # step 2 by the policy after step 1, with the adapters on); the resumed step 3 must train on it
    lag = [f"rollout.max_staleness={eta}"]
    full, part, _ = run_interrupted(train, lambda *o: cfg_for(tiny_model_dir, *o, *lag), tmp_path, steps=3, stop=2)
    from safetensors.torch import load_file

    from tests.commands.test_train_e2e import read_metrics

    a, b = ({r["step"]: r for r in read_metrics(d) if "loss" in r} for d in (full, part))
    assert a[3]["reward/mean"] == b[3]["reward/mean"] and a[3]["loss"] == b[3]["loss"]
    assert a[3].get("async/staleness", 0.0) == eta and b[3].get("async/staleness", 0.0) == eta

    a = load_file(full / "checkpoints" / "step_000003" / "model" / "adapter_model.safetensors")
    b = load_file(part / "checkpoints" / "step_000003" / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lora_target_modules_that_match_nothing_is_one_line(tiny_model_dir, tmp_path):
    from tests.conftest import run_grpo

    p = run_grpo("train", f"model.path={tiny_model_dir}", "model.lora.target_modules=[nosuch]", "model.lora.r=2",
                 "trainer.max_steps=1", "logger=jsonl", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2 and "model.lora.target_modules" in p.stderr and p.stderr.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()


def test_dpo_takes_lora_through_the_shared_policy(tiny_model_dir, tmp_path):
    """Every loop builds its policy with Run.policy, so model.lora works beyond grpo train: a DPO run
    trains only the adapters, against the base model as its reference (the first step's DPO rewards
    are 0: the policy with zero-initialised B is the base), and writes model/ merged (a plain model
    whose log-probs are base + adapters)."""
    from transformers import AutoModelForCausalLM

    from grpo.commands.dpo import run_dpo
    from tests.commands.test_dpo import cfg as dpo_cfg
    from tests.commands.test_dpo import metrics

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"prompt": "q{i}?", "chosen": "yes", "rejected": "no"}}\n' for i in range(8)))
    run_dpo(dpo_cfg(tiny_model_dir, pairs, "trainer.max_steps=3", "model.lora.r=4", "model.lora.alpha=8"),
            tmp_path / "dpo")
    first = next(r for r in metrics(tmp_path / "dpo") if "loss" in r)
    assert first["rewards/margins"] == 0.0 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # -log sigmoid(0)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo" / "model")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = load_model(str(tiny_model_dir))
    moved = {n for n, p in merged.named_parameters() if not torch.equal(p, base.get_parameter(n))}
    # only the linear layers with adapters moved: the embeddings and norms are the base's
    assert moved and all(n.endswith("proj.weight") for n in moved)


def test_ppo_takes_lora_with_its_value_head_on_the_shared_trunk(tiny_model_dir, tiny_rm_dir, tmp_path):
    """ppo.value=shared puts the value head on the decoder stack under the LM head, a peft policy's too."""
    from grpo.commands.ppo import run_ppo
    from tests.commands.test_ppo import cfg as ppo_cfg
    from tests.commands.test_ppo import metrics

    run_ppo(ppo_cfg(tiny_model_dir, f"reward_model.path={tiny_rm_dir}", "model.lora.r=4", "ppo.value=shared",
                    "trainer.max_steps=2"), tmp_path)
    steps = [r for r in metrics(tmp_path) if "loss/value" in r]
    assert len(steps) == 2 and all(r["policy/first_ratio"] == pytest.approx(1.0, abs=1e-5) for r in steps)
    ckpt = tmp_path / "checkpoints" / "step_000002"
    assert (ckpt / "model" / "adapter_config.json").exists() and not (ckpt / "value").exists()


def test_rm_refuses_lora_in_one_line(tiny_model_dir, tmp_path):
    from grpo.commands.rm import run_rm
    from grpo.parts.config import ConfigError

    with pytest.raises(ConfigError, match=r"^model.lora: grpo rm trains the whole reward model"):
        run_rm(compose_config("rm", [f"model.path={tiny_model_dir}", "model.lora.r=4", "logger=jsonl"]), tmp_path)
