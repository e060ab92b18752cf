"""What every HTTP service of jailcell (the gateway, MCP over HTTP) gives its operator: a request id
on every request (``X-Request-Id``, taken from the client when sane, else made), one access-log line
per request, the HTTP metrics, ``GET /healthz`` (the process serves) and ``GET /readyz`` (a jail is up
and what it depends on answers), both unauthenticated and without details, and ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Awaitable, Callable, Iterable

from .. import _audit, _metrics
from ._gateway_keys import request_id

READY_CACHE_S = 2.0  # a probe storm costs one check per this long
CHECK_TIMEOUT_S = 5.0


def metrics_on(wanted: bool | None) -> bool:
    """Enable the metrics: ``True`` (they must: MissingExtra without prometheus_client), ``None`` (if
    prometheus_client is installed) or ``False`` (not by this service)."""
    if wanted is False:
        return _metrics.M is not None
    try:
        _metrics.enable_metrics()
    except ImportError:
        if wanted:
            raise
        return False
    return True


class Observe:
    """ASGI middleware (outermost): request id, access log, HTTP metrics.  ``routes`` are the path
    templates (``/v1/containers/{container_id}/files``): the metrics name a request by its template,
    never by its path (ids would make labels without bound)."""

    def __init__(self, app: Any, service: str, routes: Iterable[str], log: logging.Logger) -> None:
        self.app, self.service, self.log = app, service, log
        self.routes = [(re.compile("/".join("[^/]+" if part.startswith("{") else re.escape(part)
                                            for part in r.split("/")) + "$"), r) for r in routes]

    def route(self, path: str) -> str:
        for pattern, template in self.routes:
            if pattern.match(path):
                return template
        return "other"

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope.get("headers", []) if k == b"x-request-id"), b"")
        rid = request_id(sent.decode("latin-1"))
        status = 500
        t0 = time.monotonic()

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        with _audit.audit_context(request_id=rid):
            said = _audit.current()
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                took = time.monotonic() - t0
                route = self.route(scope.get("path", ""))
                m = _metrics.M
                if m is not None:
                    m.http.labels(self.service, route, str(status)).inc()
                    m.http_seconds.labels(self.service, route).observe(took)
                self.log.info("%s %s %s %d %.3fs request_id=%s who=%s", self.service, scope.get("method"),
                              scope.get("path", "")[:200], status, took, rid, said.get("who") or "-")


class Readiness:
    """``/readyz``: every check passes (each ``async () -> str | None``, None when fine).  Answers are
    cached for a moment; what failed goes to the log (once per change), never to the prober."""

    def __init__(self, checks: dict[str, Callable[[], Awaitable[str | None]]], log: logging.Logger) -> None:
        self.checks, self.log = checks, log
        self._at = -READY_CACHE_S
        self._ready = False
        self._said: str | None = None
        self._lock = asyncio.Lock()

    async def ready(self) -> bool:
        async with self._lock:
            if time.monotonic() - self._at < READY_CACHE_S:
                return self._ready
            problems = []
            for name, check in self.checks.items():
                try:
                    async with asyncio.timeout(CHECK_TIMEOUT_S):
                        why = await check()
                except TimeoutError:
                    why = f"no answer within {CHECK_TIMEOUT_S:g} s"
                except Exception as exc:  # noqa: BLE001 - any failure of a check means not ready
                    why = f"{type(exc).__name__}: {exc}"
                if why:
                    problems.append(f"{name}: {why}")
            said = "; ".join(problems) or None
            if said != self._said:
                (self.log.warning if said else self.log.info)("readiness: %s", said or "ready")
                self._said = said
            self._ready, self._at = not problems, time.monotonic()
            return self._ready


def health_routes(Route: Any, JSONResponse: Any, Response: Any, readiness: Readiness,
                  authorize: Callable[[Any], Any] | None) -> list[Any]:
    """``/healthz``, ``/readyz`` and ``/metrics`` (the last behind ``authorize``, which raises or returns
    a response for a refused request)."""
    async def healthz(request: Any) -> Any:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Any) -> Any:
        ok = await readiness.ready()
        return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)

    async def metrics(request: Any) -> Any:
        if authorize is not None:
            refused = authorize(request)
            if refused is not None:
                return refused
        m = _metrics.M
        if m is None:
            return JSONResponse({"error": {"message": "metrics are off: install prometheus_client "
                                                      "(pip install \"jailcell[metrics]\")", "type": "not_found"}},
                                status_code=404)
        body, content_type = m.exposition()
        return Response(body, media_type=content_type)

    return [Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"])]


async def jail_ready(sandbox: Any) -> str | None:
    """Whether ``sandbox`` (an AsyncSandbox) has a live jail, starting one if it has none; no program runs."""
    sync = getattr(sandbox, "_sync", None)
    if sync is None or not hasattr(sync, "_ensure_jail"):
        return None if not getattr(sandbox, "closed", False) else "closed"

    def check() -> str | None:
        with sync._lock:
            jail = sync._ensure_jail()
            return None if jail.alive() else "the jail is not alive"
    return await asyncio.to_thread(check)
