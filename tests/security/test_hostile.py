"""Hostile programs against the OS jail.  The import hook is *not* what contains these: they run
under a policy with no import rules (``open_sandbox``) unless a test says otherwise."""

import os
import socket
import struct
import time
import uuid
from pathlib import Path

import pytest

from jailcell import JailError, Sandbox


@pytest.fixture
def host_secrets(tmp_path_factory):
    token = uuid.uuid4().hex
    tmp_secret = Path("/tmp") / f"jailcell-test-secret-{token}"
    home_secret = Path.home() / f".jailcell-test-secret-{token}"
    for p in (tmp_secret, home_secret):
        p.write_text(token)
    yield token, [tmp_secret, home_secret]
    for p in (tmp_secret, home_secret):
        p.unlink(missing_ok=True)


def test_host_files_unreadable(open_sandbox, host_secrets):
    token, paths = host_secrets
    code = (
        "import os\nfound = []\n"
        f"for p in {[str(p) for p in paths]!r} + ['/etc/passwd', '/etc/shadow', '/root', '/home']:\n"
        "    try:\n"
        "        found.append(open(p).read() if os.path.isfile(p) else str(os.listdir(p)))\n"
        "    except OSError as e:\n"
        "        found.append(type(e).__name__)\n"
        "for root, dirs, files in os.walk('/'):\n"
        "    if root.startswith(('/proc', '/usr', '/sys')):\n"
        "        dirs[:] = []\n"
        "        continue\n"
        "    for f in files:\n"
        "        if 'secret' in f: found.append(os.path.join(root, f))\n"
        "print(found)"
    )
    r = open_sandbox.run(code)
    assert r.status == "ok", r
    assert token not in r.stdout and "jailcell-test-secret" not in r.stdout
    found = eval(r.stdout)
    gone = "FileNotFoundError" if open_sandbox.isolation["backend"] == "nsjail" else "PermissionError"
    assert found[:4] == [gone] * 4  # both secrets, /etc/passwd, /etc/shadow (landlock: there, unreadable)
    assert found[5] in (gone, "FileNotFoundError")  # /home
    assert found[4] in (gone, "['.pyenv']")  # /root holds at most the bound interpreter


def test_host_environment_invisible(host_secrets):
    os.environ["JAILCELL_TEST_SECRET"] = "env-s3cret"
    try:
        with Sandbox("standard") as sb:
            r = sb.run("import os\nprint(dict(os.environ))\n"
                       "for p in ('/proc/self/environ', '/proc/1/environ'):\n"
                       "    try:\n        print(open(p, 'rb').read())\n    except OSError as e:\n        print(e)")
    finally:
        del os.environ["JAILCELL_TEST_SECRET"]
    assert r.status == "ok" and "env-s3cret" not in r.stdout and "JAILCELL_TEST_SECRET" not in r.stdout


def test_network_unreachable_tcp_udp_unix(open_sandbox, tmp_path):
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(5)
    tcp.settimeout(0.2)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.2)
    upath = tmp_path / "host.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(upath))
    unix.listen(5)
    unix.settimeout(0.2)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(b"\0jailcell-test-" + uuid.uuid4().hex.encode())
    abstract.listen(5)
    abstract.settimeout(0.2)
    code = f"""
import socket
res = []
def attempt(f):
    try:
        f(); res.append('connected')
    except OSError as e:
        res.append(type(e).__name__)
def tcp():
    s = socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=1)
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'ping', ('127.0.0.1', {udp.getsockname()[1]}))
def unix():
    s = socket.socket(socket.AF_UNIX); s.settimeout(1); s.connect({str(upath)!r})
def abstract():
    s = socket.socket(socket.AF_UNIX); s.settimeout(1); s.connect({abstract.getsockname()!r})
def outside():
    socket.create_connection(('1.1.1.1', 53), timeout=1)
for f in (tcp, udp, unix, abstract, outside): attempt(f)
print(res)
"""
    r = open_sandbox.run(code)
    assert r.status == "ok", r
    got = []
    for s in (tcp, unix, abstract):
        try:
            s.accept()
            got.append(s)
        except OSError:
            pass
    try:
        udp.recvfrom(16)
        got.append(udp)
    except OSError:
        pass
    for s in (tcp, udp, unix, abstract):
        s.close()
    assert not got, f"host listeners reached from the jail: {got}"
    assert "connected" not in r.stdout.replace("'connected'", "") or r.stdout.count("connected") == 0


