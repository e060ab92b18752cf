"""Ending closed jails in the background: ``Jail.close()`` returns at once, and interpreter exit
(``close_all``) waits until every jail of this process is gone and its cgroups and temp dirs are
removed."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

from .._threads import LazyThread
from ..backends import Backend
from ..backends._base import Spawned


class Teardown:
    """Waits for closed jails to end and removes what their backend created, in the background:
    ``close()`` returns at once (the jail's first process is already exiting, which ends every
    process of the jail), and interpreter exit (:func:`close_all`) waits until all are gone."""

    def __init__(self) -> None:
        self._thread = LazyThread("jailcell-teardown", self._loop, after_fork=self._fresh)
        self._fresh()

    def _fresh(self) -> None:
        """At start, and in a forked child: the parent's jails are the parent's to end."""
        self._cv = threading.Condition()
        self._queue: collections.deque[tuple[Backend, Spawned]] = collections.deque()
        self._busy = 0

    def add(self, backend: Backend, spawned: Spawned) -> None:
        with self._cv:
            self._thread.ensure()
            self._queue.append((backend, spawned))
            self._busy += 1
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                backend, spawned = self._queue.popleft()
            try:
                end(backend, spawned)
            finally:
                with self._cv:
                    self._busy -= 1
                    self._cv.notify_all()

    def join(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._busy and time.monotonic() < deadline:
                self._cv.wait(max(0.0, deadline - time.monotonic()))


def end(backend: Backend, spawned: Spawned) -> None:
    """trio's rule: the channel is closed (the zygote exits on EOF), wait briefly, kill; then
    remove the backend's cgroups and temp dirs."""
    proc = spawned.proc
    try:
        proc.wait(timeout=2.0)  # off the caller's path: time for a process-backend zygote's sweep
    except Exception:
        killpg(proc.pid)
        try:
            proc.wait(timeout=5)
        except Exception:
            pass
    if backend.name == "process":
        killpg(proc.pid)  # anything the zygote's session left
    backend.teardown(spawned)


teardown = Teardown()


def killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
