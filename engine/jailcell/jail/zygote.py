"""The in-jail zygote: the first process of a jail.  Stdlib only; runs *inside* the jail.

It reads a config frame from the host on its control socket (fd 0), imports the policy's
preload modules once, answers READY, then manages processes.  It never runs user code and
never relays a run: the host talks to each cell directly (request down a pipe, report and
host-function calls up a socket), so a run costs two wake-ups, not four.

Processes (in the jail's pid namespace when nsjail is used)::

    zygote (pid 1)  -- fd 0: control socket to the host
      ├── nursery          preloaded copy; forks spare cells ahead of demand (stateless jails)
      │     └── spare      blocked on its request pipe; runs one request, reports, parks
      └── holder           a session's globals (session jails); forks one spare at a time
            └── spare      runs one request; if it finishes it becomes the next holder,
                           if it is killed the holder forks a new spare from the old state

Each spare is announced to the host with its channels: ``{"op": "spare", "head", "pid"}`` plus
the request pipe's write end, the stdout/stderr pipes' read ends, the host end of the result
socket and a pidfd (which the host polls for the cell's death and uses to kill it).  After a run
the host sends ``{"op": "done", "cell", "finished"}``; the zygote answers with the cell's exit
status if it died (``exit``), kills every process the run left, wipes /tmp (and the workspace
of a stateless jail) and confirms with ``clean``.  Spares that a previous program stopped or
killed are withdrawn with ``drop`` before that.
"""

from __future__ import annotations

import binascii
import errno
import fcntl
import gc
import os
import select
import _signal as signal  # not signal.py, whose enums cost ~4 ms at every jail start
import struct
import sys
import time
from _socket import CMSG_LEN, SCM_RIGHTS, SOL_SOCKET, socket

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cell as cell  # noqa: E402  (what runs inside a cell)
import _protocol as proto  # noqa: E402  (stdlib-only framing shared with the host)
import _seccomp  # noqa: E402  (the cell's own filter: no acting on the jail's other processes)

EXIT_WAIT_S = 2.0      # how long a dead cell's parent may take to report its exit status
CHILD_IO_S = 2.0       # the zygote never blocks longer on a nursery's or holder's socket
SPARE_WAIT_S = 30.0    # how long a session holder may take to fork its next spare
NURSERY_RETRY_S = 1.0  # a lost nursery is replaced at the next sweep, or after this
POOL_SIZE = 2          # spare cells kept ready in a stateless jail
BACK_TO_BACK_S = 0.005  # spares taken less than this apart: the next spare rehearses only if idle ...
REHEARSE_AFTER_S = 0.01  # ... this long
MAX_EXITS = 1000

CONFIG: dict = {}


# ----------------------------------------------------------------------------------------------
# small OS helpers
# ----------------------------------------------------------------------------------------------

