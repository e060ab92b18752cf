"""Jailed where users are, simulated for real on this machine (no Docker engine, no AppArmor here):
a launcher installs, before exec, what a container runtime's default seccomp profile and capabilities
do (root without CAP_SYS_ADMIN, namespace flags refused) or what Ubuntu 23.10+'s AppArmor restriction
does to an unprivileged user (no usable user namespace).  Under each, jailcell's auto backend must give
the landlock jail -- the README's first command works, `jailcell check` says landlock and why, and
the hostile suite runs against it -- and never less than a policy's minimum."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .test_unprivileged import NOBODY, PYTHON, copy_root  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = str(REPO / "tests" / "simulated_env.py")
DOCKER_DEFAULT = REPO / "tests" / "data" / "docker-default-seccomp.json"  # Docker's own default profile
README_CODE = "import numpy; print(numpy.arange(6).reshape(2, 3))"


def in_container(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` as root in a container with Docker's default seccomp profile and capabilities."""
    return subprocess.run([sys.executable, LAUNCHER, f"docker={DOCKER_DEFAULT}", "--", sys.executable, *args],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_in_a_container_with_the_default_profile_the_readme_command_runs_in_the_landlock_jail(tmp_path):
    r = in_container("-m", "jailcell", "run", "-c", README_CODE)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[[0 1 2]\n [3 4 5]]\n"
    r = in_container("-m", "jailcell", "run", "--json", "--policy", "minimal", "-c",
                     "open('/etc/passwd').read()")
    result = json.loads(r.stdout)
    assert r.returncode == 1 and result["error"]["type"] == "PermissionError"
    iso = result["isolation"]
    assert iso["backend"] == "landlock" and iso["seccomp"] is True and iso["landlock_abi"] >= 1
    assert any("no pid namespace" in d for d in iso["degraded"]), iso["degraded"]
    assert "without any capability" in iso["user"] or "nobody" in iso["user"]
    # a policy that accepts nothing less than namespaces is refused here, with the reason
    strict = tmp_path / "strict.toml"
    strict.write_text('extends = "minimal"\n[isolation]\nminimum = "namespaces"\n')
    r = in_container("-m", "jailcell", "run", "--policy", str(strict), "-c", "print(1)")
    assert r.returncode == 2 and "accepts no less than 'namespaces'" in r.stderr and r.stdout == ""
    # nsjail by name fails closed there: nothing runs
    marker = tmp_path / "ran"
    r = in_container("-m", "jailcell", "run", "--backend", "nsjail", "-c", f"open({str(marker)!r}, 'w')")
    assert r.returncode == 2 and not marker.exists()


def test_check_in_a_container_says_landlock_and_why():
    r = in_container("-m", "jailcell", "check")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "backend auto                   works  landlock, because nsjail cannot jail here" in out
    assert "creating a user namespace is refused" in out and "CAP_SYS_ADMIN" in out
    assert "jailcell check --container-profile" in out
    assert "--privileged" not in out and "seccomp=unconfined" not in out and "--cap-add" not in out
    assert "landlock jail                  works" in out and "auto picks landlock" in out


def test_the_hostile_suite_runs_against_the_landlock_jail_in_a_container():
    """The project's hostile programs (the OS jail's suite, import policy off), thrown at the landlock
    jail inside the simulated container; the suite's own start-up probe proves that jail first."""
    r = in_container("-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-k", "landlock",
                     "tests/security/test_hostile.py", "tests/security/test_between_runs.py",
                     env={"JAILCELL_TEST_BACKENDS": "landlock"}, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-500:]


def test_the_hostile_suite_runs_against_the_landlock_jail_as_a_user_in_a_container(copy_root):  # noqa: F811
    """The same suite as ``USER 1000`` would run it: no cgroups, no user namespace, so the jail's process
    bound is its zygote's count of its forks -- the bombs and every other hostile case run against that.
    (Debian's Python as nobody, with a world-readable copy of pytest and of the suite.)"""
    import _pytest
    import iniconfig
    import packaging
    import pluggy
    import pygments

    site = copy_root / "site"
    for module in (pytest, _pytest, pluggy, iniconfig, packaging, pygments):
        src = Path(module.__file__).parent
        shutil.copytree(src, site / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(pytest.__file__).parent.parent / "py.py", site / "py.py")
    suite = copy_root / "tests"
    (suite / "security").mkdir(parents=True)
    for name in ("__init__.py", "conftest.py", "security/__init__.py", "security/test_hostile.py",
                 "security/test_between_runs.py"):
        shutil.copy(REPO / "tests" / name, suite / name)
    shutil.copy(LAUNCHER, copy_root / "simulated_env.py")
    shutil.copy(DOCKER_DEFAULT, copy_root / "default.json")
    for top in (site, suite):  # world-readable, as the fixture's copy of jailcell (its nsjail stays executable)
        for dirpath, _dirnames, filenames in os.walk(top):
            os.chmod(dirpath, 0o755)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o644)
    for path in (copy_root / "simulated_env.py", copy_root / "default.json"):
        path.chmod(0o644)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": f"{copy_root}:{site}",
           "JAILCELL_TEST_BACKENDS": "landlock", "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PYTHON,
                        str(copy_root / "simulated_env.py"), f"docker={copy_root / 'default.json'}", "--", PYTHON,
                        "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-x", "--rootdir", str(copy_root),
                        "-k", "landlock and not born_in_its_cgroups",  # (there are none to be born in)
                        "tests/security/test_hostile.py", "tests/security/test_between_runs.py"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=copy_root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-500:]


