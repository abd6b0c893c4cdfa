"""Checkpoints that are written atomically and resume a run exactly.

Layout: <run_dir>/checkpoints/step_000040/
    model/          each trained module in Hugging Face format (from_pretrained, vLLM) with its
                    tokenizer: `model/` for the policy (grpo, sft) or the reward model (rm); a
                    trainer with several modules (policy and value) writes one folder per name
    state.pt        optimizer(s), scheduler(s), RNG states, data position, step
and <run_dir>/checkpoints/latest, a one-line file naming the newest complete checkpoint.

A run on several processes (torchrun) writes a sharded checkpoint instead, which any process count
resumes (torch.distributed.checkpoint reshards on load):
    dcp/            model and optimizer state, each rank writing its shards
    config/         the model's config.json (and adapter_config.json with LoRA) and the tokenizer
    rng/rank_N.pt   each rank's RNG states
    state.pt        scheduler(s), data position, step, and the process count that wrote it
`grpo export CKPT OUT` turns either kind into one Hugging Face model folder.

A checkpoint is assembled in a temporary sibling directory and renamed into place, and `latest`
is replaced with os.replace, so a crash mid-write leaves the previous checkpoint intact. Its last
file, manifest.json, records the size of every other file: a resume checks them (a file cut short or
missing since, by a full disk or a copy, makes it fall back to the checkpoint before).
"""

from __future__ import annotations

import copy
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grpo.parts.seeding import rank_seed, seed_everything

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values only (what torch.load(weights_only=True) reads
    back): numpy's key array becomes a list of ints."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    s = {"python": random.getstate(), "numpy": (kind, key.tolist(), pos, has_gauss, gauss),
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    kind, key, pos, has_gauss, gauss = s["numpy"]  # key: a list (or an array, in older checkpoints)
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have made
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so that a failed write is an OSError naming its cause
    (ENOSPC, EROFS, ...) rather than torch's "enforce fail at inline_container.cc"."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except Exception as e:
        cause = os_cause(e)
        if cause is None or cause[1]:
            raise
        raise OSError(cause[0], os.strerror(cause[0]), str(path)) from e  # which file it was


class Stopped(Exception):
    """A run asked to stop (SIGTERM, its launcher gone) that finished its step and saved a
    checkpoint: one line saying where, exit status 0."""


class SaveError(Exception):
    """A checkpoint or model that could not be written (a full disk, a read-only file system, no
    permission, a file size limit): one line naming the path and the cause; the command exits 1."""


def os_cause(e: BaseException) -> tuple[int, str | None] | None:
    """(errno, file name or None) of the OS error behind `e`: itself, what it was raised from or
    during, a rank's failure inside torch.distributed.checkpoint's CheckpointException, or the
    "[Errno N]" / "os error N" in a message (safetensors'); None when no OS error is behind it."""
    import re

    seen, todo = [], [e]
    while todo:
        x = todo.pop(0)
        if x is None or any(x is y for y in seen):
            continue
        seen.append(x)
        if isinstance(x, OSError) and x.errno:
            return x.errno, x.filename
        failures = getattr(x, "failures", None)  # CheckpointException: rank -> (exception, traceback)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [x.__cause__, x.__context__]
    for x in seen:
        m = re.search(r"\[Errno (\d+)\]|os error (\d+)", str(x))
        if m:
            return int(m.group(1) or m.group(2)), None
    return None


def _failure(e: BaseException, what: str, where: Path, root: Path | None) -> str | None:
    """The one line of a write that failed for an OS reason (None for any other reason)."""
    import errno

    cause = os_cause(e)
    if cause is None:
        return None
    code, filename = cause
    line = f"{what} not written: {filename or where}: {os.strerror(code)} ({errno.errorcode.get(code, code)})"
    if root is not None:
        latest = root / "latest"
        try:
            named = latest.read_text().strip() if latest.exists() else ""
        except OSError:
            named = ""
        line += (f"; the previous checkpoint, {root / named}, is intact" if named
                 else "; there is no earlier checkpoint")
    return line


