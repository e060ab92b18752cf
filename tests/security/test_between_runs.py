"""A run cannot touch any later run, or the jail's own machinery (zygote, nursery, waiting spares,
session holders).  Each test is a hostile program followed by ordinary runs that must come out
exactly as in a fresh sandbox.  The OS jail is what is tested: the import policy is off."""

from __future__ import annotations

import pytest

from jailcell import Policy, Sandbox
from jailcell._injail import _protocol as proto
from jailcell.backends._base import JAIL_SRC

from ..conftest import BACKENDS

OPEN = Policy(name="open-between-runs")
# The same with a package preloaded: its jails have a slim nursery too (programs that do not name numpy run
# in slim cells), and both kinds of cell must come out clean after an attack from either.
OPEN_SLIM = Policy(name="open-between-runs-slim", preload=("numpy",))

# Every process of the jail but the program's own: the targets a hostile cell would pick.
OTHERS = "import os\nME = os.getpid()\nOTHERS = [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != ME]\n"

LATER = [
    ("open('f.txt', 'w').write('hello'); import os; print(os.path.getsize('f.txt'))", "5\n"),
    ("import os; print(os.nice(0), len(os.sched_getaffinity(0)) == os.cpu_count())", "0 True\n"),
    ("import resource; print(resource.getrlimit(resource.RLIMIT_FSIZE)[0] > 0, "
     "resource.getrlimit(resource.RLIMIT_CPU)[0] >= 1)", "True True\n"),
    ("x = bytearray(50 * 1024 * 1024); print(len(x) // 2**20)", "50\n"),
    ("import os, time; time.sleep(0.05); print({'survivor', 'orphan'} & set(os.listdir(os.environ['TMPDIR'])), os.listdir('.'))",
     "set() []\n"),
]


@pytest.fixture(params=[p for p in [(OPEN, "nsjail"), (OPEN_SLIM, "nsjail"), (OPEN, "landlock"), (OPEN_SLIM, "landlock")]
                        if p[1] in BACKENDS], ids=[i for i, b in [("full", "nsjail"), ("slim", "nsjail"),
                                                                 ("landlock-full", "landlock"),
                                                                 ("landlock-slim", "landlock")] if b in BACKENDS])
def sandbox(request):
    policy, backend = request.param
    with Sandbox(policy, backend=backend, timeout=10, memory=256) as sb:
        yield sb


def later_runs_are_clean(sb: Sandbox) -> None:
    slim = bool(sb.policy.preload)
    for _ in range(2):
        for code, expected in LATER:
            for program in [code, "# numpy: a full cell\n" + code] if slim else [code]:
                r = sb.run(program)
                assert r.status == "ok" and r.stdout == expected, (program, r.status, r.stdout, r.error)
    assert sb._jail is not None and sb._jail.ready["slim"] == (["numpy"] if slim else None)


SCHEDULING = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
for pid in OTHERS:
    for attempt in (lambda: os.setpriority(os.PRIO_PROCESS, pid, 19),
                    lambda: os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0)),
                    lambda: os.sched_setaffinity(pid, {0}),
                    lambda: os.setpriority(os.PRIO_PGRP, os.getpgid(pid), 19)):
        try:
            attempt()
            print("changed", pid)
        except (PermissionError, ProcessLookupError, OSError):
            pass
    if libc.syscall(251, 1, pid, (3 << 13)) == 0:  # ioprio_set(IOPRIO_WHO_PROCESS, pid, IDLE)
        print("ioprio changed", pid)
try:
    os.setpriority(os.PRIO_USER, 0, 19)
    print("changed the whole uid")
except PermissionError:
    pass
