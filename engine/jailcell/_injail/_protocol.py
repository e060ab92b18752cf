"""Framing shared by the host, the in-jail zygote and the cells (stdlib only: it is imported inside the jail).

A frame is an 8-byte header -- magic ``b"JC"``, protocol version, kind, payload length
(big-endian u32) -- followed by a UTF-8 JSON payload.  Readers bound the length before
allocating, so a peer cannot make the other side allocate more than it agreed to.

JSON goes through the C accelerator ``_json`` directly -- the same encoder and scanner
``json.dumps``/``json.loads`` use -- because importing ``json`` imports ``re`` and ``enum``:
~6 ms at every jail start, before the first run.

Channels (see ``zygote.py`` for the processes):

- host <-> zygote: a unix stream socket (the zygote's fd 0); control frames, and file
  descriptors (SCM_RIGHTS) travelling with the header of a frame.  Before any frame, the
  zygote's interpreter writes the one byte ``HELLO`` as it starts, before it imports anything:
  its credentials (SO_PASSCRED) tell the host the zygote's pid as the host sees it.  The host
  then sends the config (with cgroup v1, the cgroups' ``tasks`` files the zygote moves itself
  with; with v2, the host has moved it first).  The zygote forks nothing before that;
- host -> cell: a pipe carrying exactly one request frame;
- cell -> host: a unix stream socket (the cell's fd 3) carrying the cell's report, and
  host-function calls and their answers.
"""

from __future__ import annotations

import _socket
import builtins
import os
import struct

# Builtins of its own (as _cell's): a program in a cell that replaces builtins.len does not break the framing.
__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]

try:
    from _json import encode_basestring as _c_encode_str
    from _json import make_encoder as _c_make_encoder
    from _json import make_scanner as _c_make_scanner
except ImportError:  # an interpreter without the accelerator: the json module does the same
    _c_make_scanner = None  # type: ignore[assignment,misc]

MAGIC = b"JC"
VERSION = 3
HELLO = b"\x06"  # the zygote's first byte on its control socket (see above); not a frame
KIND_JSON = 1
HEADER = struct.Struct(">2sBBI")
DEFAULT_LIMIT = 64 * 1024 * 1024

