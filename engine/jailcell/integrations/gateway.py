"""`jailcell serve`: an OpenAI-compatible gateway that gives any chat-completions model a code interpreter.

Clients send ``tools=[{"type": "code_interpreter"}]`` as they would to a hosted API.  The gateway
offers the upstream model a ``code_interpreter`` function tool, runs each call in a jailcell Session
that lives for the request, feeds the formatted Result back, and loops (bounded) until the model
answers.  This module covers non-streaming ``POST /v1/chat/completions`` and ``POST /v1/responses``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from .._errors import BackendUnavailable
from .._sandbox import Sandbox
from .tools import TOOL_NAME, ToolLoopResult, _loop

MAX_BODY = 8 * 1024 * 1024


class GatewayError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _deps():
    try:
        import httpx
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route
    except ImportError:
        raise BackendUnavailable('jailcell serve needs the serve extra: pip install "jailcell[serve]"') from None
    return httpx, Starlette, Request, JSONResponse, Route


def _split_tools(tools: Any) -> tuple[bool, list[dict[str, Any]]]:
    """(code interpreter requested?, the client's own function tools in chat-completions format)."""
    if tools is None:
        return False, []
    if not isinstance(tools, list):
        raise GatewayError(400, "'tools' must be a list")
    enabled, own = False, []
    for tool in tools:
        if not isinstance(tool, dict) or "type" not in tool:
            raise GatewayError(400, "each tool must be an object with a 'type'")
        if tool["type"] == "code_interpreter":
            enabled = True
        elif tool["type"] == "function" and "function" in tool:
            own.append(tool)
        elif tool["type"] == "function" and "name" in tool:  # Responses API's flat function tool
            own.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                         if k in tool}})
        else:
            raise GatewayError(400, f"unsupported tool type {tool['type']!r}; supported: code_interpreter, function")
    return enabled, own


