"""The ``code`` verifier: run a completion's program against hidden tests in the sandbox.

Tests (``sample["tests"]``) come in three forms (``verifiers/code_convert.py`` makes them from
APPS/TACO, LiveCodeBench, HumanEval and MBPP rows):

* ``{"stdio": [{"input": str, "output": str}, ...]}``: the program reads stdin; its stdout must
  equal the expected output line by line, after stripping trailing whitespace of every line and
  trailing blank lines (line counts must match), and it must exit 0.
* ``{"call": {"fn_name": str, "cases": [{"args": [...], "kwargs": {...}, "expected": ...}]}}``:
  the function (top level, or a method of ``class Solution``) is called in the sandbox, its
  result serialised to JSON there by a strict encoder (exact builtin types only: an int
  subclass with a rigged ``__eq__`` is rejected, tuples become lists), and compared with
  ``expected`` *outside* the sandbox, by value and by JSON type (1 != 1.0 != True; floats within
  ``float_tol``). An exception is a failure, also when ``expected`` is None.
* ``{"assert": ["assert f(1) == 2", ...], "setup": "optional code run before each"}``: each
  assert is one test, run after the program in the same process. It passes only if the harness
  writes back a per-run random marker, which it reads from a pipe *after* the assert returned,
  so ``exit(0)``, ``os._exit(0)``, crashing, or patching the harness before the assert cannot
  pass it, and the marker is nowhere in the process (stack, files, environment) while the
  program's top-level code runs. ``==`` in the test is rewritten to a strict equality that never
  calls the program's ``__eq__`` when comparing with builtin values (always-equal objects fail).

Reward = fraction of tests passed. Every test is a fresh sandbox run (see ``sandbox/core.py``)
whose expected output never enters the sandbox, except assert tests, whose code must.

Threat model / NOT covered: the judged process is the candidate's, so for ``assert`` tests a
program that inspects its caller's frames or reads ``/box/test.py`` can learn the expected
values the assert names and hard-code them (prefer ``call`` tests, which the converters produce
for ``assert f(literals) == literal``), and a program that knows this harness's protocol could
read the marker pipe itself while the assert calls into it. ``stdio`` and ``call`` tests do not
have these weaknesses: the judgement happens outside with data the sandbox never saw.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from grpo.sandbox.client import SandboxServiceError
from grpo.sandbox.core import Limits, Result, Sandbox, default_sandbox
from grpo.verifiers.base import Score

__all__ = ["CodeVerifier", "extract_program", "compare_stdio", "compare_values"]

_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_program(completion: str) -> str:
    """The program in a completion: the last ```python block, else the last fenced block,
    else the completion itself (raw source)."""
    if "```" not in completion:
        return completion
    blocks = _FENCE.findall(completion)
    py = [code for lang, code in blocks if lang.lower() in ("python", "py", "python3")]
    if py:
        return py[-1]
    if blocks:
        return blocks[-1][1]
    return ""


def _norm_lines(text: str) -> list[str]:
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def compare_stdio(got: str, expected: str) -> bool:
    return _norm_lines(got) == _norm_lines(expected)


def compare_values(expected: Any, got: Any, float_tol: float = 1e-9) -> bool:
    """Equality of JSON values by value and by type (bool, int, float, str, None, list, dict)."""
    te, tg = type(expected), type(got)
    if te is float and tg is float:
        return math.isclose(expected, got, rel_tol=float_tol, abs_tol=float_tol)
    if te is not tg:
        return False
    if te is list:
        return len(expected) == len(got) and all(compare_values(e, g, float_tol) for e, g in zip(expected, got))
    if te is dict:
        return expected.keys() == got.keys() and all(compare_values(expected[k], got[k], float_tol) for k in expected)
    return expected == got


class _EqRewriter(ast.NodeTransformer):
    """``a == b`` -> ``__grpo_eq__(a, b)`` in test code (see the harness's ``_eq``)."""

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        if len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq):
            call = ast.Call(func=ast.Name("__grpo_eq__", ast.Load()), args=[node.left, node.comparators[0]], keywords=[])
            return ast.copy_location(call, node)
        return node


def _rewrite_test(src: str) -> str:
    tree = _EqRewriter().visit(ast.parse(src))
    return ast.unparse(ast.fix_missing_locations(tree))


