"""The public API: Sandbox, AsyncSandbox, Session, Pool.

One engine does the work (:class:`_Engine`: requests, jails, results); the sync classes call it
directly and the async twins run the same calls in worker threads -- only the I/O differs.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

from ._bridge import HostFunctions
from ._errors import InputError, JailError, SandboxClosed, UsageError
from ._policy import MIB, Policy
from ._result import Result
from ._threads import LazyThread
from .backends import get_backend
from .jail._host import HeadLost, Jail, JailTimeout, close_all
from .jail._protocol import ProtocolError
from .jail._supervisor import RAISE_MEMORY

__all__ = ["Sandbox", "AsyncSandbox", "Session", "AsyncSession", "Pool"]

MAX_NAME = 1024
FILE_CHUNK = 4 * MIB  # session uploads and downloads travel in pieces of this size
atexit.register(close_all)


def _check_code(code: Any, policy: Policy) -> str:
    if isinstance(code, (bytes, bytearray)):
        try:
            code = bytes(code).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"code is not valid UTF-8 (byte {exc.start}); pass text or UTF-8 bytes") from None
    if not isinstance(code, str):
        raise InputError(f"code must be a str, got {type(code).__name__}")
    if "\0" in code:
        raise InputError(f"code contains a NUL byte at offset {code.index(chr(0))}; Python source cannot contain NUL")
    try:
        size = len(code.encode("utf-8"))
    except UnicodeEncodeError:
        raise InputError("code contains lone surrogate characters; pass valid Unicode text") from None
    if size > policy.limits.code_bytes:
        raise InputError(
            f"code is {size} bytes, over the limit of {policy.limits.code_bytes} bytes of policy {policy.name!r} "
            "(limits.code_bytes)"
        )
    return code


def check_file_name(name: Any) -> str:
    """A workspace-relative file name: no absolute paths, ``..``, NUL or control characters."""
    if not isinstance(name, str) or not name:
        raise InputError(f"file name must be a non-empty string, got {name!r}")
    bad = [c for c in name if ord(c) < 32 or c == "\x7f"]
    if bad or len(name) > MAX_NAME:
        raise InputError(f"file name {name!r} has control characters or is longer than {MAX_NAME}")
    if name.startswith("/") or name.startswith("\\"):
        raise InputError(f"file name {name!r} is absolute; use a path relative to the workspace, like 'data/in.csv'")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or any(len(p.encode()) > 255 for p in parts):
        raise InputError(f"file name {name!r} must be a relative path without '.', '..' or empty parts")
    return name


def _check_files(files: Mapping[str, Any] | None, policy: Policy) -> dict[str, str]:
    """Validate names and sizes before anything is encoded; returns {name: base64}."""
    if not files:
        return {}
    if not isinstance(files, Mapping):
        raise InputError("files must be a mapping of {name: bytes or str}")
    per_file = min(policy.limits.workspace_mib, policy.limits.file_size_mib) * MIB
    raw: dict[str, bytes] = {}
    for name, data in files.items():
        check_file_name(name)
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InputError(f"file {name!r}: content must be bytes or str, got {type(data).__name__}")
        raw[name] = bytes(data)
    total = sum(len(d) for d in raw.values())
    if total > policy.limits.workspace_mib * MIB or any(len(d) > per_file for d in raw.values()):
        raise InputError(
            f"files are too large: {total} bytes in all; each file may be at most {per_file} bytes and all together "
            f"{policy.limits.workspace_mib} MiB (policy {policy.name!r})"
        )
    return {name: base64.b64encode(d).decode("ascii") for name, d in raw.items()}


def raise_reply_error(reply: dict[str, Any]) -> None:
    """Map an error reply of the zygote onto jailcell's exceptions."""
    kind, message = reply.get("type", ""), reply.get("message", "the jail refused the request")
    if kind in ("ValueError", "FileNotFoundError", "IsADirectoryError", "NotADirectoryError", "KeyError"):
        raise InputError(message)
    raise JailError(f"{kind}: {message}" if kind else message)


# Modules a built-in policy uses, and the extra of jailcell that installs them.
EXTRAS = {"numpy": "datascience", "pandas": "datascience", "matplotlib": "datascience"}


