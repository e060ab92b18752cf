"""Where this host's Python and its packages live, and what a jail must mount to run it.

A jail sees nothing of the host but what is bound into it, read-only, at the *same* path (venvs,
``.pth`` files and editable installs hold absolute paths).  :func:`python_layout` works that out
once per process, for every way Python gets installed: a venv anywhere (``/tmp``, ``/var/tmp``,
``$HOME``, a project directory), ``--system-site-packages``, ``uv venv``, pyenv or uv-managed
interpreters, Debian's ``/usr/bin/python3`` with ``dist-packages``, the user site (``pip install
--user``), directories named by ``.pth`` files (editable installs), interpreters reached
through symlinks.

The jail runs the interpreter's real binary (symlinks resolved), with ``-S``: the zygote adds
the site directories computed here itself, so a venv's packages are found without the venv's
``bin/python`` symlink chain having to exist in the jail.

Some host directories are never bound whole, whatever a ``.pth`` file says: ``/``, ``/usr``,
``/home``, ``$HOME``, ``/tmp`` ... (they hold far more than Python).  Such an entry is left out and
said in :attr:`PythonLayout.skipped`; its packages are then missing in the jail, which is a
clear ``ModuleNotFoundError``, never a wider view of the host.
"""

from __future__ import annotations

import functools
import os
import site
import sys
import sysconfig
from pathlib import Path

from .._values import Frozen

# Directories that hold much more than a Python installation: bound only through narrower paths.
BROAD = frozenset({
    "/", "/usr", "/usr/local", "/usr/lib", "/usr/lib64", "/usr/share", "/usr/bin", "/usr/local/lib",
    "/usr/local/bin", "/lib", "/lib64", "/bin", "/sbin", "/opt", "/home", "/root", "/tmp", "/var",
    "/var/tmp", "/var/lib", "/etc", "/srv", "/mnt", "/media", "/run", "/dev", "/proc", "/sys", "/boot",
    "/snap", "/nix", "/nix/store",
})
# Where the jail has file systems of its own; host paths below them cannot be bound.
JAIL_OWNED = ("/proc", "/sys", "/dev")


def _real(path: str) -> str:
    return os.path.realpath(path)


def outermost(paths: list[str]) -> list[str]:
    """Existing real paths with nested duplicates dropped, parents first."""
    real = sorted({_real(p) for p in paths if os.path.exists(p)}, key=lambda p: (p.count("/"), p))
    out: list[str] = []
    for p in real:
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def overlaps(a: str, b: str) -> bool:
    """One of the two paths is the other or lies below it."""
    a, b = a.rstrip("/") or "/", b.rstrip("/") or "/"
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def broad_dirs() -> frozenset[str]:
    home = os.path.expanduser("~")
    return BROAD | ({_real(home)} if home.startswith("/") else set())


class PythonLayout(Frozen):
    """What of the host's Python installation a jail binds, and the sys.path its zygote builds."""

    __slots__ = ("python", "version", "mounts", "sys_path", "skipped")
    python: str                  # the interpreter binary the jail executes (real path)
    version: str
    mounts: tuple[str, ...]      # read-only binds, outermost first (the stdlib, site dirs, .pth dirs)
    sys_path: tuple[str, ...]    # what the zygote adds to sys.path: site dirs, each followed by its .pth dirs
    skipped: tuple[str, ...]     # paths the host's Python uses that are not bound, and why

    def __init__(self, python: str, version: str, mounts: tuple[str, ...], sys_path: tuple[str, ...],
                 skipped: tuple[str, ...]) -> None:
        self._set(python=python, version=version, mounts=mounts, sys_path=sys_path, skipped=skipped)

    def describe(self) -> str:
        return f"Python {self.version} at {self.python} ({sys.executable} on the host)"


def _site_dirs(paths: dict[str, str]) -> list[str]:
    """The host's site directories, venv-aware (``--system-site-packages`` included), plus the user
    site when this interpreter uses it (``pip install --user``).  ``paths``: sysconfig's."""
    dirs = list(site.getsitepackages())
    dirs += paths.get("purelib", "").split(os.pathsep)
    dirs += paths.get("platlib", "").split(os.pathsep)
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if d and os.path.isdir(d)]


def pth_dirs(site_dir: str) -> list[str]:
    """The directories the plain path lines of ``site_dir``'s ``.pth`` files name (as site.py reads
    them; ``import`` lines are code, not paths, and are never run in the jail)."""
    try:
        names = sorted(n for n in os.listdir(site_dir) if n.endswith(".pth"))
    except OSError:
        return []
    out = []
    for name in names:
        try:
            lines = Path(site_dir, name).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#") or line.startswith(("import ", "import\t")):
                continue
            path = os.path.join(site_dir, line)
            if os.path.isdir(path):
                out.append(os.path.normpath(path))
    return out


def _own_source_root() -> str | None:
    """The directory an editable install of jailcell itself adds to sys.path (its source tree's
    ``engine/``): the jail needs only jailcell's in-jail package, which is bound on its own."""
    root = Path(__file__).resolve().parent.parent.parent
    return None if root.name in ("site-packages", "dist-packages") else str(root)


@functools.lru_cache(maxsize=1)
def python_layout() -> PythonLayout:
    if not sys.executable or not os.path.exists(sys.executable):
        raise FileNotFoundError(f"this Python's executable is unknown or missing (sys.executable={sys.executable!r})")
    python = _real(sys.executable)
    broad = broad_dirs()
    wanted: list[str] = []
    skipped: list[str] = []
    # The installation: its prefixes (unless a shared one such as /usr), its stdlib, the binary.
    for prefix in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix):
        if _real(prefix) not in broad:
            wanted.append(prefix)
    paths = sysconfig.get_paths()
    for key in ("stdlib", "platstdlib"):
        wanted.append(paths[key])
    wanted.append(python)
    own = _own_source_root()
    sys_path: list[str] = []  # site.py's order: a site directory, then what its .pth files name
    for d in _site_dirs(paths):
        sys_path.append(d)
        sys_path += [extra for extra in pth_dirs(d) if not (own and _real(extra) == _real(own))]
    wanted += sys_path
    mounts = []
    for path in outermost(wanted):
        if path in broad:
            skipped.append(f"{path} (a .pth entry or site directory that is a whole system directory)")
        elif any(overlaps(path, j) for j in JAIL_OWNED):
            skipped.append(f"{path} (below {', '.join(JAIL_OWNED)}, which the jail mounts itself)")
        else:
            mounts.append(path)
    version = ".".join(map(str, sys.version_info[:3]))
    return PythonLayout(python, version, tuple(mounts), tuple(dict.fromkeys(sys_path)), tuple(skipped))
