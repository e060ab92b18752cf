"""`jailcell serve`: an OpenAI-compatible gateway that gives any chat-completions model a code interpreter.

Clients send ``tools=[{"type": "code_interpreter"}]`` as they would to a hosted API.  The gateway
offers the upstream model a ``code_interpreter`` function tool, runs each call in a jailcell
Session (a *container*), feeds the formatted Result back, and loops (bounded) until the model
answers.

One conversation core (:meth:`Gateway._converse`) produces events — model text deltas, finished
model turns, code calls and their results, the end — and each API format renders them:

- ``POST /v1/responses`` (OpenAI Responses: ``code_interpreter_call`` items, streaming events,
  ``previous_response_id``, ``container``),
- ``POST /v1/chat/completions`` (streaming and not; ``enable_code_interpreter``),
- ``POST /api/v1/services/aigc/text-generation/generation`` (DashScope native: ``tool_info``,
  ``usage.plugins.code_interpreter.count``, SSE with ``X-DashScope-SSE: enable``).

Containers outlive a request so a conversation can continue in the same Python state: they close
after ``container_idle`` seconds without use, and at most ``max_containers`` live at once (the
least recently used idle one is closed to make room).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable

from .._errors import InputError, JailcellError, MissingExtra
from .._result import Result
from .._sandbox import Sandbox, Session
from .tools import TOOL_NAME, ExecutedCall, ToolLoopResult, _loop, format_result

__all__ = ["Gateway", "GatewayError", "serve"]

MAX_BODY = 8 * 1024 * 1024
MAX_STORED_RESPONSES = 1000
_STOP_REASONS = {"answer": "stop", "client_tool_calls": "tool_calls", "max_steps": "length"}


class GatewayError(Exception):
    """A request the gateway refuses or cannot serve; rendered in the endpoint's error format."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def _deps():
    try:
        import httpx
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route
    except ImportError as exc:
        raise MissingExtra("jailcell serve", "serve", exc.name) from None
    return httpx, Starlette, JSONResponse, StreamingResponse, Route


MAX_DEPTH = 64  # JSON nesting a request may have (messages, tools and their schemas need far less)


def _depth_over(value: Any, limit: int) -> bool:
    """Whether ``value`` nests deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
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


# ------------------------------------------------------------------------------------------------
# containers: Sessions that outlive a request, bounded in number and idle time
# ------------------------------------------------------------------------------------------------

class _Containers:
    def __init__(self, sandbox: Sandbox, idle: float, limit: int) -> None:
        self.sandbox, self.idle, self.limit = sandbox, idle, limit
        self.items: collections.OrderedDict[str, list[Any]] = collections.OrderedDict()  # id -> [session, busy]
        self.lock = asyncio.Lock()

    def check(self, cid: str | None) -> None:
        """Fail early (before any model call) when a requested container is gone."""
        if cid is None:
            return
        entry = self.items.get(cid)
        if entry is None or entry[0].closed:
            raise GatewayError(404, f"container {cid!r} does not exist or has expired (containers close after "
                                    f"{self.idle:g} s idle); omit it to get a new one",
                               code="container_not_found", param="container")

    async def acquire(self, cid: str | None) -> tuple[str, Session]:
        async with self.lock:
            if cid is not None:
                self.check(cid)
                entry = self.items[cid]
                entry[1] += 1
                self.items.move_to_end(cid)
                return cid, entry[0]
            for old in [k for k, (s, busy) in self.items.items() if s.closed and not busy]:
                del self.items[old]
            if len(self.items) >= self.limit:
                idle = next((k for k, (_, busy) in self.items.items() if not busy), None)
                if idle is None:
                    raise GatewayError(429, f"all {self.limit} containers are in use; retry later or raise "
                                            "--max-containers", "rate_limit_error", "too_many_containers")
                session = self.items.pop(idle)[0]
                await asyncio.to_thread(session.close)
            cid = _new_id("cntr")
            self.items[cid] = [await asyncio.to_thread(self.sandbox.session, idle_timeout=self.idle), 1]
            return cid, self.items[cid][0]

    def release(self, cid: str) -> None:
        entry = self.items.get(cid)
        if entry is not None:
            entry[1] -= 1

    def close(self) -> None:
        for session, _ in self.items.values():
            session.close()
        self.items.clear()


class _Conversation:
    """One request's conversation: what to send upstream and where its code runs."""

    def __init__(self, model: str, messages: list[dict[str, Any]], own_tools: list[dict[str, Any]],
                 extra: dict[str, Any], code_tool: bool, container: str | None) -> None:
        self.model, self.messages, self.own_tools, self.extra = model, messages, own_tools, extra
        self.code_tool, self.container = code_tool, container