def missing_module_hint(error: dict[str, Any]) -> dict[str, Any]:
    """``No module named 'numpy'`` plus what to install on the host, in the message the model reads:
    the jail sees exactly the packages of the Python that runs jailcell."""
    import importlib.util
    import re

    message = str(error.get("message", ""))
    found = re.fullmatch(r"No module named '([\w.]+)'", message)
    if not found:
        return error
    name = found.group(1)
    top = name.partition(".")[0]
    try:
        on_host = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        on_host = False
    if on_host and name != top:
        return error  # the package is there; the submodule is not
    exe = sys.executable
    if on_host:
        hint = (f"{top!r} is installed on the host but not visible in the jail; jailcell binds only the "
                "interpreter's site directories and the paths their .pth files name (`jailcell check` lists them)")
    elif top in EXTRAS:
        hint = (f"{top} is not installed for the Python that runs jailcell ({exe}); install it on the host with "
                f'`{exe} -m pip install "jailcell[{EXTRAS[top]}]"`')
    else:
        hint = (f"{top!r} is not installed for the Python that runs jailcell ({exe}); the sandbox can import "
                f"only what is installed there (`{exe} -m pip install PACKAGE` for the package that provides it)")
    new = f"{message}: {hint}"
    tb = str(error.get("traceback", ""))
    last = f"ModuleNotFoundError: {message}"
    if tb.rstrip("\n").endswith(last):
        tb = tb.rstrip("\n")[: -len(last)] + f"ModuleNotFoundError: {new}\n"
    return dict(error, message=new, traceback=tb)