"""


GROUP_SIGNALS = OTHERS + """
import ctypes, fcntl, signal, struct
libc = ctypes.CDLL(None, use_errno=True)
groups = sorted({os.getpgid(pid) for pid in OTHERS if pid > 0} - {os.getpgid(0)})
for pgid in groups:
    r, w = os.pipe()
    try:  # SIGSTOP to a whole group when the pipe is readable
        fcntl.fcntl(r, fcntl.F_SETSIG, signal.SIGSTOP)
        fcntl.fcntl(r, fcntl.F_SETOWN, -pgid)
        fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK)
        os.write(w, b"x")
        print("signalled by F_SETOWN", pgid)
    except OSError:
        pass
    owner = struct.pack("ii", 2, pgid)  # F_OWNER_PGRP
    if libc.fcntl(r, 15, ctypes.c_char_p(owner)) == 0:  # F_SETOWN_EX
        print("signalled by F_SETOWN_EX", pgid)
    for request in (0x8901, 0x8902):  # FIOSETOWN, SIOCSPGRP
        if libc.ioctl(r, request, ctypes.byref(ctypes.c_int(-pgid))) == 0:
            print("signalled by ioctl", hex(request), pgid)
    try:  # join the group, then signal "my own group"
        os.setpgid(0, pgid)
        os.kill(0, signal.SIGSTOP)
        print("signalled by setpgid", pgid)
    except OSError:
        pass
    os.write(w, b"y")
"""

ATTACKS = {
    # signals to a process group by any route (F_SETOWN, F_SETOWN_EX, owner ioctls, joining a group)
    "group_signals": GROUP_SIGNALS,
    # resource limits of the jail's other processes: RLIMIT_CPU=1 kills the zygote, FSIZE=0 or a
    # small AS on the nursery silently poisons every later cell
    "prlimit": OTHERS + """
import resource
for pid in OTHERS:
    for res, lim in ((resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_AS, 1 << 20), (resource.RLIMIT_CPU, 1),
                     (resource.RLIMIT_NOFILE, 3), (resource.RLIMIT_NPROC, 1)):
        try:
            resource.prlimit(pid, res, (lim, lim))
            print("changed", pid, res)
        except (PermissionError, ProcessLookupError, ValueError):
            pass
""",
    # scheduling of the jail's other processes: nice 19, SCHED_IDLE, one CPU, idle I/O class
    "scheduling": OTHERS + SCHEDULING,
    # signals every process may be sent: the machinery ignores them, or recovers (SIGKILL, SIGSTOP)
    "signals": OTHERS + """
import signal
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGALRM, signal.SIGTSTP,
            signal.SIGXCPU, signal.SIGRTMIN + 3, signal.SIGSTOP, signal.SIGKILL):
    for pid in OTHERS:
        try:
            os.kill(pid, sig)
        except (PermissionError, ProcessLookupError):
            pass
for target in (-1, -os.getpgid(1)):
    try:
        os.kill(target, signal.SIGKILL)
        print("signalled", target)
    except (PermissionError, ProcessLookupError):
        pass
""",
    # a child of the nursery (clone with CLONE_PARENT) would survive the sweep
    "clone_parent": """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
pid = libc.syscall(56, 0x8000 | 17, 0, 0, 0, 0)  # clone(CLONE_PARENT | SIGCHLD)
if pid == 0:
    while True:
        open(os.environ['TMPDIR'] + '/survivor', 'a').write('x')
        time.sleep(0.01)
print("clone_parent", pid, ctypes.get_errno())
""",
    # SysV IPC and POSIX message queues would outlive the run in the jail's IPC namespace
    "sysv_ipc": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print(libc.shmget(0x1234, 400 << 20, 0o1666), libc.msgget(0x1234, 0o1666), libc.semget(0x1234, 1, 0o1666))
rt = ctypes.CDLL("librt.so.1", use_errno=True)
print(rt.mq_open(b"/jc", 0o100 | 2, 0o666, None))
""",
    # orphans: a double fork whose grandchild keeps running must not see the next run
    "orphans": """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        while True:
            open(os.environ['TMPDIR'] + '/orphan', 'a').write('x')
            time.sleep(0.01)
    os._exit(0)
time.sleep(0.05)
""",
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_run_leaves_later_runs_untouched(attack, sandbox):
    sandbox.run("print('warm')")
    r = sandbox.run(ATTACKS[attack])
    assert "changed" not in r.stdout and "signalled" not in r.stdout, r.stdout
    if attack == "sysv_ipc":
        assert r.stdout == "-1 -1 -1\n-1\n", r.stdout
    if attack == "clone_parent":
        assert r.stdout.startswith("clone_parent -1 "), r.stdout
    later_runs_are_clean(sandbox)


