"""Tools the model calls, in the forms chat models are trained on, run in the sandbox.

A tool call is read from the assistant's message in either form:
  - Hermes (Qwen2.5/3, Hermes, many others): <tool_call>{"name": "python", "arguments": {"code": "..."}}</tool_call>
  - code interpreter: a fenced ```python ... ``` block, a call of the `python` tool with that code.
A call that cannot be read (bad JSON, no name, an unclosed block, an unknown tool, arguments the
tool does not take) is answered with a `role: tool` message that says what was wrong, as any
failed run is: the model sees it and the conversation goes on; nothing is raised.

Tools:
  - `python` (built in): runs the code in the sandbox (grpo/sandbox: its own namespaces, rlimits,
    wall-clock deadline, every process reaped) under per-call time, memory and output caps, locally
    or on `grpo sandbox serve` services (`sandbox: URL or [URLs]`). The result is stdout, or the
    error's last lines.
  - a Python function (`{_target_: mypkg.module:fn}`): its JSON schema comes from its signature and
    docstring. It runs in the sandbox by default: its module's source is sent along and `fn(**args)`
    is called there, so it must need only the standard library and be self-contained in its module.
    `in_process: true` calls it in the trainer's own process instead (trusted code only: it is not
    contained, and nothing bounds its time).
"""

from __future__ import annotations

import inspect
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from grpo.envs.base import EnvError, Turn


@dataclass
class Call:
    """One tool call read from a message; `error` set when it could not be read."""

    name: str | None
    arguments: dict[str, Any]
    error: str | None = None


