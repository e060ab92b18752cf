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
    fit,
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


def _nursery_child(sock: socket, before=None) -> None:
    """In a newly forked nursery: hold nothing of the zygote's, then serve (never returns)."""
    default_signals()
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1):  # never hold the control socket
        os.dup2(devnull, fd)
    cell.close_fds({0, 1, 2, sock.fileno()})
    try:
        if before is not None:
            before()
        _nursery_main(sock, POOL_SIZE)
    finally:
        os._exit(0)


def fork_nursery(before=None) -> tuple[int, socket] | None:
    """Fork a nursery from the zygote as it is now; it runs ``before()`` first (the slim nursery,
    forked before the heavy preloads, finishes its own image so) and then forks spare cells.
    Returns (pid, the zygote's end of its channel), or None if it could not be forked (e.g. the pids
    limit, while a program fills it)."""
    parent, child = proto.socketpair()
    try:
        pid = cell.fork_expendable()
    except OSError:
        parent.close()
        child.close()
        return None
    if pid == 0:
        parent.close()
        _nursery_child(child, before)
    child.close()
    return pid, parent


class Nursery:
    """A nursery as the zygote sees it: its pid, its channel, and whether its image is the slim one."""

    def __init__(self, pid: int, sock: socket, slim: bool) -> None:
        self.pid, self.sock, self.slim = pid, sock, slim
        sock.settimeout(CHILD_IO_S)  # a stopped nursery must not hang the zygote mid-frame


