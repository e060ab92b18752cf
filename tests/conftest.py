"""Shared fixtures.  Every test session ends by asserting that nothing was left on the host."""

from __future__ import annotations

import ctypes
import gc
import glob
import os
import signal
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from jailcell import Policy, Sandbox
from jailcell._host._jail import close_all

REPO = Path(__file__).resolve().parent.parent


# A daemon of this user (`jailcell daemon`) must not serve the tests' `jailcell run` calls: the tests
# that want one start their own and name its socket.
os.environ["JAILCELL_DAEMON_SOCKET"] = ""

# Other jailcell processes may run on this machine: the tests judge only what this process created.
# As a child subreaper, this process inherits its descendants' orphans (a CLI run under test that
# left its jail behind), so "descendant of this process" covers everything the session started.
PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _parents() -> dict[int, int]:
    out = {}
    for d in glob.glob("/proc/[0-9]*"):
        try:
            stat = Path(d, "stat").read_text()
        except OSError:
            continue
        out[int(d[6:])] = int(stat.rpartition(")")[2].split()[1])
    return out


def _descends_from_us(pid: int, parents: dict[int, int]) -> bool:
    me, seen = os.getpid(), set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        pid = parents.get(pid, 0)
        if pid == me:
            return True
    return False


def jail_processes() -> list[int]:
    """Processes of jailcell jails (nsjail or zygotes) that this test process started."""
    out = []
    parents = _parents()
    for d in glob.glob("/proc/[0-9]*"):
        try:
            cmd = Path(d, "cmdline").read_bytes()
        except OSError:
            continue
        if b"jailcell/_injail/zygote.py" in cmd or (b"nsjail" in cmd and b"jailcell" in cmd):
            if _descends_from_us(int(d[6:]), parents):
                out.append(int(d[6:]))
    return out


