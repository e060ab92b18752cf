"""The code interpreter as a tool for LLM loops: tool definitions, model-readable results, and a
loop that runs code calls for any OpenAI-compatible client."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Generator

from .._result import Result

__all__ = ["format_result", "tool_definition", "run_tool_loop", "arun_tool_loop", "ToolLoopResult", "ExecutedCall"]


def _clip(text: str, budget: int, label: str) -> str:
    if len(text) <= budget:
        return text
    head = text[: budget * 2 // 3]
    tail = text[-(budget - len(head)) :] if budget > len(head) else ""
    omitted = len(text) - len(head) - len(tail)
    return f"{head}\n[... {label} truncated: {omitted} of {len(text)} characters omitted ...]\n{tail}"


def format_result(result: Result, max_chars: int = 8000) -> str:
    """A compact, model-readable account of a run: status, output, value, error, images.

    Long outputs keep their head and tail with a truncation notice, within ``max_chars``.
    """
    parts = []
    if result.status != "ok":
        message = (result.error or {}).get("message", "")
        parts.append(f"[status: {result.status}{': ' + message if message else ''}]")
    budget = max(200, max_chars - 400)
    streams = [(name, text) for name, text in (("stdout", result.stdout), ("stderr", result.stderr)) if text]
    for name, text in streams:
        parts.append(f"[{name}]\n{_clip(text.rstrip(), budget // max(1, len(streams)), name)}")
    if result.result is not None:
        parts.append(f"[result]\n{_clip(result.result, 2000, 'result')}")
    if result.error and result.error.get("traceback"):
        parts.append(f"[traceback]\n{_clip(result.error['traceback'].rstrip(), 3000, 'traceback')}")
    for i, out in enumerate(result.outputs, 1):
        parts.append(f"[image {i}: {out.get('mime_type')}, returned separately]")
    if result.files:
        written = ", ".join(f"{f['name']} ({f['size']} bytes)" for f in result.files[:20])
        parts.append(f"[files written: {written}]")
    if not parts:
        parts.append("[no output]")
    return _clip("\n".join(parts), max_chars, "output")


# ------------------------------------------------------------------------------------------------
# the code interpreter as a tool, and a loop that runs it for any OpenAI-compatible client
# ------------------------------------------------------------------------------------------------

TOOL_NAME = "code_interpreter"
TOOL_DESCRIPTION = (
    "Run Python code in an isolated sandbox and get back its stdout, the value of the last expression, "
    "errors and figures. Use it for any computation; state is kept between calls in one conversation."
)
_PARAMETERS = {
    "type": "object",
    "properties": {"code": {"type": "string", "description": "The Python code to run."}},
    "required": ["code"],
}


def tool_definition(kind: str = "chat") -> dict[str, Any]:
    """The code interpreter as a function tool: ``chat`` (Chat Completions), ``responses`` (Responses API)
    or ``anthropic`` (Messages API)."""
    if kind == "chat":
        return {"type": "function", "function": {"name": TOOL_NAME, "description": TOOL_DESCRIPTION,
                                                 "parameters": _PARAMETERS}}
    if kind == "responses":
        return {"type": "function", "name": TOOL_NAME, "description": TOOL_DESCRIPTION, "parameters": _PARAMETERS}
    if kind == "anthropic":
        return {"name": TOOL_NAME, "description": TOOL_DESCRIPTION, "input_schema": _PARAMETERS}
    raise ValueError(f"unknown tool kind {kind!r}; choose chat, responses or anthropic")


@dataclass
class ExecutedCall:
    """One code-interpreter call a tool loop made: its id, the code and the Result."""

    id: str
    code: str
    result: Result


@dataclass
class ToolLoopResult:
    """What a tool loop ended with: the final assistant message (as a dict), every executed call,
    the conversation, usage summed over all model calls, and why it stopped."""

    message: dict[str, Any]
    calls: list[ExecutedCall] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    stopped: str = "answer"  # answer | client_tool_calls | max_steps


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    return obj.model_dump(exclude_none=True) if hasattr(obj, "model_dump") else dict(obj)


def _completion_parts(completion: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(first choice's message, usage) of an SDK object or of the raw JSON dict."""
    if isinstance(completion, dict):
        return dict(completion["choices"][0]["message"]), dict(completion.get("usage") or {})
    return _as_dict(completion.choices[0].message), _as_dict(getattr(completion, "usage", None) or {})


def _add_usage(total: dict[str, Any], used: dict[str, Any]) -> None:
    """Sum token counts, nested details included (``prompt_tokens_details.cached_tokens``...)."""
    for key, value in used.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            total[key] = total.get(key, 0) + value
        elif isinstance(value, dict):
            _add_usage(total.setdefault(key, {}), value)


