"""Cgroup v1 / v2 support: one directory per jail, created before nsjail and removed after.

jailcell owns ``<controller mount>/jailcell/<host pid>-<n>`` (v1: under the memory and pids
hierarchies; v2: under the unified hierarchy).  nsjail is given no cgroup options: the jail's
zygote enters the directory before it forks anything, so every process of the jail is born in
it.  nsjail's own move of the jail into a cgroup of its making sat on the start's critical path,
and a move of another process between cgroups waits for an RCU grace period (6-22 ms measured
here).  On v1 the zygote moves itself, through the ``tasks`` files the host opened for it
(:meth:`Cgroups.entry_fds`): 0.06 ms.  v2 has no such move; the host moves the zygote
(:meth:`Cgroups.enter`) while it imports its modules.  jailcell tightens the memory limit once
the zygote has preloaded its modules (limit = warm baseline + the policy's memory), and reads
OOM-kill counters from the directory.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

ROOT_NAME = "jailcell"
SWEEP_EVERY_S = 60.0  # how often jail creation looks for cgroups left by dead jailcell processes
_counter = itertools.count(1)


def _mounts() -> list[tuple[str, str, set[str]]]:
    out = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4:
                    out.append((parts[2], parts[1], set(parts[3].split(","))))
    except OSError:
        pass
    return out


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


class CgroupDirs:
    """The directories of one jail (v1: memory + pids; v2: one unified directory)."""

    __slots__ = ("memory", "pids")

    def __init__(self, memory: Path, pids: Path) -> None:
        self.memory = memory
        self.pids = pids

    def __repr__(self) -> str:
        return f"CgroupDirs(memory={str(self.memory)!r}, pids={str(self.pids)!r})"

    def all(self) -> list[Path]:
        return list(dict.fromkeys([self.memory, self.pids]))


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class Cgroups:
    """What cgroup support this machine gives jailcell, and operations on jail directories."""

    def __init__(self, version: str | None, memory_root: Path | None, pids_root: Path | None,
                 mount: Path | None, reason: str) -> None:
        self.version = version
        self.memory_root = memory_root  # .../memory/jailcell (v1) or .../jailcell (v2)
        self.pids_root = pids_root
        self.mount = mount
        self.reason = reason
        self.memsw = version == "v1" and memory_root is not None \
            and (memory_root / "memory.memsw.limit_in_bytes").exists()
        self._swept = -SWEEP_EVERY_S

    # -- detection -----------------------------------------------------------------------------

    @classmethod
    def detect(cls) -> "Cgroups":
        mounts = _mounts()
        v1 = {opt: Path(mp) for fstype, mp, opts in mounts if fstype == "cgroup" for opt in opts & {"memory", "pids"}}
        v2 = [Path(mp) for fstype, mp, _ in mounts if fstype == "cgroup2"]
        reasons = []
        if "memory" in v1 and "pids" in v1:
            try:
                mem, pids = v1["memory"] / ROOT_NAME, v1["pids"] / ROOT_NAME
                mem.mkdir(exist_ok=True)
                pids.mkdir(exist_ok=True)
                if not (os.access(mem, os.W_OK | os.X_OK) and os.access(pids, os.W_OK | os.X_OK)):
                    raise PermissionError(errno.EACCES, "Permission denied")
                return cls("v1", mem, pids, None, "cgroup v1 memory and pids controllers")
            except OSError as exc:
                why = "needs root"
                if exc.errno == errno.EROFS or _read_only(v1["memory"]):
                    why = "mounted read-only, as a container runtime mounts it"
                    exc.strerror = "Read-only file system"
                reasons.append(f"cgroup v1: cannot create {v1['memory'] / ROOT_NAME}: {exc.strerror} ({why})")
        for mount in v2:
            try:
                controllers = set(_read(mount / "cgroup.controllers").split())
            except OSError:
                continue
            if not {"memory", "pids"} <= controllers:
                have = " ".join(sorted(controllers)) or "none"
                reasons.append(f"cgroup v2 at {mount}: memory/pids controllers not available here ({have})")
                continue
            base = cls._v2_base(mount)
            if base is None:
                reasons.append(
                    f"cgroup v2 at {mount}: no writable cgroup for this user; run as root or under "
                    "`systemd-run --user --scope -p Delegate=yes jailcell ...`"
                )
                continue
            return cls("v2", base, base, mount, f"cgroup v2 at {base}")
        if not mounts or (not v1 and not v2):
            reasons.append("no cgroup filesystem is mounted (inside an unprivileged container?)")
        return cls(None, None, None, None, "; ".join(reasons) or "no usable cgroup controllers")

    @staticmethod
    def _v2_base(mount: Path) -> Path | None:
        """A directory under which jailcell may create jail cgroups with memory+pids enabled."""
        candidates = []
        if os.geteuid() == 0:
            candidates.append((mount, mount / ROOT_NAME))
        try:
            own = _read(Path("/proc/self/cgroup")).strip().splitlines()
            rel = next(line.split("::", 1)[1] for line in own if line.startswith("0::"))
            own_dir = mount / rel.lstrip("/")
            candidates.append((own_dir.parent, own_dir.parent / f"{ROOT_NAME}-{os.getuid()}"))
        except (OSError, StopIteration):
            pass
        for parent, base in candidates:
            try:
                _write(parent / "cgroup.subtree_control", "+memory +pids")
                base.mkdir(exist_ok=True)
                _write(base / "cgroup.subtree_control", "+memory +pids")
                if os.access(base, os.W_OK | os.X_OK):
                    return base
            except OSError:
                continue
        return None

    # -- per jail ------------------------------------------------------------------------------

    def create(self, memory_bytes: int, pids: int) -> CgroupDirs:
        assert self.version is not None and self.memory_root and self.pids_root
        if time.monotonic() - self._swept > SWEEP_EVERY_S:
            self._swept = time.monotonic()
            self.sweep_stale()
        name = f"{os.getpid()}-{next(_counter)}"
        dirs = CgroupDirs(self.memory_root / name, self.pids_root / name)
        for d in dirs.all():
            d.mkdir()
        self.set_memory(dirs, memory_bytes)
        _write(dirs.pids / "pids.max", str(pids))
        return dirs

    def set_memory(self, dirs: CgroupDirs, limit: int) -> None:
        if self.version == "v2":
            _write(dirs.memory / "memory.max", str(limit))
            try:
                _write(dirs.memory / "memory.swap.max", "0")
            except OSError:
                pass
            return
        cur = int(_read(dirs.memory / "memory.limit_in_bytes"))
        files = ["memory.limit_in_bytes"] + (["memory.memsw.limit_in_bytes"] if self.memsw else [])
        # memsw must stay >= the memory limit at every step.
        for fname in (files if limit < cur else reversed(files)):
            _write(dirs.memory / fname, str(limit))

    def usage(self, dirs: CgroupDirs) -> int:
        name = "memory.current" if self.version == "v2" else "memory.usage_in_bytes"
        return int(_read(dirs.memory / name))

    def oom_kills(self, dirs: CgroupDirs) -> int:
        """OOM kills in the jail so far."""
        return _oom_count(dirs.memory / ("memory.events" if self.version == "v2" else "memory.oom_control"))

    def entry_fds(self, dirs: CgroupDirs) -> list[int]:
        """v1: the jail's ``tasks`` files, open for writing, for the zygote: a thread that writes "0"
        there moves itself, which the kernel does without the global lock a move of another process
        takes (0.06 ms instead of 6-22 ms measured).  The file keeps the rights of who opened it.
        v2 has no such move (``cgroup.procs`` moves whole processes): none, and the host moves the
        zygote (:meth:`enter`)."""
        if self.version != "v1":
            return []
        fds: list[int] = []
        try:
            for d in dirs.all():
                fds.append(os.open(d / "tasks", os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def holds(self, dirs: CgroupDirs, pid: int) -> bool:
        """Whether process ``pid`` is in every one of the jail's cgroups.  OSError when a list cannot be
        read (out of file descriptors, say): that is not the answer "no"."""
        return all(pid in [int(x) for x in _read(d / "cgroup.procs").split()] for d in dirs.all())

    def enter(self, dirs: CgroupDirs, pid: int) -> None:
        """Move process ``pid`` (a zygote that has forked nothing yet) into the jail's cgroups;
        its children are then born in them.  OSError when the kernel refuses."""
        for d in dirs.all():
            _write(d / "cgroup.procs", str(pid))

    def remove(self, dirs: CgroupDirs) -> None:
        """Kill whatever is still in the jail's cgroups and remove them (nothing is left behind)."""
        for d in dirs.all():
            _remove_tree(d)

    def stale(self) -> list[Path]:
        """Jail cgroups whose jailcell process no longer exists (e.g. kill -9)."""
        found = []
        for root in {self.memory_root, self.pids_root}:
            if root is None or not root.is_dir():
                continue
            for d in root.iterdir():
                owner = d.name.split("-", 1)[0]
                if d.is_dir() and owner.isdigit() and not _alive(int(owner)):
                    found.append(d)
        return found

    def sweep_stale(self) -> list[Path]:
        """Remove jail cgroups left by jailcell processes that no longer exist; returns the ones that
        are still there (a jail inside has not ended yet)."""
        found = self.stale()
        for d in found:
            _remove_tree(d)
        return [d for d in found if d.exists()]


