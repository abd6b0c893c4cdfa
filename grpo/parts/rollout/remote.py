"""`rollout.engine=server`: generation by `grpo rollout serve` processes (grpo/parts/rollout/server.py).

Several servers (`rollout.server_urls`): the prompts of a rollout are split into as many contiguous
shares as there are servers alive, generated at once, one share each. A server that fails (gone,
silent for `rollout.server_timeout_s`, or a 5xx) is dropped for the rest of the run, with one warning
line naming it, and its share goes to another: the run goes on while one is left. Each share's seed
is fixed before it is sent (drawn from the trainer's RNG, so runs reproduce through trainer.seed),
so a share redone elsewhere is the same sample. When no server is left, or one refuses a request
(4xx), the error is one line (RolloutServerError) naming the URL and why.

Weights: `update_weights` writes the trainer's whole weights once, as safetensors, into
`rollout.server_weights_dir` (a temporary name, then an atomic rename), tells every server to load
that file as the next version and checks the version each one answers; the older files are then
removed. Every /generate answer carries the version that generated it, which must be the one pushed
before the request was made: a server that missed a push (or that another trainer pushed to) is
never used silently. With rollout.server_weight_transfer=nccl the weights are broadcast instead,
through vLLM's weight-transfer API (grpo/parts/rollout/nccl.py), with no file.

One lane: every request (a generation, a weight load) goes through one worker thread in the order
the trainer made it, so a server sees them in that order. `submit` sends a generation and returns at
once (a Future): grpo train's lagged rollouts (rollout.max_staleness >= 1) train on step k while the
servers generate for step k + eta. `update_weights` writes the file at once (a snapshot of weights
the next optimizer step will change) and queues the load behind the generations already sent; a
load that fails surfaces at the next generation's result. `generate` is `submit(...).result()`, so
waiting or not, the same requests go out in the same order with the same seeds.

Several trainer ranks (torchrun; `lockstep` given): every rank sends its own share of a step's
prompts, and the ranks' lanes agree in a gloo group of their own, so an overlapped request that
leaves after the main thread moved on is covered too. Every lane item ends on every rank at once:
after each generation the ranks exchange what failed and which servers they still use (a server one
rank dropped is dropped by all, with the warning line on the rank that saw it fail; any rank's
failure is raised on every rank, one line each); a weight push writes its file once, on rank 0, and
its load waits until every rank's earlier generations are answered, is sent by rank 0 alone and
ends, on every rank, only once the servers hold the new version. So a server never loads a version
while a request for the one before is in flight, never gets a request for a version before it has
loaded it, and loads each version once; rank 0 removes a file once the servers hold the next one.
The multi-turn engine takes as many turns on every rank (`lockstep`), so the ranks' lanes hold the
same items.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from grpo.parts.config import ConfigError
from grpo.parts.rollout.base import Rollout, SamplingParams
from grpo.parts.rollout.server import TOKEN_ENV, TOKEN_FILE_ENV

log = logging.getLogger(__name__)


class RolloutServerError(RuntimeError):
    """No rollout server can do what the trainer asks; the message is one line naming the URL."""


class _Gone(RolloutServerError):
    """One server failed in a way another server may not (gone, silent, 5xx): the others take over."""


class ServerEngine:
    """The engine interface (generate, update_weights, close) over rollout servers at `urls`. The
    trainer's `model` is pushed once at the start (version 1): it may differ from the servers' files
    (a resumed run, an SFT'd policy)."""

    def __init__(self, model, urls: list[str], weights_dir: str | None, timeout_s: float = 600.0,
                 token_file: str | None = None, lockstep=None, weight_transfer: str = "files",
                 nccl_host: str | None = None):
        from grpo.sandbox.client import load_token

        if not urls:
            raise ConfigError("rollout.engine=server needs rollout.server_urls: the `grpo rollout serve` URLs, "
                              "e.g. rollout.server_urls=[http://127.0.0.1:8420]")
        for url in urls:
            parts = urllib.parse.urlsplit(str(url))
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ConfigError(f"rollout.server_urls: {url!r} is not a server's address (http://HOST:PORT)")
        if weight_transfer not in ("files", "nccl"):
            raise ConfigError(f"rollout.server_weight_transfer={weight_transfer}: use files or nccl")
        if not weights_dir and weight_transfer == "files":
            raise ConfigError("rollout.engine=server needs rollout.server_weights_dir: a directory the trainer "
                              "writes and every server reads (the one given to `grpo rollout serve --weights-dir`)")
        self.dir = Path(weights_dir).resolve() if weight_transfer == "files" else None
        if self.dir is not None and (not self.dir.is_dir() or not os.access(self.dir, os.W_OK)):
            raise ConfigError(f"rollout.server_weights_dir={weights_dir}: not a directory this process can write")
        try:
            token = load_token(None, token_file, TOKEN_ENV, TOKEN_FILE_ENV, "rollout server")
        except ValueError as e:
            raise ConfigError(f"rollout.server_token_file: {e}") from None
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.urls = [str(u).rstrip("/") for u in urls]
        self.live = list(self.urls)
        self._lock = threading.Lock()
        self.dropped: dict[str, str] = {}  # url -> why it was dropped
        self.timeout = float(timeout_s)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to the servers
        self._prefix = f"grpo-weights-{os.getpid()}-{id(self):x}"
        self.version = 0  # the last version pushed (its load may still wait in the lane)
        self.loaded: dict[str, list[int]] = {u: [] for u in self.urls}  # the versions each server confirmed
        # several trainer ranks: the multi-turn engine's turn count agreed (Lockstep), the lanes' own group
        self.lockstep = lockstep
        self.par = lockstep.par if lockstep is not None and lockstep.par.world > 1 else None
        self._group = _lane_group(self.par) if self.par is not None else None
        self._writes = self.par is None or self.par.rank == 0  # the one rank that writes and loads the weights
        health = self._each(lambda url: self._call(url, "/health"))
        self._lane = ThreadPoolExecutor(1, thread_name_prefix="grpo-rollout-lane")
        self._failed: BaseException | None = None  # a queued load's failure, raised by the next generation
        self._nccl = None  # rollout.server_weight_transfer=nccl: the trainer's end (grpo/parts/rollout/nccl.py)
        if weight_transfer == "nccl":
            self._open_nccl(health, nccl_host)
        from grpo.parts.rollout import whole_parameters

        self.update_weights(whole_parameters(model))
        self.wait()  # the first load done (or its failure raised) now

    # ---- HTTP ---------------------------------------------------------------------------------
    def _call(self, url: str, route: str, body: Any = None) -> dict:
        """One request to one server; a failure is _Gone (another may do it) or RolloutServerError, one line each."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url + route, data=data, headers=self._headers)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                why = json.loads(e.read()).get("error", "")
            except (ValueError, AttributeError, OSError):
                why = ""
            line = f"rollout server {url}: {route} answered HTTP {e.code}: {why}".rstrip(": ")
            raise (_Gone if e.code >= 500 else RolloutServerError)(line) from None
        except (TimeoutError, socket.timeout):
            raise _Gone(f"rollout server {url}: no answer to {route} within rollout.server_timeout_s="
                        f"{self.timeout:g} s (stopped or overloaded?)") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Gone(f"rollout server {url}: no connection within rollout.server_timeout_s="
                            f"{self.timeout:g} s") from None
            raise _Gone(f"rollout server {url}: not reachable ({_why(reason)})") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise _Gone(f"rollout server {url}: the connection broke during {route} ({_why(e)}; the server died?)") \
                from None

    def _drop(self, url: str, e: _Gone) -> None:
        with self._lock:
            if url in self.live:
                self.live.remove(url)
                self.dropped[url] = str(e)
            left = list(self.live)
        if not left:
            raise RolloutServerError(str(e)) from None
        log.warning("%s: dropped; %d rollout server(s) left: %s", e, len(left), ", ".join(left))

    def _alive(self) -> list[str]:
        """The servers still in use; none left is a RolloutServerError with the last one's fault."""
        if not self.live:
            raise RolloutServerError(f"no rollout server left: {list(self.dropped.values())[-1]}")
        return list(self.live)

    def _each(self, fn) -> dict[str, Any]:
        """fn(url) on every live server at once; the ones that fail are dropped (see _drop)."""
        urls = self._alive()
        with ThreadPoolExecutor(len(urls)) as pool:
            futures = {url: pool.submit(fn, url) for url in urls}
        out = {}
        for url, f in futures.items():
            try:
                out[url] = f.result()
            except _Gone as e:
                self._drop(url, e)
        return out

    # ---- the engine interface ----------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        """The rollout of `prompt_ids` x `n`, split across the servers alive (see the module's doc)."""
        return self.submit(prompt_ids, n, sampling).result()

    def submit(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> Future:
        """Send the generation now, in the lane, and return its Future (-> Rollout). The seed is drawn
        here, from the trainer's RNG in the trainer's order, and the weights version the answer must
        carry is the last one pushed."""
        base = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))
        return self._lane.submit(self._generate, prompt_ids, n, replace(sampling, seed=base), self.version)

    def _generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, version: int) -> Rollout:
        if self._group is None:
            return self._generate_here(prompt_ids, n, sampling, version)
        if self._failed is not None:  # every rank has it, at the same item: no exchange
            raise self._failed
        try:
            ro, error = self._generate_here(prompt_ids, n, sampling, version), None
        except Exception as e:  # noqa: BLE001 - told to the other ranks, then raised here
            ro, error = None, e
        said = self._agree((None if error is None else str(error), self.live))
        self._adopt([live for _, live in said])
        if error is not None:
            self._failed = error if isinstance(error, RolloutServerError) else RolloutServerError(str(error))
            raise error
        failed = [(r, why) for r, (why, _) in enumerate(said) if why is not None]
        if failed:
            self._failed = RolloutServerError(f"{failed[0][1]} (seen by trainer rank {failed[0][0]})")
        if self._failed is not None:
            raise self._failed
        return ro

    def _generate_here(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, version: int) -> Rollout:
        """This rank's generation, split across the servers alive."""
        if self._failed is not None:
            raise self._failed
        if not prompt_ids:
            return Rollout(prompt_ids=[], completion_ids=[], texts=[], logprobs=[], finished=[])
        base = sampling.seed
        k = min(len(self._alive()), max(len(prompt_ids), 1))
        bounds = [len(prompt_ids) * i // k for i in range(k + 1)]
        shares = [(prompt_ids[bounds[i]:bounds[i + 1]], replace(sampling, seed=(base + 1_000_003 * i) % 2**31))
                  for i in range(k)]
        with ThreadPoolExecutor(k) as pool:
            futures = [pool.submit(self._generate_share, i, prompts, n, sp, version)
                       for i, (prompts, sp) in enumerate(shares)]
        ro = Rollout(prompt_ids=[p for p in prompt_ids for _ in range(n)], completion_ids=[], texts=[], logprobs=[],
                     finished=[])
        for f in futures:
            out = f.result()
            ro.completion_ids += out["completion_ids"]
            ro.logprobs += out["logprobs"]
            ro.finished += out["finished"]
            ro.texts += out["texts"]
        if len(ro.completion_ids) != len(ro.prompt_ids):
            raise RolloutServerError(f"rollout servers {', '.join(self.live)}: {len(ro.completion_ids)} completions "
                                     f"for {len(ro.prompt_ids)} rows")
        return ro

    def _generate_share(self, i: int, prompts: list[list[int]], n: int, sampling: SamplingParams, version: int) -> dict:
        """Share i on its server, else (that one gone) on the next one alive, until none is left."""
        body = {"prompt_ids": prompts, "n": n, "sampling": asdict(sampling)}
        while True:
            live = self._alive()
            url = live[i % len(live)]
            try:
                out = self._call(url, "/generate", body)
            except _Gone as e:
                self._drop(url, e)
                continue
            if out.get("version") != version:
                raise RolloutServerError(f"rollout server {url}: generated with weights version {out.get('version')}, "
                                         f"but this trainer pushed version {version} (another trainer uses it?)")
            return out

    def update_weights(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write the weights once into the shared directory now; queue every server's load of them in
        the lane (checked there: the versions answered). Over NCCL: `_push_nccl`."""
        from safetensors.torch import save_file

        if self.dir is None:
            return self._push_nccl(named_params)

        version = self.version + 1
        path = self.dir / f"{self._prefix}-v{version}.safetensors"
        if not self._writes:  # another rank writes; this one runs through the gathers (fsdp2) with it
            for _ in named_params:
                pass
            self.version = version
            self._lane.submit(self._load, path, version)
            return
        state = {name: p.detach().to("cpu").contiguous() for name, p in named_params}
        tmp = path.with_name(path.name + ".tmp")
        unwritten = None
        try:
            save_file(state, str(tmp))
            os.replace(tmp, path)  # a server never reads a half-written file
        except Exception as e:  # noqa: BLE001 - safetensors' failed write (a full disk) is a SafetensorError
            from grpo.parts.checkpoint import os_cause

            if not isinstance(e, OSError) and os_cause(e) is None:
                raise  # not the disk: a bug, with its traceback
            tmp.unlink(missing_ok=True)
            unwritten = RolloutServerError(f"rollout.server_weights_dir={self.dir}: cannot write the weights ({e})")
            if self._group is None:
                raise unwritten from None
        del state
        self.version = version
        self._lane.submit(self._load, path, version, unwritten)  # the other ranks hear of a failure there

    def wait(self) -> None:
        """Until everything sent has been answered; a queued load's failure is raised here."""
        self._lane.submit(lambda: None).result()
        if self._failed is not None:
            raise self._failed

    def _load(self, path: Path, version: int, unwritten: RolloutServerError | None = None) -> None:
        if self._failed is not None:
            return
        if self._group is not None:
            return self._load_ranks(path, version, unwritten)
        try:
            self._push(path, version)
        except RolloutServerError as e:
            self._failed = e
            return
        self._remove_files(below=version)

    def _push(self, path: Path, version: int) -> list[str]:
        """Every live server loads `path` as `version`; returns the ones that confirmed it."""
        answers = self._each(lambda url: self._call(url, "/load_weights", {"path": str(path), "version": version}))
        for url, out in answers.items():
            if out.get("version") != version:
                raise RolloutServerError(f"rollout server {url}: answered version {out.get('version')} to the "
                                         f"push of version {version}")
            self.loaded[url].append(version)
        return list(answers)

    # ---- several trainer ranks: the lanes' agreement -------------------------------------------
    def _load_ranks(self, path: Path, version: int, unwritten: RolloutServerError | None) -> None:
        """A push under torchrun, on every rank's lane: wait for every rank (their generations sent
        before this push are answered), rank 0 has the servers load the file, every rank learns the
        outcome (the servers left, a failure) before its next generation leaves."""
        self._adopt(self._agree(self.live))
        why, confirmed = None, []
        if self._writes and self._failed is None:
            try:
                if unwritten is not None:
                    raise unwritten
                confirmed = self._push(path, version)
            except RolloutServerError as e:
                why = str(e)
        why, live, confirmed = self._agree((why, self.live, confirmed))[0]  # rank 0's
        self._adopt([live])
        if not self._writes:
            for url in confirmed:
                self.loaded[url].append(version)
        if why is not None:
            self._failed = self._failed or RolloutServerError(why)
        elif self._failed is None and self._writes:
            self._remove_files(below=version)

    def _agree(self, mine: Any) -> list[Any]:
        """Every rank's `mine`, in rank order, exchanged in the lanes' group; a rank gone is a failure
        that ends every later lane item at once (no exchange left waiting)."""
        import torch.distributed as dist

        said: list[Any] = [None] * self.par.world
        try:
            dist.all_gather_object(said, mine, group=self._group)
        except Exception as e:  # noqa: BLE001 - a rank ended (its process gone) or the group timed out
            self._failed = RolloutServerError(f"rollout server lane: the other trainer ranks stopped answering "
                                              f"({_why(e)})")
            raise self._failed from None
        return said

    def _adopt(self, lives: list[list[str]]) -> None:
        """Use only the servers every rank still uses (`lives`: each rank's list); the one that saw a
        server fail said so in its warning line. None left is this lane's failure, on every rank."""
        with self._lock:
            for url in [u for u in self.live if not all(u in live for live in lives)]:
                self.live.remove(url)
                self.dropped[url] = f"rollout server {url}: dropped by another trainer rank"
                log.info("rollout server %s: dropped by another trainer rank", url)
        if not self.live and self._failed is None:
            self._failed = RolloutServerError(f"no rollout server left: {list(self.dropped.values())[-1]}")

    # ---- weights over NCCL (rollout.server_weight_transfer=nccl) --------------------------------
    def _open_nccl(self, health: dict[str, dict], host: str | None) -> None:
        """Every server must take weights over NCCL; rank 0 opens one NCCL group with each."""
        from grpo.parts.rollout.nccl import NCCLPush, rendezvous_host

        for url, h in health.items():
            if h.get("weight_transfer") != "nccl":
                raise ConfigError(f"rollout.server_weight_transfer=nccl: the rollout server {url} takes weights as "
                                  "files (start it with `grpo rollout serve --weight-transfer nccl`)")
        if self._writes:
            self._nccl = NCCLPush(self._call, {url: int(h.get("workers", 1)) for url, h in health.items()},
                                  rendezvous_host(self.urls, host))

    def _push_nccl(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The weights broadcast to every live server over NCCL, synchronously: every rank runs
        through the parameters (fsdp2's gathers), and waits until its generations sent before are
        answered (a server receives with its engine); rank 0 broadcasts; every rank learns the
        outcome before its next generation leaves with the new version. Only rank 0 keeps the whole
        tensors (the others let each gathered one go at once)."""
        pairs = list(named_params) if self._writes else [None for _ in named_params]
        self.wait()
        if self.par is not None:
            self.par.barrier()  # every rank's earlier generations answered
        version, why = self.version + 1, None
        if self._writes:
            try:
                live = self._alive()
                self._nccl.push(pairs, version, live)
                for url in live:
                    self.loaded[url].append(version)
            except Exception as e:  # noqa: BLE001 - vLLM's and NCCL's errors too: one line on every rank
                why = str(e) if isinstance(e, RolloutServerError) else \
                    f"rollout.server_weight_transfer=nccl: the push of version {version} failed ({_why(e)})"
        del pairs
        if self.par is not None:
            why = self.par.gather(why)[0]  # rank 0's outcome, on every rank
        if why is not None:
            self._failed = RolloutServerError(why)
            raise self._failed
        self.version = version

    def _remove_files(self, below: int | None = None) -> None:
        """This trainer's weight files of versions before `below` (None: all of them)."""
        if self.dir is None:
            return
        for f in self.dir.glob(f"{self._prefix}-v*.safetensors*"):
            v = f.name[len(self._prefix) + 2:].split(".")[0]
            if below is None or not v.isdigit() or int(v) < below:
                f.unlink(missing_ok=True)

    def close(self) -> None:
        """Let the lane finish what was sent, then remove this trainer's weight files; the servers
        are not ours to stop."""
        self._lane.shutdown(wait=True)
        self._remove_files()
        if self._nccl is not None:
            self._nccl.close()


def _lane_group(par):
    """A gloo group of the trainer ranks for the lanes' exchanges (beside the trainer's own
    collectives, from another thread), waiting as long as the trainer's (parallel.collective_timeout_s)."""
    import datetime

    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=par.timeout_s))


def _why(e: Any) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return (str(e) or type(e).__name__).splitlines()[0][:200]
