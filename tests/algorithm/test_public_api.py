"""One public API: every tensor function and estimator of grpo/algorithm/ is importable from `grpo`,
listed in grpo.__all__ and documented in the README's "The algorithm, as functions", and importing
`grpo` (or a verifier) does not import torch."""

import importlib
import inspect
import re
import subprocess
import sys

import grpo
from tests.conftest import ROOT

ALGORITHM = ["advantages", "kl", "losses", "value", "preference_losses"]


def algorithm_functions() -> dict[str, object]:
    """Every public function and class defined in grpo/algorithm/ (the estimators: AdaptiveKL)."""
    found = {}
    for name in ALGORITHM:
        module = importlib.import_module(f"grpo.algorithm.{name}")
        for attr, obj in vars(module).items():
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)) \
                    and obj.__module__ == module.__name__:
                found[attr] = obj
    return found


def test_every_algorithm_function_is_importable_from_grpo_and_in_all():
    found = algorithm_functions()
    assert len(found) == 20  # 5 advantage (grpo, rloo, reinforce++, DAPO's two), 1 KL, 4 policy-loss, 6 PPO, 4 preference
    assert sorted(found) == grpo.__all__
    for name, obj in found.items():
        assert getattr(grpo, name) is obj, name
    from grpo import dpo_loss, gae, ppo_rewards, ranking_loss

    assert [dpo_loss, gae, ppo_rewards, ranking_loss] == [found[n] for n in ("dpo_loss", "gae", "ppo_rewards",
                                                                               "ranking_loss")]


def test_every_one_has_its_shapes_in_its_docstring():
    for name, obj in algorithm_functions().items():
        if inspect.isfunction(obj):
            assert re.search(r"\[[A-Z](, [A-Z])?\]", obj.__doc__ or ""), f"{name}: no [N] / [N, T] shape in its docstring"


def test_the_readme_table_lists_exactly_them():
    text = (ROOT / "README.md").read_text()
    section = text.split("## The algorithm, as functions", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)\(", section, flags=re.M))
    assert listed == set(grpo.__all__)


def test_importing_grpo_and_a_verifier_does_not_import_torch():
    code = ("import sys, grpo, grpo.verifiers.math; assert 'torch' not in sys.modules, 'torch imported'; "
            "grpo.gae; assert 'torch' in sys.modules")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr


def test_only_the_four_folders_beside_grpo_are_importable_as_grpo_names():
    """The checkout's verifiers/, tasks/, sandbox/ and conf/ are grpo.verifiers ...; tests/, bench/ and
    examples/ are not grpo.tests ... (pyproject's package-dir alone maps them)."""
    code = ("import importlib.util as u, grpo.verifiers, grpo.tasks, grpo.sandbox, grpo.conf; "
            "print([n for n in ('grpo.tests', 'grpo.bench', 'grpo.examples') if u.find_spec(n)])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr
