"""Typed config schemas: every command's config is checked once, with one line naming the key."""

import dataclasses
import importlib
import pkgutil

import pytest

from grpo.parts import config as C
from grpo.cli import compose_config


@pytest.mark.parametrize("command, schema", [("train", C.TrainConfig), ("sft", C.SFTConfig), ("eval", C.EvalConfig)])
def test_shipped_configs_parse(command, schema):
    overrides = ["data.path=x.jsonl"] if command == "sft" else []
    cfg = C.parse(schema, compose_config(command, overrides))
    assert cfg.model.path == "embedded"


def test_preference_configs_parse():
    assert C.parse(C.RMConfig, compose_config("rm")).data.path == "embedded-prefs"
    assert C.parse(C.BonConfig, compose_config("bon")).reward_model.path == "embedded-rm"
    assert C.parse(C.DPOConfig, compose_config("dpo")).dpo.loss == "sigmoid"
    ppo = C.parse(C.PPOConfig, compose_config("ppo"))
    assert ppo.reward_model.path == "embedded-rm" and ppo.model.path == "embedded-chat" and ppo.ppo.kl_target is None


@pytest.mark.parametrize("override, message", [
    ("+trainer.max_stepz=3", r"^trainer.max_stepz: unknown key \(known: .*max_steps"),
    ("trainer.max_steps=2.5", r"^trainer.max_steps=2.5: must be a whole number >= 0$"),
    ("trainer.max_steps=-1", r"^trainer.max_steps=-1: must be a whole number >= 0$"),
    ("optim.lr=fast", r"^optim.lr='fast': must be a number >= 0$"),
    ("rollout.top_p=1.5", r"^rollout.top_p=1.5: must be a number > 0 <= 1$"),
    ("rollout.engine=trt", r"^rollout.engine='trt': use one of hf, vllm, server$"),
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


def test_every_schema_is_here_and_named_config():
    """One place for the schemas: every dataclass of grpo/parts/config.py is a ...Config, and no other
    module of grpo defines a schema (a dataclass whose fields use num / choice / group)."""
    import grpo

    ours = [v for v in vars(C).values() if dataclasses.is_dataclass(v) and v.__module__ == C.__name__]
    assert len(ours) >= 25 and all(cls.__name__.endswith("Config") for cls in ours)
    for info in pkgutil.walk_packages(grpo.__path__, "grpo."):
        if info.name.startswith(("grpo.parts.rollout.vllm", "grpo.verifiers", "grpo.sandbox", "grpo.tasks",
                                 "grpo.conf", "grpo.data")):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if dataclasses.is_dataclass(value) and value.__module__ == info.name and info.name != C.__name__:
                assert not any(f.metadata for f in dataclasses.fields(value)), f"{info.name}.{value.__name__}"


def test_the_dpo_losses_the_schema_offers_are_the_loss_functions():
    from grpo.algorithm.preference_losses import DPO_LOSSES

    choices = next(f for f in dataclasses.fields(C.DPOAlgorithmConfig) if f.name == "loss").metadata["choices"]
    assert tuple(choices) == DPO_LOSSES


def test_vllm_options_are_plain_keyword_values(monkeypatch):
    """The rollout group reaches the vLLM engine as its own keyword arguments only."""
    import grpo.parts.rollout as rollout

    seen = {}
    monkeypatch.setattr(rollout, "build_engine", lambda engine, *a, **kw: seen.update(engine=engine, **kw))
    cfg = C.parse(C.TrainConfig, compose_config("train", ["rollout=vllm"]))
    rollout.build_engine_from(cfg.rollout, None, None, "embedded")
    assert seen["engine"] == "vllm" and seen["kv_cache_gib"] == 0.25 and seen["max_new_tokens"] == 16
    assert not {"stop", "engine_options"} & set(seen)
