"""What runs inside a cell, before, during and after the user's code.  Stdlib only; runs in the jail.

A cell is a forked copy of a warm interpreter (the nursery's for stateless runs, a session
holder's for sessions).  While it waits for work it has already warmed its code paths and
hidden the modules the policy blocks.  Then it reads exactly one request from the host, writes
the request's input files, sets the run's limits, executes the code in its globals and writes
one report frame up its result channel (fd 3)::

    {"status", "result", "error", "outputs", "files"}

Everything the user's code can reach lives in this process, so nothing here is trusted by the
host beyond "this is what the program said": the host decides the status of a run from what it
observed itself (exit status, signals, its own timers and byte counts) and validates the report.
"""

from __future__ import annotations

import _ast
import binascii
import builtins
import fcntl
import io
import os
import resource
import sys

import _carry as carry
import _files as files
import _forks
import _guard as guard
import _protocol as proto

# jailcell's code in a cell looks builtins up in a copy of its own, made before any program exists
# (a function keeps the builtins of the module that defines it): a program that replaces
# ``builtins.len`` or clears the builtins changes what its own code sees, not the report, the
# import guard or the framing (``_protocol`` does the same).  So a stateless cell does not put the
# builtins back after the program; only the stdlib code jailcell then calls (``traceback``,
# matplotlib) needs them, and the paths that call it put them back first.
__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]

_import = builtins.__import__  # the interpreter's own: the program may replace builtins.__import__

CELL_FILENAME = "<cell>"
RES_FD = 3                        # the cell's result channel (a socket to the host)
MAX_REQUEST = 64 * 1024 * 1024    # code + base64 input files
MAX_IMAGES_BYTES = 16 * 1024 * 1024

CONFIG: dict = {}                 # the jail's config frame (set by the zygote)
STATE: dict = {}                  # run_restricted, the cpu limit set, a session's own builtins


# ----------------------------------------------------------------------------------------------
# executing the user's code
# ----------------------------------------------------------------------------------------------

def compile_cell(code: str):
    """The cell's code as ``(body, last)``: ``last`` evaluates the final expression statement if
    the code ends with one (its repr is the run's ``result``, as in a notebook), else it is None.
    The program is compiled as its own module: none of jailcell's ``__future__`` flags
    (``dont_inherit``; ``annotations`` would turn the program's annotations into strings).

    Building the AST is the costliest part of compiling a cell (Python objects for every node,
    and the memory pages they touch in a freshly forked cell), so the split is first tried on the
    text: the last line that starts with code in column 0 begins the final statement; if that
    statement compiles as an expression and the code before it compiles by itself, that is the
    split.  A cut inside a statement (an open bracket or string, a backslash continuation) leaves
    code before it that does not compile, so anything else -- ``a = 1; a``, a final expression
    whose lines return to column 0, a syntax error -- takes the AST path, which decides."""
    start = _last_top_level_line(code)
    if start is not None:
        head = code[:start]
        try:  # the (short) final statement first: most code that does not end in an expression stops here
            last = compile("\n" * head.count("\n") + code[start:], CELL_FILENAME, "eval", dont_inherit=True)
            return compile(head, CELL_FILENAME, "exec", dont_inherit=True), last
        except (SyntaxError, ValueError):
            pass
    tree = compile(code, CELL_FILENAME, "exec", _ast.PyCF_ONLY_AST, dont_inherit=True)  # ast.parse, without ast
    assert isinstance(tree, _ast.Module)
    tail = tree.body.pop() if tree.body and isinstance(tree.body[-1], _ast.Expr) else None
    final = compile(_ast.Expression(body=tail.value), CELL_FILENAME, "eval", dont_inherit=True) \
        if isinstance(tail, _ast.Expr) else None
    return compile(tree, CELL_FILENAME, "exec", dont_inherit=True), final


