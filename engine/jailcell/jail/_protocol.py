"""Framing shared by the host and the in-jail zygote (stdlib only: it is imported inside the jail).

A frame is an 8-byte header -- magic ``b"JC"``, protocol version, kind, payload length
(big-endian u32) -- followed by a UTF-8 JSON payload.  Readers bound the length before
allocating, so a peer cannot make the other side allocate more than it agreed to.
"""

from __future__ import annotations

import json
import os
import struct

MAGIC = b"JC"
VERSION = 1
KIND_JSON = 1
HEADER = struct.Struct(">2sBBI")
DEFAULT_LIMIT = 64 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


_dumps = json.dumps  # bound at import: code that later replaces json.dumps does not reach the framing


def encode(obj: object) -> bytes:
    body = _dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    return HEADER.pack(MAGIC, VERSION, KIND_JSON, len(body)) + body


def write_frame(fd: int, obj: object) -> None:
    data = memoryview(encode(obj))
    while data:
        n = os.write(fd, data)
        data = data[n:]


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


def decode(body: bytes) -> dict:
    try:
        obj = json.loads(body.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a JSON object")
    return obj


def read_frame(fd: int, limit: int = DEFAULT_LIMIT) -> dict:
    length = parse_header(read_exact(fd, HEADER.size), limit)
    return decode(read_exact(fd, length))
