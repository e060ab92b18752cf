"""Backends start jails.  ``nsjail`` is the default and fails closed; ``process`` (no isolation)
runs only when asked for by name."""

from __future__ import annotations

import os
import threading

from .._errors import BackendUnavailable, warn
from ._base import Backend, refusal
from ._nsjail import NsjailBackend

__all__ = ["Backend", "get_backend", "refusal", "pidfd_support", "BACKENDS", "BACKEND_ENV", "UNSAFE_ROOT_ENV"]

BACKENDS = ("auto", "nsjail", "process")
_lock = threading.Lock()
_cache: dict[str, Backend] = {}


def pidfd_support() -> tuple[bool, str]:
    """jailcell watches and kills cells through pidfds (pidfd_open, pidfd_send_signal: Linux 5.3+)."""
    import signal

    try:
        fd = os.pidfd_open(os.getpid())
    except (AttributeError, OSError) as exc:
        return False, f"pidfd_open is not available ({exc}); jailcell needs Linux 5.3 or newer"
    try:
        signal.pidfd_send_signal(fd, 0)
    except (AttributeError, OSError) as exc:
        return False, f"pidfd_send_signal is not available ({exc}); jailcell needs Linux 5.3 or newer"
    finally:
        os.close(fd)
    return True, "pidfd_open and pidfd_send_signal work"


UNSAFE_ROOT_ENV = "JAILCELL_UNSAFE_PROCESS_AS_ROOT"
BACKEND_ENV = "JAILCELL_BACKEND"


def get_backend(name: str | None = None) -> Backend:
    """The backend called ``name`` (default: ``$JAILCELL_BACKEND``, else ``auto``).

    ``auto`` and ``nsjail`` are the same: nsjail, or :class:`BackendUnavailable` naming the cause
    and the fix -- never a silent fallback.  ``process`` (no isolation from the host) is used
    only when asked for by name, and as root only with ``JAILCELL_UNSAFE_PROCESS_AS_ROOT=1`` too.
    """
    if name is None:
        name = os.environ.get(BACKEND_ENV) or "auto"
    if name not in BACKENDS:
        source = f" (from ${BACKEND_ENV})" if name == os.environ.get(BACKEND_ENV) else ""
        raise BackendUnavailable(f"unknown backend {name!r}{source}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "nsjail"
    with _lock:
        if name in _cache:
            return _cache[name]
        ok, why = pidfd_support()
        if not ok:
            raise BackendUnavailable(why)
        if name == "process":
            if os.geteuid() == 0 and os.environ.get(UNSAFE_ROOT_ENV) != "1":
                raise BackendUnavailable(
                    "the process backend runs programs without any isolation, and jailcell runs as root: a "
                    "program could read, change or kill anything on this machine. Use the nsjail backend "
                    "(`jailcell check` says what it needs), or run jailcell as an unprivileged user; if you "
                    f"really mean it, set {UNSAFE_ROOT_ENV}=1 as well")
            from ._process import ProcessBackend  # only when asked for by name: not on every `jailcell run`

            backend: Backend = ProcessBackend()
            warn("jailcell: the process backend gives NO isolation: programs can read this user's files "
                 "and use the network (asked for by name)")
        else:
            try:  # each jail is checked from inside as it starts (Backend.verify), before any program
                backend = NsjailBackend()
            except BackendUnavailable as exc:
                raise BackendUnavailable(refusal(str(exc))) from None
        _cache[name] = backend
        return backend
