"""The landlock backend's jail.  The zygote puts itself under a seccomp filter for the whole jail
(``_seccomp.jail_program``: no sockets without the network, no namespaces, mounts, BPF, perf,
keyrings, userfaultfd; clone3 answers ENOSYS so that glibc uses clone, whose flags it can check),
which everything it forks inherits.  Each cell (a spare, before it takes any request) then enters a
Landlock domain of its own -- files, TCP, and from ABI 6 signals and abstract unix sockets -- under
no_new_privs; a session's cells inherit their holder's (a former cell's) domain.  Neither can be
undone.  The machinery (zygote, nurseries, a session's first holder) stays outside every domain:
no cell can ptrace, read the memory of or (ABI 6) signal it, and the zygote can sweep /proc.
The cell filter (``_seccomp``) is stacked on top as with nsjail.

Landlock, not namespaces: the jail shares the host's pid and network namespaces and its uid, so:
- files: only the interpreter, its libraries and the jail's own workspace and tmp are reachable;
- processes outside the domain cannot be ptraced, nor their /proc/<pid> files that ptrace guards
  (mem, environ, maps, fd) be read -- Landlock checks that since ABI 1 -- nor (ABI 6) signalled;
- TCP bind/connect are denied (ABI 4) and so is socket() itself (the seccomp filter), so no UDP, raw,
  netlink or unix-socket client either; the jail's own channels are socketpairs.

Standard library only: this module runs inside the jail.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import os
import struct

import _protocol as proto
import _seccomp

__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]

SYS_CREATE, SYS_ADD_RULE, SYS_RESTRICT = 444, 445, 446  # the same numbers on x86_64 and aarch64
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
MIN_ABI = 1

# filesystem rights, by the ABI that introduced them
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1, 2

READ = READ_FILE | READ_DIR
READ_EXEC = READ | EXECUTE
WRITE_ALL = (READ_EXEC | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | MAKE_FIFO
             | REFER | TRUNCATE)  # no device, socket nodes; no ioctl on devices


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def abi() -> int:
    """The kernel's Landlock ABI version (0: none, or disabled)."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    v = libc.syscall(SYS_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    return int(v) if v > 0 else 0


def _fs_rights(version: int) -> int:
    return FS_BY_ABI[max(k for k in FS_BY_ABI if k <= version)]


class LandlockError(OSError):
    pass


