"""The cell's own seccomp filter: what a cell may do to processes other than its own.

nsjail's filter covers the whole jail, the zygote and the nursery included; this one is stacked
on top of it in the processes that fork cells (the nursery, a session's first holder) before
any cell exists: filters only ever add restrictions and are inherited by every fork, so each
cell and everything its program starts has it.  The filter names no pid (the same program fits
every process), so it is installed once per jail, not once per cell.  A cell shares
its uid and pid namespace with the jail's own processes (zygote, nursery, spares waiting for the
next runs), so without it a program could reach them by pid:

- resource limits (``prlimit``: RLIMIT_CPU=1 on the zygote, RLIMIT_FSIZE=0 on the nursery, which
  every later cell would inherit), scheduling (``setpriority``, ``sched_set*``, ``ioprio_set``),
  CPU affinity and memory placement (``migrate_pages``, ``move_pages``) of another process:
  allowed only on the calling process itself, named as pid 0 (``resource.setrlimit``,
  ``os.sched_setaffinity(0, ...)``, ``os.nice``); naming any pid, even one's own, is EPERM;
- ``kcmp`` (comparing another process's open files): denied;
- signals to every process at once (``kill(-1)``) or to a process group, by any route: ``kill`` and
  ``rt_sigqueueinfo`` with a negative pid, ``fcntl(F_SETOWN)`` with a negative owner (SIGIO or the
  ``F_SETSIG`` signal, e.g. SIGSTOP, sent to a group when a file is ready), ``F_SETOWN_EX`` and the
  ``FIOSETOWN``/``SIOCSPGRP``/``TIOCSPGRP`` ioctls (their owner sits behind a pointer the filter
  cannot read), and joining another process group (``setpgid`` with a non-zero group: a cell that
  joined the nursery's group would reach it with ``kill(0)``): denied.  A cell leads its own
  process group, and ``kill(0)`` reaches it.  A signal to a single pid is still delivered: the
  jail's processes ignore every signal they can, and recover from SIGKILL and SIGSTOP (a killed
  nursery or spare is replaced; stopped ones are continued by the sweep), so it cannot change a
  later run's result;
- another process's memory and files: ``ptrace``, ``process_vm_readv``/``writev`` and
  ``pidfd_getfd`` are denied (the jail's own processes are never dumpable either, which the
  kernel checks for all of them and for ``/proc/<pid>/mem``), and so is making oneself dumpable
  (``prctl(PR_SET_DUMPABLE, 1)``: a session's cell becomes the holder of its state);
- ``io_uring``, whose operations no seccomp filter sees: denied.

Any other architecture's system calls (``int 0x80`` on x86_64, x32) are denied: the filter's
numbers are the native architecture's only.  Unknown native architectures get no cell filter
(nsjail's filter still applies).  Standard library only: this module runs inside the jail.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import os
import struct

# Builtins of its own (as every in-jail module): a program that replaces builtins.len does not change
# what this code sees.
__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]

PR_SET_SECCOMP, SECCOMP_MODE_FILTER, PR_SET_NO_NEW_PRIVS = 22, 2, 38
RET_ALLOW = 0x7FFF0000
RET_EPERM = 0x00050000 | errno.EPERM
LD_ABS, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06
X32_BIT = 0x40000000

# (AUDIT_ARCH, {name: number})
ARCHES = {
    "x86_64": (0xC000003E, {
        "kill": 62, "rt_sigqueueinfo": 129, "prlimit64": 302, "setpriority": 141, "sched_setparam": 142,
        "sched_setscheduler": 144, "sched_setaffinity": 203, "sched_setattr": 314, "ioprio_set": 251,
        "migrate_pages": 256, "move_pages": 279, "kcmp": 312, "setpgid": 109, "fcntl": 72, "ioctl": 16,
        "prctl": 157, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "memfd_create": 319}),
    "aarch64": (0xC00000B7, {
        "kill": 129, "rt_sigqueueinfo": 138, "prlimit64": 261, "setpriority": 140, "sched_setparam": 118,
        "sched_setscheduler": 119, "sched_setaffinity": 122, "sched_setattr": 274, "ioprio_set": 30,
        "migrate_pages": 238, "move_pages": 239, "kcmp": 272, "setpgid": 154, "fcntl": 25, "ioctl": 29,
        "prctl": 167, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_getfd": 438,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "memfd_create": 279}),
}
PRIO_PROCESS, IOPRIO_WHO_PROCESS = 0, 1
SELF_ONLY = ("prlimit64", "sched_setparam", "sched_setscheduler", "sched_setaffinity", "sched_setattr",
             "migrate_pages", "move_pages")
DENIED = ("kcmp", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "io_uring_setup",
          "io_uring_enter", "io_uring_register")
F_SETOWN, F_SETOWN_EX = 8, 15
OWNER_IOCTLS = (0x8901, 0x8902, 0x5410)  # FIOSETOWN, SIOCSPGRP, TIOCSPGRP
PR_SET_DUMPABLE = 4
SIGN_BIT = 0x80000000
# Landlock has no rights for a file's metadata: chmod, chown, utimes and xattrs by *path* reach any file
# of the jail's uid wherever it is.  In the landlock backend's cells they are denied (the fd-based calls
# stay: an fd comes from an open() that Landlock checked; utimensat only with a NULL path, i.e. futimens).
PATH_METADATA = {
    "x86_64": {"chmod": 90, "fchmodat": 268, "fchmodat2": 452, "chown": 92, "lchown": 94, "fchownat": 260,
               "utime": 132, "utimes": 235, "futimesat": 261, "setxattr": 188, "lsetxattr": 189,
               "removexattr": 197, "lremovexattr": 198, "setxattrat": 463, "removexattrat": 466},
    "aarch64": {"fchmodat": 53, "fchmodat2": 452, "fchownat": 54, "setxattr": 5, "lsetxattr": 6, "removexattr": 14,
                "lremovexattr": 15, "setxattrat": 463, "removexattrat": 466},
}
UTIMENSAT = {"x86_64": 280, "aarch64": 88}
# Where Landlock cannot scope signals (ABI < 6), the landlock backend's cells may signal no process by pid
# (the jail shares the host's pid namespace and uid): only their own process group, kill(0, ...).
SIGNAL_BY_PID = {"x86_64": {"tkill": 200, "tgkill": 234, "rt_tgsigqueueinfo": 297, "pidfd_send_signal": 424,
                            "pidfd_open": 434},
                 "aarch64": {"tkill": 130, "tgkill": 131, "rt_tgsigqueueinfo": 240, "pidfd_send_signal": 424,
                             "pidfd_open": 434}}


def _arg_lo(i: int) -> int:
    return 16 + 8 * i  # offsetof(struct seccomp_data, args[i]), low 32 bits (little-endian)


class _Asm:
    """A tiny BPF assembler with forward labels."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int, jt: object = 0, jf: object = 0) -> None:
        self.code.append((code, jt, jf, k & 0xFFFFFFFF))

    def assemble(self) -> bytes:
        out = []
        for pc, (code, jt, jf, k) in enumerate(self.code):
            offsets = []
            for target in (jt, jf):
                if isinstance(target, str):
                    target = self.labels[target] - pc - 1
                if not 0 <= int(target) <= 255:  # type: ignore[call-overload]
                    raise ValueError("seccomp program too long for a jump")
                offsets.append(int(target))  # type: ignore[call-overload]
            out.append(struct.pack("HBBI", code, offsets[0], offsets[1], k))
        return b"".join(out)