MAX_REPORT = 48 * 1024 * 1024     # a cell's report (stdout/stderr travel separately, in pipes)
MAX_CALL = 8 * 1024 * 1024        # a host-function call's arguments, and its answer, at most
MAX_CALLS_PER_RUN = 10_000        # host-function calls one run may make
CALL_PREFIX = b'{"call":'         # how a call frame's payload starts (a report's never does)
MAX_FDS = 8                       # file descriptors one control frame may carry
MAX_LISTED_FILES = 1000           # files a report lists at most
REPORT_FAILED = 70                # exit status of a cell whose program broke its reporting
ERROR_KINDS = ("input", "lost", "internal")  # what an error answer of the zygote may say went wrong


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def _not_json(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


class _ScanContext:
    """What ``_json.make_scanner`` reads from a decoder: json.loads' defaults."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


def _json_functions():
    """(dumps, loads), bound at import: code that later replaces json's functions does not reach
    the framing."""
    if _c_make_scanner is not None:
        try:
            scan = _c_make_scanner(_ScanContext())
            # A new encoder per call: its circular-reference markers must not be shared between threads.
            make_encoder = lambda: _c_make_encoder({}, _not_json, _c_encode_str, None, ":", ",", False, False, True)  # noqa: E731
            make_encoder()
        except (TypeError, AttributeError):  # the accelerator's signature changed: use json
            pass
        else:
            def dumps(obj: object) -> str:
                return "".join(make_encoder()(obj, 0))

            def loads(text: str) -> object:
                start = len(text) - len(text.lstrip(" \t\n\r"))
                try:
                    obj, end = scan(text, start)
                except StopIteration:
                    raise ValueError("no JSON value") from None
                if text[end:].strip(" \t\n\r"):
                    raise ValueError(f"extra data at {end}")
                return obj

            return dumps, loads
    import json

    return (lambda obj: json.dumps(obj, separators=(",", ":"), ensure_ascii=False)), json.loads


_dumps, _loads = _json_functions()


def encode(obj: object) -> bytes:
    body = _dumps(obj).encode("utf-8", "surrogatepass")
    return HEADER.pack(MAGIC, VERSION, KIND_JSON, len(body)) + body


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_frame(fd: int, obj: object) -> None:
    write_all(fd, encode(obj))


def read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the channel")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def parse_header(header: bytes, limit: int) -> int:
    magic, version, kind, length = HEADER.unpack(header)
    if magic != MAGIC or kind != KIND_JSON:
        raise ProtocolError(f"bad frame header {header!r}")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} is not {VERSION}: jailcell versions differ")
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes is over the limit of {limit}")
    return length


# -- fields of untrusted reports (a session's holder is a former cell) -----------------------------

def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def seconds(value: object) -> float:
    """A non-negative finite number (seconds, KiB) from a report, else 0."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e12 \
        else 0.0


def wait_status(value: object) -> int | None:
    """A wait status from a report (it fits 16 bits), else None."""
    return value if is_int(value) and 0 <= value <= 0xFFFF else None  # type: ignore[operator,return-value]


def decode(body: bytes) -> dict:
    try:
        obj = _loads(body.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise ProtocolError(f"frame is not JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a JSON object")
    return obj


def read_frame(fd: int, limit: int = DEFAULT_LIMIT) -> dict:
    """One frame from a pipe or socket that carries nothing after it (a small one in one read)."""
    first = os.read(fd, 65536)
    if len(first) < HEADER.size:
        first += read_exact(fd, HEADER.size - len(first))
    length = parse_header(first[: HEADER.size], limit)
    body = first[HEADER.size :]
    if len(body) > length:
        raise ProtocolError("bytes after the frame")
    return decode(body + read_exact(fd, length - len(body)) if len(body) < length else body)


def frame_length(buf: bytes | bytearray, limit: int) -> int | None:
    """Total size of the frame at the start of ``buf`` once its header is there, else None."""
    if len(buf) < HEADER.size:
        return None
    return HEADER.size + parse_header(bytes(buf[: HEADER.size]), limit)


# -- sockets: frames with file descriptors ------------------------------------------------------
# Plain ``_socket`` (not ``socket.py``, whose enum set-up costs ~4 ms at every jail start).

def socketpair() -> tuple[_socket.socket, _socket.socket]:
    return _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)


def send(sock: _socket.socket, obj: object, fds: tuple[int, ...] | list[int] = ()) -> None:
    """One frame over a stream socket; ``fds`` travel with it (SCM_RIGHTS).  A small frame goes
    in one system call, so a sender that is stopped or killed midway never leaves half of one."""
    frame = encode(obj)
    if fds:
        rights = struct.pack(f"{len(fds)}i", *fds)
        sent = sock.sendmsg([frame], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
    else:
        sent = sock.send(frame)
    if sent < len(frame):
        sock.sendall(frame[sent:])


def _sock_exact(sock: _socket.socket, n: int, first: bytes = b"") -> bytes:
    buf = bytearray(first)
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("peer closed the socket")
        buf += chunk
    return bytes(buf)


def received_fds(ancdata) -> list[int]:
    """The file descriptors in ``recvmsg``'s ancillary data (SCM_RIGHTS); the caller owns them."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4])
    return fds


def recv(sock: _socket.socket, limit: int = DEFAULT_LIMIT) -> tuple[dict, list[int]]:
    """One frame and the file descriptors that came with it (the caller owns them)."""
    head, ancdata, _flags, _addr = sock.recvmsg(HEADER.size, _socket.CMSG_LEN(MAX_FDS * 4))
    fds = received_fds(ancdata)
    try:
        if not head:
            raise EOFError("peer closed the socket")
        length = parse_header(_sock_exact(sock, HEADER.size, head), limit)
        return decode(_sock_exact(sock, length)), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise

# ----------------------------------------------------------------------------------------------
# module-name patterns of an import policy: one rule for the host (Policy.imports) and the jail (its guard)
# ----------------------------------------------------------------------------------------------

# A pattern without glob characters is a module name and covers its submodules too (``os`` matches
# ``os`` and ``os.path``).  A glob (``numpy.*``, ``nump?``, ``[n]umpy``) is matched against the whole
# dotted name, case-sensitively as module names are, and covers only what it spells (``numpy.*``
# matches the submodules of numpy, not numpy itself).

GLOB_CHARS = frozenset("*?[")


class ModulePatterns:
    """A list of module patterns, matched in one dict lookup per dotted prefix (and one regex,
    compiled only if there are globs: the jail starts without ``re``)."""

    __slots__ = ("names", "glob")

    def __init__(self, patterns) -> None:
        globs = [p for p in patterns if GLOB_CHARS.intersection(p)]
        self.names = frozenset(p for p in patterns if p not in globs)
        self.glob = None
        if globs:
            import fnmatch
            import re

            self.glob = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in globs), re.S)

    def match(self, module: str) -> bool:
        names = self.names
        if module in names:
            return True
        dot = module.find(".")
        while dot != -1:
            if module[:dot] in names:
                return True
            dot = module.find(".", dot + 1)
        return self.glob is not None and self.glob.match(module) is not None


def matcher(patterns) -> ModulePatterns | None:
    """The patterns compiled, or None for an empty list (a policy without that list)."""
    return ModulePatterns(patterns) if patterns else None


def blocked(module: str, deny: ModulePatterns | None, allow: ModulePatterns | None) -> bool:
    """A policy's rule: denied if a deny pattern matches; otherwise, if there is an allow list,
    denied unless an allow pattern matches."""
    if deny is not None and deny.match(module):
        return True
    return allow is not None and not allow.match(module)


def split_preload(modules) -> tuple[list, list]:
    """A preload list as (the standard library's modules, the installed packages'): one rule for the
    host (does a jail get a slim nursery, and the pids for it) and the zygote (what its slim image holds)."""
    import sys

    std = sys.stdlib_module_names
    return [m for m in modules if m.split(".")[0] in std], [m for m in modules if m.split(".")[0] not in std]