def _last_top_level_line(code: str) -> int | None:
    """Where the last line that starts with code (not blank, indented or a comment) begins."""
    end = len(code)
    while end >= 0:
        nl = code.rfind("\n", 0, end)
        first = code[nl + 1 : nl + 2]
        if first and first not in " \t\f\r\n#":
            return nl + 1
        if nl < 0:
            return None
        end = nl
    return None


def _register_source(code: str) -> None:
    """Make the code's lines available to tracebacks (ours, and any the program prints)."""
    linecache = sys.modules.get("linecache")
    if linecache is not None:
        linecache.cache[CELL_FILENAME] = (len(code), None, code.splitlines(True), CELL_FILENAME)


def _trim_traceback(exc: BaseException, code: str) -> str:
    """The traceback from the user's first frame on, without jailcell's own frames at the end."""
    _set_builtins(PRISTINE_BUILTINS)  # the traceback module's code needs the real builtins
    try:
        return _format_traceback(exc, code)
    except Exception:  # the program broke the traceback machinery: its error still comes back
        return f"{type(exc).__name__}: {_safe_str(exc)}\n"


def _format_traceback(exc: BaseException, code: str) -> str:
    _import("linecache")  # loaded already in all but a jail's first cell (guard.LATER_IMPORTS)
    traceback = _import("traceback")
    _register_source(code)
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != CELL_FILENAME:
        tb = tb.tb_next
    if tb is None:  # e.g. a SyntaxError: no frame of the user's code
        return "".join(traceback.format_exception_only(type(exc), exc))
    summary = traceback.extract_tb(tb)
    own = os.path.dirname(os.path.abspath(__file__))
    while summary and summary[-1].filename.startswith(own + "/"):
        summary.pop()
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(summary)]
    return "".join(lines + traceback.format_exception_only(type(exc), exc))


def _figures(after_program: bool = False) -> list[dict]:
    """The open matplotlib figures as PNG outputs (and closed).  ``after_program``: the program's
    builtins may still be in place, and matplotlib's code needs the real ones."""
    helpers, plt = sys.modules.get("matplotlib._pylab_helpers"), sys.modules.get("matplotlib.pyplot")
    if helpers is None or plt is None or not helpers.Gcf.figs:  # no figure: no matplotlib code runs
        return []
    if after_program:
        _set_builtins(PRISTINE_BUILTINS)
    out, total = [], 0
    for num in list(plt.get_fignums()):
        fig = plt.figure(num)
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format="png")
        except Exception:
            continue
        finally:
            plt.close(fig)
        data = buf.getvalue()
        total += len(data)
        if total > MAX_IMAGES_BYTES:
            break
        out.append({"mime_type": "image/png", "data": binascii.b2a_base64(data, newline=False).decode("ascii")})
    return out


def _patch_show(collected: list) -> None:
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.show = lambda *a, **k: collected.extend(_figures())  # type: ignore[attr-defined]


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


_exec, _eval, _repr, _Exception = exec, eval, repr, Exception  # no builtins lookup while the program's are in place
PRISTINE_BUILTINS = dict(builtins.__dict__)  # as they were before any user code (the zygote adds its guard)


def _set_builtins(values: dict) -> None:
    current = builtins.__dict__
    current.clear()
    current.update(values)


def _take_builtins(_len=len, _dict=dict) -> dict | None:
    """Put the pristine builtins back; return the program's if it changed them, else None.
    (It runs while the builtins may be the program's: it looks up none of them.)"""
    current, pristine = builtins.__dict__, PRISTINE_BUILTINS
    changed = _len(current) != _len(pristine)
    if not changed:
        get = current.get
        for name, value in pristine.items():
            if get(name) is not value:
                changed = True
                break
    if not changed:
        return None
    programs = _dict(current)
    _set_builtins(pristine)
    return programs


