"""Pool: N warm jails running programs in parallel, sync (``run``/``map``) and async
(``arun``/``amap``, cancellable)."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

from . import _metrics
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
                 audit: Any = None, **overrides: Any) -> None:
        size = size if size is not None else (os.cpu_count() or 1)
        if not isinstance(size, int) or size < 1:
            raise InputError(f"Pool size must be a positive integer, got {size!r}")
        self.size = size
        self._sandboxes: queue.SimpleQueue[Sandbox] = queue.SimpleQueue()
        self._all: list[Sandbox] = []
        self._closed = False
        engine_policy = Policy.load(policy).with_overrides(**overrides)
        def start() -> Sandbox:
            return Sandbox(engine_policy, backend=backend, warm=warm, functions=functions, audit=audit)

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
        try:
            sb = self._sandboxes.get_nowait()
        except queue.Empty:
            with _metrics.waiting():  # every jail of the pool is busy
                sb = self._sandboxes.get()
        try:
            if cancel is not None and cancel.cancelled:  # cancelled while it waited for a jail
                raise RunCancelled("cancelled before it started")
            return sb._run(code, timeout, files, cancel)
        finally:
            self._sandboxes.put(sb)

    def map(self, codes: Iterable[str], *, timeout: float | None = None) -> list[Result]:
        """Run every program; results in input order.  Raises as ``Sandbox.run`` (InputError for a bad
        program: the programs already running finish, no more start, and the first error in input
        order is raised)."""
        if self._closed:
            raise SandboxClosed("this Pool is closed")
        feed = _Feed(codes)

        def run(code: str) -> Result:
            return self._run(code, timeout, None)

        helpers = [self._executor.submit(feed.drain, run) for _ in range(self.size - 1)]
        feed.drain(run)  # this thread is one of the workers: the map makes progress while others hold the executor
        for helper in helpers:
            helper.result()
        return feed.results()

    async def arun(self, code: str, *, timeout: float | None = None, files: Mapping[str, Any] | None = None) -> Result:
        """``run`` as a coroutine.  Cancelling it kills the program at once (or it never starts)."""
        return await call_cancellable(self._run, code, timeout, files, executor=self._executor)

    async def amap(self, codes: Iterable[str], *, timeout: float | None = None) -> list[Result]:
        """``map`` as a coroutine: results in input order.  Cancelling it kills the programs running
        and starts no more; it returns (raising CancelledError) once the pool's jails are free."""
        if self._closed:
            raise SandboxClosed("this Pool is closed")
        feed = _Feed(codes)

        async def worker() -> None:
            while (item := feed.take()) is not None:
                index, code = item
                try:
                    feed.put(index, await call_cancellable(self._run, code, timeout, None, executor=self._executor))
                except Exception as exc:  # noqa: BLE001 - kept for the caller, in input order
                    feed.fail(index, exc)

        tasks = [asyncio.ensure_future(worker()) for _ in range(self.size)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return feed.results()

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


class _Feed:
    """The programs of one ``map``, handed out one at a time to whichever worker is free (one per
    jail): a long program holds up only its own jail, never the others behind it in input order (a
    window of submitted runs collected in order would), and the input is read only as fast as it runs.
    After a failure no more are handed out; ``results`` raises the first failure in input order."""

    def __init__(self, codes: Iterable[str]) -> None:
        self._codes = enumerate(codes)
        self._lock = threading.Lock()
        self._results: dict[int, Result] = {}
        self._errors: dict[int, BaseException] = {}
        self._taken = 0

    def take(self) -> tuple[int, str] | None:
        with self._lock:  # the input may be a generator: one next() at a time
            if self._errors:
                return None
            try:
                item = next(self._codes)
            except StopIteration:
                return None
            except BaseException as exc:  # the caller's iterator failed: raised from results(), after
                self._errors[self._taken] = exc  # the failures of the programs it had given
                return None
            self._taken += 1
            return item

    def put(self, index: int, result: Result) -> None:
        self._results[index] = result

    def fail(self, index: int, exc: BaseException) -> None:
        with self._lock:
            self._errors[index] = exc

    def drain(self, run: Callable[[str], Result]) -> None:
        """Run programs until there are none left (or one failed)."""
        while (item := self.take()) is not None:
            index, code = item
            try:
                self.put(index, run(code))
            except BaseException as exc:  # noqa: BLE001 - kept for the caller, in input order
                self.fail(index, exc)

    def results(self) -> list[Result]:
        if self._errors:
            raise self._errors[min(self._errors)]
        return [self._results[i] for i in range(len(self._results))]
