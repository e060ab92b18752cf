"""The landlock jail's own process bound where nothing else gives one: no cgroups, not root, no user
namespace (a container's ``USER 1000`` under the runtime's default seccomp profile).  RLIMIT_NPROC counts
all of the user's processes there, which the jail would share with the app that embeds jailcell.

Every process the zygote forks to make cells (a nursery, a session's first holder) stacks a seccomp filter
that turns clone, fork and vfork into a user notification, and hands the filter's listener to the zygote,
which stays outside it.  The zygote answers each one: the call goes on (SECCOMP_USER_NOTIF_FLAG_CONTINUE)
while the jail's tasks -- every thread of every process below the zygote, which is their subreaper, and
the clones it let through that have not shown up yet -- are fewer than its bound, else it fails with
EAGAIN, as the pids cgroup would.  The decision reads no argument through a pointer (only the clone flags,
a register), so the call going on after it cannot change what was decided; namespace flags are refused by
the jail filter, which takes precedence.  RLIMIT_NPROC stays set, as a backstop for the user.

Standard library only: this module runs inside the jail.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import os
import select
import struct
import time

import _seccomp
from _procs import WALK, WHILE_WAITING, _read_proc, _stat_fields, _tree_table

__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]

SECCOMP_SET_MODE_FILTER, FLAG_NEW_LISTENER = 1, 1 << 3
RET_USER_NOTIF = 0x7FC00000
NOTIF_RECV, NOTIF_SEND = 0xC0502100, 0xC0182101   # _IOWR('!', 0, seccomp_notif), _IOWR('!', 1, ..._resp)
NOTIF = struct.Struct("QIIiIQ6Q")  # id, pid, flags, nr, arch, instruction pointer, args
RESP = struct.Struct("QqiI")        # id, val, error, flags
FLAG_CONTINUE = 1
CLONE_THREAD = 0x10000
FORKS = {"x86_64": (317, (56, 57, 58)), "aarch64": (277, (220,))}  # seccomp(2); clone, fork, vfork
PENDING_S = 0.5  # a clone let through that has not shown up by then failed (or is long counted)

STATE: dict = {"limit": 0, "pending": [], "libc": None, "clone": -1}  # the bound (0: none), clones let through
LISTENERS: list[int] = []                   # the zygote's: one per process it forked to make cells


def enable(limit: int) -> None:
    """In the zygote: count this jail's forks against ``limit`` tasks."""
    STATE["limit"] = int(limit)
    STATE["libc"] = ctypes.CDLL(None, use_errno=True)
    STATE["clone"] = FORKS.get(os.uname().machine, (0, (-1,)))[1][0]  # the call whose flags may say "thread"
    WHILE_WAITING.append(serve_ready)


def serve_ready() -> None:
    """Answer what is waiting now, without blocking (from the zygote's own waits)."""
    if not LISTENERS:
        return
    poller = select.poll()
    for fd in LISTENERS:
        poller.register(fd, select.POLLIN)
    for fd, ev in poller.poll(0):
        serve(fd, ev)


def serve(fd: int, ev: int) -> None:
    """One listener's event: a notification to answer, or all its processes gone."""
    if ev & select.POLLIN:
        answer(fd)
    elif ev & (select.POLLHUP | select.POLLERR):
        closed(fd)


def _program(machine: str) -> bytes:
    audit, _ = _seccomp.ARCHES[machine]
    a = _seccomp._Asm()
    a.op(_seccomp.LD_ABS, 4)
    a.op(_seccomp.JEQ, audit, 0, "allow")  # another architecture: the jail filter refuses it
    a.op(_seccomp.LD_ABS, 0)
    for number in FORKS[machine][1]:
        a.op(_seccomp.JEQ, number, "notify", 0)
    a.label("allow")
    a.op(_seccomp.RET, _seccomp.RET_ALLOW)
    a.label("notify")
    a.op(_seccomp.RET, RET_USER_NOTIF)
    return a.assemble()


