"""Server mode (issue 24): `grpo rollout serve` processes behind `rollout.engine=server`.

Real servers on loopback (in this process, or `grpo rollout serve` subprocesses), the real client;
nothing under test is mocked."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from grpo.parts.config import ConfigError
from grpo.parts.modeling import load_model, load_tokenizer
from grpo.parts.rollout.base import SamplingParams
from grpo.parts.rollout.hf import HFEngine
from grpo.parts.rollout.remote import RolloutServerError, ServerEngine
from grpo.parts.rollout.server import RolloutServer
from tests.conftest import ROOT, pids_with

SP = SamplingParams(max_new_tokens=6, seed=7)
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]


def perturbed(model_dir, seed: int = 0):
    """The tiny model with its weights moved off the files' (a trainer's model after some steps)."""
    model = load_model(str(model_dir))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def in_process_server(tiny_model_dir, tmp_path):
    """A RolloutServer on the tiny model with the hf engine, served by a thread of this process."""
    weights = tmp_path / "weights"
    weights.mkdir()
    model = load_model(str(tiny_model_dir))
    srv = RolloutServer(HFEngine(model, load_tokenizer(str(tiny_model_dir))), "hf", model.config.vocab_size,
                        str(weights))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, weights
    srv.shutdown()
    srv.server_close()
    t.join(10)


def post(url: str, route: str, body) -> tuple[int, dict]:
    req = urllib.request.Request(url + route, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_server_engine_samples_what_the_trainer_s_own_engine_samples(in_process_server, tiny_model_dir, tmp_path):
    srv, weights = in_process_server
    model = perturbed(tiny_model_dir)
    engine = ServerEngine(model, [srv.url], str(weights), timeout_s=30)
    assert srv.version == engine.version == 1  # the trainer's weights pushed at the start
    remote = engine.generate(PROMPTS, 3, SP)
    local = HFEngine(model, load_tokenizer(str(tiny_model_dir))).generate(PROMPTS, 3, SP)
    assert remote.completion_ids == local.completion_ids and remote.texts == local.texts
    assert remote.finished == local.finished and remote.prompt_ids == local.prompt_ids
    gap = max(abs(a - b) for x, y in zip(remote.logprobs, local.logprobs) for a, b in zip(x, y))
    assert gap < 1e-5
    # a push: a new version, the file written once and the older one removed
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    from grpo.parts.rollout import whole_parameters

    engine.update_weights(whole_parameters(model))  # the file now, the load queued behind what was sent
    engine.wait()
    assert srv.version == engine.version == 2 and engine.loaded == {srv.url: [1, 2]}
    assert [f.name.rsplit("-", 1)[1] for f in weights.iterdir()] == ["v2.safetensors"]
    engine.close()
    assert not list(weights.iterdir())


def test_the_server_refuses_bad_requests_with_one_line(in_process_server, tmp_path):
    srv, weights = in_process_server
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    bad = [
        ("/generate", {"prompt_ids": [[1]], "n": 0, "sampling": {}}, "n must be"),
        ("/generate", {"prompt_ids": [[10 ** 9]], "n": 1, "sampling": {}}, "a token id must be"),
        ("/generate", {"prompt_ids": [[1]], "n": 1, "sampling": {"temperature": "hot"}}, "sampling.temperature"),
        ("/generate", {"prompt_ids": [[1]], "n": 1, "sampling": {}, "pickle": 1}, "unknown fields"),
        ("/load_weights", {"path": str(outside), "version": 3}, "not a .safetensors file under"),
        ("/load_weights", {"path": str(weights / "../weights/../elsewhere.safetensors"), "version": 3}, "not a"),
        ("/load_weights", {"path": str(weights / "none.safetensors"), "version": -1}, "version must be"),
    ]
    for route, body, message in bad:
        code, out = post(srv.url, route, body)
        assert code == 400 and message in out["error"] and "\n" not in out["error"], (route, body, out)
    # a file of the wrong model: 400 naming the parameters, and the version stays
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(weights / "other.safetensors"))
    code, out = post(srv.url, "/load_weights", {"path": str(weights / "other.safetensors"), "version": 5})
    assert code == 400 and "do not fit the served model" in out["error"] and srv.version == 0


def test_bad_server_settings_are_one_line(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir))
    for kw, message in [
        (dict(urls=[], weights_dir=str(tmp_path)), "needs rollout.server_urls"),
        (dict(urls=["localhost:8420"], weights_dir=str(tmp_path)), "is not a server's address"),
        (dict(urls=["http://127.0.0.1:1"], weights_dir=None), "needs rollout.server_weights_dir"),
        (dict(urls=["http://127.0.0.1:1"], weights_dir=str(tmp_path / "no")), "not a directory"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ServerEngine(model, **kw)


# ---- `grpo rollout serve` subprocesses ------------------------------------------------------------
class Served:
    """A `grpo rollout serve` subprocess on loopback (any free port); `stop()` ends and reaps it."""

    def __init__(self, model_dir, weights_dir, *extra: str, env: dict | None = None):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "grpo", "rollout", "serve", "--port", "0", "--weights-dir",
                                      str(weights_dir), f"model.path={model_dir}", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        deadline = time.monotonic() + 180
        line = ""
        while time.monotonic() < deadline and not line and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 1.0)[0]:
                line = self.proc.stdout.readline()
        assert line.startswith("rollout server on http://"), (line, self.proc.poll())
        self.url = line.split()[3]

    def stop(self) -> str:
        """SIGCONT (a stopped server), SIGTERM, reap; returns what it printed after its first line."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
        out, _ = self.proc.communicate(timeout=60)
        return out


