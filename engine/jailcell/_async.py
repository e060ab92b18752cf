"""The asyncio twins of Sandbox and Session.

Each call runs the sync method in a worker thread (the jail's I/O is blocking pipes and sockets).
What makes them async code and not just threads: cancelling a run stops it (trio's rule).  The run
gets a cancel token; cancelling the awaiting task sets it, which kills the run's cell at once (or
keeps the program from starting, if it was still waiting for its turn or a spare cell).  The task
then waits, shielded, until the thread is done with the sandbox -- a few milliseconds, the kill and
the sweep -- and raises CancelledError.  The Sandbox is free for the next run, and a Session keeps
the state it had before the cancelled run (a killed run never becomes the session's state; a run
that had already finished when the cancel came keeps its effects).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from concurrent.futures import Executor
from typing import Any, Callable, Mapping, Self

from ._host._jail import Cancel
from ._policy import Policy
from ._result import Result
from ._sandbox import Sandbox, Session

__all__ = ["AsyncSandbox", "AsyncSession"]

CANCEL_WAIT_S = 10.0  # a cancelled run's thread gives the sandbox back within this (kill + sweep: ms)


async def call_cancellable(fn: Callable[..., Any], *args: Any, executor: Executor | None = None) -> Any:
    """``fn(*args, cancel)`` in a worker thread; cancelling the caller cancels the token."""
    cancel = Cancel()
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    fut = loop.run_in_executor(executor, functools.partial(ctx.run, fn, *args, cancel))
    fut.add_done_callback(_retrieve)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.cancel()
        deadline = loop.time() + CANCEL_WAIT_S
        while not fut.done() and loop.time() < deadline:
            try:  # shielded: a second cancel does not leave the sandbox busy behind our back
                await asyncio.wait([fut], timeout=deadline - loop.time())
            except asyncio.CancelledError:
                continue
        raise


def _retrieve(fut: asyncio.Future) -> None:
    """A cancelled caller never reads the thread's outcome: read it, so asyncio does not log it."""
    if not fut.cancelled():
        fut.exception()


def twin(obj: Sandbox | Session) -> AsyncSandbox | AsyncSession:
    """The async twin of an existing Sandbox or Session: the same jail, coroutine methods (for the
    integrations, which serve sync and async callers from one object)."""
    if isinstance(obj, Session):
        return AsyncSession(obj)
    sandbox = AsyncSandbox.__new__(AsyncSandbox)
    sandbox._sync = obj
    return sandbox


class _Twin:
    """What both twins share: they wrap a sync object (``_sync``) and run its calls in worker threads,
    ``run`` with a cancel token."""

    _sync: Sandbox | Session

    @property
    def isolation(self) -> dict[str, Any]:
        return self._sync.isolation

    @property
    def closed(self) -> bool:
        return self._sync.closed

    async def run(self, code: str, *, timeout: float | None = None, files: Mapping[str, Any] | None = None) -> Result:
        return await call_cancellable(self._sync._run, code, timeout, files)

    def interrupt(self) -> None:
        self._sync.interrupt()

    async def close(self) -> None:
        await asyncio.to_thread(self._sync.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSandbox(_Twin):
    """The asyncio twin of :class:`Sandbox`: same arguments, coroutine methods, same attributes.
    Cancelling ``run`` kills the program at once."""

    _sync: Sandbox

    def __init__(self, policy: str | os.PathLike[str] | Policy | None = "standard", *, backend: str | None = None,
                 warm: bool = False, functions: Mapping[str, Callable[..., Any]] | None = None,
                 audit: Any = None, **overrides: Any) -> None:
        self._sync = Sandbox(policy, backend=backend, warm=warm, functions=functions, audit=audit, **overrides)

    @property
    def policy(self) -> Policy:
        return self._sync.policy

    async def session(self, *, idle_timeout: float | None = None) -> AsyncSession:
        return AsyncSession(await asyncio.to_thread(self._sync.session, idle_timeout=idle_timeout))


class AsyncSession(_Twin):
    """The asyncio twin of :class:`Session`.  Cancelling ``run`` kills that run; the session keeps
    its state from before it."""

    _sync: Session

    def __init__(self, session: Session) -> None:
        self._sync = session

    async def upload(self, name: str, data: bytes | str) -> None:
        await asyncio.to_thread(self._sync.upload, name, data)

    async def download(self, name: str) -> bytes:
        return await asyncio.to_thread(self._sync.download, name)

    async def fork(self) -> AsyncSession:
        return AsyncSession(await asyncio.to_thread(self._sync.fork))
