"""Spare cells: the channels a cell gets, the fork that makes it, and how its parent hands it on.
Stdlib only; runs inside the jail (in the nursery and in session holders)."""

from __future__ import annotations

import builtins
import fcntl
import os
import select
import time
from _socket import socket

import _carry as carry
import _cell as cell
import _guard as guard
import _protocol as proto
import _seccomp
from _procs import machinery_signals, reap_nohang

# Builtins of its own (as every in-jail module): a program that replaces builtins.len does not change
# what this code sees.
__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]

REHEARSE_AFTER_S = 0.01  # a spare forked back to back rehearses only if no request came this long
NO_FILTER_EXIT = 125     # a process that forks cells exits so when it cannot get the cell filter
SPARE_BROKEN = 122       # a spare exits so when it could not get ready (it ran no program)
SCOPED_ABI = 6           # Landlock scopes signals from this ABI on


EXIT_WAIT_S = 2.0  # how long a dead cell's parent may take to report its exit status
CHILD_IO_S = 2.0   # the zygote never blocks longer on a nursery's or holder's socket
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


LEFTOVERS_WAIT_S = 2.0  # a session holder waits at most this long for its program's killed leftovers to end


def _reap_leftovers() -> None:
    """In a session holder about to fork its next spare: its children now are the processes its program
    left, which the sweep has killed.  Wait (bounded) until every one has ended and is reaped: until then
    each holds one of the jail's pids, and the next run's own fork() would find none free (a zombie is
    reaped only by its parent, this holder, which otherwise reaps only when it forks)."""
    deadline = time.monotonic() + LEFTOVERS_WAIT_S
    while True:
        reap_nohang()
        try:  # (WNOWAIT: only whether any child is left, without reaping it here)
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.001)


def _fork(reap: bool) -> int:
    """os.fork(), again after a moment while the jail's pids are all taken (EAGAIN): the sweep
    after a fork-happy run frees them.  ``reap``: this process (a session holder, which has no
    other child it waits for) first reaps what its program left, killed by the sweep."""
    if reap:
        _reap_leftovers()
    deadline, delay = time.monotonic() + FORK_RETRY_S, 0.001
    while True:
        if reap:
            reap_nohang()
        try:
            return os.fork()
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def fork_spare(glb_factory, parent_sock: socket, session: bool, rehearse: bool = True):
    """Fork a spare cell; returns ``(pid, channels)`` in the parent.

    In a stateless spare this never returns.  In a session spare it returns ``(0, socket)``
    after a finished run: the process is now the holder of the new state, talking to the
    zygote over ``socket`` (the holder's channel, moved out of the way of the cell's fds)."""
    ch = Channels()
    randomness = carry.random_state() if session else None  # (CPython reseeds random in every child)
    try:
        pid = _fork(reap=session)
    except OSError:
        Channels.close([*ch.host_ends(), *ch.cell_ends()])
        raise
    if pid == 0:
        Channels.close(ch.host_ends())
        carry.after_fork(randomness)  # a session continues its random stream; stateless cells do not
        try:
            cell.enter_landlock()  # (the landlock backend: the cell's own domain, before anything else)
        except BaseException:  # noqa: BLE001 - never a cell without its domain
            os._exit(SPARE_BROKEN)
        sock_fd = parent_sock.detach()  # the fd is re-numbered (or closed) by become()
        req, sock_fd = cell.become(*ch.cell_ends(), keep=(sock_fd,), stdio=session)
        if not session:
            os.close(sock_fd)
        os.setpgid(0, 0)  # os.kill(0, ...) from the program reaches its own processes only
        try:
            machinery_signals(ignore=False)
            # Rehearse a request: the pages it writes are copied now, while the spare waits, instead of
            # on the next run's path.  When runs come back to back the request is due in a moment and
            # a rehearsal would only add its own CPU time, so such a spare rehearses only if no request
            # has come within REHEARSE_AFTER_S (an LLM tool loop's next call comes much later).
            if rehearse or not select.select([req], [], [], REHEARSE_AFTER_S)[0]:
                cell.warm_up(session)  # its request carries the usual CPU limit: set now, while idle
            else:
                guard.hide_blocked_modules()
        except BaseException:  # noqa: BLE001 - a spare that is not ready never runs a program; its
            os._exit(SPARE_BROKEN)  # exit status says so (never 0, which a program's exit would be)
        try:
            cell.serve(req, glb_factory(), session)
        except BaseException:  # noqa: BLE001 - the request pipe broke: nothing to report to
            os._exit(0)
        if not session:
            # Park: the zygote kills this process after the host has its reply, so the exit
            # teardown of a large address space is not on the request's critical path.
            while True:
                time.sleep(3600)
        carry.take({sock_fd})  # the program's open files (and offsets) are now the state's
        devnull = os.open("/dev/null", os.O_RDWR)  # a holder keeps none of the run's channels
        for fd in (0, 1, 2, cell.RES_FD):
            os.dup2(devnull, fd)
        os.close(devnull)
        return 0, socket(fileno=sock_fd)
    Channels.close(ch.cell_ends())
    return pid, ch


def announce(sock: socket, pid: int, ch: Channels) -> int:
    """Hand a new spare's channels to the zygote (which passes them on to the host); returns a
    pidfd on the spare."""
    try:
        proto.send(sock, {"op": "spare", "pid": pid}, ch.host_ends())
    except OSError:
        os._exit(0)  # the zygote is gone
    Channels.close(ch.host_ends())
    return os.pidfd_open(pid)


def forks_cells() -> None:
    """This process (the nursery, a session's first holder) forks cells from now on: ignore the
    signals cells could send it, and stack the cell filter that every cell inherits.  A process
    that cannot get the filter exits: no cell may ever run without it."""
    cell.prepare()
    guard.hide_jail()
    machinery_signals(ignore=True)
    try:
        spec = cell.CONFIG.get("landlock")
        _seccomp.install(landlock=bool(spec), unscoped=bool(spec) and int(spec.get("abi", 0)) < SCOPED_ABI,
                         no_memfd=bool(cell.CONFIG.get("rlimit_as_mib")))
        if cell.CONFIG.get("landlock"):  # (its filter denies metadata calls by path: a session's first holder
            cell.metadata_by_fd()        # copies a workspace for fork() through fds, as its cells do)
            cell.landlock_ruleset()
    except OSError as exc:
        os.write(2, f"jailcell: {exc}\n".encode())
        os._exit(NO_FILTER_EXIT)

