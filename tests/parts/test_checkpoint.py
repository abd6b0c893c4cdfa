"""Damaged checkpoints: found without reading a tensor, named in one line, skipped on resume."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

from grpo.parts import checkpoint
from grpo.parts.config import ConfigError
from grpo.parts.modeling import ModelError, load_model


def cut(path, keep: float = 0.5) -> None:
    """Truncate a file to `keep` of its size, as a full disk or a killed copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def fake_checkpoint(root, step: int):
    d = root / "checkpoints" / f"step_{step:06d}"
    (d / "model").mkdir(parents=True)
    save_file({"w": torch.full((4, 4), float(step))}, d / "model" / "model.safetensors")
    torch.save({"step": step, "rng": checkpoint.rng_state()}, d / "state.pt")
    (root / "checkpoints" / "latest").write_text(d.name + "\n")
    return d


def test_whole_files_pass_and_cut_ones_are_named(tmp_path):
    d = fake_checkpoint(tmp_path, 2)
    assert checkpoint.damaged_file(d) is None
    st = d / "model" / "model.safetensors"
    st.write_bytes(st.read_bytes() + b"\0")  # one byte too many is not the file that was written either
    assert checkpoint.damaged_file(d) == st
    cut(st, 0.99)
    assert checkpoint.damaged_file(d) == st
    save_file({"w": torch.zeros(4, 4)}, st)
    cut(d / "state.pt")
    assert checkpoint.damaged_file(d) == d / "state.pt"
    (d / "state.pt").unlink()  # a checkpoint without its state is incomplete
    assert checkpoint.damaged_file(d) == d / "state.pt"


def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path, caplog):
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 4)
    cut(newest / "model" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="grpo.parts.checkpoint"):
        found = checkpoint.find(tmp_path, True)
    assert found.name == "step_000002"
    assert f"skipping {newest / 'model' / 'model.safetensors'}" in caplog.text
    cut(found / "state.pt")  # nothing whole left: one line naming what is damaged
    with pytest.raises(ConfigError, match="no readable checkpoint.*step_000004"):
        checkpoint.find(tmp_path, True)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("damage", ["cut dcp/__0_0.distcp", "cut rng/rank_00000.pt", "cut config/tokenizer.json",
                                    "removed dcp/__0_0.distcp", "cut manifest.json"])
def test_resume_falls_back_past_any_cut_file_of_a_sharded_checkpoint(tiny_model_dir, tmp_path, caplog, damage):
    """Every file a checkpoint needs is checked against the size the manifest recorded at save time,
    not only the safetensors, state.pt and dcp/.metadata: a cut shard makes resume take the
    checkpoint before, with one line naming the file."""
    from grpo.parts.distributed import Parallel
    from grpo.parts.modeling import load_tokenizer

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    for step in (2, 4):
        newest = checkpoint.save_sharded(run, step, Parallel(), {"model": (model, opt)}, tok, {}, {"data_pos": step})
    how, name = damage.split(" ")
    bad = newest / name
    if how == "cut":
        cut(bad, 0.9)
    else:
        bad.unlink()
    with caplog.at_level(logging.WARNING, logger="grpo.parts.checkpoint"):
        found = checkpoint.find(run, True)
    assert found.name == "step_000002"
    lines = [r.getMessage() for r in caplog.records if r.name == "grpo.parts.checkpoint"]
    assert lines == [f"trainer.resume=true: skipping {bad} (damaged or incomplete); resuming from step_000002"]
    state = checkpoint.restore_run(found, Parallel(), {"model": (model, opt)}, {}, seed=0)
    assert (state["step"], state["data_pos"]) == (2, 2)