def test_hostile_session_run_leaves_other_sessions_and_sandbox_untouched(sandbox):
    with sandbox.session() as s:
        s.run("x = 1")
        r = s.run(ATTACKS["prlimit"] + SCHEDULING)
        assert "changed" not in r.stdout, r.stdout
        assert s.run("x + 1").result == "2"
        for code, expected in LATER[:4]:
            r = s.run(code)
            assert r.status == "ok" and r.stdout == expected, (code, r.status, r.stdout, r.error)
    later_runs_are_clean(sandbox)


def landlock(sb: Sandbox) -> bool:
    """The landlock jail: cells see no /proc at all, and cannot signal the machinery (a nursery is
    outside their Landlock domain), so attacks that need either are refused outright there."""
    return sb.isolation["backend"] == "landlock"


def scores(jail_pid: int) -> tuple[str, set[str]]:
    """From the host: the landlock jail's zygote's oom_score_adj, and those of its descendants."""
    from pathlib import Path

    def score(pid: int) -> str:
        return Path(f"/proc/{pid}/oom_score_adj").read_text().strip()

    kids = set()
    todo = [jail_pid]
    while todo:
        pid = todo.pop()
        try:
            children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            continue
        todo += children
        for c in children:
            try:
                kids.add(score(c))
            except OSError:
                pass
    return score(jail_pid), kids


def test_cells_get_oom_score_adj_1000_and_the_zygote_does_not(sandbox):
    if landlock(sandbox):  # no /proc in the cell: read from the host
        sandbox.run("print(1)")
        assert scores(sandbox._jail.pid) == ("0", {"1000"})
        return
    r = sandbox.run("import os\nprint(open('/proc/self/oom_score_adj').read().strip(), "
                    "open('/proc/1/oom_score_adj').read().strip())")
    assert r.stdout == "1000 0\n", r.stdout


def test_a_cell_leads_its_own_process_group(sandbox):
    r = sandbox.run("import os\nprint(os.getpgid(0) == os.getpid(), os.getpgid(0) != os.getpgid(1))")
    assert r.stdout == "True True\n"


# A session cell holds its holder's socket to the zygote (it becomes the holder if it finishes);
# it can write anything there.  The zygote relays holders' reports to the host.
# jailcell's own modules are not in a cell's sys.modules: the frames are made by hand.
FRAMES = f"""
import array, json, socket, struct


def send(sock, obj, fds=()):
    body = json.dumps(obj).encode()
    frame = struct.pack(">2sBBI", b"JC", {proto.VERSION}, 1, len(body)) + body
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([frame], anc)
"""

FORGE = FRAMES + """
import os, socket, stat, sys, time
socks = []
for fd in range(4, 64):
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            socks.append(fd)
    except OSError:
        pass
for fd in socks:
    s = socket.socket(fileno=os.dup(fd))
    me = os.getpid()
    for msg in ({"op": "cell_exit", "pid": me, "status": "x", "utime": "x", "stime": [], "maxrss": "big"},
                {"op": "cell_exit", "pid": me, "status": 1 << 40, "utime": 1e308, "stime": -5, "maxrss": None},
                {"op": "spare", "pid": "one", "head": 7},
                [1, 2, 3]):
        try:
            send(s, msg, FDS)
        except Exception as exc:
            print("send failed", type(exc).__name__)
print("forged", len(socks))
while True:
    pass
"""


@pytest.mark.parametrize("with_fds", [False, True])
def test_forged_reports_from_a_session_cell_are_data_not_crashes(with_fds, sandbox):
    from jailcell import JailError

    bystander = Sandbox("minimal")
    try:
        assert bystander.run("print(1)").stdout == "1\n"
        with sandbox.session() as s:
            s.run("x = 41")
            code = FORGE.replace("FDS", "(0, 1, 2, 0, 1)" if with_fds else "()")
            r = s.run(code, timeout=1)
            assert r.status in ("timeout", "killed", "error"), r  # a Result, never an exception
            assert isinstance(r.cpu_s, float) and r.cpu_s >= 0 and isinstance(r.peak_memory_bytes, int)
            try:
                after = s.run("x + 1")
                assert after.result == "42"
            except JailError:
                pass  # the jail that sent garbage was given up: a clear error, not a crash
        # the process's other sandboxes (and its control thread) carry on
        for _ in range(3):
            assert bystander.run("print(2)").stdout == "2\n"
        assert sandbox.run("print(3)").stdout == "3\n"
    finally:
        bystander.close()


