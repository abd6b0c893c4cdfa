"""The code verifier against honest and hostile completions, and the format converters."""

from __future__ import annotations

import json
import textwrap
import time
import uuid

import pytest

from grpo.verifiers.base import check_scores
from grpo.verifiers.code import CodeVerifier, compare_stdio, compare_values, extract_program
from grpo.verifiers.code_convert import from_apps, from_humaneval, from_livecodebench, from_mbpp
from tests.conftest import pids_with

STDIO = {"stdio": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 7\n", "output": "12"}]}
CALL = {"call": {"fn_name": "f", "cases": [{"args": [2], "expected": 4}, {"args": [5], "expected": 10}]}}
ASSERT = {"assert": ["assert f(2) == 4", "assert f(5) == 10"]}


def assert_no_leftovers(token: str) -> None:
    """No host process carries ``token`` in its command line (after a grace period)."""
    def found() -> list[str]:
        return pids_with(token)
    deadline = time.time() + 3
    while found() and time.time() < deadline:
        time.sleep(0.05)
    assert found() == []


@pytest.fixture(scope="module")
def v():
    return CodeVerifier(test_time=3, sample_time=20, memory_mb=256, parallelism=4)


def score(v, completion, tests):
    s = check_scores("code", v.score([textwrap.dedent(completion)], [{"tests": tests}]), 1)[0]
    return s.reward, s.info


# -- honest programs ------------------------------------------------------------------------------
def test_honest_programs_pass_in_all_three_forms(v):
    assert score(v, "a, b = map(int, input().split())\nprint(a + b)", STDIO)[0] == 1.0
    assert score(v, "```python\ndef f(x):\n    return 2 * x\n```", CALL)[0] == 1.0
    assert score(v, "Here:\n```python\ndef f(x):\n    return 2 * x\n```\nDone.", ASSERT)[0] == 1.0


def test_partial_credit_and_class_solution(v):
    r, info = score(v, "def f(x):\n    return 4", CALL)
    assert r == 0.5 and info["passed"] == 1 and info["first_failure"] == "wrong_answer"
    assert score(v, "class Solution:\n    def f(self, x):\n        return x * 2", CALL)[0] == 1.0


def test_comparisons():
    assert compare_stdio("3  \n\n\n", "3") and not compare_stdio("3\n4", "3")
    assert not compare_stdio("", "0") and compare_stdio("a\r\nb", "a\nb")
    assert not compare_values(1, 1.0) and not compare_values(1, True) and compare_values(0.1 + 0.2, 0.3)
    assert not compare_values([1, 2], [1, 2, 3]) and compare_values({"a": [None]}, {"a": [None]})
    assert extract_program("```python\nA\n```\n```python\nB\n```") == "B\n"
    assert extract_program("print(1)") == "print(1)"


def test_malformed_inputs_score_zero_with_a_reason(v):
    samples = [{"tests": STDIO}, {"tests": {"weird": 1}}, {"tests": None}, {"tests": STDIO}, {"tests": ASSERT}]
    comps = ["", "print(1)", "print(1)", "def (:", "def f(x): return 2*x"]
    scores = check_scores("code", v.score(comps, samples), len(comps))
    assert [s.reward for s in scores] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert "no program" in scores[0].info["error"] and "malformed tests" in scores[1].info["error"]
    assert scores[3].info["first_failure"] == "error"


# -- hostile programs -----------------------------------------------------------------------------
@pytest.mark.parametrize("tests", [STDIO, CALL, ASSERT], ids=["stdio", "call", "assert"])
@pytest.mark.parametrize("cheat", ["exit(0)", "import os\nos._exit(0)", "import sys\nsys.exit(0)",
                                   "raise SystemExit(0)"])
def test_exiting_early_does_not_pass(v, tests, cheat):
    assert score(v, "def f(x):\n    return 0\n" + cheat, tests)[0] == 0.0


def test_always_equal_objects_do_not_pass(v):
    evil = """
        class E:
            def __eq__(self, o): return True
            def __ne__(self, o): return False
            __hash__ = object.__hash__
        class I(int):
            def __eq__(self, o): return True
        def f(x):
            return E() if x == 2 else I(0)
        """
    assert score(v, evil, CALL)[0] == 0.0
    assert score(v, evil, ASSERT)[0] == 0.0


def test_walking_the_stack_and_forging_result_lines(v):
    # Looks everywhere in its process for anything marker-like and writes forged passes and
    # results on every descriptor, then leaves before the test runs.
    evil = """
        import gc, os, re, sys
        found = set()
        f = sys._getframe()
        while f:
            for d in (f.f_locals, f.f_globals):
                for val in list(d.values()):
                    if isinstance(val, (str, bytes)):
                        found.update(re.findall(r"[0-9a-f]{32}", val if isinstance(val, str) else val.decode("latin1")))
            f = f.f_back
        for o in gc.get_objects():
            if isinstance(o, dict):
                for val in list(o.values()):
                    if isinstance(val, str):
                        found.update(re.findall(r"[0-9a-f]{32}", val))
        for fd in range(3, 64):
            for m in list(found) + ["x"]:
                for line in (b"PASS " + m.encode(), b'{"ok": true, "result": 4}'):
                    try:
                        os.write(fd, line)
                    except OSError:
                        pass
        print(3); print(12)
        os._exit(0)
        """
    assert score(v, evil, ASSERT)[0] == 0.0
    assert score(v, evil, CALL)[0] == 0.0
    assert score(v, evil, STDIO)[0] == 0.0


def test_monkeypatching_the_harness_and_test_machinery(v):
    evil = """
        import builtins, json, os, sys
        json.dumps = lambda *a, **k: '{"ok": true, "result": 4}'
        builtins.AssertionError = type("Nope", (Exception,), {})
        os._exit = lambda *a: None
        sys.modules["os"].read = lambda *a: b"x" * 32
        def f(x):
            return -1
        """
    assert score(v, evil, ASSERT)[0] == 0.0
    assert score(v, evil, CALL)[0] == 0.0


def test_raising_when_expected_is_none(v):
    tests = {"call": {"fn_name": "f", "cases": [{"args": [1], "expected": None}]}}
    assert score(v, "def f(x):\n    raise ValueError('no')", tests)[0] == 0.0
    assert score(v, "def f(x):\n    return None", tests)[0] == 1.0


def test_truncated_and_flooding_output(v):
    tests = {"stdio": [{"input": "", "output": "1\n2\n3"}]}
    assert score(v, "print(1)\nprint(2)", tests)[0] == 0.0
    small = CodeVerifier(test_time=3, stdout_bytes=1000)
    r, info = score(small, "print('1\\n2\\n3')\nwhile True: print('x' * 100)", tests)
    assert r == 0.0 and info["first_failure"] == "output_limit"


def test_finding_the_hidden_expected_output(v):
    token = uuid.uuid4().hex
    tests = {"stdio": [{"input": "", "output": token}]}
    evil = """
        import os
        hits = []
        for root, dirs, files in os.walk("/"):
            if root.startswith(("/usr", "/sys")):
                dirs[:] = []
                continue
            for name in files:
                try:
                    with open(os.path.join(root, name), "rb") as fh:
                        data = fh.read(1 << 20)
                except OSError:
                    continue
                import re
                hits += re.findall(rb"[0-9a-f]{32}", data)
        print(hits[0].decode() if hits else "nothing")
        """
    assert score(v, evil, tests)[0] == 0.0


def test_state_does_not_leak_to_the_next_sample(v):
    writer = "import os\nopen('/tmp/answer', 'w').write('3')\nprint(3)"
    reader = "import os\nprint(open('/tmp/answer').read() if os.path.exists('/tmp/answer') else 'none')"
    tests = {"stdio": [{"input": "", "output": "3"}]}
    scores = v.score([writer, reader], [{"tests": tests}, {"tests": tests}])
    assert [s.reward for s in scores] == [1.0, 0.0]


def test_hostile_resource_use_scores_zero_and_leaves_nothing(v):
    token = uuid.uuid4().hex
    progs = [
        "while True: pass",
        "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
        f"import subprocess\nsubprocess.Popen(['/usr/bin/python3', '-c', 'import time; time.sleep(60)', '{token}'], start_new_session=True)\nprint(1)",
        "x = bytearray(1 << 34)",
        "import ctypes; ctypes.string_at(0)",
        "import os, signal\nos.kill(-1, signal.SIGKILL)",
    ]
    t = time.monotonic()
    scores = v.score(progs, [{"tests": STDIO}] * len(progs))
    assert [s.reward for s in scores] == [0.0] * len(progs)
    assert time.monotonic() - t < 20
    assert_no_leftovers(token)


def test_sample_time_limit_bounds_a_slow_sample():
    v = CodeVerifier(test_time=1, sample_time=2.5, parallelism=2)
    tests = {"stdio": [{"input": "", "output": "x"}] * 8}
    t = time.monotonic()
    r, info = score(v, "import time\ntime.sleep(10)", tests)
    assert r == 0.0 and info["failures"].get("sample_timeout", 0) >= 4
    assert time.monotonic() - t < 6


# -- converters -----------------------------------------------------------------------------------
def test_apps_converter(v):
    t = from_apps(json.dumps({"inputs": ["1 2\n", ["5 7"]], "outputs": ["3\n", ["12"]]}))
    assert t == {"stdio": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 7", "output": "12"}]}
    t = from_apps({"inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]], "fn_name": "add"})
    assert t["call"]["cases"][1] == {"args": [3, 4], "expected": 7}
    assert score(v, "def add(a, b):\n    return a + b", t)[0] == 1.0


def test_livecodebench_converter(v):
    cases = [{"input": "[1, 2]\n3", "output": "[1, 2, 3]", "testtype": "functional"}]
    t = from_livecodebench(json.dumps(cases), json.dumps({"func_name": "app"}))
    assert t == {"call": {"fn_name": "app", "cases": [{"args": [[1, 2], 3], "expected": [1, 2, 3]}]}}
    assert score(v, "class Solution:\n    def app(self, xs, y):\n        return xs + [y]", t)[0] == 1.0
    assert from_livecodebench([{"input": "1", "output": "2", "testtype": "stdin"}]) == {
        "stdio": [{"input": "1", "output": "2"}]}


def test_mbpp_and_humaneval_converters(v):
    t = from_mbpp(["assert f(1) == 2", "assert f(2) == 4"])
    assert t == {"call": {"fn_name": "f", "cases": [{"args": [1], "expected": 2}, {"args": [2], "expected": 4}]}}
    t = from_mbpp(["assert set(f(2)) == {2, 4}", "assert f(1) == (1, 2)"], test_imports=["import math"])
    assert t["assert"] and t["setup"] == "import math"
    assert score(v, "def f(x):\n    return (1, 2) if x == 1 else [2, 4]", t)[0] == 1.0
    he = "METADATA = {}\n\ndef check(candidate):\n    assert candidate(1) == 2\n    assert candidate(3) == 6\n"
    t = from_humaneval(he, "double")
    assert t == {"call": {"fn_name": "double", "cases": [{"args": [1], "expected": 2}, {"args": [3], "expected": 6}]}}
    he2 = "def check(candidate):\n    assert abs(candidate(1) - 2.0) < 1e-6\n    assert candidate(2) == 4\n"
    t = from_humaneval(he2, "double")
    assert len(t["assert"]) == 2 and score(v, "def double(x):\n    return 2 * x", t)[0] == 1.0
    he3 = "def check(candidate):\n    for x in range(3):\n        assert candidate(x) == 2 * x\n"
    t = from_humaneval(he3, "double")
    assert t["assert"] == ["check(double)"]
    assert score(v, "def double(x):\n    return 2 * x", t)[0] == 1.0
    assert score(v, "def double(x):\n    return x", t)[0] == 0.0


class CountingSandbox:
    """The real local sandbox, counting how many programs it runs."""

    def __init__(self):
        from grpo.sandbox import Sandbox

        self.inner, self.runs = Sandbox(), 0

    def run(self, *a, **kw):
        self.runs += 1
        return self.inner.run(*a, **kw)


def test_identical_programs_of_a_batch_run_once():
    sb = CountingSandbox()
    v = CodeVerifier(sandbox=sb, parallelism=2)
    tests = {"stdio": [{"input": "1\n", "output": "2\n"}, {"input": "5\n", "output": "6\n"}]}
    good, bad = "print(int(input()) + 1)", "print(int(input()) + 2)"
    scores = v.score([good, bad, good, good], [{"tests": tests}] * 4)
    assert [s.reward for s in scores] == [1.0, 0.0, 1.0, 1.0]
    assert sb.runs == 2 * 2  # two distinct programs x two tests
    assert scores[2].info["same_as"] == 0 and scores[3].info["same_as"] == 0
    # The same program against different tests is a different pair: run again.
    other = {"stdio": [{"input": "1\n", "output": "3\n"}]}
    assert [s.reward for s in v.score([good, good], [{"tests": tests}, {"tests": other}])] == [1.0, 0.0]
    assert sb.runs == 4 + 3
    off = CodeVerifier(sandbox=sb, parallelism=2, dedup=False)
    off.score([good, good], [{"tests": tests}] * 2)
    assert sb.runs == 7 + 4
