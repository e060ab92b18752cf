"""The host's control loop: one daemon thread reading the control channel of every jail of this
process as messages arrive."""

from __future__ import annotations

import _socket as socket  # not socket.py, whose enums cost ~1.7 ms at every `jailcell run`
import os
import select
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable

from .._errors import warn
from .._injail import _protocol as proto
from .._threads import LazyThread

if TYPE_CHECKING:
    from ._jail import Jail


class ControlLoop:
    """One daemon thread that reads every jail's control channel as messages arrive, so what the
    zygote sends after a run (its sweep, the next spare) is taken in while the caller is busy
    elsewhere, not at the start of the next run."""

    def __init__(self) -> None:
        self._wake_r = self._wake_w = -1
        self._thread = LazyThread("jailcell-control", self._loop, after_fork=self._fresh)
        self._fresh()

    def _fresh(self) -> None:
        """At start, and in a forked child: the parent's jails are not the child's to read, and
        its wake-up pipe must not steal the parent's wake-ups."""
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._lock = threading.Lock()
        self._jails: dict[int, weakref.ref[Jail]] = {}  # ctl fd -> jail
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def start(self) -> None:
        """Start the thread now unless it runs: a jail start calls it while the zygote starts, so
        that the thread's own start (1-3 ms on a busy machine) is not on the path of the first run."""
        with self._lock:
            self._thread.ensure()

    def add(self, jail: Jail, fd: int) -> None:
        """Read ``jail``'s control channel (``fd``) from now on."""
        with self._lock:
            self._thread.ensure()
            self._jails[fd] = weakref.ref(jail)
        self._wake()

    def remove(self, fd: int) -> None:
        with self._lock:
            self._jails.pop(fd, None)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _loop(self) -> None:
        while True:
            with self._lock:
                fds = list(self._jails)
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd in fds:
                poller.register(fd, select.POLLIN)
            for fd, _ev in poller.poll():
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                    continue
                with self._lock:
                    ref = self._jails.get(fd)
                jail = ref() if ref is not None else None
                try:
                    alive = jail is not None and jail.on_readable()
                except Exception as exc:  # noqa: BLE001 - one jail's failure never stops the others'
                    warn("jailcell: a jail's control channel failed (%s: %s); that jail is replaced",
                         type(exc).__name__, exc)
                    if jail is not None:
                        jail.mark_broken(f"its control channel failed ({type(exc).__name__}: {exc})")
                    alive = False
                if not alive:
                    self.remove(fd)


control = ControlLoop()


def read_hello(sock: socket.socket, deadline: float, idle: Callable[[], None], idle_s: float) -> int | None:
    """The zygote's HELLO, the first byte on a jail's control channel (before any frame), and the
    pid of its sender as this process sees it: the socket has SO_PASSCRED set, and the kernel
    translates the pid of the zygote (pid 1 of its own namespace).  None if it has not come by
    ``deadline``; ``idle()`` runs after each ``idle_s`` of waiting."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if select.select([sock], [], [], min(remaining, idle_s))[0]:
            break
        idle()
    data, ancillary, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(12))  # struct ucred: pid, uid, gid
    if not data:
        raise EOFError("the jail ended before its zygote started")
    if data != proto.HELLO:
        raise proto.ProtocolError(f"the zygote's first byte is {data!r}, not the HELLO")
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(value) >= 4:
            pid = int.from_bytes(value[:4], sys.byteorder, signed=True)
            if pid > 0:
                return pid
    raise proto.ProtocolError("the zygote's HELLO came without its sender's pid")