def program(machine: str | None = None, landlock: bool = False, unscoped: bool = False,
            no_memfd: bool = False) -> bytes | None:
    """The cell filter (None: unknown architecture); ``landlock``: with the landlock backend's rules
    for metadata by path; ``unscoped``: signals only to the cell's own process group (kill(0)), for a
    Landlock that cannot scope them; ``no_memfd``: no memfd_create, where memory is bounded by RLIMIT_AS
    (no memory cgroup), which a memfd's pages escape (written, not mapped)."""
    machine = machine or os.uname().machine
    arch = ARCHES.get(machine)
    if arch is None:
        return None
    audit, nr = arch
    a = _Asm()
    a.op(LD_ABS, 4)                       # arch: any other (int 0x80 on x86_64) is denied
    a.op(JEQ, audit, 0, "deny")
    a.op(LD_ABS, 0)                       # syscall number
    a.op(JSET, X32_BIT, "deny", 0)
    for name in SELF_ONLY:
        a.op(JEQ, nr[name], "arg0_self", 0)
    a.op(JEQ, nr["setpriority"], "prio", 0)
    a.op(JEQ, nr["ioprio_set"], "ioprio", 0)
    a.op(JEQ, nr["kill"], "own_group" if unscoped else "signal", 0)
    a.op(JEQ, nr["rt_sigqueueinfo"], "own_group" if unscoped else "signal", 0)
    if unscoped:
        for number in SIGNAL_BY_PID[machine].values():
            a.op(JEQ, number, "deny", 0)
    a.op(JEQ, nr["setpgid"], "pgid", 0)
    a.op(JEQ, nr["fcntl"], "fcntl", 0)
    a.op(JEQ, nr["ioctl"], "ioctl", 0)
    a.op(JEQ, nr["prctl"], "prctl", 0)
    for name in DENIED + (("memfd_create",) if no_memfd else ()):
        a.op(JEQ, nr[name], "deny", 0)
    if landlock:
        for number in PATH_METADATA[machine].values():
            a.op(JEQ, number, "deny", 0)
        a.op(JEQ, UTIMENSAT[machine], "utimensat", 0)
    a.label("allow")
    a.op(RET, RET_ALLOW)
    a.label("deny")
    a.op(RET, RET_EPERM)
    # which == PRIO_PROCESS (resp. IOPRIO_WHO_PROCESS) and who is this process
    a.label("prio")
    a.op(LD_ABS, _arg_lo(0))
    a.op(JEQ, PRIO_PROCESS, "arg1_self", "deny2")
    a.label("ioprio")
    a.op(LD_ABS, _arg_lo(0))
    a.op(JEQ, IOPRIO_WHO_PROCESS, "arg1_self", "deny2")
    a.label("arg1_self")
    a.op(LD_ABS, _arg_lo(1))
    a.op(JEQ, 0, "allow2", "deny2")
    a.label("arg0_self")
    a.op(LD_ABS, _arg_lo(0))
    a.op(JEQ, 0, "allow2", "deny2")
    # kill(pid): any pid > 0, or 0 (own group); never a negative pid (-1: everyone; -pgid)
    a.label("signal")
    a.op(LD_ABS, _arg_lo(0))
    a.op(JSET, SIGN_BIT, "deny2", "allow2")
    # setpgid(pid, 0) only: a new group led by pid, never an existing group
    a.label("pgid")
    a.op(LD_ABS, _arg_lo(1))
    a.op(JEQ, 0, "allow2", "deny2")
    # fcntl: F_SETOWN to a process (>= 0) only; F_SETOWN_EX never
    a.label("fcntl")
    a.op(LD_ABS, _arg_lo(1))
    a.op(JEQ, F_SETOWN_EX, "deny2", 0)
    a.op(JEQ, F_SETOWN, 0, "allow2")
    a.op(LD_ABS, _arg_lo(2))
    a.op(JSET, SIGN_BIT, "deny2", "allow2")
    a.label("ioctl")
    a.op(LD_ABS, _arg_lo(1))
    for request in OWNER_IOCTLS:
        a.op(JEQ, request, "deny2", 0)
    a.op(RET, RET_ALLOW)
    # prctl(PR_SET_DUMPABLE, x): only x == 0
    a.label("prctl")
    a.op(LD_ABS, _arg_lo(0))
    a.op(JEQ, PR_SET_DUMPABLE, 0, "allow2")
    a.op(LD_ABS, _arg_lo(1))
    a.op(JEQ, 0, "allow2", "deny2")
    if unscoped:  # kill(0, sig): the caller's own process group only
        a.label("own_group")
        a.op(LD_ABS, _arg_lo(0))
        a.op(JEQ, 0, "allow2", "deny2")
    if landlock:  # utimensat(fd, NULL, ...) is futimens: allowed; with a path: denied
        a.label("utimensat")
        a.op(LD_ABS, _arg_lo(1))
        a.op(JEQ, 0, 0, "deny2")
        a.op(LD_ABS, _arg_lo(1) + 4)
        a.op(JEQ, 0, "allow2", "deny2")
    a.label("allow2")
    a.op(RET, RET_ALLOW)
    a.label("deny2")
    a.op(RET, RET_EPERM)
    return a.assemble()


