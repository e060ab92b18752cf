"""The pure cores, table-driven and without a jail: policy -> nsjail argv, observations -> a run's
status, the protocol's framing (truncated, oversized, forged), file names and run requests."""

from __future__ import annotations

import os
import signal
import socket
import struct

import pytest

from jailcell import InputError, Policy
from jailcell._engine import _Engine, check_file_name
from jailcell._host._run import RunRequest
from jailcell._host._supervisor import Observed, outcome
from jailcell._injail import _protocol as proto
from jailcell.backends._base import JAIL_SRC, JAIL_SRC_MOUNT
from jailcell.backends._nsjail import INSIDE_UID, JAIL_UID, SECCOMP_POLICY, NsjailCommand


def _argv(policy="minimal", *, as_root=True, cgroups=True, **overrides):
    p = Policy.load(policy).with_overrides(**overrides) if overrides else Policy.load(policy)
    return NsjailCommand("/bin/nsjail", p, as_root, cgroups, python="/py/bin/python3", workspace="/work").argv()


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


def _values(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# -- policy -> nsjail argv ---------------------------------------------------------------------

@pytest.mark.parametrize("as_root, network, present, absent", [
    # as root: no user namespace (a root-mapped one would give host-root file ownership); runs as nobody
    (True, False, ["--disable_clone_newuser"], ["--disable_clone_newnet"]),
    # unprivileged: a user namespace maps the jail's user onto the caller
    (False, False, [], ["--disable_clone_newuser", "--disable_clone_newnet"]),
    # the network namespace is left out only when the policy allows network
    (True, True, ["--disable_clone_newnet"], []),
])
def test_namespaces_follow_the_policy_and_the_caller(as_root, network, present, absent):
    argv = _argv(as_root=as_root, network=network)
    for flag in present:
        assert flag in argv
    for flag in absent:
        assert flag not in argv
    assert _value(argv, "--user") == (str(JAIL_UID) if as_root else f"{INSIDE_UID}:{os.getuid()}:1")


@pytest.mark.parametrize("overrides, flag, value", [
    ({"file_size_mib": 3}, "--rlimit_fsize", "3"),
    ({"open_files": 77}, "--rlimit_nofile", "77"),
    ({}, "--rlimit_core", "0"),
    ({}, "--time_limit", "0"),          # the host enforces time itself, per run
    ({}, "--cwd", "/work"),
    ({}, "--hostname", "jailcell"),
])
def test_limits_become_rlimits(overrides, flag, value):
    assert _value(_argv(**overrides), flag) == value


def test_nproc_is_the_pids_limit_only_without_cgroups():
    assert _value(_argv(cgroups=False), "--rlimit_nproc") == str(Policy.load("minimal").limits.pids + 4)
    assert _value(_argv(), "--rlimit_nproc") == "soft"
    # nsjail makes no cgroups of its own: jailcell puts the zygote in the jail's (Backend.admit)
    assert not [a for a in _argv() if a.startswith("--cgroup") or a == "--use_cgroupv2"]


def test_the_jail_sees_only_what_is_mounted_for_it():
    argv = _argv()
    mounts = _values(argv, "--mount")
    assert mounts[0].startswith("none:/work:tmpfs:") and mounts[1].startswith("none:/tmp:tmpfs:")
    # tmpfs mounts come before the binds: a bind below /tmp lands on the jail's own /tmp
    assert argv.index("--mount") < argv.index("--bindmount_ro")
    assert f"{JAIL_SRC}:{JAIL_SRC_MOUNT}" in _values(argv, "--bindmount_ro")
    binds = {v.split(":")[0] for v in _values(argv, "--bindmount_ro")}
    assert not binds & {"/", "/home", "/root", "/etc", "/var", "/tmp", os.path.expanduser("~")}  # never a whole one
    assert not any(b.startswith("/etc") for b in binds)
    assert _values(argv, "--bindmount") == ["/dev/null"]  # the only writable bind


def test_the_environment_is_clean_and_the_zygote_is_the_command():
    argv = _argv()
    env = dict(e.split("=", 1) for e in _values(argv, "--env"))
    assert env["HOME"] == "/work" and not {k for k in env if k.startswith(("AWS_", "OPENAI_", "JAILCELL_", "SSH_"))}
    assert env["OPENBLAS_NUM_THREADS"] == "1" and env["PYTHONHASHSEED"] == "random"
    tail = argv[argv.index("--") + 1:]
    assert tail[0] == "/py/bin/python3" and tail[-1] == f"{JAIL_SRC_MOUNT}/zygote.py"
    assert _value(argv, "--seccomp_string") == SECCOMP_POLICY


# -- observations -> status --------------------------------------------------------------------

REQ = RunRequest("print(1)", timeout=10.0, cpu_s=5.0)
REPORT = proto.encode({"status": "ok", "result": "1", "error": None, "outputs": [], "files": []})


def _seen(**kw):
    seen = Observed()
    for k, v in kw.items():
        setattr(seen, k, v)
    return seen


def _killed_by(sig):
    return {"status": sig}  # a wait status: terminated by ``sig``


def _exited(code):
    return {"status": code << 8}


@pytest.mark.parametrize("seen, exit_info, usage, status, etype", [
    (_seen(finished=True, report=REPORT), None, (0.01, 0), "ok", None),
    (_seen(started=False), None, (0, 0), "killed", "JailDied"),
    (_seen(killed_for="interrupted"), _killed_by(signal.SIGKILL), (0.1, 0), "killed", "Interrupted"),
    (_seen(killed_for="timeout"), _killed_by(signal.SIGKILL), (0.1, 0), "timeout", "Timeout"),
    (_seen(killed_for="cpu"), _killed_by(signal.SIGKILL), (5.6, 0), "timeout", "Timeout"),
    (_seen(killed_for="output"), _killed_by(signal.SIGKILL), (0.1, 0), "output_limit", "OutputLimit"),
    (_seen(killed_for="report"), _killed_by(signal.SIGKILL), (0.1, 0), "output_limit", "OutputLimit"),
    (_seen(killed_for="corrupt"), _killed_by(signal.SIGKILL), (0.1, 0), "error", "ResultChannelCorrupted"),
    (_seen(killed_for="bridge", misuse="x"), _killed_by(signal.SIGKILL), (0.1, 0), "error", "HostFunctionMisuse"),
    # the cell died on its own: the signal decides; SIGKILL at the CPU limit is the rlimit's
    (_seen(), _killed_by(signal.SIGXCPU), (5.0, 0), "timeout", "Timeout"),
    (_seen(), _killed_by(signal.SIGKILL), (4.99, 0), "timeout", "Timeout"),
    (_seen(), _killed_by(signal.SIGKILL), (0.2, 0), "killed", "Signal"),
    (_seen(), _killed_by(signal.SIGSEGV), (0.2, 0), "killed", "Signal"),
    (_seen(), _exited(proto.REPORT_FAILED), (0.2, 0), "error", "ResultChannelCorrupted"),
    (_seen(), _exited(3), (0.2, 0), "error", "SystemExit"),
    # a report the program forged with an unknown status is an error, never "ok"
    (_seen(finished=True, report=proto.encode({"status": "great", "result": None, "error": None, "outputs": [],
                                               "files": []})), None, (0, 0), "error", None),
])
def test_the_host_decides_the_status_from_what_it_saw(seen, exit_info, usage, status, etype):
    out = outcome(seen, REQ, exit_info, usage, 1000)
    assert out.status == status
    assert (out.error or {}).get("type") == etype


def test_a_killed_run_says_how_to_raise_the_limit():
    out = outcome(_seen(killed_for="timeout"), REQ, _killed_by(signal.SIGKILL), (0.1, 0), 1000)
    assert "10 s" in out.error["message"] and "--timeout" in out.error["message"]


# -- framing -----------------------------------------------------------------------------------

def _pair():
    a, b = socket.socketpair()
    a.settimeout(2)
    b.settimeout(2)
    return a, b


def test_a_frame_round_trips():
    a, b = _pair()
    with a, b:
        proto.send(a, {"op": "ping", "n": [1, 2.5, None, "é"]})
        assert proto.recv(b)[0] == {"op": "ping", "n": [1, 2.5, None, "é"]}


@pytest.mark.parametrize("header, payload, error", [
    (b"XX" + bytes([proto.VERSION, proto.KIND_JSON]) + struct.pack(">I", 2), b"{}", proto.ProtocolError),  # magic
    (proto.MAGIC + bytes([99, proto.KIND_JSON]) + struct.pack(">I", 2), b"{}", proto.ProtocolError),      # version
    (proto.MAGIC + bytes([proto.VERSION, 7]) + struct.pack(">I", 2), b"{}", proto.ProtocolError),          # kind
    (proto.MAGIC + bytes([proto.VERSION, proto.KIND_JSON]) + struct.pack(">I", 0xFFFFFFFF), b"", proto.ProtocolError),
    (proto.MAGIC + bytes([proto.VERSION, proto.KIND_JSON]) + struct.pack(">I", 5), b"{\"a\"", EOFError),  # truncated
    (proto.MAGIC + bytes([proto.VERSION, proto.KIND_JSON]) + struct.pack(">I", 4), b"nope", proto.ProtocolError),
    (proto.MAGIC[:1], b"", EOFError),  # a truncated header
])
def test_bad_frames_are_refused_before_anything_is_allocated(header, payload, error):
    a, b = _pair()
    with a, b:
        a.sendall(header + payload)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(error):
            proto.recv(b)


def test_a_frame_over_the_readers_limit_is_refused_from_its_header():
    r, w = os.pipe()
    try:
        os.write(w, proto.MAGIC + bytes([proto.VERSION, proto.KIND_JSON]) + struct.pack(">I", 1 << 30))
        with pytest.raises(proto.ProtocolError):
            proto.read_frame(r, 1024)
    finally:
        os.close(r)
        os.close(w)


# -- file names and run requests ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["a.txt", "dir/b.csv", "ünï.txt", "x" * 200])
def test_good_file_names(name):
    assert check_file_name(name) == name


@pytest.mark.parametrize("name", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b", "a\0b", ".", "..",
                                  "x" * 5000, 3, None, b"a.txt"])
