"""The public sync API: Sandbox (stateless runs on a warm jail) and Session (a stateful one).

Both hand their work to :class:`~jailcell._engine._Engine`; the async twins (``_async.py``) call
the same methods in worker threads, with a cancel token that really stops the run."""

from __future__ import annotations

import binascii  # not base64.py, which costs every `jailcell run` ~0.9 ms
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ._engine import FILE_CHUNK, RunLock, _check_files, _Engine, check_file_name, raise_reply_error
from ._errors import JailError, SandboxClosed
from ._host._jail import Cancel, HeadLost, Jail, JailTimeout
from ._injail._protocol import ProtocolError
from ._policy import MIB, Policy
from ._result import Result
from ._threads import LazyThread

if TYPE_CHECKING:
    from ._audit import AuditLog

__all__ = ["Sandbox", "Session"]


class Sandbox:
    """Run untrusted Python in a warm jail.  Thread-safe; each ``run`` gets a fresh cell.

    >>> with Sandbox() as sb:
    ...     sb.run("print(6 * 7)").stdout
    '42\\n'

    ``policy`` is a built-in name (``minimal``, ``standard``, ``restricted``), a path to a TOML
    file or a :class:`Policy`; ``overrides`` change limits (``timeout=5``, ``memory=256``, any
    ``limits`` key).  ``backend`` is ``nsjail`` (``auto`` is the same; the default, unless
    ``$JAILCELL_BACKEND`` names another): if the jail cannot be built here, this raises
    :class:`BackendUnavailable` with the cause and the fix, and nothing runs.  ``process`` runs
    programs with no isolation from the host, only when asked for by name (and as root only with
    ``JAILCELL_UNSAFE_PROCESS_AS_ROOT=1``); its Results say so in ``isolation["degraded"]``.
    ``warm=True`` starts the jail now instead of at the first run.

    ``functions={"search": search}`` makes host callables available to the code as plain
    functions: arguments and results travel as JSON, exceptions come back with their type name
    and message, and the time they take counts against the run's wall-clock limit.  They run in
    the thread that called ``run`` (async functions are awaited).

    ``audit`` writes one JSON line per run to an audit log (a path, or an :class:`AuditLog`);
    by default ``$JAILCELL_AUDIT_LOG`` if set, ``False`` for none.  :func:`audit_context` says who
    asked for the runs inside it.
    """

    def __init__(self, policy: str | os.PathLike[str] | Policy | None = "standard", *, backend: str | None = None,
                 warm: bool = False, functions: Mapping[str, Callable[..., Any]] | None = None,
                 audit: str | os.PathLike[str] | AuditLog | bool | None = None, **overrides: Any) -> None:
        self._engine = _Engine(policy, backend, overrides, functions, audit)
        self._lock = RunLock()
        self._jail: Jail | None = None
        self._closed = False
        if warm:
            with self._lock:
                self._ensure_jail()

    @property
    def policy(self) -> Policy:
        return self._engine.policy

    @property
    def isolation(self) -> dict[str, Any]:
        return self._engine.isolation()

    def _ensure_jail(self) -> Jail:
        if self._closed:
            raise SandboxClosed("this Sandbox is closed; create a new one")
        if self._jail is None or not self._jail.alive():
            if self._jail is not None:
                self._jail.close()
            self._jail = self._engine.new_jail(session=False)
        return self._jail

    @property
    def closed(self) -> bool:
        return self._closed

    def run(self, code: str, *, timeout: float | None = None, files: Mapping[str, Any] | None = None) -> Result:
        """Run ``code`` in a fresh cell; errors in the code come back in the Result.  Raises
        InputError (bad code, files or timeout), SandboxClosed, BackendUnavailable (the first run
        starts the jail) or JailError (the jail could not be started)."""
        return self._run(code, timeout, files)

    def _run(self, code: str, timeout: float | None, files: Mapping[str, Any] | None,
             cancel: Cancel | None = None) -> Result:
        req = self._engine.run_request(code, timeout, files)
        with self._lock:
            for _attempt in (1, 2):
                jail = self._ensure_jail()
                result, usable = self._engine.execute(jail, req, cancel=cancel)
                if not usable:
                    self._jail = None
                # A jail that broke before the request reached a cell: run on a fresh jail.  Once
                # it may have started, never again (its host functions may have had effects).
                if usable or jail.delivered:
                    break
        return result

    def interrupt(self) -> None:
        """Stop the run in progress (from another thread): its cell is killed, the run returns
        status ``killed`` (error type ``Interrupted``) and the jail stays warm for the next run.
        Does nothing when no run is going on (a run waiting for its turn is not affected)."""
        jail = self._jail
        if jail is not None and not self._closed:
            jail.interrupt()

    def session(self, *, idle_timeout: float | None = None) -> "Session":
        """A stateful session (its own jail): globals persist between runs.  ``idle_timeout``
        closes it after that many seconds without a call.  Raises SandboxClosed, BackendUnavailable
        or JailError (the session's jail did not start)."""
        if self._closed:
            raise SandboxClosed("this Sandbox is closed; create a new one")
        return Session._create(self._engine, idle_timeout)

    def close(self) -> None:
        """End the jail (at once; its processes and cgroups are reclaimed in the background).  Waits
        for a run in progress to end first.  Closing twice is fine."""
        with self._lock:
            self._closed = True
            if self._jail is not None:
                self._jail.close()
                self._jail = None

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _SessionJail:
    """A session jail shared by a session and its forks; closed with the last of them."""

    def __init__(self, jail: Jail) -> None:
        self.jail = jail
        self.lock = RunLock()
        self.refs = 0