def test_a_program_is_never_run_twice_when_its_jail_dies_mid_run():
    """The jail dies while the program runs (its zygote is killed from the host): the run is
    reported killed and is not repeated on a fresh jail (a host function must not run twice)."""
    import os
    import signal

    calls = []

    def side_effect(n):
        calls.append(n)
        nsjail = sb._jail.pid
        children = open(f"/proc/{nsjail}/task/{nsjail}/children").read().split()
        os.kill(int(children[0]), signal.SIGKILL)  # the zygote: pid 1 of the jail
        return n

    with Sandbox("minimal", functions={"side_effect": side_effect}, timeout=5) as sb:
        assert sb.run("print(1)").stdout == "1\n"
        r = sb.run("side_effect(1)\nwhile True:\n    pass")
        assert calls == [1], calls
        assert r.status == "killed" and "not run again" in r.error["message"], r
        assert sb.run("print(2)").stdout == "2\n"  # a fresh jail for the next run
        assert calls == [1]


FLOOD = FRAMES + r"""
import os, socket, stat, sys
sent = 0
for fd in range(4, 64):
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            continue
    except OSError:
        continue
    s = socket.socket(fileno=os.dup(fd))
    for i in range(N):
        for msg in ({"op": "cell_exit", "pid": "x" * 100, "status": [i]}, {"op": "nonsense", "pid": i},
                    {"op": "cell_exit", "pid": 5, "status": 1 << 40, "utime": "x", "maxrss": -1}):
            send(s, msg)
            sent += 1
print("sent", sent)
"""


def test_a_flood_of_forged_holder_reports_keeps_the_session_and_a_small_log(sandbox):
    import os
    import time

    with sandbox.session() as s:
        s.run("x = 1")
        t0 = time.monotonic()
        r = s.run(FLOOD.replace("N", "1000"))
        assert r.status == "ok" and r.stdout.startswith("sent "), r
        print("flood of 3000 frames took", time.monotonic() - t0)
        assert s.run("x + 1").result == "2"  # malformed reports were dropped, the state lives on
        assert s.run("while True: pass", timeout=0.5).status == "timeout"
        assert s.run("x + 2").result == "3"
        jail = s._shared.jail
        log = jail.log()
        assert log.count("dropped a malformed report") <= 20 and "further messages dropped" in log
        assert os.fstat(jail._stderr.fileno()).st_size < 64 * 1024


