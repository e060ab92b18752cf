"""Host side of one jail: start the zygote under a backend, hold its spare cells, run requests.

The control channel to the zygote is a unix socket (the zygote's fd 0).  The zygote announces
each spare cell with its channels (file descriptors over SCM_RIGHTS); a run then goes straight
to the cell (see ``_supervisor.py``) and the zygote only hears ``done`` afterwards, when it
sweeps the jail.  One daemon thread (``_ControlLoop``) reads the control channels of all jails
as messages arrive -- ``spare``, ``drop``, ``exit``, ``clean``, ``lost``, ``broken`` and the
replies to control requests -- so none of that work falls on the path of the next run.

A :class:`Jail` is not thread-safe by itself; the public API serialises access to it.
Teardown follows trio's rule -- close the channel, wait briefly, kill -- and then removes
whatever the backend created (cgroups, temp dirs), so nothing is left on the host; it runs in a
background thread (``close()`` returns at once) and interpreter exit waits for it.
"""

from __future__ import annotations

import _socket as socket  # not socket.py, whose enums cost ~1.7 ms at every `jailcell run`
import collections
import contextlib
import errno
import os
import re
import signal
import threading
import time
import weakref
from typing import Any, Callable

from .. import _metrics
from .._errors import BackendUnavailable, JailError, warn
from .._injail import _protocol as proto
from .._policy import Policy
from ..backends import Backend, refusal
from ..backends._base import Spawned
from ._cancel import Cancel, RunCancelled
from ._control import control as _control
from ._control import read_hello
from ._run import Outcome, RunRequest
from ._supervisor import Spare, outcome, supervise
from ._teardown import killpg, teardown

START_TIMEOUT_S = 120.0  # preloading pandas+matplotlib on a cold disk can take a while
SPARE_TIMEOUT_S = 60.0   # a spare cell must be ready within this (a nursery restart included)
REPLY_TIMEOUT_S = 30.0   # the zygote answers control requests and sweeps within this
STOPPED_CHECK_S = 1.0    # a wait this long looks for jail processes stopped from outside
REPLY_LIMIT = 512 * 1024 * 1024

_live: "weakref.WeakSet[Jail]" = weakref.WeakSet()
os.register_at_fork(after_in_child=_live.clear)  # a forked child's exit must not end the parent's jails


class JailTimeout(Exception):
    """The jail did not answer in time."""


def _live_jails() -> list[tuple[bool, int]]:
    """(a session jail?, its spare cells) for each live jail: what a metrics scrape reads."""
    return [(bool(j.session), j.spare_count()) for j in list(_live) if j.alive()]


_metrics.jails_from(_live_jails)


class HeadLost(JailError):
    """A session's state is gone (a program killed the process that held it)."""


