"""The jail's processes as the zygote and the holders see them: /proc, killing, reaping, signals and
the jail's log.  Stdlib only; runs inside the jail."""

from __future__ import annotations

import _signal as signal  # not signal.py, whose enums cost ~4 ms at every jail start
import builtins
import os
import time

# Builtins of its own (as every in-jail module): a program that replaces builtins.len does not change
# what this code sees.
__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]

MAX_EXITS = 1000  # exits kept for a later question (cells killed after a finished run), at most

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
        return fit(_stat_fields(pid))
    except OSError:
        return False


def fit(fields: list[bytes]) -> bool:
    """``idle`` from the fields of a /proc/<pid>/stat read already (a sweep's scan)."""
    try:
        return chr(fields[0][0]) not in ("Z", "X") and not int(fields[6]) & PF_EXITING \
            and not int(fields[28]) & SIGKILL_BIT
    except (ValueError, IndexError):
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


WALK = {"from": 0}  # without a pid namespace (landlock, process backends): the zygote's pid, whose tree is walked


def _process_table() -> dict[int, list[bytes]]:
    """pid -> the fields of its /proc/<pid>/stat after the command name (state [0], ppid [1]) for every
    process this /proc shows (the jail's own in a pid namespace), or, without one, for every process
    below the zygote (a subreaper: what a run leaves comes back to it), found through the children
    files -- not all of the machine's processes."""
    if WALK["from"]:
        return _tree_table(WALK["from"])
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                rest = _stat_fields(name)
                int(rest[1])  # a ppid that parses, or the entry is left out
                table[int(name)] = rest
            except (OSError, ValueError, IndexError):
                continue
    return table


def _tree_table(root: int) -> dict[int, list[bytes]]:
    table: dict[int, list[bytes]] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    kids = f.read().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid in table:
                    continue
                try:
                    rest = _stat_fields(str(kid))
                    int(rest[1])
                except (OSError, ValueError, IndexError):
                    continue
                table[kid] = rest
                todo.append(kid)
    return table


def _descendants(root: int, table: dict[int, list[bytes]]) -> list[int]:
    """Live (non-zombie) processes below ``root``."""
    children: dict[int, list[int]] = {}
    for pid, fields in table.items():
        children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            if chr(table[child][0][0]) not in ("Z", "X"):
                out.append(child)
    return out


REAPED: dict[int, dict] = {}  # how the zygote's own children ended (orphans included), newest last


def reap_nohang() -> None:
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
        REAPED[pid] = exit_info(pid, wstatus, ru.ru_utime, ru.ru_stime, ru.ru_maxrss)
        while len(REAPED) > MAX_EXITS:
            REAPED.pop(next(iter(REAPED)))


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_strays(keep, first: tuple[int, ...] = ()) -> dict[int, list[bytes]]:
    """Kill every process of this jail below the zygote for which ``keep(pid, ppid)`` is false,
    wait until each is exiting (not until its teardown is over: that happens off the request
    path, while the next run may already be going), and continue the ones kept (the program may
    have stopped them).  ``first``: strays known already (the used cell), killed before the scan.

    Each scan of /proc comes after every process killed so far is exiting, so nothing of the run
    can signal or fork after the last one: it is returned (pid -> /proc stat fields), and the
    sweep judges the kept processes from it.  A scan that finds new strays kills them and, once
    they are exiting, scans again (for anything they forked in the meantime)."""
    me = os.getpid()
    killed: set[int] = set(first)
    for pid in first:
        kill(pid)
    pending = list(first)
    attempts = 0  # bounded, as a process stuck in the kernel may never get to exit
    while True:
        while pending and attempts < 5000:
            pending = [p for p in pending if not _exiting(p)]
            if not pending:
                break
            attempts += 1
            reap_nohang()
            for pid in pending:  # again (harmless; covers a reused pid)
                kill(pid)
            if attempts > 20:
                time.sleep(0.0002)
            else:
                os.sched_yield()  # a killed process queued on this CPU gets to exit now
        table = _process_table()
        below = _descendants(me, table)
        pending = [p for p in below if not keep(p, int(table[p][1])) and p not in killed]
        if not pending or attempts >= 5000:
            break
        for pid in pending:
            kill(pid)
            killed.add(pid)
    for pid in below:
        if pid not in killed:
            try:
                os.kill(pid, signal.SIGCONT)  # discards a pending stop signal too
            except ProcessLookupError:
                pass
    reap_nohang()
    if len(killed) > len(first) + 1:
        # A run that left processes behind: until they are reaped they still count against the
        # jail's pids limit, and the next run's fork() would fail.  (A run that left nothing but
        # its cell does not wait: the usual case stays off the next request's path.)
        _wait_reaped(killed, GONE_WAIT_S)
    return table


GONE_WAIT_S = 2.0
WHILE_WAITING: list = []  # what the zygote keeps doing while it waits for a process to be reaped


def _wait_reaped(pids, timeout: float) -> None:
    """Until the zygote's own children among ``pids`` are reaped (a session holder reaps its own
    when it forks its next spare; the nursery reaps its cells)."""
    me = os.getpid()
    deadline = time.monotonic() + timeout
    waiting = set(pids)
    while waiting and time.monotonic() < deadline:
        reap_nohang()
        for serve in WHILE_WAITING:  # the zygote's answers to forks (_forks): a holder may be forking
            serve()
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


def exit_info(pid: int, wstatus: int, utime: float, stime: float, maxrss: int) -> dict:
    """How a child ended, as the zygote keeps it (and as a holder reports its spare's end)."""
    return {"op": "cell_exit", "pid": pid, "status": wstatus, "utime": utime, "stime": stime, "maxrss": maxrss}


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


def default_signals() -> None:
    """In a child of the zygote (nursery, holder): none of the zygote's SIGCHLD arrangements."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
