"""The in-jail zygote: the first process of a jail.  Stdlib only; runs *inside* the jail.

It reads a config frame from the host on fd 0, imports the policy's preload modules once,
answers READY on fd 1, then serves requests.  Every execution runs in a *cell*, a fork of
the zygote (stateless runs) or of a session *head* (sessions).  The zygote is trusted code
that runs before any user code; it never executes anything a cell sends, only parses it as
bounded JSON, and it decides the status of a run from what it observed itself (exit
status, signals, its own timers and byte counts).

Layout of the processes (pid namespace of the jail when nsjail is used)::

    zygote (pid 1)  -- fd 0/1: host channel
      ├── spare cell    pre-forked, blocked on its request pipe (stateless runs)
      └── head          a session's globals; forks one cell per run; a cell that finishes
            └── cell    becomes the next head, one that is killed is discarded
"""

from __future__ import annotations

import ast
import base64
import builtins
import fcntl
import fnmatch
import gc
import io
import linecache
import os
import resource
import select
import signal
import socket
import stat
import struct
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _protocol as proto  # noqa: E402  (stdlib-only framing shared with the host)

HOST_IN, HOST_OUT = 0, 1
CELL_FILENAME = "<cell>"
MAX_REPORT = 48 * 1024 * 1024
MAX_CALL = 8 * 1024 * 1024        # a host-function call's arguments, and its result, at most
MAX_CALLS_PER_RUN = 10_000        # host-function calls one run may make
CALL_PREFIX = b'{"call":'         # how a call frame starts (a report never does)
MAX_IMAGES_BYTES = 16 * 1024 * 1024
MAX_LISTED_FILES = 1000
SIGNAMES = {s.value: s.name for s in signal.Signals}

CONFIG: dict = {}
STATE: dict = {"ctypes": None, "hide": []}


# ----------------------------------------------------------------------------------------------
# small OS helpers
# ----------------------------------------------------------------------------------------------

def _libc():
    if STATE["ctypes"] is None:
        import ctypes

        STATE["ctypes"] = ctypes.CDLL(None, use_errno=True)
    return STATE["ctypes"]


def _prctl(option: int, arg: int) -> None:
    try:
        _libc().prctl(option, arg, 0, 0, 0)
    except Exception:  # pragma: no cover - best effort hardening
        pass


PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36


def _close_fds(keep: set[int]) -> None:
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read_proc(path: str, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


PF_EXITING = 0x4  # task->flags: the task is in do_exit and will never run user code again


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) for every process this /proc shows (the jail's own in a pid namespace)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            data = _read_proc(f"/proc/{name}/stat", 4096)
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2 :].split()
        table[int(name)] = (int(rest[1]), chr(rest[0][0]))
    return table


def _exiting(pid: int) -> bool:
    """Every thread of ``pid`` is gone or in do_exit: it can no longer make a system call, so
    nothing it does can reach the next run.  (Its address space may still be being torn down.)"""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tids:
        try:
            data = _read_proc(f"/proc/{pid}/task/{tid}/stat", 4096)
            if not int(data[data.rindex(b")") + 2 :].split()[6]) & PF_EXITING:
                return False
        except (OSError, ValueError, IndexError):
            continue
    return True


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


def _reap_nohang() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_strays(keep) -> int:
    """Kill every process of this jail below the zygote for which ``keep(pid, ppid)`` is false,
    and wait until each is exiting (not until its teardown is over: that happens off the
    request path, while the next run may already be going)."""
    me = os.getpid()
    killed: set[int] = set()
    for attempt in range(5000):
        table = _process_table()
        strays = [p for p in _descendants(me, table) if not keep(p, table[p][0])]
        alive = [p for p in strays if p not in killed or not _exiting(p)]
        if not alive:
            break
        for pid in alive:
            if pid not in killed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed.add(pid)
        _reap_nohang()
        if attempt:
            time.sleep(0.0002)
    _reap_nohang()
    return len(killed)


def wipe(path: str) -> None:
    """Remove everything below ``path`` (not ``path`` itself), whatever permissions a cell set."""
    try:
        os.chmod(path, 0o1777 if path == "/tmp" else 0o755)
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    for entry in entries:
        full = entry.path
        try:
            if entry.is_dir(follow_symlinks=False):
                wipe(full)
                os.rmdir(full)
            else:
                os.unlink(full)
        except FileNotFoundError:
            pass


def list_files(root: str) -> dict[str, tuple[int, int]]:
    """Regular files below ``root``: relative name -> (size, mtime_ns)."""
    out: dict[str, tuple[int, int]] = {}
    stack = [root]
    while stack and len(out) < MAX_LISTED_FILES:
        d = stack.pop()
        try:
            it = list(os.scandir(d))
        except OSError:
            continue
        for e in it:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(e.path)
            elif stat.S_ISREG(st.st_mode):
                out[os.path.relpath(e.path, root)] = (st.st_size, st.st_mtime_ns)
    return out


def safe_join(root: str, name: str) -> str:
    """``root/name`` after checking ``name`` stays inside ``root`` (host checked it too)."""
    if not name or "\0" in name or name.startswith("/") or len(name) > 1024:
        raise ValueError(f"invalid file name {name!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid file name {name!r}")
    return os.path.join(root, *parts)


def write_file(root: str, name: str, data: bytes) -> None:
    path = safe_join(root, name)
    cur = root
    for part in name.split("/")[:-1]:
        cur = os.path.join(cur, part)
        try:
            os.mkdir(cur, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(cur).st_mode):
                raise ValueError(f"{name!r}: {part!r} is not a directory") from None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{name!r} is not a regular file")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def read_file(root: str, name: str, limit: int) -> bytes:
    path = safe_join(root, name)
    # Refuse symlinks anywhere on the path: a cell may have planted one.
    cur = root
    for part in name.split("/"):
        cur = os.path.join(cur, part)
        if stat.S_ISLNK(os.lstat(cur).st_mode):
            raise ValueError(f"{name!r} is a symbolic link")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{name!r} is not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{name!r} is {st.st_size} bytes, over the limit of {limit}")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise ValueError(f"{name!r} is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# what runs inside a cell: compile, guard imports, execute, describe the outcome
# ----------------------------------------------------------------------------------------------

class PolicyViolation(ImportError):
    """An import refused by the jail's policy (an ImportError, so `except ImportError` works)."""


def _module_matches(module: str, pattern: str) -> bool:
    if fnmatch.fnmatchcase(module, pattern):
        return True
    return "*" not in pattern and module.startswith(pattern + ".")


def import_blocked(module: str) -> bool:
    imports = CONFIG.get("imports", {})
    if any(_module_matches(module, p) for p in imports.get("deny", ())):
        return True
    allow = imports.get("allow", ())
    return bool(allow) and not any(_module_matches(module, p) for p in allow)