def _catching() -> tuple[type[BaseException], ...]:
    """What a failed save raises: any Exception, and torch.distributed.checkpoint's
    CheckpointException (a BaseException); not KeyboardInterrupt or SystemExit."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover - torch without distributed
        return (Exception,)
    return (Exception, CheckpointException)


def _errno_keeping_writer(path: Path):
    """torch.distributed.checkpoint's file writer (what dcp.save uses for a path), whose failures keep
    their OS error: a value it torch.saves into a shard file fails as a RuntimeError raised during the
    OSError, and dcp hands every rank's failure to every rank pickled, which drops that OSError. So
    the failure is turned into the OSError itself on the rank where it happens."""
    from torch.distributed.checkpoint import FileSystemWriter

    def keeping(e: Exception) -> Exception:
        cause = os_cause(e)
        return OSError(cause[0], os.strerror(cause[0]), cause[1]) if cause else e

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            try:
                return super().write_data(plan, planner)
            except Exception as e:
                raise keeping(e) from e

        def finish(self, metadata, results):
            try:
                return super().finish(metadata, results)
            except Exception as e:
                raise keeping(e) from e

    return Writer(str(path))


def _together(par, what: str, where: Path, root: Path | None, fn) -> None:
    """fn() on this rank, then every rank learns whether it failed on any (a rank failing alone
    would leave the others waiting at the next collective): then every rank raises, SaveError with
    the failure's one line when an OS error is behind it. Stands for a barrier."""
    local = mine = None
    try:
        fn()
    except _catching() as e:
        local = e
        line = _failure(e, what, where, root)
        # (whether an OS error is behind it, the line): a rank that sees another's failure through
        # torch.distributed.checkpoint gets it without the OS error it was raised during
        mine = (line is not None, line or f"{what} not written: {type(e).__name__}: {e}".splitlines()[0])
        if par.world > 1:
            mine = (mine[0], f"{mine[1]} (rank {par.rank})")
    failures = [x for x in (par.gather(mine) if par.world > 1 else [mine]) if x]
    if not failures:
        return
    os_failed = [line for is_os, line in failures if is_os]
    if local is not None and not os_failed:
        raise local  # not the disk: a bug, with its traceback
    raise SaveError(os_failed[0] if os_failed else failures[0][1]) from local


