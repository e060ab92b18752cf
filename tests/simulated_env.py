"""Launch a command as it would run where users are, on a machine that has neither Docker nor AppArmor:

- ``ubuntu``: Ubuntu 23.10+'s AppArmor restriction, as an unprivileged user sees it: a user namespace
  can be made but not used (here: any other namespace, in it or with it, is refused).
- ``docker=PROFILE``: a container (Docker, Podman, Kubernetes RuntimeDefault): a Docker seccomp profile
  file (JSON) installed as Docker installs it for a container with Docker's default capabilities
  (libseccomp; rules chosen by those capabilities and this machine's architecture), and root's
  capabilities cut to that default set.  ``docker=PROFILE,ro-cgroups`` also makes (as root) the cgroup
  file systems read-only, as Docker mounts them, in a mount namespace of the launcher's own (the
  machine's stay as they are); ``,masked-proc`` also hides parts of /proc there, as Docker and Podman do.  ``tests/data/docker-default-seccomp.json``
  is Docker's own default profile (moby/profiles seccomp/default.json at 3c28324, Apache-2.0).

Usage: python simulated_env.py MODE -- COMMAND [ARGS...]   (installs the filter, then execs COMMAND)
"""

from __future__ import annotations

import ctypes
import os
import sys

from jailcell._injail._seccomp import (
    ARCHES,
    JSET,
    LD_ABS,
    RET,
    RET_ALLOW,
    RET_EPERM,
    X32_BIT,
    _arg_lo,
    _Asm,
    install_program,
)

JEQ = 0x15
RET_ENOSYS = 0x00050000 | 38
NR = {"x86_64": {"clone": 56, "clone3": 435, "unshare": 272}, "aarch64": {"clone": 220, "clone3": 435, "unshare": 97}}
CLONE_NEWUSER = 0x10000000
OTHER_NAMESPACES = 0x7E020000 & ~CLONE_NEWUSER  # mount, uts, ipc, pid, net, cgroup


def program(mode: str) -> bytes:
    machine = os.uname().machine
    audit, _ = ARCHES[machine]
    nr = NR[machine]
    a = _Asm()
    a.op(LD_ABS, 4)
    a.op(JEQ, audit, 0, "allow")
    a.op(LD_ABS, 0)
    a.op(JSET, X32_BIT, "allow", 0)
    if mode == "ubuntu":
        a.op(JEQ, nr["clone"], "clone", 0)
        a.op(JEQ, nr["unshare"], "unshare", 0)
        a.op(JEQ, nr["clone3"], "enosys", 0)
        a.op(RET, RET_ALLOW)
        a.label("clone")
        a.label("unshare")
        a.op(LD_ABS, _arg_lo(0))
        a.op(JSET, OTHER_NAMESPACES, "deny", "allow")  # a user namespace alone is made, nothing in it
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    a.label("allow")
    a.op(RET, RET_ALLOW)
    a.label("deny")
    a.op(RET, RET_EPERM)
    a.label("enosys")
    a.op(RET, RET_ENOSYS)
    return a.assemble()


# Docker's default capabilities (moby oci/caps/defaults.go): what root in a container keeps.
DOCKER_CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4, "CAP_KILL": 5,
               "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_RAW": 13,
               "CAP_SYS_CHROOT": 18, "CAP_MKNOD": 27, "CAP_AUDIT_WRITE": 29, "CAP_SETFCAP": 31}
DOCKER_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
SCMP_ACT_ALLOW, SCMP_ACT_KILL_PROCESS = 0x7FFF0000, 0x80000000
SCMP_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5,
            "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _applies(rule: dict, caps: set[str], arch: str) -> bool:
    """Docker's reading of a rule's includes/excludes, for a container with ``caps`` on ``arch``."""
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("caps") and not set(inc["caps"]) <= caps:
        return False
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if inc.get("minKernel"):
        want = tuple(int(x) for x in inc["minKernel"].split("."))
        have = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
        if have < want:
            return False
    if exc.get("caps") and set(exc["caps"]) & caps:
        return False
    return not (exc.get("arches") and arch in exc["arches"])