def test_nothing_written_outside_workspace(open_sandbox):
    import sys

    targets = [sys.prefix + "/evil.txt", "/usr/lib/evil.txt", "/jailcell/injail/evil.py", "/evil.txt",
               "/dev/evil", "/proc/sys/kernel/hostname"]
    code = (
        "res = []\n"
        f"for p in {targets!r}:\n"
        "    try:\n"
        "        open(p, 'w').write('x'); res.append('wrote ' + p)\n"
        "    except OSError as e:\n"
        "        res.append(type(e).__name__)\n"
        "print(res)"
    )
    r = open_sandbox.run(code)
    assert r.status == "ok" and "wrote" not in r.stdout, r.stdout
    assert not os.path.exists(sys.prefix + "/evil.txt") and not os.path.exists("/evil.txt")


def test_fork_bomb_contained(open_sandbox):
    t0 = time.monotonic()
    r = open_sandbox.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                         timeout=3)
    assert r.status in ("timeout", "killed")
    assert time.monotonic() - t0 < 8
    assert open_sandbox.run("print('alive')").stdout == "alive\n"


def test_thread_bomb_contained(open_sandbox):
    r = open_sandbox.run(
        "import threading, time\nn = 0\ntry:\n    while True:\n"
        "        threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); n += 1\n"
        "except RuntimeError as e:\n    print('stopped at', n)", timeout=5)
    assert r.status == "ok" and r.stdout.startswith("stopped at")
    assert int(r.stdout.split()[-1]) < 300  # the pids limit stopped it
    assert open_sandbox.run("print('alive')").stdout == "alive\n"


def _descendants(pid: int) -> set[int]:
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return set()
    return set(children).union(*(_descendants(c) for c in children))


def _outside(procs: set[int], pids: set[int]) -> set[int]:
    """The ``pids`` not in a cgroup's ``procs`` but still alive: a process leaves its cgroups as it exits,
    and the last run's cell may be exiting (the sweep kills it as the run's result comes back)."""
    def leaving(pid: int) -> bool:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return True
        return fields[0] in ("Z", "X") or bool(int(fields[6]) & 0x4)  # PF_EXITING

    return {pid for pid in pids - procs if not leaving(pid)}


def test_every_process_of_the_jail_is_born_in_its_cgroups(open_sandbox):
    """nsjail makes no cgroups: jailcell moves the zygote into the jail's before it forks anything,
    so the zygote, the nurseries, the spare cells and what a program forks are all in them."""
    r = open_sandbox.run("import os\npid = os.fork()\nif pid == 0:\n    print(open('/proc/self/cgroup').read())\n"
                         "    os._exit(0)\nos.waitpid(pid, 0)")
    jail = open_sandbox._jail
    dirs = jail._spawned.cleanup.get("cgroups")
    if dirs is None:
        pytest.skip("no cgroups on this machine (jailcell check says why)")
    inside = _descendants(jail.pid)
    if open_sandbox.isolation["backend"] == "landlock":  # no nsjail: jail.pid is the zygote itself
        inside.add(jail.pid)
    assert len(inside) >= 3, inside  # the zygote, a nursery, a spare cell
    for d in dirs.all():
        procs = {int(p) for p in (d / "cgroup.procs").read_text().split()}
        assert not _outside(procs, inside), (d, inside, procs)
        assert (jail.pid in procs) == (open_sandbox.isolation["backend"] == "landlock"), (d, jail.pid, procs)
        if open_sandbox.isolation["backend"] == "nsjail":  # (a landlock cell reads no /proc: its children are
            assert any(line.endswith("/" + d.name) for line in r.stdout.splitlines()), r.stdout  # among `inside`)


