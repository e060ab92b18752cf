"""Files of the workspace as the jail's own code touches them: listing what a run wrote, and input
files and session uploads/downloads, never following a link a program planted.  Stdlib only; runs
inside the jail."""

from __future__ import annotations

import builtins
import os
import stat

import _protocol as proto

# Builtins of its own (as every in-jail module): a stateless cell lists its files after the program,
# with the program's builtins still in place.
__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]


def list_files(root: str) -> dict[str, tuple[int, int]]:
    """Regular files below ``root``: relative name -> (size, mtime_ns)."""
    out: dict[str, tuple[int, int]] = {}
    stack = [root]
    while stack and len(out) < proto.MAX_LISTED_FILES:
        d = stack.pop()
        try:
            it = list(os.scandir(d))
        except OSError:
            continue
        for e in it:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(e.path)
            elif stat.S_ISREG(st.st_mode):
                out[os.path.relpath(e.path, root)] = (st.st_size, st.st_mtime_ns)
    return out


def safe_join(root: str, name: str) -> str:
    """``root/name`` after checking ``name`` stays inside ``root`` (the host checked it too)."""
    if not name or "\0" in name or name.startswith("/") or len(name) > 1024:
        raise ValueError(f"invalid file name {name!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid file name {name!r}")
    return os.path.join(root, *parts)


def write_file(root: str, name: str, data: bytes, offset: int = 0) -> None:
    """Write ``data`` into workspace file ``name``: offset 0 creates (or empties) it; a later chunk
    of an upload extends it, at ``offset`` = the file's size so far."""
    path = safe_join(root, name)
    cur = root
    for part in name.split("/")[:-1]:
        cur = os.path.join(cur, part)
        try:
            os.mkdir(cur, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(cur).st_mode):
                raise ValueError(f"{name!r}: {part!r} is not a directory") from None
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = stat.S_IFREG
    if not stat.S_ISREG(mode):  # a FIFO the program made would block the writer: never opened
        raise ValueError(f"{name!r} exists and is not a regular file")
    # O_NONBLOCK: should a FIFO appear between the check and the open, the open fails at once.
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    flags |= (os.O_CREAT | os.O_TRUNC) if offset == 0 else os.O_APPEND
    fd = os.open(path, flags, 0o644)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{name!r} is not a regular file")
        if offset and st.st_size != offset:
            raise ValueError(f"{name!r} changed during its upload ({st.st_size} bytes, expected {offset})")
        try:
            proto.write_all(fd, data)
        except OSError as exc:  # ENOSPC (workspace full), EFBIG (over the file size limit)
            raise ValueError(f"cannot write {name!r}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_file(root: str, name: str, limit: int, offset: int = 0, length: int | None = None):
    """Workspace file ``name`` (no symbolic link on its path, a regular file, at most ``limit``
    bytes): all of it, or with ``length`` the chunk at ``offset`` and the file's size."""
    path = safe_join(root, name)
    # Refuse symlinks anywhere on the path: a cell may have planted one.
    cur = root
    for part in name.split("/"):
        cur = os.path.join(cur, part)
        if stat.S_ISLNK(os.lstat(cur).st_mode):
            raise ValueError(f"{name!r} is a symbolic link")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{name!r} is not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{name!r} is {st.st_size} bytes, over the limit of {limit}")
        if length is not None:
            return os.pread(fd, min(length, max(0, st.st_size - offset)), offset), st.st_size
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise ValueError(f"{name!r} is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