def reap_orphans() -> None:
    """Collect the exit status of orphans this subreaper inherited (they would stay zombies)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def jail_cgroups(owner: int | None = None) -> list[str]:
    """The jail cgroups of jailcell process ``owner`` (default: this one)."""
    owner = os.getpid() if owner is None else owner
    dirs = []
    for root in ("/sys/fs/cgroup/memory/jailcell", "/sys/fs/cgroup/pids/jailcell", "/sys/fs/cgroup/jailcell"):
        dirs += [p for p in glob.glob(f"{root}/*") if os.path.isdir(p) and os.path.basename(p).split("-")[0] == str(owner)]
    return dirs


def jail_tmpdirs() -> list[str]:
    """The process backend's temp dirs of this process (named ``jailcell-<pid>-...``)."""
    return glob.glob(os.path.join(tempfile.gettempdir(), f"jailcell-{os.getpid()}-*"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def busiest_cpu_s(jail_pid: int, seconds: float = 0.5) -> float:
    """The most CPU time any process of the jail used over ``seconds`` (a spinning cell: ~seconds).
    Processes that end meanwhile (a killed cell still exiting) count for what they used until then."""
    import psutil

    def used(proc) -> float | None:
        try:
            return sum(proc.cpu_times()[:2])
        except psutil.Error:
            return None

    procs = psutil.Process(jail_pid).children(recursive=True)
    before = {p.pid: used(p) for p in procs}
    time.sleep(seconds)
    spent = [(used(p) or before[p.pid]) - before[p.pid] for p in procs if before[p.pid] is not None]
    return max(spent, default=0.0)


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class _Skip(Exception):
    pass


JAILED_PROBE = r"""
import json, os
print(json.dumps({"pid": os.getpid(), "pid_ns": os.readlink("/proc/self/ns/pid"),
                  "mnt_ns": os.readlink("/proc/self/ns/mnt"), "root": sorted(os.listdir("/")),
                  "seen": [p for p in PATHS if os.path.exists(p)]}))
"""


def pytest_sessionstart(session):
    """Before any test (the hostile ones included) runs a program: prove that the engine jails it --
    its own pid and mount namespaces, and no view of the host's files -- or stop the whole run."""
    import json

    marker = tempfile.NamedTemporaryFile(prefix="jailcell-guard-", dir="/tmp")
    paths = [marker.name, str(REPO / "pyproject.toml"), "/etc/passwd", "/etc/hostname"]
    problem = ""
    try:
        if "nsjail" not in BACKENDS:  # where only landlock can jail (a simulated container): proven below
            raise _Skip
        with Sandbox(OPEN_POLICY, timeout=30) as sb:
            res = sb.run(JAILED_PROBE.replace("PATHS", repr(paths)))
        seen = json.loads(res.stdout) if res.status == "ok" else None
        if seen is None:
            problem = f"the probe program failed: {res.status} {res.error}"
        elif res.isolation.get("backend") != "nsjail":
            problem = f"programs ran with the {res.isolation.get('backend')!r} backend, not nsjail"
        elif seen["pid_ns"] == os.readlink("/proc/self/ns/pid") or seen["pid"] > 50:
            problem = f"the program shares the host's pid namespace (it is pid {seen['pid']})"
        elif seen["mnt_ns"] == os.readlink("/proc/self/ns/mnt"):
            problem = "the program shares the host's mount namespace"
        elif seen["seen"] or {"etc", "home"} & set(seen["root"]):
            problem = f"the program sees host files: {seen['seen'] or seen['root']}"
    except _Skip:
        pass
    except Exception as exc:  # noqa: BLE001 - any failure to jail stops the run
        problem = f"{type(exc).__name__}: {exc}"
    finally:
        marker.close()
        close_all()
    if not problem:
        problem = _landlock_problem(paths)
    if problem:
        pytest.exit("jailcell cannot prove that programs run jailed here, so no test runs (the hostile ones "
                    f"would run on this machine itself): {problem}\nRun `jailcell check`.", returncode=3)


LANDLOCK_PROBE = r"""
import json, os
seen = []
for p in PATHS + ["/proc/1/cmdline", "/proc/%d/environ" % HOST, "/tmp", os.path.expanduser("~root")]:
    try:
        os.listdir(p) if os.path.isdir(p) else open(p, "rb").close()
        seen.append(p)
    except OSError:
        pass
try:
    os.kill(HOST, 0)
    seen.append("signal to the host")
except OSError:
    pass
try:
    __import__("socket").socket()
    seen.append("a socket")
except OSError:
    pass
print(json.dumps({"seen": seen}))
"""


def _landlock_problem(paths: list[str]) -> str:
    """The same proof for the landlock jail: none of the host's files, /proc, signals or sockets."""
    import json

    marker = tempfile.NamedTemporaryFile(prefix="jailcell-guard-", dir="/tmp")
    try:
        with Sandbox(OPEN_POLICY, backend="landlock", timeout=30) as sb:
            res = sb.run(LANDLOCK_PROBE.replace("PATHS", repr([marker.name, *paths])).replace("HOST", str(os.getpid())))
        if res.status != "ok":
            return f"the landlock probe program failed: {res.status} {res.error}"
        if res.isolation.get("backend") != "landlock":
            return f"the landlock probe ran with the {res.isolation.get('backend')!r} backend"
        seen = json.loads(res.stdout)["seen"]
        return f"the landlock jail reaches {seen}" if seen else ""
    except Exception as exc:  # noqa: BLE001 - any failure to jail stops the run
        return f"landlock: {type(exc).__name__}: {exc}"
    finally:
        marker.close()
        close_all()


_SIGINT_CHANGED: list[str] = []


@pytest.fixture(autouse=True)
def sigint_left_alone(request):
    """Name the first test after which SIGINT is no longer Python's own handler (a library that left
    it ignored once made the KeyboardInterrupt test fail far from the cause)."""
    yield
    if not _SIGINT_CHANGED and signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        _SIGINT_CHANGED.append(request.node.nodeid)
        warnings.warn(f"SIGINT's handler is {signal.getsignal(signal.SIGINT)!r} after {request.node.nodeid}",
                      stacklevel=1)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    before_tmp = set(jail_tmpdirs())
    yield
    close_all()
    gc.collect()
    reap_orphans()
    assert wait_for(lambda: not jail_processes()), f"jail processes left: {jail_processes()}"
    assert wait_for(lambda: not jail_cgroups()), f"cgroups left: {jail_cgroups()}"
    assert set(jail_tmpdirs()) <= before_tmp, f"temp dirs left: {set(jail_tmpdirs()) - before_tmp}"


@pytest.fixture(scope="session")
def standard():
    with Sandbox("standard", warm=True) as sb:
        yield sb


@pytest.fixture(scope="session")
def minimal():
    with Sandbox("minimal", warm=True) as sb:
        yield sb


OPEN_POLICY = Policy(name="open")  # no import rules: tests of the OS jail, not of the hook


# The OS jails the hostile tests are thrown at: nsjail (namespaces) and landlock (Landlock + seccomp,
# for unprivileged containers and Ubuntu's userns restriction), each proven at the session's start.
# JAILCELL_TEST_BACKENDS=landlock runs the hostile suite where only landlock can jail (a simulated container).
BACKENDS = os.environ.get("JAILCELL_TEST_BACKENDS", "nsjail,landlock").split(",")


@pytest.fixture(scope="session", params=BACKENDS)
def open_sandbox(request):
    """A sandbox whose import policy allows everything: what the OS jail alone contains."""
    with Sandbox(OPEN_POLICY, backend=request.param, warm=True, timeout=10, memory=256) as sb:
        yield sb