def _read_proc(path: str, size: int = 4096) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _stat_fields(pid: int | str, task: str = "") -> list[bytes]:
    """Fields of /proc/<pid>[/task/<tid>]/stat after the command name (state is [0])."""
    data = _read_proc(f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat")
    return data[data.rindex(b")") + 2 :].split()


def proc_state(pid: int) -> str:
    try:
        return chr(_stat_fields(pid)[0][0])
    except (OSError, ValueError, IndexError):
        return "X"


SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def idle(pid: int) -> bool:
    """Fit to keep: not exited, exiting or about to (SIGKILL pending) -- a program may have tried.
    (A stopped process is continued by the sweep.)  One read of /proc/<pid>/stat: a SIGKILL is
    put in every thread's own pending set at once, and the main thread's flags say if it exits."""
    try:
        fields = _stat_fields(pid)
        return chr(fields[0][0]) not in ("Z", "X") and not int(fields[6]) & PF_EXITING \
            and not int(fields[28]) & SIGKILL_BIT
    except (OSError, ValueError, IndexError):
        return False


PF_EXITING = 0x4  # task->flags: the task is in do_exit and will never run user code again


def _exiting(pid: int) -> bool:
    """Every thread of ``pid`` is gone or in do_exit: it can no longer make a system call, so
    nothing it does can reach the next run.  (Its address space may still be being torn down.)"""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tids:
        try:
            if not int(_stat_fields(pid, tid)[6]) & PF_EXITING:
                return False
        except (OSError, ValueError, IndexError):
            continue
    return True


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) for every process this /proc shows (the jail's own in a pid namespace)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                rest = _stat_fields(name)
                table[int(name)] = (int(rest[1]), chr(rest[0][0]))
            except (OSError, ValueError, IndexError):
                continue
    return table


def _descendants(root: int, table: dict[int, tuple[int, str]]) -> list[int]:
    """Live (non-zombie) processes below ``root``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _state) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            if table[child][1] not in ("Z", "X"):
                out.append(child)
    return out


REAPED: dict[int, dict] = {}  # how the zygote's own children ended (orphans included), newest last


def _reap_nohang() -> None:
    """Reap the children that have ended and remember how -- in the zygote: the nursery, holders,
    and orphans (what a killed cell left, or a cell whose parent a program killed); in a session
    holder: the processes its program left, killed by the sweep."""
    while True:
        try:
            pid, wstatus, ru = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        REAPED[pid] = _exit_info(pid, wstatus, ru.ru_utime, ru.ru_stime, ru.ru_maxrss)
        while len(REAPED) > MAX_EXITS:
            REAPED.pop(next(iter(REAPED)))


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_strays(keep, first: tuple[int, ...] = ()) -> None:
    """Kill every process of this jail below the zygote for which ``keep(pid, ppid)`` is false,
    wait until each is exiting (not until its teardown is over: that happens off the request
    path, while the next run may already be going), and continue the ones kept (the program may
    have stopped them).  ``first``: strays known already (the used cell), killed before the scan.

    One scan of /proc finds the strays; while the killed ones are not exiting yet, only they are
    looked at again; then one more scan, for anything they forked in the meantime."""
    me = os.getpid()
    killed: set[int] = set()
    for pid in first:
        kill(pid)
        killed.add(pid)
    below: list[int] = []
    attempts = 0  # bounded, as a process stuck in the kernel may never get to exit
    while attempts < 5000:
        table = _process_table()
        below = _descendants(me, table)
        strays = [p for p in below if not keep(p, table[p][0])]
        new = [p for p in strays if p not in killed]
        waiting = [p for p in strays if p in killed and not _exiting(p)]
        if not new and not waiting:
            break
        for pid in new:
            kill(pid)
            killed.add(pid)
        waiting += new
        while waiting and attempts < 5000:
            attempts += 1
            _reap_nohang()
            waiting = [p for p in waiting if not _exiting(p)]
            for pid in waiting:  # again (harmless; covers a reused pid)
                kill(pid)
            if not waiting:
                break
            if attempts > 20:
                time.sleep(0.0002)
            else:
                os.sched_yield()  # a killed process queued on this CPU gets to exit now
    for pid in below:
        if pid not in killed:
            try:
                os.kill(pid, signal.SIGCONT)  # discards a pending stop signal too
            except ProcessLookupError:
                pass
    _reap_nohang()
    if len(killed) > len(first) + 1:
        # A run that left processes behind: until they are reaped they still count against the
        # jail's pids limit, and the next run's fork() would fail.  (A run that left nothing but
        # its cell does not wait: the usual case stays off the next request's path.)
        _wait_reaped(killed, GONE_WAIT_S)


GONE_WAIT_S = 2.0


def _wait_reaped(pids, timeout: float) -> None:
    """Until the zygote's own children among ``pids`` are reaped (a session holder reaps its own
    when it forks its next spare; the nursery reaps its cells)."""
    me = os.getpid()
    deadline = time.monotonic() + timeout
    waiting = set(pids)
    while waiting and time.monotonic() < deadline:
        _reap_nohang()
        left = set()
        for pid in waiting:
            try:
                if int(_stat_fields(pid)[1]) == me:
                    left.add(pid)
            except (OSError, ValueError, IndexError):
                pass
        waiting = left
        if waiting:
            time.sleep(0.0005)


RECHECK_S = (0.005, 0.05)  # a stop signal sent just before a sweep can land after its SIGCONT


def continue_stopped(pids) -> None:
    """SIGCONT the processes among ``pids`` that are stopped."""
    for pid in pids:
        if pid and proc_state(pid) in ("T", "t"):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def wipe(path: str) -> None:
    """Remove everything below ``path`` (not ``path`` itself), whatever permissions a cell set
    and however deep its tree (no recursion: the walk descends with chdir, so neither the
    recursion limit nor PATH_MAX stops it).  Host directories bound into the jail below ``path``
    (a venv in /tmp/x/venv: another file system) are kept, and so are the directories that lead
    to them; everything else on ``path``'s own file system goes."""
    try:
        dev = os.lstat(path).st_dev
        os.chmod(path, 0o1777 if path == "/tmp" else 0o755)
    except FileNotFoundError:
        return
    home = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(path)
        stack: list[tuple[list[str], str | None]] = [(os.listdir("."), None)]
        while stack:
            names, here = stack[-1]
            if not names:
                stack.pop()
                if here is not None:
                    os.chdir("..")
                    try:
                        os.rmdir(here)
                    except OSError as exc:
                        if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):  # a path to a mount point
                            raise
                        os.chmod(here, 0o755)  # kept: nothing of the run may stay on it
                        scrub(here)
                continue
            name = names.pop()
            try:
                st = os.lstat(name)
                if st.st_dev != dev:
                    continue  # a mount point: the host's read-only bind
                if stat_isdir(st.st_mode):
                    os.chmod(name, 0o700)
                    os.chdir(name)
                    if os.lstat(".").st_ino != st.st_ino:  # cannot happen: every process is gone
                        raise OSError(errno.ESTALE, f"{name!r} changed during the sweep")
                    stack.append((os.listdir("."), name))
                else:
                    os.unlink(name)
            except FileNotFoundError:
                pass
    finally:
        os.fchdir(home)
        os.close(home)
    scrub(path)


def scrub(path: str) -> None:
    """A directory the sweep keeps (the workspace, /tmp, the way to a bind mount) keeps nothing of
    the run: no extended attributes (a program can set user.* ones on tmpfs: data for the next
    run), and fixed times (a program can set them too)."""
    try:
        for name in os.listxattr(path, follow_symlinks=False):
            try:
                os.removexattr(path, name, follow_symlinks=False)
            except OSError:
                pass
    except OSError:
        pass
    try:
        os.utime(path, (0, 0), follow_symlinks=False)
    except OSError:
        pass


def stat_isdir(mode: int) -> bool:
    return mode & 0o170000 == 0o040000