class Stateless:
    """Runs in fresh cells forked from a nursery; after each run the jail is swept clean.

    The full nursery is the zygote's image (every preload); a jail whose policy preloads heavy
    packages has a slim one too, forked before those were loaded.  A lost full nursery is replaced
    at the sweep (or a second later if no sweep comes); a jail that lost its slim one (whose image
    is gone) or more than one nursery in a run is retired after that run (the host replaces the
    jail).  No process of the jail is ever dumpable: a nursery forked while a program runs cannot
    be reached through /proc either."""

    def __init__(self, zygote, slim: tuple[int, socket] | None = None) -> None:
        self.zygote = zygote
        self.workspace = cell.CONFIG["workspace"]
        self.full: Nursery | None = None
        self.slim: Nursery | None = Nursery(*slim, slim=True) if slim else None
        self.spares: dict[int, Nursery] = {}  # announced to the host, not used yet -> its nursery
        self.exits: dict[int, dict] = {}
        self.restart_at: float | None = None
        self.rechecks: list[float] = []  # when to look again for processes a program stopped
        self.had_slim = self.slim is not None
        self.losses = 0  # nurseries lost since the last sweep
        self._start_nursery()

    def nurseries(self) -> list[Nursery]:
        return [n for n in (self.full, self.slim) if n is not None]

    def _start_nursery(self) -> None:
        forked = fork_nursery()
        if forked is None:  # try again shortly
            self.restart_at = time.monotonic() + NURSERY_RETRY_S
            return
        self.full, self.restart_at = Nursery(*forked, slim=False), None

    def _lose(self, nursery: Nursery) -> None:
        """A nursery is gone (a program killed it).  Its spares are orphans now; the sweep after the
        run kills them and withdraws them from the host (and starts a new full nursery)."""
        nursery.sock.close()
        kill(nursery.pid)
        self.losses += 1
        if nursery is self.full:
            self.full = None
            self.restart_at = time.monotonic() + NURSERY_RETRY_S  # in case no sweep comes
        elif nursery is self.slim:
            self.slim = None

    def watch(self) -> list[socket]:
        return [n.sock for n in self.nurseries()]

    def timeout(self) -> float | None:
        due = [t for t in (self.restart_at, *self.rechecks[:1]) if t is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def on_timer(self) -> None:
        now = time.monotonic()
        if self.restart_at is not None and now >= self.restart_at and self.full is None:
            self._start_nursery()
        if self.rechecks and now >= self.rechecks[0]:
            self.rechecks.pop(0)
            continue_stopped([n.pid for n in self.nurseries()] + list(self.spares))

    def on_readable(self, sock: socket) -> None:
        nursery = next((n for n in self.nurseries() if n.sock is sock), None)
        if nursery is None:
            return
        try:
            (kind, *record), fds = recv_record(sock)
        except (EOFError, OSError):
            self._lose(nursery)
            return
        pid = record[0]
        if kind == SPARE and len(fds) == 4:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                Channels.close(fds)
                self._credit(nursery)
                return
            self.spares[pid] = nursery
            self.zygote.send({"op": "spare", "head": None, "pid": pid, "slim": nursery.slim}, [*fds, pidfd])
            Channels.close([*fds, pidfd])
        elif kind == CHILD_EXIT:
            self.exits[pid] = exit_info(*record)
            if len(self.exits) > MAX_EXITS:  # exits nobody asked for (cells killed after a finished run)
                self.exits.pop(next(iter(self.exits)))
        else:
            Channels.close(fds)

    def _credit(self, nursery: Nursery) -> None:
        if nursery not in self.nurseries():
            return
        try:
            nursery.sock.send(CREDIT)
        except OSError:  # the nursery died just now
            self._lose(nursery)

    def done(self, req: dict) -> None:
        used = int(req["cell"])
        owner = self.spares.pop(used, None)
        credits = [owner] if owner is not None and owner in self.nurseries() else []
        if not req.get("finished"):
            self.zygote.send({"op": "exit", **self._exit_of(used)})
        nurseries = {n.pid for n in self.nurseries()}
        # Keep the nurseries and their children that have not run anything (spares, possibly not yet
        # announced); everything else -- the used cell and whatever it left -- dies.
        table = kill_strays(lambda pid, ppid: pid in nurseries or (ppid in nurseries and pid != used), first=(used,))
        kept = lambda pid: pid in table and fit(table[pid])  # noqa: E731 - as idle(pid), from the sweep's last scan
        for nursery in self.nurseries():
            if not kept(nursery.pid):
                self._lose(nursery)
        if self.full is None:
            self._start_nursery()  # it starts with its spares' credits
        credits = [n for n in credits if n in self.nurseries()]
        wipe(self.workspace)
        wipe(cell.CONFIG["tmp"])
        for pid, parent in list(self.spares.items()):
            if parent not in self.nurseries() or not kept(pid):  # an orphan of a lost nursery, or killed
                kill(pid)
                del self.spares[pid]
                self.zygote.send({"op": "drop", "pid": pid})
                if parent in self.nurseries():
                    credits.append(parent)
        self._retire_if_attacked()
        self.zygote.send({"op": "clean", "cell": used})
        for nursery in credits:
            self._credit(nursery)
        now = time.monotonic()
        self.rechecks = [now + delay for delay in RECHECK_S]

    def _retire_if_attacked(self) -> None:
        """A program killed the slim nursery (its image cannot be made again: a new jail has it), or
        more than one nursery in one run: the host retires this jail after the run instead of trusting
        it, and the next run gets a new one."""
        lost, self.losses = self.losses, 0
        if (self.had_slim and self.slim is None) or lost > 1:
            what = "the slim nursery" if self.had_slim and self.slim is None else f"{lost} nurseries"
            self.zygote.send({"op": "broken", "message": f"retired: a program killed {what} of this jail"})
            self.had_slim = False  # said once

    def _exit_of(self, pid: int) -> dict:
        """How a cell that did not finish ended: as its parent (a nursery) saw it, or, if a program
        killed that nursery, as the zygote saw its orphan.  Stopped nurseries are continued first:
        they cannot report while stopped."""
        continue_stopped([n.pid for n in self.nurseries()])
        self.zygote.pump(time.monotonic() + EXIT_WAIT_S, lambda: pid in self.exits or pid in REAPED)
        info = self.exits.pop(pid, None) or REAPED.pop(pid, {})
        return {"cell": pid, **{k: info.get(k) for k in ("status", "utime", "stime", "maxrss")}}