def test_bad_file_names_are_input_errors(name):
    with pytest.raises(InputError):
        check_file_name(name)


@pytest.mark.parametrize("timeout, ok", [(None, True), (0.5, True), (86400, True), (0, False), (-1, False),
                                         (86401, False), ("soon", False), (float("nan"), False)])
def test_run_requests_check_the_timeout(timeout, ok):
    e = _Engine.__new__(_Engine)  # the request check needs the policy only, not a backend
    e.policy, e.functions = Policy.load("minimal"), None
    if ok:
        req = e.run_request("print(1)", timeout, None)
        assert req.timeout == (timeout or Policy.load("minimal").limits.wall_s) and req.frame()["code"] == "print(1)"
    else:
        with pytest.raises(InputError):
            e.run_request("print(1)", timeout, None)


def test_the_jails_bytecode_is_judged_as_the_interpreter_judges_it(tmp_path):
    """ensure_bytecode recompiles the in-jail modules when the interpreter would not use their .pyc:
    a source edited within the second its bytecode was written (same mtime, other size) counts as
    stale, which a check of file mtimes alone (compileall's) misses."""
    import importlib.util
    import py_compile

    from jailcell.backends._base import _bytecode_matches

    src = tmp_path / "mod.py"
    src.write_text("x = 1\n")
    pyc = importlib.util.cache_from_source(str(src))
    py_compile.compile(str(src), cfile=pyc)
    entry = next(e for e in os.scandir(tmp_path) if e.name == "mod.py")
    assert _bytecode_matches(entry, pyc)
    st = src.stat()
    src.write_text("x = 12345\n")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same second: only the size tells
    entry = next(e for e in os.scandir(tmp_path) if e.name == "mod.py")
    assert not _bytecode_matches(entry, pyc)
    py_compile.compile(str(src), cfile=pyc, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    assert _bytecode_matches(entry, pyc)  # hash-based: the interpreter checks it itself
    with open(pyc, "r+b") as f:
        f.truncate(8)
    assert not _bytecode_matches(entry, pyc)
