"""jailcell as an MCP server (`jailcell mcp`), built with the official `mcp` SDK.

Tools: ``run_python`` (stateless, or in a session), ``create_session``, ``close_session``,
``upload_file``, ``download_file``.  Results come back as text (stdout, value, error) plus one
image content per matplotlib figure.  Transports: stdio (default) and streamable HTTP.
"""

from __future__ import annotations

import base64
import functools
import threading
import uuid
from typing import Any

from .._async import AsyncSandbox, AsyncSession
from .._errors import JailcellError, MissingExtra
from .tools import format_result

__all__ = ["build_server", "serve"]


def _mcp():
    try:
        from mcp.server import MCPServer
        from mcp.server.mcpserver.exceptions import ToolError
        from mcp.types import ImageContent, TextContent
    except ImportError as exc:
        raise MissingExtra("the MCP server", "mcp", exc.name) from None
    return MCPServer, ToolError, TextContent, ImageContent


class _State:
    """The sandbox and the sessions of one server (sessions are addressed by opaque ids)."""

    def __init__(self, sandbox: AsyncSandbox, max_sessions: int) -> None:
        self.sandbox = sandbox
        self.sessions: dict[str, AsyncSession] = {}
        self.max_sessions = max_sessions
        self.lock = threading.Lock()

    def session(self, session_id: str) -> AsyncSession:
        with self.lock:
            session = self.sessions.get(session_id)
        if session is None or session.closed:
            raise ValueError(f"no open session {session_id!r}; create one with create_session")
        return session


def build_server(policy: Any = "standard", *, backend: str | None = None, max_sessions: int = 64):
    """An MCPServer whose tools run code in jailcell."""
    MCPServer, ToolError, TextContent, ImageContent = _mcp()
    state = _State(AsyncSandbox(policy, backend=backend), max_sessions)

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

    @server.tool(description="Run Python code in a sandbox and return its output, the value of the last "
                             "expression, errors and figures. Without session_id each run starts fresh.")
    @reported
    async def run_python(code: str, session_id: str | None = None, timeout: float | None = None) -> list:
        target = state.session(session_id) if session_id else state.sandbox
        result = await target.run(code, timeout=timeout)  # a cancelled request kills the run
        return contents(result)

    @server.tool(description="Create a stateful session; returns its session_id.")
    @reported
    async def create_session() -> str:
        with state.lock:
            if len(state.sessions) >= state.max_sessions:
                raise ValueError(f"too many open sessions ({state.max_sessions}); close one first")
        session = await state.sandbox.session()
        session_id = uuid.uuid4().hex
        with state.lock:
            state.sessions[session_id] = session
        return session_id

    @server.tool(description="Close a session and free its sandbox.")
    @reported
    async def close_session(session_id: str) -> str:
        session = state.session(session_id)
        with state.lock:
            state.sessions.pop(session_id, None)
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


def serve(transport: str = "stdio", *, host: str = "127.0.0.1", port: int = 8000, policy: Any = "standard",
          backend: str | None = None) -> None:
    """Run the server until it is stopped; every sandbox is closed on the way out."""
    server = build_server(policy, backend=backend)
    try:
        if transport == "stdio":
            server.run(transport="stdio")
        elif transport == "http":
            server.run(transport="streamable-http", host=host, port=port)
        else:
            raise JailcellError(f"unknown transport {transport!r}; choose stdio or http")
    finally:
        state = server.jailcell_state
        for session in list(state.sessions.values()):
            session._sync.close()
        state.sandbox._sync.close()
