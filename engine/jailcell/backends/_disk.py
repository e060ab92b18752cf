"""The size bound of a jail's workspace and tmp where they cannot be tmpfs mounts of their own (the
landlock backend: no mount namespace).  The host watches the jail's folder while a run goes on and stops
the run once the workspace or tmp holds more than its policy allows -- bytes and files, as nsjail's
``size=`` and ``nr_inodes=`` bound them.  A regular file counts at the larger of its size and the blocks
it holds: a sparse file counts at its size (stricter than a tmpfs), so that writing into its holes through
a shared mapping, which raises no inotify event, cannot grow the total past what was counted.

How it notices: inotify on every folder of the jail: every way a file or folder grows or appears (a write,
truncate or fallocate, a new entry, a move in) is an event, after which the jail's folder is scanned, so a
run that fills its workspace is stopped within a scan's time of the write that went over.  A run that
touches no file costs two reads that find nothing.  Where inotify cannot be had (the user's instances or
watches are used up), every run is scanned on the supervisor's timer instead.  What no scan sees: a file
the program unlinked while holding it open (each is still bounded by RLIMIT_FSIZE, their number by
RLIMIT_NOFILE, and a stateless run's are freed by the sweep).  The backstop for those: on the timer, a run
is stopped if the host's file system holding the jail gets nearly full while it goes on (``host_full``);
``isolation["degraded"]`` says so.

The scan opens each folder with O_NOFOLLOW relative to its parent's descriptor (a program that swaps a
folder for a symlink mid-scan makes it fail, never wander off into the host) and holds one descriptor
per level that still has folders to visit (a chain of any depth needs one); over MAX_OPEN such levels
stop the run (nothing legitimate is so deep and branched, and the scan's descriptors stay bounded).
Hard links are counted once.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
import time

from .._policy import MIB

IN_MODIFY, IN_MOVED_TO, IN_CREATE, IN_IGNORED, IN_ONLYDIR = 0x2, 0x80, 0x100, 0x8000, 0x01000000
MASK = IN_MODIFY | IN_MOVED_TO | IN_CREATE | IN_ONLYDIR  # every way a file or folder grows or appears
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name)

MAX_OPEN = 100          # folders a scan holds open: levels above it that have folders still to see
MAX_WATCHES = 512       # inotify watches a jail may take of the user's (fs.inotify.max_user_watches)
WORKSPACE_FILES, TMP_FILES = 65536, 16384  # as the nsjail backend's tmpfs nr_inodes=
FLOOR_BYTES, FLOOR_SHARE = 256 * MIB, 0.01  # the host's file system is "nearly full" below the larger
MIN_GAP_S = 0.001       # between two scans set off by events (and at least twice the last scan's time)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DiskWatch:
    """The size bound of one jail's folder (``root``, holding ``work`` and ``tmp``): ``tmp`` counts
    against ``tmp_bytes``, everything else in ``root`` against ``workspace_bytes``."""

    def __init__(self, root: str, workspace_bytes: int, tmp_bytes: int) -> None:
        self.root = root
        self.limits = {"work": (workspace_bytes, WORKSPACE_FILES), "tmp": (tmp_bytes, TMP_FILES)}
        self.fd = -1
        self.watched: set[int] = set()  # the watch descriptors alive (a folder's is ended by its removal)
        self.always = False  # scan every run on the timer (no inotify, or too many folders to watch)
        self.touched = False  # something below root changed since the last scan
        self.next_scan = 0.0  # monotonic: the earliest the next event-driven scan may run
        self.used = {"work": (0, 0), "tmp": (0, 0)}  # bytes and files, as the last scan found them
        self.start = self.used  # at the start of this run: a session's leftovers over the bound may stay
        self.stopped = False  # the last scan found the bound crossed (the run was stopped)
        self.free_start: int | None = None  # the host file system's free bytes when this run started
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._add = libc.inotify_add_watch
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        except (OSError, AttributeError):
            fd = -1
        if fd < 0:
            self.always = True
        else:
            self.fd = fd
        self.excess()  # watches every folder there is (and checks nothing is there yet)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:  # a detached teardown (_host/_teardown) closed every descriptor already
                pass

    def begin(self, session: bool) -> None:
        """A run starts: only what it does sets off scans.  A session's files as the last scan found them
        (over the bound when a run was stopped midway) may stay: it is growth past the bound that stops
        a run, not reading or removing what is there.  A stateless run starts from an empty workspace."""
        self.touched = False
        self.drain()
        if self.touched or (session and self.stopped):
            # Changed between runs (a session's new folder, an upload: new folders get their watches), or
            # what a stopped run's processes wrote until they were killed: measured, not judged
            self.excess(judge=False)
        self.stopped = False
        self.touched = self.always
        self.start = self.used if session else {"work": (0, 0), "tmp": (0, 0)}
        space = self._space()
        self.free_start = space[0] if space else None

    def host_full(self) -> str | None:
        """On the supervisor's slow timer: the backstop for what no scan sees (files unlinked while
        open).  The run is stopped if the host's file system holding the jail gets nearly full while it
        goes on."""
        space = self._space()
        if space is None or self.free_start is None or space[0] >= self.free_start:
            return None
        free, size = space
        if free < max(FLOOR_BYTES, FLOOR_SHARE * size):
            return (f"the run was stopped: the host's file system holding the jail is nearly full ({free // MIB} MiB "
                    "free), and it wrote while it was (this backend does not count files unlinked while open)")
        return None

    def _space(self) -> tuple[int, int] | None:
        """Free bytes (for an unprivileged user) and size of the file system holding the jail."""
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def refuse_upload(self, size: int) -> str | None:
        """Why ``size`` more bytes do not fit in the workspace (a session's upload), or None."""
        self.excess(judge=False)  # (new folders get their watches)
        held, limit = self.used["work"][0], self.limits["work"][0]
        if held + size <= limit:
            return None
        return f"[Errno 28] No space left on device: the workspace holds {held / MIB:.1f} MiB of its {limit // MIB} MiB"

    def drain(self) -> None:
        """Read the pending events: any sets off a scan (which looks at everything); a removed folder's
        watch is gone."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EAGAIN: none left
                return
            if not data:
                return
            at = 0
            while at + EVENT.size <= len(data):
                wd, mask, _cookie, size = EVENT.unpack_from(data, at)
                if mask & IN_IGNORED:
                    self.watched.discard(wd)
                else:
                    self.touched = True
                at += EVENT.size + size

    def due(self, now: float, final: bool) -> bool:
        """Whether to scan now: after events (``drain``), no sooner than the gap allows (``final``: the
        run is over, no later chance)."""
        return self.touched and (final or now >= self.next_scan)

    def excess(self, judge: bool = True) -> str | None:
        """Scan the jail's folder; what is over its bound (a message for the Result), or None.
        ``judge=False``: only measure (``used``) and watch new folders."""
        t0 = time.monotonic()
        try:
            why = self._scan(judge)
        except OSError as exc:
            why = f"jailcell could not measure the jail's folder ({exc.strerror or exc}); the run was stopped"
        took = time.monotonic() - t0
        self.stopped = why is not None
        self.touched = self.always  # until the next event
        self.next_scan = time.monotonic() + max(MIN_GAP_S, 2 * took)
        return why

    def _scan(self, judge: bool) -> str | None:
        used = {"work": [0, 0], "tmp": [0, 0]}  # bytes, files
        seen: set[int] = set()
        top = os.open(self.root, DIR_FLAGS)
        self._watch(top)
        stack: list[tuple[int, str | None, list[str]]] = []
        fd, bucket = top, None
        try:
            while True:
                subdirs = []
                with os.scandir(fd) as entries:
                    for entry in entries:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:  # removed while it was scanned
                            continue
                        where = bucket or ("tmp" if entry.name == "tmp" else "work")
                        if st.st_ino not in seen:
                            seen.add(st.st_ino)
                            used[where][0] += max(st.st_size, st.st_blocks * 512) if stat.S_ISREG(st.st_mode) \
                                else st.st_blocks * 512
                            used[where][1] += 1
                        if stat.S_ISDIR(st.st_mode):
                            subdirs.append(entry.name)
                for where, (size, files) in used.items():
                    limit, max_files = self.limits[where]
                    if judge and (size > max(limit, self.start[where][0])
                                  or files > max(max_files, self.start[where][1])):
                        self.used = {k: (v[0], v[1]) for k, v in used.items()}
                        return self._message(where, size, files)
                if subdirs:
                    if len(stack) >= MAX_OPEN:
                        return (f"the run was stopped: it nested folders, each with others beside it, over "
                                f"{MAX_OPEN} levels deep, which jailcell does not measure")
                    stack.append((fd, bucket, subdirs))
                else:
                    os.close(fd)
                fd = -1
                while stack and fd < 0:
                    parent, parent_bucket, names = stack[-1]
                    name = names.pop()
                    if not names:  # its last folder: the parent is not needed any more (a chain holds one)
                        stack.pop()
                    try:
                        fd = self._open(parent, name)
                    finally:
                        if not names:
                            os.close(parent)
                    bucket = parent_bucket or ("tmp" if name == "tmp" else "work")
                if fd < 0:
                    self.used = {k: (v[0], v[1]) for k, v in used.items()}
                    return None
        finally:
            if fd >= 0:
                os.close(fd)
            for parent, _bucket, _names in stack:
                os.close(parent)

    def _open(self, parent: int, name: str) -> int:
        """A folder below ``parent``, never through a symlink; one whose program took its modes away
        (jailcell's user owns it) gets them back first.  -1 when it is gone already."""
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        except (FileNotFoundError, NotADirectoryError):
            return -1
        except PermissionError:
            path = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            try:
                os.chmod(f"/proc/self/fd/{path}", 0o700)  # this very folder (never a symlink's target)
                fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            finally:
                os.close(path)
        self._watch(fd)
        return fd

    def _watch(self, fd: int) -> None:
        """Watch this folder (a folder watched already keeps its watch descriptor)."""
        if self.fd < 0 or self.always:
            return
        wd = self._add(self.fd, f"/proc/self/fd/{fd}".encode(), MASK) if len(self.watched) < MAX_WATCHES else -1
        if wd < 0:  # the user's watches are shared: at most MAX_WATCHES, then scans on the timer instead
            self.always = self.touched = True
            return
        self.watched.add(wd)

    def _message(self, where: str, size: int, files: int) -> str:
        limit, max_files = self.limits[where]
        name, knob = ("its workspace", "limits.workspace_mib") if where == "work" else ("TMPDIR", "limits.tmp_mib")
        if files > max_files:
            return f"the run was stopped: it made over {max_files} files in {name} (at most {max_files})"
        return (f"the run was stopped: {name} held {size / MIB:.1f} MiB, over its {limit // MIB} MiB "
                f"(raise it: {knob} in a policy; this backend cannot refuse the write itself, there is no tmpfs)")
