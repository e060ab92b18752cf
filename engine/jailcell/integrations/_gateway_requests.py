"""The gateway's requests: validating a body, the error a refused request gets in every API format,
and containers (Sessions that outlive a request).  Used by ``gateway.py``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import time
import uuid
from typing import Any, Iterable

from .. import _metrics
from ._gateway_keys import owner_of
from .tools import TOOL_NAME


class GatewayError(Exception):
    """A request the gateway refuses or cannot serve; rendered in the endpoint's error format."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}


MAX_DEPTH = 64  # JSON nesting a request may have (messages, tools and their schemas need far less)


def _depth_over(value: Any, limit: int) -> bool:
    """Whether ``value`` nests deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


@contextlib.contextmanager
def _validating():
    """Reading a request body: a wrong type anywhere the checks did not foresee is the client's
    error (400, saying what broke), never a 500."""
    try:
        yield
    except GatewayError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as exc:
        raise GatewayError(400, f"malformed request body ({type(exc).__name__}: {str(exc)[:200]})") from None


def _check_flag(body: dict[str, Any], key: str) -> None:
    if key in body and body[key] is not None and not isinstance(body[key], bool):
        raise GatewayError(400, f"'{key}' must be true or false", param=key)


# The request fields sent on to the upstream, by API (everything else a client sends stays here: a
# field that multiplies cost, such as ``n``, or one the gateway does not know, never reaches it).
FORWARDED = ("temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "stop", "seed",
             "presence_penalty", "frequency_penalty", "repetition_penalty", "response_format", "tool_choice",
             "parallel_tool_calls", "reasoning_effort", "enable_thinking", "thinking_budget", "user")
MAX_TOKENS_CAP = 65536  # a model call's max_tokens at most (the upstream's own limit may be lower)


def _forwarded(fields: dict[str, Any], where: str = "") -> dict[str, Any]:
    """The fields of ``fields`` that go upstream, checked: ``n`` (if sent) must be 1, and a token
    budget a positive integer up to MAX_TOKENS_CAP."""
    n = fields.get("n")
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise GatewayError(400, f"'{where}n' must be 1: the gateway runs one conversation per request", param="n")
    out = {k: fields[k] for k in FORWARDED if fields.get(k) is not None}
    for key in ("max_tokens", "max_completion_tokens"):
        value = out.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= MAX_TOKENS_CAP):
            raise GatewayError(400, f"'{where}{key}' must be an integer from 1 to {MAX_TOKENS_CAP}", param=key)
    return out


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _function_tools(tools: Any, where: str = "tools") -> tuple[bool, list[dict[str, Any]]]:
    """(code interpreter requested?, the client's own function tools in chat-completions format)."""
    if tools is None:
        return False, []
    if not isinstance(tools, list):
        raise GatewayError(400, f"'{where}' must be a list", param=where)
    enabled, own = False, []
    for tool in tools:
        if not isinstance(tool, dict) or "type" not in tool:
            raise GatewayError(400, f"each entry of '{where}' must be an object with a 'type'", param=where)
        if tool["type"] == "code_interpreter":
            enabled = True
        elif tool["type"] == "function" and isinstance(tool.get("function"), dict):
            own.append(tool)
        elif tool["type"] == "function" and "name" in tool:  # Responses API's flat function tool
            own.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                         if k in tool}})
        else:
            raise GatewayError(400, f"unsupported tool type {tool['type']!r}; supported: code_interpreter, function",
                               param=where)
    if any(t["function"].get("name") == TOOL_NAME for t in own):
        raise GatewayError(400, f"a client function may not be named {TOOL_NAME!r}: that name is the gateway's "
                                "code interpreter", param=where)
    return enabled, own


