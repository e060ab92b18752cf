"""Fail closed: when the jail cannot be built -- or is built but does not isolate -- jailcell refuses,
says why and how to fix it, and runs nothing of the program.  Each case runs in a fresh process
(the backend choice is cached per process), as root, with a program that would leave a file on
the host if it ran anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def marker(tmp_path):
    """A host path a program could only create if it ran outside a jail."""
    path = tmp_path / "ran-unjailed"
    yield path
    assert not path.exists(), "the program ran although the jail could not be built"


def _code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('x')"


def _api(env: dict, code: str) -> subprocess.CompletedProcess:
    script = f"from jailcell import Sandbox\nwith Sandbox('minimal') as sb:\n    print(sb.run({code!r}).status)"
    return subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jailcell", *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def _fake_nsjail(tmp_path: Path, body: str) -> str:
    path = tmp_path / "nsjail"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_no_nsjail_binary(marker):
    env = {"JAILCELL_NSJAIL": "/nonexistent/nsjail", "JAILCELL_BACKEND": "nsjail"}
    api = _api(env, _code(marker))
    assert api.returncode == 1 and "BackendUnavailable" in api.stderr
    assert "nsjail binary not found: JAILCELL_NSJAIL=/nonexistent/nsjail is not an executable" in api.stderr
    cli = _cli(env, "run", "--policy", "minimal", "-c", _code(marker))
    assert cli.returncode == 2 and cli.stdout == ""
    assert "Nothing was run" in cli.stderr and "JAILCELL_NSJAIL" in cli.stderr and "WARNING" not in cli.stderr
    # auto: the strongest backend that works here is landlock; the program runs in its jail, and is contained
    auto = {"JAILCELL_NSJAIL": "/nonexistent/nsjail"}
    api = _api(auto, _code(marker) + "\nimport sys; sys.exit(0)")
    assert api.returncode == 0 and api.stdout == "error\n", api.stderr  # PermissionError: the marker stays unwritten
    check = _cli(auto, "check")
    assert check.returncode == 0
    assert "nsjail binary" in check.stdout and "NO" in check.stdout
    assert "backend auto                   works  landlock, because nsjail cannot jail here" in check.stdout
    assert "auto picks landlock" in check.stdout
    # a policy that accepts nothing less than namespaces is refused there, naming the minimum
    strict = _cli(auto, "run", "--policy", str(_strict_policy(marker.parent)), "-c", _code(marker))
    assert strict.returncode == 2 and "accepts no less than 'namespaces'" in strict.stderr, strict.stderr


def _strict_policy(folder: Path) -> Path:
    path = folder / "strict.toml"
    path.write_text('extends = "minimal"\n[isolation]\nminimum = "namespaces"\n')
    return path


def test_nsjail_refused_by_the_kernel(marker, tmp_path):
    """What nsjail prints when user namespaces are not allowed (e.g. Ubuntu's AppArmor restriction)."""
    fake = _fake_nsjail(tmp_path, "echo '[E][2026-01-01T00:00:00+0000][1] initCloneNs():123 "
                                  "clone(flags=CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID) failed: Operation not permitted' >&2\n"
                                  "exit 255\n")
    cli = _cli({"JAILCELL_NSJAIL": fake}, "run", "--policy", "minimal", "-c", _code(marker))
    assert cli.returncode == 2
    assert "kernel refused to create namespaces" in cli.stderr and "Fix:" in cli.stderr
    assert "Operation not permitted" in cli.stderr  # nsjail's own words, after ours


@pytest.mark.parametrize("flaw, seen", [
    ("--disable_clone_newpid", "pid "),          # no pid namespace of its own
    ("--bindmount_ro /etc", "/etc/passwd present"),  # the host's files inside
])
def test_nsjail_that_does_not_isolate_is_refused(marker, tmp_path, flaw, seen):
    """A jail that starts but is not one (here: the real nsjail with one isolation taken away, as a
    wrapper or a changed build might) is caught by the zygote's look from inside, before any program
    is sent -- at every jail start, not only by a probe."""
    from jailcell.backends._nsjail import nsjail_path

    fake = _fake_nsjail(tmp_path, f'exec {nsjail_path()} {flaw} "$@"\n')
    api = _api({"JAILCELL_NSJAIL": fake}, _code(marker))
    assert api.returncode == 1 and "BackendUnavailable" in api.stderr and "not isolated" in api.stderr
    assert seen in api.stderr and "Nothing was run" in api.stderr
    cli = _cli({"JAILCELL_NSJAIL": fake}, "run", "-c", _code(marker))
    assert cli.returncode == 2 and "refusing to run programs in it" in cli.stderr
    check = _cli({"JAILCELL_NSJAIL": fake}, "check")
    assert check.returncode == 1 and "not isolated" in check.stdout


def test_a_hello_from_outside_the_jail_moves_nothing_and_is_refused(marker, tmp_path):
    """The zygote's first byte tells the host which process to put in the jail's cgroups.  Here
    the wrapper around nsjail -- outside the jail -- says it first: that process is not one the
    nsjail started, so nothing is moved and the jail is refused."""
    from jailcell.backends._nsjail import nsjail_path

    fake = _fake_nsjail(tmp_path, f"printf '\\006'; exec {nsjail_path()} \"$@\"\n")
    api = _api({"JAILCELL_NSJAIL": fake}, _code(marker))
    assert api.returncode == 1 and "BackendUnavailable" in api.stderr, api.stderr
    assert "could not be put in its cgroups" in api.stderr and "Nothing was run" in api.stderr


def test_nsjail_under_a_wrapper_that_does_not_exec_is_jailed_in_its_cgroups(tmp_path):
    """The zygote is then nsjail's grandchild: still one the nsjail started, so it is moved."""
    from jailcell.backends._nsjail import nsjail_path

    fake = _fake_nsjail(tmp_path, f'{nsjail_path()} "$@"\n')
    script = ("import json\nfrom jailcell import Sandbox\nwith Sandbox('minimal') as sb:\n"
              "    r = sb.run(\"print(open('/proc/self/cgroup').read())\")\n"
              "    dirs = sb._jail._spawned.cleanup['cgroups']\n"
              "    print(json.dumps([r.status, r.stdout, dirs and dirs.memory.name]))")
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, "JAILCELL_NSJAIL": fake},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    status, seen, name = json.loads(r.stdout.splitlines()[-1])
    assert status == "ok" and name, (status, seen, name)
    assert any(line.endswith("/" + name) for line in seen.splitlines()), (seen, name)