# The landlock backend's filter for the whole jail (zygote included), where nsjail's would be, with
# the same rules (backends/_nsjail.py, SECCOMP_POLICY): no debugging of other processes, no kernel,
# namespace or mount administration, no SysV IPC or POSIX message queues (without an IPC namespace
# they would be the host's, and outlive runs); clone3 is ENOSYS (glibc falls back to clone, whose flags
# a filter can read) and clone with namespace flags or CLONE_PARENT is EPERM.  Without the network,
# no socket() at all (the jail's own channels are socketpairs).  Landlock's own calls stay allowed:
# each cell builds its domain under this filter.
_JAIL_DENIED = {
    "x86_64": dict(
        ptrace=101, process_vm_readv=310, process_vm_writev=311, process_madvise=440, pidfd_getfd=438, mount=165,
        umount2=166, pivot_root=155, chroot=161, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
        open_tree=428, mount_setattr=442, unshare=272, setns=308, bpf=321, perf_event_open=298, keyctl=250,
        add_key=248, request_key=249, userfaultfd=323, kexec_load=246, kexec_file_load=320, init_module=175,
        finit_module=313, delete_module=176, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
        reboot=169, swapon=167, swapoff=168, acct=163, quotactl=179, syslog=103, iopl=172, ioperm=173,
        settimeofday=164, clock_settime=227, clock_adjtime=305, adjtimex=159, open_by_handle_at=304,
        name_to_handle_at=303, lookup_dcookie=212, fanotify_init=300, vhangup=153, personality=135, uselib=134,
        sethostname=170, setdomainname=171, shmget=29, shmat=30, shmdt=67, shmctl=31, semget=64, semop=65,
        semtimedop=220, semctl=66, msgget=68, msgsnd=69, msgrcv=70, msgctl=71, mq_open=240, mq_unlink=241,
        mq_timedsend=242, mq_timedreceive=243, mq_notify=244, mq_getsetattr=245),
    "aarch64": dict(
        ptrace=117, process_vm_readv=270, process_vm_writev=271, process_madvise=440, pidfd_getfd=438, mount=40,
        umount2=39, pivot_root=41, chroot=51, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
        open_tree=428, mount_setattr=442, unshare=97, setns=268, bpf=280, perf_event_open=241, keyctl=219,
        add_key=217, request_key=218, userfaultfd=282, kexec_load=104, kexec_file_load=294, init_module=105,
        finit_module=273, delete_module=106, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
        reboot=142, swapon=224, swapoff=225, acct=89, quotactl=60, syslog=116, settimeofday=170,
        clock_settime=112, clock_adjtime=266, adjtimex=171, open_by_handle_at=265, name_to_handle_at=264,
        lookup_dcookie=18, fanotify_init=262, vhangup=58, personality=92, sethostname=161, setdomainname=162,
        shmget=194, shmat=196, shmdt=197, shmctl=195, semget=190, semop=193, semtimedop=192, semctl=191,
        msgget=186, msgsnd=189, msgrcv=188, msgctl=187, mq_open=180, mq_unlink=181, mq_timedsend=182,
        mq_timedreceive=183, mq_notify=184, mq_getsetattr=185),
}
_JAIL_CALLS = {"x86_64": {"socket": 41, "clone": 56, "clone3": 435}, "aarch64": {"socket": 198, "clone": 220,
                                                                                "clone3": 435}}
