"""What the public classes share: checking a request, running it on a jail and turning the jail's
reply into a :class:`Result`.  ``Sandbox``, ``Session`` and ``Pool`` (``_sandbox.py``, ``_pool.py``)
and their async twins (``_async.py``) all go through :class:`_Engine`; only the I/O differs."""

from __future__ import annotations

import atexit
import binascii  # not base64.py, which costs every `jailcell run` ~0.9 ms
import os
import sys
import threading
import time
from typing import Any, Callable, Mapping, NoReturn

from . import _audit, _metrics
from ._bridge import HostFunctions
from ._errors import BackendUnavailable, InputError, JailError, UsageError
from ._host._jail import Cancel, HeadLost, Jail, JailTimeout, RunCancelled, close_all
from ._host._run import Outcome, RunRequest
from ._host._supervisor import RAISE_MEMORY
from ._injail._protocol import ProtocolError
from ._policy import BACKEND_LEVEL, MIB, Policy
from ._result import Result, Status
from .backends import get_backend

MAX_NAME = 1024
FILE_CHUNK = 4 * MIB  # session uploads and downloads travel in pieces of this size
atexit.register(close_all)  # interpreter exit ends every jail of this process


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
    return {name: binascii.b2a_base64(d, newline=False).decode("ascii") for name, d in raw.items()}


def raise_reply_error(reply: dict[str, Any]) -> NoReturn:
    """Map an error answer of the zygote onto jailcell's exceptions, by its kind (never by the name
    of a Python class, which the jail chose)."""
    kind = reply.get("kind")
    message = str(reply.get("message") or "the jail refused the request")[:2000]
    if kind == "input":
        raise InputError(message)
    if kind == "lost":
        raise JailError(f"{message}; create a new session")
    raise JailError(f"the jail could not serve the request ({str(reply.get('type'))[:60]}: {message}); "
                    "if this keeps happening, run `jailcell check` and report it")


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
        if not self._lock.acquire(blocking=False):
            with _metrics.waiting():  # a run waiting for its turn on this jail
                self._lock.acquire()
        self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        self._owner = None
        self._lock.release()


def below_minimum(policy: Policy, backend: str, asked: str | None) -> str:
    """The refusal of a backend that gives less isolation than the policy accepts."""
    how = "asked for by name" if asked and asked != "auto" else "the strongest that works here"
    fix = ("`jailcell check` says why nsjail cannot create its namespaces here and how to fix that"
           if policy.isolation_minimum == "namespaces" else
           "use the nsjail or landlock backend (`jailcell check` says which work here)")
    return (f"policy {policy.name!r} accepts no less than {policy.isolation_minimum!r} isolation ([isolation] "
            f"minimum), and the {backend} backend ({how}) gives {BACKEND_LEVEL[backend]!r}: {fix}, or lower the "
            "policy's minimum if you mean it. Nothing was run.")


