"""What the sweep does to files: empty a directory whatever a program did to it, scrub what it keeps,
and copy a session's workspace for a branch.  Stdlib only; runs inside the jail."""

from __future__ import annotations

import builtins
import errno
import os

# Builtins of its own (as every in-jail module): a program that replaces builtins.len does not change
# what this code sees.
__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]


def wipe(path: str) -> None:
    """Remove everything below ``path`` (not ``path`` itself), whatever permissions a cell set
    and however deep its tree (no recursion: the walk descends with chdir, so neither the
    recursion limit nor PATH_MAX stops it).  Host directories bound into the jail below ``path``
    (a venv in /tmp/x/venv: another file system) are kept, and so are the directories that lead
    to them; everything else on ``path``'s own file system goes."""
    try:
        dev = os.lstat(path).st_dev
        os.chmod(path, 0o1777 if path == "/tmp" else 0o755)
    except FileNotFoundError:
        return
    home = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(path)
        stack: list[tuple[list[str], str | None]] = [(os.listdir("."), None)]
        while stack:
            names, here = stack[-1]
            if not names:
                stack.pop()
                if here is not None:
                    os.chdir("..")
                    try:
                        os.rmdir(here)
                    except OSError as exc:
                        if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):  # a path to a mount point
                            raise
                        os.chmod(here, 0o755)  # kept: nothing of the run may stay on it
                        scrub(here)
                continue
            name = names.pop()
            try:
                st = os.lstat(name)
                if st.st_dev != dev:
                    continue  # a mount point: the host's read-only bind
                if stat_isdir(st.st_mode):
                    os.chmod(name, 0o700)
                    os.chdir(name)
                    if os.lstat(".").st_ino != st.st_ino:  # cannot happen: every process is gone
                        raise OSError(errno.ESTALE, f"{name!r} changed during the sweep")
                    stack.append((os.listdir("."), name))
                else:
                    os.unlink(name)
            except FileNotFoundError:
                pass
    finally:
        os.fchdir(home)
        os.close(home)
    scrub(path)


def scrub(path: str) -> None:
    """A directory the sweep keeps (the workspace, /tmp, the way to a bind mount) keeps nothing of
    the run: no extended attributes (a program can set user.* ones on tmpfs: data for the next
    run), and fixed times (a program can set them too)."""
    try:
        for name in os.listxattr(path, follow_symlinks=False):
            try:
                os.removexattr(path, name, follow_symlinks=False)
            except OSError:
                pass
    except OSError:
        pass
    try:
        os.utime(path, (0, 0), follow_symlinks=False)
    except OSError:
        pass


def stat_isdir(mode: int) -> bool:
    return mode & 0o170000 == 0o040000


def copy_tree(src: str, dst: str) -> None:
    """A session branch's copy of the workspace, without recursion: regular files, directories,
    symbolic links (as links) and FIFOs (made anew); sockets and devices are left out (a copy
    of one would block or fail)."""
    os.makedirs(dst, 0o755, exist_ok=True)
    stack = [""]
    dir_modes: list[tuple[str, int]] = []
    while stack:
        rel = stack.pop()
        s_dir, d_dir = os.path.join(src, rel), os.path.join(dst, rel)
        try:
            entries = list(os.scandir(s_dir))
        except PermissionError:  # the program took its own permissions away: this process owns it
            os.chmod(s_dir, 0o700)
            entries = list(os.scandir(s_dir))
        for entry in entries:
            s_path, d_path = entry.path, os.path.join(d_dir, entry.name)
            st = entry.stat(follow_symlinks=False)
            kind = st.st_mode & 0o170000
            if kind == 0o040000:
                os.mkdir(d_path, 0o700)
                stack.append(os.path.join(rel, entry.name))
                dir_modes.append((d_path, st.st_mode & 0o7777))
                continue
            if kind == 0o100000:
                fd_in = os.open(s_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    fd_out = os.open(d_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    try:
                        while os.sendfile(fd_out, fd_in, None, 1 << 24):
                            pass
                    finally:
                        os.close(fd_out)
                finally:
                    os.close(fd_in)
            elif kind == 0o120000:
                os.symlink(os.readlink(s_path), d_path)
                continue
            elif kind == 0o010000:
                os.mkfifo(d_path, 0o600)
            else:
                continue
            os.chmod(d_path, st.st_mode & 0o7777)
    for path, mode in reversed(dir_modes):  # deepest first: their parents are still writable
        os.chmod(path, mode)