CLONE_DENIED = 0x7E028000  # NEWNS NEWCGROUP NEWUTS NEWIPC NEWUSER NEWPID NEWNET, and CLONE_PARENT (0x8000)
RET_ENOSYS = 0x00050000 | errno.ENOSYS


def jail_program(network: bool, machine: str | None = None) -> bytes:
    """The landlock backend's jail filter (raises OSError for an architecture it does not know:
    such a jail is refused, never built without it)."""
    machine = machine or os.uname().machine
    if machine not in ARCHES:
        raise OSError(errno.ENOSYS, f"no seccomp filter for the {machine} architecture")
    audit, _ = ARCHES[machine]
    nr = _JAIL_CALLS[machine]
    a = _Asm()
    a.op(LD_ABS, 4)
    a.op(JEQ, audit, 0, "deny")
    a.op(LD_ABS, 0)
    a.op(JSET, X32_BIT, "deny", 0)
    a.op(JEQ, nr["clone3"], "enosys", 0)
    a.op(JEQ, nr["clone"], "clone", 0)
    if not network:
        a.op(JEQ, nr["socket"], "deny", 0)
    for number in sorted(set(_JAIL_DENIED[machine].values())):
        a.op(JEQ, number, "deny", 0)
    a.op(RET, RET_ALLOW)
    a.label("clone")
    a.op(LD_ABS, _arg_lo(0))
    a.op(JSET, CLONE_DENIED, "deny", "allow")
    a.label("allow")
    a.op(RET, RET_ALLOW)
    a.label("deny")
    a.op(RET, RET_EPERM)
    a.label("enosys")
    a.op(RET, RET_ENOSYS)
    return a.assemble()


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def install_program(code: bytes) -> None:
    """Stack ``code`` onto this process (and everything it will fork); raises OSError if refused."""
    prog = _Fprog(len(code) // 8, code)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # nsjail set it already; without nsjail it is needed
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot install a seccomp filter: {os.strerror(err)}")


def install(landlock: bool = False, unscoped: bool = False, no_memfd: bool = False) -> bool:
    """Stack the cell filter onto this process (and everything it will fork).  False if the
    architecture is unknown; raises OSError if the kernel refuses it."""
    code = program(landlock=landlock, unscoped=unscoped, no_memfd=no_memfd)
    if code is None:
        return False
    try:
        install_program(code)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot install the cell's seccomp filter: {os.strerror(exc.errno or 0)}") from None
    return True
