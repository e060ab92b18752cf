"""Backends start jails.  ``nsjail`` is the default; ``process`` is the reported weaker fallback."""

from __future__ import annotations

import sys
import threading

from .._errors import BackendUnavailable
from ._base import Backend
from ._nsjail import NsjailBackend, nsjail_probe
from ._process import ProcessBackend

__all__ = ["Backend", "get_backend", "pidfd_support", "BACKENDS"]

BACKENDS = ("auto", "nsjail", "process")
_lock = threading.Lock()
_cache: dict[str, Backend] = {}
_warned = False


def pidfd_support() -> tuple[bool, str]:
    """jailcell watches and kills cells through pidfds (pidfd_open, pidfd_send_signal: Linux 5.3+)."""
    import os
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


def get_backend(name: str = "auto") -> Backend:
    """The backend called ``name``; ``auto`` = nsjail if it works here, else the process fallback."""
    global _warned
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    with _lock:
        if name in _cache:
            return _cache[name]
        ok, why = pidfd_support()
        if not ok:
            raise BackendUnavailable(why)
        if name == "process":
            backend: Backend = ProcessBackend()
        elif name == "nsjail":
            ok, why = nsjail_probe()
            if not ok:
                raise BackendUnavailable(why + " (run `jailcell check` for details)")
            backend = NsjailBackend()
        else:
            ok, why = nsjail_probe()
            if ok:
                backend = NsjailBackend()
            else:
                backend = ProcessBackend()
                if not _warned:
                    _warned = True
                    print(
                        f"jailcell: WARNING: running WITHOUT nsjail isolation (process fallback): {why}. "
                        "Programs can read this user's files and use the network. Run `jailcell check`.",
                        file=sys.stderr,
                    )
        _cache[name] = backend
        return backend
