"""Host side of one jail: start the zygote under a backend, exchange frames, tear down.

A :class:`Jail` is not thread-safe by itself; the public API serialises access to it.
Teardown follows trio's rule -- close the channel, wait briefly, kill -- and then removes
whatever the backend created (cgroups, temp dirs), so nothing is left on the host.
"""

from __future__ import annotations

import os
import select
import signal
import tempfile
import threading
import time
import weakref
from typing import Any, Callable

from .._errors import JailError
from .._policy import Policy
from ..backends import Backend
from ..backends._base import Spawned
from . import _protocol as proto

START_TIMEOUT_S = 120.0  # preloading pandas+matplotlib on a cold disk can take a while
REPLY_LIMIT = 512 * 1024 * 1024

_live: "weakref.WeakSet[Jail]" = weakref.WeakSet()


class JailTimeout(Exception):
    """The jail did not answer in time (the host-side wall-clock limit)."""


class Jail:
    def __init__(self, backend: Backend, policy: Policy, *, session: bool = False) -> None:
        self.backend = backend
        self.policy = policy
        self.session = session
        self._spawned: Spawned | None = None
        self._stderr = tempfile.TemporaryFile(prefix="jailcell-log-")
        self._buf = bytearray()
        self._send_lock = threading.Lock()  # interrupt() writes while another thread waits in call()
        self.ready: dict[str, Any] = {}
        self._oom_seen = 0
        self.closed = False
        self._start()
        _live.add(self)

    # -- lifecycle -------------------------------------------------------------------------------

    def _start(self) -> None:
        spawned = self.backend.spawn(self.policy, session=self.session, stderr=self._stderr)
        self._spawned = spawned
        try:
            self._send(spawned.config)
            self.ready = self._recv(time.monotonic() + START_TIMEOUT_S)
            if self.ready.get("op") != "ready":
                raise JailError(f"zygote answered {self.ready!r} instead of ready")
            self.backend.after_ready(spawned, self.policy)
            self._oom_seen = self.backend.oom_kills(spawned)
        except (JailTimeout, EOFError, OSError, proto.ProtocolError) as exc:
            log = self.log()
            self.close()
            raise JailError(
                f"the {self.backend.name} jail failed to start ({type(exc).__name__}: {exc}).\n{log}\n"
                "Run `jailcell check` to see what isolation works on this machine."
            ) from None

    @property
    def pid(self) -> int | None:
        return self._spawned.proc.pid if self._spawned else None

    def alive(self) -> bool:
        return not self.closed and self._spawned is not None and self._spawned.proc.poll() is None

    def log(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read()[-4000:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        spawned, self._spawned = self._spawned, None
        if spawned is not None:
            proc = spawned.proc
            try:
                proc.stdin.close()  # the zygote exits on EOF; pid 1 exiting ends the jail
            except OSError:
                pass
            try:
                proc.wait(timeout=0.5)
            except Exception:
                _killpg(proc.pid)
                try:
                    proc.wait(timeout=5)
                except Exception:
                    pass
            if proc.stdout:
                proc.stdout.close()
            if self.backend.name == "process":
                _killpg(proc.pid)  # anything the zygote's session left
            self.backend.teardown(spawned)
        try:
            self._stderr.close()
        except OSError:
            pass
        _live.discard(self)

    def kill(self) -> None:
        """Hard stop (used when the jail does not answer)."""
        if self._spawned is not None:
            _killpg(self._spawned.proc.pid)
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- frames ---------------------------------------------------------------------------------

    def call(self, request: dict[str, Any], timeout: float,
             on_call: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
        """Send one request and wait for its reply; on ``timeout`` raise :class:`JailTimeout`.

        While a run waits, the zygote may forward host-function calls (``{"op": "call"}``):
        ``on_call`` answers each, and the time it takes counts against ``timeout``."""
        if self.closed or self._spawned is None:
            raise JailError("the jail is closed")
        deadline = time.monotonic() + timeout
        self._send(request)
        while True:
            reply = self._recv(deadline)
            if reply.get("op") != "call":
                return reply
            answer = on_call(reply) if on_call is not None else {
                "error": {"type": "NameError", "message": "this sandbox has no host functions"}}
            self._send({"op": "call_result", **answer})

    def _send(self, obj: dict[str, Any]) -> None:
        assert self._spawned is not None
        with self._send_lock:
            proto.write_frame(self._spawned.proc.stdin.fileno(), obj)

    def interrupt(self) -> None:
        """Ask the zygote to kill the cell that is running now (ignored if none is)."""
        spawned = self._spawned
        if spawned is not None and not self.closed:
            try:
                self._send({"op": "interrupt"})
            except OSError:
                pass

    def _recv(self, deadline: float) -> dict[str, Any]:
        assert self._spawned is not None
        fd = self._spawned.proc.stdout.fileno()
        need = proto.HEADER.size
        length = None
        while True:
            if len(self._buf) >= need:
                if length is None:
                    length = proto.parse_header(bytes(self._buf[: proto.HEADER.size]), REPLY_LIMIT)
                    need = proto.HEADER.size + length
                    continue
                body = bytes(self._buf[proto.HEADER.size : need])
                del self._buf[:need]
                return proto.decode(body)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise JailTimeout()
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                raise JailTimeout()
            chunk = os.read(fd, max(need - len(self._buf), 1 << 16))
            if not chunk:
                raise EOFError("the jail exited")
            self._buf += chunk

    def new_oom_kill(self) -> bool:
        """Did the OOM killer strike in this jail since the last time we asked?  (read only on SIGKILL)"""
        if self._spawned is None:
            return False
        count = self.backend.oom_kills(self._spawned)
        seen, self._oom_seen = self._oom_seen, count
        return count > seen


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def close_all() -> None:
    """Tear down every jail of this process (atexit)."""
    for jail in list(_live):
        jail.close()
