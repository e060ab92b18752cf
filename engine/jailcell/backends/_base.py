"""What every backend provides: a way to start a zygote under some isolation."""

from __future__ import annotations

import errno
import functools
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._injail import _protocol as proto
from .._policy import MIB, Policy
from ._layout import python_layout

if TYPE_CHECKING:
    from ._disk import DiskWatch

JAIL_SRC = Path(__file__).resolve().parent.parent / "_injail"
JAIL_SRC_MOUNT = "/jailcell/injail"  # where a jail with its own mount namespace sees JAIL_SRC

# Thread pools must be single-threaded before fork; matplotlib must not look for a display.
# glibc asks for transparent huge pages for its heap (numpy's arrays, large objects).  Python's own
# objects stay on pymalloc, whose pools pack them densely: a forked cell copies fewer pages
# (measured with the standard image: idle spare cells 2.0-2.1 vs 2.2-2.3 MiB with
# PYTHONMALLOC=malloc, back-to-back runs as fast).  A policy's [env] can override any of these.
BASE_ENV = {
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONHASHSEED": "random",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "MPLBACKEND": "Agg",
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}


# What a failed start of a jail's process says when this process (or the machine) is short of something:
# a JailError that says so, never "the backend cannot jail here".
HOST_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.ENOSPC})


def refusal(why: str) -> str:
    """The words for "this jail cannot be built here": the cause, the fix, and that nothing ran."""
    return f"cannot run programs jailed: {why}. Nothing was run. `jailcell check` shows what works on this machine."


class Spawned:
    """A started zygote process and what the backend set up for it."""

    def __init__(self, proc: subprocess.Popen, config: dict[str, Any], cleanup: dict[str, Any] | None = None,
                 config_fds: list[int] | None = None, disk: DiskWatch | None = None) -> None:
        self.proc = proc
        self.config = config
        self.cleanup = cleanup if cleanup is not None else {}
        self.config_fds = config_fds if config_fds is not None else []  # sent with the config, then closed here
        self.disk = disk  # the workspace's size bound, where no tmpfs gives it (watched by the run's supervisor)

    def close_config_fds(self) -> None:
        while self.config_fds:
            os.close(self.config_fds.pop())


class Backend:
    """Base class.  Subclasses build the command; the Jail handle speaks the protocol."""

    name = "base"

    def spawn(self, policy: Policy, *, session: bool, stderr: Any, channel: int) -> Spawned:
        """Start a zygote whose fds 0 and 1 are ``channel`` (the control socket)."""
        raise NotImplementedError

    def verify(self, ready: dict[str, Any]) -> str | None:
        """Why the started zygote (its ``ready`` answer) is not in the jail this backend promises, or
        None.  Checked at every jail start, before any program is sent."""
        return None

    def start_failure(self, jail_log: str) -> str | None:
        """Why the jail could not be built (from its log: the backend's and Python's words), with
        the fix; None when the log does not say."""
        return None

    def admit(self, spawned: Spawned, pid: int) -> None:
        """Put the zygote -- host pid ``pid``, from the credentials of its HELLO -- in what
        ``spawn`` set up for it (its cgroups).  Called before the zygote gets its config, so
        before anything is forked in the jail.  Raises OSError (with why) when it cannot: the
        jail is then refused."""

    def after_ready(self, spawned: Spawned, policy: Policy) -> None:
        """Called once the zygote has preloaded its modules (e.g. to tighten memory limits)."""

    def oom_kills(self, spawned: Spawned) -> int:
        return 0

    def teardown(self, spawned: Spawned) -> None:
        """Release what ``spawn`` created, after the process is gone."""

    def isolation(self, policy: Policy) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def zygote_config(policy: Policy, *, session: bool, workspace: str, tmp: str,
                      pid_namespace: bool, rlimit_as: bool) -> dict[str, Any]:
        layout = python_layout()
        return {
            "policy_name": policy.name,
            "session": session,
            "workspace": workspace,
            "tmp": tmp,
            "pid_namespace": pid_namespace,
            "preload": list(policy.preload),
            "slim": slim_image(policy, session),
            "imports": {"allow": list(policy.imports.allow), "deny": list(policy.imports.deny)},
            "code_mode": policy.code_mode,
            "cpu_s": policy.limits.effective_cpu_s,
            "trusted_paths": [*layout.mounts, str(JAIL_SRC) if not pid_namespace else JAIL_SRC_MOUNT],
            "rlimit_as_mib": policy.limits.memory_mib if rlimit_as else None,
            "sys_path": list(layout.sys_path),
            # a request carries the code and the input files (base64: 4/3 of their size), which
            # the policy bounds by code_bytes and the workspace's size
            "max_request": policy.limits.code_bytes + (policy.limits.workspace_mib * MIB * 4) // 3 + 2 * MIB,
        }

    @staticmethod
    def env(policy: Policy, *, tmp: str, home: str) -> dict[str, str]:
        env = dict(BASE_ENV)
        env.update({"HOME": home, "TMPDIR": tmp, "MPLCONFIGDIR": f"{tmp}/.matplotlib",
                    "PATH": os.path.dirname(python_layout().python)})
        env.update(dict(policy.env))
        return env