def _loop(model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, max_steps: int,
          max_chars: int, create_kwargs: dict[str, Any], code_tool: bool = True,
          ) -> Generator[tuple[str, Any], Any, ToolLoopResult]:
    """The loop's logic, shared by every driver (sync, async, the gateway): it yields
    ("model", kwargs) and ("run", (call_id, code)) and receives the completion or the Result.

    Calls to the client's own tools end the loop (``stopped="client_tool_calls"``) after the
    code calls of the same turn have run, so every call in the history has its answer."""
    msgs = [dict(m) for m in messages]
    all_tools = [*(tools or []), *([tool_definition("chat")] if code_tool else [])]
    usage: dict[str, Any] = {}
    calls: list[ExecutedCall] = []
    for _ in range(max_steps):
        completion = yield "model", {"model": model, "messages": msgs, **({"tools": all_tools} if all_tools else {}),
                                     **create_kwargs}
        message, used = _completion_parts(completion)
        _add_usage(usage, used)
        message = {k: v for k, v in message.items() if k in ("role", "content", "tool_calls", "reasoning_content")}
        message.setdefault("role", "assistant")
        msgs.append(message)
        tool_calls = message.get("tool_calls") or []
        if not tool_calls:
            return ToolLoopResult(message, calls, msgs, usage, "answer")
        ours = [c for c in tool_calls if code_tool and c["function"]["name"] == TOOL_NAME]
        for call in ours:
            try:
                code = json.loads(call["function"].get("arguments") or "{}")["code"]
                if not isinstance(code, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                msgs.append({"role": "tool", "tool_call_id": call["id"],
                             "content": 'error: arguments must be JSON like {"code": "print(1)"}'})
                continue
            result = yield "run", (call["id"], code)
            calls.append(ExecutedCall(call["id"], code, result))
            msgs.append({"role": "tool", "tool_call_id": call["id"], "content": format_result(result, max_chars)})
        if len(ours) < len(tool_calls):  # the client's own functions: hand the turn back
            return ToolLoopResult(message, calls, msgs, usage, "client_tool_calls")
    return ToolLoopResult(msgs[-1], calls, msgs, usage, "max_steps")


def run_tool_loop(client: Any, model: str, messages: list[dict[str, Any]], *, sandbox: Any = None,
                  tools: list[dict[str, Any]] | None = None, max_steps: int = 8, max_chars: int = 8000,
                  **create_kwargs: Any) -> ToolLoopResult:
    """Drive ``client.chat.completions.create`` until the model answers, running every
    ``code_interpreter`` call in one jailcell Session (state persists within the loop).

    ``client`` is any OpenAI-compatible client (openai.OpenAI, or one pointed at vLLM, Ollama...).
    Calls to the client's own ``tools`` end the loop with ``stopped="client_tool_calls"``.
    """
    from .._sandbox import Sandbox

    own = sandbox is None
    sandbox = sandbox or Sandbox()
    session = sandbox.session()
    steps = _loop(model, messages, tools, max_steps, max_chars, create_kwargs)
    try:
        kind, payload = next(steps)
        while True:
            reply = client.chat.completions.create(**payload) if kind == "model" else session.run(payload[1])
            kind, payload = steps.send(reply)
    except StopIteration as stop:
        return stop.value
    finally:
        session.close()
        if own:
            sandbox.close()


async def arun_tool_loop(client: Any, model: str, messages: list[dict[str, Any]], *, sandbox: Any = None,
                         tools: list[dict[str, Any]] | None = None, max_steps: int = 8, max_chars: int = 8000,
                         **create_kwargs: Any) -> ToolLoopResult:
    """:func:`run_tool_loop` for async clients (openai.AsyncOpenAI); the same loop, async I/O.
    ``sandbox`` may be a Sandbox or an AsyncSandbox.  Cancelling the loop kills the code it runs."""
    from .._async import AsyncSandbox, twin

    own = sandbox is None
    if sandbox is None:  # a constructor cannot be awaited: it checks the backend in a thread
        sandbox = await asyncio.to_thread(AsyncSandbox)
    elif not isinstance(sandbox, AsyncSandbox):
        sandbox = twin(sandbox)
    session = await sandbox.session()
    steps = _loop(model, messages, tools, max_steps, max_chars, create_kwargs)
    try:
        kind, payload = next(steps)
        while True:
            if kind == "model":
                reply = await client.chat.completions.create(**payload)
            else:
                reply = await session.run(payload[1])
            kind, payload = steps.send(reply)
    except StopIteration as stop:
        return stop.value
    finally:
        await session.close()
        if own:
            await sandbox.close()