def test_a_one_process_checkpoint_records_every_file_it_needs(tiny_model_dir, tmp_path):
    from grpo.parts.modeling import load_tokenizer

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    final = checkpoint.save(tmp_path, 1, {"model": model}, tok, {}, keep=2)
    files = json.loads((final / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(final).as_posix(): p.stat().st_size for p in final.rglob("*") if p.is_file()}
    assert files == {k: v for k, v in on_disk.items() if k != "manifest.json"}
    assert {"state.pt", "model/model.safetensors", "model/config.json", "model/tokenizer.json"} <= files.keys()
    cut(final / "model" / "config.json", 0.9)  # nothing else looks inside a config
    assert checkpoint.damaged_file(final) == final / "model" / "config.json"


def test_a_damaged_checkpoint_path_is_one_line(tmp_path):
    d = fake_checkpoint(tmp_path, 2)
    cut(d / "state.pt")
    with pytest.raises(ConfigError, match=r"trainer.resume=.*step_000002/state.pt is missing, cut short or unreadable"):
        checkpoint.find(tmp_path, str(d))


def test_a_model_folder_with_cut_weights_is_one_line(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "m")
    cut(copy / "model.safetensors")
    with pytest.raises(ModelError, match=r"model.safetensors is cut short or unreadable"):
        load_model(str(copy))


def test_next_save_removes_what_a_crash_left(tiny_model_dir, tmp_path):
    from grpo.parts.modeling import load_tokenizer

    left = tmp_path / "checkpoints" / ".tmp_step_000002_abcd"
    (left / "model").mkdir(parents=True)
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    checkpoint.save(tmp_path, 4, {"model": model}, tok, {}, keep=2)
    assert not left.exists() and (tmp_path / "checkpoints" / "step_000004" / "state.pt").exists()


@pytest.mark.slow
def test_training_resumes_from_the_last_whole_checkpoint(tiny_model_dir, tmp_path):
    from tests.commands.test_train_e2e import cfg_for, train

    common = ["trainer.eval_every=0", "trainer.save_every=2", "optim.lr=1e-2"]
    train(cfg_for(tiny_model_dir, "trainer.max_steps=4", *common), tmp_path)
    cut(tmp_path / "checkpoints" / "step_000004" / "model" / "model.safetensors")
    summary = train(cfg_for(tiny_model_dir, "trainer.max_steps=5", "trainer.resume=true", *common), tmp_path)
    # From step 2's checkpoint the log keeps records up to step 2 (eval at 0, steps 1, 2); steps 3
    # and 4 run again, then 5, and the final evaluation at 5: every training step logged once.
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in recs if "eval/reward/mean" in r] == [0, 5]
    assert summary["steps"] == 5 and checkpoint.damaged_file(tmp_path / "checkpoints" / "step_000005") is None


def test_checkpoints_and_the_final_model_get_the_umasks_modes(tiny_model_dir, tmp_path):
    """Under umask 022 a plain open() makes 0644 files and mkdir 0755 folders: a checkpoint, its
    `latest` pointer and the final model folder must be readable by another user the same way
    (mkstemp and mkdtemp make 0600 / 0700, and safetensors files came out 0600)."""
    import os
    import stat

    from grpo.parts.distributed import Parallel
    from grpo.parts.modeling import load_tokenizer

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    old = os.umask(0o022)
    try:
        final = checkpoint.save(tmp_path, 1, {"model": model}, tok, {}, keep=2)
        out = checkpoint.save_final(Parallel(), model, tok, tmp_path / "model")  # one process
    finally:
        os.umask(old)
    modes = {}
    for folder in (final, out):
        for p in [folder, *folder.rglob("*")]:
            modes[str(p.relative_to(tmp_path))] = stat.S_IMODE(p.stat().st_mode)
    modes["checkpoints/latest"] = stat.S_IMODE((tmp_path / "checkpoints" / "latest").stat().st_mode)
    assert "checkpoints/step_000001/model/model.safetensors" in modes and "model/model.safetensors" in modes
    wrong = {k: oct(m) for k, m in modes.items() if m != (0o755 if (tmp_path / k).is_dir() else 0o644)}
    assert wrong == {}


