"""Finding verifiers by name: built-ins, the `grpo.verifiers` entry-point group, or `_target_`.

A spec is a name ("math"), or a mapping with `name` or `_target_` (module.Class), optional
`weight`, and constructor arguments: {name: format, weight: 0.1, think: true}.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

BUILTINS = {
    "math": "verifiers.math:MathVerifier",
    "format": "verifiers.format:FormatVerifier",
    "code": "verifiers.code:CodeVerifier",
}
ENTRY_POINT_GROUP = "grpo.verifiers"


class VerifierNotFound(ValueError):
    pass


def _import(target: str) -> Any:
    module, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise VerifierNotFound(f"cannot import verifier {target!r}: {e}") from e


def available() -> dict[str, str]:
    """name -> where it comes from ("builtin: module:Class" or "plugin <dist>: module:Class")."""
    found = {name: f"builtin: {t}" for name, t in BUILTINS.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep.dist, "name", "?")
        origin = f"plugin {dist}: {ep.value}"
        found[ep.name] = found[ep.name] + f" (collides with {origin})" if ep.name in found else origin
    return found


def _resolve_name(name: str) -> Any:
    eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if name in BUILTINS:
        if eps:
            raise VerifierNotFound(
                f"verifier name {name!r} is both a built-in and a plugin ({eps[0].value}); use _target_ to pick one")
        return _import(BUILTINS[name])
    if len(eps) > 1:
        raise VerifierNotFound(f"verifier name {name!r} is declared by several plugins: {[e.value for e in eps]}")
    if eps:
        try:
            return eps[0].load()
        except Exception as e:
            raise VerifierNotFound(f"verifier plugin {name!r} ({eps[0].value}) failed to load: {e}") from e
    raise VerifierNotFound(f"unknown verifier {name!r}; known: {', '.join(sorted(available()))}")


def build_verifier(spec: str | Mapping[str, Any]) -> Any:
    """Instantiate one verifier from a spec (the `weight` key, if any, is ignored here)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    spec.pop("weight", None)
    target, name = spec.pop("_target_", None), spec.pop("name", None)
    if not target and not name:
        raise VerifierNotFound(f"verifier spec {spec!r} needs `name` or `_target_`")
    cls = _import(target) if target else _resolve_name(name)
    try:
        v = cls(**spec)
    except TypeError as e:
        raise VerifierNotFound(f"verifier {name or target!r}: bad arguments {spec}: {e}") from e
    if name and getattr(v, "name", None) != name:
        try:
            v.name = name  # report under the name the user typed
        except AttributeError:
            pass
    if not callable(getattr(v, "score", None)):
        raise VerifierNotFound(f"verifier {name or target!r} has no score(completions, samples) method")
    return v