# The zygote is imported as a module, not run as a script, so its compiled bytecode is used
# (a script is compiled from source at every start: ~15 ms).  The script path stays in argv
# (it names the jail's processes in ps).  Its first act is the HELLO byte on fd 1 (the control
# socket), before its imports: the host puts it in the jail's cgroups meanwhile (Backend.admit).
_LAUNCHER = (f"import posix; posix.write(1, {proto.HELLO!r}); "
             "import sys; sys.path.insert(0, sys.argv[1].rpartition('/')[0]); import zygote; zygote.main()")


def slim_image(policy: Policy, session: bool) -> bool:
    """Whether a stateless jail of ``policy`` gets a slim nursery too: when its preload list has
    installed packages (not only the standard library), whose pages a program that does not use
    them should not fork.  Its nursery and two spares are three more of the jail's processes."""
    return not session and bool(proto.split_preload(policy.preload)[1])


SLIM_PROCESSES = 3  # the slim nursery and its two spares


def slim_processes(policy: Policy, session: bool) -> int:
    """The processes a jail's slim nursery adds to its process limits (0 without one)."""
    return SLIM_PROCESSES if slim_image(policy, session) else 0


def zygote_argv(python: str, script: str) -> list[str]:
    # -S: no site.main(), so installed packages' .pth *import hooks* do not run at every start
    # (57 ms here); the zygote adds site-packages and the plain path lines of .pth files itself.
    # -B: the jail never writes bytecode (its view of the package is read-only anyway).
    # -s -P, not -I: the environment is all ours (Backend.env: the base variables and the
    # policy's [env]) and must be read; -I silently ignored PYTHONMALLOC and PYTHONHASHSEED.
    ensure_bytecode()
    return [python, "-s", "-P", "-S", "-B", "-c", _LAUNCHER, script]


@functools.lru_cache(maxsize=1)
def ensure_bytecode() -> None:
    """Compile the in-jail modules once (a wheel install already did; an editable checkout may
    not have), so every jail imports them from bytecode.  Best effort: a read-only install
    without bytecode still works, only slower to start.  Bytecode that matches its source as the
    interpreter checks it (the source's mtime and size in its header) is taken as it is, without
    importing compileall (~1.5 ms of every `jailcell run`); compileall's own check reads only the
    mtime, and bytecode of a same-second edit would be imported from source at every jail start."""
    import importlib.util

    try:
        if all(_bytecode_matches(e, importlib.util.cache_from_source(e.path))
               for e in os.scandir(JAIL_SRC) if e.name.endswith(".py")):
            return
    except OSError:
        pass
    import compileall

    try:
        compileall.compile_dir(str(JAIL_SRC), maxlevels=0, quiet=2, force=True)
    except OSError:
        pass


def _bytecode_matches(source: os.DirEntry, pyc: str) -> bool:
    """The check the interpreter makes of a timestamp-based .pyc (PEP 552): its header holds the
    source's mtime (seconds) and size, each modulo 2**32.  A hash-based one (a reproducible build's)
    the interpreter checks by itself, or not at all, as it was built to be."""
    with open(pyc, "rb") as f:
        header = f.read(16)
    if len(header) < 16:
        return False
    if int.from_bytes(header[4:8], "little") & 1:
        return True
    st = source.stat()
    return int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF \
        and int.from_bytes(header[12:16], "little") == st.st_size & 0xFFFFFFFF


def user_processes(uid: int | None = None) -> int:
    """How many processes a user (this one by default) has: RLIMIT_NPROC counts them all, so a jail
    without cgroups that runs as that user gets that many more."""
    uid, n = os.getuid() if uid is None else uid, 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def make_root() -> tuple[str, str, str]:
    """A jail's folder on the host without a mount namespace (landlock, process backends): its root, the
    workspace and tmp below it.  Named ``jailcell-<pid>-...``: whose it is (the tests check their own)."""
    import tempfile

    root = tempfile.mkdtemp(prefix=f"jailcell-{os.getpid()}-")
    workspace, tmp = os.path.join(root, "work"), os.path.join(root, "tmp")
    os.mkdir(workspace, 0o700)
    os.mkdir(tmp, 0o700)
    return root, workspace, tmp


def remove_root(spawned: Spawned) -> None:
    """Remove a jail's folder on the host (workspace and tmp), whatever modes its program left there."""
    import shutil

    root = spawned.cleanup.pop("root", None)
    if spawned.disk is not None:
        spawned.disk.close()
    if root:
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:  # a program may have chmod-ed its directories to 000
                try:
                    os.chmod(os.path.join(dirpath, d), 0o700)
                except OSError:
                    pass
        shutil.rmtree(root, ignore_errors=True)


def preload_allowance(policy: Policy) -> int:
    """Memory allowed while the zygote imports its preload modules (before user code exists)."""
    return policy.limits.memory_mib * MIB + (1024 * MIB if policy.preload else 256 * MIB)