def test_interpreter_unreadable_by_the_jail_user_names_the_path(tmp_path, marker):
    """As root, jails run as nobody: a venv only root can read cannot be jailed; the error says which
    path and what to do (and runs nothing)."""
    venv = tmp_path / "private-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    venv.chmod(0o700)
    python = venv / "bin" / "python"
    cli = subprocess.run([str(python), "-m", "jailcell", "run", "--backend", "nsjail", "--policy", "minimal", "-c",
                          _code(marker)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2, cli.stderr
    assert str(venv) in cli.stderr and "chmod -R o+rX" in cli.stderr and "nobody" in cli.stderr
    # auto takes the landlock backend instead (its jail runs as this user): jailed, the marker stays unwritten
    cli = subprocess.run([str(python), "-m", "jailcell", "run", "--policy", "minimal", "-c", _code(marker)],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1 and "PermissionError" in cli.stderr, cli.stderr


@pytest.mark.parametrize("env", [{"JAILCELL_NSJAIL": "/nonexistent/nsjail"},
                                 {"JAILCELL_BACKEND": "process", "JAILCELL_UNSAFE_PROCESS_AS_ROOT": "1"}],
                         ids=["no-nsjail", "process-backend"])
def test_the_test_suite_stops_before_any_test_when_not_jailed(env, tmp_path):
    """conftest proves the jail before the first test; here a test that would leave a file on the
    host must never run."""
    hostile = REPO / "tests" / "security" / f"test_zz_guard_probe_{os.getpid()}.py"
    flag = tmp_path / "test-ran"
    hostile.write_text(f"def test_would_run():\n    open({str(flag)!r}, 'w').close()\n")
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(hostile)],
                           cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    finally:
        hostile.unlink()
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "cannot prove that programs run jailed" in r.stdout + r.stderr
    assert not flag.exists()