def test_a_zygote_moved_by_the_host_is_in_its_cgroups_before_it_forks(monkeypatch):
    """cgroup v2 has no move of one's own: there the host moves the zygote (its HELLO's sender) before
    its config.  That path, taken on this machine's cgroups: the jail's processes, and a fork bomb's,
    are in them, and the pids limit holds."""
    from jailcell.backends import get_backend

    from ..conftest import OPEN_POLICY

    backend = get_backend("nsjail")
    if backend.cgroups.version is None:
        pytest.skip("no cgroups on this machine (jailcell check says why)")
    monkeypatch.setattr(backend.cgroups, "entry_fds", lambda dirs: [])  # as v2: no tasks files to move by
    with Sandbox(OPEN_POLICY, timeout=5, memory=256) as sb:
        assert sb.run("print(1)").stdout == "1\n"
        jail = sb._jail
        assert not jail._spawned.config["enter_cgroups"]
        dirs = jail._spawned.cleanup["cgroups"]
        inside = _descendants(jail.pid)
        for d in dirs.all():
            procs = {int(p) for p in (d / "cgroup.procs").read_text().split()}
            assert inside and not _outside(procs, inside) and jail.pid not in procs, (d, inside, procs)
        r = sb.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                   timeout=3)
        assert r.status in ("timeout", "killed")
        assert sb.run("print('alive')").stdout == "alive\n"


def test_cgroup_v2_moves_a_process_into_a_leaf(tmp_path):
    """The v2 host move (Cgroups.enter, cgroup.procs) on this machine's cgroup2 hierarchy, which has no
    controllers here (hybrid): the move itself, and holds(), on a real cgroup2 file system."""
    import subprocess

    from jailcell.backends._cgroups import CgroupDirs, Cgroups

    unified = Path("/sys/fs/cgroup/unified")
    if not (unified / "cgroup.procs").exists() or os.geteuid() != 0:
        pytest.skip("no separate cgroup2 hierarchy to try it on (on a v2 machine, every jail takes this path)")
    leaf = unified / f"jailcell-test-{os.getpid()}"
    leaf.mkdir()
    proc = subprocess.Popen(["sleep", "30"])
    try:
        cgroups = Cgroups("v2", unified, unified, unified, "test")
        dirs = CgroupDirs(leaf, leaf)
        assert not cgroups.holds(dirs, proc.pid)
        cgroups.enter(dirs, proc.pid)
        assert cgroups.holds(dirs, proc.pid)
        assert (leaf / "cgroup.procs").read_text().split() == [str(proc.pid)]
    finally:
        proc.kill()
        proc.wait()
        cgroups.remove(dirs)
    assert not leaf.exists()


def test_fd_exhaustion_contained(open_sandbox):
    r = open_sandbox.run("fs = []\nwhile True:\n    fs.append(open('/dev/null'))")
    assert r.status == "error" and r.error["type"] == "OSError" and "Too many open files" in r.error["message"]
    assert open_sandbox.run("print('alive')").stdout == "alive\n"


def test_disk_fill_contained(open_sandbox):
    before = os.statvfs("/tmp").f_bfree
    r = open_sandbox.run("with open('fill', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))")
    assert r.status in ("error", "killed")  # ENOSPC on the tmpfs workspace, or SIGXFSZ at the file-size limit
    r = open_sandbox.run("with open('/tmp/fill', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))")
    assert r.status in ("error", "killed")
    assert abs(os.statvfs("/tmp").f_bfree - before) < 64 * 256  # the host's /tmp did not fill up
    r = open_sandbox.run("import os; print(os.listdir('.'), os.listdir(os.environ['TMPDIR']))")
    assert r.stdout == "[] []\n"  # wiped between runs


def test_kill_everything_and_parent_leave_engine_fine(open_sandbox):
    for code in ("import os; os.kill(-1, 9)", "import os; os.kill(os.getppid(), 9)", "import os; os.kill(1, 9)",
                 "import os, signal; [os.kill(1, s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGSTOP)]"):
        open_sandbox.run(code)
        r = open_sandbox.run("print('alive')")
        assert r.stdout == "alive\n", (code, r)


