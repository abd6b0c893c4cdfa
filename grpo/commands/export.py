"""`grpo export CKPT OUT`: one Hugging Face model folder (what from_pretrained and vLLM load) from a
checkpoint of any kind: sharded (written by torchrun ranks), one-process, or LoRA adapters (merged
into the base model). CKPT may also be a run dir: its newest checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from grpo.parts import checkpoint
from grpo.parts.modeling import ModelError, is_lora, plain_copy


def checkpoint_dir(path: str) -> Path:
    p = Path(path).expanduser()
    latest = p / "checkpoints" / "latest"
    if latest.exists():
        p = latest.parent / latest.read_text().strip()
    if not p.is_dir() or not ((p / "dcp").is_dir() or (p / "model").is_dir()):
        raise ModelError(f"{path}: not a checkpoint (no dcp/ or model/) nor a run dir with checkpoints/latest")
    bad = checkpoint.damaged_file(p)
    if bad is not None:
        raise ModelError(f"{path}: {bad} is cut short or unreadable")
    return p


def auto_class(config):
    """A reward model (grpo rm) has a sequence-classification head; a policy is a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    scorer = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    return AutoModelForSequenceClassification if scorer else AutoModelForCausalLM


def load_checkpoint_model(ckpt: Path, module: str = "model"):
    """(model, tokenizer) of a checkpoint's `module` ("model": the trained one; "value": PPO's
    critic), on the CPU: a peft model when it holds LoRA adapters."""
    from transformers import AutoConfig, AutoTokenizer

    if checkpoint.is_sharded(ckpt):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        src = checkpoint.config_dir(ckpt, module)
        if not src.is_dir():
            raise ModelError(f"{ckpt}: holds no module {module!r}")
        config = AutoConfig.from_pretrained(src)
        model = auto_class(config).from_config(config, dtype=config.dtype)
        if (src / "adapter_config.json").exists():
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig.from_pretrained(str(src)))
        state = {module: get_model_state_dict(model)}
        checkpoint.dcp_load(state, ckpt)  # runs no code of the checkpoint's choosing
        set_model_state_dict(model, state[module])
        if (src / "generation_config.json").exists():  # the model's own (its EOS ids, ...), not a default
            from transformers import GenerationConfig

            (model.get_base_model() if is_lora(model) else model).generation_config = GenerationConfig.from_pretrained(src)
        return model, AutoTokenizer.from_pretrained(src)
    src = ckpt / module
    if not src.is_dir():
        raise ModelError(f"{ckpt}: holds no module {module!r}")
    if (src / "adapter_config.json").exists():
        from peft import PeftModel

        from grpo.parts.modeling import load_model

        base = json.loads((src / "adapter_config.json").read_text())["base_model_name_or_path"]
        return PeftModel.from_pretrained(load_model(base), str(src)), AutoTokenizer.from_pretrained(src)
    return auto_class(AutoConfig.from_pretrained(src)).from_pretrained(src), AutoTokenizer.from_pretrained(src)


def export(ckpt: str, out: str, module: str = "model") -> Path:
    """Write the checkpoint's model as one Hugging Face folder at `out` (which must not hold files);
    assembled beside it and renamed into place."""
    return _export(checkpoint_dir(ckpt), out, module)


def _export(src: Path, out: str, module: str) -> Path:
    dest = Path(out).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ModelError(f"{out}: already exists and is not empty")
    model, tok = load_checkpoint_model(src, module)
    if is_lora(model):
        model = plain_copy(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        checkpoint.make_readable(tmp)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def export_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="grpo export", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a checkpoint dir (…/checkpoints/step_N) or a run dir")
    ap.add_argument("out", help="the new model folder")
    ap.add_argument("--module", default="model", help="which of the checkpoint's models: model (the trained one, "
                    "default) or value (grpo ppo's critic)")
    a = ap.parse_args(argv)
    import warnings

    from grpo.parts import logs

    logs.quiet_libraries(logs.VERBOSE)  # the command's own process: no library chatter on the terminal
    # dcp.load on one process says it assumes one process: that is the intent here
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    warnings.filterwarnings("ignore", message="The PEFT config.s .base_model_name_or_path. was renamed")
    src = checkpoint_dir(a.checkpoint)
    print(f"exported {src} to {_export(src, a.out, a.module)}")
    return 0
