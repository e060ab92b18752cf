"""`jailcell daemon` and `jailcell run` handing programs to it, as users type them (real processes,
real sockets, real jails); and `jailcell run` without one leaving nothing behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import jail_cgroups, wait_for

NOBODY = 65534


def jailcell(*args: str, sock: Path | str, input: bytes | None = None, timeout: float = 120,
             env_home: Path | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAILCELL_DAEMON_SOCKET": str(sock), **({"HOME": str(env_home)} if env_home else {})}
    return subprocess.run([sys.executable, "-m", "jailcell", *args], input=input, capture_output=True,
                          timeout=timeout, env=env, **kw)


def status(sock: Path) -> dict:
    r = jailcell("daemon", "--status", sock=sock)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


class Daemon:
    def __init__(self, sock: Path, *args: str, env: dict | None = None) -> None:
        self.sock = sock
        self.proc = subprocess.Popen([sys.executable, "-m", "jailcell", "daemon", "--socket", str(sock), *args],
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.start_line = self.proc.stderr.readline()
        assert "serving" in self.start_line, self.start_line + self.proc.stderr.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc.stderr.close()
        assert wait_for(lambda: not jail_cgroups(self.proc.pid)), jail_cgroups(self.proc.pid)


@pytest.fixture
def sock(tmp_path):
    folder = tmp_path / "jc"  # made by the daemon, mode 0700
    return folder / "daemon.sock"


@pytest.fixture
def daemon(sock):
    d = Daemon(sock, "--policy", "minimal")
    yield d
    d.stop()


def test_run_goes_through_the_daemon_and_prints_like_without(daemon, sock, tmp_path):
    assert "backend nsjail" in daemon.start_line and str(sock) in daemon.start_line
    assert oct(sock.parent.stat().st_mode & 0o777) == "0o700" and oct(sock.stat().st_mode & 0o777) == "0o600"
    r = jailcell("run", "--policy", "minimal", "-c", "import warnings; print('hi'); warnings.warn('oops')", sock=sock)
    assert r.returncode == 0 and r.stdout == b"hi\n" and b"UserWarning: oops" in r.stderr
    assert status(sock)["served"] == 1
    j = jailcell("run", "--policy", "minimal", "--json", "-c", "print('x')\n1/0", sock=sock)
    res = json.loads(j.stdout)
    assert j.returncode == 1 and res["status"] == "error" and res["error"]["type"] == "ZeroDivisionError"
    assert res["isolation"]["backend"] == "nsjail" and res["stdout"] == "x\n"
    data = tmp_path / "data.csv"
    data.write_bytes(b"a,b\n1,2\n")
    f = jailcell("run", "--policy", "minimal", "--file", f"in.csv={data}", "-c", "print(open('in.csv').read())",
                 sock=sock)
    assert f.returncode == 0 and f.stdout == b"a,b\n1,2\n\n"
    prog = tmp_path / "prog.py"
    prog.write_text("print(6 * 7)")
    assert jailcell("run", "--policy", "minimal", str(prog), sock=sock, cwd="/").stdout == b"42\n"
    assert status(sock)["served"] == 4


def test_each_run_is_fresh_and_limits_hold(daemon, sock):
    jailcell("run", "--policy", "minimal", "-c", "open('left', 'w').write('x'); import json; json.X = 1",
             sock=sock)
    r = jailcell("run", "--policy", "minimal", "-c", "open('left')", sock=sock)
    assert r.returncode == 1 and b"FileNotFoundError" in r.stderr
    r = jailcell("run", "--policy", "minimal", "-c", "import json; print(hasattr(json, 'X'))", sock=sock)
    assert r.stdout == b"False\n"
    r = jailcell("run", "--policy", "minimal", "--timeout", "1", "-c", "while True: pass", sock=sock)
    assert r.returncode == 1 and b"jailcell: timeout" in r.stderr
    r = jailcell("run", "--policy", "minimal", "--memory", "64", "--json", "-c", "x = bytearray(300 << 20)", sock=sock)
    assert json.loads(r.stdout)["status"] == "memory_limit"
    r = jailcell("run", "--policy", "minimal", "-c", "import socket", sock=sock)
    assert r.returncode == 1 and b"policy_violation" in r.stderr
    assert status(sock)["served"] == 6


def test_usage_errors_come_back_as_usage_errors(daemon, sock, tmp_path):
    r = jailcell("run", "--policy", "nope", "-c", "1", sock=sock)
    assert r.returncode == 2 and b"unknown policy 'nope'" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nwall_s = -1\n")
    r = jailcell("run", "--policy", str(bad), "-c", "1", sock=sock)
    assert r.returncode == 2 and b"wall_s" in r.stderr
    r = jailcell("run", "--policy", "minimal", "-", input=b"#" * 2_000_000, sock=sock)
    assert r.returncode == 2 and b"code_bytes" in r.stderr
    assert status(sock)["served"] == 0


def test_without_a_daemon_run_starts_its_own_jail(sock):
    r = jailcell("run", "--policy", "minimal", "-c", "print(7)", sock=sock)  # nothing at that path
    assert r.returncode == 0 and r.stdout == b"7\n" and r.stderr == b""


def test_no_daemon_flag_and_another_backend_do_not_use_it(daemon, sock):
    r = jailcell("run", "--no-daemon", "--policy", "minimal", "-c", "print(7)", sock=sock)
    assert r.returncode == 0 and r.stdout == b"7\n"
    # As root the process backend refuses without its extra opt-in: it was not handed to the nsjail daemon.
    r = jailcell("run", "--backend", "process", "--policy", "minimal", "-c", "print(7)", sock=sock)
    assert r.returncode == 2 and b"JAILCELL_UNSAFE_PROCESS_AS_ROOT" in r.stderr
    assert status(sock)["served"] == 0


def test_a_client_that_leaves_stops_its_program(daemon, sock):
    """Ctrl-C (or a killed agent) mid-run: the daemon kills the program; its jail serves the next call at once
    (the daemon has one jail per policy: a program left running would hold it for 60 s)."""
    env = {**os.environ, "JAILCELL_DAEMON_SOCKET": str(sock)}
    proc = subprocess.Popen([sys.executable, "-m", "jailcell", "run", "--policy", "minimal", "--timeout", "60", "-c",
                             "print('started', flush=True)\nwhile True: pass"], env=env, stdout=subprocess.PIPE)
    assert wait_for(lambda: status(sock)["running"] == 1, 30)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    r = jailcell("run", "--policy", "minimal", "--timeout", "60", "-c", "print('next')", sock=sock, timeout=20)
    assert r.returncode == 0 and r.stdout == b"next\n"


def test_stop_status_and_one_daemon_per_socket(sock):
    d = Daemon(sock, "--policy", "minimal")
    try:
        info = status(sock)
        assert info["pid"] == d.proc.pid and info["backend"] == "nsjail"
        second = jailcell("daemon", "--socket", str(sock), "--policy", "minimal", sock=sock, timeout=60)
        assert second.returncode == 2 and b"already serves" in second.stderr
        stop = jailcell("daemon", "--stop", sock=sock)
        assert stop.returncode == 0
        assert d.proc.wait(timeout=30) == 0
        assert not sock.exists() and not sock.parent.exists()  # it made the folder: it removes it
        gone = jailcell("daemon", "--status", sock=sock)
        assert gone.returncode == 1 and b"no daemon serves" in gone.stderr
    finally:
        d.stop()


def test_a_stale_socket_is_replaced(sock):
    sock.parent.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()  # the file stays, nobody listens: a daemon that was killed
    assert jailcell("run", "--policy", "minimal", "-c", "print(1)", sock=sock).stdout == b"1\n"
    d = Daemon(sock, "--policy", "minimal")
    try:
        assert jailcell("run", "--policy", "minimal", "-c", "print(2)", sock=sock).stdout == b"2\n"
        assert status(sock)["served"] == 1
    finally:
        d.stop()


def test_the_daemon_refuses_a_folder_others_can_enter(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    r = jailcell("daemon", "--socket", str(folder / "d.sock"), "--policy", "minimal", sock="", timeout=60)
    assert r.returncode == 2 and b"only you can enter" in r.stderr and b"chmod 700" in r.stderr
    assert not (folder / "d.sock").exists()


class FakeDaemon:
    """Someone else's listener at a socket path: it records whatever it is sent."""

    def __init__(self, path: Path) -> None:
        self.got = b""
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(5)
            self.got += conn.recv(1 << 20)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("make", ["open to others", "another owner"])
