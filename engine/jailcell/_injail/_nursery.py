"""Stateless jails: a nursery forks spare cells ahead of demand; after each run the zygote sweeps
the jail clean.  Stdlib only; runs inside the jail."""

from __future__ import annotations

import builtins
import gc
import os
import select
import struct
import time
from _socket import CMSG_LEN, SCM_RIGHTS, SOL_SOCKET, socket

import _cell as cell
import _guard as guard
import _protocol as proto
from _procs import (
    MAX_EXITS,
    REAPED,
    RECHECK_S,
    continue_stopped,
    default_signals,
    exit_info,
    idle,
    kill,
    kill_strays,
)
from _spares import CHILD_IO_S, EXIT_WAIT_S, Channels, fork_spare, forks_cells
from _sweep import wipe

# Builtins of its own (as every in-jail module): a program that replaces builtins.len does not change
# what this code sees.
__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]

NURSERY_RETRY_S = 1.0   # a lost nursery is replaced at the next sweep, or after this
POOL_SIZE = 2           # spare cells kept ready in a stateless jail
BACK_TO_BACK_S = 0.005  # spares taken less than this apart: the next spare rehearses only if idle

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
            pid, ch = fork_spare(cell.user_globals, sock, session=False, rehearse=rehearse)
            pidfd = _announce_spare(sock, pid, ch)
            children[pidfd] = pid
            poller.register(pidfd, select.POLLIN)
            credits -= 1
            if not complete:  # the jail's first spare is out: now what only some runs need
                guard.complete_image(nursery=True)
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

    def __init__(self, zygote) -> None:
        self.zygote = zygote
        self.workspace = cell.CONFIG["workspace"]
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
            default_signals()
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
            self.exits[pid] = exit_info(*record)
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
        wipe(cell.CONFIG["tmp"])
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