@pytest.fixture
def serve(tiny_model_dir, tmp_path):
    """serve(n) -> n fresh servers on the tiny model sharing tmp_path/weights; all reaped afterwards."""
    weights = tmp_path / "weights"
    weights.mkdir()
    started: list[Served] = []

    def start(n: int = 1) -> list[Served]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(n) as pool:  # started side by side
            started.extend(pool.map(lambda _: Served(tiny_model_dir, weights), range(n)))
        return started[-n:]
    start.weights = weights
    yield start
    for s in started:
        s.stop()
    assert not pids_with(str(weights))  # nothing left running


@pytest.mark.slow
def test_grpo_train_through_a_server_keeps_the_log_prob_gap_small(tiny_model_dir, serve, tmp_path):
    from grpo.commands.train import train
    from tests.commands.test_train_e2e import cfg_for, read_metrics

    (srv,) = serve(1)
    cfg = cfg_for(tiny_model_dir, "rollout=server", f"rollout.server_urls=[{srv.url}]",
                  f"rollout.server_weights_dir={serve.weights}", "rollout.server_timeout_s=60", "trainer.max_steps=3",
                  "trainer.eval_every=0", "trainer.save_every=0", "optim.lr=1e-2", "rollout.max_new_tokens=6")
    children_before = set(_children())
    train(cfg, tmp_path / "run")
    steps = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    gaps = [r["rollout/logprob_abs_diff/max"] for r in steps]
    print("server mode, float32: engine/trainer log-prob gap (max) per step:", gaps)
    assert len(steps) == 3 and all(g < 1e-3 for g in gaps), gaps
    assert set(_children()) == children_before  # the trainer started nothing that outlives it
    assert not list(serve.weights.iterdir())  # its weight files removed
    printed = srv.stop()
    # the weights at the start, then one push after each of the 3 optimizer steps
    assert [ln.split()[2] for ln in printed.splitlines() if ln.startswith("weights version")] == ["1", "2", "3", "4"]