def ruleset(read: list[str], write: list[str], devices: list[str], network: bool) -> tuple[int, dict]:
    """A Landlock ruleset (an fd) for the jail's cells, and what it covers.  ``read``: folders and files
    to read and execute; ``write``: folders to use freely (the workspace, tmp); ``devices``: character
    devices to read and write (/dev/null ...).  Made once per process that forks cells; each cell then
    only restricts itself with it.  Raises LandlockError when the kernel refuses any part."""
    version = abi()
    if version < MIN_ABI:
        raise LandlockError(errno.ENOSYS, "Landlock is not available in this kernel (or is disabled)")
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    fs = _fs_rights(version)
    handled_net = 0 if network or version < 4 else NET_BIND_TCP | NET_CONNECT_TCP
    scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if version >= 6 else 0
    attr = struct.pack("=QQQ", fs, handled_net, scoped)
    size = 8 if version < 4 else (16 if version < 6 else 24)
    buf = ctypes.create_string_buffer(attr[:size], size)
    fd = libc.syscall(SYS_CREATE, buf, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise LandlockError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    added = 0
    try:
        for paths, rights in ((read, READ_EXEC), (write, WRITE_ALL), (devices, READ_FILE | WRITE_FILE)):
            for path in paths:
                try:
                    parent = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue  # a path this machine does not have
                try:
                    allowed = rights & fs
                    if not os.path.isdir(path):  # a file: only file rights apply
                        allowed &= EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
                    rule = struct.pack("=Qi", allowed, parent)  # landlock_path_beneath_attr is packed
                    rbuf = ctypes.create_string_buffer(rule, len(rule))
                    if libc.syscall(SYS_ADD_RULE, int(fd), RULE_PATH_BENEATH, rbuf, ctypes.c_uint32(0)) < 0:
                        err = ctypes.get_errno()
                        raise LandlockError(err, f"landlock_add_rule({path}): {os.strerror(err)}")
                    added += 1
                finally:
                    os.close(parent)
    except BaseException:
        os.close(fd)
        raise
    return int(fd), {"abi": version, "network_rules": bool(handled_net), "scoped": bool(scoped), "paths": added}


def restrict(ruleset_fd: int) -> None:
    """Enter the domain of ``ruleset_fd`` (this process and all it will fork), under no_new_privs."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(_seccomp.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise LandlockError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    if libc.syscall(SYS_RESTRICT, ruleset_fd, ctypes.c_uint32(0)) < 0:
        err = ctypes.get_errno()
        raise LandlockError(err, f"landlock_restrict_self: {os.strerror(err)}")


def confine(read: list[str], write: list[str], devices: list[str], network: bool) -> dict:
    """``ruleset`` and ``restrict`` at once; returns what applied."""
    fd, applied = ruleset(read, write, devices, network)
    try:
        restrict(fd)
    finally:
        os.close(fd)
    return applied


SECUREBITS = 0x2F  # NOROOT, NO_SETUID_FIXUP, their locks, KEEP_CAPS_LOCKED: exec never gives root's caps back


def drop_capabilities(for_good: bool = True) -> None:
    """Drop every capability: the ambient, effective, permitted and inheritable sets (which needs no
    capability) and, ``for_good`` (as root, where no other user reaches the interpreter), the bounding
    set too, with securebits that keep an exec from restoring any.  In a user namespace of its own a
    process is not root there (no uid is mapped), so an exec gives nothing back; and it may not be
    allowed those two steps (Ubuntu's AppArmor denies powers there).  Raises LandlockError if a step fails."""
    libc = _libc()

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise LandlockError(err, f"{what}: {os.strerror(err)}")

    if for_good:
        check(libc.prctl(28, SECUREBITS, 0, 0, 0), "PR_SET_SECUREBITS")
        for cap in range(64):
            if libc.prctl(24, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:  # PR_CAPBSET_DROP
                check(-1, f"PR_CAPBSET_DROP {cap}")
    check(libc.prctl(47, 4, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    check(libc.capset(header, data), "capset")


def own_user_namespace() -> None:
    """Enter a new user namespace (no uids mapped into it): the kernel then counts this process and all it
    forks against RLIMIT_NPROC apart from the user's other processes.  Raises LandlockError if refused."""
    if _libc().unshare(0x10000000) != 0:  # CLONE_NEWUSER
        err = ctypes.get_errno()
        raise LandlockError(err, f"unshare(CLONE_NEWUSER): {os.strerror(err)}")


def capabilities() -> int | None:
    """This process's effective capabilities (None if /proc does not say)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return None


def probe(spec: dict) -> dict:
    """At the zygote's start: a throwaway child confines itself as every cell will and reports what
    applied and which of the paths the host named it could read (the host refuses the jail if any)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            applied = confine(spec["read"], spec["write"], spec["devices"], bool(spec.get("network")))
            if spec.get("count_forks"):  # the filter every process that makes cells will stack
                import _forks

                os.close(_forks.install())
                applied["forks_counted"] = True
            readable = []
            for path in spec.get("probe", []):
                try:
                    if os.path.isdir(path):
                        os.listdir(path)
                    else:
                        os.close(os.open(path, os.O_RDONLY))
                    readable.append(path)
                except OSError:
                    pass
            proto.write_frame(w, {"landlock": applied, "readable": readable})
            code = 0
        except BaseException as exc:  # noqa: BLE001 - said to the zygote, which refuses to start
            proto.write_frame(w, {"error": f"{type(exc).__name__}: {exc}"})
        finally:
            os._exit(code)
    os.close(w)
    try:  # (the protocol's JSON, not ast.literal_eval: importing ast cost every landlock jail 6 ms)
        sees = proto.read_frame(r, 1 << 20)
    except (EOFError, OSError, proto.ProtocolError):
        sees = {"error": "the probe died"}
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return sees if isinstance(sees, dict) else {"error": "the probe said something else"}
