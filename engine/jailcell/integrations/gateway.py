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
import uuid
from typing import Any, AsyncIterator, Callable, Coroutine

from .._async import AsyncSandbox
from .._errors import InputError, JailcellError, MissingExtra
from .._result import Result
from ._gateway_render import _ChatRender, _dashscope_code, _DashScopeRender, _ResponsesRender
from ._gateway_requests import (
    MAX_DEPTH,
    GatewayError,
    _check_flag,
    _Containers,
    _Conversation,
    _depth_over,
    _function_tools,
    _messages,
    _responses_input,
    _validating,
)
from .tools import ExecutedCall, ToolLoopResult, _loop

__all__ = ["Gateway", "GatewayError", "serve"]

MAX_BODY = 8 * 1024 * 1024
MAX_STORED_RESPONSES = 1000
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request looks for its client having left


def _deps():
    try:
        import httpx
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route
    except ImportError as exc:
        raise MissingExtra("jailcell serve", "serve", exc.name) from None
    return httpx, Starlette, JSONResponse, StreamingResponse, Route


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
        self.sandbox = AsyncSandbox(policy, backend=backend)
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
        self.sandbox._sync.close()

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

    async def _unless_client_leaves(self, request, work: Coroutine[Any, Any, Any]) -> Any:
        """Await ``work`` (a non-streaming answer), cancelling it if the client disconnects first: the
        code it is running is killed and its container freed, instead of running on for nobody.
        (A streaming answer is cancelled by Starlette itself when its client goes away.)"""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    await asyncio.wait([task])
                    return self.JSONResponse({"error": {"message": "the client closed the connection",
                                                        "type": "client_closed_request"}}, status_code=499)
        except BaseException:  # this handler was cancelled (server shutdown): so is its work
            task.cancel()
            raise

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
                            reply = await session.run(code)  # cancelled (client gone): the run is killed
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
            async def collect():
                done: tuple = ()
                async for event in self._converse(conv, stream=False):
                    done = event
                return self.JSONResponse(render.completion(*done[1:]))
            return await self._unless_client_leaves(request, collect())
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
            async def collect():
                async for event in self._converse(conv, stream=False):
                    render.events(event)
                return self.JSONResponse(render.response)
            return await self._unless_client_leaves(request, collect())
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
            async def collect():
                async for event in self._converse(conv, stream=False):
                    render.update(event)
                return self.JSONResponse(render.payload())
            return await self._unless_client_leaves(request, collect())
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