def test_the_jail_log_is_trimmed_to_its_tail(sandbox):
    """Whatever writes into a jail's log, the host keeps it under LOG_CAP (its newest part)."""
    from jailcell._host._jail import LOG_CAP, LOG_KEEP

    sandbox.run("1")
    jail = sandbox._jail
    fd = jail._stderr.fileno()
    os_write = __import__("os").write
    os_write(fd, b"old line\n" * (LOG_CAP // 9 + 10) + b"newest line\n")
    assert sandbox.run("print(1)").stdout == "1\n"
    size = __import__("os").fstat(fd).st_size
    assert size <= LOG_KEEP + 100 and jail.log().endswith("newest line")


def test_an_undecodable_frame_from_a_holder_loses_that_session_only(sandbox):
    from jailcell import JailError

    with sandbox.session() as s, sandbox.session() as other:
        s.run("x = 1")
        other.run("y = 2")
        r = s.run(FLOOD.replace("N", "1").replace('"status": [i]}', '"status": [i]}, [i]'), timeout=2)
        assert r.status in ("ok", "timeout", "killed"), r
        with pytest.raises(JailError, match="state was lost|session was lost"):
            for _ in range(3):
                s.run("x")
        assert other.run("y").result == "2"
    assert sandbox.run("print(3)").stdout == "3\n"


@pytest.mark.parametrize("session", [False, True])
def test_jail_modules_are_not_reachable_by_name(session, sandbox):
    # Every module of the in-jail package, as the host has it: none may be found by name in a cell.
    names = tuple(p.stem for p in JAIL_SRC.glob("*.py"))
    assert {"zygote", "_cell", "_guard", "_protocol", "_sessions"} <= set(names)
    code = ("import sys, importlib.util\n"
            f"names = {names!r}\n"
            "print([n for n in names if n in sys.modules or importlib.util.find_spec(n)], "
            "[p for p in sys.path if 'jailcell' in p])")
    if session:
        with sandbox.session() as s:
            s.run("x = 1")
            assert s.run(code).stdout == "[] []\n"
    else:
        assert sandbox.run(code).stdout == "[] []\n"


def test_nothing_of_a_run_stays_on_the_directories_the_sweep_keeps(sandbox):
    """Extended attributes and times of the workspace and /tmp (kept, not removed) would carry data
    to the next run."""
    look = ("import os\nprint([(os.listxattr(p), os.stat(p).st_mtime == 123456, oct(os.stat(p).st_mode & 0o7777))"
            " for p in ('.', os.environ['TMPDIR'])])")
    sandbox.run("pass")
    fresh = sandbox.run(look).stdout  # as the sweep leaves them after an ordinary run
    assert fresh.startswith("[([], False, '0o"), fresh
    r = sandbox.run("import os\nfor p in ('.', os.environ['TMPDIR']):\n    os.setxattr(p, 'user.leak', b'secret')\n"
                    "    os.utime(p, (123456, 123456))\n    os.chmod(p, 0o700 if p == '.' else 0o755)")
    assert r.ok, r
    for _ in range(2):
        r = sandbox.run(look)
        assert r.stdout == fresh, r.stdout


KILLED = [
    "while True:\n    pass",
    "import os\nos.kill(os.getppid(), 9)\nwhile True:\n    pass",
    "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\nwhile True:\n    pass",
    "import os\nif os.fork() == 0:\n    while True:\n        pass\nwhile True:\n    pass",
    "import threading\nfor _ in range(4):\n    threading.Thread(target=lambda: [0 for _ in iter(int, 1)]).start()\nwhile True:\n    pass",
    "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU):\n    signal.signal(s, signal.SIG_IGN)\n"
    "while True:\n    pass",
]


KILLED_IDS = ["spin", "kill-parent", "stop-parent", "forked", "threads", "ignores"]
# (in a session the parent is the holder of the state: killing it loses the state, by design --
# test_hostile.py::test_session_cells_that_stop_or_kill_their_holder)
CASES = [(code, session) for code in KILLED for session in (False, True) if not (session and "getppid(), 9" in code)]


@pytest.mark.parametrize("code, session", CASES,
                         ids=[f"{KILLED_IDS[KILLED.index(c)]}-{'session' if s else 'stateless'}" for c, s in CASES])
def test_killed_runs_return_right_after_their_limit(sandbox, code, session):
    import time

    def run(target):
        t0 = time.monotonic()
        r = target.run(code, timeout=1)
        return r, time.monotonic() - t0

    if session:
        with sandbox.session() as s:
            s.run("x = 1")
            r, took = run(s)
            assert s.run("x").result == "1"
    else:
        r, took = run(sandbox)
    if landlock(sandbox) and not session and "getppid()" in code:  # the nursery is outside the cell's domain
        assert r.status == "error" and r.error["type"] == "PermissionError", r
        return
    assert r.status in ("timeout", "memory_limit"), r
    assert took < 2.6, took  # the limit is 1 s: no second-long wait for an exit status after it

# Every other process of the jail, from a cell: its /proc/<pid>/mem must never open for writing, and
# its /proc files must never belong to the cell's uid (they do while a process is dumpable), at any
# moment -- above all while the zygote starts a replacement for the nursery this program killed.
NEVER_DUMPABLE = OTHERS + """
import signal, time
me, uid = os.getpid(), os.getuid()
parent = os.getppid()
os.kill(parent, signal.SIGKILL)
seen, hits, deadline = set(), [], time.monotonic() + float(WAIT)
while time.monotonic() < deadline:
    for name in os.listdir('/proc'):
        if not name.isdigit() or int(name) in (me, parent):
            continue
        seen.add(int(name))
        try:
            if os.stat(f'/proc/{name}/mem').st_uid == uid:
                hits.append(('dumpable', name))
            fd = os.open(f'/proc/{name}/mem', os.O_RDWR)
            hits.append(('opened', name))
            os.close(fd)
        except OSError:
            pass
print(len(seen) > len(OTHERS) - 1, sorted(set(hits)))
"""


def test_no_process_of_the_jail_is_ever_dumpable_not_even_while_a_nursery_starts(sandbox):
    """Breach: a nursery made itself dumpable for a moment to write its oom_score_adj; a cell that
    killed the nursery raced the replacement's start window and kept a handle on its memory."""
    numpy = "# numpy: a full cell\n" if sandbox.policy.preload else ""
    sandbox.run("print('warm')")
    if landlock(sandbox):  # a cell sees no /proc and cannot signal its nursery at all
        r = sandbox.run(numpy + "import os\ntry:\n    os.kill(os.getppid(), 9)\nexcept OSError as e:\n    print(e.errno)\n"
                        "try:\n    os.listdir('/proc')\nexcept OSError as e:\n    print(e.errno)")
        assert r.stdout == "1\n13\n", r
        sandbox.run("print(1)")
        assert scores(sandbox._jail.pid) == ("0", {"1000"})
        later_runs_are_clean(sandbox)
        return
    r = sandbox.run(numpy + "WAIT = 2.5\n" + NEVER_DUMPABLE, timeout=10)
    assert r.status == "ok" and r.stdout == "True []\n", (r.stdout, r.error)
    r = sandbox.run("import os\nprint(open('/proc/self/oom_score_adj').read().strip(), "
                    "open(f'/proc/{os.getppid()}/oom_score_adj').read().strip(), "
                    "open('/proc/1/oom_score_adj').read().strip())")
    assert r.stdout == "1000 1000 0\n", r.stdout  # the new nursery and its cells as before; the zygote's own
    later_runs_are_clean(sandbox)


def test_a_session_cell_cannot_make_itself_or_its_holder_dumpable(sandbox):
    with sandbox.session() as s:
        r = s.run("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                  "print(libc.prctl(4, 1, 0, 0, 0), ctypes.get_errno(), libc.prctl(3, 0, 0, 0, 0))")
        assert r.stdout == "-1 1 0\n", r.stdout  # EPERM, and still not dumpable
        s.run("x = 7")
        if landlock(sandbox):  # no /proc in a cell at all
            r = s.run("import os\nopen(f'/proc/{os.getppid()}/mem', 'rb')")
            assert r.error["type"] == "PermissionError", r
            return
        r = s.run("import os\nprint(os.stat(f'/proc/{os.getppid()}/mem').st_uid != os.getuid(), x)")
        assert r.stdout == "True 7\n", r.stdout  # the holder (the last run's cell) is not dumpable either


def test_a_jail_whose_nursery_was_killed_twice_or_whose_slim_nursery_died_is_retired(sandbox):
    sandbox.run("print('warm')")
    jail = sandbox._jail
    slim = bool(sandbox.policy.preload)
    if landlock(sandbox):  # a cell cannot signal its nursery: nothing to retire
        r = sandbox.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
        assert r.error["type"] == "PermissionError" and sandbox.run("print(2)").stdout == "2\n"
        assert sandbox._jail is jail
        return
    # one full nursery lost: replaced in the jail (slim: the slim nursery, by a cell of it: retired)
    r = sandbox.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
    assert r.status == "ok", r.error
    assert sandbox.run("print(2)").stdout == "2\n"
    assert (sandbox._jail is not jail) == slim
    if slim:  # a new jail, with a slim nursery again: a program that names no numpy runs without it
        assert sandbox.run("import sys\nprint('nu' 'mpy' in sys.modules)").stdout == "False\n"
    # the full nursery killed, and its replacement too, in one run: retired
    jail = sandbox._jail
    numpy = "# numpy: a full cell\n" if slim else ""
    r = sandbox.run(numpy + "import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\n"
                    "pids = set(os.listdir('/proc'))\ntime.sleep(1.6)\n"
                    "for p in set(os.listdir('/proc')) - pids:\n"
                    "    if p.isdigit() and int(p) != os.getpid():\n"
                    "        try:\n            os.kill(int(p), signal.SIGKILL)\n        except OSError:\n            pass\n",
                    timeout=10)
    assert r.status == "ok", r.error
    assert sandbox.run("print(3)").stdout == "3\n"
    assert sandbox._jail is not jail
    later_runs_are_clean(sandbox)
