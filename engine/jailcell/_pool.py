"""Pool: N warm jails running programs in parallel, sync (``run``/``map``) and async
(``arun``/``amap``, cancellable)."""

from __future__ import annotations

import asyncio
import os
import queue
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

from ._async import call_cancellable
from ._errors import InputError, SandboxClosed
from ._host._jail import Cancel, RunCancelled
from ._policy import Policy
from ._result import Result
from ._sandbox import Sandbox

__all__ = ["Pool"]


class Pool:
    """N warm jails running programs in parallel (default: one per CPU).

    ``map`` keeps the order of its input and consumes it lazily with bounded look-ahead, so a
    generator of a million programs is fine.  A jail that dies is replaced.
    """

    def __init__(self, size: int | None = None, policy: str | os.PathLike[str] | Policy | None = "standard", *,
                 backend: str | None = None, warm: bool = True,
                 functions: Mapping[str, Callable[..., Any]] | None = None,
                 **overrides: Any) -> None:
        size = size if size is not None else (os.cpu_count() or 1)
        if not isinstance(size, int) or size < 1:
            raise InputError(f"Pool size must be a positive integer, got {size!r}")
        self.size = size
        self._sandboxes: queue.SimpleQueue[Sandbox] = queue.SimpleQueue()
        self._all: list[Sandbox] = []
        self._closed = False
        engine_policy = Policy.load(policy).with_overrides(**overrides)
        def start() -> Sandbox:
            return Sandbox(engine_policy, backend=backend, warm=warm, functions=functions)

        starters = [start] * size
        with ThreadPoolExecutor(max_workers=size) as ex:
            for sb in ex.map(lambda f: f(), starters):
                self._all.append(sb)
                self._sandboxes.put(sb)
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="jailcell-pool")

    @property
    def policy(self) -> Policy:
        return self._all[0].policy

    @property
    def closed(self) -> bool:
        return self._closed

    def run(self, code: str, *, timeout: float | None = None, files: Mapping[str, Any] | None = None) -> Result:
        """Run ``code`` on the next free jail (waits for one).  Raises as ``Sandbox.run``."""
        return self._run(code, timeout, files)

    def _run(self, code: str, timeout: float | None, files: Mapping[str, Any] | None,
             cancel: Cancel | None = None) -> Result:
        if self._closed:
            raise SandboxClosed("this Pool is closed")
        sb = self._sandboxes.get()
        try:
            if cancel is not None and cancel.cancelled:  # cancelled while it waited for a jail
                raise RunCancelled("cancelled before it started")
            return sb._run(code, timeout, files, cancel)
        finally:
            self._sandboxes.put(sb)

    def map(self, codes: Iterable[str], *, timeout: float | None = None) -> list[Result]:
        """Run every program; results in input order.  Raises as ``Sandbox.run`` (InputError for a bad
        program, before the others' results are returned)."""
        if self._closed:
            raise SandboxClosed("this Pool is closed")
        results: list[Result] = []
        pending: list = []
        window = self.size * 2  # backpressure: at most this many submitted and not collected
        for code in codes:
            pending.append(self._executor.submit(self.run, code, timeout=timeout))
            if len(pending) >= window:
                results.append(pending.pop(0).result())
        results.extend(f.result() for f in pending)
        return results

    async def arun(self, code: str, *, timeout: float | None = None, files: Mapping[str, Any] | None = None) -> Result:
        """``run`` as a coroutine.  Cancelling it kills the program at once (or it never starts)."""
        return await call_cancellable(self._run, code, timeout, files, executor=self._executor)

    async def amap(self, codes: Iterable[str], *, timeout: float | None = None) -> list[Result]:
        """``map`` as a coroutine: results in input order.  Cancelling it kills the programs running
        and starts no more; it returns (raising CancelledError) once the pool's jails are free."""
        if self._closed:
            raise SandboxClosed("this Pool is closed")
        window = asyncio.Semaphore(self.size * 2)  # bounded look-ahead, as map's

        async def one(code: str) -> Result:
            async with window:
                return await call_cancellable(self._run, code, timeout, None, executor=self._executor)

        tasks = [asyncio.ensure_future(one(code)) for code in codes]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def close(self) -> None:
        """Wait for the runs in progress, then end every jail.  Closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        for sb in self._all:
            sb.close()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
