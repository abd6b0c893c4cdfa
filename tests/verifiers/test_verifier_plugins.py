"""Verifier discovery: built-ins, `grpo.verifiers` entry points of installed packages, `_target_`.

The fast tests put small hand-written distributions (a .dist-info with entry_points.txt, and a
module) on sys.path, so importlib.metadata really discovers them. The slow ones pip-install
examples/verifier_plugin into a temporary directory and drive it through the real CLI.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.commands.verify import verifiers_main, verify_main
from tests.conftest import ROOT
from grpo.verifiers.compose import RewardFunction
from grpo.verifiers.registry import VerifierNotFound, available, discover

VERIFIER_SRC = '''
from grpo.verifiers.base import Score

class {cls}:
    name = "{own}"

    def __init__(self, value=1.0):
        self.value = value

    def score(self, completions, samples):
        return [Score(self.value, {{"from": "{cls}"}}) for _ in completions]
'''


def make_dist(root: Path, dist: str, version: str, entry_points: dict[str, str], module: str | None = None,
              classes: tuple[str, ...] = ()) -> None:
    """An installed distribution as importlib.metadata sees one: NAME-VERSION.dist-info on sys.path."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "[grpo.verifiers]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    if module:
        (root / f"{module}.py").write_text("".join(VERIFIER_SRC.format(cls=c, own=c.lower()) for c in classes))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh directory on sys.path to install fake distributions into."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))  # also invalidates the import caches
    return root


def test_an_installed_plugin_is_found_by_name_and_reported_with_its_origin(site, capsys):
    make_dist(site, "acme-verifiers", "1.2", {"loud": "acme_v1:Loud"}, "acme_v1", ("Loud",))
    assert available()["loud"] == "plugin acme-verifiers 1.2: acme_v1:Loud"
    with RewardFunction([{"name": "loud", "weight": 0.5, "value": 0.8}]) as rf:
        rewards, infos, m = rf(["x", "y"], [{}, {}])
    assert rewards == pytest.approx([0.4, 0.4])
    assert m["reward/loud/mean"] == pytest.approx(0.8)  # labelled by the name asked for, not the class's own
    assert infos[0] == {"loud": {"from": "Loud"}}
    verifiers_main([])
    out = capsys.readouterr().out
    assert "loud             plugin acme-verifiers 1.2: acme_v1:Loud" in out
    assert "math             builtin: grpo.verifiers.math:MathVerifier" in out


def test_two_plugins_with_one_name_are_reported_and_target_picks_one(site):
    make_dist(site, "acme-a", "1.0", {"judge": "acme_a:JudgeA"}, "acme_a", ("JudgeA",))
    make_dist(site, "acme-b", "2.0", {"judge": "acme_b:JudgeB"}, "acme_b", ("JudgeB",))
    listed = available()["judge"]
    assert listed.startswith("COLLISION") and "acme_a:JudgeA" in listed and "acme_b:JudgeB" in listed
    with pytest.raises(VerifierNotFound, match=r"'judge' is declared by several plugins: plugin acme-a 1.0.*acme-b"):
        RewardFunction(["judge"])
    with RewardFunction([{"_target_": "acme_b:JudgeB", "label": "judge"}]) as rf:
        _, infos, _ = rf(["x"], [{}])
    assert infos[0]["judge"] == {"from": "JudgeB"}


def test_a_plugin_that_reuses_a_builtin_name_never_replaces_the_builtin(site, caplog):
    make_dist(site, "acme-fmt", "0.1", {"format": "acme_f:Format"}, "acme_f", ("Format",))
    assert "shadowed plugin(s): plugin acme-fmt 0.1: acme_f:Format" in available()["format"]
    with caplog.at_level(logging.WARNING, logger="grpo.verifiers.registry"):
        with RewardFunction(["format"]) as rf:
            _, infos, _ = rf(["\\boxed{1}"], [{}])
    assert infos[0]["format"]["reason"] == "ok"  # the built-in answered
    assert any("also declared by plugin acme-fmt" in r.getMessage() and "_target_: acme_f:Format" in r.getMessage()
               for r in caplog.records)


