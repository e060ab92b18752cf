"""Session jails: each branch of a session is a holder process that keeps the program's globals and
forks one spare at a time; a finished run's cell becomes the next holder.  Stdlib only; runs inside
the jail."""

from __future__ import annotations

import binascii
import builtins
import os
import select
import time
from _socket import socket

import _cell as cell
import _files as files
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
    log,
    machinery_signals,
)
from _spares import CHILD_IO_S, EXIT_WAIT_S, Channels, announce, fork_spare, forks_cells
from _sweep import copy_tree, wipe

# Builtins of its own (as every in-jail module): a program that replaces builtins.len does not change
# what this code sees.
__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]

SPARE_WAIT_S = 30.0  # how long a session holder may take to fork its next spare

HOLDER_OPS = ("spare", "cell_exit", "forked", "fork_failed")


def holder_report_problem(msg, fds) -> str | None:
    """What is wrong with a report from a session's holder (a former cell: it may be forged), or None."""
    if not isinstance(msg, dict):
        return f"a {type(msg).__name__}, not an object"
    op, pid = msg.get("op"), msg.get("pid")
    if op not in HOLDER_OPS:
        return f"unknown op {str(op)[:40]!r}"
    if not (proto.is_int(pid) and 0 < pid < 1 << 22):  # type: ignore[operator]
        return f"op {op!r} without a valid pid"
    if fds and (op != "spare" or len(fds) != 4):
        return f"{len(fds)} file descriptors with op {op!r}"
    if op == "spare" and len(fds) != 4:
        return "a spare without its 4 channels"
    return None


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
        pid, ch = fork_spare(lambda: glb, sock, session=True)
        if pid == 0:  # the spare's run finished: this process now holds the state
            machinery_signals(ignore=True)  # and none of the handlers its program set
            cell.never_dumpable()  # as it was (its filter denies the program making it dumpable)
            sock, await_spawn = ch, True
            continue
        pidfd = announce(sock, pid, ch)
        while True:
            readable, _, _ = select.select([sock, pidfd], [], [])
            if pidfd in readable:
                os.close(pidfd)
                _, wstatus, ru = os.wait4(pid, 0)
                proto.send(sock, exit_info(pid, wstatus, ru.ru_utime, ru.ru_stime, ru.ru_maxrss))
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
    def __init__(self, zygote) -> None:
        self.zygote = zygote
        self.heads: dict[str, Head] = {}
        self.rechecks: list[float] = []
        self.counter = 0
        self.root = cell.CONFIG["workspace"]

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
            head.exits[pid] = exit_info(pid, proto.wait_status(msg.get("status")), proto.seconds(msg.get("utime")),
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
        head = self.heads.get(str(req.get("head")))
        if head is None:
            raise KeyError(f"no such session {req.get('head')!r}")
        if head.lost:
            raise HeadLost("the session's state was lost: its holder process is gone")
        return head

    def new(self, req: dict) -> dict:
        parent, child = proto.socketpair()
        head = self._new_head(0, parent)
        os.mkdir(head.workspace, 0o755)
        pid = cell.fork_expendable()
        if pid == 0:
            default_signals()
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
        branch.pid = branch.forked or 0  # (set: the wait above returned)
        return {"op": "ok", "head": branch.hid}

    def done(self, req: dict) -> None:
        head = self.heads.get(str(req.get("head")))
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
        wipe(cell.CONFIG["tmp"])
        self.zygote.send({"op": "clean", "cell": used})
        now = time.monotonic()
        self.rechecks = [now + delay for delay in RECHECK_S]

    def _lose(self, head: Head, why: str) -> None:
        if not head.lost:
            log(f"session {head.hid} lost: {why}")
            head.lost = True
            self.zygote.send({"op": "lost", "head": head.hid})

    def close(self, req: dict) -> dict:
        head = self.heads.pop(str(req.get("head")), None)
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
        files.write_file(head.workspace, req["name"], binascii.a2b_base64(req["data"]), offset=offset)
        return {"op": "ok"}

    def download(self, req: dict) -> dict:
        """One chunk of a file (``length`` bytes from ``offset``) and the file's size."""
        head = self._head(req)
        offset, length = req.get("offset", 0), req.get("length", 4 << 20)
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and 0 < length <= 16 << 20):
            raise ValueError("bad download offset or length")
        data, size = files.read_file(head.workspace, req["name"], int(req.get("limit", 64 * 1024 * 1024)),
                                    offset=offset, length=length)
        return {"op": "ok", "data": binascii.b2a_base64(data, newline=False).decode("ascii"), "size": size}