def save(run_dir: Path, step: int, modules: Mapping[str, Any], tokenizer, stateful: Mapping[str, Any],
         extra: Mapping[str, Any] | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step`: each of `modules` (name -> model) as a Hugging Face folder, and in
    state.pt the state_dict() of each of `stateful` (name -> optimizer, scheduler, KL controller ...),
    the RNG states and `extra` (plain values such as the data position). A write that fails for an
    OS reason (a full disk ...) is SaveError, the previous checkpoint left as it was."""
    from types import SimpleNamespace

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    box = {}

    def write():
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".tmp_step_*"):  # a save cut short by a crash or a kill
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = box["tmp"] = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp_step_{step:06d}_"))
        for name, module in modules.items():
            module.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
        state = {**{k: v.state_dict() for k, v in stateful.items()}, **dict(extra or {})}
        _torch_save({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
        write_manifest(tmp)
        make_readable(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, final, keep)

    try:
        _together(SimpleNamespace(world=1, rank=0), f"checkpoint {final.name}", root, root, write)
    except BaseException:
        if "tmp" in box:
            shutil.rmtree(box["tmp"], ignore_errors=True)
        raise
    return final


MANIFEST = "manifest.json"


def write_manifest(folder: Path) -> None:
    """The size of every file in the checkpoint `folder`, written last (atomically) into it."""
    import json

    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != MANIFEST}
    _write_atomic(Path(folder) / MANIFEST, json.dumps({"files": files}, indent=0, sort_keys=True) + "\n")


def _manifest_mismatch(folder: Path) -> Path | None:
    """The first file of `folder` that its manifest names and that is missing or not the size it was
    written at (the manifest itself when it is unreadable); None when all match or there is no
    manifest (a checkpoint written before there were ones)."""
    import json

    manifest = folder / MANIFEST
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
        sizes = [(folder / name, int(size)) for name, size in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return manifest
    for f, size in sizes:
        try:
            if f.stat().st_size != size:
                return f
        except OSError:
            return f
    return None


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / "dcp").is_dir()


def _prune(root: Path, final: Path, keep: int) -> None:
    _write_atomic(root / "latest", final.name + "\n")
    if keep > 0:
        # Keep this checkpoint and the keep-1 newest before it; never the one just written.
        older = [p for p in sorted(root.glob("step_*")) if p.name < final.name]
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)


def _keys(name: str) -> tuple[str, str]:
    """The state names of a model and its optimizer: "model"/"optimizer" for the trained model, and
    "value"/"value_optimizer" for, say, PPO's critic (the one-process checkpoint's names)."""
    return name, "optimizer" if name == "model" else f"{name}_optimizer"


def config_dir(root: Path, name: str) -> Path:
    """Where a sharded checkpoint keeps what rebuilds its model `name` (config, tokenizer)."""
    return root / "config" if name == "model" else root / f"config_{name}"


def save_sharded(run_dir: Path, step: int, par, models: Mapping[str, tuple[Any, Any]], tokenizer,
                 stateful: Mapping[str, Any], extra: Mapping[str, Any] | None = None, keep: int = 2) -> Path:
    """Every rank writes its shards of each of `models` (name -> (model, optimizer)) with
    torch.distributed.checkpoint, and its RNG states, into a temporary directory that rank 0 then
    renames into place (the run dir must be on a file system all ranks share). Called by every
    rank; returns the checkpoint's path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from grpo.parts import distributed

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    what = f"checkpoint {final.name}"
    tmp = failed = None
    if par.main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for leftover in root.glob(".tmp_step_*"):
                shutil.rmtree(leftover, ignore_errors=True)
            tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp_step_{step:06d}_")
        except OSError as e:
            failed = _failure(e, what, root, root)
    tmp, failed = distributed.broadcast((tmp, failed))
    if failed:
        raise SaveError(failed)
    tmp = Path(tmp)

    def write():  # every rank: its shards and RNG states; rank 0 the rest
        box = {}
        for name, (model, optimizer) in models.items():
            mkey, okey = _keys(name)
            box[mkey], box[okey] = get_state_dict(model, optimizer)
        dcp.save(box, checkpoint_id=str(tmp / "dcp"), storage_writer=_errno_keeping_writer(tmp / "dcp"))
        (tmp / "rng").mkdir(exist_ok=True)
        _torch_save(rng_state(), tmp / "rng" / f"rank_{par.rank:05d}.pt")
        if par.main:
            for name, (model, _) in models.items():
                _save_config(model, tokenizer, config_dir(tmp, name))
            state = {**{k: v.state_dict() for k, v in stateful.items()}, **dict(extra or {})}
            _torch_save({**state, "step": step, "world": par.world}, tmp / "state.pt")

    def publish():  # rank 0, once every rank's files are written
        if par.main:
            write_manifest(tmp)  # every rank's files, on the file system they share
            make_readable(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _prune(root, final, keep)

    try:
        _together(par, what, root, root, write)
        _together(par, what, root, root, publish)
    except BaseException:
        if par.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _save_config(model, tokenizer, folder: Path) -> None:
    """What `grpo export` rebuilds a model from: its config (naming its class), generation config,
    LoRA config and tokenizer."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]  # as save_pretrained records it (export builds this class)
    config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:  # a reward model has none
        base.generation_config.save_pretrained(folder)
    if hasattr(model, "peft_config"):
        model.peft_config["default"].save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_readable(folder: Path) -> None:
    """mkdtemp makes its directory private (0700), and safetensors files come out 0600; a checkpoint
    or an export is read by others (other users on a shared file system, a serving job): give the
    folder, everything below it, the modes a plain mkdir and open would (the umask's)."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def restore_sharded(ckpt: Path, models: Mapping[str, tuple[Any, Any]], stateful: Mapping[str, Any],
                    rank: int = 0) -> dict[str, Any]:
    """Load a sharded checkpoint into each of `models` (name -> (model, optimizer)) as this run
    shards them (any process count, or one), the states of `stateful`, and this rank's RNG states
    when the checkpoint has them (state["rng"] is None when it does not: a run resumed on more
    processes than it had)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    box = {}
    for name, (model, optimizer) in models.items():
        mkey, okey = _keys(name)
        box[mkey], box[okey] = get_state_dict(model, optimizer)
    dcp_load(box, ckpt)
    for name, (model, optimizer) in models.items():
        mkey, okey = _keys(name)
        set_state_dict(model, optimizer, model_state_dict=box[mkey], optim_state_dict=box[okey])
    state = load_state(ckpt)
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    rng = Path(ckpt) / "rng" / f"rank_{rank:05d}.pt"
    state["rng"] = load_pt(rng) if rng.exists() else None
    if state["rng"] is not None:
        set_rng_state(state["rng"])
    return state


# What dcp/.metadata may name: torch.distributed.checkpoint's own records of where each tensor lies
# (dataclasses and an enum), paths, sizes, dtypes and layouts. Nothing that runs code.
_DCP_METADATA = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
    "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath")}


def _check_dcp_metadata(path: Path) -> None:
    """torch.distributed.checkpoint reads dcp/.metadata with a plain pickle.load: unpickle it first
    with only what that file holds allowed (_DCP_METADATA), so a crafted one runs nothing."""
    import pickle

    from grpo.parts.config import ConfigError

    class Checked(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in _DCP_METADATA or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"it names {module}.{name}")

    try:
        with open(path, "rb") as f:
            Checked(f).load()
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: refused: it holds more than a checkpoint's metadata ({e})") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def _weights_only_planner():
    """torch.distributed.checkpoint's load planner, whose non-tensor values (an optimizer's lr, betas,
    ...) are checked with torch.load(weights_only=True) before it reads them its way (a full pickle)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            import pickle

            from grpo.parts.config import ConfigError

            start = value.tell()
            try:
                with torch.serialization.safe_globals(_numpy_globals()):
                    torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise ConfigError(f"{read_item.dest_index.fqn} in {self.where}: refused: it holds more than tensors "
                                  f"and plain values ({_named_global(e)})") from None
            value.seek(start)
            super().load_bytes(read_item, value)

    return WeightsOnly()


def dcp_load(state: dict[str, Any], ckpt: Path) -> None:
    """dcp.load of `state` from the sharded checkpoint `ckpt`, which may run no code of its files'
    choosing (see the two above); a refused file is one line (ConfigError) on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    folder = Path(ckpt) / "dcp"
    _check_dcp_metadata(folder / ".metadata")
    planner = _weights_only_planner()
    planner.where = str(folder)
    try:
        dcp.load(state, checkpoint_id=str(folder), planner=planner)
    except CheckpointException as e:  # what failed on each rank, gathered on every rank
        from grpo.parts.config import ConfigError

        for failure in e.failures.values():
            error = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(error, ConfigError):
                raise ConfigError(str(error)) from None
        raise


def restore(ckpt: Path, stateful: Mapping[str, Any]) -> dict[str, Any]:
    """Load state.pt: each of `stateful` gets its saved state_dict back, the RNG states are set, and
    the whole state (step, data position, ...) is returned."""
    state = load_state(ckpt)
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"])
    return state


def resuming(resume: Any) -> bool:
    """Whether trainer.resume asks to continue a run (true, or a checkpoint path)."""
    return resume not in (None, False, "", "false")


def holds_run(run_dir: Path) -> bool:
    """Whether run_dir already holds a run (its metrics or its checkpoints)."""
    return (Path(run_dir) / "metrics.jsonl").exists() or (Path(run_dir) / "checkpoints").is_dir()


def refusal(run_dir: Path) -> Exception:
    from grpo.parts.config import ConfigError

    return ConfigError(f"{run_dir} already holds a run: continue it with trainer.resume=true, "
                       "or start a new one in another hydra.run.dir")


def remove_if_empty_run(run_dir: Path) -> None:
    """Remove the run dir of a command that failed before it trained: with no checkpoint and no
    metrics it holds nothing worth keeping (its log holds what the terminal showed)."""
    d = Path(run_dir)
    metrics = d / "metrics.jsonl"
    if not (d / "checkpoints").is_dir() and not (metrics.exists() and metrics.stat().st_size):
        shutil.rmtree(d, ignore_errors=True)
        # and the parents made for it (runs/ on a first run), up to the working directory
        cwd, parent = Path.cwd().resolve(), d.resolve().parent
        while parent != cwd and cwd in parent.parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def _safetensors_whole(f: Path) -> bool:
    """A safetensors file's header parses and its tensors end exactly at the end of the file."""
    import json
    import struct

    try:
        size = f.stat().st_size
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                return False
            header = json.loads(fh.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return 8 + n + end == size
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def damaged_file(folder: Path) -> Path | None:
    """The first file of a checkpoint or model folder that is cut short or unreadable, else None.
    A cheap check that reads no tensor: every file its manifest names must be there at the size it
    was written at (dcp/ shards, rng/rank_N.pt, ...); every safetensors file must be whole (see
    above), and state.pt must exist in a checkpoint and be a whole zip archive (torch.save's format)
    as must rng/rank_N.pt, and a sharded checkpoint's dcp/ must hold its .metadata (written last by
    torch.distributed.checkpoint)."""
    import zipfile

    folder = Path(folder)
    bad = _manifest_mismatch(folder)
    if bad is not None:
        return bad
    for f in sorted((folder / "rng").glob("*.pt")):  # checked by the manifest too; this for older checkpoints
        try:
            with zipfile.ZipFile(f) as z:
                z.namelist()
        except (OSError, zipfile.BadZipFile):
            return f
    for f in sorted(folder.rglob("*.safetensors")):
        if not _safetensors_whole(f):
            return f
    if folder.name.startswith("step_") or (folder / "state.pt").exists():
        try:
            with zipfile.ZipFile(folder / "state.pt") as z:
                z.namelist()
        except (OSError, zipfile.BadZipFile):
            return folder / "state.pt"
    if (folder / "dcp").is_dir() and not (folder / "dcp" / ".metadata").is_file():
        return folder / "dcp" / ".metadata"
    return None


def find(run_dir: Path, resume: Any) -> Path | None:
    """The checkpoint to resume from: `resume` is true (the newest complete and readable one in
    run_dir; a damaged newer one is skipped with a warning naming it) or a checkpoint path (which
    must be whole)."""
    from grpo.parts.config import ConfigError

    if not resuming(resume):
        return None
    if resume is True or resume == "true":
        root = Path(run_dir) / "checkpoints"
        latest = root / "latest"
        if not latest.exists():
            raise FileNotFoundError(f"trainer.resume=true but {latest} does not exist: pass the run's hydra.run.dir")
        # `latest` names the newest complete one; older ones stand in if it was damaged since.
        named = root / latest.read_text().strip()
        candidates = [named] + [p for p in sorted(root.glob("step_*"), reverse=True) if p.name < named.name]
        skipped = []
        for ckpt in candidates:
            bad = damaged_file(ckpt) if ckpt.is_dir() else ckpt
            if bad is None:
                for b in skipped:
                    log.warning("trainer.resume=true: skipping %s (damaged or incomplete); resuming from %s", b, ckpt.name)
                return ckpt
            skipped.append(bad)
        raise ConfigError(f"trainer.resume=true: no readable checkpoint in {root} (damaged: {skipped[0]})")
    p = Path(str(resume))
    if not p.is_dir():
        raise FileNotFoundError(f"trainer.resume={resume}: not a checkpoint directory")
    bad = damaged_file(p)
    if bad is not None:
        raise ConfigError(f"trainer.resume={resume}: {bad} is missing, cut short or unreadable")
    return p


def begin(run_dir: Path, resume: Any, seed: int | None = None, par=None) -> Path | None:
    """Start a run in run_dir (created if missing; every RNG seeded when a seed is given, rank r of
    a torchrun launch `par` with its own stream) and return the checkpoint it resumes from (None: a
    fresh run). A fresh run refuses a run dir that already holds one."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    if seed is not None:
        seed_everything(rank_seed(seed, par.rank if par else 0))
    ckpt = find(run_dir, resume)
    if not ckpt and holds_run(run_dir):
        raise refusal(run_dir)
    if par is not None and par.sharded and has_folders(ckpt):
        from grpo.parts.config import ConfigError

        # its optimizer state is whole tensors, which a sharded optimizer cannot take as they are
        raise ConfigError(f"{ckpt} was saved by one process: resume it with parallel=ddp or on one process")
    if par is not None:
        par.barrier()  # every rank has looked at the run dir before rank 0 writes to it
    return ckpt


def has_folders(ckpt: Path | None) -> bool:
    """Whether `ckpt` holds its models as folders (written by one process), not as shards."""
    return ckpt is not None and not is_sharded(ckpt)


def model_source(ckpt: Path | None, path: str) -> str:
    """Where a trainer loads its model from: a one-process checkpoint's model folder, else `path`
    (the start, or the base that a sharded checkpoint's weights are then loaded over)."""
    return str(Path(ckpt) / "model") if has_folders(ckpt) else path


def save_run(run_dir: Path, step: int, par, models: Mapping[str, tuple[Any, Any]], tokenizer,
             stateful: Mapping[str, Any], extra: Mapping[str, Any] | None = None, keep: int = 2,
             more: Mapping[str, Any] | None = None) -> Path:
    """A trainer's checkpoint of `models` (name -> (model, optimizer); "model" is the one trained):
    sharded on several processes, else one model folder each (with the `more` folders beside them)
    and state.pt. Called by every rank."""
    if par.world > 1:
        return save_sharded(run_dir, step, par, models, tokenizer, stateful, extra, keep)
    optimizers = {_keys(name)[1]: opt for name, (_, opt) in models.items()}
    return save(run_dir, step, {**{name: m for name, (m, _) in models.items()}, **dict(more or {})}, tokenizer,
                {**optimizers, **stateful}, extra, keep)


def restore_run(ckpt: Path, par, models: Mapping[str, tuple[Any, Any]], stateful: Mapping[str, Any],
                seed: int) -> dict[str, Any]:
    """The other half of save_run, at any process count: the state back in each model (unless it
    was loaded from the checkpoint's folder) and optimizer and in stateful; the RNG streams where
    saved for this rank and process count, fresh ones (rank_seed at the step) otherwise."""
    if is_sharded(ckpt):
        state = restore_sharded(ckpt, models, stateful, par.rank)
    else:
        state = restore(ckpt, {**{_keys(name)[1]: opt for name, (_, opt) in models.items()}, **stateful})
    if state.get("rng") is None or par.world != state.get("world", 1):
        seed_everything(rank_seed(seed, par.rank, state["step"]))
    return state


def save_final(par, model, tokenizer, out: Path) -> Path:
    """The trained model as one Hugging Face folder at `out`, written by rank 0 (the shards gathered
    first under fsdp2). Called by every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = None
    if par.sharded:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write():
        if par.main:
            model.save_pretrained(out, state_dict=state)
            tokenizer.save_pretrained(out)
            make_readable(Path(out))

    _together(par, "the trained model", Path(out), None, write)  # a failed write: one line on every rank
    return Path(out)


def load_state(ckpt: Path) -> dict[str, Any]:
    return load_pt(Path(ckpt) / "state.pt")


def _numpy_globals() -> list[Any]:
    """What an older checkpoint's numpy RNG state (an array) needs, and nothing more: an array of
    numbers is rebuilt from its dtype and bytes, which runs no code of the file's choosing."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_pt(path: Path) -> Any:
    """A checkpoint's .pt file (state.pt, rng/rank_N.pt), read with torch.load(weights_only=True):
    tensors and plain values only, so a crafted file cannot run code on resume; anything else is one
    line (ConfigError) naming the file."""
    import pickle

    from grpo.parts.config import ConfigError

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: refused: it holds more than tensors and plain values ({_named_global(e)}); "
                          "a checkpoint this code wrote never does") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})") from e



def _named_global(e: Exception) -> str:
    """What torch.load(weights_only=True) refused, from its long message: "it names posix.system"."""
    import re

    named = re.search(r"GLOBAL ([\w.]+)", str(e))
    return f"it names {named.group(1)}" if named else str(e).strip().splitlines()[-1]