def install_docker_profile(path: str) -> None:
    """Load a Docker seccomp profile as Docker does (runc through libseccomp), for Docker's default caps."""
    import json

    profile = json.load(open(path))
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]

    def action(name: str, errno_ret: int | None) -> int:
        if name == "SCMP_ACT_ALLOW":
            return SCMP_ACT_ALLOW
        if name == "SCMP_ACT_ERRNO":
            return 0x00050000 | (errno_ret if errno_ret is not None else profile.get("defaultErrnoRet", 1))
        if name in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS"):
            return SCMP_ACT_KILL_PROCESS
        raise SystemExit(f"{path}: action {name} is not simulated")

    ctx = lib.seccomp_init(action(profile["defaultAction"], profile.get("defaultErrnoRet")))
    arch = DOCKER_ARCH[os.uname().machine]
    for rule in profile["syscalls"]:
        if not _applies(rule, set(DOCKER_CAPS), arch):
            continue
        act = action(rule["action"], rule.get("errnoRet"))
        args = rule.get("args") or []
        # Docker: conditions on distinct arguments are ANDed in one rule; several on one argument become
        # one rule each (ORed)
        groups = [args] if len({a["index"] for a in args}) == len(args) else [[a] for a in args]
        for name in rule["names"]:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # not a system call of this architecture: Docker skips it too
            for group in groups:
                cmps = (_ArgCmp * max(len(group), 1))(*[
                    _ArgCmp(a["index"], SCMP_OPS[a["op"]], a["value"], a.get("valueTwo", 0)) for a in group])
                if lib.seccomp_rule_add_array(ctx, act, nr, len(group), cmps) != 0:
                    raise SystemExit(f"{path}: libseccomp refused the rule for {name}: {rule}")
    if lib.seccomp_load(ctx) != 0:
        raise OSError(ctypes.get_errno(), "seccomp_load")


def _libc_mount():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    return libc


def private_mounts() -> None:
    """A mount namespace of this process's own (what is changed below stays out of the machine's)."""
    libc = _libc_mount()
    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(None, b"/", None, 16384 | (1 << 18), None) != 0:  # MS_REC | MS_PRIVATE
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")


def readonly_cgroups() -> None:
    """Every cgroup file system read-only (Docker's view)."""
    libc = _libc_mount()
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[2] in ("cgroup", "cgroup2")]
    for point in points:
        if libc.mount(None, point.encode(), None, 32 | 4096 | 1, None) != 0:  # MS_REMOUNT | MS_BIND | MS_RDONLY
            raise OSError(ctypes.get_errno(), f"remount {point} read-only")


def masked_proc() -> None:
    """In a mount namespace of this process's own, part of /proc hidden as Docker and Podman hide it
    (/dev/null over /proc/kcore and friends): the kernel then refuses a new /proc in any namespace made
    below (its "too revealing" rule), which is what nsjail meets in such a container."""
    libc = _libc_mount()
    for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list"):
        if os.path.exists(path) and libc.mount(b"/dev/null", path.encode(), None, 4096, None) != 0:  # MS_BIND
            raise OSError(ctypes.get_errno(), f"mask {path}")


def keep_only(caps: set[int]) -> None:
    """Every capability not in ``caps`` out of the bounding set and the process's own sets."""
    libc = ctypes.CDLL(None, use_errno=True)
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        if cap not in caps and libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    mask = sum(1 << c for c in caps)
    for i in range(3):  # effective, permitted, inheritable: their low words, then their high words
        data[i] &= mask & 0xFFFFFFFF
        data[i + 3] &= mask >> 32
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def main() -> None:
    mode, sep, *cmd = sys.argv[1:]
    if sep != "--" or not cmd:
        raise SystemExit(__doc__)
    if mode.startswith("docker="):
        profile, *options = mode.split("=", 1)[1].split(",")
        if os.geteuid() == 0:
            if options:
                private_mounts()
            if "ro-cgroups" in options:
                readonly_cgroups()
            if "masked-proc" in options:
                masked_proc()
            keep_only(set(DOCKER_CAPS.values()))
        install_docker_profile(profile)
        os.execvp(cmd[0], cmd)
    install_program(program(mode))
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
