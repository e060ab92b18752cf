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
import base64
import collections
import contextlib
import copy
import functools
import json
import logging
import sys
import uuid
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from urllib.parse import quote

from .. import _audit, _metrics
from .._async import AsyncSandbox
from .._errors import InputError, JailcellError, MissingExtra
from .._result import Result
from ._gateway_guard import Guard, csp_for, is_loopback, new_key
from ._gateway_keys import Key, Keys, owner_of
from ._gateway_render import _ChatRender, _dashscope_code, _DashScopeRender, _ResponsesRender
from ._gateway_requests import (
    MAX_DEPTH,
    GatewayError,
    _check_flag,
    _Containers,
    _Conversation,
    _depth_over,
    _forwarded,
    _function_tools,
    _messages,
    _responses_input,
    _validating,
)
from ._gateway_upstream import Upstream
from ._service import Observe, Readiness, health_routes, jail_ready, metrics_on
from .tools import ExecutedCall, ToolLoopResult, _loop

__all__ = ["Gateway", "GatewayError", "serve"]

log = logging.getLogger("jailcell.gateway")
access_log = logging.getLogger("jailcell.access")

MAX_BODY = 8 * 1024 * 1024
MAX_STORED_RESPONSES = 1000
MAX_STORED_BYTES = 256 * 1024 * 1024  # stored conversations (previous_response_id), all together
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request looks for its client having left


def _deps():
    try:
        import httpx
        from starlette.applications import Starlette
        from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
        from starlette.routing import Route
    except ImportError as exc:
        raise MissingExtra("jailcell serve", "serve", exc.name) from None
    del httpx  # used by Upstream; imported here so a missing one is the same clear error
    return Starlette, JSONResponse, StreamingResponse, HTMLResponse, Response, Route


def _file_id(name: str) -> str:
    """A container file's id: its workspace path, URL-safe (paths have slashes)."""
    return "cfile_" + base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _file_name(file_id: str) -> str:
    raw = file_id.removeprefix("cfile_")
    try:
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise GatewayError(404, f"no file {file_id!r}", code="file_not_found") from None