class RunLock:
    """The lock a jail's runs take turns on.  Host functions run in the thread that called
    ``run``, inside the run: one that calls ``run`` (or a session call) on the same object would
    wait for itself forever, so that is an error at once instead."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def __enter__(self) -> "RunLock":
        if self._owner == threading.get_ident():
            raise UsageError("run() was called on a Sandbox or Session from inside one of its own runs (a host "
                             "function calling back into it); use another Sandbox, Session or Pool for that")
        self._lock.acquire()
        self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        self._owner = None
        self._lock.release()


class _Engine:
    """Everything the sync and async classes share: policy, backend, requests, results."""

    def __init__(self, policy: str | os.PathLike[str] | Policy | None, backend: str | None, overrides: dict[str, Any],
                 functions: Mapping[str, Callable[..., Any]] | None = None) -> None:
        self.policy = Policy.load(policy).with_overrides(**overrides)
        self.backend = get_backend(backend)
        self.functions = HostFunctions(functions)
        self._isolation: dict[str, Any] | None = None

    def isolation(self) -> dict[str, Any]:
        if self._isolation is None:
            iso = self.backend.isolation(self.policy)
            lim = self.policy.limits
            iso["policy"] = self.policy.name
            iso["limits"] = {
                "wall_s": lim.wall_s, "cpu_s": lim.effective_cpu_s, "memory_mib": lim.memory_mib, "pids": lim.pids,
                "file_size_mib": lim.file_size_mib, "open_files": lim.open_files, "output_bytes": lim.output_bytes,
                "workspace_mib": lim.workspace_mib,
            }
            iso["import_policy"] = bool(self.policy.imports.allow or self.policy.imports.deny)
            iso["code_mode"] = self.policy.code_mode
            self._isolation = iso
        return self._isolation

    def new_jail(self, session: bool) -> Jail:
        return Jail(self.backend, self.policy, session=session)

    def run_request(self, code: Any, timeout: float | None, files: Mapping[str, Any] | None) -> dict[str, Any]:
        code = _check_code(code, self.policy)
        lim = self.policy.limits
        wall = float(timeout) if timeout is not None else lim.wall_s
        if not 0 < wall <= 86400:
            raise InputError(f"timeout must be between 0 and 86400 seconds, got {timeout!r}")
        # Without an explicit cpu_s the CPU limit follows the wall-clock limit.
        cpu = lim.cpu_s if lim.cpu_s is not None else wall
        req = {"code": code, "timeout": wall, "cpu_s": cpu, "files": _check_files(files, self.policy)}
        if self.functions:
            req["functions"] = self.functions.names
        return req

    def execute(self, jail: Jail, req: dict[str, Any], head: str | None = None) -> tuple[Result, bool]:
        """Run ``req`` in ``jail``.  Returns the Result and whether the jail is still usable."""
        t0 = time.monotonic()
        try:
            reply = jail.run(req, head=head, on_call=self.functions)
        except HeadLost:
            raise
        except (JailTimeout, EOFError, OSError, JailError, ProtocolError) as exc:
            jail.kill()
            why = "it stopped answering" if isinstance(exc, JailTimeout) else f"{type(exc).__name__}: {exc}"
            again = "; the program had started, so it was not run again" if jail.delivered else ""
            return self._host_failure("killed", "JailDied", f"the jail broke during the run ({why}){again}", t0), False
        if "input_error" in reply:
            raise InputError(reply["input_error"])
        return self.to_result(reply, jail), True

    def _host_failure(self, status: str, etype: str, message: str, t0: float) -> Result:
        return Result(status=status, error={"type": etype, "message": message, "traceback": ""},
                      duration_s=time.monotonic() - t0, isolation=dict(self.isolation()))

    def to_result(self, reply: dict[str, Any], jail: Jail) -> Result:
        status = reply.get("status", "error")
        error = reply.get("error")
        if status == "killed" and reply.get("signal") == "SIGKILL" and jail.new_oom_kill():
            status = "memory_limit"
            error = {"type": "MemoryLimit", "message": f"memory limit of {self.policy.limits.memory_mib} MiB reached; "
                     f"the program was killed{RAISE_MEMORY}", "traceback": ""}
        elif status == "error" and error and error.get("type") == "ModuleNotFoundError":
            error = missing_module_hint(error)
        elif status == "memory_limit" and error and error.get("type") == "MemoryError":
            error = dict(error, message=error.get("message") or
                         f"MemoryError: memory limit of {self.policy.limits.memory_mib} MiB reached{RAISE_MEMORY}")
        return Result(
            status=status, stdout=reply.get("stdout", ""), stderr=reply.get("stderr", ""), result=reply.get("result"),
            error=error, outputs=reply.get("outputs") or [], files=reply.get("files") or [],
            duration_s=float(reply.get("duration_s", 0.0)), cpu_s=float(reply.get("cpu_s", 0.0)),
            peak_memory_bytes=int(reply.get("peak_memory_bytes", 0)), isolation=dict(self.isolation()),
        )


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
    """

    def __init__(self, policy: str | os.PathLike[str] | Policy | None = "standard", *, backend: str | None = None,
                 warm: bool = False, functions: Mapping[str, Callable[..., Any]] | None = None,
                 **overrides: Any) -> None:
        self._engine = _Engine(policy, backend, overrides, functions)
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

    def run(self, code: str, *, timeout: float | None = None, files: Mapping[str, Any] | None = None) -> Result:
        """Run ``code`` in a fresh cell; errors in the code come back in the Result."""
        req = self._engine.run_request(code, timeout, files)
        with self._lock:
            for attempt in (1, 2):
                jail = self._ensure_jail()
                result, usable = self._engine.execute(jail, req)
                if not usable:
                    self._jail = None
                # A jail that broke before the request reached a cell: run on a fresh jail.  Once
                # it may have started, never again (its host functions may have had effects).
                if usable or jail.delivered:
                    break
        return result

    def session(self, *, idle_timeout: float | None = None) -> "Session":
        """A stateful session (its own jail): globals persist between runs."""
        if self._closed:
            raise SandboxClosed("this Sandbox is closed; create a new one")
        return Session._create(self._engine, idle_timeout)

    def close(self) -> None:
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
                raise JailError(f"the session's jail stopped answering ({type(exc).__name__}); the session is lost") from None
        if reply.get("op") == "error":
            if reply.get("type") == "HeadLost":
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
        self._check_open()
        req = self._engine.run_request(code, timeout, files)
        # Files of a session run are uploaded into the session's workspace first.
        for name, b64 in req.pop("files").items():
            self._upload(name, base64.b64decode(b64))
        req["files"] = {}
        with self._shared.lock:
            try:
                result, usable = self._engine.execute(self._shared.jail, req, head=self._head)
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
        check_file_name(name)
        payload = _check_files({name: data}, self._engine.policy)[name]
        self._upload(name, base64.b64decode(payload))

    def _upload(self, name: str, raw: bytes) -> None:
        """In chunks of FILE_CHUNK bytes: a file as large as the policy allows never makes one
        control frame over the protocol's limit."""
        view = memoryview(raw)
        offset = 0
        while True:
            chunk = view[offset:offset + FILE_CHUNK]
            self._call({"op": "upload", "name": name, "offset": offset,
                        "data": base64.b64encode(chunk).decode("ascii")})
            offset += len(chunk)
            if offset >= len(raw):
                return

    def download(self, name: str) -> bytes:
        check_file_name(name)
        limit = self._engine.policy.limits.workspace_mib * MIB
        parts: list[bytes] = []
        offset = 0
        while True:
            reply = self._call({"op": "download", "name": name, "limit": limit, "offset": offset,
                                "length": FILE_CHUNK})
            data = base64.b64decode(reply.get("data", ""))
            size = reply.get("size")
            if not isinstance(size, int) or size > limit or offset + len(data) > size:
                raise JailError(f"the jail answered a download of {name!r} with a wrong size")
            parts.append(data)
            offset += len(data)
            if offset >= size or not data:
                return b"".join(parts)

    def fork(self) -> "Session":
        """A new session starting from this one's current state (same jail, separate head)."""
        reply = self._call({"op": "fork"})
        return Session(self._engine, self._shared, reply["head"], self._idle_timeout)

    def close(self) -> None:
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