def install() -> int:
    """Stack the fork filter onto this process (and all it forks); its listener.  Raises OSError."""
    machine = os.uname().machine
    if machine not in FORKS:
        raise OSError(errno.ENOSYS, f"no fork filter for the {machine} architecture")
    code = _program(machine)
    prog = _seccomp._Fprog(len(code) // 8, code)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(FORKS[machine][0]), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                      ctypes.c_long(FLAG_NEW_LISTENER), ctypes.byref(prog))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot install the fork-counting seccomp filter: {os.strerror(err)}")
    return int(fd)


# ------------------------------------------------------------------------------------------------
# around the zygote's fork of a process that makes cells (_cell.fork_expendable)
# ------------------------------------------------------------------------------------------------

def before_fork():
    """A channel for the child's listener, or None when this jail does not count forks."""
    if not STATE["limit"]:
        return None
    import _socket

    return _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)


def in_child(pair) -> None:
    """The child, first thing: under the filter, its listener handed to the zygote -- or it ends (a
    process that makes cells is never without it)."""
    if pair is None:
        return
    ours, theirs = pair
    ours.close()
    while LISTENERS:  # the zygote's, of the other nurseries and holders: never a cell's to answer
        os.close(LISTENERS.pop())
    try:
        fd = install()
        theirs.sendmsg([b"L"], [(1, 1, struct.pack("i", fd))])  # SOL_SOCKET, SCM_RIGHTS
        os.close(fd)
        theirs.close()
    except BaseException as exc:  # noqa: BLE001 - never go on without it
        os.write(2, f"jailcell: cannot count the jail's forks: {exc}\n".encode())
        os._exit(1)


def in_parent(pair, pid: int) -> None:
    """The zygote: keep the child's listener (a child that sends none ends: its process is gone)."""
    if pair is None:
        return
    ours, theirs = pair
    theirs.close()
    try:
        ours.settimeout(10.0)
        _data, ancillary, _flags, _addr = ours.recvmsg(1, 64)
    except OSError:
        ancillary = []
    finally:
        ours.close()
    for level, kind, data in ancillary:
        if level == 1 and kind == 1 and len(data) >= 4:
            LISTENERS.append(struct.unpack("i", data[:4])[0])
            return
    _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------------
# the zygote's answers
# ------------------------------------------------------------------------------------------------

def closed(fd: int) -> None:
    """A listener whose processes are all gone (POLLHUP)."""
    if fd in LISTENERS:
        LISTENERS.remove(fd)
        os.close(fd)


def answer(fd: int) -> None:
    """Answer the notification waiting on ``fd``: go on, or EAGAIN over the bound."""
    libc = STATE["libc"]
    buf = ctypes.create_string_buffer(NOTIF.size)
    if libc.ioctl(fd, ctypes.c_ulong(NOTIF_RECV), buf) != 0:
        return  # ENOENT: its caller was killed meanwhile
    nid, tid, _flags, nr, _arch, _ip, flags, *_rest = NOTIF.unpack(buf.raw)
    thread = nr == STATE["clone"] and bool(flags & CLONE_THREAD)
    allowed = _room()
    if allowed:
        _note(tid, thread)
    resp = RESP.pack(nid, 0, 0 if allowed else -errno.EAGAIN, FLAG_CONTINUE if allowed else 0)
    libc.ioctl(fd, ctypes.c_ulong(NOTIF_SEND), ctypes.create_string_buffer(resp, RESP.size))


def _room() -> bool:
    tasks = 1  # the zygote (one thread)
    for fields in _tree_table(WALK["from"] or os.getpid()).values():
        try:
            tasks += max(1, int(fields[17]))  # num_threads (a zombie still holds its pid)
        except (ValueError, IndexError):
            tasks += 1
    now = time.monotonic()
    STATE["pending"] = [p for p in STATE["pending"] if now - p[0] < PENDING_S and not _shown(*p[1:])]
    return tasks + len(STATE["pending"]) < STATE["limit"]


def _seen_by(tid: int) -> tuple[int, frozenset]:
    """The thread count of ``tid``'s process and ``tid``'s children, now."""
    threads = int(_stat_fields(tid)[17])
    return threads, frozenset(_read_proc(f"/proc/{tid}/task/{tid}/children", 1 << 16).split())


def _note(tid: int, thread: bool) -> None:
    try:
        STATE["pending"].append((time.monotonic(), tid, thread, *_seen_by(tid)))
    except (OSError, ValueError, IndexError):
        pass


def _shown(tid: int, thread: bool, threads: int, children: frozenset) -> bool:
    """Whether the clone ``tid`` was let make shows in the tree now (or ``tid`` is gone)."""
    try:
        now_threads, now_children = _seen_by(tid)
    except (OSError, ValueError, IndexError):
        return True
    return now_threads > threads if thread else bool(now_children - children)
