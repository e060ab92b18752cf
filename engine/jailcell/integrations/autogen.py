"""AutoGen: :class:`JailcellCodeExecutor`, an ``autogen_core.code_executor.CodeExecutor`` backed by jailcell.

    from autogen_agentchat.agents import CodeExecutorAgent
    from jailcell.integrations.autogen import JailcellCodeExecutor

    async with JailcellCodeExecutor("standard") as executor:
        agent = CodeExecutorAgent("runner", code_executor=executor)

Python blocks run one after another in one Session (state persists across blocks and calls, as
in a notebook) and stop at the first failure.  Other languages are refused with a non-zero
CodeResult that says so.  Cancelling the CancellationToken interrupts the running block.
"""

from __future__ import annotations

import asyncio
from typing import Any, List

from .._async import AsyncSandbox, AsyncSession
from .._errors import MissingExtra

try:
    from autogen_core import CancellationToken
    from autogen_core.code_executor import CodeBlock, CodeExecutor, CodeResult
except ImportError as exc:  # pragma: no cover - exercised by the import-error test
    raise MissingExtra("jailcell.integrations.autogen", "adapters", exc.name) from None

__all__ = ["JailcellCodeExecutor"]

PYTHON = {"python", "py", "python3", ""}


class JailcellCodeExecutor(CodeExecutor):
    """``policy``, ``functions`` and ``**sandbox_options`` are those of :class:`jailcell.Sandbox`."""

    def __init__(self, policy: Any = "standard", **sandbox_options: Any) -> None:
        self._policy, self._options = policy, sandbox_options
        self._sandbox: AsyncSandbox | None = None
        self._session: AsyncSession | None = None

    async def start(self) -> None:
        if self._sandbox is None:  # a constructor cannot be awaited: it checks the backend in a thread
            self._sandbox = await asyncio.to_thread(AsyncSandbox, self._policy, **self._options)
        if self._session is None or self._session.closed:
            self._session = await self._sandbox.session()

    async def stop(self) -> None:
        session, sandbox, self._session, self._sandbox = self._session, self._sandbox, None, None
        if session is not None:
            await session.close()
        if sandbox is not None:
            await sandbox.close()

    async def restart(self) -> None:
        """A fresh session: the state of earlier blocks is gone."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.start()

    async def execute_code_blocks(self, code_blocks: List[CodeBlock],
                                  cancellation_token: CancellationToken) -> CodeResult:
        await self.start()
        session = self._session
        assert session is not None
        outputs: list[str] = []
        for block in code_blocks:
            language = (block.language or "").strip().lower()
            if language not in PYTHON:
                outputs.append(f"jailcell runs Python only; a {block.language!r} block cannot run here. "
                               "Send the code as a ```python block.")
                return CodeResult(exit_code=1, output="\n".join(outputs))
            # Cancelling the token (or this task) kills the running block; the session keeps its earlier state.
            run = asyncio.ensure_future(session.run(block.code))
            cancellation_token.link_future(run)
            result = await run
            text = result.stdout + result.stderr
            if result.result is not None:
                text += result.result + "\n"
            if not result.ok:
                err = result.error or {}
                text += (err.get("traceback") or f"{err.get('type')}: {err.get('message')}\n")
                outputs.append(text)
                return CodeResult(exit_code=1, output="".join(outputs))
            outputs.append(text)
        return CodeResult(exit_code=0, output="".join(outputs))