class Pool:
    """N warm jails running programs in parallel (default: one per CPU).

    ``map`` keeps the order of its input and consumes it lazily with bounded look-ahead, so a
    generator of a million programs is fine.  A jail that dies is replaced.
    """

    def __init__(self, size: int | None = None, policy: str | os.PathLike[str] | Policy | None = "standard", *,
                 backend: str | None = None, warm: bool = True, functions: Mapping[str, Callable[..., Any]] | None = None,
                 **overrides: Any) -> None:
        size = size if size is not None else (os.cpu_count() or 1)
        if not isinstance(size, int) or size < 1:
            raise InputError(f"Pool size must be a positive integer, got {size!r}")
        self.size = size
        self._sandboxes: queue.SimpleQueue[Sandbox] = queue.SimpleQueue()
        self._all: list[Sandbox] = []
        self._closed = False
        engine_policy = Policy.load(policy).with_overrides(**overrides)
        starters = [lambda: Sandbox(engine_policy, backend=backend, warm=warm, functions=functions) for _ in range(size)]
        with ThreadPoolExecutor(max_workers=size) as ex:
            for sb in ex.map(lambda f: f(), starters):
                self._all.append(sb)
                self._sandboxes.put(sb)
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="jailcell-pool")

    @property
    def policy(self) -> Policy:
        return self._all[0].policy

    def run(self, code: str, *, timeout: float | None = None, files: Mapping[str, Any] | None = None) -> Result:
        if self._closed:
            raise SandboxClosed("this Pool is closed")
        sb = self._sandboxes.get()
        try:
            return sb.run(code, timeout=timeout, files=files)
        finally:
            self._sandboxes.put(sb)

    def map(self, codes: Iterable[str], *, timeout: float | None = None) -> list[Result]:
        """Run every program; results in input order."""
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

    async def amap(self, codes: Iterable[str], *, timeout: float | None = None) -> list[Result]:
        return await asyncio.to_thread(self.map, codes, timeout=timeout)

    def close(self) -> None:
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


class AsyncSandbox:
    """The asyncio twin of :class:`Sandbox`: same arguments, coroutine methods."""

    def __init__(self, policy: str | os.PathLike[str] | Policy | None = "standard", *, backend: str | None = None,
                 warm: bool = False, functions: Mapping[str, Callable[..., Any]] | None = None,
                 **overrides: Any) -> None:
        self._sync = Sandbox(policy, backend=backend, warm=warm, functions=functions, **overrides)

    @property
    def policy(self) -> Policy:
        return self._sync.policy

    async def run(self, code: str, *, timeout: float | None = None, files: Mapping[str, Any] | None = None) -> Result:
        return await asyncio.to_thread(self._sync.run, code, timeout=timeout, files=files)

    async def session(self, *, idle_timeout: float | None = None) -> "AsyncSession":
        return AsyncSession(await asyncio.to_thread(self._sync.session, idle_timeout=idle_timeout))

    async def close(self) -> None:
        await asyncio.to_thread(self._sync.close)

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSession:
    """The asyncio twin of :class:`Session`."""

    def __init__(self, session: Session) -> None:
        self._sync = session

    async def run(self, code: str, *, timeout: float | None = None, files: Mapping[str, Any] | None = None) -> Result:
        return await asyncio.to_thread(self._sync.run, code, timeout=timeout, files=files)

    def interrupt(self) -> None:
        self._sync.interrupt()

    async def upload(self, name: str, data: bytes | str) -> None:
        await asyncio.to_thread(self._sync.upload, name, data)

    async def download(self, name: str) -> bytes:
        return await asyncio.to_thread(self._sync.download, name)

    async def fork(self) -> "AsyncSession":
        return AsyncSession(await asyncio.to_thread(self._sync.fork))

    async def close(self) -> None:
        await asyncio.to_thread(self._sync.close)

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
