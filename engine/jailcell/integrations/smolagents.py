"""smolagents: :class:`JailcellExecutor`, a ``PythonExecutor`` that runs a CodeAgent's actions in jailcell.

    from smolagents import CodeAgent
    from jailcell.integrations.smolagents import JailcellExecutor

    agent = CodeAgent(tools=[...], model=model, executor=JailcellExecutor("standard"))

State persists across the agent's steps (a Session).  Tools -- ``final_answer`` included -- stay on
the host: inside the sandbox they are host functions, so tool code never runs in the jail and the
jail never sees the tools' credentials.  Arguments and results cross as JSON values.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from .._bridge import HostFunctions
from .._errors import InputError, MissingExtra
from .._sandbox import Sandbox, Session

try:
    from smolagents.local_python_executor import CodeOutput, InterpreterError, PythonExecutor
except ImportError as exc:  # pragma: no cover - exercised by the import-error test
    raise MissingExtra("jailcell.integrations.smolagents", "adapters", exc.name) from None

__all__ = ["JailcellExecutor"]


class _FinalAnswer(Exception):
    """Raised (on the host, then in the cell) by ``final_answer`` to stop the action there."""


class JailcellExecutor(PythonExecutor):
    """Run code actions in a jailcell Session.

    ``policy`` and ``**sandbox_options`` are those of :class:`jailcell.Sandbox` (``timeout=``,
    ``memory=``, ``backend=``...).  ``cleanup()`` (called by ``agent.cleanup()``) closes it.
    """

    def __init__(self, policy: Any = "standard", **sandbox_options: Any) -> None:
        self._functions: dict[str, Any] = {}  # the tools, read by the sandbox at every run
        self.sandbox = Sandbox(policy, functions=self._functions, **sandbox_options)
        self._session: Session | None = None
        self._answer: list[Any] = []
        self.state: dict[str, Any] = {"_print_outputs": ""}  # smolagents shows these logs on errors

    @property
    def session(self) -> Session:
        if self._session is None or self._session.closed:
            self._session = self.sandbox.session()
        return self._session

    def send_tools(self, tools: dict[str, Any]) -> None:
        functions = {}
        for name, tool in tools.items():
            functions[name] = self._final_answer if name == "final_answer" else _call_tool(tool)
        HostFunctions(functions)  # validate names before anything changes
        self._functions.clear()
        self._functions.update(functions)

    def _final_answer(self, *args: Any, **kwargs: Any) -> None:
        value = args[0] if args else kwargs.get("answer", next(iter(kwargs.values()), None))
        self._answer.append(value)
        raise _FinalAnswer("final answer given")

    def send_variables(self, variables: dict[str, Any]) -> None:
        if not variables:
            return
        lines = []
        for name, value in variables.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise InputError(f"variable name {name!r} is not a Python identifier")
            try:
                lines.append(f"{name} = {json.loads(json.dumps(value, allow_nan=False))!r}")
            except (TypeError, ValueError) as exc:
                raise InputError(f"variable {name!r} cannot be sent to the sandbox: only JSON values can ({exc})") \
                    from None
        result = self.session.run("\n".join(lines))
        if not result.ok:
            raise InputError(f"sending variables failed: {result.error}")

    def __call__(self, code_action: str) -> CodeOutput:
        self._answer.clear()
        result = self.session.run(code_action)
        logs = result.stdout + result.stderr
        self.state["_print_outputs"] = logs
        if self._answer:
            return CodeOutput(output=self._answer[-1], logs=logs, is_final_answer=True)
        if not result.ok:
            err = result.error or {}
            tb = (err.get("traceback") or "").strip()
            raise InterpreterError(f"Code execution failed ({result.status}): {err.get('type')}: "
                                   f"{err.get('message')}" + (f"\n{tb}" if tb else ""))
        return CodeOutput(output=_value(result.result), logs=logs, is_final_answer=False)

    def cleanup(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        self.sandbox.close()


def _call_tool(tool: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return tool(*args, **kwargs)
    return call


def _value(text: str | None) -> Any:
    """The last expression's value: the Python literal when its repr is one, else the repr."""
    if text is None:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
