"""``jailcell daemon``: warm jails behind a Unix socket, so that ``jailcell run`` in a loop (an agent
that shells out) costs a round trip instead of a jail start.

The socket lives in a folder only its user can enter (mode 0700), and each side checks the other's
credentials (SO_PEERCRED): the daemon serves only its own user, and ``jailcell run`` hands programs
only to a daemon of its own user.  A run that cannot be handed over (no daemon, another backend
asked for) runs in a jail of its own, as without a daemon.

The client half (:func:`run_via_daemon`) is what every ``jailcell run`` imports first: stdlib
sockets and JSON only, nothing of the engine.  The server half imports the engine when it starts.

Frames: a 4-byte big-endian length, then UTF-8 JSON.  Requests: ``{"op": "run", "code", "policy",
"cwd", "timeout", "memory", "files": {name: base64}, "backend"}``, ``{"op": "status"}``, ``{"op": "stop"}``.
Answers: ``{"ok": true, "result": Result.to_dict()}`` (or the status), or ``{"ok": false, "kind",
"message"}`` where kind ``usage`` is the caller's mistake (exit 2) and ``backend`` means "not here:
run it yourself".
"""

from __future__ import annotations

import _socket  # not socket.py: its enums and selectors cost a `jailcell run` ~2.5 ms
import os
import stat
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import; the names are for readers and mypy only
    from typing import Any

SOCKET_ENV = "JAILCELL_DAEMON_SOCKET"  # the daemon's socket; empty: never use a daemon
MAX_FRAME = 256 << 20  # a program and its files (base64) or a Result (its output is capped by the policy)
_LEN = struct.Struct(">I")
_CRED = struct.Struct("3i")  # pid, uid, gid


def socket_path() -> str | None:
    """Where the daemon listens: ``$JAILCELL_DAEMON_SOCKET``, else ``$XDG_RUNTIME_DIR/jailcell/daemon.sock``,
    else ``/tmp/jailcell-UID/daemon.sock``.  None when the variable is set empty (no daemon)."""
    env = os.environ.get(SOCKET_ENV)
    if env is not None:
        return os.path.abspath(env) if env else None
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "jailcell", "daemon.sock")
    return os.path.join("/tmp", f"jailcell-{os.geteuid()}", "daemon.sock")


def private_folder_problem(folder: str) -> str | None:
    """Why ``folder`` is not a safe home for the socket (another user could replace the socket or
    listen in its place), or None: it must be a real folder, ours, and closed to everyone else."""
    try:
        st = os.lstat(folder)
    except OSError as exc:
        return f"{folder}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder} is not a folder"
    if st.st_uid != os.geteuid():
        return f"{folder} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    if st.st_mode & 0o077:
        return f"{folder} is open to other users (mode {stat.filemode(st.st_mode)}; it must be drwx------)"
    return None


def _folder_advice(folder: str, problem: str) -> str:
    """What to do about a socket folder that is not private: chmod fixes only a folder of one's own; a
    folder that another user made first (anyone can make /tmp/jailcell-UID) can only be avoided."""
    try:
        owner = os.lstat(folder).st_uid
    except OSError:
        owner = os.geteuid()
    elsewhere = (f"choose a folder of your own: set XDG_RUNTIME_DIR (systemd sets it to /run/user/{os.geteuid()}) "
                 f"or pass --socket (or ${SOCKET_ENV}), e.g. --socket ~/.cache/jailcell/daemon.sock")
    if owner != os.geteuid():
        try:
            import pwd

            name = f"{pwd.getpwuid(owner).pw_name!r} (uid {owner})"
        except (ImportError, KeyError):
            name = f"uid {owner}"
        return (f"the daemon's socket folder {folder} was made by another user, {name}, not by you: it cannot be "
                f"used (that user could replace or listen on the socket), and you cannot fix it; {elsewhere}. "
                "If you did not expect that folder, tell the machine's administrator")
    return (f"the daemon's socket must be in a folder only you can enter: {problem}. Fix: `chmod 700 {folder}`, "
            f"or {elsewhere}")