def test_a_plugin_that_fails_to_import_is_named_and_the_others_still_work(site):
    make_dist(site, "acme-broken", "0.3", {"broken": "acme_missing_module:Thing"})
    make_dist(site, "acme-ok", "0.3", {"fine": "acme_ok:Fine"}, "acme_ok", ("Fine",))
    with pytest.raises(VerifierNotFound, match=r"verifier plugin 'broken' \(plugin acme-broken 0.3: "
                                               r"acme_missing_module:Thing\) failed to load: ModuleNotFoundError"):
        RewardFunction(["broken"])
    assert "broken" in available()  # listing reads metadata only; nothing is imported
    with RewardFunction(["fine"]) as rf:
        assert rf(["x"], [{}])[0] == [1.0]


def test_the_same_distribution_reachable_twice_is_not_a_collision(site, tmp_path, monkeypatch):
    make_dist(site, "acme-twice", "1.0", {"twice": "acme_t:Twice"}, "acme_t", ("Twice",))
    copy = tmp_path / "copy"
    shutil.copytree(site, copy)
    monkeypatch.syspath_prepend(str(copy))
    assert len(discover()["twice"]) == 1
    assert not available()["twice"].startswith("COLLISION")


def test_grpo_verify_works_for_every_discovered_verifier(site, tmp_path, capsys):
    make_dist(site, "acme-verify", "1.0", {"acme_verify": "acme_vv:Verify"}, "acme_vv", ("Verify",))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"completion": "so \\\\boxed{2}", "answer": "2", "tests": {"stdio": []}}\n'
                    '{"completion": "no idea", "answer": "3", "tests": {"stdio": []}}\n')
    names = sorted(discover())
    assert {"math", "format", "code", "acme_verify"} <= set(names)
    for name in names:
        assert verify_main(["--verifier", name, "--timeout", "60", str(rows)]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert len(lines) == 2, name
        assert all(0.0 <= x["reward"] <= 1.0 and isinstance(x["info"], dict) for x in lines), (name, lines)
    # Spot checks that the rows really reached the verifiers.
    verify_main(["--verifier", "math", str(rows)])
    assert [json.loads(x)["reward"] for x in capsys.readouterr().out.splitlines()] == [1.0, 0.0]
    verify_main(["--verifier", "format", "--args", '{"boxed": true}', str(rows)])
    assert [json.loads(x)["info"]["reason"] for x in capsys.readouterr().out.splitlines()] == ["ok", "one_boxed_answer"]


def test_grpo_verify_reports_failing_rows_and_keeps_going(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"completion": "ok"}\n{"completion": "boom"}\n{"completion": "fine"}\n')
    assert verify_main(["--verifier", "tests.verifiers.test_compose:RaisesOn", str(rows)]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(x)["reward"] for x in out.splitlines()] == [1.0, 0.0, 1.0]
    assert "1 of 3 rows got 0 because verifier 'raises_on' failed on them" in err


# ---- the example package, installed for real --------------------------------------------------

EXAMPLE = ROOT / "examples" / "verifier_plugin"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    """pip-installs examples/verifier_plugin into a temporary directory; returns that directory."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (target / "grpo_concise" / "verifier.py").exists()
    return target


def run_with(site_dir: Path, *args: str, timeout: int = 600, **env_extra: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site_dir), str(ROOT)]), **env_extra)
    return subprocess.run([sys.executable, "-m", "grpo", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


@pytest.mark.slow
def test_example_plugin_is_listed_and_scores_through_grpo_verify(installed_example, tmp_path):
    r = run_with(installed_example, "verifiers", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "concise          plugin grpo-concise 0.1.0: grpo_concise.verifier:ConciseVerifier" in r.stdout
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"completion": "x" * 10}) + "\n"
                    + json.dumps({"completion": "x" * 30, "max_chars": 20}) + "\n")
    r = run_with(installed_example, "verify", "--verifier", "concise", "--args", '{"max_chars": 50}', str(rows),
                 timeout=120)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x) for x in r.stdout.splitlines()] == [
        {"reward": 1.0, "info": {"chars": 10, "budget": 50}},
        {"reward": 0.5, "info": {"chars": 30, "budget": 20}},  # the row's own budget: 10 over 20
    ]


@pytest.mark.slow
def test_example_plugin_own_tests_pass(installed_example):
    tests = Path(installed_example).parent / "src" / "tests"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(installed_example), str(ROOT)]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                       capture_output=True, text=True, timeout=120, cwd=tests.parent, env=env)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "3 passed" in r.stdout


@pytest.mark.slow
def test_example_plugin_trains_beside_a_raising_verifier_and_its_metrics_reach_jsonl_and_wandb(
        installed_example, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    verifiers = ("task.verifiers=[{name: concise, weight: 1.0, max_chars: 8},"
                 " {name: format, label: fmt, weight: 0.1},"
                 " {_target_: tests.toy_verifiers.RaisesOnOdd, weight: 0.0}]")
    r = run_with(installed_example, "train", f"model.path={tiny_model_dir}", "logger=wandb", "logger.mode=offline",
                 "trainer.max_steps=2", "trainer.prompts_per_step=4", "algorithm.group_size=2",
                 "rollout.max_new_tokens=4", "trainer.eval_size=4", "task.eval_size=4", "trainer.eval_every=0",
                 verifiers, f"hydra.run.dir={run_dir}", WANDB_MODE="offline", HOME=str(tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_recs = [x for x in recs if "loss" in x]
    assert [x["step"] for x in train_recs] == [1, 2]
    for x in train_recs:
        for key in ("reward/concise/mean", "reward/fmt/mean", "reward/raises_on_odd/mean",
                    "verifier/concise/errors", "verifier/fmt/errors", "verifier/raises_on_odd/errors"):
            assert key in x, key
        assert x["verifier/concise/errors"] == 0
        # weight 0: the raising verifier changes nothing; the total is the concise reward (+ <= 0.1 format)
        assert x["reward/concise/mean"] <= x["reward/mean"] <= x["reward/concise/mean"] + 0.1 + 1e-9
    # 8 rows per step; rows with an odd first operand raise and are counted, the run goes on.
    assert sum(x["verifier/raises_on_odd/errors"] for x in train_recs) > 0
    out = r.stdout + r.stderr  # Hydra's console logging goes to stdout
    assert "verifier 'raises_on_odd': raised RuntimeError" in out and "Traceback" in out
    assert out.count("verifier 'raises_on_odd': raised RuntimeError") == 1  # logged once
    assert any("eval/reward/concise/mean" in x for x in recs)
    # wandb's offline record file holds each logged history key as a plain string (the API to parse
    # it is internal and moves between versions); the config holds verifier names, not these keys.
    records = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()
    for key in ("reward/concise/mean", "reward/fmt/mean", "verifier/raises_on_odd/errors"):
        assert key.encode() in data, key


@pytest.mark.slow
def test_fail_fast_stops_a_run_at_the_first_verifier_error_naming_it(tiny_model_dir, tmp_path):
    r = run_with(tmp_path / "nothing", "train", f"model.path={tiny_model_dir}", "logger=jsonl", "trainer.max_steps=2",
                 "trainer.prompts_per_step=4", "algorithm.group_size=2", "rollout.max_new_tokens=4",
                 "trainer.eval_size=4", "task.eval_size=4", "trainer.eval_every=0", "verifier.fail_fast=true",
                 "task.verifiers=[{_target_: tests.toy_verifiers.RaisesOnOdd}]", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode != 0
    assert ("VerifierError: verifier 'raises_on_odd': raised RuntimeError: odd operand (verifier.fail_fast=true)"
            in r.stderr)
    # It stopped in the evaluation before step 1: no step was trained, so no run dir is left
    assert not (tmp_path / "run").exists()