def execute(code: str, glb: dict, session: bool = False) -> dict:
    """Run ``code`` in ``glb``; return the cell's report (status, result, error, outputs).

    Only the program runs with its own builtins (``builtins.len = ...`` is allowed, and a session
    keeps it for its next runs, like a notebook); jailcell's code -- the report, the traceback,
    a session holder's duties -- never sees them (see ``__builtins__`` above; a session's holder
    runs zygote code, so a session's cell takes the program's builtins out after each run)."""
    report: dict = {"status": "ok", "result": None, "error": None, "outputs": []}
    collected: list = []
    _patch_show(collected)
    _register_source(code)
    try:
        if CONFIG.get("code_mode") == "restricted":
            run_restricted = STATE.get("run_restricted")
            if run_restricted is None:
                from _restricted import run_restricted  # type: ignore[no-redef]

            run = lambda: run_restricted(code, glb, CELL_FILENAME, lambda m: not guard.import_blocked(m))  # type: ignore[misc]  # noqa: E731
        else:
            body_code, last_code = compile_cell(code)
            run = lambda: (_exec(body_code, glb), _eval(last_code, glb) if last_code is not None else None)[1]  # noqa: E731
        if session and STATE.get("user_builtins") is not None:
            _set_builtins(STATE["user_builtins"])
        repr_error = None
        try:  # the program's code, with the program's builtins: nothing here looks one up
            value = run()
            if value is not None:
                try:
                    report["result"] = _repr(value)
                except _Exception as exc:  # a broken __repr__ is the user's error, not ours
                    repr_error = exc
        finally:
            if session:
                STATE["user_builtins"] = _take_builtins()
        if isinstance(repr_error, MemoryError):  # the result does not fit in the memory limit: the run's error
            raise repr_error
        if repr_error is not None:
            report["result"] = f"<repr failed: {type(repr_error).__name__}: {_safe_str(repr_error)}>"
    except SystemExit as exc:
        if exc.code not in (None, 0):
            report["status"] = "error"
            report["error"] = {"type": "SystemExit", "message": str(exc.code), "traceback": ""}
    except BaseException as exc:  # noqa: BLE001 - everything the user's code raises is data
        status = "error"
        if isinstance(exc, MemoryError):
            status = "memory_limit"
        elif isinstance(exc, guard.PolicyViolation) or getattr(exc, "jailcell_policy", False):
            status = "policy_violation"
        report["status"] = status
        report["error"] = {"type": type(exc).__name__, "message": _safe_str(exc),
                           "traceback": _trim_traceback(exc, code)}
    try:
        report["outputs"] = collected + _figures(after_program=True)
    except Exception:
        pass
    return report


# ----------------------------------------------------------------------------------------------
# host functions: stubs that call the host over the result channel
# ----------------------------------------------------------------------------------------------

def install_host_functions(glb: dict, names: list, fd: int) -> None:
    """Define the host's functions in the cell's globals: each call is a frame up the result
    channel, answered by the host with a value or an exception."""
    import threading

    lock = threading.Lock()  # one call at a time on the channel, whatever the program's threads do

    def make(name: str):
        def call(*args, **kwargs):
            try:
                frame = proto.encode({"call": name, "args": args, "kwargs": kwargs})
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{name}(): arguments must be JSON values (str, int, float, bool, None, "
                                f"lists, dicts with str keys): {exc}") from None
            if len(frame) > proto.MAX_CALL:
                raise ValueError(f"{name}(): arguments are {len(frame)} bytes encoded; the limit is {proto.MAX_CALL}")
            with lock:
                proto.write_all(fd, frame)
                reply = proto.read_frame(fd, proto.MAX_CALL + 4096)
            if "error" in reply:
                err = reply["error"] if isinstance(reply["error"], dict) else {}
                raise _host_exception(str(err.get("type", "RuntimeError")), str(err.get("message", "")))
            return reply.get("value")

        call.__name__ = call.__qualname__ = name
        call.__doc__ = f"{name}(...) runs on the host; arguments and result are JSON values."
        return call

    for name in names:
        glb[name] = make(name)


