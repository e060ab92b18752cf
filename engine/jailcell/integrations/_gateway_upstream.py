"""The gateway's upstream: one pooled HTTP client for the process, retries for transient failures,
and errors that say what the upstream refused.  Used by ``gateway.py``.

Retried, at most ``retries`` times with a growing pause (or the upstream's ``Retry-After``, up to
``MAX_RETRY_AFTER_S``): connection failures (including a pooled connection the upstream closed), and
answers 408/409/429/500/502/503/504 -- always before any of the answer was used, so a retry never
repeats what a client has seen.  Everything else, and
a failure once a stream has begun, is a 502 in the caller's format that names the upstream, the
model and the cause.

Everything read from the upstream is bounded: a whole model call by ``timeout`` (``--upstream-timeout``,
however slowly the tokens come), an answer by MAX_ANSWER_BYTES, a line of a stream by MAX_LINE_BYTES,
an error text by MAX_ERROR_BYTES.  A reply that is not a well-formed chat completion (a tool call
without an id or a function name, ``tool_calls`` that is not a list, ``usage`` that is not an
object, ``content`` that is not a string) is a 502 too, never passed on.  Credentials written into
the upstream's URL never appear in a log line or an error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any, AsyncIterator

from .. import _metrics
from ._gateway_guard import redact_url, url_secrets
from ._gateway_requests import GatewayError

log = logging.getLogger("jailcell.gateway")

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 20.0
CONNECT_TIMEOUT_S = 10.0
MAX_ANSWER_BYTES = 32 * 1024 * 1024  # a whole answer (a completion, or all of a stream)
MAX_LINE_BYTES = 4 * 1024 * 1024     # one line of a stream
MAX_ERROR_BYTES = 4096               # what is read of an answer that is an error


class Upstream:
    """An OpenAI-compatible chat-completions server (vLLM, Ollama, llama.cpp, a hosted API)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 600.0, retries: int = 2,
                 backoff_s: float = 0.5) -> None:
        import httpx  # the serve extra (checked by the gateway)

        self.httpx = httpx
        self.base_url = base_url.rstrip("/")
        self.display_url = redact_url(self.base_url)
        self._secrets = url_secrets(self.base_url) + ([api_key] if api_key and len(api_key) >= 3 else [])
        self.timeout_s = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT_S, timeout))
        self.retries, self.backoff_s = retries, backoff_s
        self._client: Any = None

    def client(self) -> Any:
        """The process's pooled client (made in the server's event loop, at first use)."""
        if self._client is None:
            self._client = self.httpx.AsyncClient(timeout=self.timeout, headers=self.headers,
                                                  limits=self.httpx.Limits(max_connections=64,
                                                                           max_keepalive_connections=16))
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def failed(self, what: str, model: str | None = None) -> GatewayError:
        about = f" (model {model!r})" if model else ""
        what = self.scrub(what)
        log.warning("upstream %s%s %s", self.display_url, about, what)
        return GatewayError(502, f"upstream {self.display_url}{about} {what}", "upstream_error", "upstream_error")

    def _late(self, model: str | None) -> GatewayError:
        return self.failed(f"did not finish the model call within {self.timeout_s:g} s (--upstream-timeout)", model)

    async def _read(self, resp: Any, limit: int, deadline: float, model: str | None, what: str = "an answer") -> bytes:
        """The body of ``resp`` (opened as a stream), at most ``limit`` bytes, by ``deadline``."""
        data = bytearray()
        chunks = resp.aiter_bytes()
        while (chunk := await self._chunk(chunks, deadline, model)) is not None:
            data += chunk
            if len(data) > limit:
                if what == "an error":  # enough to say what it was
                    return bytes(data[:limit])
                raise self.failed(f"sent {what} larger than {limit} bytes", model)
        return bytes(data)

    async def _chunk(self, chunks: Any, deadline: float, model: str | None) -> bytes | None:
        """The next piece of an answer, None at its end; a 502 once ``deadline`` has passed."""
        try:
            async with asyncio.timeout_at(deadline):
                return await chunks.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise self._late(model) from None

    async def _lines(self, resp: Any, deadline: float, model: str | None) -> AsyncIterator[str]:
        """The lines of a streamed answer, each at most MAX_LINE_BYTES, all of them MAX_ANSWER_BYTES."""
        buf, total = bytearray(), 0
        chunks = resp.aiter_bytes()
        while (chunk := await self._chunk(chunks, deadline, model)) is not None:
            total += len(chunk)
            if total > MAX_ANSWER_BYTES:
                raise self.failed(f"sent a stream larger than {MAX_ANSWER_BYTES} bytes", model)
            buf += chunk
            start = 0
            while (end := buf.find(b"\n", start)) >= 0:
                yield buf[start:end].rstrip(b"\r").decode("utf-8", "replace")
                start = end + 1
            del buf[:start]
            if len(buf) > MAX_LINE_BYTES:
                raise self.failed(f"sent a stream line longer than {MAX_LINE_BYTES} bytes", model)
        if buf:
            yield buf.decode("utf-8", "replace")

    def _refused(self, status: int, text: str, model: str | None) -> GatewayError:
        """The upstream said no: a 404 or 400 about the model names it and says how to map names."""
        detail = text.strip().replace("\n", " ")[:500]
        if model and status in (400, 404) and ("model" in detail.lower() or status == 404):
            return self.failed(f"refused the model: {status} {detail} -- the request's model name goes upstream "
                               f"as is; map it with `jailcell serve --model-map {model}=UPSTREAM_NAME` or set "
                               "--model (GET /v1/models lists the upstream's names)", model)
        return self.failed(f"answered {status}: {detail}", model)

    async def _pause(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * (2 ** attempt) * (1 + random.random() / 4)
        if retry_after:
            try:
                delay = min(max(float(retry_after), 0.0), MAX_RETRY_AFTER_S)
            except ValueError:
                pass
        await asyncio.sleep(delay)

    async def ping(self) -> str | None:
        """None if the upstream answers HTTP at all (any status: it is there), else why not (for /readyz).
        On a new connection: a pooled one may outlive the server that accepted it."""
        try:
            async with self.httpx.AsyncClient(timeout=5.0) as client:
                resp = await client.get(f"{self.base_url}/models")
        except self.httpx.HTTPError as exc:
            return f"{self.display_url} cannot be reached: {type(exc).__name__}"
        return None if resp.status_code < 500 else f"{self.display_url} answered {resp.status_code}"

    async def _send(self, method: str, path: str, model: str | None, *, stream: bool = False,
                    json_body: dict[str, Any] | None = None) -> Any:
        """An answer whose status is final (not retryable, or out of retries); a stream is opened but
        not read.  Connection failures after the last retry are a 502.  Each attempt is counted in the
        metrics with its status (or "error") and the time until its answer began."""
        client = self.client()
        m = _metrics.M
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            t0 = time.monotonic()
            try:
                request = client.build_request(method, f"{self.base_url}{path}", json=json_body)
                resp = await client.send(request, stream=stream)
            except self.httpx.HTTPError as exc:
                if m is not None:
                    m.upstream.labels("error").inc()
                    m.upstream_seconds.observe(time.monotonic() - t0)
                retryable = (self.httpx.ConnectError, self.httpx.ConnectTimeout, self.httpx.RemoteProtocolError,
                             self.httpx.ReadError, self.httpx.WriteError)
                if not isinstance(exc, retryable):  # e.g. a read timeout: the request may have been taken
                    raise self.failed(f"failed: {type(exc).__name__}: {exc}", model) from None
                # (a pooled connection the upstream closed while idle, most often; a read *timeout* is
                # not retried: the upstream may still be generating)
                if last:
                    raise self.failed(f"cannot be reached: {type(exc).__name__}: {exc}", model) from None
                log.info("upstream %s: %s, retrying", self.display_url, type(exc).__name__)
                await self._pause(attempt, None)
                continue
            if m is not None:
                m.upstream.labels(str(resp.status_code)).inc()
                m.upstream_seconds.observe(time.monotonic() - t0)
            if resp.status_code in RETRY_STATUSES and not last:
                retry_after = resp.headers.get("retry-after")
                await resp.aclose()
                log.info("upstream %s answered %s, retrying", self.display_url, resp.status_code)
                await self._pause(attempt, retry_after)
                continue
            return resp
        raise AssertionError("unreachable")

    async def _open(self, method: str, path: str, model: str | None, deadline: float,
                    json_body: dict[str, Any] | None = None) -> Any:
        """``_send`` as a stream, within ``deadline``; an answer that is not 200 is an error (its text bounded)."""
        try:
            async with asyncio.timeout_at(deadline):
                resp = await self._send(method, path, model, stream=True, json_body=json_body)
        except TimeoutError:
            raise self._late(model) from None
        if resp.status_code != 200:
            try:
                text = (await self._read(resp, MAX_ERROR_BYTES, deadline, model, "an error")).decode(errors="replace")
            finally:
                await resp.aclose()
            if path == "/models":
                raise self.failed(f"answered {resp.status_code} to GET /models: {text[:300]}")
            raise self._refused(resp.status_code, text, model)
        return resp

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        model = payload.get("model")
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        resp = await self._open("POST", "/chat/completions", model, deadline, payload)
        try:
            raw = await self._read(resp, MAX_ANSWER_BYTES, deadline, model)
        finally:
            await resp.aclose()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise self.failed("sent a response that is not JSON", model) from None
        return self._completion(data, model)

    def _completion(self, data: Any, model: str | None) -> dict[str, Any]:
        """``data`` if it is a well-formed chat completion (its first choice's message made canonical);
        else the 502 that says what is wrong with it."""
        problem = _malformed_completion(data)
        if problem:
            raise self.failed(f"sent a response that is not a chat completion: {problem}", model)
        return data

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[tuple]:
        """One upstream turn, streamed: ("delta", field, text) events, then ("completion", the
        assembled chat completion)."""
        model = payload.get("model")
        payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        message: dict[str, Any] = {"role": "assistant", "content": None}
        calls: dict[int, dict[str, Any]] = {}
        meta: dict[str, Any] = {"usage": {}}
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        resp = await self._open("POST", "/chat/completions", model, deadline, payload)
        try:
            if "text/event-stream" not in resp.headers.get("content-type", ""):  # it ignored stream=true
                try:
                    data = json.loads(await self._read(resp, MAX_ANSWER_BYTES, deadline, model))
                except (ValueError, RecursionError):
                    raise self.failed("sent a response that is not JSON", model) from None
                yield "completion", self._completion(data, model)
                return
            async for line in self._lines(resp, deadline, model):
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise TypeError
                if chunk.get("error"):
                    raise self.failed(f"failed mid-stream: {json.dumps(chunk['error'])[:500]}", model)
                meta["usage"] = chunk.get("usage") or meta["usage"]
                meta.setdefault("model", chunk.get("model"))
                meta.setdefault("id", chunk.get("id"))
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    for field in ("reasoning_content", "content"):
                        if delta.get(field):
                            if not isinstance(delta[field], str):
                                raise TypeError
                            message[field] = (message.get(field) or "") + delta[field]
                            yield "delta", field, delta[field]
                    tool_calls = delta.get("tool_calls") or []
                    if not isinstance(tool_calls, list):
                        raise TypeError
                    for tc in tool_calls:
                        index = tc.get("index", len(calls))
                        if not isinstance(index, int) or not 0 <= index < 128:
                            raise TypeError
                        slot = calls.setdefault(index, {
                            "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                        if tc.get("id") is not None and not isinstance(tc["id"], str):
                            raise TypeError
                        slot["id"] = tc.get("id") or slot["id"]
                        fn = tc.get("function") or {}
                        slot["function"]["name"] += _text(fn.get("name"))
                        slot["function"]["arguments"] += _text(fn.get("arguments"))
        except self.httpx.HTTPError as exc:
            raise self.failed(f"failed mid-stream: {type(exc).__name__}: {exc}", model) from None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
            raise self.failed("sent a stream that is not chat-completion chunks", model) from None
        finally:
            await resp.aclose()
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        yield "completion", self._completion(
            {"id": meta.get("id"), "object": "chat.completion", "model": meta.get("model"),
             "choices": [{"index": 0, "message": message}], "usage": meta["usage"]}, model)

    async def models(self) -> list[dict[str, Any]]:
        """The upstream's ``GET /models`` list."""
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        resp = await self._open("GET", "/models", None, deadline)
        try:
            raw = await self._read(resp, MAX_ANSWER_BYTES, deadline, None)
        finally:
            await resp.aclose()
        try:
            data = json.loads(raw)["data"]
            return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise self.failed("sent a model list that is not one") from None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError
    return value


def _malformed_completion(data: Any) -> str | None:
    """What makes ``data`` not a chat completion the loop can use (None: nothing).  A tool call's
    ``arguments`` given as an object is made a JSON string, as the API defines it."""
    if not isinstance(data, dict):
        return "not a JSON object"
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "'choices' is not a non-empty list of objects"
    message = choices[0].get("message")
    if not isinstance(message, dict):
        return "'choices[0].message' is not an object"
    for field in ("content", "reasoning_content"):
        if message.get(field) is not None and not isinstance(message[field], str):
            return f"'message.{field}' is not a string"
    if data.get("usage") is not None and not isinstance(data["usage"], dict):
        return "'usage' is not an object"
    if data.get("model") is not None and not isinstance(data["model"], str):
        return "'model' is not a string"
    calls = message.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list):
        return "'message.tool_calls' is not a list"
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            return f"tool call {i} is not an object"
        if not isinstance(call.get("id"), str) or not call["id"]:
            return f"tool call {i} has no 'id'"
        fn = call.get("function")
        if not isinstance(fn, dict):
            return f"tool call {i} has no 'function' object"
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            return f"tool call {i} has no function name"
        args = fn.get("arguments")
        if isinstance(args, dict):
            fn["arguments"] = json.dumps(args)
        elif args is None:
            fn["arguments"] = "{}"
        elif not isinstance(args, str):
            return f"tool call {i}'s 'arguments' is not a string"
    return None
