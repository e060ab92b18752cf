"""Fault injection: the jail's processes killed or stopped from the host in the middle of a run,
the host out of file descriptors, the host's temporary directory full.  Each run comes back as a
Result (or, for the host's own resources, a JailcellError that says what is wrong), nothing hangs
for long, and the service answers again as soon as the fault is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jailcell import Policy, Sandbox

OPEN = Policy(name="open-faults")


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _target(sb: Sandbox, which: str) -> int:
    nsjail = sb._jail.pid
    if which == "nsjail":
        return nsjail
    zygote = _children(nsjail)[0]
    if which == "zygote":
        return zygote
    nursery = next(k for k in _children(zygote) if _children(k))
    if which == "nursery":
        return nursery
    spares = _children(nursery)
    return spares[-1] if spares else nursery


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "stop"])
@pytest.mark.parametrize("which", ["nsjail", "zygote", "nursery", "spare"])
def test_a_jail_process_hit_mid_run(which, sig):
    with Sandbox(OPEN, timeout=3) as sb:
        assert sb.run("print(0)").ok
        hit: list[int] = []

        def strike():
            time.sleep(0.4)
            pid = _target(sb, which)
            try:
                os.kill(pid, sig)
                hit.append(pid)
            except ProcessLookupError:
                pass

        thread = threading.Thread(target=strike)
        thread.start()
        t0 = time.monotonic()
        r = sb.run("import time\ntime.sleep(1)\nprint('done')")
        thread.join()
        assert time.monotonic() - t0 < 3 + 5, r
        assert r.status in ("ok", "killed", "timeout"), r  # a Result, whatever happened
        try:
            for _ in range(3):
                t0 = time.monotonic()
                r = sb.run("print(42)")
                assert r.ok and r.stdout == "42\n", r
                assert time.monotonic() - t0 < 5
        finally:
            for pid in hit:  # a stopped process that is still there: let it go
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass


FD_SCRIPT = r"""
import glob, os, resource
from jailcell import JailcellError, Sandbox
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
out = []
for keep in (0, 2, 4, 6, 8, 12, 20, 32):
    held = []
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    for fd in held[:keep]:
        os.close(fd)
    try:
        with Sandbox("minimal", timeout=5) as sb:
            out.append(sb.run("print(1)").stdout.strip())
    except JailcellError as exc:
        out.append(type(exc).__name__)
    for fd in held[keep:]:
        os.close(fd)
with Sandbox("minimal") as sb:
    out.append(sb.run("print('after')").stdout.strip())
from jailcell._host._jail import close_all
close_all()
import json
print(json.dumps([out, glob.glob(f"/sys/fs/cgroup/*/jailcell/{os.getpid()}-*")]))
"""


def test_out_of_file_descriptors_is_a_jailcell_error_and_passes():
    r = subprocess.run([sys.executable, "-c", FD_SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]  # only JailcellErrors: a raw OSError would end the script
    out, cgroups = json.loads(r.stdout.strip().splitlines()[-1])
    assert out[-1] == "after" and "1" in out, out  # works with enough fds, and again once they are back
    assert "BackendUnavailable" not in out, out  # out of descriptors is the host's shortage, not "cannot jail here"
    assert cgroups == []  # a failed start leaves nothing behind


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_temporary_directory_does_not_stop_runs(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    try:
        try:
            with open(full / "fill", "wb") as f:
                f.write(b"\0" * (1 << 20))
        except OSError:
            pass
        code = ("from jailcell import Sandbox\nwith Sandbox('minimal') as sb:\n"
                "    print(sb.run('print(1)').stdout.strip(), sb.run('1/0').status)\n"
                "    with sb.session() as s:\n        s.run('x = 2')\n        print(s.run('x').result)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "TMPDIR": str(full)})
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split() == ["1", "error", "2"], r.stdout
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)


def test_a_jail_that_does_not_answer_is_ended_with_every_process_below_it():
    """A jail whose zygote does not exit in time is killed: its process group, and first everything below
    it -- without a pid namespace (landlock), a program's grandchild that left the group (setsid) would
    otherwise live on as init's orphan.  (nsjail's pid namespace ends with its first process.)"""
    from jailcell._host._teardown import killpg

    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        open('orphan.pid', 'w').write(str(os.getpid()))\n        while True:\n            time.sleep(0.01)\n"
            "    os._exit(0)\ntime.sleep(30)")

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
        except OSError:
            return False

    with Sandbox(OPEN, backend="landlock", timeout=60) as sb:
        sb.run("print(1)")
        jail = sb._jail
        workspace = Path(jail._spawned.config["workspace"])
        runner = threading.Thread(target=lambda: sb.run(code), daemon=True)
        runner.start()
        deadline = time.monotonic() + 20
        while not (workspace / "orphan.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        orphan = int((workspace / "orphan.pid").read_text())
        assert alive(orphan)
        os.kill(jail.pid, signal.SIGSTOP)  # the jail's first process answers nothing now
        killpg(jail.pid)
        deadline = time.monotonic() + 5
        while alive(orphan) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(orphan), f"the program's grandchild {orphan} outlived its jail"
        runner.join(20)