# The harness runs inside the sandbox as the main program; the candidate is /box/solution.py.
# Everything it relies on is bound to locals before the candidate's code runs.
_HARNESS = r'''
import os, sys, json
_read, _write, _exit, _dumps, _type, _len = os.read, os.write, os._exit, json.dumps, type, len
_isinstance, _str, _repr = isinstance, str, repr
_chan = int(os.environ.pop("GRPO_CHANNEL_FD"))
_sec = int(os.environ.pop("GRPO_SECRET_FD", "-1"))
_mode = sys.argv[1]
_case = json.loads(sys.stdin.buffer.read() or b"null") if _mode == "call" else None
_NUM = (int, float, complex, bool)
_SCALAR = (str, bytes, _type(None), range)

def _plain(x, depth=0):
    t = _type(x)
    if depth > 200:
        raise ValueError("result nested too deeply")
    if x is None or t is bool or t is int or t is str:
        return x
    if t is float:
        return x if x == x and x not in (float("inf"), float("-inf")) else {"__float__": _repr(x)}
    if t is list or t is tuple:
        return [_plain(v, depth + 1) for v in x]
    if t is dict:
        out = {}
        for k, v in x.items():
            if _type(k) is not str:
                raise TypeError("result dict key of type " + _type(k).__name__)
            out[k] = _plain(v, depth + 1)
        return out
    raise TypeError("result of unsupported type " + t.__name__)

def _eq(a, b, depth=0):
    ta, tb = _type(a), _type(b)
    if depth > 200:
        return False
    if ta in _NUM and tb in _NUM:
        return a == b
    if ta is not tb:
        return False
    if ta is list or ta is tuple:
        return _len(a) == _len(b) and all(_eq(x, y, depth + 1) for x, y in zip(a, b))
    if ta is dict:
        if not all(_type(k) in _NUM + _SCALAR for k in a) or set(a) != set(b):
            return False
        return all(_eq(a[k], b[k], depth + 1) for k in a)
    if ta is set or ta is frozenset:
        return all(_type(k) in _NUM + _SCALAR for k in a) and a == b
    return a == b  # two builtin scalars, or two objects of the same (program-defined) type

def _finish(payload):
    _write(_chan, payload)
    _exit(0)

try:
    with open("/box/solution.py", "rb") as _f:
        _src = _f.read()
    _g = {"__name__": "solution", "__builtins__": __builtins__}
    if _mode == "call":
        exec(compile(_src, "solution.py", "exec"), _g)
        _fn = _g.get(_case["fn_name"])
        if _fn is None and _isinstance(_g.get("Solution"), _type):
            _fn = getattr(_g["Solution"](), _case["fn_name"])
        if _fn is None:
            raise NameError("function " + _case["fn_name"] + " is not defined")
        _res = _plain(_fn(*_case.get("args", []), **_case.get("kwargs", {})))
        _finish(_dumps({"ok": True, "result": _res}).encode())
    else:
        with open("/box/test.py", "rb") as _f:
            _test = _f.read()
        exec(compile(_src, "solution.py", "exec"), _g)
        _g["__grpo_eq__"] = _eq
        exec(compile(_test, "test.py", "exec"), _g)
        # Only now, after the assert returned, is the marker read: it was nowhere before.
        _finish(b"PASS " + _read(_sec, 256))
except BaseException as _e:  # SystemExit too: a program that exits early did not pass
    try:
        _msg = _type(_e).__name__ + ": " + _str(_e)[:300]
    except BaseException:
        _msg = "unprintable exception"
    _finish(_dumps({"ok": False, "error": _msg}).encode())
'''


def _service(urls, token_file: str | None = None):
    """A client of the sandbox service(s) at `urls`, each checked now (one line naming the URL that
    does not answer or refuses the token). The token: `token_file`, else $GRPO_SANDBOX_TOKEN or
    $GRPO_SANDBOX_TOKEN_FILE (see grpo.sandbox.client.load_token)."""
    from grpo.sandbox.client import SandboxClient, load_token

    urls = [urls] if isinstance(urls, str) else [str(u) for u in urls]
    token = load_token(None, token_file)
    for url in urls:
        try:
            SandboxClient(url, retries=1, token=token).health()
        except SandboxServiceError as e:  # it answered, and refused (401: no or a wrong token)
            raise ValueError(f"code verifier: sandbox service {e}") from None
        except Exception as e:  # noqa: BLE001 - any failure to answer
            raise ValueError(f"code verifier: sandbox service {url} does not answer ({type(e).__name__}: {e})") from None
    return SandboxClient(urls, token=token)