_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.S)
_FENCE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)(```|$)", re.S)


def parse_calls(text: str) -> list[Call]:
    """The tool calls of an assistant message, in the order they appear (both forms)."""
    found: list[tuple[int, Call]] = []
    spans = []
    for m in _HERMES.finditer(text):
        body, closed = m.group(1).strip(), m.group(2)
        spans.append(m.span())
        found.append((m.start(), _hermes_call(body) if closed else Call(None, {}, "<tool_call> is not closed by </tool_call>")))
    for m in _FENCE.finditer(text):
        if any(a <= m.start() < b for a, b in spans):  # a code block quoted inside a Hermes call
            continue
        if m.group(2):
            found.append((m.start(), Call("python", {"code": m.group(1)})))
        else:
            found.append((m.start(), Call("python", {}, "the ```python block is not closed by ```")))
    return [c for _, c in sorted(found, key=lambda x: x[0])]


def _hermes_call(body: str) -> Call:
    try:
        obj = json.loads(body)
    except ValueError as e:
        return Call(None, {}, f"the tool call is not valid JSON ({e})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return Call(None, {}, 'the tool call needs {"name": ..., "arguments": {...}}')
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some templates carry the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError as e:
            return Call(obj["name"], {}, f"the arguments are not valid JSON ({e})")
    if not isinstance(args, dict):
        return Call(obj["name"], {}, "the arguments must be a JSON object")
    return Call(obj["name"], args)


# ---- tools ------------------------------------------------------------------------------------
def _sandbox(where: Any):
    """A local sandbox (None) or a client of the service(s) at `where` (a URL or a list)."""
    if where is None:
        from grpo.sandbox.core import default_sandbox

        sb = default_sandbox()
        sb.check()  # fail when the environment is built, not in the middle of training
        return sb
    from grpo.sandbox.client import SandboxClient

    # a service that stalls costs a call about a minute (two tries of 30 s), not the client's 10 default minutes
    return SandboxClient([where] if isinstance(where, str) else [str(u) for u in where], timeout=30.0, retries=1)


def _limits(time_s: float, memory_mb: int, output_bytes: int):
    from grpo.sandbox.core import Limits

    return Limits(wall_time=time_s, cpu_time=time_s, memory_mb=memory_mb, max_procs=16, stdout_bytes=output_bytes)


def _outcome(r) -> tuple[str, bool]:
    """(the text the model sees, ok) of a sandbox Result."""
    out = r.stdout.decode("utf-8", "replace")
    if r.status == "ok":
        return (out if out else "(no output)"), True
    if r.status == "timeout":
        return f"{out}error: timed out", False
    if r.status == "output_limit":
        return f"{out}\n[output cut]", False
    err = r.stderr.decode("utf-8", "replace").strip().splitlines()
    return out + "\n".join(err[-3:] or [f"error: {r.status} (exit {r.exit_code}, signal {r.signal})"]), False


class PythonTool:
    """`python`: runs `code` in the sandbox. Options: time (s, wall and CPU), memory_mb, output_bytes."""

    def __init__(self, time: float = 5.0, memory_mb: int = 256, output_bytes: int = 64 << 10, sandbox: Any = None):
        self.limits = _limits(time, memory_mb, output_bytes)
        self.sandbox = sandbox if sandbox is not None else _sandbox(None)
        self.name = "python"
        self.schema = {"type": "function", "function": {
            "name": "python", "description": "Run Python 3 code and return what it prints.",
            "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "the program"}},
                           "required": ["code"]}}}

    def __call__(self, arguments: Mapping[str, Any]) -> tuple[str, bool]:
        code = arguments.get("code")
        if not isinstance(code, str) or set(arguments) - {"code"}:
            return 'error: python takes one argument, {"code": "<program>"}', False
        return _outcome(self.sandbox.run(code, limits=self.limits))


_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}


def function_schema(fn: Callable) -> dict[str, Any]:
    """The JSON schema of a Python function: its name, its docstring's first paragraph, and one
    property per parameter (type from the annotation; required when it has no default)."""
    sig = inspect.signature(fn)
    hints = getattr(fn, "__annotations__", {})
    props, required = {}, []
    for p in sig.parameters.values():
        t = hints.get(p.name)
        if isinstance(t, str):  # `from __future__ import annotations`
            t = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}.get(t.split("[")[0])
        props[p.name] = {"type": _JSON_TYPES.get(getattr(t, "__origin__", t), "string")}
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    doc = (inspect.getdoc(fn) or fn.__name__).split("\n\n")[0].replace("\n", " ")
    return {"type": "function", "function": {"name": fn.__name__, "description": doc,
                                             "parameters": {"type": "object", "properties": props, "required": required}}}


# Runs in the sandbox after the tool's module source: the call's arguments arrive on stdin.
_CALL = """
import json as _json, sys as _sys
_r = {fn}(**_json.loads(_sys.stdin.read()))
print(_r if isinstance(_r, str) else _json.dumps(_r))
"""


class FunctionTool:
    """A user's Python function as a tool: in the sandbox (default) or, `in_process`, in this process."""

    def __init__(self, fn: Callable, in_process: bool = False, time: float = 5.0, memory_mb: int = 256,
                 output_bytes: int = 64 << 10, sandbox: Any = None):
        self.fn, self.in_process, self.name = fn, in_process, fn.__name__
        self.schema = function_schema(fn)
        self.params = set(inspect.signature(fn).parameters)
        if not in_process:
            self.source = inspect.getsource(inspect.getmodule(fn)) + _CALL.format(fn=fn.__name__)
            self.limits = _limits(time, memory_mb, output_bytes)
            self.sandbox = sandbox if sandbox is not None else _sandbox(None)

    def __call__(self, arguments: Mapping[str, Any]) -> tuple[str, bool]:
        unknown = set(arguments) - self.params
        if unknown:
            return f"error: {self.name} takes no argument {sorted(unknown)[0]!r}", False
        if not self.in_process:
            return _outcome(self.sandbox.run(self.source, json.dumps(dict(arguments)), self.limits))
        try:
            r = self.fn(**arguments)
        except Exception as e:  # noqa: BLE001 - the model sees the error, the run goes on
            return f"error: {type(e).__name__}: {e}", False
        return (r if isinstance(r, str) else json.dumps(r)), True


def build_tool(spec: Any, sandbox: Any = None) -> Any:
    """`python`, {name: python, time: .., memory_mb: ..}, or {_target_: module:fn, in_process: ..}."""
    from grpo.verifiers.registry import _import

    opts = {"name": spec} if isinstance(spec, str) else dict(spec)
    name, target = opts.pop("name", None), opts.pop("_target_", None)
    try:
        if target:
            return FunctionTool(_import(target, f"tool {target!r}"), sandbox=sandbox, **opts)
        if name == "python":
            return PythonTool(sandbox=sandbox, **opts)
    except TypeError as e:
        raise EnvError(f"tool {name or target!r}: bad option: {e}") from e
    raise EnvError(f"tool {spec!r}: the built-in tool is `python`; a function is {{_target_: module:function}}")


class ToolEnv:
    """The model may call tools; a message without a tool call is its answer and ends the conversation.

    tools: specs for build_tool (default: [python]); max_tool_calls: calls per conversation (a message
    that would go beyond it ends the conversation, reason `tool_cap`, and none of its calls run);
    sandbox: where sandboxed tools run (None = here; a URL or a list of `grpo sandbox serve` URLs)."""

    def __init__(self, tools: list[Any] | None = None, max_tool_calls: int = 4, sandbox: Any = None):
        if sandbox is not None and not isinstance(sandbox, (str, list, tuple)):
            raise EnvError("task.env.sandbox: a URL or a list of URLs of `grpo sandbox serve` (or leave it out: local)")
        specs = list(tools or ["python"])
        sandboxed = any(not (isinstance(t, Mapping) and t.get("in_process")) for t in specs)
        shared = _sandbox(sandbox) if sandboxed else None  # one local sandbox or one client for every tool
        self.by_name = {t.name: t for t in (build_tool(s, shared) for s in specs)}
        self.tools = [t.schema for t in self.by_name.values()]
        self.max_tool_calls = int(max_tool_calls)

    def reset(self, sample: Any) -> dict[str, int]:
        return {"calls": 0}

    def step(self, state: dict[str, int], message: dict[str, Any]) -> Turn:
        calls = parse_calls(message.get("content") or "")
        if not calls:
            return Turn(done=True, reason="answered")
        if state["calls"] + len(calls) > self.max_tool_calls:
            return Turn(done=True, reason="tool_cap")
        turn = Turn()
        t0 = time.monotonic()
        for k, call in enumerate(calls):
            state["calls"] += 1
            text, ok = self._run(call)
            turn.tool_calls += 1
            turn.tool_errors += not ok
            turn.messages.append({"role": "tool", "name": call.name or "unknown", "content": text,
                                  "tool_call_id": f"call_{state['calls']}"})
        turn.tool_time = time.monotonic() - t0
        return turn

    def _run(self, call: Call) -> tuple[str, bool]:
        if call.error:
            return f"error: {call.error}", False
        tool = self.by_name.get(call.name or "")
        if tool is None:
            return f"error: no tool named {call.name!r}; the tools are {', '.join(self.by_name)}", False
        try:
            return tool(call.arguments)
        except Exception as e:  # noqa: BLE001 - a sandbox that failed costs this call, not the run
            return f"error: the tool failed ({type(e).__name__}: {e})"[:500], False

    def close(self) -> None:
        pass
