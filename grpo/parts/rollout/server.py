"""`grpo rollout serve`: one rollout engine (hf or vllm) served over HTTP to a trainer elsewhere.

The trainer's side is grpo/parts/rollout/remote.py (`rollout.engine=server`). Requests and answers
are JSON only (nothing from the network is unpickled); weights travel as a safetensors file in a
directory both sides read, never in a request:

GET  /health        -> {"ok": true, "version": v, "engine": "hf", "vocab_size": V}
POST /generate      {"prompt_ids": [[int]], "n": int, "sampling": {temperature, top_p, top_k,
                     max_new_tokens, stop, seed}}
                    -> {"version": v, "completion_ids", "logprobs", "finished", "texts"}: the Rollout's
                       fields (grpo/parts/rollout/base.py), `version` the weights that generated them
POST /load_weights  {"path": a safetensors file under the server's --weights-dir, "version": int}
                    -> {"version": v} once the engine holds those weights
POST /weight_transfer/{init,start,update,finish}
                    with --weight-transfer nccl (vLLM on GPUs): vLLM's own weight-transfer calls, the
                    tensors broadcast over NCCL beside the request (grpo/parts/rollout/nccl.py);
                    finish {"version": int} -> {"version": v}

Version 0 is the model's own files. A malformed request is 400 with {"error": why}; a failure of the
engine is 500, and the server goes on. One request uses the engine at a time (generation and weight
loads never interleave); /health answers meanwhile.

The HTTP side is the sandbox service's (grpo.sandbox.server.JSONServer / JSONHandler): reads bounded
by a deadline, one plain Content-Length, bodies over --max-body refused unread, a shared token
(required beyond loopback unless --insecure).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from grpo.parts.rollout.base import SamplingParams
from grpo.parts.rollout.nccl import ROUTES, parse_init_info, parse_update_info
from grpo.sandbox.server import JSONHandler, JSONServer, parse_json

TOKEN_ENV = "GRPO_ROLLOUT_TOKEN"
TOKEN_FILE_ENV = "GRPO_ROLLOUT_TOKEN_FILE"
MAX_ROWS = 1 << 16  # completions one /generate may ask for (prompts x n)


class _Handler(JSONHandler):
    server: "RolloutServer"

    def post_routes(self) -> dict[str, Any]:
        srv = self.server
        routes = {"/generate": lambda raw: self._answer(srv.generate, raw),
                  "/load_weights": lambda raw: self._answer(srv.load_weights, raw)}
        for route in ROUTES:
            stage = route.rsplit("/", 1)[1]
            routes[route] = lambda raw, stage=stage: self._answer(lambda req: srv.transfer(stage, req), raw)
        return routes

    def _answer(self, route, raw: bytes) -> None:
        try:
            req = parse_json(raw)
            if not isinstance(req, dict):
                raise ValueError(f"the body must be a JSON object, got {type(req).__name__}")
            code, out = 200, route(req)
        except (ValueError, TypeError) as e:  # the request's fault
            code, out = 400, {"error": str(e)[:500]}
        except Exception as e:  # the engine's: this request fails, the server goes on
            code, out = 500, {"error": f"{type(e).__name__}: {e}"[:500]}
        self._reply(code, out)


def _int(v: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be a whole number in [{lo}, {hi if hi is not None else 'inf'}), got {v!r}")
    return v


def _number(v: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def parse_generate(req: dict, vocab_size: int) -> tuple[list[list[int]], int, SamplingParams]:
    """A /generate body, checked field by field: (prompt_ids, n, sampling); ValueError names the fault."""
    unknown = set(req) - {"prompt_ids", "n", "sampling"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)[:5]} (known: prompt_ids, n, sampling)")
    prompts = req.get("prompt_ids")
    if not isinstance(prompts, list) or not all(isinstance(p, list) and p for p in prompts):
        raise ValueError("prompt_ids must be a list of non-empty lists of token ids")
    for p in prompts:
        for t in p:
            _int(t, "a token id", 0, vocab_size - 1)
    n = _int(req.get("n"), "n", 1, MAX_ROWS)
    if len(prompts) * n > MAX_ROWS:
        raise ValueError(f"at most {MAX_ROWS} completions per request (prompts x n)")
    sp = req.get("sampling")
    if not isinstance(sp, dict):
        raise ValueError("sampling must be an object")
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    if set(sp) - known:
        raise ValueError(f"unknown sampling fields {sorted(set(sp) - known)[:5]} (known: {sorted(known)})")
    stop = sp.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError("sampling.stop must be a list of non-empty strings")
    seed = sp.get("seed")
    return prompts, n, SamplingParams(
        temperature=_number(sp.get("temperature", 1.0), "sampling.temperature", 0.0, 1e4),
        top_p=_number(sp.get("top_p", 1.0), "sampling.top_p", 1e-9, 1.0),
        top_k=_int(sp.get("top_k", 0), "sampling.top_k", 0),
        max_new_tokens=_int(sp.get("max_new_tokens", 32), "sampling.max_new_tokens", 1, 1 << 20),
        stop=stop, seed=None if seed is None else _int(seed, "sampling.seed", 0, 2**63 - 1))


class RolloutServer(JSONServer):
    """The HTTP service around `engine` (an HFEngine or VLLMEngine with a `load_weights_file`).
    Weight files are read only from under `weights_dir`."""

    service = "rollout server"
    exposure = "could replace the served weights and use this host's accelerators"
    token_hint = f"--token-file FILE (or {TOKEN_ENV})"

    def __init__(self, engine, engine_name: str, vocab_size: int, weights_dir: str, host: str = "127.0.0.1",
                 port: int = 0, *, max_body: int = 256 << 20, request_timeout: float = 60.0,
                 io_timeout: float = 600.0, max_connections: int = 64, token: str | None = None,
                 insecure: bool = False, weight_transfer: str = "files", workers: int = 1):
        self.weights_dir = Path(weights_dir).resolve()
        if not self.weights_dir.is_dir():
            raise ValueError(f"--weights-dir {weights_dir}: no such directory")
        super().__init__(host, port, _Handler, max_body=max_body, max_connections=max_connections,
                         request_timeout=request_timeout, io_timeout=io_timeout, token=token, insecure=insecure)
        self.engine, self.engine_name, self.vocab_size = engine, engine_name, vocab_size
        self.version = 0
        self.weight_transfer, self.workers = weight_transfer, workers  # workers: the engine's NCCL ranks
        self._engine_lock = threading.Lock()

    def health(self) -> dict[str, Any]:
        """GET /health: the weights version held, the engine, the vocabulary size, how weights arrive."""
        return {"ok": True, "version": self.version, "engine": self.engine_name, "vocab_size": self.vocab_size,
                "connections": self.connections, "weight_transfer": self.weight_transfer, "workers": self.workers}

    def generate(self, req: dict) -> dict:
        """/generate: the engine's Rollout fields and the weights version that produced them."""
        prompts, n, sampling = parse_generate(req, self.vocab_size)
        with self._engine_lock:
            ro = self.engine.generate(prompts, n, sampling)
            version = self.version
        return {"version": version, "completion_ids": ro.completion_ids, "logprobs": ro.logprobs,
                "finished": ro.finished, "texts": ro.texts}

    def load_weights(self, req: dict) -> dict:
        """/load_weights: the engine loads the safetensors file `path` (under --weights-dir) as `version`."""
        if set(req) != {"path", "version"}:
            raise ValueError("load_weights takes exactly {\"path\": str, \"version\": int}")
        version = _int(req["version"], "version", 0)
        if not isinstance(req["path"], str):
            raise ValueError("path must be a string")
        path = Path(req["path"]).resolve()
        if self.weights_dir not in path.parents or not path.is_file() or path.suffix != ".safetensors":
            raise ValueError(f"{req['path'][:200]}: not a .safetensors file under the server's --weights-dir "
                             f"{self.weights_dir}")
        with self._engine_lock:
            self.engine.load_weights_file(str(path))
            self.version = version
        print(f"weights version {version} loaded from {path.name}", flush=True)  # the server's record of pushes
        return {"version": version}

    def transfer(self, stage: str, req: dict) -> dict:
        """/weight_transfer/<stage>: one of vLLM's weight-transfer calls (init, start, update, finish),
        in that order per push; finish makes `version` the one the server holds."""
        if self.weight_transfer != "nccl":
            raise ValueError("this server takes weights as files: start it with --weight-transfer nccl")
        if stage == "init":
            info = parse_init_info(req)
            with self._engine_lock:
                self.engine.init_weight_transfer(info)
            return {}
        if stage == "update":
            info = parse_update_info(req)
            with self._engine_lock:
                self.engine.update_weights_from(info)
            return {}
        if stage == "start":
            if req:
                raise ValueError("weight_transfer/start takes {}")
            with self._engine_lock:
                self.engine.start_weight_update()
            return {}
        if set(req) != {"version"}:
            raise ValueError("weight_transfer/finish takes exactly {\"version\": int}")
        version = _int(req["version"], "version", 0)
        with self._engine_lock:
            self.engine.finish_weight_update()
            self.version = version
        print(f"weights version {version} received over NCCL", flush=True)
        return {"version": version}