@pytest.mark.slow
def test_grpo_train_through_a_vllm_server(tiny_model_dir, tmp_path):
    """`grpo rollout serve rollout=vllm` (float32, CPU) behind `rollout=server`: 3 steps on-policy, then
    3 with rollout.max_staleness=1, both against the one server (each run pushes its versions from 1)."""
    pytest.importorskip("vllm", reason="vllm is not installed: `make setup-vllm` installs it (CI does)")
    from grpo.commands.train import train
    from tests.commands.test_train_e2e import cfg_for, read_metrics
    from tests.parts.test_vllm_lifetime import ENV, descendants, kill_leftovers, survivors

    weights = tmp_path / "weights"
    weights.mkdir()
    t0 = time.monotonic()
    srv = Served(tiny_model_dir, weights, "rollout=vllm", "rollout.max_model_len=256", "rollout.kv_cache_gib=0.0625",
                 "rollout.max_num_seqs=64", env={k: os.environ.get(k, v) for k, v in ENV.items()})
    started = time.monotonic() - t0
    engine_procs = descendants(srv.proc.pid)  # the watchdog, EngineCore (comm cut to 15 chars), its Worker
    try:
        assert any(row[2].startswith("VLLM::EngineCor") for row in engine_procs.values()), engine_procs

        def run(name, *extra):
            cfg = cfg_for(tiny_model_dir, "rollout=server", f"rollout.server_urls=[{srv.url}]",
                          f"rollout.server_weights_dir={weights}", "rollout.server_timeout_s=120",
                          "trainer.max_steps=3", "trainer.eval_every=0", "trainer.save_every=0", "optim.lr=1e-2",
                          "rollout.max_new_tokens=6", *extra)
            train(cfg, tmp_path / name)
            assert not list(weights.iterdir())  # the trainer's weight files removed
            return [r for r in read_metrics(tmp_path / name) if "loss" in r]

        children_before = set(_children())
        on = run("on_policy")
        gaps = [r["rollout/logprob_abs_diff/max"] for r in on]
        print(f"vLLM server (started in {started:.0f} s), float32: engine/trainer log-prob gap (max) per step:", gaps)
        assert [r["step"] for r in on] == [1, 2, 3] and all(g < 1e-3 for g in gaps), gaps
        lagged = run("lagged", "rollout.max_staleness=1")
        print("max_staleness=1: gap per step (step 2+ against one version older):",
              [r["rollout/logprob_abs_diff/max"] for r in lagged])
        assert [r["async/staleness"] for r in lagged] == [0, 1, 1]
        assert set(_children()) == children_before  # the trainer started nothing that outlives it
    finally:
        printed = srv.stop()
        left = survivors(engine_procs, timeout=30)  # vLLM's own shutdown may take a few seconds
        kill_leftovers(engine_procs)
    assert srv.proc.returncode == 0 and not left, (srv.proc.returncode, left)
    assert not pids_with(str(weights))
    loads = [ln.split()[2] for ln in printed.splitlines() if ln.startswith("weights version")]
    # each run: its weights at the start, then one push after each of the 3 optimizer steps
    assert loads == ["1", "2", "3", "4"] * 2, loads


def _children() -> list[int]:
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        return [int(c) for c in f.read().split()]


def _one_line(fn, timeout: float) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(RolloutServerError) as e:
        fn()
    took = time.monotonic() - t0
    assert "\n" not in str(e.value) and took < timeout + 5, (str(e.value), took)
    return str(e.value), took


@pytest.mark.slow
def test_a_killed_and_a_silent_server_are_one_line_within_the_timeout(tiny_model_dir, serve):
    model = load_model(str(tiny_model_dir))
    killed, silent = serve(2)
    timeout = 3.0
    a = ServerEngine(model, [killed.url], str(serve.weights), timeout_s=timeout)
    b, c = (ServerEngine(model, [silent.url], str(serve.weights), timeout_s=timeout) for _ in range(2))
    a.generate(PROMPTS, 2, SP), b.generate(PROMPTS, 2, SP)
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(30)
    line, took = _one_line(lambda: a.generate(PROMPTS, 2, SP), timeout)
    print(f"killed server: {took:.2f} s: {line}")
    assert killed.url in line and "not reachable" in line
    silent.proc.send_signal(signal.SIGSTOP)
    line, took = _one_line(lambda: b.generate(PROMPTS, 2, SP), timeout)
    print(f"silent server (generate): {took:.2f} s: {line}")
    assert silent.url in line and f"within rollout.server_timeout_s={timeout:g} s" in line and took >= timeout - 0.5
    from grpo.parts.rollout import whole_parameters

    line, took = _one_line(lambda: (c.update_weights(whole_parameters(model)), c.wait()), timeout)
    print(f"silent server (weight push): {took:.2f} s: {line}")
    assert silent.url in line and "/load_weights" in line