def _blocked_message(module: str) -> str:
    imports = CONFIG.get("imports", {})
    policy = CONFIG.get("policy_name", "?")
    if imports.get("allow"):
        allowed = ", ".join(imports["allow"][:30]) + (", ..." if len(imports["allow"]) > 30 else "")
    else:
        allowed = "everything except " + ", ".join(imports.get("deny", [])[:30])
    return (
        f"import of {module!r} is blocked by policy {policy!r}; allowed: {allowed} "
        f"(to allow it, use a policy that extends {policy!r} with imports.allow_add/deny_remove)"
    )


def _trusted_frame(frame) -> bool:
    """True when ``frame`` runs library code: a file under the interpreter's install, or a
    stdlib module frozen into the interpreter (``<frozen os>``)."""
    filename = frame.f_code.co_filename
    return filename.startswith(STATE["trusted_prefixes"]) or filename.startswith("<frozen ")


def install_import_guard() -> None:
    """Refuse imports made *by user code* that the policy blocks.

    Imports made by library code (numpy importing ctypes) are not blocked.  This is defence in
    depth and a clear message for the model; the OS jail is the boundary, not this hook.
    """
    if not CONFIG.get("imports", {}).get("deny") and not CONFIG.get("imports", {}).get("allow"):
        return
    import importlib

    real_import = builtins.__import__
    real_import_module = importlib.import_module
    getframe = sys._getframe

    def check(name: str, frame) -> None:
        if frame is not None and not _trusted_frame(frame) and name and import_blocked(name):
            raise PolicyViolation(_blocked_message(name), name=name)

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0:
            check(name, getframe(1))
            if fromlist and not _trusted_frame(getframe(1)):
                for sub in fromlist:
                    if isinstance(sub, str) and sub != "*" and import_blocked(f"{name}.{sub}"):
                        check(f"{name}.{sub}", getframe(1))
        return real_import(name, globals, locals, fromlist, level)

    def guarded_import_module(name, package=None):
        if not name.startswith("."):
            check(name, getframe(1))
        return real_import_module(name, package)

    builtins.__import__ = guarded_import
    importlib.import_module = guarded_import_module
    sys.meta_path.insert(0, _PolicyFinder(os.path.dirname(importlib.__file__) + "/", check))


class _PolicyFinder:
    """A meta-path finder that refuses blocked modules not yet loaded, whatever route was taken
    (``importlib.util.find_spec``, a restored ``__import__``, loaders): it looks at the first frame
    outside the import machinery.  The ``__import__`` wrapper covers modules already loaded."""

    def __init__(self, importlib_dir: str, check) -> None:
        self.importlib_dir = importlib_dir
        self.check = check

    def find_spec(self, name, path=None, target=None):
        frame = sys._getframe(1)
        while frame is not None:
            filename = frame.f_code.co_filename
            if not (filename.startswith("<frozen importlib") or filename.startswith(self.importlib_dir)):
                break
            frame = frame.f_back
        self.check(name, frame)
        return None


def _split_last_expression(tree: ast.Module):
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body.pop()
        return tree, ast.Expression(body=last.value)
    return tree, None


def _trim_traceback(exc: BaseException) -> str:
    """The traceback from the user's first frame on, without jailcell's own frames at the end."""
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


def _figures() -> list[dict]:
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return []
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
        out.append({"mime_type": "image/png", "data": base64.b64encode(data).decode("ascii")})
    return out


def _patch_show(collected: list) -> None:
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.show = lambda *a, **k: collected.extend(_figures())


def execute(code: str, glb: dict) -> dict:
    """Run ``code`` in ``glb``; return the cell's report (status, result, error, outputs)."""
    report: dict = {"status": "ok", "result": None, "error": None, "outputs": []}
    collected: list = []
    _patch_show(collected)
    linecache.cache[CELL_FILENAME] = (len(code), None, code.splitlines(True), CELL_FILENAME)
    try:
        if CONFIG.get("code_mode") == "restricted":
            from _restricted import run_restricted

            value = run_restricted(code, glb, CELL_FILENAME, lambda m: not import_blocked(m))
        else:
            tree = ast.parse(code, CELL_FILENAME, "exec")
            body, last = _split_last_expression(tree)
            exec(compile(body, CELL_FILENAME, "exec"), glb)
            value = eval(compile(last, CELL_FILENAME, "eval"), glb) if last is not None else None
        if value is not None:
            try:
                report["result"] = repr(value)
            except Exception as exc:  # a broken __repr__ is the user's error, not ours
                report["result"] = f"<repr failed: {type(exc).__name__}: {exc}>"
    except SystemExit as exc:
        if exc.code not in (None, 0):
            report["status"] = "error"
            report["error"] = {"type": "SystemExit", "message": str(exc.code), "traceback": ""}
    except BaseException as exc:  # noqa: BLE001 - everything the user's code raises is data
        status = "error"
        if isinstance(exc, MemoryError):
            status = "memory_limit"
        elif isinstance(exc, PolicyViolation) or getattr(exc, "jailcell_policy", False):
            status = "policy_violation"
        report["status"] = status
        report["error"] = {
            "type": type(exc).__name__,
            "message": _safe_str(exc),
            "traceback": _trim_traceback(exc),
        }
    try:
        report["outputs"] = collected + _figures()
    except Exception:
        pass
    return report