def test_stopping_or_killing_the_cells_parent_is_recovered_at_once(open_sandbox):
    # A stateless cell's parent is the nursery that forks spare cells; stopping it must not
    # starve (or time out) the next run.
    import time as _time

    for code in ("import os, signal; os.kill(os.getppid(), signal.SIGSTOP)",
                 "import os, signal; os.kill(os.getppid(), signal.SIGKILL)"):
        open_sandbox.run(code)
        t0 = _time.monotonic()
        r = open_sandbox.run("print('alive')")
        assert r.stdout == "alive\n" and _time.monotonic() - t0 < 3, (code, r)


def test_signalling_every_process_of_the_jail_never_wedges_it(open_sandbox):
    """Kill or stop everything a cell can reach -- the spares, the nursery that forks them, itself --
    again and again: the next run is served at once, by the same jail."""
    jail = open_sandbox._jail
    codes = ("import os; os.kill(-1, 9)", "import os; os.kill(os.getppid(), 9)",
             "import os, signal; os.kill(os.getppid(), signal.SIGSTOP)", "import os, signal; os.kill(-1, signal.SIGSTOP)",
             "import os, signal; os.kill(-1, signal.SIGTSTP); os.kill(os.getppid(), signal.SIGKILL)")
    worst = 0.0
    for _ in range(8):
        for code in codes:
            open_sandbox.run(code)
            t0 = time.monotonic()
            r = open_sandbox.run("print('alive')")
            worst = max(worst, time.monotonic() - t0)
            assert r.stdout == "alive\n", (code, r)
    assert worst < 2 and open_sandbox._jail is jail, worst
    r = open_sandbox.run("import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\nprint('resumed')", timeout=5)
    assert r.status == "ok" and r.stdout == "resumed\n"  # nobody else would ever continue it


def test_session_cells_that_stop_or_kill_their_holder(open_sandbox):
    with open_sandbox.session() as s:
        s.run("x = 1")
        r = s.run("import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\nx += 1")
        assert r.ok and s.run("x").result == "2"  # the finished cell holds the state now
        r = s.run("import os\nos.kill(os.getppid(), 9)\nx += 1")
        assert r.ok and s.run("x").result == "3"
        r = s.run("import os, signal\nos.kill(-1, signal.SIGSTOP)\nwhile True: pass", timeout=1)
        assert r.status == "error" and r.error["type"] == "PermissionError"  # kill(-1) is refused
        assert s.run("x").result == "3"
        r = s.run("import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\nwhile True: pass", timeout=1)
        assert r.status == "timeout" and s.run("x").result == "3"  # the holder was continued
        r = s.run("import os\nos.kill(os.getppid(), 9)\nwhile True: pass", timeout=1)
        assert r.status == "timeout"  # the state's only holder is gone: the session says so
        with pytest.raises(JailError, match="state was lost"):
            s.run("x")
    assert open_sandbox.run("print('alive')").stdout == "alive\n"


def test_ptrace_proc_mem_and_nested_userns_denied(open_sandbox):
    code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
out = {}
out['ptrace'] = libc.ptrace(16, 1, 0, 0)  # PTRACE_ATTACH to the zygote
out['unshare_user'] = libc.unshare(0x10000000)
out['unshare_net'] = libc.unshare(0x40000000)
try:
    open('/proc/1/mem', 'rb').read(1); out['mem'] = 'read'
except OSError as e:
    out['mem'] = type(e).__name__
try:
    os.listdir('/proc/1/fd'); out['fd'] = 'listed'
except OSError as e:
    out['fd'] = type(e).__name__
