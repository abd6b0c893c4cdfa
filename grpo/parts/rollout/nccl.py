"""Weights to rollout servers over NCCL, through vLLM's own weight-transfer API
(`rollout.server_weight_transfer=nccl`, servers started with `grpo rollout serve --weight-transfer nccl`).

The default push writes one safetensors file per step into a directory every server reads (remote.py):
it runs anywhere, CPU included, and is what CI tests. On GPUs the file's round trip through host
memory and disk is the slow part; vLLM (0.32) has an API for exactly this push: the serving engine
is started with a weight-transfer backend (`weight_transfer_config`), joins an NCCL group with the
trainer (`init_weight_transfer_engine`), and each update is `start_weight_update`, then
`update_weights` (the workers receive a broadcast from the trainer, rank 0 of the group), then
`finish_weight_update`. vLLM's trainer side (NCCLTrainerWeightTransferEngine) drives those calls
through a client object; ours (`_Client`) sends them to the rollout server's /weight_transfer/*
routes, so the server's token, timeouts and one-request-at-a-time engine lock apply as to every
other request, and the server's weights version is set by the same finish that ends the update.

One NCCL group per server: the trainer's rank 0 is rank 0 of each, the server's workers (its
tensor-parallel ranks) follow. The group's rendezvous is a TCP store the trainer opens on
`rollout.server_nccl_host` (127.0.0.1 when every server is on this host) at a free port.

What is given up against the file push: a push is synchronous (the generations already sent are
waited for first, since the server receives with its engine), so with rollout.max_staleness >= 1
the push no longer overlaps a generation; and a server that dies during the broadcast is noticed by
the HTTP side within rollout.server_timeout_s, while the trainer's broadcast to it may block (NCCL
has no timeout here); and the receiving side does not list the parameters that got nothing (the
file path's reload does, and fails naming them): a name vLLM's model does not know shows only in
the step's engine/trainer log-prob gap. Needs CUDA and vllm on both sides (the trainer imports
vLLM's trainer engine).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch

from grpo.parts.config import ConfigError

ROUTES = ("/weight_transfer/init", "/weight_transfer/start", "/weight_transfer/update", "/weight_transfer/finish")
# what vLLM's NCCL receiver may allocate (update_info's dtype_names)
DTYPES = ("float32", "float16", "bfloat16")


class _Client:
    """vLLM's VLLMWeightSyncClient protocol (four methods) over one rollout server's routes; `call`
    is the ServerEngine's request function (url, route, body) -> answer."""

    def __init__(self, call: Callable[[str, str, Any], dict], url: str):
        self.call, self.url = call, url
        self.version = 0  # set before each send: finish_weight_update makes it the server's

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.call(self.url, ROUTES[0], {"init_info": init_info})

    def start_weight_update(self) -> None:
        self.call(self.url, ROUTES[1], {})

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.call(self.url, ROUTES[2], {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        out = self.call(self.url, ROUTES[3], {"version": self.version})
        if out.get("version") != self.version:
            from grpo.parts.rollout.remote import RolloutServerError

            raise RolloutServerError(f"rollout server {self.url}: answered version {out.get('version')} to the "
                                     f"NCCL push of version {self.version}")


def _source(pairs: list[tuple[str, torch.Tensor]]):
    """vLLM's WeightSource over (name, whole tensor) pairs already gathered (whole_parameters)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class Pairs(WeightSource):
        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in pairs]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            return iter(pairs)

    return Pairs()


def rendezvous_host(urls: list[str], host: str | None) -> str:
    """The address the servers reach the trainer's NCCL store at: `host`, or 127.0.0.1 when every
    server is on this host; otherwise a ConfigError asking for rollout.server_nccl_host."""
    import urllib.parse

    if host:
        return host
    names = {urllib.parse.urlsplit(u).hostname for u in urls}
    if names <= {"127.0.0.1", "localhost", "::1"}:
        return "127.0.0.1"
    raise ConfigError("rollout.server_weight_transfer=nccl with servers on other hosts needs "
                      "rollout.server_nccl_host: this trainer's address the servers can reach")


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NCCLPush:
    """The trainer's end: one vLLM NCCL trainer engine per server, opened at construction (each
    server joins at its /weight_transfer/init); `push` broadcasts the weights as one version."""

    def __init__(self, call: Callable[[str, str, Any], dict], workers: dict[str, int], host: str):
        if not torch.cuda.is_available():
            raise ConfigError("rollout.server_weight_transfer=nccl needs a CUDA GPU on the trainer (on CPU the "
                              "weights travel as files: rollout.server_weight_transfer=files)")
        try:
            from vllm.distributed.weight_transfer.nccl_engine import (NCCLTrainerInitInfo,
                                                                       NCCLTrainerWeightTransferEngine)
        except ImportError as e:
            raise ConfigError(f"rollout.server_weight_transfer=nccl needs vllm on the trainer too ({e})") from None
        self.pairs: list[tuple[str, torch.Tensor]] = []
        self.engines: dict[str, Any] = {}
        self.clients: dict[str, _Client] = {}
        try:
            for url, n in workers.items():
                client = _Client(call, url)
                info = NCCLTrainerInitInfo(master_address=host, master_port=free_port(host), world_size=1 + n, rank=0)
                self.engines[url] = NCCLTrainerWeightTransferEngine.trainer_init(
                    info, client=client, source=_source(self.pairs))
                self.clients[url] = client
        except BaseException:
            self.close()  # the groups already opened
            raise

    def push(self, pairs: list[tuple[str, torch.Tensor]], version: int, urls: list[str]) -> None:
        """Broadcast `pairs` (whole tensors) to the servers `urls` as `version`; NCCL sends from the
        GPU (a trainer on model.device=cpu has its tensors copied there one by one)."""
        self.pairs[:] = [(name, t if t.is_cuda else t.to("cuda")) for name, t in pairs]  # the sources iterate this
        try:
            for url in urls:
                self.clients[url].version = version
                self.engines[url].send_weights()
        finally:
            self.pairs.clear()

    def close(self) -> None:
        for engine in self.engines.values():
            engine.shutdown()
        self.engines.clear()


# ---- the server's side ------------------------------------------------------------------------
def _names(v: Any, name: str, kind: type) -> list:
    if not isinstance(v, list) or not all(isinstance(x, kind) and not isinstance(x, bool) for x in v):
        raise ValueError(f"{name} must be a list of {kind.__name__}")
    return v


def parse_init_info(req: dict) -> dict[str, Any]:
    """/weight_transfer/init's body: {"init_info": {master_address, master_port, rank_offset, world_size,
    packed, packed_buffer_size_bytes, packed_num_buffers}} (what vLLM's trainer engine sends)."""
    info = req.get("init_info")
    if set(req) != {"init_info"} or not isinstance(info, dict):
        raise ValueError("weight_transfer/init takes {\"init_info\": {...}}")
    allowed = {"master_address": str, "master_port": int, "rank_offset": int, "world_size": int, "packed": bool,
               "packed_buffer_size_bytes": int, "packed_num_buffers": int}
    for k, v in info.items():
        if k not in allowed or not isinstance(v, allowed[k]) or (allowed[k] is int and isinstance(v, bool)):
            raise ValueError(f"init_info.{k[:50]}: not a field of NCCL weight transfer, or of the wrong type")
    if not {"master_address", "master_port", "rank_offset", "world_size"} <= set(info):
        raise ValueError("init_info needs master_address, master_port, rank_offset and world_size")
    return info


def parse_update_info(req: dict) -> dict[str, Any]:
    """/weight_transfer/update's body: {"update_info": {"names": [str], "dtype_names": [str], "shapes": [[int]]}}."""
    info = req.get("update_info")
    if set(req) != {"update_info"} or not isinstance(info, dict) or set(info) != {"names", "dtype_names", "shapes"}:
        raise ValueError("weight_transfer/update takes {\"update_info\": {\"names\", \"dtype_names\", \"shapes\"}}")
    names = _names(info["names"], "names", str)
    dtypes = _names(info["dtype_names"], "dtype_names", str)
    shapes = _names(info["shapes"], "shapes", list)
    for s in shapes:
        _names(s, "each shape", int)
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError("names, dtype_names and shapes must be as long")
    bad = sorted(set(dtypes) - set(DTYPES))
    if bad:
        raise ValueError(f"dtype_names: {bad[0][:20]} is not one of {list(DTYPES)}")
    return info
