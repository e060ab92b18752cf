"""jailcell as an MCP server (`jailcell mcp`), built with the official `mcp` SDK.

Tools: ``run_python`` (stateless, or in a session), ``create_session``, ``close_session``,
``upload_file``, ``download_file``.  Results come back as text (stdout, value, error) plus one
image content per matplotlib figure.  Transports: stdio (default) and streamable HTTP.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import threading
import time
import uuid
from typing import Any

from .. import _audit, _metrics
from .._async import AsyncSandbox, AsyncSession
from .._errors import JailcellError, MissingExtra
from .tools import format_result

__all__ = ["build_server", "serve"]


log = logging.getLogger("jailcell.mcp")
access_log = logging.getLogger("jailcell.access")

SESSION_IDLE_S = 600.0     # a session nobody used for this long is closed
SESSIONS_PER_CLIENT = 8    # sessions one client (one MCP connection) may hold at once


def _mcp():
    try:
        from mcp.server import MCPServer
        from mcp.server.mcpserver import Context
        from mcp.server.mcpserver.exceptions import ToolError
        from mcp.types import ImageContent, TextContent
    except ImportError as exc:
        raise MissingExtra("the MCP server", "mcp", exc.name) from None
    return MCPServer, ToolError, TextContent, ImageContent, Context


def _client_of(ctx: Any) -> tuple[str | None, Any]:
    """The MCP session a tool call came in (its ``Mcp-Session-Id``) and its connection, or
    ``(None, None)`` where the protocol has none (stdio, whose client owns the whole server; the
    2026 protocol over HTTP, where every request stands alone)."""
    connection = getattr(ctx.session, "_connection", None)
    session_id = getattr(connection, "session_id", None)
    if isinstance(session_id, str) and session_id and hasattr(connection, "exit_stack"):
        return session_id, connection
    return None, None


class _State:
    """The sandbox and the sessions of one server (sessions are addressed by opaque ids).  Sessions
    close after ``idle_s`` unused; when the server holds ``max_sessions`` the least recently used one
    that is not running is closed to make room (one client cannot lock the others out); a client
    identified by an MCP session holds at most ``per_client``."""

    def __init__(self, sandbox: AsyncSandbox, max_sessions: int, per_client: int, idle_s: float) -> None:
        self.sandbox = sandbox
        self.sessions: dict[str, AsyncSession] = {}
        self.owners: dict[str, str | None] = {}  # session id -> the MCP session that made it
        self.used: dict[str, float] = {}         # session id -> last use (monotonic)
        self.running: dict[str, int] = {}        # session id -> runs in progress
        self.max_sessions, self.per_client, self.idle_s = max_sessions, per_client, idle_s
        self.lock = threading.Lock()

    def session(self, session_id: str) -> AsyncSession:
        with self.lock:
            session = self.sessions.get(session_id)
            if session is not None:
                self.used[session_id] = time.monotonic()
        if session is None or session.closed:
            raise ValueError(f"no open session {session_id!r} (sessions close after {self.idle_s:g} s unused, when "
                             "their client ends, or to make room for others); create one with create_session")
        return session

    @contextlib.contextmanager
    def busy(self, session_id: str | None):
        if session_id is None:
            yield
            return
        with self.lock:
            self.running[session_id] = self.running.get(session_id, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self.running[session_id] -= 1
                if not self.running[session_id]:
                    del self.running[session_id]
                self.used[session_id] = time.monotonic()

    def _drop(self, session_id: str) -> AsyncSession | None:
        self.owners.pop(session_id, None)
        self.used.pop(session_id, None)
        return self.sessions.pop(session_id, None)

    def admit(self, owner: str | None) -> None:
        """Room for one more session of ``owner`` (raises ValueError if there is none)."""
        evicted = None
        with self.lock:
            for sid in [sid for sid, s in self.sessions.items() if s.closed]:
                self._drop(sid)
            if owner is not None:
                mine = sum(1 for o in self.owners.values() if o == owner)
                if mine >= self.per_client:
                    raise ValueError(f"this client has {mine} open sessions, the most one client may hold; "
                                     "close one first (close_session)")
            if len(self.sessions) >= self.max_sessions:
                idle = [sid for sid in self.sessions if sid not in self.running]
                if not idle:
                    raise ValueError(f"all {self.max_sessions} sessions of this server are running code; "
                                     "try again shortly")
                evicted = self._drop(min(idle, key=lambda sid: self.used.get(sid, 0.0)))
        if evicted is not None:
            log.info("closed the least recently used session to make room")
            evicted._sync.close()  # returns at once; the jail is reclaimed in the background

    def add(self, session_id: str, session: AsyncSession, owner: str | None) -> None:
        with self.lock:
            self.sessions[session_id] = session
            self.owners[session_id] = owner
            self.used[session_id] = time.monotonic()

    def client_gone(self, owner: str) -> None:
        """The MCP session ``owner`` ended (its client closed it, or the SDK expired it): close the
        sandbox sessions it made."""
        with self.lock:
            gone = [self._drop(sid) for sid, o in list(self.owners.items()) if o == owner]
        for session in gone:
            if session is not None:
                session._sync.close()  # returns at once; the jail is reclaimed in the background
        if gone:
            log.info("closed %d session(s) of a client that went away", len(gone))


def build_server(policy: Any = "standard", *, backend: str | None = None, max_sessions: int = 64,
                 sessions_per_client: int = SESSIONS_PER_CLIENT, session_idle: float = SESSION_IDLE_S):
    """An MCPServer whose tools run code in jailcell."""
    MCPServer, ToolError, TextContent, ImageContent, Context = _mcp()
    state = _State(AsyncSandbox(policy, backend=backend), max_sessions, sessions_per_client, session_idle)
    wall_limit = state.sandbox.policy.limits.wall_s

    def reported(fn):
        """Errors the caller can act on (bad names, sizes, unknown sessions) reach the model verbatim;
        the SDK hides the message of any other exception."""
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except (JailcellError, ValueError) as exc:
                raise ToolError(str(exc)) from None
        return wrapper
    from .. import __version__

    server = MCPServer(
        "jailcell",
        version=__version__,
        instructions="Run Python in an isolated sandbox. Use run_python for one-off code; create_session "
                     "to keep variables between runs (pass its session_id to run_python).",
    )

    def contents(result) -> list:
        items: list = [TextContent(type="text", text=format_result(result))]
        for out in result.outputs:
            items.append(ImageContent(type="image", data=out["data"], mime_type=out["mime_type"]))
        return items

    async def run_python(code: str, session_id: str | None = None, timeout: float | None = None,
                         ctx: Any = None) -> list:
        if timeout is not None and (isinstance(timeout, bool) or not timeout > 0 or timeout > wall_limit):
            raise ValueError(f"timeout must be more than 0 and at most {wall_limit:g} s (the limit of policy "
                             f"{state.sandbox.policy.name!r}), not {timeout!r}")
        target = state.session(session_id) if session_id else state.sandbox
        # the audit line names the MCP call (an HTTP request may carry many) and the sandbox session
        request = getattr(ctx, "request_id", None) if ctx is not None else None
        with state.busy(session_id), _audit.audit_context(request_id=f"mcp-{request}" if request else None,
                                                          conversation=session_id):
            result = await target.run(code, timeout=timeout)  # a cancelled request kills the run
        return contents(result)

    run_python.__annotations__ = {"code": str, "session_id": str | None, "timeout": float | None, "ctx": Context,
                                  "return": list}
    server.tool(description="Run Python code in a sandbox and return its output, the value of the last "
                            "expression, errors and figures. Without session_id each run starts fresh.")(
        reported(run_python))

    async def create_session(ctx) -> str:
        owner, connection = _client_of(ctx)
        state.admit(owner)
        session = await state.sandbox.session(idle_timeout=state.idle_s)
        session_id = uuid.uuid4().hex
        state.add(session_id, session, owner)
        if owner is not None and not connection.state.get("jailcell"):
            connection.state["jailcell"] = True  # once per connection: its end closes all it made
            connection.exit_stack.callback(state.client_gone, owner)
        return session_id

    create_session.__annotations__ = {"ctx": Context, "return": str}  # the SDK passes the call's context
    server.tool(description="Create a stateful session; returns its session_id.  Sessions close after "
                            f"{session_idle:g} s unused and when this client disconnects.")(reported(create_session))

    @server.tool(description="Close a session and free its sandbox.")
    @reported
    async def close_session(session_id: str) -> str:
        session = state.session(session_id)
        with state.lock:
            state._drop(session_id)
        await session.close()
        return f"closed {session_id}"

    @server.tool(description="Write a file (base64 content) into a session's workspace.")
    @reported
    async def upload_file(session_id: str, name: str, content_base64: str) -> str:
        try:
            data = base64.b64decode(content_base64, validate=True)
        except ValueError:
            raise ValueError("content_base64 is not valid base64") from None
        await state.session(session_id).upload(name, data)
        return f"wrote {name} ({len(data)} bytes)"

    @server.tool(description="Read a file from a session's workspace; returns base64 content.")
    @reported
    async def download_file(session_id: str, name: str) -> str:
        data = await state.session(session_id).download(name)
        return base64.b64encode(data).decode("ascii")

    server.jailcell_state = state  # for shutdown
    return server


def _serve_http(server: Any, host: str, port: int) -> None:
    """Streamable HTTP at /mcp, with /healthz, /readyz and /metrics beside it (unauthenticated, as the MCP
    endpoint itself), a request id and an access line per request."""
    import copy

    import uvicorn
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    from uvicorn.config import LOGGING_CONFIG

    from ._service import Observe, Readiness, health_routes, jail_ready, metrics_on

    state = server.jailcell_state
    if metrics_on(None):
        _metrics.M.count_open("sessions", lambda: len(state.sessions))  # type: ignore[union-attr]
    readiness = Readiness({"jail": lambda: jail_ready(state.sandbox)}, log)
    for route in health_routes(Route, JSONResponse, Response, readiness, None):
        server.custom_route(route.path, methods=["GET"])(route.endpoint)
    # the SDK ends an MCP session its client left without saying so after the same idle time
    app = server.streamable_http_app(session_idle_timeout=state.idle_s, host=host)
    app = Observe(app, "mcp", ["/mcp", "/healthz", "/readyz", "/metrics"], access_log)
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["jailcell"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    uvicorn.run(app, host=host, port=port, log_level="warning", log_config=config, access_log=False)


def serve(transport: str = "stdio", *, host: str = "127.0.0.1", port: int = 8000, policy: Any = "standard",
          backend: str | None = None, **limits: Any) -> None:
    """Run the server until it is stopped; every sandbox is closed on the way out.  Over HTTP there is
    no key: every local user (and, off loopback, every machine that reaches it) may run code; it says so."""
    server = build_server(policy, backend=backend, **limits)
    if transport == "http":
        import sys

        print(f"jailcell mcp: serving http://{host}:{port}/mcp without authentication: every user of this machine"
              f"{'' if host in ('127.0.0.1', 'localhost', '::1') else ' and every machine that reaches it'} can run "
              "code through it; use the stdio transport where that matters", file=sys.stderr, flush=True)
    try:
        if transport == "stdio":
            server.run(transport="stdio")
        elif transport == "http":
            _serve_http(server, host, port)
        else:
            raise JailcellError(f"unknown transport {transport!r}; choose stdio or http")
    finally:
        state = server.jailcell_state
        for session in list(state.sessions.values()):
            session._sync.close()
        state.sandbox._sync.close()
