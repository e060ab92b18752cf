"""Backends start jails.  ``auto`` (the default) is the strongest that works here: ``nsjail``
(namespaces), else ``landlock`` (Landlock + seccomp, no namespaces), else a refusal that names both
causes; ``process`` (no isolation) runs only when asked for by name."""

from __future__ import annotations

import functools
import os
import threading

from .._errors import BackendUnavailable, warn
from ._base import Backend, refusal
from ._nsjail import NsjailBackend, has_sys_admin, proc_status

__all__ = ["Backend", "get_backend", "refusal", "pidfd_support", "BACKENDS", "BACKEND_ENV", "UNSAFE_ROOT_ENV"]

BACKENDS = ("auto", "nsjail", "landlock", "process")
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

    ``auto`` is nsjail where it can create its namespaces here, else landlock where the kernel has it,
    else :class:`BackendUnavailable` naming both causes and the fixes -- never a jail with less than
    that.  (A policy's ``[isolation] minimum`` may still refuse the backend picked: see the engine.)
    ``process`` (no isolation from the host) is used only when asked for by name, and as root only
    with ``JAILCELL_UNSAFE_PROCESS_AS_ROOT=1`` too.
    """
    if name is None:
        name = os.environ.get(BACKEND_ENV) or "auto"
    if name not in BACKENDS:
        source = f" (from ${BACKEND_ENV})" if name == os.environ.get(BACKEND_ENV) else ""
        raise BackendUnavailable(f"unknown backend {name!r}{source}; choose one of {', '.join(BACKENDS)}")
    with _lock:
        if name in _cache:
            return _cache[name]
        ok, why = pidfd_support()
        if not ok:
            raise BackendUnavailable(why)
        made = None
        if name == "auto":
            picked, made = _pick()
        else:
            picked = name
        backend = _cache.get(picked) or made or _make(picked)
        _cache[picked] = _cache[name] = backend
        return backend


def _auto() -> str:
    """The name of the strongest backend that works here (``jailcell check`` reports it)."""
    return _pick()[0]


def _pick() -> tuple[str, Backend | None]:
    """The strongest backend that works here -- nsjail, else landlock -- (with nsjail's instance, made
    on the way), else the refusal naming both causes."""
    try:
        nsjail = NsjailBackend()
        cannot = namespaces_unavailable()
    except BackendUnavailable as exc:
        nsjail, cannot = None, str(exc)
    if cannot is None:
        return "nsjail", nsjail
    from ._landlock import landlock_unavailable

    lacking = landlock_unavailable()
    if lacking is None:
        return "landlock", None
    raise BackendUnavailable(refusal(f"nsjail cannot create its namespaces here ({cannot}), and {lacking}"))


def _make(name: str) -> Backend:
    if name == "process":
        if os.geteuid() == 0 and os.environ.get(UNSAFE_ROOT_ENV) != "1":
            raise BackendUnavailable(
                "the process backend runs programs without any isolation, and jailcell runs as root: a "
                "program could read, change or kill anything on this machine. Use the nsjail backend "
                "(`jailcell check` says what it needs), or run jailcell as an unprivileged user; if you "
                f"really mean it, set {UNSAFE_ROOT_ENV}=1 as well")
        from ._process import ProcessBackend  # only when asked for by name: not on every `jailcell run`

        warn("jailcell: the process backend gives NO isolation: programs can read this user's files "
             "and use the network (asked for by name)")
        return ProcessBackend()
    if name == "landlock":
        from ._landlock import LandlockBackend

        return LandlockBackend()
    try:  # each jail is checked from inside as it starts (Backend.verify), before any program
        return NsjailBackend()
    except BackendUnavailable as exc:
        raise BackendUnavailable(refusal(str(exc))) from None


def _surely_namespaces() -> bool:
    """The common case without a fork (~0.1 ms, on every `jailcell run`): no seccomp filter on this process
    and, as root, CAP_SYS_ADMIN; as a user, user namespaces neither off nor restricted by AppArmor."""
    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return ""

    status = proc_status()
    if status.get("Seccomp", "").strip() != "0":
        return False
    if os.geteuid() == 0:
        return has_sys_admin(status)
    return (read("/proc/sys/kernel/unprivileged_userns_clone").strip() in ("", "1")
            and read("/proc/sys/user/max_user_namespaces").strip() not in ("", "0")
            and read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").strip() in ("", "0"))


_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18


def namespaces_unavailable() -> str | None:
    """Why nsjail could not create its namespaces here, or None -- asked of the kernel in a throwaway
    child (~1 ms): as root with CAP_SYS_ADMIN, new mount/pid/net namespaces; otherwise (a user, or root in a
    container without CAP_SYS_ADMIN, where nsjail uses a user namespace too) a user namespace first and then
    those inside it (Ubuntu's AppArmor restriction lets the first through and refuses the rest; a container's
    default seccomp profile refuses the first)."""
    if _surely_namespaces():
        return None
    code, userns = _namespace_probe()
    if code == 0:
        return None
    if code == -1:
        return "the namespace probe died"
    if code >= 2000:
        return (f"namespaces are created but a /proc cannot be mounted in them ({os.strerror(code - 2000)}): a "
                "container that masks parts of its own /proc (Docker's and Podman's defaults); nsjail needs it "
                "unmasked (`--security-opt systempaths=unconfined` with Docker, `--security-opt unmask=/proc/*` "
                "with Podman)")
    if code < 1000 and os.geteuid() == 0:
        return (f"creating a user namespace is refused ({os.strerror(code)}): jailcell runs as root without "
                "CAP_SYS_ADMIN (a container) and the container's seccomp profile refuses namespaces (Docker's "
                "default does); jailcell's container profile allows them (`jailcell check --container-profile`)")
    if code < 1000:
        return f"creating a user namespace is refused ({os.strerror(code)}): unprivileged user namespaces are off"
    refused = os.strerror(code - 1000)
    if os.geteuid() == 0 and not userns:
        return (f"creating mount/pid/network namespaces is refused ({refused}): inside a container without "
                "CAP_SYS_ADMIN, or a seccomp profile that forbids them")
    if os.geteuid() == 0:
        return (f"a user namespace is created but namespaces inside it are refused ({refused}): a container whose "
                "seccomp profile forbids them; jailcell's container profile allows them "
                "(`jailcell check --container-profile`)")
    return (f"a user namespace is created but namespaces inside it are refused ({refused}): Ubuntu 23.10+'s AppArmor "
            "restriction of unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1)")


def userns_creatable() -> bool:
    """Whether this process may make a user namespace (for the landlock jail's own process count): what
    the namespace probe found (Ubuntu's AppArmor restriction lets one be made, not used)."""
    if _surely_namespaces():
        return True
    code, userns = _namespace_probe()
    return userns and (code == 0 or code >= 1000)


@functools.lru_cache(maxsize=1)
def _namespace_probe() -> tuple[int, bool]:
    """(0, or where it failed: errno of the user namespace, 1000 + errno of the others, 2000 + errno of
    /proc's mount, -1: the probe died; whether it made a user namespace first), once per process."""
    import ctypes

    userns = os.geteuid() != 0 or not has_sys_admin()  # decided before the fork: no file reads in the child

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # only system calls here: no Python-level locks after a fork from a threaded process
        try:
            err = 0
            if userns and libc.unshare(_CLONE_NEWUSER) != 0:
                err = ctypes.get_errno() or 1
            elif libc.unshare(_CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET) != 0:
                err = 1000 + (ctypes.get_errno() or 1)
            else:  # as nsjail does next: a /proc of the new pid namespace (a container that masks
                inner = os.fork()  # parts of its own /proc refuses that: "too revealing")
                if inner == 0:
                    code = 0
                    if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0 or libc.mount(
                            b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None) != 0:
                        code = ctypes.get_errno() or 1
                    os._exit(code)
                ended = os.waitstatus_to_exitcode(os.waitpid(inner, 0)[1])
                err = 2000 + (ended if ended > 0 else 255) if ended else 0
            os.write(w, str(err).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        answer = os.read(r, 32).decode() or "-1"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return int(answer), userns
