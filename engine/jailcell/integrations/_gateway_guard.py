"""What stands between the gateway and the rest of the machine's web: the API key, Host and Origin
checks, the content type of bodies, CORS when asked for, and the security headers of every answer.

A browser lets any page it shows send a "simple" cross-origin POST (``Content-Type: text/plain``, no
preflight) to ``127.0.0.1``, and with DNS rebinding a page of another site can even read the answers.
So, on every request, before any route:

- ``Host`` must name this server: ``localhost``/``127.0.0.1``/``[::1]`` (any port), an IP literal
  (rebinding needs a host *name*), or a name given with ``--allowed-host``; else 421.
- ``Origin``, when a browser sends one, must be this server's own origin or one given with
  ``--cors-origin`` (which also turns on real CORS answers and preflight); else 403.  ``Origin: null``
  (a ``file://`` page, a sandboxed frame) is foreign.
- A body must be ``application/json``; else 415 (no form or text/plain request ever reaches a route).

Keys: without one configured the gateway makes one at start (``--no-auth`` only on a loopback address).
``Authorization: Bearer KEY`` is compared in constant time; the scheme is case-insensitive (RFC 7235).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
CORS_HEADERS = "Authorization, Content-Type, X-DashScope-SSE, X-Request-Id, OpenAI-Beta, OpenAI-Organization, " \
               "OpenAI-Project, X-Stainless-Arch, X-Stainless-Lang, X-Stainless-OS, X-Stainless-Package-Version, " \
               "X-Stainless-Runtime, X-Stainless-Runtime-Version, X-Stainless-Retry-Count, X-Stainless-Timeout"
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]


def new_key() -> str:
    return "jc-" + secrets.token_urlsafe(24)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """``url`` without its user-info (``http://user:secret@host/`` -> ``http://***@host/``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<an unparsable URL>"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def url_secrets(url: str) -> list[str]:
    """The credentials written into ``url`` (to scrub them from any text that might quote them)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    return [s for s in (parts.username, parts.password, parts.netloc.rpartition("@")[0] if "@" in parts.netloc else "")
            if s and len(s) >= 3]


def bearer_ok(header: str, key: str) -> bool:
    scheme, _, sent = header.strip().partition(" ")
    ok_scheme = scheme.lower() == "bearer"
    return hmac.compare_digest(sent.strip().encode(), key.encode()) and ok_scheme


def csp_for(html: str) -> str:
    """A Content-Security-Policy for the playground: its own inline script and style (by hash), fetches
    to this origin only, images from data: URLs, no frames, no forms, no plugins."""
    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found)
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; img-src data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class Guard:
    """ASGI middleware around the gateway's app: Host, Origin and content type checks, CORS for the
    allowed origins, and the security headers.  (Authentication is per route: /healthz-style routes
    may be open, the API is not.)"""

    def __init__(self, app: Any, *, allowed_hosts: Iterable[str] = (), cors_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed_hosts = {h.lower().strip() for h in allowed_hosts if h.strip()}
        self.cors_origins = {o.rstrip("/") for o in cors_origins if o.strip()}

    def _host_ok(self, host: str) -> bool:
        name = host.lower()
        if name.startswith("["):
            name = name[1:].partition("]")[0]
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        if not name:
            return False
        if name in LOOPBACK_NAMES or name in self.allowed_hosts or host.lower() in self.allowed_hosts:
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    def _cors_ok(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin in self.cors_origins

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        origin = headers.get("origin")
        if not self._host_ok(host):
            await _refuse(send, 421, "misdirected_request",
                          f"Host {host[:100]!r} is not this server's: a request must name it as localhost, "
                          "127.0.0.1 or its IP address, or a name allowed with `jailcell serve --allowed-host NAME`")
            return
        cors = False
        if origin is not None:
            own = {f"http://{host}".lower(), f"https://{host}".lower()}
            if origin.lower() not in own:
                if not self._cors_ok(origin):
                    await _refuse(send, 403, "forbidden_origin",
                                  f"cross-origin requests from {origin[:100]!r} are refused: allow a web app's origin "
                                  "with `jailcell serve --cors-origin ORIGIN`")
                    return
                cors = True
        method = scope.get("method", "GET")
        if cors and method == "OPTIONS" and "access-control-request-method" in headers:
            await _preflight(send, origin or "", headers.get("access-control-request-headers"))
            return
        if method in ("POST", "PUT", "PATCH"):
            ctype = headers.get("content-type", "").partition(";")[0].strip().lower()
            if ctype != "application/json":
                await _refuse(send, 415, "unsupported_media_type",
                              f"request bodies must be JSON sent as 'Content-Type: application/json', "
                              f"not {ctype[:100] or 'none'!r}", origin if cors else None)
                return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if cors:
                    extra += [(b"access-control-allow-origin", (origin or "").encode("latin-1")), (b"vary", b"Origin"),
                              (b"access-control-expose-headers", b"X-Request-Id, Retry-After")]
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k, v) for k, v in extra if k not in names)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _refuse(send: Any, status: int, code: str, message: str, cors_origin: str | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *SECURITY_HEADERS]
    if cors_origin:
        headers += [(b"access-control-allow-origin", cors_origin.encode("latin-1")), (b"vary", b"Origin")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _preflight(send: Any, origin: str, asked: str | None) -> None:
    allowed = CORS_HEADERS
    if asked:  # the client's own header names, as far as they are plain tokens
        extra = [h.strip() for h in asked.split(",") if re.fullmatch(r"[A-Za-z0-9-]{1,64}", h.strip())]
        allowed = ", ".join(dict.fromkeys([*CORS_HEADERS.split(", "), *extra]))
    headers = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
               (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
               (b"access-control-allow-headers", allowed.encode("latin-1")),
               (b"access-control-max-age", b"600"), (b"content-length", b"0"), *SECURITY_HEADERS]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
