"""Typed config schemas: every command's config is checked once, with one line naming the key."""

import pytest

from grpo.parts import config as C
from grpo.cli import compose_config


@pytest.mark.parametrize("command, schema", [("train", C.TrainConfig), ("sft", C.SFTConfig), ("eval", C.EvalConfig)])
def test_shipped_configs_parse(command, schema):
    overrides = ["data.path=x.jsonl"] if command == "sft" else []
    cfg = C.parse(schema, compose_config(command, overrides))
    assert cfg.model.path == "embedded"


def test_preference_configs_parse():
    from grpo.commands.bon import BonConfig
    from grpo.commands.dpo import DPOConfig
    from grpo.commands.ppo import PPOConfig
    from grpo.commands.rm import RMConfig

    assert C.parse(RMConfig, compose_config("rm")).data.path == "embedded-prefs"
    assert C.parse(BonConfig, compose_config("bon")).reward_model.path == "embedded-rm"
    assert C.parse(DPOConfig, compose_config("dpo")).dpo.loss == "sigmoid"
    ppo = C.parse(PPOConfig, compose_config("ppo"))
    assert ppo.reward_model.path == "embedded-rm" and ppo.model.path == "embedded-chat" and ppo.ppo.kl_target is None


@pytest.mark.parametrize("override, message", [
    ("+trainer.max_stepz=3", r"^trainer.max_stepz: unknown key \(known: .*max_steps"),
    ("trainer.max_steps=2.5", r"^trainer.max_steps=2.5: must be a whole number >= 0$"),
    ("trainer.max_steps=-1", r"^trainer.max_steps=-1: must be a whole number >= 0$"),
    ("optim.lr=fast", r"^optim.lr='fast': must be a number >= 0$"),
    ("rollout.top_p=1.5", r"^rollout.top_p=1.5: must be a number > 0 <= 1$"),
    ("rollout.engine=trt", r"^rollout.engine='trt': use one of hf, vllm$"),
    ("model.gradient_checkpointing=3", r"^model.gradient_checkpointing=3: must be true or false$"),
    ("rollout.stop=abc", r"^rollout.stop='abc': must be a list$"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.parse(C.TrainConfig, compose_config("train", [override]))


def test_whole_floats_become_ints_and_ints_become_floats():
    cfg = C.parse(C.TrainConfig, compose_config("train", ["trainer.max_steps=3.0", "optim.lr=1"]))
    assert cfg.trainer.max_steps == 3 and isinstance(cfg.trainer.max_steps, int)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_engine_options_are_plain_keyword_values():
    opts = C.parse(C.TrainConfig, compose_config("train", ["rollout=vllm"])).rollout.engine_options()
    assert opts["kv_cache_gib"] == 0.25 and "engine" not in opts and "max_new_tokens" not in opts