print(out)
"""
    r = open_sandbox.run(code)
    assert r.status == "ok", r
    out = eval(r.stdout)
    assert out["ptrace"] == -1 and out["unshare_user"] == -1 and out["unshare_net"] == -1
    assert out["mem"] != "read" and out["fd"] != "listed"


def test_forged_protocol_bytes_do_not_confuse_the_engine(open_sandbox):
    frame = b"JC\x01\x01" + struct.pack(">I", 20) + b'{"status": "ok"}    '
    r = open_sandbox.run(
        "import os, sys\n"
        f"sys.stdout.buffer.write({frame!r}); sys.stdout.flush()\n"
        "for fd in range(3, 64):\n"
        "    try: os.write(fd, b'garbage' * 1000)\n"
        "    except OSError: pass\n"
        "raise RuntimeError('still an error')"
    )
    assert r.status == "error"
    assert r.error["type"] in ("RuntimeError", "ResultChannelCorrupted")
    assert r.stdout.startswith("JC")  # the fake frame is just output, returned verbatim
    assert open_sandbox.run("print('alive')").stdout == "alive\n"
    r = open_sandbox.run("import os\nos.write(3, b'JC\\x01\\x01\\xff\\xff\\xff\\xff')\nprint('x')")
    assert r.status == "error" and r.error["type"] == "ResultChannelCorrupted"
    assert open_sandbox.run("print('alive')").stdout == "alive\n"


def test_report_nested_too_deeply_is_corrupted_not_a_host_crash(open_sandbox):
    """A well-framed report whose JSON nests past the parser's recursion limit: the host refuses it
    as a corrupted channel (it used to raise RecursionError out of Sandbox.run)."""
    from jailcell._injail import _protocol as proto

    depth = 200_000
    body = b'{"status": ' + b"[" * depth + b"]" * depth + b"}"
    header = proto.HEADER.pack(proto.MAGIC, proto.VERSION, proto.KIND_JSON, len(body))
    r = open_sandbox.run(
        "import os\n"
        f"body = b'{{\"status\": ' + b'[' * {depth} + b']' * {depth} + b'}}'\n"
        f"os.write(3, {header!r} + body)\n"
        "os._exit(0)"
    )
    assert r.status == "error" and r.error["type"] == "ResultChannelCorrupted", r
    assert open_sandbox.run("print('alive')").stdout == "alive\n"


def test_huge_result_is_bounded(open_sandbox):
    r = open_sandbox.run("'x' * (200 * 1024 * 1024)", timeout=20)
    assert r.status in ("output_limit", "memory_limit", "error")
    assert open_sandbox.run("print('alive')").stdout == "alive\n"


def test_host_killing_the_jail_is_recovered(open_sandbox):
    jail = open_sandbox._jail
    os.kill(jail.pid, 9)
    # Each run either reaches a cell that is alive (of the dying jail, or of a fresh one), or a cell
    # that was still there took it and died with its jail: then it is not run a second time (it may
    # have had effects), and says so.  The dying jail is seen dead soon, and replaced.
    for _ in range(5):
        r = open_sandbox.run("print('replaced')")
        assert r.stdout == "replaced\n" or (r.status == "killed" and "not run again" in r.error["message"]), r
        if open_sandbox._jail is not jail:
            break
    assert open_sandbox._jail is not jail and open_sandbox.run("print('replaced')").stdout == "replaced\n"


def test_closing_right_after_a_run_leaves_no_process():
    """close() just after a run races the zygote's sweep of that run; nothing may survive it.  (The
    process backend's version of this test runs as an unprivileged user: test_unprivileged.py.)"""
    from jailcell._host._teardown import teardown as _teardown

    from ..conftest import _parents, jail_processes, wait_for

    before = set(jail_processes())  # other tests' jails of this session: they live on (and fork spares)

    def ours() -> set[int]:
        parents = _parents()

        def older(pid: int) -> bool:
            while pid > 1:
                if pid in before:
                    return True
                pid = parents.get(pid, 0)
            return False

        return {pid for pid in jail_processes() if not older(pid)}

    for _ in range(15):
        with Sandbox("minimal") as sb:
            assert sb.run("1 + 1").result == "2"
    _teardown.join()
    assert wait_for(lambda: not ours(), 10), ours()
