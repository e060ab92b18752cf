"""LangChain: :class:`JailcellTool`, a ``BaseTool`` that runs Python in jailcell.

    from jailcell.integrations.langchain import JailcellTool

    tool = JailcellTool(policy="standard")
    content, artifact = tool.invoke({"code": "print(6 * 7)"}), ...   # or bind it to a chat model

``response_format="content_and_artifact"``: the content is the model-readable account of the run
(:func:`jailcell.integrations.tools.format_result`); the artifact carries the full Result as a
dict and the figures as ``images`` (``{"mime_type", "data"}`` base64).  With ``stateful=True``
(the default) the calls of one tool share a Session, so variables persist like in a notebook.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Literal

from .._async import twin
from .._errors import MissingExtra
from .._sandbox import Sandbox, Session
from .tools import TOOL_DESCRIPTION, TOOL_NAME, format_result

try:
    from langchain_core.tools import BaseTool
    from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
except ImportError as exc:  # pragma: no cover - exercised by the import-error test
    raise MissingExtra("jailcell.integrations.langchain", "adapters", exc.name) from None

__all__ = ["JailcellTool"]


class CodeInput(BaseModel):
    code: str = Field(description="The Python code to run.")


class JailcellTool(BaseTool):
    """Run Python in a jailcell sandbox (``policy`` / ``sandbox_options`` as for :class:`jailcell.Sandbox`)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = TOOL_NAME
    description: str = TOOL_DESCRIPTION
    args_schema: type[BaseModel] = CodeInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    policy: Any = "standard"
    stateful: bool = True
    max_chars: int = 8000
    sandbox_options: dict[str, Any] = Field(default_factory=dict)

    _sandbox: Sandbox | None = PrivateAttr(default=None)
    _session: Session | None = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def _runner(self) -> Any:
        with self._lock:
            if self._sandbox is None:
                self._sandbox = Sandbox(self.policy, **self.sandbox_options)
            if not self.stateful:
                return self._sandbox
            if self._session is None or self._session.closed:
                self._session = self._sandbox.session()
            return self._session

    def _run(self, code: str, run_manager: Any = None) -> tuple[str, dict[str, Any]]:
        return self._answer(self._runner().run(code))

    async def _arun(self, code: str, run_manager: Any = None) -> tuple[str, dict[str, Any]]:
        """Cancelling the awaiting task kills the run (a session keeps its earlier state)."""
        runner = await asyncio.to_thread(self._runner)  # may start the session's jail
        return self._answer(await twin(runner).run(code))

    def _answer(self, result: Any) -> tuple[str, dict[str, Any]]:
        artifact = result.to_dict()
        artifact["images"] = result.outputs
        return format_result(result, self.max_chars), artifact

    def close(self) -> None:
        """Close the tool's session and sandbox (a later call starts new ones)."""
        with self._lock:
            session, sandbox, self._session, self._sandbox = self._session, self._sandbox, None, None
        if session is not None:
            session.close()
        if sandbox is not None:
            sandbox.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