UBUNTU_SCRIPT = r"""
import json
from jailcell import Sandbox
with Sandbox("minimal", memory=64) as sb:
    r = sb.run("print(6 * 7)")
    secret = sb.run("print(open(SECRET).read())".replace("SECRET", repr(__import__("sys").argv[1])))
    home = sb.run("open('/tmp/jailcell-ubuntu-probe', 'w').write('x')")
    print(json.dumps({"ok": [r.status, r.stdout], "backend": r.isolation["backend"],
                      "degraded": r.isolation["degraded"], "secret": secret.status, "tmp": home.status}))
"""


def test_as_a_user_on_ubuntu_with_the_userns_restriction_auto_gives_landlock(copy_root, tmp_path):  # noqa: F811
    secret = tmp_path / "nobodys-secret"
    secret.write_text("s3cret")
    os.chown(secret, NOBODY, NOBODY)  # the user's own file, outside the jail's workspace
    tmp_path.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(copy_root),
           "JAILCELL_NSJAIL": str(copy_root / "nsjail" / "bin" / "nsjail")}
    launcher = copy_root / "simulated_env.py"  # nobody may not read this checkout (a 0700 CI folder)
    shutil.copy(LAUNCHER, launcher)
    launcher.chmod(0o644)
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PYTHON, str(launcher), "ubuntu", "--",
           PYTHON, "-c", UBUNTU_SCRIPT, str(secret)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] == ["ok", "42\n"] and out["backend"] == "landlock"
    assert out["secret"] == "error" and out["tmp"] == "error"  # the user's own file and /tmp: out of reach
    # no cgroups as nobody here: the jail's processes are counted in a user namespace of its own
    assert any("RLIMIT_NPROC, counted in the jail's own user namespace" in d for d in out["degraded"]), out["degraded"]
    check = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PYTHON, str(launcher),
                            "ubuntu", "--", PYTHON, "-m", "jailcell", "check"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert "auto picks landlock" in check.stdout, check.stdout + check.stderr
    assert "creating a user namespace is refused" in check.stdout or "namespaces inside it are refused" in check.stdout


def test_check_prints_the_apparmor_profile_where_ubuntu_restricts_user_namespaces(tmp_path, monkeypatch):
    from jailcell import _check
    from jailcell.backends import _nsjail

    restrict = tmp_path / "apparmor_restrict_unprivileged_userns"
    restrict.write_text("1\n")
    monkeypatch.setattr(_nsjail, "APPARMOR_RESTRICT", restrict)
    rows, _ = _check.gather()
    detail = next(d for f, _s, d in rows if f == "unprivileged user namespaces")
    assert "profile jailcell-nsjail " + _nsjail.nsjail_path() in detail and "userns," in detail
    assert "sudo apparmor_parser -r /etc/apparmor.d/jailcell-nsjail" in detail


