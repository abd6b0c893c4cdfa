"""Data parallelism on PyTorch's own stack: torchrun starts the processes, torch.distributed joins them.

`grpo train` run as `torchrun --nproc_per_node K -m grpo train ...` gets K ranks; on one process
everything here is a no-op and the trainers run exactly as before.

- Process group: NCCL when the ranks have GPUs, gloo on CPU; rank r uses cuda:LOCAL_RANK.
- `parallel.strategy=ddp`: every rank holds the whole model, DistributedDataParallel averages the
  gradients once per optimizer step (the micro-batches before the last run under no_sync).
- `parallel.strategy=fsdp2`: `fully_shard` on every transformer block and on the root, over an
  explicit 1-D device mesh; parameters, gradients and optimizer state are sharded. On GPUs the
  parameters compute in bf16 and gradients reduce in fp32 (`parallel.mixed_precision`).

Both average gradients over ranks, so a rank's loss is `sum_local(l * m) / N_global * W`: the trainers
pass `N_global / W` as the normaliser of `losses.aggregate`, N_global all-reduced (`Parallel.sum`)
once per step. Every forward of a sharded model is a collective, so every rank must run
the same number of them: `Parallel.pad_micro_batches` evens out the micro-batch counts (the extra
ones are weighted 0), and `Lockstep` keeps generation in step when ranks finish at different lengths.

The model goes through a `Forward` wrapper: `wrapper(fn=f, ...)` runs `f(model, ...)` inside the
wrapper's forward, so DDP's and FSDP2's hooks see every pass, including the shared-prompt layout,
which calls the backbone and the LM head separately.

A rank that stops answering (SIGSTOP, swapped out, hung in a driver) leaves the others blocked in
their next collective. Two settings bound that: `parallel.collective_timeout_s` (how long a
collective waits before the job ends with an error; PyTorch's own default is 30 min for gloo) and
`parallel.silent_rank_warn_s`: every rank beats a counter in the launcher's store once a second
(`SilentRanks`), and when a peer's counter has not moved for that long the lowest live rank logs
which rank is silent, where this rank is (the step, the evaluation, the checkpoint) and when the
wait will end.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group() -> None:
    """Join the launcher's process group once per process (NCCL on GPUs, gloo otherwise)."""
    if not launched() or dist.is_initialized():
        return
    backend = os.environ.get("GRPO_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))


def close() -> None:
    """Leave the process group (at the end of a command): a process that exits with its gloo
    connections still open can abort ("terminate called without an active exception").

    The garbage goes first. A model sharded by FSDP2 (its parameters, its state) holds the process
    group, and a run's parts sit in reference cycles (the Run and its closures), so they would be
    freed only at interpreter exit, after the group was shut down: the group's C++ teardown then
    runs while Python is being torn down, and can abort a rank the same way (seen on ranks > 0 of
    fsdp2 runs, a few times in a hundred). Collected here, everything that holds the group is gone
    before it is destroyed."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# gloo's words when a collective's peer never came (torch 2.13 raises a plain RuntimeError with them)
_GLOO_TIMEOUT = re.compile(r"Timed out waiting \d+ms for (recv|send) operation to complete")


def collective_timed_out(error: BaseException) -> bool:
    """Whether `error` is a collective that waited parallel.collective_timeout_s for another rank
    (gloo's timeout, or a torch.distributed error saying so), not any error whose text says "timed out"."""
    if isinstance(error, getattr(dist, "DistError", ())) and "timed out" in str(error).lower():
        return True
    return bool(_GLOO_TIMEOUT.search(str(error)))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's value of obj on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int, r: int, w: int) -> tuple[int, int]:
    """Rank r's contiguous share [lo, hi) of n items over w ranks: the first n % w ranks get one more."""
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


class Forward(torch.nn.Module):
    """The module DDP or FSDP2 wraps: `self(fn=f, *a, **kw)` is `f(model, *a, **kw)`, and a plain
    call `self(input_ids=...)` is the model's own forward, so the wrapper stands in for the model."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, fn=None, **kwargs):
        return self.model(*args, **kwargs) if fn is None else fn(self.model, *args, **kwargs)


def call(model: torch.nn.Module, fn, *args, **kwargs):
    """fn(model, *args, **kwargs), through the Forward wrapper (bare, DDP or FSDP2) where `model` is one."""
    if isinstance(model, Forward) or isinstance(getattr(model, "module", None), Forward):
        return model(*args, fn=fn, **kwargs)
    return fn(model, *args, **kwargs)


class OnDevice(torch.nn.Module):
    """A frozen model kept whole on `home` (the CPU) and called like a Forward wrapper from `device`:
    the inputs go over, the outputs come back."""

    def __init__(self, model: torch.nn.Module, home: str, device: str):
        super().__init__()
        self.model, self.home, self.device = model, home, device

    def forward(self, *args, fn=None, **kwargs):
        args = [_to(a, self.home) for a in args]
        kwargs = {k: _to(v, self.home) for k, v in kwargs.items()}
        out = self.model(*args, **kwargs) if fn is None else fn(self.model, *args, **kwargs)
        return _to(out, self.device)


def _to(x: Any, device: str) -> Any:
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    return x.to(device) if hasattr(x, "to") and not isinstance(x, torch.nn.Module) else x


class SilentRanks:
    """A daemon thread that names a rank gone silent. Every `beat` seconds it adds 1 to this rank's
    counter in the launcher's TCP store (its own client connection: the default group's store may be
    busy) and reads the others'; a peer whose counter has not moved for `after_s` seconds is logged
    once by the lowest rank still beating (in its view), with `where()` (what this rank is doing) and
    the collective timeout; its return is logged too. Counters, not clocks: hosts' clocks may differ.
    A process frozen by SIGSTOP freezes its threads too, so its counter stops: that is the signal."""

    def __init__(self, rank: int, world: int, after_s: float, timeout_s: float, where: Callable[[], str],
                 store: Any = None):
        self.rank, self.world, self.after_s, self.timeout_s, self.where = rank, world, after_s, timeout_s, where
        self.beat = min(1.0, after_s / 4)
        self.prefix = f"grpo/beat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.store = store if store is not None else dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=datetime.timedelta(seconds=max(10.0, after_s)))
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="grpo-silent-ranks", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        seen = {p: (-1, time.monotonic()) for p in range(self.world) if p != self.rank}
        silent: set[int] = set()
        store_quiet = None  # since when the store has not answered (its host may be the silent one)
        while not self.stopping.wait(self.beat):
            try:
                self.store.add(self.prefix + str(self.rank), 1)
                now = time.monotonic()
                for p, (count, since) in list(seen.items()):
                    c = self.store.add(self.prefix + str(p), 0)  # adding 0 reads without blocking
                    if c < 0:  # it said goodbye (closed its watch at the end of its run): not silent
                        del seen[p]
                        silent.discard(p)
                    elif c != count:
                        seen[p] = (c, now)
                        if p in silent:
                            self._say(silent, f"rank {p} answers again after {now - since:.0f} s")
                            silent.discard(p)
                    elif p not in silent and now - since > self.after_s:
                        silent.add(p)
                        self._say(silent, f"rank {p} has not answered for {now - since:.0f} s (stopped by "
                                  f"SIGSTOP, swapped out or hung?) while this rank is at {self.where()}; the ranks "
                                  f"wait for it until parallel.collective_timeout_s={self.timeout_s:.0f} s, then the "
                                  "job ends")
                store_quiet = None
            except Exception as e:  # noqa: BLE001 - the store's host is gone or frozen: say so once, go on
                if self.stopping.is_set():
                    return
                if store_quiet is None:
                    store_quiet = time.monotonic()
                    first = str(e).splitlines()[0] if str(e) else repr(e)
                    print(f"grpo: rank {self.rank}: the launcher's store does not answer ({first}); while it does "
                          f"not, silent ranks cannot be named", file=sys.stderr, flush=True)

    def _say(self, silent: set[int], text: str) -> None:
        """Said by the lowest rank not in `silent` (each live rank computes the same, in its view)."""
        if self.rank == min(set(range(self.world)) - silent):
            from tqdm import tqdm  # clears the progress bar's line, prints, redraws the bar

            tqdm.write(f"grpo: rank {self.rank}: {text}", file=sys.stderr)

    def close(self) -> None:
        """Stop beating and say goodbye (the counter set to -1: a rank that ended is not silent)."""
        self.stopping.set()
        self.thread.join(timeout=2 * self.beat + 1)  # no beat after the goodbye
        try:
            self.store.set(self.prefix + str(self.rank), "-1")
        except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
            pass


class Parallel:
    """This process's place among the ranks and the strategy its models are wrapped with. `doing`
    names what this rank is at, for `SilentRanks`' messages."""

    def __init__(self, strategy: str = "ddp", device: str = "cpu", mixed_precision: str = "auto"):
        init_process_group()
        self.rank, self.world = rank(), world()
        self.doing = "the start"
        self.silent: SilentRanks | None = None
        self.timeout_s = 1800.0  # a collective's longest wait (parallel.collective_timeout_s, set by watch)
        self.strategy = strategy if self.world > 1 else "none"
        self.device = device
        if self.world > 1 and device.startswith("cuda"):
            self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.mixed_precision = mixed_precision

    def watch(self, timeout_s: float, silent_after_s: float) -> None:
        """Under torchrun (a run's start; `close` ends it): `timeout_s` becomes the process group's
        collective timeout, and `silent_after_s` (0 = off) starts a `SilentRanks` watch."""
        if self.world == 1:
            return
        # The group was joined before the config was read (the ranks agree on the run dir first)
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s))
        self.timeout_s = timeout_s
        if silent_after_s > 0 and self.silent is None and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            try:
                self.silent = SilentRanks(self.rank, self.world, silent_after_s, timeout_s, lambda: self.doing)
            except Exception as e:  # noqa: BLE001 - a missing watch costs its messages, never the run
                print(f"grpo: rank {self.rank}: no silent-rank check (the launcher's store at "
                      f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {e})", file=sys.stderr, flush=True)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.silent is not None:
            self.silent.close()

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp2"

    # ---- collectives (no-ops on one process) -------------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a list of floats (one all-reduce, in float64)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        barrier()

    def require(self, n: int, what: str, error: type[Exception] | None = None) -> None:
        """Every rank needs one of the n items it shares out (prompts, rows, held-out samples): a
        one-line error (ConfigError by default) naming `what` when there are fewer than ranks."""
        if n < self.world:
            from grpo.parts.config import ConfigError

            raise (error or ConfigError)(f"{what}: fewer than the {self.world} processes, which need one each")

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """`sum` over a dict of floats (every rank with the same keys)."""
        keys = sorted(values)
        return dict(zip(keys, self.sum([values[k] for k in keys])))

    def _comm_device(self) -> str:
        return self.device if dist.get_backend() == "nccl" else "cpu"

    def reduce_metrics(self, metrics: dict[str, float], weight: float) -> dict[str, float]:
        """The whole batch's metrics from each rank's own over its `weight` rows (or tokens, samples):
        means weighted by the weights (not means of means); counts (`.../errors`) summed; a `.../std`
        beside its `.../mean` pooled from both (the std of all rows, not a mean of stds)."""
        if self.world == 1:
            return dict(metrics)
        keys = sorted(metrics)
        second = {k: k[:-len("std")] + "mean" for k in keys if k.endswith("/std") and k[:-len("std")] + "mean" in metrics}
        values = [metrics[k] if k.endswith("/errors") else metrics[k] * weight for k in keys]
        values += [(metrics[k] ** 2 + metrics[m] ** 2) * weight for k, m in second.items()]  # E[x^2] of each rank
        sums = self.sum(values + [weight])
        total = sums[-1] or 1.0
        out = {k: v if k.endswith("/errors") else v / total for k, v in zip(keys, sums)}
        for (k, m), sq in zip(second.items(), sums[len(keys):-1]):
            out[k] = max(sq / total - out[m] ** 2, 0.0) ** 0.5
        return out

    # ---- the micro-batches of a step ----------------------------------------------------------
    def pad_micro_batches(self, slices: list[slice]) -> list[tuple[slice, float]]:
        """(slice, weight) per micro-batch, as many on every rank: a rank with fewer repeats its last
        one with weight 0 (a forward and backward that add nothing, but keep the collectives paired)."""
        count = self.max(len(slices))
        return [(s, 1.0) for s in slices] + [(slices[-1], 0.0)] * (count - len(slices))

    # ---- wrapping ------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, trainable: bool = True) -> Forward:
        """The model inside a Forward wrapper, data-parallel by the strategy (unchanged on one
        process). A frozen model is sharded under fsdp2 and left whole under ddp."""
        fwd = Forward(model)
        if self.strategy == "ddp" and trainable:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            return DDP(fwd, device_ids=ids, broadcast_buffers=False)
        if self.strategy == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            kind = "cuda" if self.device.startswith("cuda") else "cpu"
            mesh = init_device_mesh(kind, (self.world,))
            opts: dict[str, Any] = {"mesh": mesh}
            if kind == "cuda" and self.mixed_precision in ("auto", "bf16"):
                opts["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in blocks(model):
                fully_shard(block, **opts)
            fully_shard(fwd, **opts)
        return fwd

    @contextlib.contextmanager
    def grad_sync(self, wrapped: torch.nn.Module, sync: bool) -> Iterator[None]:
        """Backward passes that only accumulate (sync=False) or also reduce over ranks (sync=True)."""
        if self.strategy == "ddp" and not sync:
            with wrapped.no_sync():
                yield
            return
        if self.strategy == "fsdp2":
            wrapped.set_requires_gradient_sync(sync)
        yield


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a causal LM (the modules transformers would not split across
    devices): the units FSDP2 shards one by one."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        raise ValueError(f"{type(model).__name__}: no transformer blocks found to shard (no _no_split_modules)")
    return found


class Lockstep:
    """Keeps the ranks' forward passes paired while they generate different amounts.

    Before each real forward a rank says "working" in an all-reduce; a rank with nothing left
    answers the same all-reduce with "done" and runs a one-token dummy forward, until every rank
    says done. Under FSDP2 each forward all-gathers the shards, so unpaired forwards would hang."""

    def __init__(self, par: Parallel, pad_id: int):
        self.par, self.pad_id = par, pad_id

    def anyone(self, working: bool) -> bool:
        """Whether any rank is working (one all-reduce, which every rank must call)."""
        return self.par.sum([1.0 if working else 0.0])[0] > 0

    def before_forward(self) -> None:
        self.anyone(True)

    def drain(self, model, device) -> None:
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=device)
        while self.anyone(False):
            model(input_ids=ids, use_cache=False)