# ---- what a resume may run: nothing (weights_only) ------------------------------------------------
class Creates:
    """Unpickled by a full pickle, this makes a file: what a crafted checkpoint could do on resume."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def sharded_checkpoint(model_dir, run_dir):
    """A sharded checkpoint (dcp/, rng/rank_00000.pt, state.pt) written by one process, with its parts."""
    from grpo.parts.distributed import Parallel
    from grpo.parts.modeling import load_tokenizer

    model = load_model(str(model_dir))
    opt = torch.optim.AdamW(model.parameters())
    models = {"model": (model, opt)}
    ckpt = checkpoint.save_sharded(run_dir, 2, Parallel(), models, load_tokenizer(str(model_dir)), {}, {"data_pos": 8})
    return ckpt, models


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("crafted", ["state.pt", "rng/rank_00000.pt"])
def test_a_crafted_checkpoint_file_is_refused_and_runs_nothing(tiny_model_dir, tmp_path, crafted):
    from grpo.parts.distributed import Parallel

    ckpt, models = sharded_checkpoint(tiny_model_dir, tmp_path / "run")
    marker = tmp_path / "created_by_the_checkpoint"
    torch.save({"step": 2, "world": 1, "data_pos": 8, "x": Creates(marker)}, ckpt / crafted)
    checkpoint.write_manifest(ckpt)  # whoever crafted it made the sizes match too
    with pytest.raises(ConfigError, match=rf"{crafted}: refused: it holds more than tensors and plain values "
                                          r"\(it names (io|builtins).open\)"):
        checkpoint.restore_run(ckpt, Parallel(), models, {}, seed=0)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("crafted", ["dcp/.metadata", "a value in dcp/"])
def test_a_crafted_sharded_checkpoint_is_refused_and_runs_nothing(tiny_model_dir, tmp_path, crafted):
    """torch.distributed.checkpoint unpickles its .metadata, and the non-tensor values of its shards
    (an optimizer's lr ...), with a full pickle: neither may run code on resume or export."""
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from grpo.commands.export import export
    from grpo.parts.distributed import Parallel

    ckpt, models = sharded_checkpoint(tiny_model_dir, tmp_path / "run")
    marker = tmp_path / "created_by_the_checkpoint"
    if crafted == "dcp/.metadata":
        (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(Creates(marker)))
        expected = r"dcp/.metadata: refused: it holds more than a checkpoint's metadata \(it names (io|builtins).open\)"
    else:
        model, opt = models["model"]
        box = dict(zip(("model", "optimizer"), get_state_dict(model, opt)))
        box["optimizer"]["param_groups"][0]["lr"] = Creates(marker)
        shutil.rmtree(ckpt / "dcp")
        dcp.save(box, checkpoint_id=str(ckpt / "dcp"))
        expected = r"optimizer.param_groups.0.lr in .*dcp: refused: .* \(it names (io|builtins).open\)"
    checkpoint.write_manifest(ckpt)  # whoever crafted it made the sizes match too
    with pytest.raises(ConfigError, match=expected):
        checkpoint.restore_run(ckpt, Parallel(), models, {}, seed=0)
    assert not marker.exists()
    if crafted == "dcp/.metadata":  # grpo export reads the same file
        with pytest.raises(ConfigError, match=expected):
            export(str(ckpt), str(tmp_path / "out"))
        assert not marker.exists()


def test_rng_states_come_back_exactly_through_a_weights_only_load(tmp_path):
    """Python's, numpy's (its cached Gaussian too) and torch's streams continue where they were saved."""
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # an odd count: each keeps a second Gaussian cached
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")

    def draws():
        return (random.gauss(0, 1), random.random(), np.random.standard_normal(3).tolist(), np.random.rand(),
                torch.rand(3).tolist())

    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(checkpoint.load_pt(tmp_path / "rng.pt"))
    assert draws() == expected


def test_an_older_checkpoint_s_numpy_rng_array_still_loads(tmp_path):
    import random

    import numpy as np

    np.random.seed(5)
    (tmp_path / "step_000001").mkdir()
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"step": 1, "rng": old}, tmp_path / "step_000001" / "state.pt")  # numpy's key as an array
    expected = np.random.rand()
    checkpoint.set_rng_state(checkpoint.load_state(tmp_path / "step_000001")["rng"])
    assert np.random.rand() == expected