def _oom_count(path: Path) -> int:
    try:
        for line in _read(path).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _alive(pid: int) -> bool:
    """Whether jailcell process ``pid`` still runs: a zombie does not (a killed Ray worker whose
    parent died first stays one until its new parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] not in (b"Z", b"X")
    except (OSError, ValueError):
        return True


def _procs(d: Path) -> list[int]:
    try:
        return [int(x) for x in _read(d / "cgroup.procs").split()]
    except (OSError, ValueError):
        return []


def _remove_tree(d: Path) -> None:
    for _ in range(100):
        children = [c for c in d.iterdir() if c.is_dir()] if d.is_dir() else []
        for c in children:
            _remove_tree(c)
        if (d / "cgroup.kill").exists():
            try:
                _write(d / "cgroup.kill", "1")
            except OSError:
                pass
        for pid in _procs(d):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                return
        time.sleep(0.01)


class CgroupJails:
    """What a backend whose jails get jailcell's cgroups does with them after the zygote said hello
    (nsjail and landlock): check it is in them, set the memory limit past its preloads, count OOM
    kills, remove them.  Needs ``self.cgroups``; ``spawn`` puts the dirs in ``cleanup["cgroups"]``."""

    cgroups: Cgroups

    def after_ready(self, spawned: Any, policy: Any) -> None:
        from .._errors import BackendUnavailable
        from .._policy import MIB
        from ._base import refusal

        dirs = spawned.cleanup.get("cgroups")
        if dirs is None:
            return
        zygote = spawned.cleanup.get("zygote")
        if zygote is None or not self.cgroups.holds(dirs, zygote):  # whoever moved it: it must be there
            raise BackendUnavailable(refusal(f"the jail's first process (host pid {zygote}) is not in its cgroups "
                                             f"({', '.join(map(str, dirs.all()))})"))
        baseline = self.cgroups.usage(dirs)
        spawned.cleanup["baseline"] = baseline
        self.cgroups.set_memory(dirs, baseline + policy.limits.memory_mib * MIB)

    def oom_kills(self, spawned: Any) -> int:
        dirs = spawned.cleanup.get("cgroups")
        return self.cgroups.oom_kills(dirs) if dirs is not None else 0

    def teardown(self, spawned: Any) -> None:
        dirs = spawned.cleanup.pop("cgroups", None)
        if dirs is not None:
            self.cgroups.remove(dirs)