def _disposition(filename: str) -> str:
    """``attachment`` with the file's name: an ASCII fallback, and the exact name (RFC 6266/5987) for any other."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename) or "file"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


@functools.lru_cache(maxsize=1)
def _csp() -> str:
    return csp_for(_playground())


@functools.lru_cache(maxsize=1)
def _playground() -> str:
    """The playground page (one file in the wheel: no build step, nothing from a CDN)."""
    return (Path(__file__).resolve().parent / "playground.html").read_text(encoding="utf-8")


class Gateway:
    """The ASGI app behind ``jailcell serve`` (``gateway.app``); ``close()`` releases every jail."""

    def __init__(self, upstream: str, *, model: str | None = None, model_map: Mapping[str, str] | None = None,
                 api_key: str | None = None, upstream_api_key: str | None = None, policy: Any = "standard",
                 backend: str | None = None, max_steps: int = 8, max_containers: int = 32,
                 container_idle: float = 1200.0, upstream_timeout: float = 600.0, upstream_retries: int = 2,
                 ray_address: str | None = None, no_auth: bool = False, allowed_hosts: Sequence[str] = (),
                 cors_origins: Sequence[str] = (), keys: str | Path | Keys | None = None,
                 metrics: bool | None = None) -> None:
        Starlette, self.JSONResponse, self.StreamingResponse, HTMLResponse, self.Response, Route = _deps()
        if max_steps < 1 or max_containers < 1 or container_idle <= 0:
            raise ValueError("max_steps and max_containers must be >= 1 and container_idle > 0")
        self.upstream = Upstream(upstream, api_key=upstream_api_key, timeout=upstream_timeout,
                                 retries=upstream_retries)
        self.model, self.model_map = model, dict(model_map or {})
        if keys is not None and (api_key is not None or no_auth):
            raise ValueError("give named keys (--keys) or one key (--api-key / JAILCELL_API_KEY), not both")
        # Never open by default: without a key (and without no_auth) one is made now; serve() prints it.
        self.generated_key = api_key is None and not no_auth and keys is None
        self.api_key: str | None = new_key() if self.generated_key else api_key
        self.named = keys is not None  # named keys: each with its name in the logs, its policy and limits
        self.keys: Keys | None = (keys if isinstance(keys, Keys) else Keys.load(keys)) if keys is not None else \
            Keys.single(self.api_key) if self.api_key is not None else None
        self.max_steps = max_steps
        self.public_url = ""  # set by serve(): the start line names it
        self.sandbox: Any
        if ray_address:  # containers are sessions on a Ray cluster's jails
            from .ray import AsyncRayPool, RayPool

            self.sandbox = AsyncRayPool(RayPool(policy, address=ray_address, backend=backend))
        else:
            self.sandbox = AsyncSandbox(policy, backend=backend)
        self.sandboxes: dict[str | None, Any] = {None: self.sandbox}  # a key's policy -> where its code runs
        for name in sorted(self.keys.policies() if self.keys else ()):
            if ray_address:
                raise ValueError("per-key policies are not available with --ray; every key uses --policy there")
            self.sandboxes[name] = AsyncSandbox(name, backend=backend)
        self.containers = _Containers(self.sandbox, container_idle, max_containers)
        if metrics_on(metrics):
            _metrics.M.count_open("containers", self.containers.open_count)  # type: ignore[union-attr]
        readiness = Readiness({"jail": lambda: jail_ready(self.sandbox), "upstream": self.upstream.ping}, log)
        self.stored: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.stored_bytes = 0
        routes = Starlette(routes=[
            *health_routes(Route, self.JSONResponse, self.Response, readiness, self._refused),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/responses", self.responses, methods=["POST"]),
            Route("/api/v1/services/aigc/text-generation/generation", self.dashscope, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/containers/{container_id}/files", self.container_files, methods=["GET"]),
            Route("/v1/containers/{container_id}/files/{file_id}/content", self.container_file, methods=["GET"]),
            Route("/", lambda request: HTMLResponse(_playground(), headers={"Content-Security-Policy": _csp(),
                                                                              "Cache-Control": "no-store"}),
                  methods=["GET"]),
        ], lifespan=self._lifespan)
        self.app = Observe(Guard(routes, allowed_hosts=allowed_hosts, cors_origins=cors_origins), "gateway",
                           [r.path for r in routes.routes], access_log)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        if self.public_url:
            iso = self.sandbox.isolation
            log.info("jailcell serve: %s/v1 (playground %s/) -> upstream %s%s; policy %r, backend %s%s%s",
                     self.public_url, self.public_url, self.upstream.display_url,
                     f" as model {self.model!r}" if self.model else "", self.sandbox.policy.name, iso.get("backend"),
                     f" on a Ray cluster ({len(iso['actors'])} actors)" if iso.get("cluster") == "ray" else "",
                     "; clients need a key" if self.keys else "")
        try:
            yield
        finally:
            await self.upstream.aclose()
            await asyncio.to_thread(self.close)  # graceful shutdown leaves no jails behind

    def close(self) -> None:
        self.containers.close()
        for sandbox in self.sandboxes.values():
            sandbox._sync.close()

    # -- requests ----------------------------------------------------------------------------

    def _authorize(self, request) -> Key | None:
        """The key the request presents (401 if none is right); None when the gateway has no keys."""
        if self.keys is None:
            return None
        key = self.keys.find(request.headers.get("authorization", ""))
        if key is None:
            raise GatewayError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with a key of "
                                    "this gateway (--api-key, JAILCELL_API_KEY or --keys)", code="invalid_api_key")
        if self.named:
            _audit.tag(who=key.name)
        return key

    def _refused(self, request) -> Any:
        """The error response for a request without a right key, or None (for /metrics)."""
        try:
            self._authorize(request)
        except GatewayError as exc:
            return self._openai_error(exc)
        return None

    def _admit(self, key: Key | None) -> None:
        """429 when ``key`` used its runs of the last minute (checked as a request arrives)."""
        retry = key.runs_retry_after() if key is not None else None
        if key is None or retry is None:
            return
        if _metrics.M is not None:
            _metrics.M.limited.labels(key.name, "runs_per_minute").inc()
        raise GatewayError(429, f"key {key.name!r} ran {key.runs_per_minute} programs in the last minute, the most "
                                "it may (runs_per_minute)", "rate_limit_error", "rate_limit_exceeded",
                           retry_after=retry)

    async def _body(self, request) -> dict[str, Any]:
        key = self._authorize(request)
        self._admit(key)
        request.state.key = key
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise GatewayError(413, f"request body is larger than the limit of {MAX_BODY} bytes")
        try:
            body = json.loads(raw, parse_constant=_no_constant)
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
        """The name sent upstream: the request's, through --model-map, else --model, else as sent."""
        asked = body.get("model")
        if isinstance(asked, str) and asked in self.model_map:
            return self.model_map[asked]
        model = self.model or asked
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "'model' is required (or start the gateway with --model)", param="model")
        return model

    def _openai_error(self, exc: GatewayError):
        return self.JSONResponse({"error": {"message": exc.message, "type": exc.kind, "param": exc.param,
                                            "code": exc.code, "request_id": _audit.current().get("request_id")}},
                                 status_code=exc.status, headers=exc.headers)

    async def _unless_client_leaves(self, request, work: Awaitable[Any]) -> Any:
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

    async def _stream(self, request, events: AsyncGenerator[Any, None], render: Callable[[Any], Any],
                      on_error: Callable[[Any], Any]):
        """Prime the conversation (so failures before the first event are HTTP errors; a client that
        leaves meanwhile cancels the upstream call), then stream.  Every failure after that ends the
        stream with the format's error event, never a cut stream."""
        first = await self._unless_client_leaves(request, events.__anext__())
        if not isinstance(first, tuple):  # the client left: the upstream call was cancelled
            await events.aclose()
            return first

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
            except Exception as exc:  # noqa: BLE001 - a bug of ours: the client still gets a final event
                log.exception("a streamed answer failed")
                for chunk in on_error(GatewayError(500, f"the gateway failed: {type(exc).__name__}", "server_error",
                                                   "server_error")):
                    yield chunk
            finally:
                await events.aclose()

        return self.StreamingResponse(body(), media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- the conversation core ---------------------------------------------------------------

    async def _converse(self, conv: _Conversation, *, stream: bool) -> AsyncIterator[tuple]:
        """Events: ("delta", field, text) · ("turn", message) · ("call", id, code) ·
        ("result", ExecutedCall, container_id) · ("done", ToolLoopResult, model name, container_id)."""
        key = conv.key
        self.containers.check(conv.container, owner_of(key))
        if conv.code_tool and conv.container is None:
            self.containers.room_for(key)  # a key at its cap hears so before any model call
        steps = _loop(conv.model, conv.messages, conv.own_tools, self.max_steps, 8000, conv.extra, conv.code_tool)
        container, session = None, None
        model_name = conv.model
        try:
            kind, payload = next(steps)
            while True:
                if kind == "model":
                    if stream:
                        completion: dict[str, Any] = {}
                        async for event in self.upstream.stream(payload):
                            if event[0] == "delta":
                                yield event
                            else:
                                completion = event[1]
                    else:
                        completion = await self.upstream.complete(payload)
                    model_name = completion.get("model") or model_name
                    yield "turn", completion["choices"][0]["message"]
                    reply: Any = completion
                else:
                    call_id, code = payload
                    yield "call", call_id, code
                    if session is None:
                        container, session = await self.containers.acquire(
                            conv.container, key, self.sandboxes[key.policy if key is not None else None])
                        _audit.tag(conversation=container)
                    if key is not None:
                        key.count_run()
                    try:
                        reply = await session.run(code)  # cancelled (client gone): the run is killed
                    except InputError as exc:  # e.g. code over the size limit: the model is told
                        reply = Result("error", error={"type": "InputError", "message": str(exc)})
                    except JailcellError as exc:
                        log.error("container %s: the sandbox failed: %s", container, exc)
                        raise GatewayError(500, f"the sandbox failed: {exc}", "server_error",
                                           "sandbox_error") from None
                    if reply.files and container is not None:
                        self.containers.note_files(container, reply.files)
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
        try:
            listed = await self.upstream.models()
        except GatewayError as exc:
            return self._openai_error(exc)
        data = [{"id": m["id"], "object": "model", "created": int(m.get("created") or 0),
                 "owned_by": str(m.get("owned_by") or "upstream"),
                 "jailcell": {"usable": self.model is None or m["id"] == self.model, "sent_upstream_as": m["id"]}}
                for m in listed]
        names = {m["id"] for m in listed}
        for alias, target in self.model_map.items():  # names clients may use, mapped by --model-map
            data.append({"id": alias, "object": "model", "created": 0, "owned_by": "jailcell",
                         "jailcell": {"usable": target in names, "sent_upstream_as": target}})
        return self.JSONResponse({"object": "list", "data": data})

    async def container_files(self, request):
        """The files a container's runs wrote (as the hosted containers API lists them)."""
        try:
            key = self._authorize(request)
            cid = request.path_params["container_id"]
            self.containers.session(cid, owner_of(key))
        except GatewayError as exc:
            return self._openai_error(exc)
        data = [{"id": _file_id(name), "object": "container.file", "container_id": cid, "path": name,
                 "bytes": size, "source": "assistant"}
                for name, size in sorted(self.containers.files.get(cid, {}).items())]
        return self.JSONResponse({"object": "list", "data": data})

    async def container_file(self, request):
        """One file of a container's workspace, as bytes."""
        try:
            key = self._authorize(request)
            cid = request.path_params["container_id"]
            session = self.containers.session(cid, owner_of(key))
            name = _file_name(request.path_params["file_id"])
            try:
                data = await session.download(name)
            except InputError as exc:
                raise GatewayError(404, f"container {cid!r} has no file {name!r}: {exc}", code="file_not_found") \
                    from None
        except GatewayError as exc:
            return self._openai_error(exc)
        return self.Response(data, media_type="application/octet-stream",
                             headers={"Content-Disposition": _disposition(name.rsplit("/", 1)[-1])})

    async def chat(self, request):
        try:
            body = await self._body(request)
            with _validating():
                conv, render = self._chat_request(body)
            conv.key = request.state.key
            if body.get("stream") is True:
                return await self._stream(request, self._converse(conv, stream=True), render.chunks, render.error)
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
            _forwarded(body),
            enabled or bool(body.get("enable_code_interpreter")), container)
        _check_flag(body, "stream")
        return conv, _ChatRender(conv.model, self.max_steps)

    async def responses(self, request):
        try:
            body = await self._body(request)
            with _validating():
                conv, render = self._responses_request(body, request.state.key)
            conv.key = request.state.key
            if body.get("stream") is True:
                return await self._stream(request, self._converse(conv, stream=True), render.events, render.error)
            async def collect():
                async for event in self._converse(conv, stream=False):
                    render.events(event)
                return self.JSONResponse(render.response)
            return await self._unless_client_leaves(request, collect())
        except GatewayError as exc:
            return self._openai_error(exc)

    def _responses_request(self, body: dict[str, Any], key: Key | None) -> tuple["_Conversation", "_ResponsesRender"]:
        enabled, own = _function_tools(body.get("tools"))
        history: list[dict[str, Any]] = []
        container = None
        previous = body.get("previous_response_id")
        if previous is not None:
            stored = self.stored.get(previous) if isinstance(previous, str) else None
            if stored is not None and stored["owner"] != owner_of(key):
                stored = None  # another key's conversation: as if it did not exist
            if stored is None:
                raise GatewayError(404, f"previous response {previous!r} not found (this gateway keeps the last "
                                        f"{MAX_STORED_RESPONSES} responses stored with store=true, "
                                        f"{MAX_STORED_BYTES >> 20} MiB in all)",
                                   code="previous_response_not_found", param="previous_response_id")
            history, container = list(stored["messages"]), stored["container"]
        for tool in body.get("tools") or []:
            if tool.get("type") == "code_interpreter" and isinstance(tool.get("container"), str):
                container = tool["container"]
        instructions = body.get("instructions")
        messages = history + _responses_input(body.get("input"))
        extra = _forwarded({k: v for k, v in body.items() if k in ("temperature", "top_p", "enable_thinking", "seed",
                                                                    "top_k", "user", "parallel_tool_calls")})
        if body.get("max_output_tokens") is not None:
            extra.update(_forwarded({"max_tokens": body["max_output_tokens"]}))
        conv = _Conversation(self._model(body),
                             ([{"role": "system", "content": str(instructions)}] if instructions else []) + messages,
                             own, extra, enabled, container)
        include = body.get("include") or []
        if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
            raise GatewayError(400, "'include' must be a list of strings", param="include")
        _check_flag(body, "stream")
        _check_flag(body, "store")
        return conv, _ResponsesRender(body, conv.model, "code_interpreter_call.outputs" in include,
                                      self.max_steps, self._store(body, bool(instructions), key))

    def _store(self, body: dict[str, Any], has_instructions: bool,
               key: Key | None) -> Callable[[str, ToolLoopResult, Any], None]:
        def store(response_id: str, out: ToolLoopResult, container: str | None) -> None:
            if body.get("store") is False:
                return
            messages = out.messages[1 if has_instructions else 0:]
            size = len(json.dumps(messages, default=str))
            if size > MAX_STORED_BYTES // 4:  # too large to keep: previous_response_id gets a clear 404
                log.info("response %s not stored: its conversation is %d bytes", response_id, size)
                return
            self.stored[response_id] = {"messages": messages, "container": container, "bytes": size,
                                        "owner": owner_of(key)}
            self.stored_bytes += size
            while len(self.stored) > MAX_STORED_RESPONSES or self.stored_bytes > MAX_STORED_BYTES:
                _, dropped = self.stored.popitem(last=False)
                self.stored_bytes -= dropped["bytes"]
        return store

    async def dashscope(self, request):
        request_id = _audit.current().get("request_id") or str(uuid.uuid4())
        try:
            body = await self._body(request)
            with _validating():
                conv, render = self._dashscope_request(body, request_id)
            conv.key = request.state.key
            if request.headers.get("x-dashscope-sse", "").lower() == "enable":
                return await self._stream(request, self._converse(conv, stream=True), render.sse, render.sse_error)
            async def collect():
                async for event in self._converse(conv, stream=False):
                    render.update(event)
                return self.JSONResponse(render.payload())
            return await self._unless_client_leaves(request, collect())
        except GatewayError as exc:
            return self.JSONResponse({"request_id": request_id, "code": _dashscope_code(exc), "message": exc.message},
                                     status_code=exc.status, headers=exc.headers)

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
        extra = _forwarded({k: params[k] for k in ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop",
                                                   "enable_thinking", "thinking_budget", "presence_penalty",
                                                   "repetition_penalty", "n") if k in params}, "parameters.")
        conv = _Conversation(self._model(body), messages, own, extra,
                             enabled or bool(params.get("enable_code_interpreter")), container)
        return conv, _DashScopeRender(request_id, fmt, bool(params.get("incremental_output")))