def copy_tree(src: str, dst: str) -> None:
    """A session branch's copy of the workspace, without recursion: regular files, directories,
    symbolic links (as links) and FIFOs (made anew); sockets and devices are left out (a copy
    of one would block or fail)."""
    os.makedirs(dst, 0o755, exist_ok=True)
    stack = [""]
    dir_modes: list[tuple[str, int]] = []
    while stack:
        rel = stack.pop()
        s_dir, d_dir = os.path.join(src, rel), os.path.join(dst, rel)
        try:
            entries = list(os.scandir(s_dir))
        except PermissionError:  # the program took its own permissions away: this process owns it
            os.chmod(s_dir, 0o700)
            entries = list(os.scandir(s_dir))
        for entry in entries:
            s_path, d_path = entry.path, os.path.join(d_dir, entry.name)
            st = entry.stat(follow_symlinks=False)
            kind = st.st_mode & 0o170000
            if kind == 0o040000:
                os.mkdir(d_path, 0o700)
                stack.append(os.path.join(rel, entry.name))
                dir_modes.append((d_path, st.st_mode & 0o7777))
                continue
            if kind == 0o100000:
                fd_in = os.open(s_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    fd_out = os.open(d_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    try:
                        while os.sendfile(fd_out, fd_in, None, 1 << 24):
                            pass
                    finally:
                        os.close(fd_out)
                finally:
                    os.close(fd_in)
            elif kind == 0o120000:
                os.symlink(os.readlink(s_path), d_path)
                continue
            elif kind == 0o010000:
                os.mkfifo(d_path, 0o600)
            else:
                continue
            os.chmod(d_path, st.st_mode & 0o7777)
    for path, mode in reversed(dir_modes):  # deepest first: their parents are still writable
        os.chmod(path, mode)


HOLDER_OPS = ("spare", "cell_exit", "forked", "fork_failed")


def holder_report_problem(msg, fds) -> str | None:
    """What is wrong with a report from a session's holder (a former cell: it may be forged), or None."""
    if not isinstance(msg, dict):
        return f"a {type(msg).__name__}, not an object"
    op, pid = msg.get("op"), msg.get("pid")
    if op not in HOLDER_OPS:
        return f"unknown op {str(op)[:40]!r}"
    if not (proto.is_int(pid) and 0 < pid < 1 << 22):
        return f"op {op!r} without a valid pid"
    if fds and (op != "spare" or len(fds) != 4):
        return f"{len(fds)} file descriptors with op {op!r}"
    if op == "spare" and len(fds) != 4:
        return "a spare without its 4 channels"
    return None


def _exit_info(pid: int, wstatus: int, utime: float, stime: float, maxrss: int) -> dict:
    """How a child ended, as the zygote keeps it (and as a holder reports its spare's end)."""
    return {"op": "cell_exit", "pid": pid, "status": wstatus, "utime": utime, "stime": stime, "maxrss": maxrss}


F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


class Channels:
    """One spare's channels, made by its parent before the fork: the request pipe, the stdout and
    stderr pipes and the result socket.  The parent keeps (and hands on) the host's ends, which
    are non-blocking (the host polls them); the cell's ends block, as a terminal would."""

    def __init__(self) -> None:
        self.req_r, self.req_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.err_r, self.err_w = os.pipe()
        host, mine = proto.socketpair()
        self.res_host, self.res_cell = host.detach(), mine.detach()
        for fd in self.host_ends():
            os.set_blocking(fd, False)
        for fd in (self.out_r, self.err_r):
            try:  # the host drains output on a timer: room for a burst in between
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass

    def host_ends(self) -> tuple[int, int, int, int]:
        return self.req_w, self.out_r, self.err_r, self.res_host

    def cell_ends(self) -> tuple[int, int, int, int]:
        return self.req_r, self.out_w, self.err_w, self.res_cell

    @staticmethod
    def close(fds) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


FORK_RETRY_S = 10.0  # a fork that finds every pid of the jail taken (a run's leftovers) tries again


def _fork(reap: bool) -> int:
    """os.fork(), again after a moment while the jail's pids are all taken (EAGAIN): the sweep
    after a fork-happy run frees them.  ``reap``: this process (a session holder, which has no
    other child it waits for) first reaps what its program left, killed by the sweep."""
    deadline, delay = time.monotonic() + FORK_RETRY_S, 0.001
    while True:
        if reap:
            _reap_nohang()
        try:
            return os.fork()
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _fork_spare(glb_factory, parent_sock: socket, session: bool, rehearse: bool = True):
    """Fork a spare cell; returns ``(pid, channels)`` in the parent.

    In a stateless spare this never returns.  In a session spare it returns ``(0, socket)``
    after a finished run: the process is now the holder of the new state, talking to the
    zygote over ``socket`` (the holder's channel, moved out of the way of the cell's fds)."""
    ch = Channels()
    try:
        pid = _fork(reap=session)
    except OSError:
        Channels.close([*ch.host_ends(), *ch.cell_ends()])
        raise
    if pid == 0:
        Channels.close(ch.host_ends())
        sock_fd = parent_sock.detach()  # the fd is re-numbered (or closed) by become()
        req, sock_fd = cell.become(*ch.cell_ends(), keep=(sock_fd,), stdio=session)
        if not session:
            os.close(sock_fd)
        os.setpgid(0, 0)  # os.kill(0, ...) from the program reaches its own processes only
        machinery_signals(ignore=False)
        # Rehearse a request: the pages it writes are copied now, while the spare waits, instead of
        # on the next run's path.  When runs come back to back the request is due in a moment and
        # a rehearsal would only add its own CPU time, so such a spare rehearses only if no request
        # has come within REHEARSE_AFTER_S (an LLM tool loop's next call comes much later).
        if rehearse or not select.select([req], [], [], REHEARSE_AFTER_S)[0]:
            cell.warm_up(session)  # its request carries the usual CPU limit: set now, while idle
        else:
            cell.hide_blocked_modules()
        try:
            cell.serve(req, glb_factory(), session)
        except BaseException:  # noqa: BLE001 - the request pipe broke: nothing to report to
            os._exit(0)
        if not session:
            # Park: the zygote kills this process after the host has its reply, so the exit
            # teardown of a large address space is not on the request's critical path.
            while True:
                time.sleep(3600)
        devnull = os.open("/dev/null", os.O_RDWR)  # a holder keeps none of the run's channels
        for fd in (0, 1, 2, cell.RES_FD):
            os.dup2(devnull, fd)
        os.close(devnull)
        return 0, socket(fileno=sock_fd)
    Channels.close(ch.cell_ends())
    return pid, ch


def _announce(sock: socket, pid: int, ch: Channels) -> int:
    """Hand a new spare's channels to the zygote (which passes them on to the host); returns a
    pidfd on the spare."""
    try:
        proto.send(sock, {"op": "spare", "pid": pid}, ch.host_ends())
    except OSError:
        os._exit(0)  # the zygote is gone
    Channels.close(ch.host_ends())
    return os.pidfd_open(pid)


# ----------------------------------------------------------------------------------------------
# stateless jails: a nursery of spare cells
# ----------------------------------------------------------------------------------------------

# The nursery and the zygote speak in fixed-size binary records, not JSON frames: the nursery's
# loop runs between every two forks, and every memory page it writes there is copied again after
# each fork (it shares them with the spare it just forked).  JSON framing cost ~80 such copies
# per spare.  Nursery -> zygote: a new spare (its host ends ride along as SCM_RIGHTS) or how a
# child ended; zygote -> nursery: one byte per credit.
RECORD = struct.Struct("=Biiddq")  # kind, pid, wait status, utime, stime, maxrss (KiB)
SPARE, CHILD_EXIT = 1, 2
CREDIT = b"+"
_FDS = struct.Struct("4i")


def _announce_spare(sock: socket, pid: int, ch: Channels) -> int:
    """The nursery hands a new spare's host ends to the zygote; returns a pidfd on the spare."""
    try:
        sock.sendmsg([RECORD.pack(SPARE, pid, 0, 0.0, 0.0, 0)],
                     [(SOL_SOCKET, SCM_RIGHTS, _FDS.pack(*ch.host_ends()))])
    except OSError:
        os._exit(0)  # the zygote is gone
    Channels.close(ch.host_ends())
    return os.pidfd_open(pid)


def recv_record(sock: socket) -> tuple[tuple, list[int]]:
    """One record from the nursery and the file descriptors that came with it (the caller owns
    them).  Raises EOFError when the nursery is gone (OSError when it stalls mid-record)."""
    data, ancdata, _flags, _addr = sock.recvmsg(RECORD.size, CMSG_LEN(_FDS.size))
    fds = proto.received_fds(ancdata)
    try:
        if not data:
            raise EOFError("the nursery closed its channel")
        while len(data) < RECORD.size:  # a record is written in one call: the rest is on its way
            more = sock.recv(RECORD.size - len(data))
            if not more:
                raise EOFError("the nursery closed its channel mid-record")
            data += more
        return RECORD.unpack(data), fds
    except BaseException:
        Channels.close(fds)
        raise


def _nursery_main(sock: socket, pool_size: int) -> None:
    """The nursery forks spare cells ahead of demand, so a run never waits for fork().

    It runs no user code.  It sends each spare's pid and channels to the zygote, gets one
    credit back per spare used or withdrawn, and reports how each of its children ended (wait4).
    """
    forks_cells()
    credits = pool_size
    children: dict[int, int] = {}  # pidfd -> pid
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    complete = False
    rehearse, last_credit = True, 0.0
    while True:
        while credits > 0:
            pid, ch = _fork_spare(cell.user_globals, sock, session=False, rehearse=rehearse)
            pidfd = _announce_spare(sock, pid, ch)
            children[pidfd] = pid
            poller.register(pidfd, select.POLLIN)
            credits -= 1
            if not complete:  # the jail's first spare is out: now what only some runs need
                cell.complete_image(nursery=True)
                gc.freeze()
                complete = True
        for fd, _ev in poller.poll():
            if fd == sock.fileno():
                try:
                    got = sock.recv(64)
                except OSError:
                    got = b""
                if not got:  # the zygote is gone
                    for pid in children.values():
                        kill(pid)
                    os._exit(0)
                credits += got.count(CREDIT)
                now = time.monotonic()  # spares used faster than this run back to back
                rehearse, last_credit = now - last_credit > BACK_TO_BACK_S, now
                continue
            pid = children.pop(fd)
            poller.unregister(fd)
            os.close(fd)
            _, wstatus, ru = os.wait4(pid, 0)
            try:
                sock.sendall(RECORD.pack(CHILD_EXIT, pid, wstatus, ru.ru_utime, ru.ru_stime, ru.ru_maxrss))
            except OSError:
                pass  # the zygote is gone: the next poll sees it


class Stateless:
    """Runs in fresh cells forked from the nursery; after each run the jail is swept clean."""

    def __init__(self, zygote: "Zygote") -> None:
        self.zygote = zygote
        self.workspace = CONFIG["workspace"]
        self.spares: dict[int, int] = {}  # announced to the host, not used yet -> nursery pid
        self.exits: dict[int, dict] = {}
        self.nursery_pid = 0
        self.sock: socket | None = None
        self.restart_at: float | None = None
        self.rechecks: list[float] = []  # when to look again for processes a program stopped
        self._start_nursery()

    def _start_nursery(self) -> None:
        parent, child = proto.socketpair()
        try:
            pid = os.fork()
        except OSError:  # e.g. the pids limit, while a program fills it: try again shortly
            parent.close()
            child.close()
            self.restart_at = time.monotonic() + NURSERY_RETRY_S
            return
        if pid == 0:
            _default_signals()
            parent.close()
            devnull = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1):  # never hold the control socket
                os.dup2(devnull, fd)
            cell.close_fds({0, 1, 2, child.fileno()})
            try:
                _nursery_main(child, POOL_SIZE)
            finally:
                os._exit(0)
        child.close()
        parent.settimeout(CHILD_IO_S)  # a stopped nursery must not hang the zygote mid-frame
        self.sock, self.nursery_pid, self.restart_at = parent, pid, None

    def _lose_nursery(self) -> None:
        """The nursery is gone (a program killed it).  Its spares are orphans now; the sweep after
        the run kills them, withdraws them from the host and starts a new nursery."""
        if self.sock is not None:
            self.sock.close()
        kill(self.nursery_pid)
        self.sock, self.nursery_pid = None, 0
        self.restart_at = time.monotonic() + NURSERY_RETRY_S  # in case no sweep comes

    def watch(self) -> list[socket]:
        return [self.sock] if self.sock is not None else []

    def timeout(self) -> float | None:
        due = [t for t in (self.restart_at, *self.rechecks[:1]) if t is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def on_timer(self) -> None:
        now = time.monotonic()
        if self.restart_at is not None and now >= self.restart_at:
            self._start_nursery()
        if self.rechecks and now >= self.rechecks[0]:
            self.rechecks.pop(0)
            continue_stopped([self.nursery_pid, *self.spares])

    def on_readable(self, sock: socket) -> None:
        try:
            (kind, *record), fds = recv_record(sock)
        except (EOFError, OSError):
            self._lose_nursery()
            return
        pid = record[0]
        if kind == SPARE and len(fds) == 4:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                Channels.close(fds)
                self._credit()
                return
            self.spares[pid] = self.nursery_pid
            self.zygote.send({"op": "spare", "head": None, "pid": pid}, [*fds, pidfd])
            Channels.close([*fds, pidfd])
        elif kind == CHILD_EXIT:
            self.exits[pid] = _exit_info(*record)
            if len(self.exits) > MAX_EXITS:  # exits nobody asked for (cells killed after a finished run)
                self.exits.pop(next(iter(self.exits)))
        else:
            Channels.close(fds)

    def _credit(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send(CREDIT)
        except OSError:  # the nursery died just now
            self._lose_nursery()

    def done(self, req: dict) -> None:
        used = int(req["cell"])
        credits = 1 if self.spares.pop(used, None) == self.nursery_pid else 0
        if not req.get("finished"):
            self.zygote.send({"op": "exit", **self._exit_of(used)})
        nursery = self.nursery_pid
        # Keep the nursery and its children that have not run anything (spares, possibly not yet
        # announced); everything else -- the used cell and whatever it left -- dies.
        kill_strays(lambda pid, ppid: pid == nursery or (ppid == nursery and pid != used), first=(used,))
        if self.sock is None or not idle(nursery):
            self._lose_nursery()
            self._start_nursery()
            credits = 0
        wipe(self.workspace)
        wipe(CONFIG["tmp"])
        for pid, parent in list(self.spares.items()):
            if parent != self.nursery_pid or not idle(pid):  # an orphan of a lost nursery, or killed
                kill(pid)
                del self.spares[pid]
                self.zygote.send({"op": "drop", "pid": pid})
                credits += parent == self.nursery_pid
        self.zygote.send({"op": "clean", "cell": used})
        for _ in range(credits):
            self._credit()
        now = time.monotonic()
        self.rechecks = [now + delay for delay in RECHECK_S]

    def _exit_of(self, pid: int) -> dict:
        """How a cell that did not finish ended: as its parent (the nursery) saw it, or, if a
        program killed the nursery, as the zygote saw its orphan.  A nursery the program stopped is
        continued first: it cannot report while it is stopped."""
        continue_stopped([self.nursery_pid])
        self.zygote.pump(time.monotonic() + EXIT_WAIT_S, lambda: pid in self.exits or pid in REAPED)
        info = self.exits.pop(pid, None) or REAPED.pop(pid, {})
        return {"cell": pid, **{k: info.get(k) for k in ("status", "utime", "stime", "maxrss")}}


# ----------------------------------------------------------------------------------------------
# session jails: holders of state
# ----------------------------------------------------------------------------------------------

def _holder_main(sock: socket, glb: dict) -> None:
    """A session branch, forever.  Two roles, one loop (no recursion however many runs):

    holder: keeps the state; forks a spare (an identical copy) with fresh channels, announces
            it, and waits.  If the spare dies (its run was killed), reports how and forks a
            fresh spare from the unchanged state.  A fork request makes a child that holds a
            new branch (a copy of the state and of the workspace).
    spare:  runs one request.  When the run finishes (ok or exception) the spare becomes the
            holder of the new state; the zygote kills the old holder and says ``spawn``.
    """
    await_spawn = False
    while True:
        while await_spawn:  # a finished cell forks its spare only after the host has its reply
            try:
                msg, fds = proto.recv(sock)
            except (OSError, EOFError, proto.ProtocolError):
                os._exit(0)
            Channels.close(fds)
            await_spawn = msg.get("op") != "spawn"
        pid, ch = _fork_spare(lambda: glb, sock, session=True)
        if pid == 0:  # the spare's run finished: this process now holds the state
            machinery_signals(ignore=True)  # and none of the handlers its program set
            sock, await_spawn = ch, True
            continue
        pidfd = _announce(sock, pid, ch)
        while True:
            readable, _, _ = select.select([sock, pidfd], [], [])
            if pidfd in readable:
                os.close(pidfd)
                _, wstatus, ru = os.wait4(pid, 0)
                proto.send(sock, _exit_info(pid, wstatus, ru.ru_utime, ru.ru_stime, ru.ru_maxrss))
                break  # fork a fresh spare from the unchanged state
            try:
                msg, fds = proto.recv(sock)
            except (OSError, EOFError, proto.ProtocolError):
                kill(pid)
                os._exit(0)
            if msg.get("op") == "fork" and len(fds) == 1:
                # The new branch (same state, its own channel and workspace) is forked twice, so
                # that it is not this holder's child: the zygote reaps it when it ends, and a
                # closed branch never lingers as a zombie counted against the pids limit.
                child = os.fork()
                if child == 0:
                    if os.fork() != 0:
                        os._exit(0)
                    os.close(pidfd)
                    sock.close()
                    sock = socket(fileno=fds[0])
                    workspace = str(msg["workspace"])
                    try:
                        copy_tree(os.getcwd(), workspace)
                        os.chdir(workspace)
                    except Exception as exc:  # noqa: BLE001 - the branch says why, then ends
                        proto.send(sock, {"op": "fork_failed", "pid": os.getpid(),
                                          "message": f"{type(exc).__name__}: {exc}"[:500]})
                        os._exit(1)
                    proto.send(sock, {"op": "forked", "pid": os.getpid()})
                    break
                os.waitpid(child, 0)
            Channels.close(fds)




class HeadLost(Exception):
    """A session's holder died (e.g. a cell killed it): that session's state is gone."""


class Head:
    """The zygote's side of a session branch: its holder, its current spare and its channel."""

    def __init__(self, hid: str, pid: int, sock: socket, workspace: str) -> None:
        self.hid, self.pid, self.sock, self.workspace = hid, pid, sock, workspace
        self.spare: int | None = None
        self.exits: dict[int, dict] = {}
        self.forked: int | None = None
        self.fork_error: str | None = None
        self.lost = False

    def pids(self) -> set[int]:
        return {self.pid} | ({self.spare} if self.spare else set())


class Sessions:
    def __init__(self, zygote: "Zygote") -> None:
        self.zygote = zygote
        self.heads: dict[str, Head] = {}
        self.rechecks: list[float] = []
        self.counter = 0
        self.root = CONFIG["workspace"]

    def watch(self) -> list[socket]:
        return [h.sock for h in self.heads.values() if not h.lost]

    def timeout(self) -> float | None:
        return max(0.0, self.rechecks[0] - time.monotonic()) if self.rechecks else None

    def on_timer(self) -> None:
        if self.rechecks and time.monotonic() >= self.rechecks[0]:
            self.rechecks.pop(0)
            continue_stopped([p for h in self.heads.values() if not h.lost for p in h.pids()])

    def _by_sock(self, sock: socket) -> Head | None:
        return next((h for h in self.heads.values() if h.sock is sock), None)

    def on_readable(self, sock: socket) -> None:
        head = self._by_sock(sock)
        if head is None:
            return
        try:
            msg, fds = proto.recv(head.sock)
        except (OSError, EOFError, proto.ProtocolError):
            self._lose(head, "its holder's channel broke")
            return
        # A holder is a former cell: the program's own process, which holds this socket too and
        # may write anything into it.  Only well-formed reports are taken; anything else is noted
        # in the log (rate-limited) and dropped, with its file descriptors.
        problem = holder_report_problem(msg, fds)
        if problem:
            Channels.close(fds)
            log(f"session {head.hid}: dropped a malformed report from its holder ({problem})")
            return
        op, pid = msg["op"], msg["pid"]
        if op == "spare":
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:  # died at once; its holder reports the exit and forks again
                Channels.close(fds)
                return
            head.spare = pid
            self.zygote.send({"op": "spare", "head": head.hid, "pid": pid}, [*fds, pidfd])
            Channels.close([*fds, pidfd])
            return
        Channels.close(fds)
        if op == "cell_exit":
            head.exits[pid] = _exit_info(pid, proto.wait_status(msg.get("status")), proto.seconds(msg.get("utime")),
                                         proto.seconds(msg.get("stime")), int(proto.seconds(msg.get("maxrss"))))
            while len(head.exits) > MAX_EXITS:
                head.exits.pop(next(iter(head.exits)))
        elif op == "forked":
            head.forked = pid
        elif op == "fork_failed":
            head.fork_error = str(msg.get("message"))[:500]

    def _wait(self, head: Head, until, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if head.lost:
                raise HeadLost("the session's state was lost: its holder process is gone")
            if time.monotonic() >= deadline:
                raise HeadLost(f"the session did not answer ({what})")
            self.zygote.pump(deadline, lambda: until() or head.lost)

    def _new_head(self, pid: int, sock: socket) -> Head:
        sock.settimeout(CHILD_IO_S)  # a stopped holder must not hang the zygote mid-frame
        self.counter += 1
        hid = f"h{self.counter}"
        head = Head(hid, pid, sock, os.path.join(self.root, hid))
        self.heads[hid] = head
        return head

    def _head(self, req: dict) -> Head:
        head = self.heads.get(req.get("head"))
        if head is None:
            raise KeyError(f"no such session {req.get('head')!r}")
        if head.lost:
            raise HeadLost("the session's state was lost: its holder process is gone")
        return head

    def new(self, req: dict) -> dict:
        parent, child = proto.socketpair()
        head = self._new_head(0, parent)
        os.mkdir(head.workspace, 0o755)
        pid = os.fork()
        if pid == 0:
            _default_signals()
            parent.close()
            devnull = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1):  # never hold the control socket; fd 2 stays the jail's log
                os.dup2(devnull, fd)
            cell.close_fds({0, 1, 2, child.fileno()})
            forks_cells()
            os.chdir(head.workspace)
            try:
                _holder_main(child, cell.user_globals())
            finally:
                os._exit(0)
        child.close()
        head.pid = pid
        return {"op": "ok", "head": head.hid}

    def fork(self, req: dict) -> dict:
        head = self._head(req)
        parent, child = proto.socketpair()
        branch = self._new_head(0, parent)
        try:
            proto.send(head.sock, {"op": "fork", "workspace": branch.workspace}, (child.fileno(),))
        except OSError:
            del self.heads[branch.hid]
            parent.close()
            raise HeadLost("the session's state was lost: its holder process is gone") from None
        finally:
            child.close()
        try:
            self._wait(branch, lambda: branch.forked is not None or branch.fork_error is not None, SPARE_WAIT_S,
                       "fork")
            if branch.fork_error is not None:
                raise ValueError(f"cannot copy the session's workspace for the new branch ({branch.fork_error})")
        except (HeadLost, ValueError):
            del self.heads[branch.hid]
            parent.close()
            raise
        branch.pid = branch.forked
        return {"op": "ok", "head": branch.hid}

    def done(self, req: dict) -> None:
        head = self.heads.get(req.get("head"))
        used = int(req["cell"])
        finished = bool(req.get("finished"))
        if finished:
            if head is not None and not head.lost:
                kill(head.pid)  # the old state's holder is no longer needed
                head.pid, head.spare = used, None
        else:
            # How the cell ended: as its holder saw it, or, if the program killed the holder, as
            # the zygote saw its orphan.
            exits = head.exits if head is not None else {}
            if head is not None:
                continue_stopped([head.pid])  # a holder the program stopped cannot report
            self.zygote.pump(time.monotonic() + EXIT_WAIT_S, lambda: used in exits or used in REAPED)
            info = exits.pop(used, None) or REAPED.pop(used, {})
            self.zygote.send({"op": "exit", "cell": used,
                              **{k: info.get(k) for k in ("status", "utime", "stime", "maxrss")}})
            if head is not None and not head.lost:
                if head.spare == used:  # (its holder may have announced the next one already)
                    head.spare = None
                if not idle(head.pid):  # the program killed the holder: nothing holds the state
                    self._lose(head, "its holder is gone (the program killed it)")
        # The sweep comes before the holder's next spare: what the run left may hold every pid the
        # jail may have, and the spare's fork would fail.  After a killed run the holder may have
        # forked its next spare already: a holder's direct children are its spares (a cell cannot
        # make one: clone(CLONE_PARENT) is denied), so that holder's are kept without being known
        # yet.  After a finished run the new holder has forked nothing yet: its children are the
        # program's, and go.
        keep: set[int] = set()
        for h in self.heads.values():
            if not h.lost:
                keep |= h.pids()
        forking = head.pid if head is not None and not head.lost and not finished else -1
        kill_strays(lambda pid, ppid: pid in keep or ppid == forking)
        if head is not None and not head.lost:
            if finished:
                try:
                    proto.send(head.sock, {"op": "spawn"})
                except OSError:
                    self._lose(head, "its holder's channel broke")
            try:  # the holder forks its next spare now
                self._wait(head, lambda: head.spare is not None, SPARE_WAIT_S, "spare")
            except HeadLost:
                self._lose(head, "its holder did not fork a spare")
        wipe(CONFIG["tmp"])
        self.zygote.send({"op": "clean", "cell": used})
        now = time.monotonic()
        self.rechecks = [now + delay for delay in RECHECK_S]

    def _lose(self, head: Head, why: str) -> None:
        if not head.lost:
            log(f"session {head.hid} lost: {why}")
            head.lost = True
            self.zygote.send({"op": "lost", "head": head.hid})

    def close(self, req: dict) -> dict:
        head = self.heads.pop(req.get("head"), None)
        if head is not None:
            for pid in head.pids():
                kill(pid)
            head.sock.close()
            wipe(head.workspace)
            try:
                os.rmdir(head.workspace)
            except OSError:
                pass
        return {"op": "ok"}

    def upload(self, req: dict) -> dict:
        """One chunk of a file: offset 0 creates (or empties) it, later chunks extend it."""
        head = self._head(req)
        offset = req.get("offset", 0)
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"bad upload offset {offset!r}")
        cell.write_file(head.workspace, req["name"], binascii.a2b_base64(req["data"]), offset=offset)
        return {"op": "ok"}

    def download(self, req: dict) -> dict:
        """One chunk of a file (``length`` bytes from ``offset``) and the file's size."""
        head = self._head(req)
        offset, length = req.get("offset", 0), req.get("length", 4 << 20)
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and 0 < length <= 16 << 20):
            raise ValueError("bad download offset or length")
        data, size = cell.read_file(head.workspace, req["name"], int(req.get("limit", 64 * 1024 * 1024)),
                                    offset=offset, length=length)
        return {"op": "ok", "data": binascii.b2a_base64(data, newline=False).decode("ascii"), "size": size}


# ----------------------------------------------------------------------------------------------
# the zygote: control channel and event loop
# ----------------------------------------------------------------------------------------------

LOG_BURST, LOG_WINDOW_S = 20, 60.0  # log lines per window; a flood of forged frames is one line
_log_state = [0.0, 0]  # window start, lines in it


def log(message: str) -> None:
    """A line in the jail's log (the host keeps its tail), rate-limited: a program that provokes
    errors on purpose gets LOG_BURST lines a minute, then one note that the rest were dropped."""
    now = time.monotonic()
    if now - _log_state[0] > LOG_WINDOW_S:
        _log_state[0], _log_state[1] = now, 0
    _log_state[1] += 1
    if _log_state[1] <= LOG_BURST:
        line = f"jailcell zygote: {message[:500]}\n"
    elif _log_state[1] == LOG_BURST + 1:
        line = f"jailcell zygote: further messages dropped for up to {LOG_WINDOW_S:g} s\n"
    else:
        return
    try:
        os.write(2, line.encode("utf-8", "replace"))
    except OSError:
        pass


def host_gone() -> None:
    """The host closed the jail (or died): so goes everything in it.  In a pid namespace the kernel
    kills every process of the jail when its first process exits; without one, the zygote does."""
    if not CONFIG.get("pid_namespace"):
        kill_strays(lambda pid, ppid: False)
    os._exit(0)


class Zygote:
    def __init__(self, ctl: socket) -> None:
        self.ctl = ctl
        self.engine: Stateless | Sessions | None = None
        # SIGCHLD wakes the event loop (through this pipe), which reaps at once: no zombie lingers
        # into the next run, and the exit of an orphaned cell is known.
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def send(self, obj: dict, fds=()) -> None:
        try:
            proto.send(self.ctl, obj, fds)
        except OSError:
            host_gone()

    def pump(self, deadline: float, until) -> None:
        """Serve the engine's sockets and reap children (not the host's channel) until ``until()``
        or the deadline."""
        while not until():
            socks = self.engine.watch()
            readable, _, _ = select.select([*socks, self.wake_r], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                return
            for sock in readable:
                if sock is self.wake_r:
                    self._reap()
                else:
                    self.engine.on_readable(sock)

    def _reap(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        _reap_nohang()

    def handle(self, req: dict) -> dict | None:
        op = req.get("op")
        engine = self.engine
        if op == "done":
            try:
                engine.done(req)
            except Exception as exc:  # noqa: BLE001 - the sweep failed: this jail cannot be trusted
                self.send({"op": "broken", "message": f"{type(exc).__name__}: {exc}"})
            return None
        if op in ("new", "fork", "close", "upload", "download") and isinstance(engine, Sessions):
            return getattr(engine, op)(req)
        if op == "ping":
            return {"op": "pong"}
        if op == "shutdown":
            self.send({"op": "bye"})
            os._exit(0)
        return {"op": "error", "type": "ValueError", "message": f"unknown request {op!r}"}

    def serve_forever(self) -> None:
        while True:
            socks = {s.fileno(): s for s in self.engine.watch()}
            poller = select.poll()
            poller.register(self.ctl.fileno(), select.POLLIN)
            poller.register(self.wake_r, select.POLLIN)
            for fd in socks:
                poller.register(fd, select.POLLIN)
            timeout = self.engine.timeout()
            events = poller.poll(None if timeout is None else timeout * 1000)
            try:
                if not events:
                    self.engine.on_timer()
                for fd, _ev in events:
                    if fd in socks:
                        self.engine.on_readable(socks[fd])
                    elif fd == self.wake_r:
                        self._reap()
            except Exception as exc:  # noqa: BLE001 - never die of a child's misbehaviour
                log(f"{type(exc).__name__}: {exc}")
            if not any(fd == self.ctl.fileno() for fd, _ev in events):
                continue
            try:
                req, fds = proto.recv(self.ctl)
            except (EOFError, OSError, proto.ProtocolError):
                host_gone()
            Channels.close(fds)
            try:
                reply = self.handle(req)
            except Exception as exc:  # noqa: BLE001 - a bad request must never take the zygote down
                reply = {"op": "error", "type": type(exc).__name__, "message": str(exc)}
            if reply is not None:
                self.send(reply)


# ----------------------------------------------------------------------------------------------
# start-up
# ----------------------------------------------------------------------------------------------

def _preload(modules: list[str]) -> dict:
    loaded, failed = [], {}
    for name in modules:
        try:
            __import__(name)
            loaded.append(name)
        except Exception as exc:  # noqa: BLE001 - report, do not die: the policy says "if installed"
            failed[name] = f"{type(exc).__name__}: {exc}"
    return {"loaded": loaded, "failed": failed}


# Signals a process of the jail's machinery (nursery, holders, waiting spares) ignores, so that a
# cell, which may name it by pid, cannot stop or end it with them: every signal whose default is
# to end or stop a process, but for the ones only faults raise.  SIGKILL and SIGSTOP cannot be
# ignored: a killed nursery or spare is replaced, a stopped one is continued by the sweep.  SIGPIPE
# and SIGXFSZ stay ignored in cells too (Python's own start-up does that).
_IGNORED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM,
            signal.SIGTERM, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGXCPU, signal.SIGVTALRM,
            signal.SIGPROF, signal.SIGIO, signal.SIGPWR, signal.SIGSTKFLT,
            *range(signal.SIGRTMIN, signal.SIGRTMAX + 1))


def machinery_signals(ignore: bool) -> None:
    disposition = signal.SIG_IGN if ignore else signal.SIG_DFL
    for sig in _IGNORED:
        try:
            signal.signal(sig, disposition)
        except (OSError, ValueError):
            pass


def forks_cells() -> None:
    """This process (the nursery, a session's first holder) forks cells from now on: ignore the
    signals cells could send it, and stack the cell filter that every cell inherits.  A process
    that cannot get the filter exits: no cell may ever run without it."""
    cell.prepare()
    cell.hide_jail()
    machinery_signals(ignore=True)
    try:
        _seccomp.install()
    except OSError as exc:
        os.write(2, f"jailcell: {exc}\n".encode())
        os._exit(NO_FILTER_EXIT)


NO_FILTER_EXIT = 125


def _default_signals() -> None:
    """In a child of the zygote (nursery, holder): none of the zygote's SIGCHLD arrangements."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _batch_scheduling() -> None:
    """Every process of the jail runs as SCHED_BATCH (children inherit it): woken by the host, it
    never preempts the host on its CPU -- a sweep or a fork after a run waits until the host has
    handed the result over (or uses another CPU) instead of delaying it.  Cells are scheduled the
    same way, as batch work."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError):
        pass


def _harden() -> None:
    # The host controls the zygote; cells must not.  Default dispositions make pid 1 of a pid
    # namespace immune to signals sent from inside it; Python's SIGINT handler would undo that.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)

    cell.prctl(cell.PR_SET_DUMPABLE, 0)  # no /proc/1/mem, no ptrace from cells (seccomp denies it too)
    if not CONFIG.get("pid_namespace"):
        cell.prctl(cell.PR_SET_CHILD_SUBREAPER, 1)  # orphans come back to us, so strays can be found
        cell.prctl(cell.PR_SET_PDEATHSIG, signal.SIGKILL)


def _add_site_dirs(paths: list[str]) -> None:
    """What site.main() would add -- the host computed it (site directories and the plain path lines
    of their .pth files, in order; never the executable ``import`` lines)."""
    for path in paths:
        if path not in sys.path and os.path.isdir(path):
            sys.path.append(path)
    import site  # with -S, importing site does not run it; it still provides exit/quit/help

    site.setquit()
    site.setcopyright()
    site.sethelper()


def main() -> None:
    global CONFIG
    ctl = socket(fileno=os.dup(0))
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1):  # the control socket is only ever used through ``ctl``
        os.dup2(devnull, fd)
    os.close(devnull)
    CONFIG, _ = proto.recv(ctl)
    cell.CONFIG.update(CONFIG)
    _add_site_dirs(CONFIG.get("sys_path", []))
    cell.STATE["trusted_prefixes"] = tuple(p.rstrip("/") + "/" for p in CONFIG.get("trusted_paths", [])) \
        or ("/nonexistent/",)
    _harden()
    _batch_scheduling()
    os.chdir(CONFIG["workspace"])
    t0 = time.monotonic()
    preload = _preload(CONFIG.get("preload", []))
    if CONFIG.get("code_mode") == "restricted":
        import _restricted  # compile RestrictedPython once, not per cell

        cell.STATE["run_restricted"] = _restricted.run_restricted
    cell.install_import_guard()
    cell.STATE["hide"] = cell.blocked_loaded_modules()
    cell.PRISTINE_BUILTINS.update(__import__("builtins").__dict__)  # as cells start (guard included)
    if CONFIG.get("session"):
        cell.complete_image()  # a stateless jail's nursery does it once its first spare is out
    gc.collect()
    gc.freeze()  # preloaded objects: never scanned by a cell's GC, so never copied on write
    zygote = Zygote(ctl)
    zygote.engine = Sessions(zygote) if CONFIG.get("session") else Stateless(zygote)
    zygote.send({"op": "ready", "version": proto.VERSION, "pid": os.getpid(), "preload": preload,
                 "preload_s": round(time.monotonic() - t0, 4), "python": sys.version.split()[0]})
    zygote.serve_forever()


if __name__ == "__main__":
    main()
