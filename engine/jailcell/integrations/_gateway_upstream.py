"""The gateway's upstream: one pooled HTTP client for the process, retries for transient failures,
and errors that say what the upstream refused.  Used by ``gateway.py``.

Retried, at most ``retries`` times with a growing pause (or the upstream's ``Retry-After``, up to
``MAX_RETRY_AFTER_S``): connection failures (including a pooled connection the upstream closed), and
answers 408/409/429/500/502/503/504 -- always before any of the answer was used, so a retry never
repeats what a client has seen.  Everything else, and
a failure once a stream has begun, is a 502 in the caller's format that names the upstream, the
model and the cause.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any, AsyncIterator

from ._gateway_requests import GatewayError

log = logging.getLogger("jailcell.gateway")

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 20.0
CONNECT_TIMEOUT_S = 10.0


class Upstream:
    """An OpenAI-compatible chat-completions server (vLLM, Ollama, llama.cpp, a hosted API)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 600.0, retries: int = 2,
                 backoff_s: float = 0.5) -> None:
        import httpx  # the serve extra (checked by the gateway)

        self.httpx = httpx
        self.base_url = base_url.rstrip("/")
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

    def failed(self, what: str, model: str | None = None) -> GatewayError:
        about = f" (model {model!r})" if model else ""
        log.warning("upstream %s%s %s", self.base_url, about, what)
        return GatewayError(502, f"upstream {self.base_url}{about} {what}", "upstream_error", "upstream_error")

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

    async def _send(self, method: str, path: str, model: str | None, *, stream: bool = False,
                    json_body: dict[str, Any] | None = None) -> Any:
        """An answer whose status is final (not retryable, or out of retries); a stream is opened but
        not read.  Connection failures after the last retry are a 502."""
        client = self.client()
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                request = client.build_request(method, f"{self.base_url}{path}", json=json_body)
                resp = await client.send(request, stream=stream)
            except (self.httpx.ConnectError, self.httpx.ConnectTimeout, self.httpx.RemoteProtocolError,
                    self.httpx.ReadError, self.httpx.WriteError) as exc:
                # (a pooled connection the upstream closed while idle, most often; a read *timeout* is
                # not retried: the upstream may still be generating)
                if last:
                    raise self.failed(f"cannot be reached: {type(exc).__name__}: {exc}", model) from None
                log.info("upstream %s: %s, retrying", self.base_url, type(exc).__name__)
                await self._pause(attempt, None)
                continue
            except self.httpx.HTTPError as exc:  # e.g. a read timeout: the request may have been taken
                raise self.failed(f"failed: {type(exc).__name__}: {exc}", model) from None
            if resp.status_code in RETRY_STATUSES and not last:
                retry_after = resp.headers.get("retry-after")
                await resp.aclose()
                log.info("upstream %s answered %s, retrying", self.base_url, resp.status_code)
                await self._pause(attempt, retry_after)
                continue
            return resp
        raise AssertionError("unreachable")

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        model = payload.get("model")
        resp = await self._send("POST", "/chat/completions", model, json_body=payload)
        if resp.status_code != 200:
            raise self._refused(resp.status_code, resp.text, model)
        try:
            data = resp.json()
            if not isinstance(data["choices"][0]["message"], dict):
                raise TypeError
        except (ValueError, KeyError, IndexError, TypeError):
            raise self.failed("sent a response that is not a chat completion", model) from None
        return data

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[tuple]:
        """One upstream turn, streamed: ("delta", field, text) events, then ("completion", the
        assembled chat completion)."""
        model = payload.get("model")
        payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        message: dict[str, Any] = {"role": "assistant", "content": None}
        calls: dict[int, dict[str, Any]] = {}
        meta: dict[str, Any] = {"usage": {}}
        resp = await self._send("POST", "/chat/completions", model, stream=True, json_body=payload)
        try:
            if resp.status_code != 200:
                raise self._refused(resp.status_code, (await resp.aread()).decode(errors="replace"), model)
            if "text/event-stream" not in resp.headers.get("content-type", ""):  # it ignored stream=true
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
                    raise self.failed(f"failed mid-stream: {json.dumps(chunk['error'])[:500]}", model)
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
            raise self.failed(f"failed mid-stream: {type(exc).__name__}: {exc}", model) from None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise self.failed("sent a stream that is not chat-completion chunks", model) from None
        finally:
            await resp.aclose()
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        yield "completion", {"id": meta.get("id"), "object": "chat.completion", "model": meta.get("model"),
                             "choices": [{"index": 0, "message": message}], "usage": meta["usage"]}

    async def models(self) -> list[dict[str, Any]]:
        """The upstream's ``GET /models`` list."""
        resp = await self._send("GET", "/models", None)
        if resp.status_code != 200:
            raise self.failed(f"answered {resp.status_code} to GET /models: {resp.text[:300]}")
        try:
            data = resp.json()["data"]
            return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (ValueError, KeyError, TypeError):
            raise self.failed("sent a model list that is not one") from None