def serve(upstream: str, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **kwargs: Any) -> None:
    """Run the gateway with uvicorn until interrupted; every container is closed on the way out.  Logs
    as uvicorn does (a start line, one access line per request, errors with their cause), at
    ``log_level``."""
    try:
        import uvicorn
        from uvicorn.config import LOGGING_CONFIG
    except ImportError as exc:
        raise MissingExtra("jailcell serve", "serve", exc.name) from None

    if kwargs.get("no_auth") and not is_loopback(host):
        raise ValueError(f"--no-auth is refused on {host}, which is not a loopback address: every machine that "
                         "reaches it could run code here; set a key (JAILCELL_API_KEY) instead")
    gateway = Gateway(upstream, **kwargs)
    gateway.public_url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    if gateway.generated_key:  # printed once, here; the playground takes it from the URL's fragment
        print(f"jailcell serve: no JAILCELL_API_KEY was set, so clients need this key (made now, shown once): "
              f"{gateway.api_key}\n  playground: {gateway.public_url}/#key={gateway.api_key}", file=sys.stderr,
              flush=True)
    elif kwargs.get("no_auth"):
        log.warning("jailcell serve: --no-auth: any program of any user of this machine that can reach %s may run "
                    "code and spend the upstream's key", gateway.public_url)
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["jailcell"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    try:
        # the access log is ours (jailcell.access: request id and key name), not uvicorn's
        uvicorn.run(gateway.app, host=host, port=port, log_level=log_level, log_config=config, access_log=False)
    finally:
        gateway.close()
