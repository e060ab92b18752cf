"""Ending closed jails in the background: ``Jail.close()`` returns at once, and interpreter exit
(``close_all``) waits until every jail of this process is gone and its cgroups and temp dirs are
removed."""

from __future__ import annotations

import collections
import os
import select
import signal
import subprocess
import threading
import time
from typing import Callable

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
        self._detached = False

    def detach(self) -> None:
        """From now on, each closed jail is ended by a detached child process of its own instead of
        this process's thread, so a short-lived command (``jailcell run``) exits without waiting for
        the jail's teardown; the child still waits for the jail to end and removes its cgroups and
        temp dirs, so nothing is left behind.  For a process that ends right after: its children
        (that child, the jail's first process) are then reaped by init, not by threads of its own."""
        self._detached = True

    def add(self, backend: Backend, spawned: Spawned) -> None:
        if self._detached and _end_detached(backend, spawned):
            return
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


def end(backend: Backend, spawned: Spawned, exited: Callable[[float], bool] | None = None) -> None:
    """trio's rule: the channel is closed (the zygote exits on EOF), wait briefly, kill; then
    remove the backend's cgroups and temp dirs.  ``exited(seconds)``: whether the jail's first
    process has ended within that time (default: wait for this process's child)."""
    proc = spawned.proc
    if exited is None:
        exited = lambda seconds: _waited(proc, seconds)  # noqa: E731
    if not exited(2.0):  # off the caller's path: time for a process-backend zygote's sweep
        killpg(proc.pid)
        exited(5.0)
    if backend.name == "process":
        killpg(proc.pid)  # anything the zygote's session left
    backend.teardown(spawned)


def _waited(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except Exception:
        return False


def _end_detached(backend: Backend, spawned: Spawned) -> bool:
    """end() in a child process of its own, in a session of its own (a Ctrl-C of the terminal does
    not stop it) and holding none of this process's files (a caller reading this process's stdout to
    its end does not wait for it).  False if it could not be started: then the caller ends it."""
    proc = spawned.proc
    try:
        pidfd = os.pidfd_open(proc.pid)  # now, while the pid is surely still the jail's
    except OSError:
        return False
    try:
        pid = os.fork()
    except OSError:
        os.close(pidfd)
        return False
    if pid:
        os.close(pidfd)
        if spawned.disk is not None:  # the child ends the jail; this process keeps nothing of it
            spawned.disk.close()
        proc.returncode = 0  # reaped by init once this process is gone (detach's contract): never waited for
        return True
    try:  # the child: only plain calls until the backend's teardown (other threads' locks may be held)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.closerange(3, pidfd)
        os.closerange(pidfd + 1, 1 << 16)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)

        def exited(seconds: float) -> bool:  # not our child: its pidfd says when it ends
            if poller.poll(int(seconds * 1000)):
                return True
            try:
                signal.pidfd_send_signal(pidfd, 0)  # still the jail's process: its group is still its own
            except ProcessLookupError:
                return True
            return False

        end(backend, spawned, exited)
    finally:
        os._exit(0)


teardown = Teardown()


def killpg(pid: int) -> None:
    """SIGKILL a jail's first process, its group and every process below it.  Below it first, while it
    lives: the zygote of a jail without a pid namespace is their subreaper, and a process that left its
    group (setsid) would otherwise outlive it as init's orphan.  Plain system calls only (it runs in a
    detached teardown's child too)."""
    for _attempt in range(100):
        below = _below(pid)
        if not below:
            break
        for child in below:
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.002)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _below(root: int) -> list[int]:
    """Live processes below ``root``, found through /proc's children files."""
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    kids = os.read(fd, 1 << 16).split()
                finally:
                    os.close(fd)
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in found and _alive(kid):
                    found.append(kid)
                    todo.append(kid)
    return found


def _alive(pid: int) -> bool:
    """Not a zombie (a killed process that only waits to be reaped)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 512)
        finally:
            os.close(fd)
    except OSError:
        return False
    return data[data.rindex(b")") + 2:][:1] not in (b"Z", b"X")