def test_the_launcher_really_refuses_namespaces():
    """The simulation itself: under it, namespaces fail as they would in such a container, clone3 is ENOSYS,
    and root keeps only Docker's default capabilities."""
    r = in_container("-c", "import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"
                           "print(libc.unshare(0x20000), libc.unshare(0x10000000), libc.syscall(435, 0, 0), "
                           "ctypes.get_errno(), open('/proc/self/status').read().split('CapEff:')[1].split()[0])")
    mount_ns, user_ns, clone3, errno, capeff = r.stdout.split()
    assert (mount_ns, user_ns, clone3, errno) == ("-1", "-1", "-1", "38"), r.stdout + r.stderr
    assert int(capeff, 16) == 0xA80425FB  # Docker's 14 default capabilities, CAP_SYS_ADMIN not among them


def test_the_shipped_container_profile_is_dockers_default_plus_what_nsjail_needs():
    """What users pass to `docker run --security-opt seccomp=...`: Docker's default rules unchanged, and one
    rule more that allows namespaces (for any capability set), nothing else."""
    from jailcell.backends._nsjail import CONTAINER_PROFILE

    shipped, default = json.loads(CONTAINER_PROFILE.read_text()), json.loads(DOCKER_DEFAULT.read_text())
    extra = shipped["syscalls"].pop()
    assert shipped == default
    assert set(extra["names"]) == {"clone", "clone3", "mount", "pivot_root", "setns", "sethostname", "umount2",
                                   "unshare"}
    assert extra["action"] == "SCMP_ACT_ALLOW" and not extra.get("includes") and not extra.get("args")
    r = subprocess.run([sys.executable, "-m", "jailcell", "check", "--container-profile"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == CONTAINER_PROFILE.read_text()


CONTAINED = r"""
import json, sys
from jailcell import Sandbox
with Sandbox("standard", memory=64) as sb:
    r = sb.run("import os; print(os.getuid())")
    secret = sb.run("print(open(SECRET).read())".replace("SECRET", repr(sys.argv[1])))
    fork_bomb = sb.run("import os\nwhile True: os.fork()", timeout=3)
    after = sb.run("print('still', 1)")
    print(json.dumps({"ok": [r.status, r.stdout], "iso": r.isolation, "secret": secret.status,
                      "bomb": fork_bomb.status, "after": after.stdout}))
"""


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_with_the_shipped_profile_a_container_gets_the_nsjail_backend(user, copy_root, tmp_path):  # noqa: F811
    """Loaded by the same launcher (Docker's default capabilities: root without CAP_SYS_ADMIN), the shipped
    profile gives auto the nsjail jail, namespaces and all, with the jail's user mapped to nobody (never to
    root); a file of the container's root stays out of reach and a fork bomb is contained."""
    from jailcell.backends._nsjail import CONTAINER_PROFILE

    secret = tmp_path / "roots-secret"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    tmp_path.chmod(0o755)
    (copy_root / "container-seccomp.json").write_text(CONTAINER_PROFILE.read_text())
    launcher = copy_root / "simulated_env.py"  # nobody may not read this checkout (a 0700 CI folder)
    shutil.copy(LAUNCHER, launcher)
    launcher.chmod(0o644)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(copy_root),
           "JAILCELL_NSJAIL": str(copy_root / "nsjail" / "bin" / "nsjail")}
    as_user = [] if user == "root" else ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    prefix = [*as_user, PYTHON, str(launcher), f"docker={copy_root / 'container-seccomp.json'}", "--", PYTHON]
    r = subprocess.run([*prefix, "-c", CONTAINED, str(secret)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] == ["ok", "99999\n"] and out["iso"]["backend"] == "nsjail", out
    assert out["iso"]["namespaces"][:2] == ["user", "pid"]
    assert out["iso"]["degraded"] == ([] if user == "root" else [out["iso"]["degraded"][0]])  # nobody: no cgroups
    assert "mapped to host uid 65534" in out["iso"]["user"], out["iso"]["user"]
    assert out["secret"] == "error" and out["bomb"] in ("error", "timeout") and out["after"] == "still 1\n", out
    check = subprocess.run([*prefix, "-m", "jailcell", "check"], env=env, capture_output=True, text=True, timeout=300)
    assert "backend auto                   works  nsjail" in check.stdout, check.stdout + check.stderr


OWN_UIDS = r"""
import json, threading, time
from jailcell import Sandbox
BOMB = '''
import os, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError as e:
    print('stopped after', n, 'errno', e.errno)
time.sleep(2)
'''
FORK = '''
import os
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print('forked', os.getuid())
'''
with Sandbox("standard") as a, Sandbox("standard") as b:
    uids = [a.run("import os; print(os.getuid())").stdout, b.run("import os; print(os.getuid())").stdout]
    out = {}
    t = threading.Thread(target=lambda: out.update(bomb=a.run(BOMB, timeout=15)))
    t.start()
    time.sleep(1.5)  # a's bomb is at its limit and holds it
    other = b.run(FORK)
    t.join()
    print(json.dumps({"uids": uids, "bomb": out["bomb"].stdout, "other": [other.status, other.stdout],
                      "iso": other.isolation}))
"""


def test_in_a_container_without_cgroups_each_landlock_jail_has_a_uid_and_a_process_bound_of_its_own(
        copy_root):  # noqa: F811
    """Docker mounts cgroups read-only: no cgroup pids limit.  As root, each landlock jail then runs as a uid
    no account and no other jail has, so RLIMIT_NPROC counts that jail alone: a fork bomb stops at the
    policy's limit and another jail forks meanwhile (with one shared uid the bomb took everyone's share)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(copy_root)}
    launcher = copy_root / "simulated_env.py"
    shutil.copy(LAUNCHER, launcher)
    launcher.chmod(0o644)
    r = subprocess.run([PYTHON, str(launcher), f"docker={DOCKER_DEFAULT},ro-cgroups", "--", PYTHON, "-c", OWN_UIDS],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    uids = [int(u) for u in out["uids"]]
    assert uids[0] != uids[1] and all(u >= 1 << 30 for u in uids), uids
    stopped = out["bomb"].split()
    assert stopped[:1] == ["stopped"] and int(stopped[2]) <= 64 and stopped[4] == "11", out["bomb"]  # EAGAIN
    assert out["other"] == ["ok", f"forked {uids[1]}\n"], out["other"]
    iso = out["iso"]
    assert iso["backend"] == "landlock" and iso["cgroup"] is None
    assert iso["pids_limit"] == "rlimit_nproc (the jail's own uid)" and "uid of the jail's own" in iso["user"]
    assert any("read-only" in d and "RLIMIT_NPROC of the jail's own uid" in d for d in iso["degraded"]), iso


def test_as_root_without_cgroups_a_jail_that_would_run_as_uid_0_is_refused():
    """Where only root reaches the interpreter (this one, under /root) and there are no cgroups, a landlock
    jail would run as uid 0, which RLIMIT_NPROC does not bind even without capabilities: refused, not run
    without a process bound."""
    if os.stat(Path(sys.executable).resolve()).st_uid != 0 or not str(Path(sys.executable).resolve()).startswith(
            "/root/"):
        pytest.skip("needs an interpreter only root can reach (this machine's is elsewhere)")
    r = subprocess.run([sys.executable, LAUNCHER, f"docker={DOCKER_DEFAULT},ro-cgroups", "--", sys.executable, "-m",
                        "jailcell", "run", "--backend", "landlock", "-c", "print(1)"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert "which no process limit binds" in r.stderr and "Fix: install Python where every user can reach" in r.stderr


NO_POWERS = """
import os
fd = os.open('mine.txt', os.O_CREAT | os.O_WRONLY)
held = []
for name, call in (('fchown', lambda: os.fchown(fd, 1, 1)), ('setuid', lambda: os.setuid(1)),
                   ('setgroups', lambda: os.setgroups([0]))):
    try:
        call()
        held.append(name)
    except OSError:
        pass
print(held)
"""


def test_a_landlock_jail_that_keeps_uid_0_holds_no_capability():
    """As root where only root reaches the interpreter (this machine's pyenv under /root), landlock jails
    keep uid 0 but drop every capability first thing (the zygote does, and the host checks it did
    before any program runs): root's powers over files and ids are gone."""
    if not str(Path(sys.executable).resolve()).startswith("/root/") or os.geteuid() != 0:
        pytest.skip("needs root and an interpreter only root can reach")
    r = subprocess.run([sys.executable, "-m", "jailcell", "run", "--backend", "landlock", "--json", "-c", NO_POWERS],
                       capture_output=True, text=True, timeout=120)
    result = json.loads(r.stdout)
    assert result["status"] == "ok" and result["stdout"] == "[]\n", result
    assert "without any capability" in result["isolation"]["user"]


def test_with_the_profile_but_a_masked_proc_auto_falls_back_to_landlock_and_says_why(copy_root, tmp_path):  # noqa: F811
    """Docker and Podman hide parts of /proc by default; the kernel then refuses nsjail a /proc of its
    own even where the seccomp profile lets it make namespaces (found in a real podman container). auto
    must see that before it picks nsjail: it gives landlock, and names the cause and the fix."""
    from jailcell.backends._nsjail import CONTAINER_PROFILE

    (copy_root / "container-seccomp.json").write_text(CONTAINER_PROFILE.read_text())
    launcher = copy_root / "simulated_env.py"
    shutil.copy(LAUNCHER, launcher)
    launcher.chmod(0o644)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(copy_root),
           "JAILCELL_NSJAIL": str(copy_root / "nsjail" / "bin" / "nsjail")}
    launch = [PYTHON, str(launcher), f"docker={copy_root / 'container-seccomp.json'},masked-proc", "--", PYTHON]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*launch, *args], capture_output=True, text=True, timeout=300, env=env)

    r = run("-m", "jailcell", "run", "--json", "-c", "print(1)")
    assert r.returncode == 0 and json.loads(r.stdout)["isolation"]["backend"] == "landlock", r.stdout + r.stderr
    auto = next(line for line in run("-m", "jailcell", "check").stdout.splitlines() if line.startswith("backend auto"))
    assert "landlock" in auto and "a /proc cannot be mounted" in auto and "systempaths=unconfined" in auto, auto
    marker = tmp_path / "ran"
    tmp_path.chmod(0o777)
    named = run("-m", "jailcell", "run", "--backend", "nsjail", "-c", f"open({str(marker)!r}, 'w')")
    assert named.returncode == 2 and "could not mount a /proc" in named.stderr and not marker.exists(), named.stderr