class Gateway:
    def __init__(self, upstream: str, *, model: str | None = None, api_key: str | None = None,
                 upstream_api_key: str | None = None, policy: Any = "standard", backend: str = "auto",
                 max_steps: int = 8) -> None:
        self.httpx, Starlette, self.Request, self.JSONResponse, Route = _deps()
        self.upstream = upstream.rstrip("/")
        self.model, self.api_key, self.max_steps = model, api_key, max_steps
        self.upstream_headers = {"Authorization": f"Bearer {upstream_api_key}"} if upstream_api_key else {}
        self.sandbox = Sandbox(policy, backend=backend)
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/responses", self.responses, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        try:
            yield
        finally:
            await asyncio.to_thread(self.close)  # graceful shutdown leaves no jails behind

    def close(self) -> None:
        self.sandbox.close()

    # -- plumbing ----------------------------------------------------------------------------

    def _error(self, exc: GatewayError):
        return self.JSONResponse({"error": {"message": exc.message, "type": exc.kind, "param": None, "code": exc.code}},
                                 status_code=exc.status)

    async def _body(self, request) -> dict[str, Any]:
        if self.api_key is not None:
            if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
                raise GatewayError(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_request_error",
                                   "invalid_api_key")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise GatewayError(413, f"request body is {len(raw)} bytes; the limit is {MAX_BODY}")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise GatewayError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise GatewayError(400, "request body must be a JSON object")
        if body.get("stream"):
            raise GatewayError(400, "stream=true is not supported by this jailcell version; send stream=false")
        return body

    async def _call_upstream(self, client, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await client.post(f"{self.upstream}/chat/completions", json=payload, headers=self.upstream_headers)
        except self.httpx.HTTPError as exc:
            raise GatewayError(502, f"upstream {self.upstream} failed: {type(exc).__name__}: {exc}", "upstream_error") from None
        if resp.status_code != 200:
            raise GatewayError(502, f"upstream {self.upstream} answered {resp.status_code}: {resp.text[:500]}",
                               "upstream_error")
        try:
            data = resp.json()
            data["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise GatewayError(502, f"upstream {self.upstream} sent a response that is not a chat completion",
                               "upstream_error") from None
        return data

    async def _run_loop(self, model: str, messages: list[dict[str, Any]], own_tools: list[dict[str, Any]],
                        extra: dict[str, Any]) -> tuple[ToolLoopResult, dict[str, Any]]:
        session = await asyncio.to_thread(self.sandbox.session)
        last: dict[str, Any] = {}
        steps = _loop(model, messages, own_tools, self.max_steps, 8000, extra)
        try:
            async with self.httpx.AsyncClient(timeout=600) as client:
                kind, payload = next(steps)
                while True:
                    if kind == "model":
                        last = await self._call_upstream(client, payload)
                        reply: Any = last
                    else:
                        reply = await asyncio.to_thread(session.run, payload)
                    kind, payload = steps.send(reply)
        except StopIteration as stop:
            return stop.value, last
        finally:
            await asyncio.to_thread(session.close)

    # -- endpoints ---------------------------------------------------------------------------

    async def models(self, request):
        return self.JSONResponse({"object": "list", "data": [{"id": self.model or "upstream", "object": "model",
                                                               "owned_by": "jailcell"}]})

    async def chat(self, request):
        try:
            body = await self._body(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise GatewayError(400, "'messages' must be a non-empty list")
            enabled, own = _split_tools(body.get("tools"))
            enabled = enabled or bool(body.get("enable_code_interpreter"))
            extra = {k: v for k, v in body.items() if k not in ("messages", "tools", "model", "stream",
                                                               "enable_code_interpreter")}
            model = self.model or body.get("model") or "default"
            if not enabled:
                async with self.httpx.AsyncClient(timeout=600) as client:
                    payload = {**extra, "model": model, "messages": messages, **({"tools": own} if own else {})}
                    return self.JSONResponse(await self._call_upstream(client, payload))
            out, last = await self._run_loop(model, messages, own, extra)
        except GatewayError as exc:
            return self._error(exc)
        last["choices"][0]["message"] = out.message
        last["choices"][0]["finish_reason"] = {"answer": "stop", "client_tool_calls": "tool_calls",
                                               "max_steps": "length"}[out.stopped]
        last["usage"] = out.usage
        last["jailcell"] = {"stopped": out.stopped, "calls": [
            {"id": c.id, "code": c.code, "status": c.result.status, "stdout": c.result.stdout,
             "result": c.result.result} for c in out.calls]}
        return self.JSONResponse(last)

    async def responses(self, request):
        try:
            body = await self._body(request)
            messages = _responses_input(body.get("input"), body.get("instructions"))
            enabled, own = _split_tools(body.get("tools"))
            include = body.get("include") or []
            model = self.model or body.get("model") or "default"
            extra = {k: v for k, v in body.items() if k in ("temperature", "top_p", "enable_thinking")}
            if "max_output_tokens" in body:
                extra["max_tokens"] = body["max_output_tokens"]
            if enabled or own:
                out, last = await self._run_loop(model, messages, own, extra)
            else:
                async with self.httpx.AsyncClient(timeout=600) as client:
                    last = await self._call_upstream(client, {**extra, "model": model, "messages": messages})
                message = dict(last["choices"][0]["message"])
                out = ToolLoopResult(message, [], messages + [message], dict(last.get("usage") or {}), "answer")
        except GatewayError as exc:
            return self._error(exc)
        container = f"cntr_{uuid.uuid4().hex[:24]}"
        items: list[dict[str, Any]] = []
        for call in out.calls:
            r = call.result
            outputs = None
            if "code_interpreter_call.outputs" in include:
                logs = r.stdout + r.stderr + ((r.error or {}).get("traceback") or "")
                outputs = [{"type": "logs", "logs": logs}] + [
                    {"type": "image", "url": f"data:{o['mime_type']};base64,{o['data']}"} for o in r.outputs]
            items.append({"type": "code_interpreter_call", "id": f"ci_{call.id}", "code": call.code,
                          "container_id": container, "status": "completed" if r.status == "ok" else "failed",
                          "outputs": outputs})
        for tc in out.message.get("tool_calls") or []:
            if out.stopped == "client_tool_calls" and tc["function"]["name"] != TOOL_NAME:
                items.append({"type": "function_call", "id": f"fc_{tc['id']}", "call_id": tc["id"],
                              "name": tc["function"]["name"], "arguments": tc["function"].get("arguments", ""),
                              "status": "completed"})
        text = out.message.get("content") if out.stopped == "answer" else None
        if out.stopped == "max_steps":
            text = f"[jailcell: stopped after {self.max_steps} model steps without an answer]"
        if text is not None:
            items.append({"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}", "role": "assistant",
                          "status": "completed", "content": [{"type": "output_text", "text": text, "annotations": []}]})
        u = out.usage
        return self.JSONResponse({
            "id": f"resp_{uuid.uuid4().hex[:24]}", "object": "response", "created_at": int(time.time()),
            "model": last.get("model", model), "status": "incomplete" if out.stopped == "max_steps" else "completed",
            "incomplete_details": {"reason": "max_steps"} if out.stopped == "max_steps" else None,
            "error": None, "instructions": body.get("instructions"), "metadata": body.get("metadata") or {},
            "output": items, "parallel_tool_calls": True, "tool_choice": "auto", "tools": body.get("tools") or [],
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "usage": {"input_tokens": u.get("prompt_tokens", 0), "output_tokens": u.get("completion_tokens", 0),
                      "total_tokens": u.get("total_tokens", 0), "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}},
        })


def _responses_input(inp: Any, instructions: Any) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": str(instructions)})
    if isinstance(inp, str) and inp:
        messages.append({"role": "user", "content": inp})
    elif isinstance(inp, list) and inp:
        for item in inp:
            if not isinstance(item, dict) or item.get("role") not in ("user", "assistant", "system", "developer"):
                raise GatewayError(400, "'input' items must be messages with a role (user, assistant, system)")
            content = item.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": content})
    else:
        raise GatewayError(400, "'input' must be a non-empty string or list of messages")
    return messages


def serve(upstream: str, *, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    import uvicorn

    gateway = Gateway(upstream, **kwargs)
    try:
        uvicorn.run(gateway.app, host=host, port=port, log_level="warning")
    finally:
        gateway.close()