def test_run_hands_nothing_to_a_socket_another_user_could_have_put_there(tmp_path, make):
    folder = tmp_path / "planted"
    folder.mkdir(mode=0o700)
    if make == "open to others":
        folder.chmod(0o733)
    else:
        os.chown(folder, NOBODY, NOBODY)
    fake = FakeDaemon(folder / "daemon.sock")
    try:
        r = jailcell("run", "--policy", "minimal", "-c", "print('secret' * 2)", sock=folder / "daemon.sock")
        assert r.returncode == 0 and r.stdout == b"secretsecret\n"  # run in a jail of its own
        assert b"not using the daemon socket" in r.stderr
        assert fake.got == b""
    finally:
        fake.close()


@pytest.fixture
def reachable(tmp_path):
    """A folder other users can pass through (pytest's own temp folder is root's alone)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="jailcell-test-daemon-", dir="/tmp"))
    base.chmod(0o711)
    yield base
    shutil.rmtree(base)


def test_the_daemon_serves_only_its_own_user(reachable):
    """Even if its folder were opened up: another uid's connection is closed unanswered."""
    sock = reachable / "jc" / "daemon.sock"
    daemon = Daemon(sock, "--policy", "minimal")
    try:
        _another_user_is_not_served(sock)
    finally:
        daemon.stop()