BOMB_BESIDE = r"""
import json, threading, time
from jailcell import Sandbox
BOMB = "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30)\n" \
       "            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('stopped after', n, 'errno', e.errno)\n" \
       "time.sleep(2)\n"
FORK = "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)\nprint('forked')\n"
with Sandbox("standard") as a, Sandbox("standard") as b:
    b.run("1")
    out = {}
    t = threading.Thread(target=lambda: out.update(bomb=a.run(BOMB, timeout=15)))
    t.start()
    time.sleep(1.5)
    other = b.run(FORK)
    t.join()
    print(json.dumps({"bomb": out["bomb"].stdout, "other": [other.status, other.stdout],
                      "pids": other.isolation["pids_limit"]}))
"""


def test_on_ubuntu_each_landlock_jail_counts_its_processes_in_a_user_namespace_of_its_own(copy_root):  # noqa: F811
    """As a user without cgroups, RLIMIT_NPROC would count all of the user's processes: a fork bomb in one
    jail would take every other jail's share. Ubuntu's restriction still lets a user namespace be made
    (only not used for anything), and the kernel counts RLIMIT_NPROC per user namespace: each jail makes
    one, and its bomb stops at its own limit while the next jail forks."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(copy_root)}
    launcher = copy_root / "simulated_env.py"
    shutil.copy(LAUNCHER, launcher)
    launcher.chmod(0o644)
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PYTHON, str(launcher), "ubuntu", "--",
           PYTHON, "-c", BOMB_BESIDE]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    stopped = out["bomb"].split()
    assert stopped[:1] == ["stopped"] and int(stopped[2]) <= 64 and stopped[4] == "11", out["bomb"]
    assert out["other"] == ["ok", "forked\n"], out
    assert out["pids"] == "rlimit_nproc (the jail's own user namespace)"


THREADS_TOO = r"""
import json, subprocess, threading, time
from jailcell import Policy, Sandbox
THREADS = "import threading, time\nthreading.stack_size(1 << 16)\nn = 0\ntry:\n    while True:\n" \
          "        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n        n += 1\n" \
          "except RuntimeError as e:\n    print('stopped after', n)\n"