def _host_exception(kind: str, message: str) -> BaseException:
    """The host's exception as the same type (a built-in one) or a same-named Exception subclass."""
    cls = getattr(builtins, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = type(kind if kind.isidentifier() else "HostError", (Exception,), {"__module__": "host"})
    try:
        return cls(message)
    except Exception:
        return RuntimeError(f"{kind}: {message}")


# ----------------------------------------------------------------------------------------------
# the life of a cell
# ----------------------------------------------------------------------------------------------

def set_cpu_limit(seconds: float, session: bool) -> None:
    """RLIMIT_CPU for this run: soft = the limit (SIGXCPU), hard one second later (SIGKILL).

    A session cell may become the holder of the session's state, whose later cells must be able
    to get a larger limit; there the hard limit stays where it was and the host enforces the
    CPU limit too (it reads the cell's CPU time while the run goes on)."""
    cpu = max(1, int(-(-float(seconds) // 1)))
    if STATE.get("cpu_limit") == (cpu, session):  # set while the spare was idle
        return
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if session:
        want = (cpu if hard == resource.RLIM_INFINITY else min(cpu, hard), hard)
    else:
        want = (cpu, cpu + 1)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, want)
        STATE["cpu_limit"] = (cpu, session)
    except (ValueError, OSError):
        pass


def _set_memory_limit(session: bool) -> None:
    """Without a cgroup (process fallback): cap the address space at what the cell has now plus
    its memory budget (soft only in sessions, for the same reason as the CPU limit)."""
    if not CONFIG.get("rlimit_as_mib"):
        return
    size = STATE.get("statm") or _address_space()
    limit = size + int(CONFIG["rlimit_as_mib"]) * 1024 * 1024
    hard = resource.getrlimit(resource.RLIMIT_AS)[1] if session else limit
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    except (ValueError, OSError):
        pass


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def enter_landlock() -> None:
    """The landlock backend, in a new spare before it takes any request: enter the cell's Landlock
    domain (a session's later cells are in their holder's already: domains nest at most 16 deep).
    What a cell needs from /proc, which the domain does not reach, is read first.  A spare that
    cannot be confined exits: no cell ever runs without its domain."""
    spec = CONFIG.get("landlock")
    if not spec or STATE.get("confined"):
        return
    try:
        if CONFIG.get("rlimit_as_mib"):
            STATE["statm"] = _address_space()
        STATE["landlock"].restrict(STATE["ruleset"])
        os.close(STATE.pop("ruleset"))
    except (OSError, KeyError, TypeError) as exc:
        os.write(2, f"jailcell: a cell could not enter its Landlock domain: {exc}\n".encode())
        os._exit(NOT_HARDENED_EXIT)
    STATE["confined"] = True
    metadata_by_fd()


def landlock_ruleset() -> None:
    """In a process that forks cells (the landlock backend): make the cells' Landlock ruleset once; each
    spare enters its domain with one system call (enter_landlock)."""
    spec = CONFIG.get("landlock")
    if spec and not STATE.get("confined") and "ruleset" not in STATE:
        STATE["ruleset"], _ = STATE["landlock"].ruleset(spec["read"], spec["write"], spec["devices"],
                                                        bool(spec.get("network")))


def metadata_by_fd() -> None:
    """The landlock cell's filter denies chmod, chown, utime and xattrs by path (Landlock does not
    cover metadata); os.chmod and friends then go through an fd that open() -- which Landlock checks --
    gives, so shutil.copy and the like work in the workspace, and nothing outside it opens.  Once per image."""
    if STATE.get("metadata_by_fd"):
        return
    STATE["metadata_by_fd"] = True

    def by_fd(fn):
        def call(path, *args, dir_fd=None, follow_symlinks=True, **kw):
            if isinstance(path, int):
                return fn(path, *args, **kw)
            flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
            fd = os.open(path, flags, dir_fd=dir_fd)
            try:
                return fn(fd, *args, **kw)
            finally:
                os.close(fd)
        call.__name__, call.__doc__ = fn.__name__, fn.__doc__
        return call

    for name in ("chmod", "chown", "utime", "setxattr", "removexattr"):
        if hasattr(os, name):
            setattr(os, name, by_fd(getattr(os, name)))
    os.lchown = lambda path, uid, gid: os.chown(path, uid, gid, follow_symlinks=False)


PR_GET_DUMPABLE, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 3, 4, 36
NOT_HARDENED_EXIT = 124  # a process of the jail exits so when it cannot be made non-dumpable or confined


def prctl(option: int, arg: int) -> int:
    """prctl(2) through ctypes; -1 if it failed (or an odd libc cannot make the call)."""
    try:
        import ctypes

        return int(ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0))
    except Exception:  # pragma: no cover
        return -1


def never_dumpable() -> None:
    """Make this process non-dumpable, or end it: a jail's process that forks cells, holds a
    session or hands out spares must never be reachable through /proc/<pid>/mem or ptrace."""
    prctl(PR_SET_DUMPABLE, 0)
    if prctl(PR_GET_DUMPABLE, 0) != 0:
        os.write(2, b"jailcell: cannot make the jail's processes non-dumpable (prctl)\n")
        os._exit(NOT_HARDENED_EXIT)


# The zygote's own /proc/self/oom_score_adj, opened once at its start (while it is still dumpable and
# nothing of a program exists yet): see fork_expendable.
OOM_FD, OOM_OWN = -1, b"0"


def hold_oom_score() -> None:
    """At the zygote's start, before it is made non-dumpable: keep its oom_score_adj file open.  A
    non-dumpable process's /proc files belong to root, so it could not open it later -- and no
    process of the jail may ever be dumpable again once a program could reach it (a handle on
    /proc/<pid>/mem opened in such a moment stays valid after it)."""
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    global OOM_FD, OOM_OWN
    OOM_FD, OOM_OWN = fd, os.read(fd, 16).strip() or b"0"


def fork_expendable() -> int:
    """os.fork() from the zygote for a process that forks cells (a nursery, a session's first holder):
    the child starts with oom_score_adj 1000, which every cell inherits, so that under memory
    pressure a cell (or its parent) dies, never the zygote.  The zygote raises its own score for the
    fork and lowers it back (down to where it was is allowed unprivileged); the child closes the
    zygote's file.  Nothing changes dumpability."""
    global OOM_FD
    fd = OOM_FD
    raised = fd >= 0 and _write_oom(fd, b"1000")
    pair = _forks.before_fork()  # the jail's forks counted by the zygote (_forks): the child's filter
    try:
        pid = os.fork()
    except OSError:
        if raised:
            _write_oom(fd, OOM_OWN)
        if pair is not None:
            for end in pair:
                end.close()
        raise
    if pid == 0:
        if fd >= 0:
            os.close(fd)
            OOM_FD = -1
        _forks.in_child(pair)
        return 0
    if raised:
        _write_oom(fd, OOM_OWN)
    _forks.in_parent(pair, pid)
    return pid


def _write_oom(fd: int, value: bytes) -> bool:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, value)
        return True
    except OSError:
        return False


def prepare() -> None:
    """In a process that forks cells (nursery, session holder), before its first cell: fresh stdio
    objects for the cells to inherit.  (Its oom_score_adj came with its fork: fork_expendable.)"""
    fresh_stdio()


def finish(report: dict, res_fd: int = RES_FD, session: bool = False) -> None:
    """Flush and write the report.  A session's cell, which becomes the holder of the state and
    runs zygote code next, puts the pristine builtins back (a thread of the program may have
    replaced ``len`` since it ended).  If the report cannot be written, the cell exits so the
    host judges it by its exit status."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if session:
        _set_builtins(PRISTINE_BUILTINS)
    try:
        proto.write_frame(res_fd, report)
    except Exception:
        os._exit(proto.REPORT_FAILED)


def warm_up(session: bool) -> None:
    """Serve one dummy request while idle -- through a pipe, into /dev/null -- so the memory pages
    the request path writes are copied (copy-on-write after fork) now, not while a run waits."""
    r, w = os.pipe()
    proto.write_frame(w, {"code": "print(end='')\n(1, 'warm')", "timeout": 30, "cpu_s": CONFIG.get("cpu_s", 30),
                          "files": {}})
    os.close(w)
    devnull = os.open("/dev/null", os.O_WRONLY)
    users = STATE.pop("user_builtins", None)  # the rehearsal runs none of the program's code
    try:
        serve(r, user_globals(), session, res_fd=devnull, real=False)
    finally:
        os.close(devnull)
        STATE["user_builtins"] = users
    guard.hide_blocked_modules()


def fresh_stdio() -> None:
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin  # type: ignore[misc]


def user_globals() -> dict:
    return {"__name__": "__main__", "__builtins__": builtins, "__doc__": None, "__spec__": None}


def become(req_r: int, out_w: int, err_w: int, res: int, keep: tuple[int, ...] = (), stdio: bool = True) -> list[int]:
    """In a freshly forked cell: stdio onto the run's channels (0: /dev/null, 1/2: the output
    pipes, 3: the result socket); everything else is closed but ``req_r`` and ``keep``, which
    move to free fds >= 10, and a session program's own open files (``carry.kept``).  Returns the
    new numbers (``req_r``'s first).  ``stdio=False`` keeps the parent's sys.stdout/stderr objects
    (bound to fds 1 and 2, never written by the parent)."""
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (req_r, *keep)]
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.dup2(res, RES_FD)
    os.dup2(devnull, 0)
    close_fds({0, 1, 2, RES_FD, *moved} | carry.kept())
    if stdio:
        fresh_stdio()
    return moved


def close_fds(keep: set[int]) -> None:
    """Close every fd not in ``keep`` (close_range over the gaps: a few system calls)."""
    start = 0
    for fd in sorted(keep):
        if fd > start:
            os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, 1 << 20)


def serve(req_fd: int, glb: dict, session: bool, res_fd: int = RES_FD, real: bool = True) -> None:
    """Wait for the one request of this cell, run it and report.

    The request is ``{"code", "timeout", "cpu_s", "files": {name: base64}, "functions": [names]}``.
    """
    req = proto.read_frame(req_fd, CONFIG.get("max_request", MAX_REQUEST))
    os.close(req_fd)
    if session and real:  # (a rehearsal never touches the state's files: another branch may be running)
        carry.before_run()
    try:
        for name, b64 in (req.get("files") or {}).items():
            files.write_file(".", name, binascii.a2b_base64(b64))
    except (OSError, ValueError) as exc:
        finish({"input_error": f"cannot write input file: {exc}"}, res_fd, session)
        return
    # A stateless cell starts in the empty workspace the sweep left (plus its input files); if the
    # run creates nothing, the directory's mtime does not change and there is nothing to list.
    listed = session or bool(req.get("files"))
    before = files.list_files(".") if listed else {}
    mtime = os.stat(".").st_mtime_ns
    set_cpu_limit(req.get("cpu_s", 30), session)
    _set_memory_limit(session)
    if req.get("functions"):
        install_host_functions(glb, req["functions"], res_fd)
    report = execute(req["code"], glb, session)
    if session and real:  # before the report: once the host has it, another branch's run may move offsets
        carry.after_run()
    if listed or os.stat(".").st_mtime_ns != mtime:
        after = files.list_files(".")
        report["files"] = [{"name": n, "size": v[0]} for n, v in sorted(after.items()) if before.get(n) != v]
    else:
        report["files"] = []
    finish(report, res_fd, session)
