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

import _signal as signal  # not signal.py, whose enums cost ~4 ms at every jail start
import builtins
import gc
import os
import resource
import select
import sys
import time
from _socket import socket

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cell as cell  # noqa: E402  (what runs inside a cell)
import _forks as forks  # noqa: E402  (the jail's process bound where nothing else gives one)
import _guard as guard  # noqa: E402  (the import policy)
import _procs as procs  # noqa: E402
import _protocol as proto  # noqa: E402  (stdlib-only framing shared with the host)
from _nursery import Stateless, fork_nursery  # noqa: E402
from _procs import kill_strays, log, reap_nohang  # noqa: E402
from _sessions import HeadLost, Sessions  # noqa: E402
from _spares import Channels  # noqa: E402

# Builtins of its own (as every in-jail module): a program that replaces builtins.len does not change
# what this code sees.
__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]

CONFIG: dict = {}


def host_gone() -> None:
    """The host closed the jail (or died): so goes everything in it.  In a pid namespace the kernel
    kills every process of the jail when its first process exits; without one, the zygote does."""
    if not CONFIG.get("pid_namespace"):
        kill_strays(lambda pid, ppid: False)
    os._exit(0)


def error_reply(exc: Exception) -> dict:
    """The answer to a request that failed.  Its ``kind`` (``proto.ERROR_KINDS``) decides the host's
    exception: ``input`` (the request named a file or session that is not there or not acceptable),
    ``lost`` (the session's state is gone), ``internal`` (anything else: a fault of the jail)."""
    if isinstance(exc, HeadLost):
        kind = "lost"
    elif isinstance(exc, (ValueError, KeyError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        kind = "input"
    else:
        kind = "internal"
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return {"op": "error", "kind": kind, "type": type(exc).__name__, "message": str(message)[:2000]}


class Zygote:
    def __init__(self, ctl: socket) -> None:
        self.ctl = ctl
        self.engine: Stateless | Sessions = None  # set by main() next
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
        """Serve the engine's sockets, the fork listeners and reap children (not the host's channel)
        until ``until()`` or the deadline."""
        while not until():
            socks = {s.fileno(): s for s in self.engine.watch()}
            events = self._poller(socks, False).poll(max(0.0, deadline - time.monotonic()) * 1000)
            if not events:
                return
            self._dispatch(events, socks)

    def _poller(self, socks: dict, host: bool):
        poller = select.poll()
        for fd in (self.ctl.fileno(),) if host else ():
            poller.register(fd, select.POLLIN)
        for fd in (self.wake_r, *socks, *forks.LISTENERS):
            poller.register(fd, select.POLLIN)
        return poller

    def _dispatch(self, events, socks: dict) -> None:
        for fd, ev in events:
            if fd in socks:
                self.engine.on_readable(socks[fd])
            elif fd == self.wake_r:
                self._reap()
            elif fd in forks.LISTENERS:
                forks.serve(fd, ev)

    def _reap(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        reap_nohang()

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
        return {"op": "error", "kind": "internal", "type": "ValueError", "message": f"unknown request {op!r}"}

    def serve_forever(self) -> None:
        while True:
            socks = {s.fileno(): s for s in self.engine.watch()}
            timeout = self.engine.timeout()
            events = self._poller(socks, True).poll(None if timeout is None else timeout * 1000)
            try:
                if not events:
                    self.engine.on_timer()
                self._dispatch(events, socks)
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
                reply = error_reply(exc)
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


# Modules programs import all the time (HumanEval's solutions: typing, math, collections...): in the
# slim image of a jail whose policy preloads heavy packages, so that a slim cell does not import them.
SLIM_PRELOAD = ["typing", "re", "math", "collections", "itertools", "functools", "operator", "string", "random",
                "heapq", "bisect", "copy", "json", "datetime", "dataclasses", "fractions", "statistics", "decimal"]


def _finish_image() -> None:
    """What every process that cells come from has, after its preloads: the policy's import guard,
    the list of loaded modules it blocks, the builtins cells start with, a frozen heap."""
    if CONFIG.get("code_mode") == "restricted":
        import _restricted  # compile RestrictedPython once, not per cell

        cell.STATE["run_restricted"] = _restricted.run_restricted
    guard.install_import_guard()
    guard.STATE["hide"] = guard.blocked_loaded_modules()
    cell.PRISTINE_BUILTINS.update(__import__("builtins").__dict__)  # as cells start (guard included)
    if CONFIG.get("session"):
        guard.complete_image()  # a stateless jail's nursery does it once its first spare is out
    gc.collect()
    gc.freeze()  # preloaded objects: never scanned by a cell's GC, so never copied on write


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

    # Never dumpable from here on, nor is anything forked from it (no /proc/<pid>/mem, no ptrace, no
    # pidfd_getfd from cells): the one file it needs while dumpable it opens now.
    cell.hold_oom_score()
    cell.never_dumpable()
    if not CONFIG.get("pid_namespace"):
        # Orphans come back to us, so strays can be found.  No PR_SET_PDEATHSIG: it fires when the host
        # *thread* that started the zygote ends (a Pool starts its jails from worker threads), which
        # killed a working jail and orphaned its cells; a host that is gone closes the control socket,
        # and host_gone() then ends everything this zygote started.
        cell.prctl(cell.PR_SET_CHILD_SUBREAPER, 1)


def _enter_cgroups(fds: list[int]) -> None:
    """Move this process -- one thread yet -- into the jail's cgroups: with cgroup v1 the host sends
    their ``tasks`` files, opened by it, and a thread that writes "0" there moves itself (with v2 the
    host has moved this process already).  An error ends the zygote, so the jail, before anything is
    forked; the host also checks that it is in them before it sends a program."""
    try:
        if len(fds) != CONFIG.get("enter_cgroups", 0):
            raise RuntimeError(f"the config came with {len(fds)} file descriptors, not {CONFIG.get('enter_cgroups')}")
        for fd in fds:
            os.write(fd, b"0")
    finally:
        for fd in fds:
            os.close(fd)


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


def _confine(spec: dict) -> dict:
    """The landlock backend: the jail's seccomp filter on this process (and all it forks), then a
    throwaway child that confines itself as every cell will and says what it could read -- or the
    zygote ends (never a jail with less than asked)."""
    import _landlock  # (kept for the cells: jailcell's modules are hidden from their sys.modules)
    import _seccomp

    cell.STATE["landlock"] = _landlock
    try:
        if CONFIG.get("own_userns"):  # before the limits: the kernel keeps the user's limit of this moment
            _landlock.own_user_namespace()  # for the user's count, and applies the jail's to the jail's own
            _landlock.drop_capabilities(for_good=False)  # the powers a new user namespace gives, at once
        for name, value in (CONFIG.get("rlimits") or {}).items():  # what every process of the jail inherits
            resource.setrlimit(getattr(resource, f"RLIMIT_{name.upper()}"), (int(value), int(value)))
        if CONFIG.get("drop_capabilities"):  # root's powers go before anything else happens here
            _landlock.drop_capabilities()
        _seccomp.install_program(_seccomp.jail_program(bool(spec.get("network"))))
        sees = _landlock.probe(spec)
        if "error" in sees:
            raise OSError(sees["error"])
        sees["capabilities"] = _landlock.capabilities()
        with open("/proc/self/uid_map") as f:  # empty in a user namespace of its own (nothing mapped)
            sees["uid_map"] = f.read().strip()
    except (OSError, KeyError, TypeError, ValueError, SyntaxError, AttributeError) as exc:
        os.write(2, f"jailcell: cannot build the landlock jail: {exc}\n".encode())
        os._exit(NOT_CONFINED_EXIT)
    return sees


NOT_CONFINED_EXIT = 123  # the zygote exits so when the kernel refuses part of the landlock jail


def main() -> None:
    global CONFIG
    ctl = socket(fileno=os.dup(0))
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1):  # the control socket is only ever used through ``ctl``
        os.dup2(devnull, fd)
    os.close(devnull)
    CONFIG, fds = proto.recv(ctl)
    _enter_cgroups(fds)  # first: nothing is forked here before
    # What this process sees before anything else runs here: the host checks that it is a jail
    # (its own pid namespace, none of the host's files; or a Landlock domain) before it sends a program.
    landlock = CONFIG.get("landlock")
    sees = _confine(landlock) if landlock else {"root": sorted(os.listdir("/")),
                                                "etc_passwd": os.path.exists("/etc/passwd")}
    cell.CONFIG.update(CONFIG)
    if not CONFIG.get("pid_namespace"):  # the sweep walks this process's tree, not the machine's /proc
        procs.WALK["from"] = os.getpid()
    if CONFIG.get("count_forks"):
        forks.enable(CONFIG["count_forks"])
    _add_site_dirs(CONFIG.get("sys_path", []))
    guard.configure(CONFIG)
    _harden()
    _batch_scheduling()
    os.chdir(CONFIG["workspace"])
    t0 = time.monotonic()
    light, heavy = proto.split_preload(CONFIG.get("preload", []))
    slim = None
    if heavy and CONFIG.get("slim"):  # (the host asks for it: it gives the jail the processes it takes)
        # A slim image first: the stdlib part, and what programs import all the time.  Its own nursery
        # serves the programs that name none of the heavy modules, whose cells then fork (and exit)
        # without their pages.
        preload = _preload(light)
        _preload([m for m in SLIM_PRELOAD if m not in light])
        slim = fork_nursery(_finish_image)  # None: every program gets a full cell
        more = _preload(heavy)
        preload = {"loaded": preload["loaded"] + more["loaded"], "failed": {**preload["failed"], **more["failed"]}}
    else:
        preload = _preload(light + heavy)
    _finish_image()
    zygote = Zygote(ctl)
    zygote.engine = Sessions(zygote) if CONFIG.get("session") else Stateless(zygote, slim)
    zygote.send({"op": "ready", "version": proto.VERSION, "pid": os.getpid(), "preload": preload, "sees": sees,
                 "preload_s": round(time.monotonic() - t0, 4), "python": sys.version.split()[0],
                 "slim": sorted({m.split(".")[0] for m in heavy}) if slim else None})
    zygote.serve_forever()


if __name__ == "__main__":
    main()