with Sandbox("standard") as a:
    out = {}
    t = threading.Thread(target=lambda: out.update(bomb=a.run(THREADS, timeout=15)))
    t.start()
    time.sleep(1.5)
    host = subprocess.run(["true"]).returncode  # the app itself still forks (same uid)
    t.join()
    out.update(threads=out.pop("bomb").stdout, host=host, next=a.run("print(1)").stdout)
# No cell holds the zygote's listener of another nursery or session (it could answer their forks):
# ioctl(SECCOMP_IOCTL_NOTIF_ID_VALID) says ENOENT on a listener only.
LISTENERS = "import errno, fcntl, os, struct\nn = 0\nfor fd in range(3, 1024):\n    try:\n" \
            "        fcntl.ioctl(fd, 0x40082102, struct.pack('Q', 12345))\n    except OSError as e:\n" \
            "        n += e.errno == errno.ENOENT\nprint(n)"
with Sandbox(Policy(name="open")) as sb:
    first, second = sb.session(), sb.session()
    out["listeners"] = [first.run(LISTENERS).stdout, second.run(LISTENERS).stdout, sb.run(LISTENERS).stdout]
    # memory is RLIMIT_AS here, which a memfd's written pages escape: no memfd_create
    out["memfd"] = sb.run("import os\ntry:\n    os.memfd_create('x')\nexcept OSError as e:\n    print(e.errno)").stdout
