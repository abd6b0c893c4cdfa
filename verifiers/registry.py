"""Finding verifiers: built-ins by name, plugins through the `grpo.verifiers` entry-point group,
and anything importable through `_target_`.

A spec is a name ("math") or a mapping:

    {name: format, weight: 0.1, label: format_think, think: true}
    {_target_: mypkg.module:MyVerifier, weight: 0.5, threshold: 3}

`name` or `_target_` (module.Class or module:Class; any callable that returns a verifier) picks
the verifier; `weight` and `label` belong to the composition (verifiers/compose.py); every other
key is a constructor argument.

A third-party package declares its verifiers in its pyproject.toml:

    [project.entry-points."grpo.verifiers"]
    myname = "mypkg.module:MyVerifier"

Name collisions: a built-in name always means the built-in (installing a package never changes
what an existing config does); a plugin that declares the same name is reported by
`grpo verifiers` and in a warning when the name is used, and can still be picked by `_target_`.
Two plugins that declare the same name make that name an error until one is picked by `_target_`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from grpo.verifiers.base import has_score_method

log = logging.getLogger(__name__)

BUILTINS = {
    "math": "grpo.verifiers.math:MathVerifier",
    "format": "grpo.verifiers.format:FormatVerifier",
    "code": "grpo.verifiers.code:CodeVerifier",
    "prefs_rule": "grpo.verifiers.prefs_rule:PrefsRuleVerifier",
}
ENTRY_POINT_GROUP = "grpo.verifiers"
COMPOSE_KEYS = ("weight", "label")  # spec keys that are not constructor arguments


class VerifierConfigError(ValueError):
    """A verifier spec that cannot be built (bad arguments, a constructor that refuses them...)."""


class VerifierNotFound(VerifierConfigError):
    """No verifier by that name or target, or a name that several plugins declare."""


@dataclass(frozen=True)
class Found:
    """One place a verifier name comes from."""

    name: str
    target: str  # module:attr
    origin: str  # "builtin" or "plugin <distribution> <version>"
    entry_point: Any = None  # importlib.metadata.EntryPoint for plugins


def _import(target: str, what: str) -> Any:
    if ":" in target:
        module, _, attr = target.partition(":")
    else:
        module, _, attr = target.rpartition(".")
    if not module or not attr:
        raise VerifierNotFound(f"{what}: {target!r} is not an import path; write module.Class or module:Class")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise VerifierNotFound(f"{what}: cannot import module {module!r} for {target!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise VerifierNotFound(f"{what}: module {module!r} has no attribute {attr!r}") from None
    return obj


def discover(group: str = ENTRY_POINT_GROUP, builtins: Mapping[str, str] | None = None) -> dict[str, list[Found]]:
    """Every name that can be used, with every place it comes from (built-in first): the verifiers
    by default; the environments (grpo/envs) with their own group and built-ins.

    Only reads package metadata; nothing is imported.
    """
    builtins = BUILTINS if builtins is None else builtins
    found: dict[str, list[Found]] = {n: [Found(n, t, "builtin")] for n, t in builtins.items()}
    seen: set[tuple[str, str, str]] = set()
    for ep in entry_points(group=group):
        dist = getattr(ep, "dist", None)
        dist_name = getattr(dist, "name", None) or "?"
        key = (ep.name, ep.value, dist_name)
        if key in seen:  # the same distribution reachable twice on sys.path
            continue
        seen.add(key)
        version = getattr(dist, "version", "") or ""
        origin = f"plugin {dist_name} {version}".rstrip()
        found.setdefault(ep.name, []).append(Found(ep.name, ep.value, origin, ep))
    return found


def collisions(found: dict[str, list[Found]] | None = None) -> dict[str, list[Found]]:
    """Names declared in more than one place."""
    found = discover() if found is None else found
    return {n: fs for n, fs in found.items() if len(fs) > 1}


def describe(f: Found) -> str:
    return f"{f.origin}: {f.target}"


def available() -> dict[str, str]:
    """name -> where it comes from, with collisions spelled out (for `grpo verifiers`)."""
    out = {}
    for name, fs in discover().items():
        text = describe(fs[0])
        if len(fs) > 1 and fs[0].origin == "builtin":
            text += "; shadowed plugin(s): " + ", ".join(describe(f) for f in fs[1:]) + " (use _target_)"
        elif len(fs) > 1:
            text = "COLLISION, use _target_: " + " | ".join(describe(f) for f in fs)
        out[name] = text
    return out


_warned: set[str] = set()


def resolve(name: str) -> tuple[Any, Found]:
    """The factory (usually a class) a name stands for, and where it came from."""
    found = discover()
    fs = found.get(name)
    if not fs:
        raise VerifierNotFound(f"unknown verifier {name!r}; known: {', '.join(sorted(found))} "
                               "(see `grpo verifiers`; or give `_target_: module.Class`)")
    chosen = fs[0]
    if len(fs) > 1 and chosen.origin == "builtin":
        if name not in _warned:
            _warned.add(name)
            log.warning("verifier name %r is a built-in and also declared by %s; using the built-in "
                        "(pick the plugin with `_target_: %s`)", name, ", ".join(describe(f) for f in fs[1:]),
                        fs[1].target)
    elif len(fs) > 1:
        raise VerifierNotFound(f"verifier name {name!r} is declared by several plugins: "
                               f"{'; '.join(describe(f) for f in fs)}; pick one with `_target_: module:Class`")
    if chosen.entry_point is None:
        return _import(chosen.target, f"built-in verifier {name!r}"), chosen
    try:
        return chosen.entry_point.load(), chosen
    except Exception as e:  # noqa: BLE001 - a broken plugin is reported, whatever it raised
        raise VerifierNotFound(f"verifier plugin {name!r} ({describe(chosen)}) failed to load: "
                               f"{type(e).__name__}: {e}") from e


def spec_parts(spec: str | Mapping[str, Any]) -> tuple[str | None, str | None, dict[str, Any]]:
    """(name, _target_, constructor kwargs) of a spec; `weight` and `label` are dropped."""
    if isinstance(spec, str):
        return spec, None, {}
    if not isinstance(spec, Mapping):
        raise VerifierConfigError(f"verifier spec {spec!r} must be a name or a mapping with `name` or `_target_`")
    kwargs = {str(k): v for k, v in spec.items() if k not in COMPOSE_KEYS}
    target, name = kwargs.pop("_target_", None), kwargs.pop("name", None)
    if target and name:
        raise VerifierConfigError(f"verifier spec {dict(spec)!r}: give `name` or `_target_`, not both "
                                  "(use `label` to name a `_target_` verifier's metrics)")
    if not target and not name:
        raise VerifierConfigError(f"verifier spec {dict(spec)!r} needs `name` or `_target_`")
    return name, target, kwargs


def build_verifier(spec: str | Mapping[str, Any]) -> Any:
    """Instantiate one verifier from a spec (a name, or a mapping; `weight`/`label` are ignored here)."""
    name, target, kwargs = spec_parts(spec)
    what = f"verifier {name or target!r}"
    factory = _import(target, what) if target else resolve(name)[0]
    if not callable(factory):
        raise VerifierConfigError(f"{what}: {type(factory).__name__} is not a class or factory to call")
    try:
        v = factory(**kwargs)
    except TypeError as e:
        raise VerifierConfigError(f"{what}: bad arguments {kwargs}: {e}") from e
    except Exception as e:  # noqa: BLE001 - the constructor refused its arguments
        raise VerifierConfigError(f"{what}: construction failed: {type(e).__name__}: {e}") from e
    if not has_score_method(v):
        raise VerifierConfigError(f"{what} ({type(v).__name__}) has neither score(completions, samples) "
                                  "nor async ascore(completions, samples)")
    return v