def serve(model, rollout, weights_dir: str, host: str = "127.0.0.1", port: int = 8420,
          weight_transfer: str = "files", **kw: Any) -> None:
    """Load `model` (a ModelConfig), start the `rollout` engine (a RolloutConfig: hf or vllm) on it and
    serve it until SIGINT or SIGTERM; the engine (and its processes) is closed on the way out.
    `weight_transfer="nccl"` (vllm on GPUs) also takes weights through vLLM's weight-transfer API."""
    from grpo.parts.config import ConfigError
    from grpo.parts.modeling import load_model, load_tokenizer, pick_device
    from grpo.parts.rollout import build_engine_from

    if rollout.engine not in ("hf", "vllm"):
        raise ConfigError(f"rollout.engine={rollout.engine}: a rollout server runs hf or vllm")
    if weight_transfer == "nccl" and rollout.engine != "vllm":
        raise ConfigError("--weight-transfer nccl goes through vLLM's weight-transfer API: serve rollout.engine=vllm")
    RolloutServer.check_access(host, kw.get("token"), kw.get("insecure", False))  # before the model loads
    if not Path(weights_dir).is_dir():
        raise ValueError(f"--weights-dir {weights_dir}: no such directory")
    tok = load_tokenizer(model.path)
    device = pick_device(model.device)
    policy = load_model(model.path, model.dtype, device=device)
    policy.eval()
    engine = build_engine_from(rollout, policy, tok, model.path, model.dtype, device,
                               engine_options={"weight_transfer": weight_transfer} if weight_transfer != "files" else None)
    try:
        vocab = policy.get_input_embeddings().weight.shape[0]
        srv = RolloutServer(engine, rollout.engine, vocab, weights_dir, host, port, weight_transfer=weight_transfer,
                            workers=rollout.tensor_parallel_size if rollout.engine == "vllm" else 1, **kw)
        signal.signal(signal.SIGTERM, _exit)  # the engine's processes are closed below, not orphaned
        srv.run(f" (engine {rollout.engine}, model {model.path}, weights from {srv.weights_dir}; pid {os.getpid()})")
    finally:
        engine.close()


def _exit(signum, frame) -> None:
    sys.exit(0)