class _StartFailure(JailError):
    """A jail that did not start, why and what to do; ``cause``: resources (descriptors, disk), timeout, error."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


def _start_failure(backend: str, exc: BaseException, jail_log: str) -> _StartFailure:
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return _StartFailure(f"cannot start a jail: this process has no file descriptors left ({exc.strerror}); a "
                             "jail needs about a dozen. Close what the application no longer uses, or raise the limit "
                             "(`ulimit -n`).", "resources")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _StartFailure(f"cannot start a jail: the host's disk is full ({exc.strerror}: {exc.filename or ''}); "
                             "jailcell keeps each jail's log in the temporary directory (TMPDIR). Free some space.",
                             "resources")
    return _StartFailure(f"the {backend} jail failed to start ({type(exc).__name__}: {exc}).\n{jail_log}\n"
                         "Run `jailcell check` to see what isolation works on this machine.",
                         "timeout" if isinstance(exc, JailTimeout) else "error")


_preload_warned: set[tuple[str, ...]] = set()


def _warn_missing_preload(policy: Policy, ready: dict[str, Any]) -> None:
    """Once per process and set of modules: the policy preloads modules this Python lacks."""
    failed = ready.get("preload", {}).get("failed") if isinstance(ready.get("preload"), dict) else None
    if not isinstance(failed, dict) or not failed:
        return
    key = (policy.name, *sorted(map(str, failed)))
    if key in _preload_warned:
        return
    _preload_warned.add(key)
    names = ", ".join(sorted(map(str, failed)))
    warn("jailcell: policy %r preloads %s, which cannot be imported here (programs that import them get "
         "ModuleNotFoundError); for numpy, pandas and matplotlib: pip install \"jailcell[datascience]\"",
         policy.name, names)


LOG_CAP, LOG_KEEP = 1 << 20, 64 << 10  # a jail's log file: trimmed to its tail past this size


# What the zygote may send on its own, and the fields the host relies on.  A session's holder
# is a former cell (a program's process) and the zygote relays its reports: nothing is trusted.
def _malformed(msg: Any, fds: list[int]) -> str | None:
    if not isinstance(msg, dict):
        return f"a {type(msg).__name__} instead of an object"
    op = msg.get("op")
    if fds and op != "spare":
        return f"{len(fds)} file descriptors with op {op!r}"
    if op == "spare":
        if len(fds) != 5 or not proto.is_int(msg.get("pid")) or msg["pid"] <= 0:
            return "a spare without a pid or its 5 channels"
        if msg.get("head") is not None and not isinstance(msg.get("head"), str):
            return "a spare whose head is not a name"
    elif op == "exit":
        status = msg.get("status")
        if not proto.is_int(msg.get("cell")) or (status is not None and proto.wait_status(status) is None):
            return "an exit record whose cell or wait status is not an integer"
    elif op in ("drop", "clean"):
        if not proto.is_int(msg.get(op == "drop" and "pid" or "cell")):
            return f"a {op} record without a pid"
    elif op == "lost" and not isinstance(msg.get("head"), str):
        return "a lost record without a head"
    return None


class Jail:
    def __init__(self, backend: Backend, policy: Policy, *, session: bool = False) -> None:
        self.backend = backend
        self.policy = policy
        self.session = session
        self.ctl: socket.socket | None = None
        self._spawned: Spawned | None = None
        try:  # the process's own resources first: out of fds or disk is a clear JailError too
            stderr = _log_file()
            try:
                self._interrupt_r, self._interrupt_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                stderr.close()
                raise
        except OSError as exc:
            raise _start_failure(backend.name, exc, "") from None
        self._stderr = stderr
        self._cv = threading.Condition()  # guards everything below; the control thread writes it
        self._spares: collections.deque[Spare] = collections.deque()  # stateless jails
        self._heads: dict[str, Spare | None] = {}                     # session jails: head -> its spare
        self._lost: set[str] = set()
        self._closed_heads: set[str] = set()
        self._exits: dict[int, dict[str, Any]] = {}
        self._replies: collections.deque[dict[str, Any]] = collections.deque()
        self._used: dict[int, Spare] = {}  # cells whose sweep the zygote has not confirmed yet
        self._broken: str | None = None
        self._interrupted = False
        self.ready: dict[str, Any] = {}
        self.delivered = False  # the last run's request reached a cell (so it may have run)
        self._heavy: re.Pattern[str] | None = None  # names of modules only full cells have preloaded
        self._oom_seen = 0
        self.closed = False
        self._pid = os.getpid()  # a forked copy of this object does not own the jail
        try:
            self._start()
        except BaseException as exc:
            self.close()
            _metrics.jail_failed(backend.name, "unavailable" if isinstance(exc, BackendUnavailable) else
                                 getattr(exc, "cause", "error"))
            raise
        _live.add(self)
        _metrics.jail_started(backend.name)

    # -- lifecycle -------------------------------------------------------------------------------

    def _start(self) -> None:
        try:
            host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            host.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # who sends the HELLO
        except OSError as exc:
            raise _start_failure(self.backend.name, exc, "") from None
        self.ctl = host
        try:
            spawned = self.backend.spawn(self.policy, session=self.session, stderr=self._stderr, channel=child.fileno())
        except OSError as exc:  # e.g. creating its cgroup, or no file descriptors left
            raise _start_failure(self.backend.name, exc, "") from None
        finally:
            child.close()
        self._spawned = spawned
        try:
            _control.start()
            deadline = time.monotonic() + START_TIMEOUT_S
            pid = read_hello(host, deadline, self._continue_stopped, STOPPED_CHECK_S)
            if pid is None:
                raise JailTimeout()
            try:  # while the zygote imports its modules; it forks nothing before its config
                self.backend.admit(spawned, pid)
            except OSError as exc:
                raise BackendUnavailable(refusal(f"the jail's first process could not be put in its cgroups "
                                                 f"({exc.strerror or exc})")) from None
            host.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
            proto.send(host, spawned.config, spawned.config_fds)
            spawned.close_config_fds()
            _control.add(self, host.fileno())
            self.ready = self._reply(deadline)
            if self.ready.get("op") != "ready":
                raise JailError(f"zygote answered {self.ready!r} instead of ready")
            refused = self.backend.verify(self.ready)
            if refused:  # not the jail asked for: nothing is sent to it
                raise BackendUnavailable(refusal(refused))
            _warn_missing_preload(self.policy, self.ready)
            heavy = self.ready.get("slim")  # the jail has a slim nursery: these need a full cell
            if isinstance(heavy, list) and heavy and all(isinstance(n, str) and n.isidentifier() for n in heavy):
                self._heavy = re.compile(r"\b(?:" + "|".join(map(re.escape, heavy)) + r")\b")
            if not self.session:
                self._wait(lambda: bool(self._spares), deadline)  # the first run is warm
            self.backend.after_ready(spawned, self.policy)
            self._oom_seen = self.backend.oom_kills(spawned)
        except (JailTimeout, EOFError, OSError, proto.ProtocolError) as exc:
            jail_log = self.log()
            why = self.backend.start_failure(jail_log) if isinstance(exc, (EOFError, proto.ProtocolError)) else None
            if why:  # the backend could not build the jail here, and says why
                raise BackendUnavailable(refusal(why)) from None
            raise _start_failure(self.backend.name, exc, jail_log) from None
        finally:
            spawned.close_config_fds()  # sent, or never will be

    @property
    def pid(self) -> int | None:
        return self._spawned.proc.pid if self._spawned else None

    def alive(self) -> bool:
        """The control thread notices at once when the zygote (and so the jail) is gone."""
        return not self.closed and self._broken is None and self._spawned is not None and self._pid == os.getpid()

    def spare_count(self) -> int:
        """Warm cells waiting for a run (stateless jails) or for a session's next run."""
        return len(self._spares) + sum(1 for s in list(self._heads.values()) if s is not None)

    def log(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read()[-4000:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        """End the jail.  In a forked child (which has a copy of this object) only that process's
        copies of the file descriptors are closed: the jail is the parent's -- a shutdown of the
        control socket would end it, and the lock may be held by a parent's thread."""
        owner = self._pid == os.getpid()
        with self._cv if owner else contextlib.nullcontext():
            if self.closed:
                return
            self.closed = True
            spares = [*self._spares, *(s for s in self._heads.values() if s is not None), *self._used.values()]
            self._spares.clear()
            self._heads.clear()
            self._used.clear()
            if owner:
                self._cv.notify_all()
        for spare in spares:
            spare.close()
        if self.ctl is not None:
            if owner:
                _control.remove(self.ctl.fileno())
                try:
                    self.ctl.shutdown(socket.SHUT_RDWR)  # the zygote exits on EOF; pid 1 exiting ends the jail
                except OSError:
                    pass
            self.ctl.close()
        spawned, self._spawned = self._spawned, None
        for fd in (self._interrupt_r, self._interrupt_w):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self._stderr.close()
        except OSError:
            pass
        if spawned is not None and owner:
            teardown.add(self.backend, spawned)
        _live.discard(self)

    def kill(self) -> None:
        """Hard stop (used when the jail does not answer)."""
        if self._spawned is not None and self._pid == os.getpid():
            killpg(self._spawned.proc.pid)
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- the control channel ---------------------------------------------------------------------

    def on_readable(self) -> bool:
        """Called by the control thread: take in one message.  False once the channel is done."""
        if self.closed or self.ctl is None:
            return False
        try:
            msg, fds = proto.recv(self.ctl, REPLY_LIMIT)
        except (EOFError, OSError, proto.ProtocolError) as exc:
            with self._cv:
                self._broken = f"{type(exc).__name__}: {exc}"
                self._cv.notify_all()
            return False
        with self._cv:
            problem = None if self.closed else _malformed(msg, fds)
            if self.closed or problem:
                for fd in fds:
                    os.close(fd)
                if problem:  # everything from inside a jail is hostile: this jail is replaced
                    self._broken = f"the jail sent a malformed message: {problem}"
                    self._cv.notify_all()
                return False
            if not self._dispatch(msg, fds):
                self._replies.append(msg)
            self._cv.notify_all()
        return True

    def mark_broken(self, why: str) -> None:
        with self._cv:
            if self._broken is None:
                self._broken = why
            self._cv.notify_all()

    def _dispatch(self, msg: dict[str, Any], fds: list[int]) -> bool:
        """Take in a message the zygote sent on its own; False for a reply to a request."""
        op = msg.get("op")
        if op == "spare" and len(fds) == 5:
            spare = Spare(int(msg["pid"]), msg.get("head"), fds)
            spare.slim = msg.get("slim") is True
            if spare.head is None:
                self._spares.append(spare)
            elif spare.head in self._closed_heads or spare.head in self._lost:
                spare.close()
            else:  # a new branch's spare may come before the reply that names the branch
                old = self._heads.get(spare.head)
                if old is not None:
                    old.close()
                self._heads[spare.head] = spare
            return True
        for fd in fds:
            os.close(fd)
        if op == "drop":
            for spare in [s for s in self._spares if s.pid == msg.get("pid")]:
                self._spares.remove(spare)
                spare.close()
        elif op == "exit":
            self._exits[int(msg.get("cell", 0))] = msg
            while len(self._exits) > 100:  # exits of runs abandoned by an exception in the caller
                self._exits.pop(next(iter(self._exits)))
        elif op == "clean":
            used = self._used.pop(msg["cell"], None) if proto.is_int(msg.get("cell")) else None
            if used is not None:
                used.close()
        elif op == "broken":  # the zygote could not sweep the jail after a run: replace it
            self._broken = str(msg.get("message", "the zygote reported a failure"))
        elif op == "lost":
            head = str(msg.get("head"))
            self._lost.add(head)
            held = self._heads.get(head)
            if held is not None:
                held.close()
                self._heads[head] = None
        else:
            return False
        return True

    def _wait(self, until: Callable[[], bool], deadline: float, new_run: bool = False) -> None:
        """Until ``until()`` holds (checked under the lock) -- or raise why it cannot.  A wait
        that takes more than a moment looks whether the jail's own processes on the host (nsjail,
        the zygote) were stopped -- nothing inside the jail can stop them, something on the host
        did -- and continues them, so a stray SIGSTOP costs a second, not the whole timeout."""
        checked = time.monotonic()
        with self._cv:  # a new run never starts in a broken jail (e.g. one the sweep retired)
            while (new_run and self._broken is not None) or not until():
                if self.closed:
                    raise JailError("the jail is closed")
                if self._broken is not None:
                    raise EOFError(f"the jail's control channel broke ({self._broken})")
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    raise JailTimeout()
                if now - checked >= STOPPED_CHECK_S:
                    checked = now
                    self._continue_stopped()
                self._cv.wait(min(remaining, STOPPED_CHECK_S))

    def _continue_stopped(self) -> None:
        spawned = self._spawned
        if spawned is None:
            return
        pids = [spawned.proc.pid]
        try:
            pids += [int(p) for p in open(f"/proc/{pids[0]}/task/{pids[0]}/children").read().split()]
        except OSError:
            pass
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    state = f.read().rpartition(b")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if state in (b"T", b"t"):
                warn("jailcell: a process of a jail (host pid %d) was stopped from outside; continuing it", pid)
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass

    def _reply(self, deadline: float) -> dict[str, Any]:
        self._wait(lambda: bool(self._replies), deadline)
        with self._cv:
            return self._replies.popleft()

    def request(self, obj: dict[str, Any], timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """A control request (session operations, ping) and the zygote's reply."""
        if self.closed or self.ctl is None:
            raise JailError("the jail is closed")
        disk = self._spawned.disk if self._spawned else None
        if disk is not None and obj.get("op") == "upload":  # no tmpfs to refuse it: the same answer
            full = disk.refuse_upload(len(obj.get("data") or "") * 3 // 4)
            if full:
                return {"op": "error", "kind": "input", "type": "OSError", "message": full}
        proto.send(self.ctl, obj)
        reply = self._reply(time.monotonic() + timeout)
        with self._cv:
            if reply.get("op") == "ok" and obj.get("op") in ("new", "fork"):
                self._heads.setdefault(str(reply["head"]), None)
            if obj.get("op") == "close":
                self._closed_heads.add(str(obj.get("head")))
                spare = self._heads.pop(str(obj.get("head")), None)
                if spare is not None:
                    spare.close()
        return reply

    def interrupt(self) -> None:
        """Kill the cell that is running now (ignored if none is); safe from any thread."""
        self._interrupted = True
        try:
            os.write(self._interrupt_w, b"!")
        except OSError:
            pass

    def new_oom_kill(self) -> bool:
        """Did the OOM killer strike in this jail since the last time we asked?  (read only on SIGKILL)"""
        if self._spawned is None:
            return False
        count = self.backend.oom_kills(self._spawned)
        seen, self._oom_seen = self._oom_seen, count
        return count > seen

    # -- runs ------------------------------------------------------------------------------------

    def _take_spare(self, head: str | None, code: str = "") -> Spare:
        deadline = time.monotonic() + SPARE_TIMEOUT_S
        if head is None:
            with self._cv:  # runs back to back: the last cell is parked, and its sweep is still to come
                for used in self._used.values():
                    used.kill()  # as the sweep would, but now: it is exiting by the time the sweep looks
            # A program that names none of the heavy preloads gets a slim cell if one is ready (any
            # cell if not); one that names them waits for a full cell.
            slim_ok = self._heavy is None or not self._heavy.search(code)
            slim_first = slim_ok and self._heavy is not None

            def pick() -> Spare | None:
                if self._used:
                    return None
                fitting = [s for s in self._spares if s.slim == slim_first] or (list(self._spares) if slim_ok else [])
                return fitting[0] if fitting else None

            self._wait(lambda: pick() is not None, deadline, new_run=True)
            with self._cv:
                spare = pick()
                assert spare is not None
                self._spares.remove(spare)
                return spare

        def ready() -> bool:
            if head in self._lost:
                raise HeadLost("the session's state was lost: a program killed the process that held it")
            if head not in self._heads:
                raise JailError(f"no such session {head!r}")
            return not self._used and self._heads[head] is not None

        self._wait(ready, deadline, new_run=True)
        with self._cv:
            spare, self._heads[head] = self._heads[head], None
        assert spare is not None
        return spare

    def _trim_log(self) -> None:
        """The jail's log (the zygote's stderr, a file the zygote shares with us) keeps its last
        LOG_KEEP bytes once it passes LOG_CAP: a jail can never fill the host's disk with it."""
        try:
            fd = self._stderr.fileno()
            size = os.fstat(fd).st_size
            if size > LOG_CAP:
                tail = os.pread(fd, LOG_KEEP, size - LOG_KEEP)
                os.ftruncate(fd, 0)
                os.pwrite(fd, b"[earlier log lines dropped]\n" + tail, 0)
                os.lseek(fd, 0, os.SEEK_END)
        except (OSError, ValueError):
            pass

    def _done(self, spare: Spare, finished: bool) -> None:
        """Hand the used cell back: the zygote sweeps the jail (``clean`` closes our ends)."""
        self._trim_log()
        if self.ctl is None:
            raise JailError("the jail is closed")
        with self._cv:
            self._used[spare.pid] = spare
        proto.send(self.ctl, {"op": "done", "cell": spare.pid, "head": spare.head, "finished": finished})

    def run(self, req: RunRequest, *, head: str | None = None,
            on_call: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
            cancel: Cancel | None = None) -> Outcome:
        """Run ``req`` in a spare cell (of session ``head``, or a fresh one) and return how it
        ended.  Raises JailTimeout / EOFError / OSError when the jail is broken, and
        RunCancelled when ``cancel`` came before the program started."""
        if self.closed or self.ctl is None:
            raise JailError("the jail is closed")
        if cancel is not None and cancel.cancelled:
            raise RunCancelled("cancelled before it started")
        self.delivered = False
        cap = self.policy.limits.output_bytes
        for _attempt in range(3):
            spare = self._take_spare(head, req.code)
            if self._interrupted:  # interrupts sent while no run was going on do not count
                self._interrupted = False
                try:
                    while os.read(self._interrupt_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            try:
                if cancel is not None and not cancel.enter(self):  # cancelled while it waited for a spare
                    raise RunCancelled("cancelled before it started")
                self.delivered = True  # from here on the program may run: never run it again
                seen = supervise(spare, req, output_cap=cap, interrupt_fd=self._interrupt_r, on_call=on_call,
                                 disk=self._spawned.disk if self._spawned else None)
                self.delivered = seen.started
            except BaseException:  # e.g. KeyboardInterrupt in the caller's thread: the cell must not live on
                spare.kill()
                try:
                    self._done(spare, False)
                except OSError:
                    pass
                raise
            finally:
                if cancel is not None:
                    cancel.leave()
            # A cell the host killed (output cap, limits, interrupt) never holds a session's state,
            # even if its report came in before it died.
            if seen.finished and seen.killed_for is None:
                usage = spare.usage()  # while the cell is alive: the sweep kills it
                self._done(spare, True)  # the zygote sweeps while the report is read and the caller gets its result
                return outcome(seen, req, None, usage, cap)
            self._done(spare, False)
            pid = spare.pid
            self._wait(lambda: pid in self._exits, time.monotonic() + REPLY_TIMEOUT_S)  # noqa: B023 (called here)
            with self._cv:
                info = self._exits.pop(pid)
            usage = (proto.seconds(info.get("utime")) + proto.seconds(info.get("stime")),
                     int(proto.seconds(info.get("maxrss"))) * 1024)
            if seen.started or head is not None:
                return outcome(seen, req, info, usage, cap)
        raise JailError("no spare cell of this jail could take the run (they kept dying)")


def _log_file() -> Any:
    """A jail's log: an unnamed file, as ``tempfile.TemporaryFile`` makes it on Linux (O_TMPFILE), without
    importing tempfile (and shutil, bz2, lzma, random: ~3.5 ms of every `jailcell run`) where that works."""
    for folder in dict.fromkeys(filter(None, (os.environ.get("TMPDIR"), "/tmp", "/var/tmp"))):
        try:
            return open(os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600), "w+b")
        except OSError:
            continue
    import tempfile

    return tempfile.TemporaryFile(prefix="jailcell-log-")


def close_all() -> None:
    """Tear down every jail of this process and wait until they are gone (atexit)."""
    for jail in list(_live):
        jail.close()
    teardown.join()