def _messages(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise GatewayError(400, f"'{where}' must be a non-empty list of messages", param=where)
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise GatewayError(400, f"each entry of '{where}' must be a message with a role "
                                    "(system, developer, user, assistant, tool)", param=where)
    return value


class _Containers:
    """The gateway's containers (sessions that outlive a request).  Each belongs to the key that made
    it: another key is told it does not exist."""

    def __init__(self, sandbox: Any, idle: float, limit: int) -> None:  # AsyncSandbox, or AsyncRayPool
        self.sandbox, self.idle, self.limit = sandbox, idle, limit
        self.items: collections.OrderedDict[str, list[Any]] = collections.OrderedDict()  # id -> [session, busy]
        self.owners: dict[str, str | None] = {}  # id -> the name of the key that made it
        self.used: dict[str, float] = {}  # id -> when it was last released (monotonic)
        self.files: dict[str, dict[str, int]] = {}  # id -> {name: bytes} written by its runs
        self.lock = asyncio.Lock()

    def check(self, cid: str | None, owner: str | None = None) -> None:
        """Fail early (before any model call) when a requested container is gone, or not the caller's."""
        if cid is None:
            return
        entry = self.items.get(cid)
        if entry is None or entry[0].closed or self.owners.get(cid) != owner:
            raise GatewayError(404, f"container {cid!r} does not exist or has expired (containers close after "
                                    f"{self.idle:g} s idle); omit it to get a new one",
                               code="container_not_found", param="container")

    def _drop(self, cid: str) -> Any:
        self.owners.pop(cid, None)
        self.used.pop(cid, None)
        self.files.pop(cid, None)
        return self.items.pop(cid)[0]

    def room_for(self, key: Any) -> None:
        """429 when ``key`` holds as many containers as it may (Retry-After: until its oldest idle one expires)."""
        if key is None or key.max_containers is None:
            return
        mine = [k for k, (s, _) in self.items.items() if self.owners.get(k) == key.name and not s.closed]
        if len(mine) < key.max_containers:
            return
        idle = [self.used.get(k, 0.0) for k in mine if not self.items[k][1]]
        wait = math.ceil(min(idle) + self.idle - time.monotonic()) if idle else 1
        if _metrics.M is not None:
            _metrics.M.limited.labels(key.name, "max_containers").inc()
        raise GatewayError(429, f"key {key.name!r} holds {len(mine)} containers, the most it may (max_containers); "
                                "reuse one (pass its id) or retry when one has expired", "rate_limit_error",
                           "too_many_containers", retry_after=max(1, wait))

    async def acquire(self, cid: str | None, key: Any = None, sandbox: Any = None) -> tuple[str, Any]:
        owner = owner_of(key)
        async with self.lock:
            if cid is not None:
                self.check(cid, owner)
                entry = self.items[cid]
                entry[1] += 1
                self.items.move_to_end(cid)
                return cid, entry[0]
            for old in [k for k, (s, busy) in self.items.items() if s.closed and not busy]:
                self._drop(old)
            self.room_for(key)
            if len(self.items) >= self.limit:
                idle = next((k for k, (_, busy) in self.items.items() if not busy), None)
                if idle is None:
                    raise GatewayError(429, f"all {self.limit} containers are in use; retry later or raise "
                                            "--max-containers", "rate_limit_error", "too_many_containers",
                                       retry_after=1)
                await self._drop(idle).close()
            cid = _new_id("cntr")
            self.items[cid] = [await (sandbox or self.sandbox).session(idle_timeout=self.idle), 1]
            self.owners[cid] = owner
            return cid, self.items[cid][0]

    def note_files(self, cid: str, files: list[dict[str, Any]]) -> None:
        """Remember what a run wrote (name, size), for the container's file list."""
        known = self.files.setdefault(cid, {})
        for f in files:
            if len(known) < 1000 or f["name"] in known:
                known[f["name"]] = int(f["size"])

    def session(self, cid: str, owner: str | None = None) -> Any:
        """An existing container's session, for its files (404 if it is gone or another key's)."""
        self.check(cid, owner)
        return self.items[cid][0]

    def release(self, cid: str) -> None:
        entry = self.items.get(cid)
        if entry is not None:
            entry[1] -= 1
            self.used[cid] = time.monotonic()

    def open_count(self) -> int:
        return sum(1 for s, _ in list(self.items.values()) if not s.closed)

    def close(self) -> None:
        for session, _ in self.items.values():
            session._sync.close()
        self.items.clear()
        self.owners.clear()
        self.used.clear()
        self.files.clear()


class _Conversation:
    """One request's conversation: what to send upstream and where its code runs."""

    def __init__(self, model: str, messages: list[dict[str, Any]], own_tools: list[dict[str, Any]],
                 extra: dict[str, Any], code_tool: bool, container: str | None) -> None:
        self.model, self.messages, self.own_tools, self.extra = model, messages, own_tools, extra
        self.code_tool, self.container = code_tool, container
        self.key: Any = None  # the named key that asked (its containers, policy and limits)


def _echo_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's tools as a Response lists them (the code interpreter always with a container)."""
    tools: list[dict[str, Any]] = []
    for tool in body.get("tools") or []:
        if tool.get("type") == "code_interpreter":
            container = tool.get("container")
            tools.append({"type": "code_interpreter",
                          "container": container if isinstance(container, (str, dict)) else {"type": "auto"}})
        elif tool.get("type") == "function" and "name" in tool:
            tools.append({"parameters": None, "strict": None, **tool})
        else:  # a chat-style function tool given to the Responses API: flatten it
            tools.append({"type": "function", "parameters": None, "strict": None, **tool.get("function", {})})
    return tools


def _responses_input(inp: Any) -> list[dict[str, Any]]:
    """Responses ``input`` (a string, or message / function_call / function_call_output /
    code_interpreter_call items, e.g. a previous response's output) as chat messages."""
    if isinstance(inp, str) and inp:
        return [{"role": "user", "content": inp}]
    if not isinstance(inp, list) or not inp:
        raise GatewayError(400, "'input' must be a non-empty string or a list of items", param="input")
    messages: list[dict[str, Any]] = []

    def calls_message() -> dict[str, Any]:
        if not (messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]):
            messages.append({"role": "assistant", "content": None, "tool_calls": []})
        return messages[-1]

    for item in inp:
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and item.get("role") in ("user", "assistant", "system", "developer"):
            content = item.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise GatewayError(400, "a message's 'content' must be a string or a list of text parts", param="input")
            messages.append({"role": "system" if item["role"] == "developer" else item["role"], "content": content})
        elif kind == "function_call":
            calls_message()["tool_calls"].append({"id": item.get("call_id"), "type": "function", "function": {
                "name": item.get("name"), "arguments": item.get("arguments", "")}})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "code_interpreter_call":
            call_id = str(item.get("id", "")).removeprefix("ci_")
            calls_message()["tool_calls"].append({"id": call_id, "type": "function", "function": {
                "name": TOOL_NAME, "arguments": json.dumps({"code": item.get("code") or ""})}})
            logs = "".join(o.get("logs", "") for o in item.get("outputs") or [] if isinstance(o, dict))
            messages.append({"role": "tool", "tool_call_id": call_id, "content": logs or "[output not kept]"})
        elif kind == "reasoning":
            continue
        else:
            raise GatewayError(400, "'input' items must be messages (with a role: user, assistant, system, "
                                    "developer), function_call, function_call_output or code_interpreter_call; "
                                    f"got {kind!r}", param="input")
    return messages