def _another_user_is_not_served(sock: Path) -> None:
    sock.parent.chmod(0o711)
    sock.chmod(0o666)
    script = ("import os, socket, struct, json; os.setgid(%d); os.setuid(%d)\n"
              "s = socket.socket(socket.AF_UNIX); s.connect(%r)\n"
              "b = json.dumps({'op': 'run', 'code': 'print(1)', 'policy': 'minimal'}).encode()\n"
              "try:\n    s.sendall(struct.pack('>I', len(b)) + b); print(repr(s.recv(100)))\n"
              "except (ConnectionResetError, BrokenPipeError):\n    print(repr(b''))") % (NOBODY, NOBODY, str(sock))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "b''"
    sock.parent.chmod(0o700)
    assert status(sock)["served"] == 0


def test_run_without_a_daemon_leaves_nothing_behind(tmp_path):
    """The CLI exits once the Result is out; a detached child ends the jail and removes its cgroups."""
    mark = f"left-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-m", "jailcell", "run", "--policy", "minimal", "-c", f"print({mark!r})"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "JAILCELL_DAEMON_SOCKET": ""})
    out, err = proc.communicate(timeout=120)  # returns at the CLI's exit: the reaper holds none of its pipes
    assert proc.returncode == 0 and out.decode() == mark + "\n", err

    def ours() -> list[int]:
        found = []
        for d in Path("/proc").glob("[0-9]*"):
            try:
                if mark.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
        return found

    assert wait_for(lambda: not ours() and not jail_cgroups(proc.pid), 15), (ours(), jail_cgroups(proc.pid))


def test_malformed_requests_get_an_answer_that_says_what_is_wrong(daemon, sock):
    from jailcell import _daemon

    for req, words in [
        ({"op": "run", "code": "print(1)", "policy": "minimal", "timeout": [1]}, "timeout must be a number"),
        ({"op": "run", "code": "print(1)", "policy": "minimal", "memory": "big"}, "memory a number"),
        ({"op": "run", "code": 1, "policy": "minimal"}, "code and policy as strings"),
        ({"op": "run", "code": "1", "policy": "minimal"}, "caller's folder (cwd)"),
        ({"op": "run", "code": "1", "policy": "minimal", "cwd": "rel"}, "caller's folder (cwd)"),
        ({"op": "run", "code": "1", "policy": "minimal", "files": {"a": "%%%"}}, "not base64"),
        ({"op": "frobnicate"}, "serves run, status and stop"),
        (["not", "an", "object"], "serves run, status and stop"),
    ]:
        answer = _daemon.request(_daemon.connect(str(sock)), req)
        assert answer["ok"] is False and answer["kind"] == "usage" and words in answer["message"], (req, answer)
    assert status(sock)["served"] == 0


