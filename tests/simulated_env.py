"""Launch a command as it would run where users are, on a machine that has neither Docker nor AppArmor:

- ``container``: what a container runtime's default seccomp profile and capabilities do to a process
  (Docker, Podman, Kubernetes RuntimeDefault): clone with namespace flags refused, clone3 ENOSYS,
  unshare/setns/mount refused, CAP_SYS_ADMIN gone from every set (root stays root otherwise).
- ``ubuntu``: Ubuntu 23.10+'s AppArmor restriction, as an unprivileged user sees it: a user namespace
  cannot be used (here: creating one is refused).

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
NR = {"x86_64": {"clone": 56, "clone3": 435, "unshare": 272, "setns": 308, "mount": 165, "umount2": 166,
                 "pivot_root": 155},
      "aarch64": {"clone": 220, "clone3": 435, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39,
                  "pivot_root": 41}}
CLONE_NEWUSER = 0x10000000
NAMESPACES = 0x7E020000
CAP_SYS_ADMIN = 21


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
        a.op(JSET, CLONE_NEWUSER, "deny", "allow")
    elif mode == "container":
        a.op(JEQ, nr["clone3"], "enosys", 0)
        a.op(JEQ, nr["clone"], "clone", 0)
        for name in ("unshare", "setns", "mount", "umount2", "pivot_root"):
            a.op(JEQ, nr[name], "deny", 0)
        a.op(RET, RET_ALLOW)
        a.label("clone")
        a.op(LD_ABS, _arg_lo(0))
        a.op(JSET, NAMESPACES, "deny", "allow")
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    a.label("allow")
    a.op(RET, RET_ALLOW)
    a.label("deny")
    a.op(RET, RET_EPERM)
    a.label("enosys")
    a.op(RET, RET_ENOSYS)
    return a.assemble()


def drop_sys_admin() -> None:
    """CAP_SYS_ADMIN out of the bounding set and the process's own sets (as a container's root lacks it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, CAP_SYS_ADMIN, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for i in range(3):  # effective, permitted, inheritable (low words)
        data[i * 2] &= ~(1 << CAP_SYS_ADMIN)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def main() -> None:
    mode, sep, *cmd = sys.argv[1:]
    if sep != "--" or not cmd:
        raise SystemExit(__doc__)
    if mode == "container" and os.geteuid() == 0:
        drop_sys_admin()
    install_program(program(mode))
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