def peer_uid(sock: Any) -> int:
    return _CRED.unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _CRED.size))[1]


def _json() -> Any:
    """The json module, imported at its first use: a `jailcell run` that finds no daemon never needs it (~1.2 ms)."""
    import json

    return json


def frame(obj: Any) -> bytes:
    """One frame: the length, then the JSON (both sides, the client's and the daemon's)."""
    data = _json().dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return _LEN.pack(len(data)) + data


def send_frame(sock: Any, obj: Any) -> None:
    sock.sendall(frame(obj))


def recv_frame(sock: Any) -> Any:
    """One frame; EOFError if the other side closed first."""
    head = _recv_exactly(sock, _LEN.size)
    (size,) = _LEN.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes (the limit is {MAX_FRAME})")
    return _json().loads(_recv_exactly(sock, size))


def _recv_exactly(sock: Any, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class DaemonError(Exception):
    """The daemon refused the request (the caller's mistake) or took the run and then failed it."""


def connect(path: str | None = None, *, quiet: bool = True) -> Any:
    """A connection to this user's daemon, or None when there is none to use (not running, or its
    socket is somewhere another user could have put it: then, unless ``quiet``, a warning says so)."""
    path = socket_path() if path is None else path
    sock, problem = reach(path) if path else (None, None)
    if problem and not quiet:
        print(f"jailcell: not using the daemon socket {path}: {problem}", file=sys.stderr)
    return sock


def reach(path: str) -> tuple[Any, str | None]:
    """(a connection to the daemon at ``path``, None), or (None, why a socket there is not to be
    used), or (None, None) when no daemon is there."""
    if not os.path.exists(path):
        return None, None
    problem = private_folder_problem(os.path.dirname(path))
    if problem:
        return None, problem
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError:  # a socket left by a daemon that is gone
        sock.close()
        return None, None
    uid = peer_uid(sock)
    if uid == os.geteuid():
        return sock, None
    sock.close()
    return None, f"it is served by uid {uid}, not by this user"


def request(sock: Any, obj: dict[str, Any]) -> dict[str, Any]:
    """Send one request and wait for its answer."""
    try:
        send_frame(sock, obj)
        answer = recv_frame(sock)
    finally:
        sock.close()
    if not isinstance(answer, dict):
        raise DaemonError("the daemon's answer is not an object")
    return answer


def run_via_daemon(code: str, *, policy: str, timeout: float | None, memory: int | None,
                   files: dict[str, bytes], backend: str | None) -> dict[str, Any] | None:
    """The Result (as a dict) of ``code`` run by this user's daemon, or None when no daemon takes it
    (then the caller runs it in a jail of its own).  Raises DaemonError when the daemon took the run
    and could not finish it, or refused the request."""
    sock = connect(quiet=False)
    if sock is None:
        return None
    import base64

    try:
        cwd = os.getcwd()
    except OSError:  # a folder removed under the caller: a relative policy file cannot be found anyway
        cwd = "/"
    req = {"op": "run", "code": code, "policy": policy, "cwd": cwd, "timeout": timeout, "memory": memory,
           "files": {name: base64.b64encode(data).decode() for name, data in files.items()},
           "backend": backend or os.environ.get("JAILCELL_BACKEND") or None}
    try:
        answer = request(sock, req)
    except (OSError, EOFError, ValueError) as exc:
        raise DaemonError(f"the jailcell daemon failed during the run ({exc})") from None
    if answer.get("ok") and isinstance(answer.get("result"), dict):
        return answer["result"]
    if answer.get("kind") == "backend":  # it serves another backend than asked for: not ours to use
        return None
    raise DaemonError(str(answer.get("message", "the daemon failed the run")))


# ------------------------------------------------------------------------------------------------
# the daemon
# ------------------------------------------------------------------------------------------------

def serve(path: str | None = None, *, warm: list[str], backend: str | None = None, jails: int = 1,
          max_policies: int = 4, on_ready: Any = None) -> None:
    """Serve this user's ``jailcell run`` calls on the socket at ``path`` until stopped (SIGTERM,
    SIGINT, or ``jailcell daemon --stop``).  Raises UsageError when the socket cannot be ours."""
    import asyncio

    path = socket_path() if path is None else path
    if not path:
        from ._errors import UsageError

        raise UsageError(f"${SOCKET_ENV} is empty (no daemon); give a path with --socket")
    server = _Daemon(path, backend=backend, jails=jails, max_policies=max_policies)
    try:
        asyncio.run(server.main(warm, on_ready))
    finally:
        server.close()


class _Daemon:
    def __init__(self, path: str, *, backend: str | None, jails: int, max_policies: int) -> None:
        from .backends import get_backend

        self.path, self.jails, self.max_policies = path, jails, max_policies
        self.backend = get_backend(backend)  # refuses here, before the socket exists, if it cannot jail
        self.pools: dict[tuple, Any] = {}  # policy key -> Pool, least recently used first
        self.busy: dict[tuple, int] = {}
        self.served = 0
        self._bound = self._made_folder = False

    def _bind(self) -> Any:
        import socket

        from ._errors import UsageError

        folder = os.path.dirname(self.path)
        self._made_folder = not os.path.exists(folder)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the daemon's folder {folder}: {exc.strerror}") from None
        problem = private_folder_problem(folder)
        if problem:
            raise UsageError(_folder_advice(folder, problem))
        other = connect(self.path)
        if other is not None:
            other.close()
            raise UsageError(f"a jailcell daemon already serves {self.path} (`jailcell daemon --stop` ends it)")
        if os.path.exists(self.path):  # left by a daemon that did not end cleanly
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        self._bound = True
        sock.listen(64)
        return sock

    async def main(self, warm: list[str], on_ready: Any) -> None:
        import asyncio
        import signal

        listener = self._bind()
        self._starting = asyncio.Lock()
        for spec in warm:  # before serving: the first run is warm
            await self._pool(spec, None, None)
        self.stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopped.set)
        server = await asyncio.start_unix_server(self._client, sock=listener)
        if on_ready is not None:
            on_ready(self)
        async with server:
            await self.stopped.wait()

    def close(self) -> None:
        if self._bound:
            try:
                os.unlink(self.path)
                if self._made_folder:
                    os.rmdir(os.path.dirname(self.path))  # only if empty: nothing of ours is left
            except OSError:
                pass
            self._bound = False
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

    async def _pool(self, spec: str, timeout: float | None, memory: int | None) -> tuple[tuple, Any]:
        """The warm Pool for this policy and limits (started on first use); the least recently used
        idle one is closed past ``max_policies``."""
        import asyncio

        from ._policy import Policy
        from ._pool import Pool

        mtime = os.stat(spec).st_mtime_ns if os.path.isabs(spec) and os.path.exists(spec) else 0
        key = (spec, mtime, timeout, memory)
        if key not in self.pools:
            async with self._starting:  # two first calls of a policy start one Pool
                if key not in self.pools:
                    policy = Policy.load(spec).with_overrides(timeout=timeout, memory=memory)
                    pool = await asyncio.to_thread(Pool, self.jails, policy, backend=self.backend.name)
                    idle = [k for k in self.pools if not self.busy.get(k)]
                    while len(self.pools) >= self.max_policies and idle:
                        old = idle.pop(0)
                        await asyncio.to_thread(self.pools.pop(old).close)
                    self.pools[key] = pool
        self.pools[key] = self.pools.pop(key)  # most recently used last
        return key, self.pools[key]

    async def _client(self, reader: Any, writer: Any) -> None:
        import asyncio

        sock = writer.get_extra_info("socket")
        try:
            if peer_uid(sock) != os.geteuid():  # the folder should keep others out; this makes sure
                return
            head = await reader.readexactly(_LEN.size)
            (size,) = _LEN.unpack(head)
            if size > MAX_FRAME:
                answer: dict[str, Any] | None = _refusal("usage", f"a request of {size} bytes (limit: {MAX_FRAME})")
            else:
                answer = await self._answer(_json().loads(await reader.readexactly(size)), reader)
            if answer is not None:
                writer.write(frame(answer))
                await writer.drain()
        except (EOFError, ValueError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(self, req: Any, reader: Any) -> dict[str, Any] | None:
        from ._errors import InputError, JailcellError, PolicyError
        from ._policy import looks_like_path

        op = req.get("op") if isinstance(req, dict) else None
        if op == "status":
            return {"ok": True, "pid": os.getpid(), "socket": self.path, "backend": self.backend.name,
                    "served": self.served, "running": sum(self.busy.values()),
                    "policies": [{"policy": k[0], "timeout": k[2], "memory": k[3]} for k in self.pools]}
        if op == "stop":
            self.stopped.set()
            return {"ok": True}
        if op != "run":
            return _refusal("usage", f"unknown request {op!r}; this daemon serves run, status and stop")
        asked = req.get("backend") or "auto"
        if (asked if asked != "auto" else "nsjail") != self.backend.name:
            return _refusal("backend", f"this daemon runs programs with the {self.backend.name} backend")
        try:
            code, files = req.get("code"), _files(req.get("files"))
            policy, timeout, memory = req.get("policy"), req.get("timeout"), req.get("memory")
            if not isinstance(code, str) or not isinstance(policy, str):
                return _refusal("usage", "a run request needs code and policy as strings")
            if not (timeout is None or (isinstance(timeout, (int, float)) and not isinstance(timeout, bool))) or \
                    not (memory is None or (isinstance(memory, int) and not isinstance(memory, bool))):
                return _refusal("usage", "timeout must be a number of seconds and memory a number of MiB (or null)")
            cwd = req.get("cwd")
            if not isinstance(cwd, str) or not os.path.isabs(cwd):
                return _refusal("usage", "a run request needs the caller's folder (cwd) as an absolute path")
            if looks_like_path(policy):  # a file: as the caller would read it, from its own folder
                policy = os.path.join(cwd, os.path.expanduser(policy))
            key, pool = await self._pool(policy, timeout, memory)
            self.busy[key] = self.busy.get(key, 0) + 1
            try:
                result = await self._run_unless_client_leaves(pool, code, files, reader)
            finally:
                self.busy[key] -= 1
        except JailcellError as exc:
            return _refusal("usage" if isinstance(exc, (PolicyError, InputError)) else "jail", str(exc))
        if result is None:
            return None
        self.served += 1
        return {"ok": True, "result": result.to_dict()}

    @staticmethod
    async def _run_unless_client_leaves(pool: Any, code: str, files: dict[str, bytes], reader: Any) -> Any:
        """The run's Result; None if the client hung up first (its program is then killed)."""
        import asyncio

        run = asyncio.ensure_future(pool.arun(code, files=files or None))
        gone = asyncio.ensure_future(reader.read(1))  # a client sends nothing more: EOF (or more) means it left
        await asyncio.wait({run, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if run.done():
            return run.result()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        return None


def _files(raw: Any) -> dict[str, bytes]:
    import base64
    import binascii

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        from ._errors import InputError

        raise InputError("files must be an object of {name: base64}")
    try:
        return {str(name): base64.b64decode(data, validate=True) for name, data in raw.items()}
    except (binascii.Error, TypeError) as exc:
        from ._errors import InputError

        raise InputError(f"a file's content is not base64: {exc}") from None


def _refusal(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "kind": kind, "message": message}