def install_host_functions(glb: dict, names: list, fd: int) -> None:
    """Define the host's functions in the cell's globals: each call is a frame up the result
    channel, answered by the host (through the zygote) with a value or an exception."""
    import threading

    lock = threading.Lock()  # one call at a time on the channel, whatever the program's threads do

    def make(name: str):
        def call(*args, **kwargs):
            try:
                frame = proto.encode({"call": name, "args": args, "kwargs": kwargs})
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{name}(): arguments must be JSON values (str, int, float, bool, None, "
                                f"lists, dicts with str keys): {exc}") from None
            if len(frame) > MAX_CALL:
                raise ValueError(f"{name}(): arguments are {len(frame)} bytes encoded; the limit is {MAX_CALL}")
            with lock:
                data = memoryview(frame)
                while data:
                    data = data[os.write(fd, data):]
                reply = proto.read_frame(fd, MAX_CALL + 4096)
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


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _cpu_limit(seconds: float, already: int | None = None) -> int:
    cpu = max(1, int(-(-float(seconds) // 1)))
    if cpu != already:
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        except (ValueError, OSError):
            pass
    return cpu


def _cell_limits(req: dict, cpu_preset: int | None = None) -> None:
    """Limits of one run; a spare has already set the policy's CPU limit while it waited."""
    _cpu_limit(req.get("cpu_s", 30), cpu_preset)
    if CONFIG.get("rlimit_as_mib"):
        # No cgroup: cap the address space at what the cell has now plus its memory budget.
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * resource.getpagesize()
        limit = size + int(CONFIG["rlimit_as_mib"]) * 1024 * 1024
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            pass


def _cell_prepare() -> None:
    """First thing in a new cell (before it waits for work)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # under memory pressure the cell dies, never the zygote or a head
    except OSError:
        pass
    if not CONFIG.get("pid_namespace"):
        os.setpgid(0, 0)


PRISTINE_BUILTINS = dict(builtins.__dict__)  # as they were before any user code


def _finish_cell(res_fd: int, report: dict) -> None:
    """Flush and write the report with pristine builtins (user code may have replaced ``len``).

    The user's builtins are put back afterwards (a session keeps them, like a notebook).  If
    the report cannot be written, the cell exits so the zygote judges it by its exit status.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    current = builtins.__dict__
    users = dict(current)
    current.clear()
    current.update(PRISTINE_BUILTINS)
    try:
        proto.write_frame(res_fd, report)
    except Exception:
        os._exit(REPORT_FAILED)
    finally:
        current.clear()
        current.update(users)


def _warm_up() -> None:
    """Run the execution and reporting paths once while idle, so the memory pages they write
    are copied (copy-on-write after fork) before a request arrives, not while it waits."""
    report = execute("print(end='')\n(1, 'warm')", _user_globals())
    proto.encode(report)
    saved = dict(builtins.__dict__)
    builtins.__dict__.update(saved)


def blocked_loaded_modules() -> list[str]:
    """Loaded modules the policy blocks that can safely be dropped from sys.modules (computed once,
    in the zygote; interpreter built-ins such as sys, posix or _signal cannot be loaded twice)."""
    builtin = set(sys.builtin_module_names)
    return [n for n, m in list(sys.modules.items())
            if n not in builtin and getattr(m, "__file__", None) and import_blocked(n)]


def _hide_blocked_modules() -> None:
    """Take modules the policy blocks out of sys.modules before user code runs, so `sys.modules[...]`
    does not hand them over.  Libraries keep their own references; a later import by library
    code loads them again through the import guard (which lets library code through)."""
    for name in STATE["hide"]:
        sys.modules.pop(name, None)


def _fresh_stdio() -> None:
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin


def _user_globals() -> dict:
    return {"__name__": "__main__", "__builtins__": builtins, "__doc__": None, "__spec__": None}


# ----------------------------------------------------------------------------------------------
# cells as seen from the zygote
# ----------------------------------------------------------------------------------------------

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


class Pipes:
    """Per-run channels: stdout and stderr pipes; the result channel, a socket pair: the cell's
    report and host-function calls go up, call results come back down."""

    def __init__(self) -> None:
        self.out_r, self.out_w = os.pipe2(os.O_NONBLOCK)  # the zygote drains these on a timer
        self.err_r, self.err_w = os.pipe2(os.O_NONBLOCK)
        ours, cells = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.res_r, self.res_w = ours.detach(), cells.detach()
        os.set_blocking(self.res_r, False)
        for fd in (self.out_w, self.err_w):
            os.set_blocking(fd, True)  # the cell's ends block when full, as a terminal would
        for fd in (self.out_r, self.err_r):
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass

    @classmethod
    def from_read_ends(cls, out_r: int, err_r: int, res_r: int) -> "Pipes":
        pipes = cls.__new__(cls)
        pipes.out_r, pipes.err_r, pipes.res_r = out_r, err_r, res_r
        return pipes

    def close_write_ends(self) -> None:
        for fd in (self.out_w, self.err_w, self.res_w):
            os.close(fd)

    def close_read_ends(self) -> None:
        for fd in (self.out_r, self.err_r, self.res_r):
            try:
                os.close(fd)
            except OSError:
                pass


def _become_cell(pipes: Pipes, keep: set[int]) -> tuple[int, dict[int, int]]:
    """In a freshly forked child: wire stdio to the run's pipes; returns (report fd, moved fds)."""
    moved = {fd: fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in keep}  # out of the way of 0..3
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(pipes.out_w, 1)
    os.dup2(pipes.err_w, 2)
    os.dup2(pipes.res_w, 3)
    os.dup2(devnull, 0)
    _close_fds({0, 1, 2, 3, *moved.values()})
    _fresh_stdio()
    return 3, moved


def _spare_main(pipes: Pipes, ctrl_r: int) -> None:
    """Body of a pre-forked cell: wait for one request, run it, report, park until killed."""
    try:
        res_fd, moved = _become_cell(pipes, {ctrl_r})
        _cell_prepare()
        _warm_up()
        _hide_blocked_modules()
        cpu_preset = _cpu_limit(CONFIG.get("cpu_s", 30))  # off the request's path
        req = proto.read_frame(moved[ctrl_r], MAX_REPORT)
        os.close(moved[ctrl_r])
        _cell_limits(req, cpu_preset)
        glb = _user_globals()
        if req.get("functions"):
            install_host_functions(glb, req["functions"], res_fd)
        report = execute(req["code"], glb)
        _finish_cell(res_fd, report)
        # Park: the zygote kills this process after it has replied, so the exit teardown of a
        # large address space is not on the request's critical path.
        while True:
            time.sleep(3600)
    finally:
        os._exit(0)


def _proc_state(pid: int) -> str:
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        return chr(data[data.rindex(b")") + 2])
    except (OSError, ValueError, IndexError):
        return "X"


class SpareHandle:
    """The zygote's side of a pre-forked cell (a child of the nursery)."""

    def __init__(self, pid: int, fds: list[int]) -> None:
        self.pid = pid
        self.ctrl_w = fds[0]
        self.pipes = Pipes.from_read_ends(*fds[1:4])

    def idle(self) -> bool:
        """Still waiting for work: not stopped, killed or exited (a previous cell may have tried)."""
        return _proc_state(self.pid) in ("S", "R", "D")

    def start(self, req: dict) -> None:
        proto.write_frame(self.ctrl_w, req)
        os.close(self.ctrl_w)

    def discard(self) -> None:
        _kill(self.pid)
        try:
            os.close(self.ctrl_w)
        except OSError:
            pass
        self.pipes.close_read_ends()


def _nursery_main(sock: socket.socket, pool_size: int) -> None:
    """The nursery forks spare cells ahead of demand, so the zygote never waits for fork().

    It runs no user code.  It sends each spare's pid and pipe ends to the zygote, gets one
    credit back per spare taken, and reports how each of its children ended (wait4).
    """
    credits = pool_size
    children: dict[int, int] = {}  # pidfd -> pid
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        while credits > 0:
            pipes = Pipes()
            ctrl_r, ctrl_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                _spare_main(pipes, ctrl_r)
            os.close(ctrl_r)
            pipes.close_write_ends()
            ends = (ctrl_w, pipes.out_r, pipes.err_r, pipes.res_r)
            try:
                sock_send(sock, {"op": "spare", "pid": pid}, ends)
            except OSError:
                os._exit(0)
            for fd in ends:
                os.close(fd)
            pidfd = os.pidfd_open(pid)
            children[pidfd] = pid
            poller.register(pidfd, select.POLLIN)
            credits -= 1
        for fd, _ev in poller.poll():
            if fd == sock.fileno():
                try:
                    msg, _ = sock_recv(sock)
                except (EOFError, OSError, proto.ProtocolError):
                    for pid in children.values():
                        _kill(pid)
                    os._exit(0)
                if msg.get("op") == "credit":
                    credits += 1
                continue
            pid = children.pop(fd)
            poller.unregister(fd)
            os.close(fd)
            _, wstatus, ru = os.wait4(pid, 0)
            sock_send(sock, {"op": "exit", "pid": pid, "status": wstatus, "utime": ru.ru_utime,
                             "stime": ru.ru_stime, "maxrss": ru.ru_maxrss})


NURSERY_PATIENCE_S = 5.0


class Nursery:
    """The zygote's side of the nursery: a queue of ready spares and the exits of used ones."""

    def __init__(self, pool_size: int = 2) -> None:
        self.pool_size = pool_size
        self.ready: list[SpareHandle] = []
        self.exits: dict[int, dict] = {}
        self.owed = 0
        self._start()

    def _start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            parent.close()
            devnull = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1):  # never hold the host channel open
                os.dup2(devnull, fd)
            _close_fds({0, 1, 2, child.fileno()})
            try:
                _nursery_main(child, self.pool_size)
            finally:
                os._exit(0)
        child.close()
        self.sock, self.pid = parent, pid

    def _restart(self) -> None:
        _kill(self.pid)
        self.sock.close()
        for h in self.ready:
            os.close(h.pidfd)
            h.discard()
        self.ready = []
        self.owed = 0
        self._start()

    def _pump(self, timeout: float | None) -> bool:
        """Read one message if one arrives within ``timeout``; False on timeout."""
        if timeout is not None:
            readable, _, _ = select.select([self.sock], [], [], timeout)
            if not readable:
                return False
        try:
            msg, fds = sock_recv(self.sock)
        except (EOFError, OSError, proto.ProtocolError):
            self._restart()  # a cell killed it: start another
            return True
        if msg.get("op") == "spare" and len(fds) == 4:
            handle = SpareHandle(int(msg["pid"]), fds)
            try:
                handle.pidfd = os.pidfd_open(handle.pid)
                self.ready.append(handle)
            except ProcessLookupError:
                handle.discard()
        elif msg.get("op") == "exit":
            self.exits[int(msg["pid"])] = msg
        else:
            for fd in fds:
                os.close(fd)
        return True

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the first spare exists (restarting a nursery that produced nothing in time)."""
        deadline = time.monotonic() + timeout
        while not self.ready and time.monotonic() < deadline:
            if not self._pump(NURSERY_PATIENCE_S * 4):
                self._restart()

    def drain(self) -> None:
        while self._pump(0):
            pass

    def take(self) -> tuple[SpareHandle, int]:
        """A ready spare and a pidfd on it (waits for the nursery if none is ready)."""
        while True:
            if not self.ready:
                self.give_back()
            while not self.ready:
                if not self._pump(NURSERY_PATIENCE_S):  # stopped or wedged by a previous cell
                    self._restart()
            handle = self.ready.pop(0)
            self.owed += 1  # credits go back after the reply (see give_back) to keep forks off the hot path
            return handle, handle.pidfd

    def check(self) -> None:
        """Drop spares that are no longer idle, and replace the nursery if it was stopped or
        killed (a previous cell may have signalled them: same uid)."""
        if _proc_state(self.pid) not in ("S", "R", "D"):
            self._restart()
            return
        for handle in list(self.ready):
            if not handle.idle():
                self.ready.remove(handle)
                os.close(handle.pidfd)
                handle.discard()
                self.owed += 1

    def give_back(self) -> None:
        """Let the nursery replace the spares taken since the last call."""
        for _ in range(self.owed):
            sock_send(self.sock, {"op": "credit"})
        self.owed = 0

    def exit_info(self, pid: int, timeout: float = 2.0) -> dict:
        deadline = time.monotonic() + timeout
        while pid not in self.exits and time.monotonic() < deadline:
            self._pump(max(0.0, deadline - time.monotonic()))
        info = self.exits.pop(pid, {})
        if len(self.exits) > 1000:  # exits nobody asked for (normal finishes)
            self.exits.clear()
        return info

def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _frame_complete(buf: bytes) -> bool:
    if len(buf) < proto.HEADER.size:
        return False
    try:
        length = proto.parse_header(bytes(buf[: proto.HEADER.size]), MAX_REPORT)
    except proto.ProtocolError:
        return True
    return len(buf) >= proto.HEADER.size + length


CORRUPTED = object()
REPORT_FAILED = 70  # exit status of a cell whose program broke its reporting


def _parse_report(raw: bytes):
    """The cell's own report: untrusted bytes, validated field by field.

    Returns None when there is no report, CORRUPTED when the bytes are not exactly one valid
    frame (the program wrote into the channel), else the cleaned report.
    """
    if not raw:
        return None
    try:
        length = proto.parse_header(raw[: proto.HEADER.size], MAX_REPORT)
        if len(raw) != proto.HEADER.size + length:
            return CORRUPTED
        rep = proto.decode(raw[proto.HEADER.size :])
    except (proto.ProtocolError, struct.error):
        return CORRUPTED
    out: dict = {}
    status = rep.get("status")
    out["status"] = status if status in ("ok", "error", "memory_limit", "policy_violation") else "error"
    result = rep.get("result")
    out["result"] = result if isinstance(result, str) else None
    err = rep.get("error")
    if isinstance(err, dict):
        out["error"] = {k: str(err.get(k, ""))[:200_000] for k in ("type", "message", "traceback")}
    else:
        out["error"] = None
    outputs = rep.get("outputs")
    out["outputs"] = [
        {"mime_type": str(o["mime_type"]), "data": str(o["data"])}
        for o in (outputs if isinstance(outputs, list) else [])
        if isinstance(o, dict) and isinstance(o.get("mime_type"), str) and isinstance(o.get("data"), str)
    ]
    return out


def _outcome(req, killed_for, wait_status, rusage, raw_report, out, err, duration) -> dict:
    cpu = (rusage.ru_utime + rusage.ru_stime) if rusage is not None else 0.0
    maxrss = (rusage.ru_maxrss * 1024) if rusage is not None else 0
    result = {
        "op": "result",
        "stdout": out.decode("utf-8", "replace"),
        "stderr": err.decode("utf-8", "replace"),
        "result": None,
        "error": None,
        "outputs": [],
        "duration_s": round(duration, 6),
        "cpu_s": round(cpu, 6),
        "peak_memory_bytes": maxrss,
        "signal": None,
        "exit_code": None,
    }
    report = _parse_report(raw_report)
    sig = None
    if wait_status is not None:
        if os.WIFSIGNALED(wait_status):
            sig = os.WTERMSIG(wait_status)
            result["signal"] = SIGNAMES.get(sig, str(sig))
        elif os.WIFEXITED(wait_status):
            result["exit_code"] = os.WEXITSTATUS(wait_status)
    cpu_limit = float(req.get("cpu_s", 30))
    if killed_for == "interrupted":
        status = "killed"
        result["error"] = {"type": "Interrupted", "message": "the run was interrupted by the host", "traceback": ""}
    elif killed_for == "timeout":
        status = "timeout"
        result["error"] = {"type": "Timeout", "message": f"wall-clock limit of {float(req.get('timeout', 0)):g} s reached", "traceback": ""}
    elif killed_for == "bridge":
        status = "error"
        result["error"] = {"type": "HostFunctionMisuse", "traceback": "", "message": "the program was killed: "}
    elif killed_for == "report":
        status = "output_limit"
        result["error"] = {"type": "OutputLimit", "traceback": "",
                           "message": f"the program wrote over {MAX_REPORT} bytes into jailcell's result channel"}
    elif killed_for == "output":
        status = "output_limit"
        cap = CONFIG["limits"]["output_bytes"]
        result["error"] = {"type": "OutputLimit", "message": f"output exceeded {cap} bytes; the head is kept", "traceback": ""}
    elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_limit - 0.05):
        status = "timeout"
        result["error"] = {"type": "Timeout", "message": f"CPU-time limit of {cpu_limit:g} s reached", "traceback": ""}
    elif sig is not None:
        status = "killed"
        try:
            desc = signal.strsignal(sig) or ""
        except (ValueError, AttributeError):
            desc = ""
        result["error"] = {"type": "Signal", "message": f"killed by {SIGNAMES.get(sig, sig)} ({desc})", "traceback": ""}
    elif report is CORRUPTED:
        status = "error"
        result["error"] = {"type": "ResultChannelCorrupted", "traceback": "",
                           "message": "the program wrote into jailcell's result channel; its own report was discarded"}
    elif report is not None:
        status = report["status"]
        result.update(result=report["result"], error=report["error"], outputs=report["outputs"])
    elif result["exit_code"] == REPORT_FAILED:
        status = "error"
        result["error"] = {"type": "ResultChannelCorrupted", "traceback": "",
                           "message": "the program broke jailcell's reporting (it replaced builtins or internals)"}
    elif result["exit_code"] not in (None, 0):
        status = "error"
        result["error"] = {"type": "SystemExit", "message": f"the program exited with code {result['exit_code']}", "traceback": ""}
    else:
        status = "ok"
    result["status"] = status
    return result


# ----------------------------------------------------------------------------------------------
# stateless runs
# ----------------------------------------------------------------------------------------------

class Stateless:
    def __init__(self) -> None:
        self.nursery = Nursery()
        self.workspace = CONFIG["workspace"]
        self.last_cell = 0
        self.nursery.wait_ready()  # the first run is warm

    def run(self, req: dict) -> dict:
        t0 = time.monotonic()
        before = self._write_inputs(req.get("files") or {})
        spare, pidfd = self.nursery.take()
        self.last_cell = spare.pid
        spare.start(req)

        def on_exit(alive):
            if alive:  # reply now; the cell's exit teardown happens off the critical path
                cpu, hwm = _proc_cpu(spare.pid)
                return 0, _Usage(cpu, hwm // 1024)
            return _exit_usage(self.nursery.exit_info(spare.pid))

        try:
            result = supervise(spare.pid, pidfd, spare.pipes, req, t0, on_exit)
        finally:
            os.close(pidfd)
        result.pop("_alive", None)
        result["files"] = self._changed_files(before)
        return result

    def _write_inputs(self, files: dict) -> dict:
        for name, b64 in files.items():
            write_file(self.workspace, name, base64.b64decode(b64))
        return list_files(self.workspace) if files else {}

    def _changed_files(self, before: dict) -> list[dict]:
        after = list_files(self.workspace)
        return [{"name": n, "size": v[0]} for n, v in sorted(after.items()) if before.get(n) != v]

    def cleanup(self) -> None:
        nursery, used = self.nursery.pid, self.last_cell
        # Keep the nursery and its children that have not run anything (spares, possibly not yet
        # announced to us); everything else -- the finished cell and whatever it left -- dies.
        kill_strays(lambda pid, ppid: pid == nursery or (ppid == nursery and pid != used))
        wipe(self.workspace)
        wipe(CONFIG["tmp"])
        self.nursery.drain()
        self.nursery.check()
        self.nursery.give_back()


# ----------------------------------------------------------------------------------------------
# sessions: heads that hold globals
# ----------------------------------------------------------------------------------------------

class HeadLost(Exception):
    """A session head died (e.g. a cell killed it): that session's state is gone."""


class Head:
    """Zygote-side handle of a session branch: its holder process, its spare and its channel."""

    def __init__(self, hid: str, pid: int, sock: socket.socket, workspace: str) -> None:
        self.hid, self.pid, self.sock, self.workspace = hid, pid, sock, workspace
        self.spare: int | None = None
        self.needs_spawn = False
        self.exits: dict[int, dict] = {}

    def expect(self, op: str, timeout: float, pid: int | None = None) -> dict:
        """Read messages until one with ``op`` (and ``pid``) arrives; spares and exits are recorded."""
        deadline = time.monotonic() + timeout
        while True:
            if op == "cell_exit" and pid in self.exits:
                return self.exits.pop(pid)
            if op == "spare" and self.spare is not None:
                return {"op": "spare", "pid": self.spare}
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([self.sock], [], [], max(0.0, remaining))
            if not readable:
                raise HeadLost(f"the session did not answer ({op})")
            try:
                msg, fds = sock_recv(self.sock)
            except (OSError, EOFError, proto.ProtocolError):
                raise HeadLost("the session's state was lost: its head process is gone") from None
            for fd in fds:
                os.close(fd)
            kind = msg.get("op")
            if kind == "spare":
                self.spare = int(msg["pid"])
            elif kind == "cell_exit":
                self.exits[int(msg.get("pid", 0))] = msg
            elif kind == op:
                return msg

    def pids(self) -> set[int]:
        return {self.pid} | ({self.spare} if self.spare else set())


def sock_send(sock: socket.socket, obj: dict, fds: tuple[int, ...] = ()) -> None:
    """One frame over a stream socket; ``fds`` travel with the header (SCM_RIGHTS)."""
    frame = proto.encode(obj)
    if fds:
        socket.send_fds(sock, [frame[: proto.HEADER.size]], list(fds))
        sock.sendall(frame[proto.HEADER.size :])
    else:
        sock.sendall(frame)


def _sock_exact(sock: socket.socket, n: int, first: bytes = b"") -> bytes:
    buf = bytearray(first)
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("peer closed the socket")
        buf += chunk
    return bytes(buf)


def sock_recv(sock: socket.socket, limit: int = MAX_REPORT) -> tuple[dict, list[int]]:
    head, fds, _flags, _addr = socket.recv_fds(sock, proto.HEADER.size, 8)
    if not head:
        raise EOFError("peer closed the socket")
    length = proto.parse_header(_sock_exact(sock, proto.HEADER.size, head), limit)
    return proto.decode(_sock_exact(sock, length)), fds


def _head_main(sock: socket.socket, glb: dict, workspace: str) -> None:
    """A session branch, forever.  Two roles, one loop (no recursion however many runs):

    holder: keeps the state; forks a spare (an identical copy), announces it, and waits for it.
            If the spare dies (its cell was killed), reports how, and forks a fresh spare from
            the unchanged state.
    spare:  reads the zygote's requests.  A run executes in the spare itself; when it finishes
            (ok or exception) the spare becomes the holder of the new state and the zygote
            kills the old holder.  A fork request makes a child that holds a new branch.
    """
    role, await_spawn = "hold", False
    while True:
        if role == "hold":
            while await_spawn:  # after a run, fork only when the zygote says (after its reply)
                try:
                    msg, fds = sock_recv(sock)
                except (OSError, EOFError, proto.ProtocolError):
                    os._exit(0)
                for fd in fds:
                    os.close(fd)
                await_spawn = msg.get("op") != "spawn"
            pid = os.fork()
            if pid == 0:
                role = "serve"
                _fresh_stdio()  # bound to fds 1 and 2, which a run points at its pipes
                _warm_up()
                _hide_blocked_modules()
                continue
            sock_send(sock, {"op": "spare", "pid": pid})
            _, wstatus, ru = os.wait4(pid, 0)
            sock_send(sock, {"op": "cell_exit", "pid": pid, "status": wstatus, "utime": ru.ru_utime,
                             "stime": ru.ru_stime, "maxrss": ru.ru_maxrss})
            continue
        try:
            req, fds = sock_recv(sock)
        except (OSError, EOFError, proto.ProtocolError):
            os._exit(0)
        op = req.get("op")
        if op == "run" and len(fds) == 3:
            sock_send(sock, {"op": "started", "pid": os.getpid()})
            for target, fd in zip((1, 2, 3), fds):
                os.dup2(fd, target)
            for fd in fds:
                if fd > 3:
                    os.close(fd)
            _cell_limits(req)
            if req.get("functions"):
                install_host_functions(glb, req["functions"], 3)
            report = execute(req["code"], glb)
            _finish_cell(3, report)
            devnull = os.open("/dev/null", os.O_WRONLY)  # detach from this run's pipes
            for fd in (1, 2, 3):
                os.dup2(devnull, fd)
            os.close(devnull)
            try:
                resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            except (ValueError, OSError):
                pass
            role, await_spawn = "hold", True
        elif op == "fork" and len(fds) == 1:
            pid = os.fork()
            if pid == 0:
                sock.close()
                sock = socket.socket(fileno=fds[0])
                workspace = req["workspace"]
                _copy_tree(os.getcwd(), workspace)
                os.chdir(workspace)
                sock_send(sock, {"op": "forked", "pid": os.getpid()})
                role = "hold"
                continue
            os.close(fds[0])
        else:
            os._exit(0)


def _copy_tree(src: str, dst: str) -> None:
    import shutil

    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)


class Sessions:
    def __init__(self) -> None:
        self.heads: dict[str, Head] = {}
        self.counter = 0
        self.root = CONFIG["workspace"]

    def _new_workspace(self) -> tuple[str, str]:
        self.counter += 1
        hid = f"h{self.counter}"
        ws = os.path.join(self.root, hid)
        os.mkdir(ws, 0o755)
        return hid, ws

    def new(self, req: dict | None = None) -> dict:
        hid, ws = self._new_workspace()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            parent.close()
            devnull = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            _close_fds({0, 1, 2, child.fileno()})
            _fresh_stdio()
            _cell_prepare()
            os.chdir(ws)
            try:
                _head_main(child, _user_globals(), ws)
            finally:
                os._exit(0)
        child.close()
        head = Head(hid, pid, parent, ws)
        head.expect("spare", 30)
        self.heads[hid] = head
        return {"op": "ok", "head": hid}

    def _head(self, req: dict) -> Head:
        head = self.heads.get(req.get("head"))
        if head is None:
            raise KeyError(f"no such session head {req.get('head')!r}")
        return head

    def run(self, req: dict) -> dict:
        head = self._head(req)
        t0 = time.monotonic()
        before = list_files(head.workspace)
        head.expect("spare", 30)  # the spare that will run this cell is ready
        pipes = Pipes()
        try:
            sock_send(head.sock, req, (pipes.out_w, pipes.err_w, pipes.res_w))
        except OSError:
            pipes.close_write_ends()
            pipes.close_read_ends()
            raise HeadLost("the session's state was lost: its head process is gone") from None
        pipes.close_write_ends()
        try:
            cell_pid = int(head.expect("started", 10)["pid"])
            pidfd = os.pidfd_open(cell_pid)
        except (HeadLost, ProcessLookupError):
            pipes.close_read_ends()
            raise HeadLost("the session's state was lost: its head process is gone") from None
        head.spare = None

        def on_exit(finished):
            if finished:  # the cell lives on as the holder of the new state; measure it via /proc
                cpu, hwm = _proc_cpu(cell_pid)
                return 0, _Usage(cpu, hwm // 1024)
            try:  # the holder reports how its spare (this cell) ended
                return _exit_usage(head.expect("cell_exit", 2, pid=cell_pid))
            except HeadLost:
                return None, _Usage(0.0, 0)

        result = supervise(cell_pid, pidfd, pipes, req, t0, on_exit)
        os.close(pidfd)
        if result.pop("_alive", False):
            _kill(head.pid)  # the old state's holder is no longer needed
            head.pid = cell_pid
            head.needs_spawn = True
        result["files"] = [
            {"name": n, "size": v[0]} for n, v in sorted(list_files(head.workspace).items()) if before.get(n) != v
        ]
        return result

    def fork(self, req: dict) -> dict:
        head = self._head(req)
        head.expect("spare", 30)  # the spare reads requests: it makes the branch
        hid, ws = self._new_workspace()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock_send(head.sock, {"op": "fork", "workspace": ws}, (child.fileno(),))
        except OSError:
            parent.close()
            raise HeadLost("the session's state was lost: its head process is gone") from None
        finally:
            child.close()
        branch = Head(hid, 0, parent, ws)
        try:
            branch.pid = int(branch.expect("forked", 30)["pid"])
            branch.expect("spare", 30)
        except HeadLost:
            parent.close()
            raise
        self.heads[hid] = branch
        return {"op": "ok", "head": hid}

    def close(self, req: dict) -> dict:
        head = self.heads.pop(req.get("head"), None)
        if head is not None:
            for pid in head.pids():
                _kill(pid)
            head.sock.close()
            wipe(head.workspace)
            try:
                os.rmdir(head.workspace)
            except OSError:
                pass
        return {"op": "ok"}

    def upload(self, req: dict) -> dict:
        head = self._head(req)
        write_file(head.workspace, req["name"], base64.b64decode(req["data"]))
        return {"op": "ok"}

    def download(self, req: dict) -> dict:
        head = self._head(req)
        data = read_file(head.workspace, req["name"], int(req.get("limit", 64 * 1024 * 1024)))
        return {"op": "ok", "data": base64.b64encode(data).decode("ascii")}

    SPAWN_DELAY_S = 0.004

    def cleanup(self) -> None:
        keep: set[int] = set()
        if any(h.needs_spawn for h in self.heads.values()):
            # Forking a large holder keeps a CPU busy for milliseconds; on small machines that
            # delays the host picking up the reply just sent.  Let it do so first.
            time.sleep(self.SPAWN_DELAY_S)
        for head in list(self.heads.values()):
            try:
                if head.needs_spawn:
                    head.needs_spawn = False
                    sock_send(head.sock, {"op": "spawn"})
                head.expect("spare", 30)  # the holder forks the next spare after each run
            except (HeadLost, OSError):
                pass
            keep |= head.pids()
        kill_strays(lambda pid, ppid: pid in keep)
        wipe(CONFIG["tmp"])


class _Usage:
    """The rusage fields jailcell reports, for cells that are not the zygote's own children."""

    def __init__(self, cpu: float, maxrss_kib: int) -> None:
        self.ru_utime, self.ru_stime, self.ru_maxrss = cpu, 0.0, maxrss_kib


def _exit_usage(info: dict):
    status = info.get("status")
    usage = _Usage(float(info.get("utime", 0.0)) + float(info.get("stime", 0.0)), int(info.get("maxrss", 0)))
    return (int(status) if isinstance(status, int) else None), usage


def _proc_cpu(pid: int) -> tuple[float, int]:
    """CPU seconds and peak RSS (bytes) of a live process, from /proc (it is not our child)."""
    try:
        data = _read_proc(f"/proc/{pid}/stat", 4096)
        fields = data[data.rindex(b")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        status = _read_proc(f"/proc/{pid}/status", 16384)
        at = status.find(b"VmHWM:")
        hwm = int(status[at + 6 : status.index(b"k", at)]) * 1024 if at >= 0 else 0
        return cpu, hwm
    except (OSError, ValueError, IndexError):
        return 0.0, 0


DRAIN_INTERVAL_S = 0.02


class _Output:
    """stdout/stderr of a run, capped at the policy's output limit (the head is kept)."""

    def __init__(self, pipes: Pipes) -> None:
        self.cap = int(CONFIG["limits"]["output_bytes"])
        self.fds = (pipes.out_r, pipes.err_r)
        self.bufs = {fd: bytearray() for fd in self.fds}
        self.total = 0

    def drain(self) -> bool:
        """Read what is in the (non-blocking) pipes; True when the cap was exceeded."""
        over = False
        for fd in self.fds:
            while True:
                try:
                    chunk = os.read(fd, 1 << 20)
                except (BlockingIOError, OSError):
                    break
                if not chunk:
                    break
                room = self.cap - self.total
                if len(chunk) > room:
                    over = True
                self.bufs[fd] += chunk[: max(0, room)]
                self.total += min(len(chunk), max(0, room))
        return over


class _Bridge:
    """Host-function calls of one run.  The cell's call frames are checked here (known name,
    JSON shapes, size, count) and forwarded to the host one at a time; the host's answer goes
    back down the cell's socket without blocking the zygote.  If the run ends while a call is
    with the host, the main loop discards the late answer."""

    def __init__(self, fd: int, names: list) -> None:
        self.fd, self.names = fd, set(names)
        self.pending = False
        self.count = 0
        self.out = bytearray()
        self.misuse = ""

    def forward(self, res: bytearray) -> str | None:
        """Take the call frame at the head of ``res`` and answer or forward it.  Returns why the
        cell must be killed (it ignores the call limit or does not read its answers), else None."""
        try:
            length = proto.parse_header(bytes(res[: proto.HEADER.size]), MAX_REPORT)
        except (proto.ProtocolError, struct.error):
            res.clear()
            return "it wrote malformed bytes into its result channel"
        body = bytes(res[proto.HEADER.size : proto.HEADER.size + length])
        del res[: proto.HEADER.size + length]
        self.count += 1
        if self.count > MAX_CALLS_PER_RUN + 1:
            return f"it made more than {MAX_CALLS_PER_RUN} host function calls after being told the limit"
        if len(self.out) > MAX_CALL:
            return "it does not read the answers to its host function calls"
        try:
            msg = proto.decode(body)
        except proto.ProtocolError:
            msg = {}
        name, args, kwargs = msg.get("call"), msg.get("args", []), msg.get("kwargs", {})
        if len(body) > MAX_CALL:
            self._reply({"error": {"type": "ValueError", "message": f"call arguments over {MAX_CALL} bytes"}})
        elif self.count > MAX_CALLS_PER_RUN:
            self._reply({"error": {"type": "RuntimeError", "message":
                                   f"host function call limit reached ({MAX_CALLS_PER_RUN} per run)"}})
        elif not isinstance(name, str) or name not in self.names:
            self._reply({"error": {"type": "NameError", "message": f"host function {name!r} is not defined; "
                                   f"defined: {', '.join(sorted(self.names)) or 'none'}"}})
        elif not isinstance(args, list) or not isinstance(kwargs, dict):
            self._reply({"error": {"type": "TypeError", "message": "malformed call"}})
        else:
            proto.write_frame(HOST_OUT, {"op": "call", "name": name, "args": args, "kwargs": kwargs})
            self.pending = True
        return None

    def answer(self, msg: dict) -> None:
        self.pending = False
        if "error" in msg:
            err = msg["error"] if isinstance(msg["error"], dict) else {}
            self._reply({"error": {"type": str(err.get("type", "RuntimeError")), "message": str(err.get("message", ""))}})
        else:
            self._reply({"value": msg.get("value")})

    def _reply(self, obj: dict) -> None:
        self.out += proto.encode(obj)
        self.flush()

    def flush(self) -> None:
        while self.out:
            try:
                n = os.write(self.fd, self.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the cell is gone
                self.out.clear()
                return
            del self.out[:n]


def supervise(pid: int, pidfd: int, pipes: Pipes, req: dict, t0: float, on_exit) -> dict:
    """Enforce wall time and output size on a running cell and collect its report.

    The run ends when the cell's report is complete (the cell then parks, or, in a session,
    lives on as the next head) or when the cell dies.  The zygote wakes only for the report,
    the exit and a slow timer that drains stdout/stderr (their pipes are large and
    non-blocking), so a short run costs as few context switches as possible.
    ``on_exit(finished)`` returns ``(wait_status, rusage)``.
    """
    deadline = t0 + float(req.get("timeout", 30))
    output = _Output(pipes)
    res = bytearray()
    bridge = _Bridge(pipes.res_r, req.get("functions") or [])
    killed_for = None
    finished = False
    poller = select.poll()
    poller.register(pipes.res_r, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    poller.register(HOST_IN, select.POLLIN)  # during a run the host sends only call results and interrupts
    done = False
    while not done:
        remaining = deadline - time.monotonic()
        if remaining <= 0 and killed_for is None:
            killed_for = "timeout"
            _kill(pid)
        wait = min(max(0.0, remaining), DRAIN_INTERVAL_S) if killed_for is None else 1.0
        events = poller.poll(wait * 1000)
        if output.drain() and killed_for is None:
            killed_for = "output"
            _kill(pid)
        for fd, ev in events:
            if fd == pidfd:
                done = True
                continue
            if fd == HOST_IN:
                try:
                    msg = proto.read_frame(HOST_IN, MAX_REPORT)
                except (EOFError, proto.ProtocolError):
                    os._exit(0)  # the host is gone
                if msg.get("op") == "interrupt" and killed_for is None:
                    killed_for = "interrupted"
                    _kill(pid)
                elif msg.get("op") == "call_result" and bridge.pending:
                    bridge.answer(msg)
                continue
            if ev & select.POLLOUT:
                bridge.flush()
            if not ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                continue
            try:
                chunk = os.read(fd, 1 << 16)
            except (BlockingIOError, ConnectionResetError):
                continue
            if not chunk:
                poller.unregister(fd)
                continue
            res += chunk
        if len(res) > MAX_REPORT:
            killed_for = killed_for or "report"
            _kill(pid)
        while killed_for is None and not bridge.pending and _frame_complete(res):
            if not bytes(res[proto.HEADER.size:proto.HEADER.size + len(CALL_PREFIX)]) == CALL_PREFIX:
                finished = done = True  # the report
                break
            misuse = bridge.forward(res)
            if misuse:
                killed_for, bridge.misuse = "bridge", misuse
                _kill(pid)
        if bridge.count:
            # While a call is with the host the cell should be waiting for its answer: stop reading
            # (a flooding cell then blocks in write); wake for room only while an answer waits to go down.
            try:
                poller.modify(pipes.res_r, (0 if bridge.pending else select.POLLIN) |
                              (select.POLLOUT if bridge.out else 0))
            except (OSError, KeyError):
                pass
    # Output written before the report or the exit is already in the pipes.
    if output.drain() and killed_for is None:
        killed_for = "output"
    while len(res) <= MAX_REPORT:
        try:
            chunk = os.read(pipes.res_r, 1 << 16)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        res += chunk
    duration = time.monotonic() - t0
    wait_status, rusage = on_exit(finished)
    pipes.close_read_ends()
    result = _outcome(req, killed_for, wait_status, rusage, bytes(res), output.bufs[pipes.out_r],
                      output.bufs[pipes.err_r], duration)
    if killed_for == "bridge":
        result["error"]["message"] += bridge.misuse
    result["_alive"] = finished
    return result


# ----------------------------------------------------------------------------------------------
# main loop
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


def _harden() -> None:
    # The host controls the zygote; cells must not.  Default dispositions make pid 1 of a pid
    # namespace immune to signals sent from inside it; Python's SIGINT handler would undo that.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    _prctl(PR_SET_DUMPABLE, 0)  # no /proc/1/mem, no ptrace from cells (seccomp denies it too)
    if not CONFIG.get("pid_namespace"):
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come back to us, so strays can be found
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _add_site_dirs(dirs: list[str]) -> None:
    """What site.main() would add, minus the executable `import` lines of .pth files."""
    for d in dirs:
        if d not in sys.path:
            sys.path.append(d)
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith(".pth"))
        except OSError:
            continue
        for name in names:
            try:
                with open(os.path.join(d, name), encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except (OSError, UnicodeDecodeError):
                continue
            for line in lines:
                line = line.strip()
                if not line or line.startswith("#") or line.startswith(("import ", "import\t")):
                    continue
                path = os.path.join(d, line)
                if os.path.isdir(path) and path not in sys.path:
                    sys.path.append(path)
    import site  # with -S, importing site does not run it; it still provides exit/quit/help

    site.setquit()
    site.setcopyright()
    site.sethelper()


def main() -> None:
    global CONFIG
    CONFIG = proto.read_frame(HOST_IN)
    _add_site_dirs(CONFIG.get("site_dirs", []))
    PRISTINE_BUILTINS.update(builtins.__dict__)
    STATE["trusted_prefixes"] = tuple(p.rstrip("/") + "/" for p in CONFIG.get("trusted_paths", [])) or ("/nonexistent/",)
    _harden()
    os.chdir(CONFIG["workspace"])
    t0 = time.monotonic()
    preload = _preload(CONFIG.get("preload", []))
    if CONFIG.get("code_mode") == "restricted":
        import _restricted  # noqa: F401 - compile RestrictedPython once, not per cell
    install_import_guard()
    STATE["hide"] = blocked_loaded_modules()
    gc.collect()
    gc.freeze()  # preloaded objects: never scanned by a cell's GC, so never copied on write
    engine = Sessions() if CONFIG.get("session") else Stateless()
    proto.write_frame(HOST_OUT, {
        "op": "ready", "version": proto.VERSION, "pid": os.getpid(),
        "preload": preload, "preload_s": round(time.monotonic() - t0, 4),
        "python": sys.version.split()[0],
    })
    while True:
        try:
            req = proto.read_frame(HOST_IN)
        except (EOFError, proto.ProtocolError):
            os._exit(0)
        op = req.get("op")
        if op in ("call_result", "interrupt"):  # late: the run they were meant for has ended
            continue
        try:
            if op == "run":
                reply = engine.run(req)
            elif op in ("new", "fork", "close", "upload", "download") and isinstance(engine, Sessions):
                reply = getattr(engine, op)(req)
            elif op == "ping":
                reply = {"op": "pong"}
            elif op == "shutdown":
                proto.write_frame(HOST_OUT, {"op": "bye"})
                os._exit(0)
            else:
                reply = {"op": "error", "message": f"unknown request {op!r}"}
        except Exception as exc:  # noqa: BLE001 - a bad request must never take the zygote down
            reply = {"op": "error", "type": type(exc).__name__, "message": str(exc)}
        proto.write_frame(HOST_OUT, reply)
        if op == "run":
            engine.cleanup()


if __name__ == "__main__":
    main()
