"""The installed distribution claims one top-level import name, `grpo`, and works from a wheel alone."""

import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("grpo-*.whl")
    return whl


def test_wheel_installs_only_grpo(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"grpo"}
    top_level = [n for n in names if n.endswith("top_level.txt")]
    if top_level:  # setuptools writes it; when it does it must name grpo alone
        assert zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["grpo"]
    for must in ("grpo/verifiers/compose.py", "grpo/tasks/arithmetic.py", "grpo/sandbox/core.py",
                 "grpo/conf/train.yaml", "grpo/conf/task/arithmetic.yaml", "grpo/data/embedded_model/model.safetensors"):
        assert must in names, must


def test_installed_wheel_runs_without_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    code = ("import grpo, grpo.verifiers.compose, grpo.tasks.arithmetic, grpo.sandbox.core, importlib.util;"
            "from grpo.cli import compose_config;"
            "cfg = compose_config('train', ['task=arithmetic']);"
            "assert cfg['task']['_target_'] == 'grpo.tasks.arithmetic.ArithmeticTask';"
            "assert importlib.util.find_spec('verifiers') is None and importlib.util.find_spec('tasks') is None;"
            "print(grpo.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))  # the wheel's copy, not the checkout's


def test_the_editable_install_of_make_setup_prints_no_setuptools_notice(tmp_path):
    """The first `make train` installs the checkout editable, and setuptools' editable build ends with
    an "Editable installation" notice block that pip 25+ shows even with -q. The Makefile's
    QUIET_EDITABLE setting (read from the Makefile, as make passes it) filters it by its message. The
    build hook pip calls is called here directly (an editable wheel, nothing installed): without
    the setting the notice is there, so the check would see it."""
    import os
    import re

    setting = re.search(r'^QUIET_EDITABLE := PYTHONWARNINGS="([^"]+)"$', (ROOT / "Makefile").read_text(), re.M)
    assert setting, "Makefile: QUIET_EDITABLE := PYTHONWARNINGS=\"...\""
    build = "from setuptools import build_meta; build_meta.build_editable(__import__('sys').argv[1])"

    def notice(**env) -> str:
        out = tmp_path / str(len(env))
        out.mkdir()
        p = subprocess.run([sys.executable, "-c", build, str(out)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env={**os.environ, **env}, check=True)
        assert list(out.glob("grpo-*.editable-*.whl"))
        return p.stderr

    assert "Editable installation" in notice()
    assert "Editable installation" not in notice(PYTHONWARNINGS=setting.group(1))