class CodeVerifier:
    """Reward = fraction of a sample's tests its program passes.

    test_time: wall seconds per test run (CPU limit too); sample_time: wall seconds for all the
    tests of one sample (tests beyond it fail); parallelism: concurrent sandbox runs;
    sandbox: a ``grpo.sandbox.Sandbox`` or ``grpo.sandbox.client.SandboxClient`` (default: local),
    or the URL(s) of ``grpo sandbox serve`` services, one string or a list (config:
    ``task.verifiers=[{name: code, sandbox: [http://h1:8000, http://h2:8000]}]``): checked when the
    verifier is built, and a service that stops answering makes the batch a verifier error (counted
    in verifier/code/errors), not failed tests;
    sandbox_token_file: a file holding the services' shared token (default: $GRPO_SANDBOX_TOKEN, or the
    file named by $GRPO_SANDBOX_TOKEN_FILE; a config keeps the path, never the token);
    dedup: run each distinct (program, tests) pair of a batch once and give its copies the same
    score (GRPO groups often repeat a program; programs whose result depends on chance or
    time should turn this off).
    """

    name = "code"
    required_fields = ("tests",)

    def __init__(self, *, test_time: float = 4.0, sample_time: float = 30.0, memory_mb: int = 1024,
                 max_procs: int = 32, stdout_bytes: int = 1 << 20, parallelism: int | None = None,
                 float_tol: float = 1e-9, max_tests: int | None = None, sandbox: Any = None,
                 dedup: bool = True, sandbox_token_file: str | None = None):
        self.limits = Limits(wall_time=test_time, cpu_time=test_time, memory_mb=memory_mb,
                             max_procs=max_procs, stdout_bytes=stdout_bytes)
        self.sample_time = float(sample_time)
        self.parallelism = parallelism or max(2, os.cpu_count() or 2)
        self.float_tol = float_tol
        self.max_tests = max_tests
        self.dedup = dedup
        if isinstance(sandbox, (str, list, tuple)):
            sandbox = _service(sandbox, sandbox_token_file)
        elif sandbox_token_file is not None:
            raise ValueError("code verifier: sandbox_token_file is for sandbox URLs (sandbox: [http://...])")
        self.sandbox = sandbox if sandbox is not None else default_sandbox()
        if isinstance(self.sandbox, Sandbox):
            self.sandbox.check()  # fail at construction, not in the middle of training

    # -- building test runs -------------------------------------------------------------------
    def _jobs(self, program: str, tests: Any) -> list[tuple[str, dict, Any]]:
        """(kind, run kwargs, judge data) for each test; raises ValueError on malformed tests."""
        if isinstance(tests, str):
            tests = json.loads(tests)
        if not isinstance(tests, Mapping):
            raise ValueError("tests must be a mapping")
        jobs: list[tuple[str, dict, Any]] = []
        if "stdio" in tests:
            for t in tests["stdio"]:
                jobs.append(("stdio", {"program": program, "stdin": str(t["input"])}, str(t["output"])))
        elif "call" in tests:
            call = tests["call"]
            fn = str(call["fn_name"])
            files = {"solution.py": program}
            for c in call["cases"]:
                case = {"fn_name": fn, "args": list(c.get("args", [])), "kwargs": dict(c.get("kwargs", {}))}
                jobs.append(("call", {"program": _HARNESS, "stdin": json.dumps(case), "files": files,
                                      "args": ("call",), "channel": True}, c.get("expected")))
        elif "assert" in tests:
            setup = str(tests.get("setup", "") or "")
            for a in tests["assert"]:
                test_src = _rewrite_test(setup + "\n" + str(a))
                marker = secrets.token_hex(16)
                jobs.append(("assert", {"program": _HARNESS, "files": {"solution.py": program, "test.py": test_src},
                                        "args": ("assert",), "channel": True,
                                        "secret_in": marker.encode()}, marker))
        else:
            raise ValueError(f"unknown tests form (keys {sorted(tests)[:5]})")
        if self.max_tests is not None:
            jobs = jobs[: self.max_tests]
        if not jobs:
            raise ValueError("no tests")
        return jobs

    def _judge(self, kind: str, expected: Any, r: Result) -> tuple[bool, str]:
        if kind == "stdio":
            if r.status != "ok":
                return False, r.status
            if r.stdout_truncated:
                return False, "output_limit"
            ok = compare_stdio(r.stdout.decode("utf-8", "replace"), expected)
            return ok, "pass" if ok else "wrong_answer"
        if r.status not in ("ok",):
            return False, r.status
        if kind == "assert":
            ok = r.channel == b"PASS " + expected.encode()
            if ok:
                return True, "pass"
            return False, _error_of(r.channel) or "failed"
        try:
            msg = json.loads(r.channel.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return False, "no_result"
        if not isinstance(msg, dict) or msg.get("ok") is not True or "result" not in msg:
            return False, _error_of(r.channel) or "no_result"
        ok = compare_values(expected, msg["result"], self.float_tol)
        return ok, "pass" if ok else "wrong_answer"

    # -- the protocol ---------------------------------------------------------------------------
    def score(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[Score]:
        n = len(completions)
        if len(samples) != n:
            raise ValueError(f"{n} completions for {len(samples)} samples")
        scores: list[Score | None] = [None] * n
        per_sample_jobs: list[list] = [[] for _ in range(n)]
        first_of: dict[tuple[str, str], int] = {}
        copy_of: dict[int, int] = {}
        for i, (comp, sample) in enumerate(zip(completions, samples)):
            program = extract_program(comp if isinstance(comp, str) else "")
            if self.dedup:
                key = (program, _tests_key(sample.get("tests")))
                if key[1] is not None and key in first_of:
                    copy_of[i] = first_of[key]
                    scores[i] = Score(0.0)  # placeholder: filled from the first copy below
                    continue
                first_of.setdefault(key, i)
            if not program.strip():
                scores[i] = Score(0.0, {"error": "no program in completion"})
                continue
            try:
                per_sample_jobs[i] = self._jobs(program, sample.get("tests"))
            except (ValueError, KeyError, TypeError, SyntaxError) as e:
                scores[i] = Score(0.0, {"error": f"malformed tests: {type(e).__name__}: {e}"[:300]})
        budget = [self.sample_time] * n
        lock = threading.Lock()
        outcomes: list[list[str]] = [["not_run"] * len(j) for j in per_sample_jobs]

        def work(item: tuple[int, int]) -> None:
            i, k = item
            kind, kwargs, expected = per_sample_jobs[i][k]
            with lock:
                left = budget[i]
            if left <= 0.05:
                outcomes[i][k] = "sample_timeout"
                return
            wall = min(self.limits.wall_time, left)
            lim = Limits(**{**self.limits.__dict__, "wall_time": wall, "cpu_time": min(self.limits.cpu_time, wall)})
            t0 = time.monotonic()
            try:
                r = self.sandbox.run(kwargs["program"], kwargs.get("stdin", b""), lim,
                                     **{k2: v for k2, v in kwargs.items() if k2 not in ("program", "stdin")})
                ok, why = self._judge(kind, expected, r)
            except SandboxServiceError:  # no service answered: the verifier failed, not the program
                raise
            except Exception as e:  # a broken run must not kill training: it scores 0
                ok, why = False, f"sandbox_error: {type(e).__name__}: {e}"[:200]
            with lock:
                budget[i] -= time.monotonic() - t0
            outcomes[i][k] = "pass" if ok else why

        items = [(i, k) for i in range(n) for k in range(len(per_sample_jobs[i])) if scores[i] is None]
        if items:
            with ThreadPoolExecutor(self.parallelism) as ex:
                list(ex.map(work, items))
        for i in range(n):
            if scores[i] is not None:
                continue
            res = outcomes[i]
            passed = sum(o == "pass" for o in res)
            info: dict[str, Any] = {"passed": passed, "total": len(res)}
            fails = [o for o in res if o != "pass"]
            if fails:
                info["first_failure"] = fails[0]
                info["failures"] = {o: fails.count(o) for o in set(fails)}
            scores[i] = Score(passed / len(res), info)
        for i, j in copy_of.items():
            scores[i] = Score(scores[j].reward, {**scores[j].info, "same_as": j})
        return scores  # type: ignore[return-value]


def _tests_key(tests: Any) -> str | None:
    """A canonical text of a sample's tests, or None when they cannot be compared."""
    try:
        return tests if isinstance(tests, str) else json.dumps(tests, sort_keys=True)
    except (TypeError, ValueError):
        return None


def _error_of(channel: bytes) -> str | None:
    try:
        msg = json.loads(channel.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(msg, dict) and isinstance(msg.get("error"), str):
        return "exception: " + msg["error"][:200]
    return None
