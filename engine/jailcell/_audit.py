"""The audit log: one JSON line per run, written by the engine for every caller (the library, the
gateway, MCP, the daemon), so no way in escapes it.

Who asked and why comes from :func:`audit_context` (a context variable: it follows a request through
threads and asyncio tasks); the run itself from the engine.  The code is recorded by its sha256 (the
code itself only with ``code=True``).  Writing never fails a run: an unwritable log or a full disk is
reported once (a warning naming the path and the cause) and counted in
``jailcell_audit_write_errors_total``; the lines written before it are kept.  The file rotates by size
(``PATH.1`` .. ``PATH.<backups>``) and is created mode 0600.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from typing import Any, Iterator

from . import _metrics
from ._errors import InputError, warn

__all__ = ["AuditLog", "audit_context"]

AUDIT_ENV, AUDIT_CODE_ENV = "JAILCELL_AUDIT_LOG", "JAILCELL_AUDIT_CODE"
MAX_BYTES, BACKUPS = 100 << 20, 5
FIELDS = ("request_id", "who", "conversation")  # what callers may say about a run

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("jailcell_audit", default=None)


@contextlib.contextmanager
def audit_context(**fields: str | None) -> Iterator[None]:
    """Say who asks for the runs inside the block, for the audit log and the per-key metrics:
    ``request_id``, ``who`` (a key's or user's name, never a secret) and ``conversation`` (a
    conversation, container or session of the caller's).  Nests; follows threads and tasks."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise InputError(f"audit_context() takes {', '.join(FIELDS)}; not {', '.join(sorted(unknown))}")
    merged = dict(_context.get() or {})
    merged.update({k: str(v)[:200] for k, v in fields.items() if v is not None})
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def current() -> dict[str, str]:
    return _context.get() or {}


def tag(**fields: str | None) -> None:
    """Add to what the innermost :func:`audit_context` says (a service learns who asks only after
    its request began: at authentication).  Outside any, does nothing."""
    said = _context.get()
    if said is not None:
        said.update({k: str(v)[:200] for k, v in fields.items() if v is not None and k in FIELDS})


class AuditLog:
    """An append-only JSON-lines file.  Thread-safe; one instance per path is shared by every
    Sandbox of the process that names that path."""

    def __init__(self, path: str | os.PathLike[str], *, code: bool = False, max_bytes: int = MAX_BYTES,
                 backups: int = BACKUPS) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 4096:
            raise InputError(f"audit log max_bytes must be an integer of at least 4096, not {max_bytes!r}")
        if not isinstance(backups, int) or backups < 0:
            raise InputError(f"audit log backups must be a non-negative integer, not {backups!r}")
        self.path = os.path.abspath(os.fspath(path))
        self.code = code
        self.max_bytes, self.backups = max_bytes, backups
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._failing: str | None = None  # the error last reported (reported again only when it changes)

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.backups == 0:
            os.truncate(self.path, 0)
            return
        for n in range(self.backups - 1, 0, -1):
            if os.path.exists(f"{self.path}.{n}"):
                os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
        os.replace(self.path, f"{self.path}.1")

    def write(self, record: dict[str, Any]) -> bool:
        """Append one line; False (reported, counted) if it could not be written."""
        import json

        line = (json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str) + "\n").encode()
        m = _metrics.M
        with self._lock:
            try:
                if self._fd is not None and self._size + len(line) > self.max_bytes:
                    self._rotate()
                fd = self._open()
                written = os.write(fd, line)
                if written != len(line):  # a full disk mid-line: end the partial line so the next parses
                    os.write(fd, b"\n")
                    raise OSError(28, f"short write ({written} of {len(line)} bytes)")
                self._size += written
            except OSError as exc:
                if self._fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(self._fd)
                    self._fd = None  # reopened at the next line (the file may have been fixed or rotated away)
                why = f"{exc.strerror or exc}"
                if why != self._failing:
                    self._failing = why
                    warn("jailcell: cannot write the audit log %s (%s); runs go on, unaudited, until it can be "
                         "written (counted in jailcell_audit_write_errors_total)", self.path, why)
                if m is not None:
                    m.audit_errors.inc()
                return False
            self._failing = None
        if m is not None:
            m.audit_lines.inc()
        return True

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


_logs: dict[tuple[str, bool], AuditLog] = {}
_logs_lock = threading.Lock()


def resolve(audit: Any) -> AuditLog | None:
    """What ``Sandbox(audit=...)`` names: an AuditLog, a path (one shared AuditLog per path), False
    (none), or None: ``$JAILCELL_AUDIT_LOG`` if set (the code too if ``$JAILCELL_AUDIT_CODE=1``)."""
    if audit is False:
        return None
    if isinstance(audit, AuditLog):
        return audit
    code = False
    if audit is None:
        audit = os.environ.get(AUDIT_ENV) or None
        code = os.environ.get(AUDIT_CODE_ENV, "") == "1"
        if audit is None:
            return None
    if not isinstance(audit, (str, os.PathLike)):
        raise InputError(f"audit must be a path, an AuditLog or False, not {type(audit).__name__}")
    key = (os.path.abspath(os.fspath(audit)), code)
    with _logs_lock:
        if key not in _logs:
            _logs[key] = AuditLog(key[0], code=code)
        return _logs[key]


def sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def record(*, code: str, log: AuditLog, policy: str, policy_sha256: str, status: str, duration_s: float,
           cpu_s: float, peak_memory_bytes: int, files: list[dict[str, Any]], isolation: dict[str, Any],
           host_calls: dict[str, int], session: str | None, error_type: str | None) -> dict[str, Any]:
    """The audit line of one run."""
    ctx = current()
    now = time.time()
    line: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "request_id": ctx.get("request_id"), "who": ctx.get("who"), "conversation": ctx.get("conversation"),
        "session": session, "policy": policy, "policy_sha256": policy_sha256, "code_sha256": sha256(code),
        "status": status, "error_type": error_type, "duration_s": round(duration_s, 6), "cpu_s": round(cpu_s, 6),
        "peak_memory_bytes": peak_memory_bytes,
        "files": [{"name": f.get("name"), "size": f.get("size")} for f in files],
        "backend": isolation.get("backend"), "degraded": list(isolation.get("degraded") or []),
        "host_calls": host_calls,
    }
    if log.code:
        line["code"] = code
    return line
