"""Host side of one run: hand the request to a spare cell, watch it, decide what happened.

The host talks to the cell directly -- the request down a pipe, the report (and host-function
calls) up a socket, stdout/stderr through large pipes it drains on a timer -- and enforces the
wall clock, the output cap, the CPU limit and interrupts itself, killing the cell through a
pidfd.  Nothing the cell sends is trusted: the report is bounded, validated JSON, host-function
calls are checked before any function is looked up, and the status of a run comes from what the
host observed (deadline, byte counts, exit status, signals), the report only filling in details.
"""

from __future__ import annotations

import _socket as socket  # not socket.py, whose enums cost ~1.7 ms at every `jailcell run`
import os
import re
import select
import signal
import struct
import time
from typing import Any, Callable

from .._injail import _protocol as proto
from ..backends._disk import DiskWatch
from ._run import Outcome, RunRequest

DRAIN_INTERVAL_S = 0.02
READ_SIZE = 1 << 16  # os.read allocates this much first: 1 MiB would be an mmap + munmap per read
SIGNAMES = {s.value: s.name for s in signal.Signals}
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Spare:
    """A pre-forked cell as the host holds it: its pid (inside the jail) and its channels.

    The pipes and the socket arrive non-blocking on the host's side (the zygote set them up);
    /proc/<pid>/stat, status and schedstat are opened now, off the request's path, and read
    after a run."""

    def __init__(self, pid: int, head: str | None, fds: list[int]) -> None:
        self.pid, self.head = pid, head
        self.slim = False  # forked from the jail's slim image (no heavy preloads)
        self.req_w, self.out_r, self.err_r, res, self.pidfd = fds
        self.res = socket.socket(fileno=res)
        self.proc_fds: tuple[int, int] | None = None
        self.sched_fd = -1  # CPU time in ns (a kernel without schedstat: from stat, in ticks)
        host_pid = _host_pid(self.pidfd)
        if host_pid is not None:
            opened: list[int] = []
            try:
                for name in ("stat", "status"):
                    opened.append(os.open(f"/proc/{host_pid}/{name}", os.O_RDONLY | os.O_CLOEXEC))
                self.proc_fds = (opened[0], opened[1])
            except OSError:
                for fd in opened:
                    os.close(fd)
            if self.proc_fds is not None:
                try:
                    self.sched_fd = os.open(f"/proc/{host_pid}/schedstat", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    pass

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        if self.pidfd < 0:  # closed: the zygote confirmed the cell is gone
            return
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass

    def stat(self) -> tuple[str, float]:
        """Scheduler state and CPU seconds used so far (utime + stime of the whole process)."""
        if self.proc_fds is None:
            return "?", 0.0
        try:
            data = os.pread(self.proc_fds[0], 4096, 0)
            fields = data[data.rindex(b")") + 2 :].split()
            return chr(fields[0][0]), (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, ValueError, IndexError):
            return "?", 0.0

    def usage(self) -> tuple[float, int]:
        """CPU seconds and peak RSS (bytes) of the cell, which is still alive (parked or holding)."""
        if self.proc_fds is None:
            return 0.0, 0
        try:
            status = os.pread(self.proc_fds[1], 16384, 0)
            at = status.find(b"VmHWM:")
            hwm = int(status[at + 6 : status.index(b"k", at)]) * 1024 if at >= 0 else 0
        except (OSError, ValueError):
            hwm = 0
        if self.sched_fd >= 0:
            try:
                return int(os.pread(self.sched_fd, 256, 0).split()[0]) / 1e9, hwm
            except (OSError, ValueError, IndexError):
                pass
        return self.stat()[1], hwm

    def close(self) -> None:
        for fd in (self.req_w, self.out_r, self.err_r, self.pidfd, self.sched_fd, *(self.proc_fds or ())):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.req_w = self.out_r = self.err_r = self.pidfd = self.sched_fd = -1
        self.proc_fds = None
        self.res.close()


def _host_pid(pidfd: int) -> int | None:
    """The cell's pid as the host sees it (for /proc), from the pidfd's fdinfo."""
    try:
        fd = os.open(f"/proc/self/fdinfo/{pidfd}", os.O_RDONLY)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        at = data.index(b"\nPid:")
        pid = int(data[at + 5 : data.index(b"\n", at + 1)])
        return pid if pid > 0 else None
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------
# host-function calls
# ------------------------------------------------------------------------------------------------

class _CallRelay:
    """Host-function calls of one run.  A call frame is checked here (known name, JSON shapes,
    size, count) before the host looks anything up; the answer goes back down the cell's socket
    without blocking the host on a cell that does not read."""

    def __init__(self, sock: socket.socket, names: list[str], on_call: Callable[[dict], dict] | None) -> None:
        self.sock, self.names, self.on_call = sock, set(names), on_call
        self.count = 0
        self.out = bytearray()

    def handle(self, frame: bytes) -> str | None:
        """Answer one call frame.  Returns why the cell must be killed, else None."""
        self.count += 1
        if self.count > proto.MAX_CALLS_PER_RUN + 1:
            return f"it made more than {proto.MAX_CALLS_PER_RUN} host function calls after being told the limit"
        if len(self.out) > proto.MAX_CALL:
            return "it does not read the answers to its host function calls"
        body = frame[proto.HEADER.size :]
        msg: dict[str, Any] = {}
        if len(body) <= proto.MAX_CALL and not too_many_containers(body, MAX_CALL_CONTAINERS):
            try:
                msg = proto.decode(body)
            except proto.ProtocolError:
                pass
        name, args, kwargs = msg.get("call"), msg.get("args", []), msg.get("kwargs", {})
        if len(body) > proto.MAX_CALL:
            answer = _error("ValueError", f"call arguments over {proto.MAX_CALL} bytes")
        elif not msg:
            answer = _error("ValueError", "malformed call: not a JSON object, or over "
                                          f"{MAX_CALL_CONTAINERS} JSON arrays and objects")
        elif self.count > proto.MAX_CALLS_PER_RUN:
            answer = _error("RuntimeError", f"host function call limit reached ({proto.MAX_CALLS_PER_RUN} per run)")
        elif not isinstance(name, str) or name not in self.names or self.on_call is None:
            answer = _error("NameError", f"host function {name!r} is not defined; "
                                         f"defined: {', '.join(sorted(self.names)) or 'none'}")
        elif not isinstance(args, list) or not isinstance(kwargs, dict):
            answer = _error("TypeError", "malformed call")
        else:
            answer = self.on_call({"name": name, "args": args, "kwargs": kwargs})
        self.out += proto.encode(_clean_answer(answer))
        self.flush()
        return None

    def flush(self) -> None:
        while self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the cell is gone
                self.out.clear()
                return
            del self.out[:n]


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


def _clean_answer(answer: dict[str, Any]) -> dict[str, Any]:
    if "error" in answer:
        err = answer["error"] if isinstance(answer["error"], dict) else {}
        return _error(str(err.get("type", "RuntimeError")), str(err.get("message", "")))
    return {"value": answer.get("value")}


# ------------------------------------------------------------------------------------------------
# watching a run
# ------------------------------------------------------------------------------------------------

class Observed:
    """What the host saw of one run."""

    __slots__ = ("finished", "killed_for", "misuse", "report", "stdout", "stderr", "duration_s", "started")

    def __init__(self) -> None:
        self.finished = False                   # a complete report arrived (the cell is parked or holds state)
        self.killed_for: str | None = None  # timeout | cpu | output | report | corrupt | bridge | interrupted | disk
        self.misuse = ""
        self.report = b""
        self.stdout = b""
        self.stderr = b""
        self.duration_s = 0.0
        self.started = True                     # False: the spare was dead before it got the request


def _send_request(spare: Spare, data: bytes, deadline: float) -> bool:
    """Write the request into the spare's pipe (non-blocking: a large one is written as the cell
    reads it).  False when the spare was dead, or stopped, before it took the request."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(spare.req_w, view):]
            continue
        except BlockingIOError:
            pass
        except OSError:  # EPIPE: the cell is gone
            return False
        remaining = deadline - time.monotonic()
        ready = select.select([spare.pidfd], [spare.req_w], [], max(0.0, remaining))
        if spare.pidfd in ready[0] or (remaining <= 0 and not ready[1]):
            spare.kill()
            return False
    return True


def supervise(spare: Spare, req: RunRequest, *, output_cap: int, interrupt_fd: int,
              on_call: Callable[[dict], dict] | None = None, disk: DiskWatch | None = None) -> Observed:
    """Give ``req`` to ``spare`` and watch the run until its report is complete or it dies.

    The host wakes for the report, the cell's death, an interrupt and a slow timer that drains
    stdout/stderr (large non-blocking pipes), so a short run costs one wake-up here.  ``disk``: the
    jail's workspace bound where it has no tmpfs (scanned after file events; the host's free space on the
    slow timer)."""
    t0 = time.monotonic()
    deadline = t0 + req.timeout
    cpu_limit = req.cpu_s
    seen = Observed()
    out, err = bytearray(), bytearray()
    total = 0

    def drain() -> bool:
        """Read what is in the pipes; True when the cap was exceeded (the head is kept)."""
        nonlocal total
        over = False
        for fd, buf in ((spare.out_r, out), (spare.err_r, err)):
            while True:
                try:
                    chunk = os.read(fd, READ_SIZE)
                except OSError:  # EAGAIN: empty
                    break
                room = output_cap - total
                if len(chunk) > room:
                    over = True
                buf += chunk[: max(0, room)]
                total += min(len(chunk), max(0, room))
                if len(chunk) < READ_SIZE:  # a pipe read returns all there is: it is empty now
                    break
        return over

    def stop(reason: str) -> None:
        if seen.killed_for is None:
            seen.killed_for = reason
            spare.kill()

    def measure(final: bool) -> None:
        if disk is not None and seen.killed_for is None and disk.due(time.monotonic(), final):
            over = disk.excess()
            if over:
                seen.misuse = over
                stop("disk")

    if disk is not None:  # before the request goes: what the run writes is the run's
        disk.begin(spare.head is not None)
    seen.started = _send_request(spare, proto.encode(req.frame()), deadline)
    os.close(spare.req_w)
    spare.req_w = -1
    relay = _CallRelay(spare.res, list(req.functions), on_call)
    res = bytearray()
    poller = select.poll()
    poller.register(spare.res.fileno(), select.POLLIN)
    poller.register(spare.pidfd, select.POLLIN)
    poller.register(interrupt_fd, select.POLLIN)
    if disk is not None and disk.fileno() >= 0:
        poller.register(disk.fileno(), select.POLLIN)
    res_open = True
    done = not seen.started
    while not done:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            stop("timeout")
        wait = min(max(0.0, remaining), DRAIN_INTERVAL_S) if seen.killed_for is None else 1.0
        if disk is not None and disk.touched:  # a scan put off by the gap between scans
            wait = min(wait, max(0.0, disk.next_scan - time.monotonic()))
        events = poller.poll(wait * 1000)
        if not events and drain():  # the slow timer: a long run (a short one is drained once, below)
            stop("output")
        if not events and seen.killed_for is None:
            state, cpu = spare.stat()
            if cpu > cpu_limit + 0.5:
                stop("cpu")  # the rlimit's backstop (a session cell keeps its hard limit open)
            elif state in ("T", "t"):
                spare.resume()  # stopped (by itself, or by the previous program): nobody else would
            full = disk.host_full() if disk is not None else None
            if full:
                seen.misuse = full
                stop("disk")
        for fd, ev in events:
            if fd == spare.pidfd:
                done = True
            elif fd == interrupt_fd:
                os.read(interrupt_fd, 64)
                stop("interrupted")
            elif disk is not None and fd == disk.fileno():
                disk.drain()
            elif ev & select.POLLOUT:
                relay.flush()
            if fd == spare.res.fileno() and ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                try:
                    chunk = spare.res.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    chunk = None
                except OSError:
                    chunk = b""
                if chunk == b"":
                    poller.unregister(fd)
                    res_open = False
                elif chunk:
                    res += chunk
        measure(False)
        if len(res) > proto.MAX_REPORT:
            stop("report")
        while seen.killed_for is None:
            try:
                size = proto.frame_length(res, proto.MAX_REPORT)
            except (proto.ProtocolError, struct.error):
                if bytes(res[proto.HEADER.size : proto.HEADER.size + len(proto.CALL_PREFIX)]) == proto.CALL_PREFIX:
                    seen.misuse = "it wrote malformed bytes into its result channel"
                    stop("bridge")
                else:  # the program wrote into the channel: its report can no longer be told apart
                    stop("corrupt")
                break
            if size is None:
                break
            is_call = bytes(res[proto.HEADER.size : proto.HEADER.size + len(proto.CALL_PREFIX)]) == proto.CALL_PREFIX
            if is_call and size > proto.HEADER.size + proto.MAX_CALL:  # never buffered whole
                seen.misuse = f"it sent a host function call of {size} bytes (at most {proto.MAX_CALL})"
                stop("bridge")
                break
            if len(res) < size:
                break
            if not is_call:
                seen.finished = done = True  # the report
                break
            frame = bytes(res[:size])
            del res[:size]
            misuse = relay.handle(frame)
            if misuse:
                seen.misuse = misuse
                stop("bridge")
        if res_open and relay.count:
            # While an answer waits to go down, wake when the cell makes room for it.
            try:
                poller.modify(spare.res.fileno(), select.POLLIN | (select.POLLOUT if relay.out else 0))
            except (OSError, KeyError):
                pass
    # Output written before the report or the exit is already in the pipes.
    if drain():
        stop("output")
    if disk is not None:  # what the run left: a run that ends over the bound has failed
        disk.drain()
        measure(True)
    while not seen.finished and len(res) <= proto.MAX_REPORT:
        try:
            chunk = spare.res.recv(1 << 16)
        except (BlockingIOError, InterruptedError, OSError):
            break
        if not chunk:
            break
        res += chunk
    seen.duration_s = time.monotonic() - t0
    seen.report, seen.stdout, seen.stderr = bytes(res), bytes(out), bytes(err)
    return seen


# ------------------------------------------------------------------------------------------------
# deciding what happened
# ------------------------------------------------------------------------------------------------

CORRUPTED = object()

# How to raise each limit, said where it is hit (for the person reading the Result; the model
# learns the limit itself from the first part).
RAISE_WALL = " (raise it: run(..., timeout=S), jailcell run --timeout S, or limits.wall_s in a policy)"
RAISE_CPU = " (raise it: limits.cpu_s in a policy; it follows the wall-clock limit by default)"
RAISE_OUTPUT = " (raise it: limits.output_bytes in a policy, or output_bytes=N)"
RAISE_MEMORY = " (raise it: Sandbox(memory=MiB), jailcell run --memory MiB, or limits.memory_mib in a policy)"


# JSON from a cell is decoded only after its shape is bounded: each JSON array or object becomes a
# Python object of ~60 bytes or more, so "[],[],..." would cost the host ~30x its size in memory
# (an 8 MiB report: 230 MiB) and seconds of CPU.  Strings are skipped by the scan (their brackets
# are text); what is left is counted.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
MAX_REPORT_CONTAINERS = proto.MAX_LISTED_FILES + 1000  # a report: a few fields, files, outputs
MAX_CALL_CONTAINERS = 100_000                          # a host-function call's arguments
SCAN_ABOVE = 4096                                      # smaller bodies cannot hold many


def too_many_containers(body: bytes, limit: int) -> int | None:
    """The number of JSON arrays and objects in ``body`` if it is over ``limit``, else None."""
    if len(body) <= SCAN_ABOVE:
        return None
    bare = _JSON_STRING.sub(b'""', body)
    count = bare.count(b"[") + bare.count(b"{")
    return count if count > limit else None


def parse_report(raw: bytes):
    """The cell's own report: untrusted bytes, validated field by field.

    Returns None when there is no report, CORRUPTED when the bytes are not exactly one valid
    frame (the program wrote into the channel), else the cleaned report.
    """
    if not raw:
        return None
    try:
        length = proto.parse_header(raw[: proto.HEADER.size], proto.MAX_REPORT)
        if len(raw) != proto.HEADER.size + length:
            return CORRUPTED
        if too_many_containers(raw[proto.HEADER.size :], MAX_REPORT_CONTAINERS):
            return CORRUPTED
        rep = proto.decode(raw[proto.HEADER.size :])
    except (proto.ProtocolError, struct.error):
        return CORRUPTED
    out: dict[str, Any] = {}
    if isinstance(rep.get("input_error"), str):
        out["input_error"] = rep["input_error"][:2000]
    status = rep.get("status")
    out["status"] = status if status in ("ok", "error", "memory_limit", "policy_violation") else "error"
    result = rep.get("result")
    out["result"] = result if isinstance(result, str) else None
    err = rep.get("error")
    out["error"] = {k: str(err.get(k, ""))[:200_000] for k in ("type", "message", "traceback")} \
        if isinstance(err, dict) else None
    outputs = rep.get("outputs")
    out["outputs"] = [
        {"mime_type": str(o["mime_type"]), "data": str(o["data"])}
        for o in (outputs if isinstance(outputs, list) else [])
        if isinstance(o, dict) and isinstance(o.get("mime_type"), str) and isinstance(o.get("data"), str)
    ]
    files = rep.get("files")
    out["files"] = [
        {"name": f["name"][:1024], "size": f["size"]}
        for f in (files if isinstance(files, list) else [])[: proto.MAX_LISTED_FILES]
        if isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("size"), int)
        and not isinstance(f.get("size"), bool)
    ]
    return out


def outcome(seen: Observed, req: RunRequest, exit_info: dict[str, Any] | None, usage: tuple[float, int],
            output_cap: int) -> Outcome:
    """How the run ended, from what was observed (``exit_info``: wait status of a cell that died;
    ``usage``: CPU seconds and peak RSS) and the cell's report, validated."""
    exit_info = exit_info or {}
    cpu, maxrss = usage
    out = Outcome(stdout=seen.stdout.decode("utf-8", "replace"), stderr=seen.stderr.decode("utf-8", "replace"),
                  duration_s=round(seen.duration_s, 6), cpu_s=round(cpu, 6), peak_memory_bytes=maxrss)
    report = parse_report(seen.report)
    wait_status = exit_info.get("status")
    sig = None
    if isinstance(wait_status, int):
        if os.WIFSIGNALED(wait_status):
            sig = os.WTERMSIG(wait_status)
            out.signal = SIGNAMES.get(sig, str(sig))
        elif os.WIFEXITED(wait_status):
            out.exit_code = os.WEXITSTATUS(wait_status)
    cpu_limit = req.cpu_s
    fail = out.fail

    killed_for = seen.killed_for
    if not seen.started:
        return fail("killed", "JailDied", "the cell was gone before the run started")
    if killed_for == "interrupted":
        return fail("killed", "Interrupted", "the run was interrupted by the host")
    if killed_for == "timeout":
        return fail("timeout", "Timeout", f"wall-clock limit of {req.timeout:g} s reached{RAISE_WALL}")
    if killed_for == "cpu":
        return fail("timeout", "Timeout", f"CPU-time limit of {cpu_limit:g} s reached{RAISE_CPU}")
    if killed_for == "bridge":
        return fail("error", "HostFunctionMisuse", f"the program was killed: {seen.misuse}")
    if killed_for == "corrupt":
        return fail("error", "ResultChannelCorrupted",
                    "the program wrote into jailcell's result channel; it was stopped and its report discarded")
    if killed_for == "report":
        return fail("output_limit", "OutputLimit",
                    f"the program wrote over {proto.MAX_REPORT} bytes into jailcell's result channel")
    if killed_for == "disk":
        return fail("error", "WorkspaceFull", seen.misuse)
    if killed_for == "output":
        return fail("output_limit", "OutputLimit",
                    f"output exceeded {output_cap} bytes; the head is kept{RAISE_OUTPUT}")
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_limit - 0.05):
        return fail("timeout", "Timeout", f"CPU-time limit of {cpu_limit:g} s reached{RAISE_CPU}")
    if sig is not None:
        try:
            desc = signal.strsignal(sig) or ""
        except (ValueError, AttributeError):
            desc = ""
        return fail("killed", "Signal", f"killed by {SIGNAMES.get(sig, sig)} ({desc})")
    if report is CORRUPTED:
        return fail("error", "ResultChannelCorrupted",
                    "the program wrote into jailcell's result channel; its own report was discarded")
    if report is not None:
        out.input_error = report.get("input_error")
        out.status, out.result, out.error = report["status"], report["result"], report["error"]
        out.outputs, out.files = report["outputs"], report["files"]
        return out
    if out.exit_code == proto.REPORT_FAILED:
        return fail("error", "ResultChannelCorrupted",
                    "the program broke jailcell's reporting (it replaced builtins or internals)")
    if out.exit_code not in (None, 0):
        return fail("error", "SystemExit", f"the program exited with code {out.exit_code}")
    if exit_info and wait_status is None:
        # No wait status (the program stopped or killed the process that reaps it): a cell that
        # died at its time limit was killed by RLIMIT_CPU (SIGXCPU, then SIGKILL).
        if seen.duration_s >= min(req.timeout, cpu_limit) - 0.05:
            return fail("timeout", "Timeout", f"CPU-time limit of {cpu_limit:g} s reached{RAISE_CPU}")
        return fail("killed", "JailDied", "the cell ended and its exit status could not be read")
    return out