class Session:
    """Stateful execution: each ``run`` forks the session's head process.

    A run that finishes (ok or a Python exception) becomes the new head; a run that is killed
    (timeout, memory, crash) is discarded and the previous state continues.
    """

    def __init__(self, engine: _Engine, shared: _SessionJail, head: str, idle_timeout: float | None) -> None:
        self._engine = engine
        self._shared = shared
        self._head = head
        self._closed = False
        self._lost: str | None = None  # why the session's state is gone, if it is
        self._idle_timeout = idle_timeout
        self._last_used = time.monotonic()
        self._audit_id = os.urandom(8).hex()  # names the session (and each fork) in the audit log
        shared.refs += 1
        if idle_timeout is not None:
            _reaper.watch(self)

    @classmethod
    def _create(cls, engine: _Engine, idle_timeout: float | None) -> "Session":
        shared = _SessionJail(engine.new_jail(session=True))
        try:
            reply = shared.jail.request({"op": "new"})
            if reply.get("op") != "ok":
                raise_reply_error(reply)
        except (JailTimeout, EOFError, OSError, ProtocolError) as exc:
            shared.jail.kill()
            raise JailError(f"the session's jail did not start a session ({type(exc).__name__}: {exc}); "
                            "try again, and run `jailcell check` if it keeps failing") from None
        except Exception:
            shared.jail.close()
            raise
        return cls(engine, shared, reply["head"], idle_timeout)

    @property
    def isolation(self) -> dict[str, Any]:
        return self._engine.isolation()

    def _call(self, req: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        self._check_open()
        req = dict(req, head=self._head)
        with self._shared.lock:
            try:
                reply = self._shared.jail.request(req, timeout)
            except (JailTimeout, EOFError, OSError, ProtocolError) as exc:
                self._shared.jail.kill()
                raise JailError(f"the session's jail stopped answering ({type(exc).__name__}); "
                                "the session is lost") from None
        if reply.get("op") == "error":
            if reply.get("kind") == "lost":
                self._lost = str(reply.get("message", "its holder process is gone"))
            raise_reply_error(reply)
        return reply

    def _check_open(self) -> None:
        if self._lost is not None:
            raise JailError(f"the session was lost ({self._lost}); create a new session")
        if self._closed:
            raise SandboxClosed("this Session is closed")
        if not self._shared.jail.alive():
            raise JailError("the session's jail has stopped; create a new session")
        self._last_used = time.monotonic()

    def run(self, code: str, *, timeout: float | None = None, files: Mapping[str, Any] | None = None) -> Result:
        """Run ``code`` with the session's globals; a finished run's state is kept, a killed run's is
        discarded.  Raises InputError, SandboxClosed, or JailError when the session is lost."""
        return self._run(code, timeout, files)

    def _run(self, code: str, timeout: float | None, files: Mapping[str, Any] | None,
             cancel: Cancel | None = None) -> Result:
        self._check_open()
        req = self._engine.run_request(code, timeout, files)
        # Files of a session run are uploaded into the session's workspace first.
        for name, b64 in req.files.items():
            self._upload(name, binascii.a2b_base64(b64))
        req = req.without_files()
        with self._shared.lock:
            try:
                result, usable = self._engine.execute(self._shared.jail, req, head=self._head, cancel=cancel,
                                                      session=self._audit_id)
            except HeadLost as exc:
                self._lost = str(exc)
                raise JailError(f"{exc}; create a new session") from None
        if not usable:
            self._lost = (result.error or {}).get("message") or "its jail broke during a run"
        return result

    def interrupt(self) -> None:
        """Stop the run in progress (from another thread or task): its cell is killed and
        discarded, the run returns status ``killed`` (error type ``Interrupted``), and the
        session's state is what it was before that run.  Does nothing when no run is going on."""
        if not self._closed:
            self._shared.jail.interrupt()

    def upload(self, name: str, data: bytes | str) -> None:
        """Write ``data`` into the session's workspace as ``name`` (a relative path).  Raises
        InputError (a bad name, a file over the policy's size, a name that is a directory or a
        link), SandboxClosed, or JailError when the session is lost."""
        check_file_name(name)
        payload = _check_files({name: data}, self._engine.policy)[name]
        self._upload(name, binascii.a2b_base64(payload))

    def _upload(self, name: str, raw: bytes) -> None:
        """In chunks of FILE_CHUNK bytes: a file as large as the policy allows never makes one
        control frame over the protocol's limit."""
        view = memoryview(raw)
        offset = 0
        while True:
            chunk = view[offset:offset + FILE_CHUNK]
            self._call({"op": "upload", "name": name, "offset": offset,
                        "data": binascii.b2a_base64(chunk, newline=False).decode("ascii")})
            offset += len(chunk)
            if offset >= len(raw):
                return

    def download(self, name: str) -> bytes:
        """The content of workspace file ``name``.  Raises InputError (no such regular file, a link
        on its path, over the workspace size), SandboxClosed, or JailError when the session is lost."""
        check_file_name(name)
        limit = self._engine.policy.limits.workspace_mib * MIB
        parts: list[bytes] = []
        offset = 0
        while True:
            reply = self._call({"op": "download", "name": name, "limit": limit, "offset": offset,
                                "length": FILE_CHUNK})
            data = binascii.a2b_base64(reply.get("data", ""))
            size = reply.get("size")
            if not isinstance(size, int) or size > limit or offset + len(data) > size:
                raise JailError(f"the jail answered a download of {name!r} with a wrong size")
            parts.append(data)
            offset += len(data)
            if offset >= size or not data:
                return b"".join(parts)

    def fork(self) -> "Session":
        """A new session starting from this one's current state and workspace (same jail, separate
        head: branches can see each other's files).  Raises SandboxClosed or JailError."""
        reply = self._call({"op": "fork"})
        return Session(self._engine, self._shared, reply["head"], self._idle_timeout)

    def close(self) -> None:
        """End the session (the jail ends with its last branch).  Closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        _reaper.forget(self)
        shared = self._shared
        with shared.lock:
            shared.refs -= 1
            if shared.jail.alive():
                try:
                    shared.jail.request({"op": "close", "head": self._head}, 10)
                except Exception:
                    shared.jail.kill()
            if shared.refs <= 0:
                shared.jail.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _Reaper:
    """Closes sessions idle for longer than their ``idle_timeout`` (one daemon thread)."""

    def __init__(self) -> None:
        self._thread = LazyThread("jailcell-reaper", self._loop, after_fork=self._fresh)
        self._fresh()

    def _fresh(self) -> None:
        """At start, and in a forked child: the parent's sessions are not the child's to close."""
        self._sessions: set[Session] = set()
        self._lock = threading.Lock()

    def watch(self, session: Session) -> None:
        with self._lock:
            self._thread.ensure()
            self._sessions.add(session)

    def forget(self, session: Session) -> None:
        with self._lock:
            self._sessions.discard(session)

    def _loop(self) -> None:
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            with self._lock:
                expired = [s for s in self._sessions
                           if s._idle_timeout is not None and now - s._last_used > s._idle_timeout]
            for s in expired:
                s.close()


_reaper = _Reaper()