def test_first_calls_of_a_policy_at_once_start_one_pool(daemon, sock):
    env = {**os.environ, "JAILCELL_DAEMON_SOCKET": str(sock)}
    procs = [subprocess.Popen([sys.executable, "-m", "jailcell", "run", "--policy", "minimal", "--timeout", "7", "-c",
                               f"print({i})"], env=env, stdout=subprocess.PIPE) for i in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert outs == [f"{i}\n".encode() for i in range(4)]
    info = status(sock)
    assert info["served"] == 4 and len(info["policies"]) == 2, info  # minimal (warm), minimal with timeout 7
    assert sorted(p["timeout"] or 0 for p in info["policies"]) == [0, 7]


def test_check_says_whether_run_uses_a_daemon(sock):
    r = jailcell("check", sock=sock)
    assert r.returncode == 0 and f"none at {sock}".encode() in r.stdout
    d = Daemon(sock, "--policy", "minimal")
    try:
        r = jailcell("check", sock=sock)
        assert r.returncode == 0 and f"pid {d.proc.pid} serves {sock}".encode() in r.stdout, r.stdout
    finally:
        d.stop()


def test_a_policy_file_is_read_as_the_caller_names_it(sock, tmp_path):
    """Relative to the caller's folder, and with ~, as without a daemon (both must give the same)."""
    home = tmp_path / "home"
    (home / "pol").mkdir(parents=True)
    (home / "pol" / "tight.toml").write_text('extends = "minimal"\n[limits]\nwall_s = 1\n')
    env = {**os.environ, "HOME": str(home)}
    d = Daemon(sock, "--policy", "minimal", env=env)
    try:
        code = "import time; time.sleep(3)"  # over the file's wall_s (1), under minimal's (10)
        for spec, cwd in (("pol/tight.toml", home), ("~/pol/tight.toml", "/"), ("./tight.toml", home / "pol")):
            for how in ([], ["--no-daemon"]):
                r = jailcell("run", "--policy", spec, *how, "--json", "-c", code, sock=sock, cwd=cwd, env_home=home)
                res = json.loads(r.stdout)
                assert r.returncode == 1 and res["status"] == "timeout", (spec, how, r)
        assert status(sock)["served"] == 3
        r = jailcell("run", "--policy", "pol/nope.toml", "-c", "1", sock=sock, cwd=home, env_home=home)
        assert r.returncode == 2 and str(home / "pol" / "nope.toml").encode() in r.stderr, r.stderr
    finally:
        d.stop()


def test_a_socket_folder_made_first_by_another_user_is_named_as_such(reachable, monkeypatch):
    """Anyone can make /tmp/jailcell-UID before its user does: the daemon refuses it and says plainly
    that another user made it (no chmod advice, which cannot work), and where to go instead."""
    squat = reachable / "squatted"
    squat.mkdir(mode=0o700)
    os.chown(squat, NOBODY, NOBODY)
    r = subprocess.run([sys.executable, "-m", "jailcell", "daemon", "--socket", str(squat / "daemon.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "made by another user" in r.stderr and f"uid {NOBODY}" in r.stderr and "chmod" not in r.stderr
    assert "XDG_RUNTIME_DIR" in r.stderr and "--socket" in r.stderr
    assert not (squat / "daemon.sock").exists()
    # $XDG_RUNTIME_DIR, where there is one, is the default home of the socket (not /tmp)
    from jailcell._daemon import socket_path

    monkeypatch.delenv("JAILCELL_DAEMON_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(reachable))
    assert socket_path() == str(reachable / "jailcell" / "daemon.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert socket_path() == f"/tmp/jailcell-{os.geteuid()}/daemon.sock"


def test_the_daemon_serves_metrics_and_audits_the_runs_it_is_handed(sock, tmp_path):
    """`jailcell daemon --metrics-port --audit-log`: the runs `jailcell run` hands it are counted at
    127.0.0.1:PORT/metrics and written to the audit log, one line each."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    audit = tmp_path / "audit.jsonl"
    d = Daemon(sock, "--policy", "minimal", "--metrics-port", str(port), "--audit-log", str(audit))
    try:
        for code in ("print(1)", "1/0"):
            jailcell("run", "--policy", "minimal", "-c", code, sock=sock)
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        runs = {s.labels["status"]: s.value for f in text_string_to_metric_families(scraped) for s in f.samples
                if s.name == "jailcell_runs_total"}
        assert runs == {"ok": 1.0, "error": 1.0}, runs
    finally:
        d.stop()
    assert [json.loads(line)["status"] for line in audit.read_text().splitlines()] == ["ok", "error"]
