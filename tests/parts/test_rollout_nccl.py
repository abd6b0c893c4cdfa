"""The NCCL weight push (grpo/parts/rollout/nccl.py): what runs without a GPU.

The broadcast itself needs CUDA on both sides: tests/parts/test_cuda_smoke.py runs it on the next
GPU machine. Here: the server parses exactly the bodies vLLM's own trainer engine sends (built by
vLLM's code, so a change of the pinned vLLM's wire format fails here), refuses hostile ones in one
line, and the CPU-side refusals are one line each.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.request

import pytest
import torch

from grpo.parts.config import ConfigError
from grpo.parts.rollout.nccl import NCCLPush, parse_init_info, parse_update_info, rendezvous_host

from tests.parts.test_rollout_server import in_process_server  # noqa: F401 - a fixture

vllm = pytest.importorskip("vllm", reason="vllm is not installed: `make setup-vllm` installs it (CI does)")


def test_the_server_parses_what_vllm_s_trainer_engine_sends():
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

    # NCCLTrainerWeightTransferEngine.trainer_init sends worker_init_payload(...) of this, with rank_offset 1
    init = worker_init_payload(NCCLWeightTransferInitInfo(master_address="127.0.0.1", master_port=29555,
                                                          rank_offset=1, world_size=2, packed=True))
    assert parse_init_info({"init_info": init}) == init
    # send_weights sends asdict(NCCLWeightTransferUpdateInfo(...)) built from the source's metadata
    update = dataclasses.asdict(NCCLWeightTransferUpdateInfo(
        names=["model.embed_tokens.weight", "lm_head.weight"], dtype_names=[str(torch.float32).split(".")[-1]] * 2,
        shapes=[[32, 64], [32, 64]]))
    assert parse_update_info({"update_info": update}) == update


@pytest.mark.parametrize("body", [
    {},
    {"init_info": []},
    {"init_info": {"master_address": "127.0.0.1", "master_port": 1}},  # no rank_offset / world_size
    {"init_info": {"master_address": "127.0.0.1", "master_port": "1", "rank_offset": 1, "world_size": 2}},
    {"init_info": {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": True, "world_size": 2}},
    {"init_info": {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2,
                   "nccl_unique_id_b64": "AAAA"}},  # another rendezvous mode: not what our trainer sends
    {"init_info": {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2}, "x": 1},
])
def test_a_bad_init_body_is_refused(body):
    with pytest.raises(ValueError) as e:
        parse_init_info(body)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("info", [
    {"names": ["a"], "dtype_names": ["float32"]},  # no shapes
    {"names": ["a"], "dtype_names": ["float32"], "shapes": [[1]], "ipc_handles": []},
    {"names": ["a", "b"], "dtype_names": ["float32"], "shapes": [[1], [2]]},  # lengths differ
    {"names": ["a"], "dtype_names": ["complex128"], "shapes": [[1]]},  # not a dtype we allocate
    {"names": ["a"], "dtype_names": ["float32"], "shapes": [[1.5]]},
    {"names": [1], "dtype_names": ["float32"], "shapes": [[1]]},
    {"names": ["a"], "dtype_names": ["float32"], "shapes": [[True]]},
])
def test_a_bad_update_body_is_refused(info):
    with pytest.raises(ValueError) as e:
        parse_update_info({"update_info": info})
    assert "\n" not in str(e.value)


def test_the_rendezvous_host():
    assert rendezvous_host(["http://127.0.0.1:8420", "http://localhost:8421"], None) == "127.0.0.1"
    assert rendezvous_host(["http://10.0.0.5:8420"], "10.0.0.1") == "10.0.0.1"
    with pytest.raises(ConfigError, match="rollout.server_nccl_host"):
        rendezvous_host(["http://127.0.0.1:8420", "http://10.0.0.5:8420"], None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_nccl_without_cuda_is_one_line(tiny_model_dir):
    with pytest.raises(ConfigError, match="needs a CUDA GPU on the trainer"):
        NCCLPush(lambda *a: {}, {"http://127.0.0.1:1": 1}, "127.0.0.1")
    from grpo.parts.modeling import load_model, load_tokenizer
    from grpo.parts.rollout.vllm import VLLMEngine

    model = load_model(str(tiny_model_dir), "float32", device="cpu")
    with pytest.raises(ValueError, match="needs CUDA GPUs on both sides"):  # before any engine process starts
        VLLMEngine(model, load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir), device="cpu", weight_transfer="nccl")


# ---- the wiring, on a server that takes files -------------------------------------------------
def test_a_files_server_says_so_and_refuses_the_nccl_routes(in_process_server):
    from tests.parts.test_rollout_server import post

    srv, _ = in_process_server
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        health = json.loads(r.read())
    assert health["weight_transfer"] == "files" and health["workers"] == 1
    for route in ("/weight_transfer/init", "/weight_transfer/start", "/weight_transfer/update",
                  "/weight_transfer/finish"):
        code, out = post(url, route, {})
        assert code == 400 and "start it with --weight-transfer nccl" in out["error"], (route, code, out)
    assert srv.version == 0  # nothing changed


def test_a_trainer_asking_nccl_of_a_files_server_is_one_line_naming_it(in_process_server, tiny_model_dir):
    # checked from the servers' /health before any NCCL group is opened, so it runs without a GPU
    from grpo.parts.modeling import load_model
    from grpo.parts.rollout.remote import ServerEngine

    srv, _ = in_process_server
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    with pytest.raises(ConfigError) as e:
        ServerEngine(load_model(str(tiny_model_dir)), [url], None, weight_transfer="nccl")
    assert f"the rollout server {url} takes weights as files" in str(e.value) and "\n" not in str(e.value)
    assert srv.version == 0


@pytest.mark.slow
def test_grpo_rollout_serve_refuses_nccl_for_the_hf_engine(tmp_path):
    from tests.conftest import run_grpo

    p = run_grpo("rollout", "serve", "--port", "0", "--weights-dir", str(tmp_path), "--weight-transfer", "nccl",
                 "model.path=embedded", "rollout.engine=hf", timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "serve rollout.engine=vllm" in err[0], p.stderr[-2000:]
