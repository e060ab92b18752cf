"""The landlock backend: jailcell's zygote, nurseries and cells as on nsjail, with no namespaces, in a
Landlock domain and under a seccomp filter that the zygote builds around itself before anything runs
(``_injail/_landlock.py``).  For where nsjail cannot create namespaces: containers with the runtime's
default seccomp profile, Ubuntu 23.10+ with AppArmor's user-namespace restriction, hosts without
unprivileged user namespaces.  What differs from nsjail is listed in every Result's
``isolation["degraded"]``.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
from typing import Any

from .._errors import BackendUnavailable
from .._policy import MIB, Policy
from . import userns_creatable
from ._base import (
    HOST_SHORTAGES,
    JAIL_SRC,
    Backend,
    Spawned,
    make_root,
    preload_allowance,
    refusal,
    remove_root,
    slim_processes,
    zygote_argv,
)
from ._cgroups import CgroupJails, Cgroups
from ._disk import DiskWatch
from ._layout import python_layout
from ._nsjail import JAIL_UID, nobody_reaches, ro_mounts, unreadable_for_jail

MIN_ABI = 1
SCOPED_ABI = 6     # signals and abstract unix sockets scoped to the domain
NET_ABI = 4        # TCP bind/connect rules
DEVICES = ("/dev/null", "/dev/zero", "/dev/full")
# As root, each jail runs as a uid of its own drawn from here (no account has one): RLIMIT_NPROC, which
# counts a uid's processes, is then the jail's own process bound where there are no cgroups (a container),
# and no two jails share a uid.
OWN_UIDS = (1 << 30, 1 << 24)  # first, how many
READ_EXTRA = ("/etc/ld.so.cache", "/etc/localtime", "/sys/devices/system/cpu", "/dev/urandom", "/dev/random")


def landlock_abi() -> int:
    """The kernel's Landlock ABI (0: not available or disabled)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        v = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except (OSError, AttributeError):
        return 0
    return int(v) if v > 0 else 0


def landlock_unavailable() -> str | None:
    """Why this machine cannot build landlock jails, or None."""
    version = landlock_abi()
    if version < MIN_ABI:
        try:
            with open("/sys/kernel/security/lsm") as f:
                lsms = f.read().strip()
        except OSError:
            lsms = "unknown"
        return (f"Landlock is not available (kernel {os.uname().release}, active LSMs: {lsms}); it needs Linux 5.13+ "
                "with CONFIG_SECURITY_LANDLOCK and 'landlock' in the lsm= boot parameter")
    return None


