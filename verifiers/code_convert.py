"""Convert the test formats of common code datasets into the ``tests`` of the code verifier.

* APPS / TACO ``input_output`` (``{"inputs", "outputs", "fn_name"?}``, often a JSON string)
* LiveCodeBench test cases (``[{"input", "output", "testtype": "stdin"|"functional"}]``)
* HumanEval ``test`` + ``entry_point`` and MBPP ``test_list`` (+ setup code / imports)

Asserts of the form ``assert f(<literals>) == <literal>`` are turned into ``call`` tests, which
are judged outside the sandbox; any other assert keeps the ``assert`` form (see
``verifiers/code.py`` for why ``call`` is the stronger of the two).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["from_apps", "from_livecodebench", "from_humaneval", "from_mbpp", "asserts_to_tests"]

_JSON_TYPES = (type(None), bool, int, float, str)


def _jsonable(x: Any) -> Any:
    """JSON form of a Python literal; tuples become lists; raises TypeError for the rest."""
    if isinstance(x, _JSON_TYPES):
        return x
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        return {k: _jsonable(v) for k, v in x.items()}
    raise TypeError(f"{type(x).__name__} is not JSON")


def _text(x: Any) -> str:
    if isinstance(x, list):  # TACO sometimes stores stdin/stdout as a list of lines
        return "\n".join(map(str, x))
    return str(x)


def from_apps(input_output: str | Mapping[str, Any], *, unwrap_single: bool = True) -> dict[str, Any]:
    io = json.loads(input_output) if isinstance(input_output, str) else input_output
    inputs, outputs = io["inputs"], io["outputs"]
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} inputs for {len(outputs)} outputs")
    fn = io.get("fn_name")
    if not fn:
        return {"stdio": [{"input": _text(i), "output": _text(o)} for i, o in zip(inputs, outputs)]}
    cases = []
    for args, out in zip(inputs, outputs):
        # APPS wraps a call's expected return value in a one-element list.
        if unwrap_single and isinstance(out, list) and len(out) == 1:
            out = out[0]
        cases.append({"args": list(args) if isinstance(args, list) else [args], "expected": out})
    return {"call": {"fn_name": fn, "cases": cases}}


def from_livecodebench(test_cases: str | Sequence[Mapping[str, Any]], metadata: str | Mapping[str, Any] | None = None
                       ) -> dict[str, Any]:
    cases = json.loads(test_cases) if isinstance(test_cases, str) else list(test_cases)
    meta = json.loads(metadata) if isinstance(metadata, str) else dict(metadata or {})
    kinds = {c.get("testtype", "stdin") for c in cases}
    if kinds <= {"stdin"}:
        return {"stdio": [{"input": c["input"], "output": c["output"]} for c in cases]}
    if kinds != {"functional"}:
        raise ValueError(f"mixed test types {sorted(kinds)}")
    fn = meta.get("func_name") or meta.get("fn_name")
    if not fn:
        raise ValueError("functional tests need metadata.func_name")
    out = []
    for c in cases:
        # One JSON value per line is one argument.
        args = [json.loads(line) for line in c["input"].split("\n") if line.strip()]
        out.append({"args": args, "expected": json.loads(c["output"])})
    return {"call": {"fn_name": fn, "cases": out}}


def _as_call(stmt: ast.stmt, fn_alias: dict[str, str]) -> dict[str, Any] | None:
    if not isinstance(stmt, ast.Assert):
        return None
    t = stmt.test
    if not (isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq)):
        return None
    left, right = t.left, t.comparators[0]
    if not isinstance(left, ast.Call):
        left, right = right, left
    if not (isinstance(left, ast.Call) and isinstance(left.func, ast.Name) and left.func.id in fn_alias):
        return None
    try:
        args = [_jsonable(ast.literal_eval(a)) for a in left.args]
        kwargs = {k.arg: _jsonable(ast.literal_eval(k.value)) for k in left.keywords if k.arg}
        if len(kwargs) != len(left.keywords):
            return None
        expected = ast.literal_eval(right)
        if isinstance(expected, tuple):
            return None  # a tuple result would be judged as a list: keep the exact assert
        expected = _jsonable(expected)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None
    case: dict[str, Any] = {"args": args, "expected": expected}
    if kwargs:
        case["kwargs"] = kwargs
    case["_fn"] = fn_alias[left.func.id]
    return case


def asserts_to_tests(asserts: Sequence[str], setup: str = "", fn_alias: Mapping[str, str] | None = None
                     ) -> dict[str, Any]:
    """``call`` tests when every assert is ``f(literals) == literal`` on one function (and no
    setup is needed), else ``assert`` tests."""
    stmts = []
    for a in asserts:
        body = ast.parse(a).body
        stmts.append(body[0] if len(body) == 1 else None)
    if fn_alias is None:
        names = {s.test.left.func.id for s in stmts if isinstance(s, ast.Assert) and isinstance(s.test, ast.Compare)
                 and isinstance(s.test.left, ast.Call) and isinstance(s.test.left.func, ast.Name)}
        fn_alias = {n: n for n in names}
    cases = [_as_call(s, dict(fn_alias)) if s is not None else None for s in stmts]
    fns = {c["_fn"] for c in cases if c}
    if not setup.strip() and cases and all(cases) and len(fns) == 1:
        for c in cases:
            del c["_fn"]
        return {"call": {"fn_name": fns.pop(), "cases": cases}}
    tests: dict[str, Any] = {"assert": list(asserts)}
    if setup.strip():
        tests["setup"] = setup
    return tests


def from_mbpp(test_list: Sequence[str], test_setup_code: str = "", test_imports: Sequence[str] = ()) -> dict[str, Any]:
    setup = "\n".join([*test_imports, test_setup_code or ""]).strip()
    return asserts_to_tests(list(test_list), setup)


def from_humaneval(test: str, entry_point: str) -> dict[str, Any]:
    """Each top-level assert of ``check(candidate)`` becomes one test; if ``check`` does more
    than assert (loops, helpers), the whole of it is one test."""
    tree = ast.parse(test)
    check = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None:
        raise ValueError("no check() in the HumanEval test")
    param = check.args.args[0].arg if check.args.args else "candidate"
    others = [n for n in tree.body if n is not check]
    setup = ast.unparse(ast.Module(body=others, type_ignores=[])) if others else ""
    doc = [n for n in check.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    if doc and all(isinstance(n, ast.Assert) for n in doc):
        asserts = [ast.unparse(n) for n in doc]
        if not setup.strip() or all(isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign)) and
                                    "METADATA" in ast.unparse(n) for n in others):
            conv = asserts_to_tests(asserts, "", {param: entry_point})
            if "call" in conv:
                return conv
        prefix = f"{setup}\n{param} = {entry_point}".strip()
        return {"assert": asserts, "setup": prefix}
    return {"assert": [f"check({entry_point})"], "setup": test}
