"""Property-based fuzzing of every parser that reads what a jail (or a policy file) says: the host's
report, call and message checks, the shared framing, the zygote's check of a holder's reports and
policy files.  Each may only ever answer with its documented outcome or error -- never crash."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import tempfile
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jailcell import Policy, PolicyError
from jailcell._host._jail import _malformed
from jailcell._host._supervisor import CORRUPTED, _CallRelay, parse_report, too_many_containers
from jailcell._injail import _protocol as proto

JAIL_SRC = os.path.join(os.path.dirname(proto.__file__))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
REPORT_KEYS = ["status", "result", "error", "outputs", "files", "input_error", "type", "message", "traceback",
               "mime_type", "data", "name", "size"]
reportish = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30) | st.sampled_from(["ok", "error", "x"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(REPORT_KEYS), children,
                                                                      max_size=6),
    max_leaves=30,
)


def frame(obj) -> bytes:
    body = json.dumps(obj).encode()
    return proto.HEADER.pack(proto.MAGIC, proto.VERSION, proto.KIND_JSON, len(body)) + body


def _check_report(out) -> None:
    if out is None or out is CORRUPTED:
        return
    assert out["status"] in ("ok", "error", "memory_limit", "policy_violation")
    assert out["result"] is None or isinstance(out["result"], str)
    assert out["error"] is None or all(isinstance(out["error"][k], str) for k in ("type", "message", "traceback"))
    assert all(isinstance(o["mime_type"], str) and isinstance(o["data"], str) for o in out["outputs"])
    assert all(isinstance(f["name"], str) and type(f["size"]) is int for f in out["files"])


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300))
def test_report_parser_takes_any_bytes(raw):
    _check_report(parse_report(raw))


@settings(max_examples=300, deadline=None)
@given(obj=reportish)
def test_report_parser_takes_any_json_frame(obj):
    _check_report(parse_report(frame(obj)))


@settings(max_examples=200, deadline=None)
@given(obj=json_values, cut=st.integers(0, 50))
def test_framing_raises_only_protocol_errors(obj, cut):
    data = frame(obj)
    for raw in (data, data[:cut], data[cut:], b"JC" + data[cut:]):
        try:
            length = proto.frame_length(raw, 1 << 20)
            if length is not None and len(raw) >= length:
                proto.decode(raw[proto.HEADER.size:length])
        except (proto.ProtocolError, struct.error):
            pass


@settings(max_examples=200, deadline=None)
@given(obj=json_values)
def test_container_count_matches_the_decoded_value(obj):
    body = json.dumps(obj).encode() + b" " * 5000  # over the size where the scan starts

    def count(v):
        if isinstance(v, dict):
            return 1 + sum(count(x) for x in v.values())
        if isinstance(v, list):
            return 1 + sum(count(x) for x in v)
        return 0

    n = count(obj)
    assert too_many_containers(body, n) is None
    if n:
        assert too_many_containers(body, n - 1) == n


@settings(max_examples=300, deadline=None)
@given(msg=json_values | st.dictionaries(st.sampled_from(["op", "pid", "head", "cell", "status"]), json_values),
       nfds=st.integers(0, 6))
def test_host_message_check_takes_anything(msg, nfds):
    problem = _malformed(msg, list(range(100, 100 + nfds)))
    assert problem is None or isinstance(problem, str)
    if problem is None:
        assert isinstance(msg, dict)


@given(value=json_values)
def test_seconds_are_finite_and_not_negative(value):
    got = proto.seconds(value)
    assert isinstance(got, float) and 0 <= got < 1e12


@pytest.fixture(scope="module")
def zygote_module():
    """The in-jail modules that read a holder's reports, imported as the jail imports them (their own
    directory on the path)."""
    sys.path.insert(0, JAIL_SRC)
    try:
        import _procs
        import _sessions

        yield types.SimpleNamespace(holder_report_problem=_sessions.holder_report_problem,
                                    HOLDER_OPS=_sessions.HOLDER_OPS, exit_info=_procs.exit_info)
    finally:
        sys.path.remove(JAIL_SRC)


@settings(max_examples=300, deadline=None)
@given(msg=json_values | st.dictionaries(st.sampled_from(["op", "pid", "status", "utime", "stime", "maxrss"]),
                                         json_values | st.sampled_from(["spare", "cell_exit", "forked"])),
       nfds=st.integers(0, 6))
def test_zygote_check_of_holder_reports_takes_anything(zygote_module, msg, nfds):
    problem = zygote_module.holder_report_problem(msg, list(range(nfds)))
    assert problem is None or isinstance(problem, str)
    if problem is None:
        assert msg["op"] in zygote_module.HOLDER_OPS and type(msg["pid"]) is int
        info = zygote_module.exit_info(msg["pid"], proto.wait_status(msg.get("status")),
                                        proto.seconds(msg.get("utime")), proto.seconds(msg.get("stime")),
                                        int(proto.seconds(msg.get("maxrss"))))
        assert _malformed({"op": "exit", "cell": info["pid"], "status": info["status"]}, []) is None


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=200))
def test_cell_request_reader_raises_only_protocol_errors(raw):
    r, w = os.pipe()
    try:
        os.write(w, raw)
        os.close(w)
        w = -1
        try:
            out = proto.read_frame(r, 1 << 16)
            assert isinstance(out, dict)
        except (proto.ProtocolError, EOFError, struct.error):
            pass
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@settings(max_examples=200, deadline=None)
@given(obj=json_values, raw=st.binary(max_size=100))
def test_host_function_bridge_answers_or_names_the_misuse(obj, raw):
    a, b = socket.socketpair()
    a.setblocking(False)
    calls = []
    bridge = _CallRelay(a, ["f"], lambda call: calls.append(call) or {"ok": True, "value": None})
    try:
        for data in (frame(obj), frame({"call": "f", "args": obj, "kwargs": {}}), proto.HEADER.pack(
                proto.MAGIC, proto.VERSION, proto.KIND_JSON, len(raw)) + raw):
            misuse = bridge.handle(data)
            assert misuse is None or isinstance(misuse, str)
        assert all(c["name"] == "f" and isinstance(c["args"], list) and isinstance(c["kwargs"], dict) for c in calls)
    finally:
        a.close()
        b.close()


toml_scalars = st.one_of(st.integers(-10**6, 10**6), st.booleans(), st.text(max_size=12),
                         st.floats(allow_nan=False, allow_infinity=False, width=32))
SECTIONS = {"": ["name", "description", "extends", "bogus"],
            "limits": ["wall_s", "cpu_s", "memory_mib", "pids", "file_size_mib", "open_files", "output_bytes",
                       "workspace_mib", "tmp_mib", "code_bytes", "nope"],
            "network": ["enabled"], "preload": ["modules"], "code": ["mode"], "env": ["X", "PATH"],
            "imports": ["allow", "deny", "allow_add", "deny_add", "allow_remove", "deny_remove"]}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


@st.composite
def policy_texts(draw):
    lines = []
    for section, keys in SECTIONS.items():
        chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=4))
        if not chosen:
            continue
        if section:
            lines.append(f"[{section}]")
        for key in chosen:
            value = draw(toml_scalars | st.lists(toml_scalars | st.sampled_from(["os", "math", "num*"]), max_size=3))
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


@settings(max_examples=300, deadline=None)
@given(text=policy_texts() | st.text(max_size=200))
def test_policy_files_load_or_say_what_is_wrong(text):
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, encoding="utf-8") as f:
        f.write(text)
    try:
        try:
            policy = Policy.load(f.name)
        except PolicyError as exc:
            assert f.name in str(exc) or "policy" in str(exc).lower(), exc
        else:
            assert policy.limits.wall_s > 0 and policy.limits.memory_mib > 0
    finally:
        os.unlink(f.name)