@pytest.mark.slow
def test_with_two_servers_one_killed_the_other_takes_over(tiny_model_dir, serve, caplog):
    from grpo.parts.rollout import whole_parameters

    model = perturbed(tiny_model_dir)
    first, second = serve(2)
    engine = ServerEngine(model, [first.url, second.url], str(serve.weights), timeout_s=5)
    both = engine.generate(PROMPTS, 2, SP)  # split: one share each
    second.proc.send_signal(signal.SIGKILL)
    second.proc.wait(30)
    after = engine.generate(PROMPTS, 2, SP)  # the killed one's share is redone on the first, same seed
    assert after.completion_ids == both.completion_ids and after.logprobs == both.logprobs
    assert engine.live == [first.url] and any(second.url in r.getMessage() and "dropped" in r.getMessage()
                                               for r in caplog.records)
    engine.update_weights(whole_parameters(model))  # the push goes on with the one left
    engine.wait()
    assert engine.loaded == {first.url: [1, 2], second.url: [1]}
    assert len(engine.generate(PROMPTS, 2, SP).completion_ids) == 6


@pytest.mark.slow
def test_grpo_train_names_a_silent_server_in_one_line(tiny_model_dir, serve, tmp_path):
    from tests.conftest import run_grpo

    (srv,) = serve(1)
    srv.proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    p = run_grpo("train", f"model.path={tiny_model_dir}", "rollout=server", f"rollout.server_urls=[{srv.url}]",
                 f"rollout.server_weights_dir={serve.weights}", "rollout.server_timeout_s=3", "trainer.max_steps=1",
                 f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    took = time.monotonic() - t0
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    print(f"grpo train against a silent server: exit {p.returncode} after {took:.1f} s: {err}")
    assert p.returncode == 1 and len(err) == 1, p.stderr[-3000:]
    assert err[0].startswith(f"grpo train: error: rollout server {srv.url}: no answer to /health within")


@pytest.mark.slow
def test_grpo_rollout_serve_refuses_bad_input_in_one_line(tmp_path):
    from tests.conftest import run_grpo

    for args, message in [
        (["--weights-dir", str(tmp_path / "no")], "--weights-dir"),
        (["--weights-dir", str(tmp_path), "task=gsm8k"], "task=gsm8k: a rollout server takes model.* and rollout.*"),
        (["--weights-dir", str(tmp_path), "rollout=server"], "a rollout server runs hf or vllm"),
        (["--weights-dir", str(tmp_path), "--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without a token"),
    ]:
        p = run_grpo("rollout", "serve", "--port", "0", *args, timeout=120)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and message in err[0], (args, p.stderr[-2000:])


@pytest.mark.slow
def test_lagged_rollouts_in_the_background_are_the_waiting_run_and_resume_exactly(tiny_model_dir, serve, tmp_path,
                                                                                   monkeypatch):
    # rollout.max_staleness = 1 through a server: step k trains while the server generates for step
    # k + 1. The same run made to wait for every rollout (the engine's submit hidden from the trainer)
    # sends the same requests with the same seeds and versions: the same weights, bit for bit. A run
    # stopped after step 4 (its checkpoint settles the rollout in flight) and resumed to 6 lands there too.
    import grpo.commands.train as T
    from tests.commands.test_train_e2e import cfg_for, read_metrics
    from tests.conftest import assert_resumed_exactly

    (srv,) = serve(1)

    def cfg(*extra):
        return cfg_for(tiny_model_dir, "rollout=server", f"rollout.server_urls=[{srv.url}]",
                       f"rollout.server_weights_dir={serve.weights}", "rollout.server_timeout_s=60",
                       "trainer.eval_every=0", "trainer.save_every=2", "optim.lr=1e-2", "rollout.max_new_tokens=6",
                       "rollout.max_staleness=1", *extra)

    T.train(cfg("trainer.max_steps=6"), tmp_path / "background")
    T.train(cfg("trainer.max_steps=4"), tmp_path / "part")
    T.train(cfg("trainer.max_steps=6", "trainer.resume=true"), tmp_path / "part")
    with monkeypatch.context() as m:
        m.setattr(T, "submits", lambda engine: False)
        T.train(cfg("trainer.max_steps=6"), tmp_path / "waiting")
    keys = ("reward/mean", "loss", "grad_norm", "offpolicy/weight_mean", "async/staleness")
    assert_resumed_exactly(tmp_path / "waiting", tmp_path / "background", range(1, 7), keys, 6)
    assert_resumed_exactly(tmp_path / "background", tmp_path / "part", (5, 6), keys, 6)
    steps = {r["step"]: r for r in read_metrics(tmp_path / "background") if "loss" in r}
    assert [steps[s]["async/staleness"] for s in range(1, 7)] == [0, 1, 1, 1, 1, 1]
    # the servers' log-probs travel as mu: one version old from step 2 on, so the weights move off 1
    assert all(steps[s]["offpolicy/weight_mean"] != 1.0 for s in range(2, 7))


@pytest.mark.slow
def test_lagged_ppo_in_the_background_is_the_waiting_run_and_resumes_exactly(tiny_model_dir, serve, tmp_path,
                                                                            monkeypatch):
    # grpo ppo with rollout.max_staleness = 1 through a server: generation for step k + 1 overlaps
    # step k's update, as in grpo train. Made to wait for every rollout (submit hidden), the run sends
    # the same requests with the same seeds: the same policy and critic, bit for bit; stopped after
    # step 4 (the checkpoint settles the rollout in flight) and resumed, it lands there too.
    from grpo.cli import compose_config
    from grpo.commands.ppo import run_ppo
    from grpo.parts import lag
    from tests.commands.test_ppo import overrides
    from tests.commands.test_train_e2e import read_metrics
    from tests.conftest import assert_resumed_exactly

    (srv,) = serve(1)

    def cfg(*extra):
        return compose_config("ppo", overrides(
            tiny_model_dir, "rollout=server", f"rollout.server_urls=[{srv.url}]",
            f"rollout.server_weights_dir={serve.weights}", "rollout.server_timeout_s=60", "rollout.max_new_tokens=6",
            "trainer.save_every=2", "optim.lr=1e-2", "rollout.max_staleness=1", "logger=jsonl", *extra))

    run_ppo(cfg("trainer.max_steps=6"), tmp_path / "background")
    run_ppo(cfg("trainer.max_steps=4"), tmp_path / "part")
    run_ppo(cfg("trainer.max_steps=6", "trainer.resume=true"), tmp_path / "part")
    with monkeypatch.context() as m:
        m.setattr(lag, "submits", lambda engine: False)
        run_ppo(cfg("trainer.max_steps=6"), tmp_path / "waiting")
    keys = ("objective/scores", "loss/policy", "loss/value", "offpolicy/weight_mean", "async/staleness")
    for a, b, steps in ((tmp_path / "waiting", tmp_path / "background", range(1, 7)),
                        (tmp_path / "background", tmp_path / "part", (5, 6))):
        assert_resumed_exactly(a, b, steps, keys, 6, marker="objective/scores")
        from safetensors.torch import load_file

        va, vb = (load_file(d / "checkpoints/step_000006/value/model.safetensors") for d in (a, b))
        assert all(torch.equal(va[k], vb[k]) for k in va)  # the critic too
    steps = {r["step"]: r for r in read_metrics(tmp_path / "background") if "objective/scores" in r}
    assert [steps[s]["async/staleness"] for s in range(1, 7)] == [0, 1, 1, 1, 1, 1]
    assert all(steps[s]["offpolicy/weight_mean"] != 1.0 for s in range(2, 7))


# ---- under torchrun: several trainer ranks sharing the servers ----------------------------------
def torchrun_train(model_dir, serve, servers, run_dir, *extra: str, worker: str | None = None):
    """`grpo train rollout=server` (or `worker`, a script taking its overrides) on 2 ranks against
    `servers`, 3 steps; asserts it ends with status 0 and leaves no weight file behind. Returns its
    step records."""
    from tests.commands.test_train_e2e import TOY, read_metrics
    from tests.conftest import torchrun

    urls = ",".join(s.url for s in servers)
    target = [str(ROOT / "tests" / worker)] if worker else ["-m", "grpo", "train"]
    torchrun(2, *target, f"model.path={model_dir}", "logger=jsonl", "trainer.prompts_per_step=4",
             "algorithm.group_size=4", "rollout.max_new_tokens=6", "trainer.eval_size=8", "task.eval_size=8", TOY,
             "rollout=server", f"rollout.server_urls=[{urls}]", f"rollout.server_weights_dir={serve.weights}",
             "rollout.server_timeout_s=60", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.save_every=0",
             "optim.lr=1e-2", f"hydra.run.dir={run_dir}", *extra, timeout=300)
    assert not list(serve.weights.iterdir())  # rank 0's weight files removed, the last one at its close
    return [r for r in read_metrics(run_dir) if "loss" in r]


def loaded_versions(printed: str) -> list[str]:
    return [ln.split()[2] for ln in printed.splitlines() if ln.startswith("weights version")]


def assert_same_runs(a, b, keys) -> None:
    """Runs in run dirs `a` and `b` logged the same `keys` at every step and ended with the same
    weights (their last checkpoints, sharded under torchrun), bit for bit."""
    from grpo.commands.export import load_checkpoint_model
    from tests.commands.test_train_e2e import read_metrics

    ra, rb = ([{k: r[k] for k in keys} for r in read_metrics(d) if "loss" in r] for d in (a, b))
    assert ra == rb and len(ra) == 3
    wa, wb = (load_checkpoint_model(d / "checkpoints" / "step_000003")[0].state_dict() for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_grpo_train_on_two_ranks_through_a_server_is_on_policy_and_reproducible(tiny_model_dir, serve, tmp_path):
    # Each rank generates its own 2 prompts x 4 through the server; rank 0 alone writes the weights,
    # and the ranks agree that the server holds a version before either asks it for one.
    (srv,) = serve(1)
    first = torchrun_train(tiny_model_dir, serve, [srv], tmp_path / "first", "parallel=ddp")
    gaps = [r["rollout/logprob_abs_diff/max"] for r in first]
    print("2 ranks (ddp) through one server, float32: engine/trainer log-prob gap (max over ranks) per step:", gaps)
    # float32 on both sides: only reordering noise (4.8e-7 in one process); a rank sampling with the
    # weights of a version before (lr 1e-2 moves them) is off by ~0.3 (max_staleness=1's gap)
    assert [r["step"] for r in first] == [1, 2, 3] and all(g < 1e-3 for g in gaps), gaps
    second = torchrun_train(tiny_model_dir, serve, [srv], tmp_path / "second", "parallel=ddp")
    assert [r["reward/mean"] for r in second] == [r["reward/mean"] for r in first]
    keys = ("reward/mean", "loss", "grad_norm", "rollout/logprob_abs_diff/max")
    assert_same_runs(tmp_path / "first", tmp_path / "second", keys)
    # each run: its weights at the start, then one push after each of its 3 steps, each loaded once
    # (one writer: two ranks pushing would load every version twice)
    assert loaded_versions(srv.stop()) == ["1", "2", "3", "4"] * 2


@pytest.mark.slow
def test_lagged_rollouts_on_two_fsdp2_ranks_in_the_background_are_the_waiting_run(tiny_model_dir, serve, tmp_path):
    # rollout.max_staleness = 1 under fsdp2 (whole_parameters gathers on both ranks, rank 0 writes):
    # the overlapped run sends step k + 1's requests from the lanes while the ranks train on step k.
    # The same run made to wait (tests/rollout_worker.py) sends the same requests with the same
    # seeds and versions one at a time: the same metrics and weights, bit for bit.
    (srv,) = serve(1)
    lag = ("parallel=fsdp2", "rollout.max_staleness=1")
    background = torchrun_train(tiny_model_dir, serve, [srv], tmp_path / "background", *lag)
    torchrun_train(tiny_model_dir, serve, [srv], tmp_path / "waiting", *lag, worker="rollout_worker.py")
    assert [r["async/staleness"] for r in background] == [0, 1, 1]
    assert background[0]["rollout/logprob_abs_diff/max"] < 1e-3  # step 1 is on-policy
    keys = ("reward/mean", "loss", "grad_norm", "offpolicy/weight_mean", "rollout/logprob_abs_diff/max")
    assert_same_runs(tmp_path / "waiting", tmp_path / "background", keys)
    assert loaded_versions(srv.stop()) == ["1", "2", "3", "4"] * 2


@pytest.mark.slow
def test_servers_killed_under_torchrun_end_every_rank_in_one_line(tiny_model_dir, serve, tmp_path):
    # Two servers, two ranks, the overlapped path (max_staleness=1). The first server killed once it
    # holds version 2: each rank that sees it fail drops it in one warning line and the run goes on
    # with the other; that one killed at version 4: no server left, every rank ends with one line.
    from tests.commands.test_train_e2e import TOY

    first, second = serve(2)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "grpo", "train",
         f"model.path={tiny_model_dir}", "logger=jsonl", "trainer.prompts_per_step=4", "algorithm.group_size=4",
         "rollout.max_new_tokens=6", "trainer.eval_size=8", "task.eval_size=8", TOY, "rollout=server",
         f"rollout.server_urls=[{first.url},{second.url}]", f"rollout.server_weights_dir={serve.weights}",
         "rollout.server_timeout_s=10", "rollout.max_staleness=1", "trainer.max_steps=200", "trainer.eval_every=0",
         "trainer.save_every=0", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        for srv, version in ((first, "2"), (second, "4")):
            until_loaded(srv, version, proc)
            srv.proc.send_signal(signal.SIGKILL)
            srv.proc.wait(30)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"torchrun ended {took:.1f} s after the last server was killed ({killed - t0:.0f} s in)")
    lines = [ln for ln in err.splitlines() if ln.startswith("grpo train: error")]
    assert proc.returncode != 0 and took < 10 + 5, (proc.returncode, took)  # rollout.server_timeout_s=10
    assert len(lines) == 2 and lines[0] != lines[1], err[-4000:]  # one per rank, the other tagged
    assert {ln.startswith("grpo train: error (rank 1): ") for ln in lines} == {True, False}
    assert all(second.url in ln for ln in lines), lines
    assert "[rank" not in err, err[-4000:]  # no worker's traceback
    drops = [ln for ln in err.splitlines() if f"rollout server {first.url}" in ln and "dropped; 1 rollout server" in ln]
    assert 1 <= len(drops) <= 2, err[-4000:]  # by each rank that saw it fail, once
    assert not list(serve.weights.iterdir())  # rank 0 removed its files on the way out
    assert not pids_with(str(run_dir))  # no rank left running


def until_loaded(srv: Served, version: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Read `srv`'s output until it has loaded `version` (the run `proc` still going)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([srv.proc.stdout], [], [], 0.5)[0]:
            line = srv.proc.stdout.readline()
            if line.startswith(f"weights version {version} loaded"):
                return
    raise AssertionError(f"{srv.url} did not load version {version} (the run: {proc.poll()})")


def test_a_push_the_disk_refuses_is_one_line_and_leaves_no_file(in_process_server, tiny_model_dir):
    # safetensors reports a failed write (a full disk, a file too large) as its own SafetensorError,
    # not an OSError: the push is still one RolloutServerError line naming rollout.server_weights_dir,
    # and the half-written temporary file is removed from the shared directory. The failure is real:
    # this process may write no file past 4 KiB while it pushes (the tiny model's file is larger).
    import resource

    from grpo.parts.rollout import whole_parameters

    srv, weights = in_process_server
    model = perturbed(tiny_model_dir)
    engine = ServerEngine(model, [srv.url], str(weights), timeout_s=30)
    try:
        saved = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, saved[0][1]))
        try:
            with pytest.raises(RolloutServerError) as e:
                engine.update_weights(whole_parameters(model))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, saved[0])
            signal.signal(signal.SIGXFSZ, saved[1])
        line = str(e.value)
        assert line.startswith(f"rollout.server_weights_dir={weights.resolve()}: cannot write the weights"), line
        assert "\n" not in line and "File too large" in line
        assert [f.name.rsplit("-", 1)[1] for f in weights.iterdir()] == ["v1.safetensors"]  # no v2 file, whole or half
        assert engine.version == srv.version == 1
    finally:
        engine.close()