class _Engine:
    """Everything the sync and async classes share: policy, backend, requests, results."""

    def __init__(self, policy: str | os.PathLike[str] | Policy | None, backend: str | None, overrides: dict[str, Any],
                 functions: Mapping[str, Callable[..., Any]] | None = None, audit: Any = None) -> None:
        self.policy = Policy.load(policy).with_overrides(**overrides)
        self.audit = _audit.resolve(audit)
        self.backend = get_backend(backend)
        if not self.policy.admits(self.backend.name):
            raise BackendUnavailable(below_minimum(self.policy, self.backend.name, backend))
        self.functions = HostFunctions(functions)
        self._isolation: dict[str, Any] | None = None
        self._policy_sha256: str | None = None

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

    def run_request(self, code: Any, timeout: float | None, files: Mapping[str, Any] | None) -> RunRequest:
        """The run the caller asked for, checked against the policy (InputError names what is wrong)."""
        code = _check_code(code, self.policy)
        lim = self.policy.limits
        try:
            wall = float(timeout) if timeout is not None else lim.wall_s
        except (TypeError, ValueError):
            raise InputError(f"timeout must be a number of seconds, got {timeout!r}") from None
        if not 0 < wall <= 86400:
            raise InputError(f"timeout must be between 0 and 86400 seconds, got {timeout!r}")
        # Without an explicit cpu_s the CPU limit follows the wall-clock limit.
        cpu = lim.cpu_s if lim.cpu_s is not None else wall
        return RunRequest(code, wall, float(cpu), _check_files(files, self.policy),
                          tuple(self.functions.names) if self.functions else ())

    def execute(self, jail: Jail, req: RunRequest, head: str | None = None, cancel: Cancel | None = None,
                session: str | None = None) -> tuple[Result, bool]:
        """Run ``req`` in ``jail``.  Returns the Result and whether the jail is still usable.
        Raises RunCancelled if ``cancel`` came before the program started.  Every run that reaches
        a jail is counted in the metrics and written to the audit log here, and only here."""
        t0 = time.monotonic()
        observed = self.audit is not None or _metrics.M is not None
        calls: dict[str, int] = {}
        on_call: Callable[[dict[str, Any]], dict[str, Any]] = self.functions
        if observed and self.functions:
            def on_call(msg: dict[str, Any]) -> dict[str, Any]:
                name = msg.get("name")
                if isinstance(name, str) and name in self.functions.functions:  # names of the app's, not the code's
                    calls[name] = calls.get(name, 0) + 1
                return self.functions(msg)
        try:
            reply = jail.run(req, head=head, on_call=on_call, cancel=cancel)
        except (RunCancelled, HeadLost) as exc:  # (cancelled before it started; or its session's state died)
            if observed:
                cancelled = isinstance(exc, RunCancelled)
                error = {"type": "Cancelled" if cancelled else "SessionLost", "message": str(exc), "traceback": ""}
                self.observe(req, Result(status="killed", error=error, duration_s=time.monotonic() - t0,
                                         isolation=self.isolation()), session, calls,
                             status="cancelled" if cancelled else None)
            raise
        except (JailTimeout, EOFError, OSError, JailError, ProtocolError) as exc:
            jail.kill()
            why = "it stopped answering" if isinstance(exc, JailTimeout) else f"{type(exc).__name__}: {exc}"
            again = "; the program had started, so it was not run again" if jail.delivered else ""
            result = self._host_failure("killed", "JailDied", f"the jail broke during the run ({why}){again}", t0)
            if observed:
                self.observe(req, result, session, calls)
            return result, False
        if reply.input_error is not None:
            raise InputError(reply.input_error)
        result = self.to_result(reply, jail)
        if observed:
            self.observe(req, result, session, calls)
        return result, True

    def observe(self, req: RunRequest, result: Result, session: str | None, calls: dict[str, int],
                status: str | None = None) -> None:
        """The metrics and the audit line of one run."""
        status = status or result.status
        policy = self.policy.name
        m = _metrics.M
        if m is not None:
            m.runs.labels(policy, status, self.backend.name).inc()
            m.run_seconds.labels(policy).observe(result.duration_s)
            m.run_cpu.labels(policy).observe(result.cpu_s)
            m.run_memory.labels(policy).observe(result.peak_memory_bytes)
            who = _audit.current().get("who")
            if who is not None:
                m.key_runs.labels(who).inc()
            for name, n in calls.items():
                m.host_calls.labels(name).inc(n)
        if self.audit is not None:
            if self._policy_sha256 is None:
                self._policy_sha256 = _audit.sha256(self.policy.to_toml())
            self.audit.write(_audit.record(
                code=req.code, log=self.audit, policy=policy, policy_sha256=self._policy_sha256, status=status,
                duration_s=result.duration_s, cpu_s=result.cpu_s, peak_memory_bytes=result.peak_memory_bytes,
                files=result.files, isolation=result.isolation, host_calls=calls, session=session,
                error_type=(result.error or {}).get("type")))

    def _host_failure(self, status: Status, etype: str, message: str, t0: float) -> Result:
        return Result(status=status, error={"type": etype, "message": message, "traceback": ""},
                      duration_s=time.monotonic() - t0, isolation=dict(self.isolation()))

    def to_result(self, out: Outcome, jail: Jail) -> Result:
        status: Status = out.status
        error = out.error
        if status == "killed" and out.signal == "SIGKILL" and jail.new_oom_kill():
            status = "memory_limit"
            error = {"type": "MemoryLimit", "message": f"memory limit of {self.policy.limits.memory_mib} MiB reached; "
                     f"the program was killed{RAISE_MEMORY}", "traceback": ""}
        elif status == "error" and error and error.get("type") == "ModuleNotFoundError":
            error = missing_module_hint(error)
        elif status == "memory_limit" and error and error.get("type") == "MemoryError":
            error = dict(error, message=error.get("message") or
                         f"MemoryError: memory limit of {self.policy.limits.memory_mib} MiB reached{RAISE_MEMORY}")
        return Result(
            status=status, stdout=out.stdout, stderr=out.stderr, result=out.result, error=error,
            outputs=out.outputs, files=out.files, duration_s=out.duration_s, cpu_s=out.cpu_s,
            peak_memory_bytes=out.peak_memory_bytes, isolation=dict(self.isolation()),
        )
