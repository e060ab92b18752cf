"""What a session carries from one run to the next besides its Python objects, as one process would:
the files its program holds open (with their offsets) and ``random``'s state.  Stdlib only; runs
inside the jail, in session cells and holders.

A finished run's cell becomes the holder of the session's state (``_sessions.py``); the next run is a
fork of it.  So the program's file descriptors are already there in the next cell; what would break
them is jailcell's own set-up of a cell, which closes every descriptor it does not know (``become``)
and so is told which ones are the program's (``kept()``).  The fork shares each open file's offset
with the holder: a run that is killed must not leave the state it returns to with moved offsets, so
each run starts by putting the holder's offsets back (``before_run``).  CPython reseeds ``random`` in
every forked child; a session's spare puts the holder's state back (``after_fork``).

Not carried: threads (fork copies only the calling thread; a lost thread's ``join`` says so), the
contents of files (a killed run's writes stay written), data a killed run read from a pipe or socket,
and descriptors 0-3 (the run's stdin, stdout, stderr and result channel).
"""

from __future__ import annotations

import builtins
import os
import resource
import select
import stat
import sys

# Builtins of its own (as every in-jail module): a program that replaces builtins.len does not change
# what this code sees.
__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]

FIRST_KEPT = 4            # 0-3 are the run's stdio and result channel in every cell
MAX_PROBE = 1 << 16       # descriptors looked at, at most (the policy's open_files limit is lower)

_kept: set[int] = set()          # the program's open descriptors when the state was taken
_offsets: dict[int, int] = {}    # of those that are regular files: their offsets then
_ended: dict[int, int] = {}      # the offsets of those at the end of this cell's run, before its report


def kept() -> set[int]:
    """The program's descriptors that a session cell must not close."""
    return set(_kept)


def _open_fds() -> list[int]:
    """Every open descriptor below the open-files limit: one poll() over all of them, where a closed one
    answers POLLNVAL (/proc is out of a landlock cell's reach; 40 us for 256, a fcntl each took 200)."""
    limit = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], MAX_PROBE)
    poller = select.poll()
    for fd in range(limit):
        poller.register(fd, 0)
    closed = {fd for fd, events in poller.poll(0) if events & select.POLLNVAL}
    return [fd for fd in range(limit) if fd not in closed]


def take(machinery: set[int]) -> None:
    """After a finished session run's report, in the cell that becomes the holder (off the run's
    critical path): the program's descriptors now (all but ``machinery`` and 0-3) and their offsets are
    the state's.  An offset the state had before may be shared with another branch, whose run may start
    as soon as the host has this report: it was read before the report (``after_run``).  The files this
    run opened are this process's alone."""
    global _kept, _offsets
    _kept = {fd for fd in _open_fds() if fd >= FIRST_KEPT and fd not in machinery}
    _offsets = {}
    for fd in _kept:
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                _offsets[fd] = _ended[fd] if fd in _ended else os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:
            pass


def before_run() -> None:
    """In a session cell as its request arrives: the offsets the state had (a killed run, or another
    branch of the session, may have moved the shared ones since)."""
    for fd, offset in _offsets.items():
        try:
            os.lseek(fd, offset, os.SEEK_SET)
        except OSError:
            pass


def random_state():
    """``random``'s state in a holder about to fork a spare (None if the program never imported it)."""
    module = sys.modules.get("random")
    inst = getattr(module, "_inst", None)
    try:
        return inst.getstate() if inst is not None else None
    except Exception:  # noqa: BLE001 - a program that broke random's instance keeps what it did
        return None


def after_fork(state) -> None:
    """In a session's new spare: the holder's ``random`` state, which CPython's fork hook reseeded."""
    if state is None:
        return
    try:
        sys.modules["random"]._inst.setstate(state)
    except Exception:  # noqa: BLE001
        pass


def after_run() -> None:
    """At the end of a session run, before its report (so: cheap): the offsets of the files the state
    already had (``take`` keeps them), and the threads that will not survive into the next run, named
    on stderr."""
    global _ended
    _ended = {}
    for fd in _offsets:
        try:
            _ended[fd] = os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:
            pass
    lost = lost_threads()
    if lost:
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - the program's stderr object: the warning goes to fd 2 anyway
            pass
        os.write(2, f"jailcell: {len(lost)} thread(s) still running when this run ended ({', '.join(lost[:5])}) "
                    "do not survive into the session's next run: a session keeps the main thread only\n".encode())


def lost_threads() -> list[str]:
    """At the end of a session run: the threads besides the main one that are still running (they do
    not survive into the next run).  Each is marked so that joining it later says why."""
    threading = sys.modules.get("threading")
    if threading is None:
        return []
    main = threading.main_thread()
    lost = [t for t in threading.enumerate() if t is not main and t.is_alive()]
    for t in lost:
        name = t.name

        def join(timeout=None, _name=name):
            raise RuntimeError(f"thread {_name!r} was running when the session run that started it ended, and "
                               "threads do not survive into the next run (a session keeps the main thread's "
                               "state only): finish its work within one run")
        try:
            t.join = join
        except Exception:  # noqa: BLE001 - a Thread subclass with __slots__: the warning still says so
            pass
    return [t.name for t in lost]