# ------------------------------------------------------------------------------------------------
# the gateway
# ------------------------------------------------------------------------------------------------

class Gateway:
    """The ASGI app behind ``jailcell serve`` (``gateway.app``); ``close()`` releases every jail."""

    def __init__(self, upstream: str, *, model: str | None = None, api_key: str | None = None,
                 upstream_api_key: str | None = None, policy: Any = "standard", backend: str | None = None,
                 max_steps: int = 8, max_containers: int = 32, container_idle: float = 1200.0,
                 upstream_timeout: float = 600.0) -> None:
        self.httpx, Starlette, self.JSONResponse, self.StreamingResponse, Route = _deps()
        if max_steps < 1 or max_containers < 1 or container_idle <= 0:
            raise ValueError("max_steps and max_containers must be >= 1 and container_idle > 0")
        self.upstream = upstream.rstrip("/")
        self.model, self.api_key, self.max_steps, self.upstream_timeout = model, api_key, max_steps, upstream_timeout
        self.upstream_headers = {"Authorization": f"Bearer {upstream_api_key}"} if upstream_api_key else {}
        self.sandbox = Sandbox(policy, backend=backend)
        self.containers = _Containers(self.sandbox, container_idle, max_containers)
        self.stored: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/responses", self.responses, methods=["POST"]),
            Route("/api/v1/services/aigc/text-generation/generation", self.dashscope, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        try:
            yield
        finally:
            await asyncio.to_thread(self.close)  # graceful shutdown leaves no jails behind

    def close(self) -> None:
        self.containers.close()
        self.sandbox.close()

    # -- requests ----------------------------------------------------------------------------

    def _authorize(self, request) -> None:
        if self.api_key is not None:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {self.api_key}".encode()):
                raise GatewayError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key "
                                        "given to jailcell serve --api-key", code="invalid_api_key")

    async def _body(self, request) -> dict[str, Any]:
        self._authorize(request)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise GatewayError(413, f"request body is larger than the limit of {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise GatewayError(400, f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise GatewayError(400, f"request body is nested deeper than {MAX_DEPTH} levels") from None
        if not isinstance(body, dict):
            raise GatewayError(400, "request body must be a JSON object")
        if _depth_over(body, MAX_DEPTH):
            raise GatewayError(400, f"request body is nested deeper than {MAX_DEPTH} levels")
        return body

    def _model(self, body: dict[str, Any]) -> str:
        model = self.model or body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "'model' is required (or start the gateway with --model)", param="model")
        return model

    def _openai_error(self, exc: GatewayError):
        return self.JSONResponse({"error": {"message": exc.message, "type": exc.kind, "param": exc.param,
                                            "code": exc.code}}, status_code=exc.status)

    async def _stream(self, events: AsyncIterator[Any], render: Callable[[Any], Any], on_error: Callable[[Any], Any]):
        """Prime the conversation (so failures before the first event are HTTP errors), then stream."""
        first = await events.__anext__()

        async def body():
            try:
                for chunk in render(first):
                    yield chunk
                async for event in events:
                    for chunk in render(event):
                        yield chunk
            except GatewayError as exc:
                for chunk in on_error(exc):
                    yield chunk
            finally:
                await events.aclose()

        return self.StreamingResponse(body(), media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- upstream ----------------------------------------------------------------------------

    def _upstream_failed(self, what: str) -> GatewayError:
        return GatewayError(502, f"upstream {self.upstream} {what}", "upstream_error", "upstream_error")

    async def _complete(self, client, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await client.post(f"{self.upstream}/chat/completions", json=payload, headers=self.upstream_headers)
        except self.httpx.HTTPError as exc:
            raise self._upstream_failed(f"failed: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            raise self._upstream_failed(f"answered {resp.status_code}: {resp.text[:500]}")
        try:
            data = resp.json()
            if not isinstance(data["choices"][0]["message"], dict):
                raise TypeError
        except (ValueError, KeyError, IndexError, TypeError):
            raise self._upstream_failed("sent a response that is not a chat completion") from None
        return data

    async def _complete_streaming(self, client, payload: dict[str, Any]) -> AsyncIterator[tuple]:
        """Stream one upstream turn: yields ("delta", field, text) then ("completion", assembled dict)."""
        payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        message: dict[str, Any] = {"role": "assistant", "content": None}
        calls: dict[int, dict[str, Any]] = {}
        meta: dict[str, Any] = {"usage": {}}
        try:
            async with client.stream("POST", f"{self.upstream}/chat/completions", json=payload,
                                     headers=self.upstream_headers) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    raise self._upstream_failed(f"answered {resp.status_code}: {text[:500]}")
                if "text/event-stream" not in resp.headers.get("content-type", ""):  # ignored stream=true
                    data = json.loads(await resp.aread())
                    if not isinstance(data.get("choices", [{}])[0].get("message"), dict):
                        raise ValueError
                    yield "completion", data
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise self._upstream_failed(f"failed mid-stream: {json.dumps(chunk['error'])[:500]}")
                    meta["usage"] = chunk.get("usage") or meta["usage"]
                    meta.setdefault("model", chunk.get("model"))
                    meta.setdefault("id", chunk.get("id"))
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        for field in ("reasoning_content", "content"):
                            if delta.get(field):
                                message[field] = (message.get(field) or "") + delta[field]
                                yield "delta", field, delta[field]
                        for tc in delta.get("tool_calls") or []:
                            slot = calls.setdefault(tc.get("index", len(calls)), {
                                "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                            slot["id"] = tc.get("id") or slot["id"]
                            fn = tc.get("function") or {}
                            slot["function"]["name"] += fn.get("name") or ""
                            slot["function"]["arguments"] += fn.get("arguments") or ""
        except self.httpx.HTTPError as exc:
            raise self._upstream_failed(f"failed: {type(exc).__name__}: {exc}") from None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise self._upstream_failed("sent a stream that is not chat-completion chunks") from None
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        yield "completion", {"id": meta.get("id"), "object": "chat.completion", "model": meta.get("model"),
                             "choices": [{"index": 0, "message": message}], "usage": meta["usage"]}

    # -- the conversation core ---------------------------------------------------------------

    async def _converse(self, conv: _Conversation, *, stream: bool) -> AsyncIterator[tuple]:
        """Events: ("delta", field, text) · ("turn", message) · ("call", id, code) ·
        ("result", ExecutedCall, container_id) · ("done", ToolLoopResult, model name, container_id)."""
        self.containers.check(conv.container)
        steps = _loop(conv.model, conv.messages, conv.own_tools, self.max_steps, 8000, conv.extra, conv.code_tool)
        container, session = None, None
        model_name = conv.model
        try:
            async with self.httpx.AsyncClient(timeout=self.upstream_timeout) as client:
                kind, payload = next(steps)
                while True:
                    if kind == "model":
                        if stream:
                            completion: dict[str, Any] = {}
                            async for event in self._complete_streaming(client, payload):
                                if event[0] == "delta":
                                    yield event
                                else:
                                    completion = event[1]
                        else:
                            completion = await self._complete(client, payload)
                        model_name = completion.get("model") or model_name
                        yield "turn", completion["choices"][0]["message"]
                        reply: Any = completion
                    else:
                        call_id, code = payload
                        yield "call", call_id, code
                        if session is None:
                            container, session = await self.containers.acquire(conv.container)
                        try:
                            reply = await asyncio.to_thread(session.run, code)
                        except InputError as exc:  # e.g. code over the size limit: the model is told
                            reply = Result("error", error={"type": "InputError", "message": str(exc)})
                        except JailcellError as exc:
                            raise GatewayError(500, f"the sandbox failed: {exc}", "server_error",
                                               "sandbox_error") from None
                        yield "result", ExecutedCall(call_id, code, reply), container
                    kind, payload = steps.send(reply)
        except StopIteration as stop:
            yield "done", stop.value, model_name, container or conv.container
        finally:
            steps.close()
            if container is not None:
                self.containers.release(container)

    # -- endpoints ---------------------------------------------------------------------------

    async def models(self, request):
        try:
            self._authorize(request)
        except GatewayError as exc:
            return self._openai_error(exc)
        return self.JSONResponse({"object": "list", "data": [{"id": self.model or "upstream", "object": "model",
                                                               "created": 0, "owned_by": "jailcell"}]})

    async def chat(self, request):
        try:
            body = await self._body(request)
            with _validating():
                conv, render = self._chat_request(body)
            if body.get("stream") is True:
                return await self._stream(self._converse(conv, stream=True), render.chunks, render.error)
            done: tuple = ()
            async for event in self._converse(conv, stream=False):
                done = event
            return self.JSONResponse(render.completion(*done[1:]))
        except GatewayError as exc:
            return self._openai_error(exc)

    def _chat_request(self, body: dict[str, Any]) -> tuple["_Conversation", "_ChatRender"]:
        enabled, own = _function_tools(body.get("tools"))
        container = body.get("container")
        if container is not None and not isinstance(container, str):
            raise GatewayError(400, "'container' must be a container id string", param="container")
        conv = _Conversation(
            self._model(body), _messages(body.get("messages"), "messages"), own,
            {k: v for k, v in body.items() if k not in ("messages", "tools", "model", "stream", "stream_options",
                                                        "enable_code_interpreter", "container")},
            enabled or bool(body.get("enable_code_interpreter")), container)
        _check_flag(body, "stream")
        return conv, _ChatRender(conv.model, self.max_steps)

    async def responses(self, request):
        try:
            body = await self._body(request)
            with _validating():
                conv, render = self._responses_request(body)
            if body.get("stream") is True:
                return await self._stream(self._converse(conv, stream=True), render.events, render.error)
            async for event in self._converse(conv, stream=False):
                render.events(event)
            return self.JSONResponse(render.response)
        except GatewayError as exc:
            return self._openai_error(exc)

    def _responses_request(self, body: dict[str, Any]) -> tuple["_Conversation", "_ResponsesRender"]:
        enabled, own = _function_tools(body.get("tools"))
        history: list[dict[str, Any]] = []
        container = None
        previous = body.get("previous_response_id")
        if previous is not None:
            stored = self.stored.get(previous) if isinstance(previous, str) else None
            if stored is None:
                raise GatewayError(404, f"previous response {previous!r} not found (this gateway keeps the last "
                                        f"{MAX_STORED_RESPONSES} responses stored with store=true)",
                                   code="previous_response_not_found", param="previous_response_id")
            history, container = list(stored["messages"]), stored["container"]
        for tool in body.get("tools") or []:
            if tool.get("type") == "code_interpreter" and isinstance(tool.get("container"), str):
                container = tool["container"]
        instructions = body.get("instructions")
        messages = history + _responses_input(body.get("input"))
        extra = {k: v for k, v in body.items() if k in ("temperature", "top_p", "enable_thinking", "seed")}
        if body.get("max_output_tokens") is not None:
            extra["max_tokens"] = body["max_output_tokens"]
        conv = _Conversation(self._model(body),
                             ([{"role": "system", "content": str(instructions)}] if instructions else []) + messages,
                             own, extra, enabled, container)
        include = body.get("include") or []
        if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
            raise GatewayError(400, "'include' must be a list of strings", param="include")
        _check_flag(body, "stream")
        _check_flag(body, "store")
        return conv, _ResponsesRender(body, conv.model, "code_interpreter_call.outputs" in include,
                                      self.max_steps, self._store(body, bool(instructions)))

    def _store(self, body: dict[str, Any], has_instructions: bool) -> Callable[[str, ToolLoopResult, Any], None]:
        def store(response_id: str, out: ToolLoopResult, container: str | None) -> None:
            if body.get("store") is False:
                return
            self.stored[response_id] = {"messages": out.messages[1 if has_instructions else 0:],
                                        "container": container}
            while len(self.stored) > MAX_STORED_RESPONSES:
                self.stored.popitem(last=False)
        return store

    async def dashscope(self, request):
        request_id = str(uuid.uuid4())
        try:
            body = await self._body(request)
            with _validating():
                conv, render = self._dashscope_request(body, request_id)
            if request.headers.get("x-dashscope-sse", "").lower() == "enable":
                return await self._stream(self._converse(conv, stream=True), render.sse, render.sse_error)
            async for event in self._converse(conv, stream=False):
                render.update(event)
            return self.JSONResponse(render.payload())
        except GatewayError as exc:
            return self.JSONResponse({"request_id": request_id, "code": _dashscope_code(exc), "message": exc.message},
                                     status_code=exc.status)

    def _dashscope_request(self, body: dict[str, Any], request_id: str) -> tuple["_Conversation", "_DashScopeRender"]:
        params = body.get("parameters") or {}
        inp = body.get("input")
        if not isinstance(params, dict) or not isinstance(inp, dict):
            raise GatewayError(400, "'input' and 'parameters' must be objects", param="input")
        if "messages" in inp:
            messages = _messages(inp["messages"], "input.messages")
        elif isinstance(inp.get("prompt"), str) and inp["prompt"]:
            messages = [{"role": "user", "content": inp["prompt"]}]
        else:
            raise GatewayError(400, "'input' needs 'messages' (a list) or 'prompt' (a string)", param="input")
        enabled, own = _function_tools(params.get("tools"), "parameters.tools")
        fmt = params.get("result_format", "message")
        if fmt not in ("message", "text"):
            raise GatewayError(400, f"parameters.result_format must be 'message' or 'text', not {fmt!r}")
        container = params.get("container")
        if container is not None and not isinstance(container, str):
            raise GatewayError(400, "parameters.container must be a container id string")
        extra = {k: params[k] for k in ("temperature", "top_p", "max_tokens", "seed", "stop", "enable_thinking",
                                        "thinking_budget", "presence_penalty") if k in params}
        conv = _Conversation(self._model(body), messages, own, extra,
                             enabled or bool(params.get("enable_code_interpreter")), container)
        return conv, _DashScopeRender(request_id, fmt, bool(params.get("incremental_output")))


# ------------------------------------------------------------------------------------------------
# renderers: events -> the wire format of each API
# ------------------------------------------------------------------------------------------------

def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    return ((f"event: {event}\n" if event else "") + f"data: {json.dumps(data)}\n\n").encode()


def _client_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in message.get("tool_calls") or [] if c["function"]["name"] != TOOL_NAME]


def _call_summary(call: ExecutedCall, container: str | None) -> dict[str, Any]:
    r = call.result
    return {"id": call.id, "code": call.code, "container_id": container, "status": r.status, "stdout": r.stdout,
            "stderr": r.stderr, "result": r.result, "error": r.error, "images": len(r.outputs)}


def _stopped_text(out: ToolLoopResult, max_steps: int) -> str | None:
    if out.stopped == "max_steps":
        return (f"[jailcell: the step limit was reached ({max_steps} model calls) before the model answered; "
                "raise it with jailcell serve --max-steps]")
    return out.message.get("content") if out.stopped == "answer" else None


class _ChatRender:
    def __init__(self, model: str, max_steps: int) -> None:
        self.model, self.max_steps = model, max_steps
        self.id, self.created = _new_id("chatcmpl"), int(time.time())

    def completion(self, out: ToolLoopResult, model: str, container: str | None) -> dict[str, Any]:
        message = {"role": "assistant", "content": _stopped_text(out, self.max_steps)}
        if out.message.get("reasoning_content"):
            message["reasoning_content"] = out.message["reasoning_content"]
        if out.stopped == "client_tool_calls":
            message["tool_calls"] = _client_calls(out.message)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": _STOP_REASONS[out.stopped]}],
                "usage": out.usage,
                "jailcell": {"stopped": out.stopped, "container_id": container,
                             "calls": [_call_summary(c, container) for c in out.calls]}}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        return _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    def chunks(self, event: tuple) -> list[bytes]:
        kind = event[0]
        out: list[bytes] = []
        if kind == "delta":
            out.append(self._chunk({event[1]: event[2]}))
        elif kind == "call":
            out.append(self._chunk({}, jailcell={"type": "code_interpreter_call", "id": event[1], "code": event[2],
                                                 "status": "interpreting"}))
        elif kind == "result":
            out.append(self._chunk({}, jailcell={"type": "code_interpreter_call", **_call_summary(*event[1:]),
                                                 "output": format_result(event[1].result)}))
        elif kind == "done":
            result, self.model, container = event[1:]
            if result.stopped == "max_steps":
                out.append(self._chunk({"content": _stopped_text(result, self.max_steps)}))
            if result.stopped == "client_tool_calls":
                out.append(self._chunk({"tool_calls": [dict(c, index=i) for i, c in
                                                       enumerate(_client_calls(result.message))]}))
            out.append(self._chunk({}, _STOP_REASONS[result.stopped],
                                   jailcell={"stopped": result.stopped, "container_id": container}))
            out.append(_sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                             "model": self.model, "choices": [], "usage": result.usage}))
            out.append(b"data: [DONE]\n\n")
        return out

    def error(self, exc: GatewayError) -> list[bytes]:
        return [_sse({"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}}),
                b"data: [DONE]\n\n"]


class _ResponsesRender:
    """Builds the Response object and, on the way, the streaming events that describe it."""

    def __init__(self, body: dict[str, Any], model: str, include_outputs: bool, max_steps: int,
                 store: Callable[[str, ToolLoopResult, Any], None]) -> None:
        self.include_outputs, self.max_steps, self.store = include_outputs, max_steps, store
        self.seq = 0
        self.text: dict[str, Any] | None = None  # the message item being written
        self.calls: dict[str, dict[str, Any]] = {}
        self.response: dict[str, Any] = {
            "id": _new_id("resp"), "object": "response", "created_at": int(time.time()), "model": model,
            "status": "in_progress", "incomplete_details": None, "error": None,
            "instructions": body.get("instructions"), "metadata": body.get("metadata") or {}, "output": [],
            "parallel_tool_calls": True, "tool_choice": body.get("tool_choice", "auto"), "tools": _echo_tools(body),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "previous_response_id": body.get("previous_response_id"), "store": body.get("store", True), "usage": None,
        }

    def _event(self, kind: str, **data: Any) -> bytes:
        self.seq += 1
        return _sse({"type": kind, "sequence_number": self.seq - 1, **data}, kind)

    def _add(self, item: dict[str, Any]) -> tuple[int, bytes]:
        self.response["output"].append(item)
        index = len(self.response["output"]) - 1
        return index, self._event("response.output_item.added", output_index=index, item=dict(item))

    def _open_text(self) -> list[bytes]:
        item = {"type": "message", "id": _new_id("msg"), "role": "assistant", "status": "in_progress", "content": []}
        index, added = self._add(item)
        self.text = {"item": item, "index": index, "text": ""}
        return [added, self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                   content_index=0, part={"type": "output_text", "text": "", "annotations": []})]

    def _write(self, delta: str) -> list[bytes]:
        out = [] if self.text is not None else self._open_text()
        assert self.text is not None
        self.text["text"] += delta
        return out + [self._event("response.output_text.delta", item_id=self.text["item"]["id"],
                                  output_index=self.text["index"], content_index=0, delta=delta, logprobs=[])]

    def _close_text(self) -> list[bytes]:
        if self.text is None:
            return []
        item, index, text = self.text["item"], self.text["index"], self.text["text"]
        self.text = None
        part = {"type": "output_text", "text": text, "annotations": []}
        item.update(status="completed", content=[part])
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def events(self, event: tuple) -> list[bytes]:
        kind = event[0]
        out: list[bytes] = []
        if self.seq == 0:
            out.append(self._event("response.created", response=dict(self.response)))
            out.append(self._event("response.in_progress", response=dict(self.response)))
        if kind == "delta" and event[1] == "content":
            out += self._write(event[2])
        elif kind == "turn":
            if event[1].get("content") and self.text is None:  # upstream did not stream this turn
                out += self._write(event[1]["content"])
            out += self._close_text()
        elif kind == "call":
            item = {"type": "code_interpreter_call", "id": f"ci_{event[1]}", "code": "", "container_id": "",
                    "status": "in_progress", "outputs": None}
            index, added = self._add(item)
            self.calls[event[1]] = {"item": item, "index": index}
            ids = {"item_id": item["id"], "output_index": index}
            item["code"] = event[2]
            out += [added, self._event("response.code_interpreter_call.in_progress", **ids),
                    self._event("response.code_interpreter_call_code.delta", delta=event[2], **ids),
                    self._event("response.code_interpreter_call_code.done", code=event[2], **ids),
                    self._event("response.code_interpreter_call.interpreting", **ids)]
            item["status"] = "interpreting"
        elif kind == "result":
            call, container = event[1], event[2]
            slot = self.calls[call.id]
            item, r = slot["item"], call.result
            item.update(container_id=container, status="completed" if r.status == "ok" else "failed",
                        outputs=_ci_outputs(r) if self.include_outputs else None)
            for tool in self.response["tools"]:  # as the hosted API does: the tool names its container
                if tool["type"] == "code_interpreter":
                    tool["container"] = container
            ids = {"item_id": item["id"], "output_index": slot["index"]}
            out += [self._event("response.code_interpreter_call.completed", **ids),
                    self._event("response.output_item.done", output_index=slot["index"], item=item)]
        elif kind == "done":
            result, model, container = event[1:]
            for tc in _client_calls(result.message) if result.stopped == "client_tool_calls" else []:
                item = {"type": "function_call", "id": f"fc_{tc['id']}", "call_id": tc["id"],
                        "name": tc["function"]["name"], "arguments": tc["function"].get("arguments", ""),
                        "status": "completed"}
                index, added = self._add(item)
                out += [added, self._event("response.function_call_arguments.done", item_id=item["id"],
                                           output_index=index, arguments=item["arguments"]),
                        self._event("response.output_item.done", output_index=index, item=item)]
            if result.stopped == "max_steps":
                out += self._write(_stopped_text(result, self.max_steps) or "") + self._close_text()
            self.response.update(
                model=model, status="incomplete" if result.stopped == "max_steps" else "completed",
                # the step limit bounds the model turns: the Responses API's "max_messages"
                incomplete_details={"reason": "max_messages"} if result.stopped == "max_steps" else None,
                usage=_responses_usage(result.usage))
            self.store(self.response["id"], result, container)
            final = "response.incomplete" if result.stopped == "max_steps" else "response.completed"
            out.append(self._event(final, response=self.response))
        return out

    def error(self, exc: GatewayError) -> list[bytes]:
        self.response.update(status="failed", error={"code": exc.code or "server_error", "message": exc.message})
        return [self._event("error", code=exc.code, message=exc.message, param=exc.param),
                self._event("response.failed", response=self.response)]


def _echo_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's tools as a Response lists them (the code interpreter always with a container)."""
    tools = []
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


def _responses_usage(u: dict[str, Any]) -> dict[str, Any]:
    """Chat-completions usage (summed over the loop) in the Responses API's shape."""
    return {"input_tokens": u.get("prompt_tokens", 0), "output_tokens": u.get("completion_tokens", 0),
            "total_tokens": u.get("total_tokens", 0),
            "input_tokens_details": {"cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                                     "cache_write_tokens": 0},
            "output_tokens_details": {
                "reasoning_tokens": (u.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)}}


def _ci_outputs(r: Result) -> list[dict[str, Any]]:
    logs = r.stdout + r.stderr + ((r.error or {}).get("traceback") or "")
    if r.status != "ok" and not (r.error or {}).get("traceback"):
        logs += f"[{r.status}: {(r.error or {}).get('message', '')}]"
    return [{"type": "logs", "logs": logs}] + [
        {"type": "image", "url": f"data:{o['mime_type']};base64,{o['data']}"} for o in r.outputs]


class _DashScopeRender:
    """DashScope's native format: cumulative ``tool_info``; text cumulative unless ``incremental_output``."""

    _FIELDS = ("content", "reasoning_content")

    def __init__(self, request_id: str, fmt: str, incremental: bool) -> None:
        self.request_id, self.fmt, self.incremental = request_id, fmt, incremental
        self.text = dict.fromkeys(self._FIELDS, "")     # everything the model wrote
        self.pending = dict.fromkeys(self._FIELDS, "")  # ... since the last chunk
        self.streamed = False                           # the current turn arrived as deltas
        self.tool_info: list[dict[str, Any]] = []
        self.usage: dict[str, int] = {}
        self.finish = "null"
        self.client_calls: list[dict[str, Any]] = []
        self.container: str | None = None
        self.n = 0

    def _add(self, field: str, text: str) -> bool:
        self.text[field] += text
        self.pending[field] += text
        return bool(text)

    def update(self, event: tuple) -> bool:
        """Fold one event in; True when it is worth a chunk."""
        kind = event[0]
        if kind == "delta":
            self.streamed = True
            return self._add(event[1], event[2])
        if kind == "turn":
            streamed, self.streamed = self.streamed, False
            return not streamed and any([self._add(f, event[1].get(f) or "") for f in self._FIELDS])
        if kind == "call":
            self.tool_info.append({"code_interpreter": {"code": event[2]}, "type": "code_interpreter"})
            return True
        if kind == "result":
            self.container = event[2]
            return False
        if kind == "done":
            result, _, self.container = event[1:]
            self.usage, self.finish = result.usage, _STOP_REASONS[result.stopped]
            if result.stopped == "client_tool_calls":
                self.client_calls = _client_calls(result.message)
            if result.stopped == "max_steps":
                self._add("content", _stopped_text(result, 0) or "")
            return True
        return False

    def payload(self, chunk: bool = False) -> dict[str, Any]:
        src = self.pending if chunk and self.incremental else self.text
        output: dict[str, Any]
        if self.fmt == "text":
            output = {"text": src["content"], "finish_reason": self.finish}
        else:
            message: dict[str, Any] = {"role": "assistant", "content": src["content"]}
            if src["reasoning_content"]:
                message["reasoning_content"] = src["reasoning_content"]
            if self.client_calls:
                message["tool_calls"] = self.client_calls
            output = {"choices": [{"finish_reason": self.finish, "message": message}]}
        if self.tool_info:
            output["tool_info"] = list(self.tool_info)
        if self.container:
            output["container_id"] = self.container
        usage: dict[str, Any] = {"input_tokens": self.usage.get("prompt_tokens", 0),
                                 "output_tokens": self.usage.get("completion_tokens", 0),
                                 "total_tokens": self.usage.get("total_tokens", 0)}
        if self.tool_info:
            usage["plugins"] = {"code_interpreter": {"count": len(self.tool_info)}}
        return {"output": output, "usage": usage, "request_id": self.request_id}

    def _frame(self, event: str, status: int, data: dict[str, Any]) -> bytes:
        self.n += 1
        extra = f"status:{status}\n" if status != 200 else ""
        return f"id:{self.n}\nevent:{event}\n:HTTP_STATUS/{status}\n{extra}data:{json.dumps(data)}\n\n".encode()

    def sse(self, event: tuple) -> list[bytes]:
        if not self.update(event):
            return []
        data = self.payload(chunk=True)
        self.pending = dict.fromkeys(self._FIELDS, "")
        return [self._frame("result", 200, data)]

    def sse_error(self, exc: GatewayError) -> list[bytes]:
        return [self._frame("error", exc.status, {"request_id": self.request_id, "code": _dashscope_code(exc),
                                                  "message": exc.message})]


def _dashscope_code(exc: GatewayError) -> str:
    return {400: "InvalidParameter", 401: "InvalidApiKey", 404: "InvalidParameter", 413: "InvalidParameter",
            429: "Throttling"}.get(exc.status, "InternalError")


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


def serve(upstream: str, *, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """Run the gateway with uvicorn until interrupted; every container is closed on the way out."""
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingExtra("jailcell serve", "serve", exc.name) from None

    gateway = Gateway(upstream, **kwargs)
    try:
        uvicorn.run(gateway.app, host=host, port=port, log_level="warning")
    finally:
        gateway.close()
