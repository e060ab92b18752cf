"""Backends start jails.  ``nsjail`` is the default; ``process`` is the reported weaker fallback."""

from __future__ import annotations

import sys
import threading

from .._errors import BackendUnavailable
from ._base import Backend
from ._nsjail import NsjailBackend, nsjail_probe
from ._process import ProcessBackend

__all__ = ["Backend", "get_backend", "BACKENDS"]

BACKENDS = ("auto", "nsjail", "process")
_lock = threading.Lock()
_cache: dict[str, Backend] = {}
_warned = False


def get_backend(name: str = "auto") -> Backend:
    """The backend called ``name``; ``auto`` = nsjail if it works here, else the process fallback."""
    global _warned
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    with _lock:
        if name in _cache:
            return _cache[name]
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