class LandlockBackend(CgroupJails, Backend):
    name = "landlock"

    def __init__(self) -> None:
        why = landlock_unavailable()
        if why:
            raise BackendUnavailable(refusal(why))
        self.abi = landlock_abi()
        # As root, jails run as nobody, as nsjail's do: root's powers (any file's metadata, any process's
        # signals on kernels without Landlock's scoping) are not the jail's.
        # Where nobody cannot reach this Python (e.g. under root's 0700 home), they run as uid 0 with no
        # capabilities at all (and no way to regain them): root's powers are gone, its uid stays.
        self.as_root = os.geteuid() == 0
        self.as_nobody = self.as_root and not unreadable_for_jail(ro_mounts(), True) and nobody_reaches(ro_mounts())
        self.own_uids = self.as_nobody and _mapped(*OWN_UIDS)  # else host nobody, shared by every jail
        self.cgroups = Cgroups.detect()
        # Not root and no cgroups: where a user namespace can be made (Ubuntu's AppArmor restriction lets
        # one be made, only without powers), each jail gets its own, in which the kernel counts its
        # processes apart from this user's others (RLIMIT_NPROC is counted per user namespace).
        self.own_userns = not self.as_root and not self.cgroups.version and userns_creatable()
        # Else, where RLIMIT_NPROC would count processes the jail shares (this user's; host nobody's, shared
        # by every jail), the zygote counts the jail's own, answering each fork (seccomp user notification).
        self.count_forks = not self.cgroups.version and not self.own_uids and not self.own_userns
        if self.as_root and not self.as_nobody and not self.cgroups.version:
            # uid 0 is exempt from RLIMIT_NPROC even without capabilities: nothing would bound the processes
            raise BackendUnavailable(refusal(
                f"jailcell runs as root, no other user can reach {python_layout().describe()} (a folder above it is "
                f"not searchable by others, e.g. /root), and there are no cgroups ({self.cgroups.reason}): jails "
                "would run as uid 0, which no process limit binds. Fix: install Python where every user can "
                "reach it (/usr, /opt, a venv outside /root), or give jailcell cgroups"))

    def spawn(self, policy: Policy, *, session: bool, stderr: Any, channel: int) -> Spawned:
        lim = policy.limits
        root, workspace, tmp = make_root()
        uid = (OWN_UIDS[0] + secrets.randbelow(OWN_UIDS[1])) if self.own_uids else JAIL_UID
        if self.as_nobody:
            for path in (root, workspace, tmp):
                os.chown(path, uid, uid)
        dirs = None
        entry_fds: list[int] = []
        pids = lim.pids + 3 + slim_processes(policy, session)
        if self.cgroups.version:
            dirs = self.cgroups.create(preload_allowance(policy), pids)
            try:
                entry_fds = self.cgroups.entry_fds(dirs)
            except OSError:
                self.cgroups.remove(dirs)
                shutil.rmtree(root, ignore_errors=True)
                raise
        # The jail's own process bound: its cgroup; RLIMIT_NPROC where its uid or user namespace is its own;
        # else the zygote's count of its forks (an RLIMIT_NPROC there would count what others share)
        nproc = pids + 1 if dirs is None and (self.own_uids or self.own_userns) else None

        # No preexec_fn (which makes subprocess fork the whole host, and run Python in the child): the
        # user is set by subprocess itself; the zygote sets its limits and, as root where it must, drops
        # its capabilities, first thing once it has its config (it forks nothing before; verify()
        # checks that it holds no capability).
        user: dict[str, Any] = {"user": uid, "group": uid, "extra_groups": []} if self.as_nobody else {}

        layout = python_layout()
        config = self.zygote_config(policy, session=session, workspace=workspace, tmp=tmp,
                                    pid_namespace=False, rlimit_as=dirs is None)
        config["enter_cgroups"] = len(entry_fds)
        config["drop_capabilities"] = self.as_root and not self.as_nobody
        config["own_userns"] = self.own_userns
        config["count_forks"] = pids if self.count_forks else 0
        config["rlimits"] = {"core": 0, "fsize": lim.file_size_mib * MIB, "nofile": lim.open_files,
                             **({"nproc": nproc} if nproc else {})}
        config["landlock"] = {
            "read": [*ro_mounts(), str(JAIL_SRC), os.path.dirname(os.path.realpath(layout.python)), *READ_EXTRA],
            "write": [root],
            "devices": list(DEVICES),
            "network": bool(policy.network),
            "probe": _probe_paths(root),
            "count_forks": self.count_forks,
            "abi": self.abi,
        }
        env = self.env(policy, tmp=tmp, home=workspace)
        disk = DiskWatch(root, lim.workspace_mib * MIB, lim.tmp_mib * MIB)
        try:
            proc = subprocess.Popen(
                zygote_argv(layout.python, str(JAIL_SRC / "zygote.py")),
                stdin=channel, stdout=channel, stderr=stderr, env=env, cwd=workspace,
                close_fds=True, start_new_session=True, **user,
            )
        except OSError as exc:
            disk.close()
            for fd in entry_fds:
                os.close(fd)
            if dirs is not None:
                self.cgroups.remove(dirs)
            shutil.rmtree(root, ignore_errors=True)
            if exc.errno in HOST_SHORTAGES:  # this process is out of something: not the backend's fault
                raise
            raise BackendUnavailable(f"cannot start the jail's Python ({layout.python}): {exc}") from None
        return Spawned(proc, config, {"root": root, "cgroups": dirs}, config_fds=entry_fds, disk=disk)

    def admit(self, spawned: Spawned, pid: int) -> None:
        if spawned.cleanup.get("cgroups") is None:
            return
        if pid != spawned.proc.pid:  # the HELLO must come from the process started here
            raise OSError(f"the process that said hello (host pid {pid}) is not the one started here "
                          f"(pid {spawned.proc.pid})")
        spawned.cleanup["zygote"] = pid
        if not spawned.config_fds:  # cgroup v2: moved from here
            self.cgroups.enter(spawned.cleanup["cgroups"], pid)

    def verify(self, ready: dict[str, Any]) -> str | None:
        sees = ready.get("sees")
        if not isinstance(sees, dict) or not isinstance(sees.get("landlock"), dict):
            return refusal("the jail's first process did not build its Landlock domain")
        readable = sees.get("readable")
        if not isinstance(readable, list) or readable:
            return refusal(f"the landlock jail can read what it must not: {readable!r:.300}")
        if self.own_userns and sees.get("uid_map") != "":
            return refusal("the landlock jail's first process did not enter a user namespace of its own")
        if self.count_forks and sees["landlock"].get("forks_counted") is not True:
            return refusal("the landlock jail's first process could not stack the filter that counts its forks")
        if sees.get("capabilities") != 0:
            return refusal(f"the landlock jail's first process holds capabilities ({sees.get('capabilities')!r:.40})")
        return None

    def start_failure(self, jail_log: str) -> str | None:
        for line in jail_log.splitlines():
            if "cannot build the landlock jail" in line:
                return refusal(line.removeprefix("jailcell: ") + " (is jailcell itself running under a seccomp "
                               "profile that refuses Landlock's system calls?)")
        return None

    def teardown(self, spawned: Spawned) -> None:
        super().teardown(spawned)
        remove_root(spawned)

    def isolation(self, policy: Policy) -> dict[str, Any]:
        cg = self.cgroups.version
        degraded = [
            "no pid namespace: the jail shares this machine's process table; a cell reads no /proc at all, and "
            "cannot ptrace, read the memory of, or" + (" signal" if self.abi >= SCOPED_ABI else "") + " any process "
            "outside its Landlock domain (jailcell's own included)",
            "no mount namespace: files are confined by Landlock rules (and metadata calls by path are refused), "
            "not by a private file system view",
            "no tmpfs: the workspace's and TMPDIR's sizes are bounded by a watch that stops the run once either "
            "holds more than the policy allows (a write over it is not refused with ENOSPC, as on a tmpfs; a "
            "sparse file counts at its size; files unlinked while open are not counted: each is bounded by "
            "RLIMIT_FSIZE, and a run is stopped if the host's file system gets nearly full while it goes on)",
        ]
        if not policy.network:
            degraded.append("no network namespace: socket() is refused by seccomp"
                            + (" and TCP by Landlock" if self.abi >= NET_ABI else ""))
        if self.abi < SCOPED_ABI:
            degraded.append(f"Landlock ABI {self.abi} < {SCOPED_ABI} cannot scope signals: a cell may signal only its "
                            "own process group (kill(0, ...)), no process by pid (Linux 6.12+ lifts this)")
        if not cg:
            processes = ("RLIMIT_NPROC of the jail's own uid" if self.own_uids else
                         "RLIMIT_NPROC, counted in the jail's own user namespace" if self.own_userns else
                         "the jail's zygote, which answers each fork (seccomp user notification: a fork costs a "
                         "round trip to it)")
            degraded.append("no cgroups: memory bounded by RLIMIT_AS per process, not per jail (memfd_create "
                            f"refused); processes by {processes} ({self.cgroups.reason})")
        return {
            "backend": "landlock",
            "namespaces": [],
            "landlock_abi": self.abi,
            "user": (f"a host uid of the jail's own ({OWN_UIDS[0]} and up, no account's), because jailcell runs as "
                     "root" if self.own_uids else
                     f"host uid {JAIL_UID} (nobody), because jailcell runs as root" if self.as_nobody else
                     "host uid 0 without any capability (jailcell runs as root; nobody cannot reach this Python)"
                     if self.as_root else f"host uid {os.getuid()} (same user as jailcell)"),
            "seccomp": True,
            "cgroup": cg,
            "memory_limit": "cgroup" if cg else "rlimit_as",
            "pids_limit": "cgroup" if cg else "rlimit_nproc (the jail's own uid)" if self.own_uids else
                          "rlimit_nproc (the jail's own user namespace)" if self.own_userns else
                          "seccomp (forks counted by the jail's zygote)",
            "network": "host network (policy enables it)" if policy.network else "none (no sockets; TCP denied)",
            "filesystem": "read-only interpreter and libraries; private workspace and TMPDIR; nothing else of the host",
            "rlimits": ["cpu", "fsize", "nofile", "core=0"] + ([] if cg else ["as"])
                       + (["nproc"] if not cg and not self.count_forks else []),
            "degraded": degraded,
        }


def _mapped(first: int, count: int) -> bool:
    """Whether uids and gids ``first`` .. ``first + count - 1`` exist in this user namespace (a rootless
    container maps only a few)."""
    for name in ("uid_map", "gid_map"):
        try:
            with open(f"/proc/self/{name}") as f:
                ranges = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
        except (OSError, ValueError):
            return False
        if not any(inside <= first and first + count <= inside + n for inside, _outside, n in ranges):
            return False
    return True


def _probe_paths(root: str) -> list[str]:
    """Paths the jail must not read, checked from inside at every start: the host's /tmp (the jail's
    own folder is below it), $HOME, /etc, /root."""
    paths = [os.path.dirname(root), "/etc", "/etc/passwd", "/root", "/proc/1/cmdline", f"/proc/{os.getpid()}/environ"]
    home = os.path.expanduser("~")
    if home not in ("/", "") and os.path.isdir(home) and not any(
            home == m or home.startswith(m.rstrip("/") + "/") for m in ro_mounts()):
        paths.append(home)
    return paths