print(json.dumps(out))
"""


def test_as_a_user_in_a_container_each_landlock_jail_counts_its_own_forks(copy_root):  # noqa: F811
    """USER 1000 in a container with the default profile: no cgroups, no user namespace, and RLIMIT_NPROC
    would count the app's processes with every jail's.  The zygote counts its jail's tasks instead,
    answering each clone (seccomp user notification): a fork bomb and a thread bomb stop at the jail's own
    limit, while another jail and the app itself still fork."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(copy_root)}
    launcher = copy_root / "simulated_env.py"
    shutil.copy(LAUNCHER, launcher)
    shutil.copy(DOCKER_DEFAULT, copy_root / "default.json")
    for path in (launcher, copy_root / "default.json"):
        path.chmod(0o644)
    prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PYTHON, str(launcher),
              f"docker={copy_root / 'default.json'}", "--", PYTHON, "-c"]
    r = subprocess.run([*prefix, BOMB_BESIDE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    stopped = out["bomb"].split()
    assert stopped[:1] == ["stopped"] and 40 <= int(stopped[2]) <= 64 and stopped[4] == "11", out["bomb"]
    assert out["other"] == ["ok", "forked\n"], out
    assert out["pids"] == "seccomp (forks counted by the jail's zygote)"
    r = subprocess.run([*prefix, THREADS_TOO], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    stopped = out["threads"].split()
    assert stopped[:1] == ["stopped"] and 20 <= int(stopped[2]) <= 64, out
    assert out["host"] == 0 and out["next"] == "1\n", out
    assert out["listeners"] == ["0\n"] * 3, out
    assert out["memfd"] == "1\n", out  # EPERM


@pytest.mark.parametrize("backend", ["nsjail", "landlock"])
def test_memfd_is_there_where_a_memory_cgroup_counts_it(backend):
    from jailcell import Policy, Sandbox

    with Sandbox(Policy(name="open"), backend=backend) as sb:
        if sb.run("1").isolation["memory_limit"] != "cgroup":
            pytest.skip("no memory cgroup on this machine")
        r = sb.run("import os\nfd = os.memfd_create('x')\nos.write(fd, b'x' * 100)\nprint(os.fstat(fd).st_size)")
        assert r.stdout == "100\n", r
