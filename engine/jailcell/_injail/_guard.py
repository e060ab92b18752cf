"""The import policy inside the jail: a guard on imports made by the program, and the blocked
modules kept out of sys.modules.  Stdlib only; runs inside the jail.

This is defence in depth and a clear message for the model; the OS jail is the boundary.  Imports
made by library code (numpy importing ctypes) are let through: a frame is trusted when its file
lies under the interpreter's install (the host sends those paths) or is frozen into it.
"""

from __future__ import annotations

import builtins
import os
import sys

import _protocol as proto

# Builtins of its own (as every in-jail module): the guard runs while the program's builtins are in
# place, and a program that replaces builtins.len must not change what the guard sees.
__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]
_import = builtins.__import__  # the interpreter's own: the program may replace builtins.__import__

# The first spare of a jail starts from these imports alone (C modules, small ones): no ``re``,
# ``enum``, ``ast``, ``json``, ``traceback`` -- ~10 ms of imports off every jail's first run.
# Modules only some runs need are imported when needed; ``complete_image`` loads them into the
# nursery once its first spare exists, so later cells have them already.
LATER_IMPORTS = ("linecache", "traceback")
STATE: dict = {"hide": [], "trusted_prefixes": ("/nonexistent/",), "imports": {}, "policy": "?"}


def configure(config: dict) -> None:
    """Take the policy's import lists, its name and the trusted paths from the jail's config."""
    STATE["imports"] = config.get("imports") or {}
    STATE["policy"] = config.get("policy_name", "?")
    STATE["trusted_prefixes"] = tuple(p.rstrip("/") + "/" for p in config.get("trusted_paths", [])) \
        or ("/nonexistent/",)


class PolicyViolation(ImportError):
    """An import refused by the jail's policy (an ImportError, so `except ImportError` works)."""


PolicyViolation.__module__ = "builtins"  # tracebacks say `PolicyViolation: ...`, not the name of jailcell's module


def import_blocked(module: str) -> bool:
    if "deny" not in STATE:  # compiled once, in the zygote; cells inherit them
        imports = STATE["imports"]
        STATE["deny"], STATE["allow"] = proto.matcher(imports.get("deny")), proto.matcher(imports.get("allow"))
    return proto.blocked(module, STATE["deny"], STATE["allow"])


def _blocked_message(module: str) -> str:
    imports, policy = STATE["imports"], STATE["policy"]
    def listed(names: list) -> str:  # complete, or saying how many more there are
        more = len(names) - 30
        return ", ".join(names[:30]) + (f" and {more} more (`jailcell policy show {policy}`)" if more > 0 else "")

    if imports.get("allow"):
        allowed = listed(imports["allow"])
    else:
        allowed = "everything except " + listed(imports.get("deny", []))
    return (
        f"import of {module!r} is blocked by policy {policy!r}; allowed: {allowed} "
        f"(to allow it, use a policy that extends {policy!r} with imports.allow_add/deny_remove)"
    )


def _trusted_frame(frame) -> bool:
    """True when ``frame`` runs library code: a file under the interpreter's install, or a
    stdlib module frozen into the interpreter (``<frozen os>``)."""
    filename = frame.f_code.co_filename
    return filename.startswith(STATE["trusted_prefixes"]) or filename.startswith("<frozen ")


def install_import_guard() -> None:
    """Refuse imports made *by user code* that the policy blocks.

    Imports made by library code (numpy importing ctypes) are not blocked.  This is defence in
    depth and a clear message for the model; the OS jail is the boundary, not this hook.
    """
    if not STATE["imports"].get("deny") and not STATE["imports"].get("allow"):
        return
    import importlib

    import_blocked("")  # compile the policy's patterns now, before the hooks are in place
    real_import = builtins.__import__
    real_import_module = importlib.import_module
    getframe = sys._getframe
    stdlib = os.path.dirname(os.__file__) + "/"
    helpers = tuple(stdlib + f for f in ("importlib/", "pkgutil.py", "pydoc.py", "imp.py", "runpy.py"))

    def deciding(frame):
        """The frame that asked for an import: past the import machinery, the stdlib's import-by-name
        helpers (importlib.import_module, pkgutil.resolve_name, pydoc.locate, imp, runpy) and the
        module-level code of blocked modules being executed (a blocked module loaded by hand
        through a loader object imports its own dependencies)."""
        while frame is not None:
            code = frame.f_code
            filename = code.co_filename
            if not (filename.startswith(helpers) or filename.startswith("<frozen importlib")
                    or filename.startswith("<frozen runpy")
                    or (code.co_name == "<module>" and import_blocked(str(frame.f_globals.get("__name__", ""))))):
                return frame
            frame = frame.f_back
        return None

    def check(name: str, frame) -> None:
        if frame is None or not name or not import_blocked(name):
            return
        if _trusted_frame(frame):
            frame = deciding(frame)
            if frame is None or _trusted_frame(frame):
                return
        raise PolicyViolation(_blocked_message(name), name=name)

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0:
            check(name, getframe(1))
            if fromlist and not _trusted_frame(getframe(1)):
                for sub in fromlist:
                    if isinstance(sub, str) and sub != "*" and import_blocked(f"{name}.{sub}"):
                        check(f"{name}.{sub}", getframe(1))
        return real_import(name, globals, locals, fromlist, level)

    def guarded_import_module(name, package=None):
        if not name.startswith("."):
            check(name, getframe(1))
        return real_import_module(name, package)

    builtins.__import__ = guarded_import
    importlib.import_module = guarded_import_module
    sys.meta_path.insert(0, _PolicyFinder(os.path.dirname(importlib.__file__) + "/", check))


class _PolicyFinder:
    """A meta-path finder that refuses blocked modules not yet loaded, whatever route was taken
    (``importlib.util.find_spec``, a restored ``__import__``, loaders): it looks at the first frame
    outside the import machinery.  The ``__import__`` wrapper covers modules already loaded."""

    def __init__(self, importlib_dir: str, check) -> None:
        self.importlib_dir = importlib_dir
        self.check = check

    def find_spec(self, name, path=None, target=None):
        frame = sys._getframe(1)
        while frame is not None:
            filename = frame.f_code.co_filename
            if not (filename.startswith("<frozen importlib") or filename.startswith(self.importlib_dir)):
                break
            frame = frame.f_back
        self.check(name, frame)
        return None


def blocked_loaded_modules() -> list[str]:
    """Loaded modules the policy blocks that can safely be dropped from sys.modules (computed once,
    in the zygote; interpreter built-ins such as sys, posix or _signal cannot be loaded twice)."""
    builtin = set(sys.builtin_module_names)
    return [n for n, m in list(sys.modules.items())
            if n not in builtin and getattr(m, "__file__", None) and import_blocked(n)]


# Modules the process that forks cells uses itself: os.wait4 imports `resource` at every call,
# so a nursery without it in sys.modules would load it again for each cell it reaps.
FORKER_NEEDS = ("resource",)


def complete_image(nursery: bool = False) -> None:
    """In the nursery once its first spare exists (in the zygote of a session jail): load
    LATER_IMPORTS, so later cells do not each import them, and list what the policy blocks among
    the modules that came with them.  A nursery hides those from its own sys.modules at once (but
    FORKER_NEEDS), so its cells inherit them hidden instead of each paying for it."""
    for name in LATER_IMPORTS:
        try:
            _import(name)
        except ImportError:
            pass
    STATE["hide"] = blocked_loaded_modules()
    if nursery:
        STATE["hide_left"] = [name for name in STATE["hide"] if name in FORKER_NEEDS]
        for name in STATE["hide"]:
            if name not in FORKER_NEEDS:
                sys.modules.pop(name, None)
        STATE["hidden_at"] = len(sys.modules)


def hide_jail() -> None:
    """In a process that forks cells, before any exists: jailcell's own modules (every module of this
    directory) leave sys.modules and their directory leaves sys.path, so a program cannot pick them
    up by name (the code that serves a cell keeps its references).  A program can still reach this
    process's memory by other means: nothing there is trusted (the host validates what a cell
    sends; see docs/trust-model.md)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in os.listdir(here):
        if name.endswith(".py"):
            sys.modules.pop(name[:-3], None)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]


def hide_blocked_modules() -> None:
    """Take modules the policy blocks out of sys.modules before user code runs, so `sys.modules[...]`
    does not hand them over.  Libraries keep their own references; a later import by library
    code loads them again through the import guard (which lets library code through).

    A cell whose nursery hid them already, and that has loaded nothing since (sys.modules is as
    long as it was then), has only what the nursery kept to hide: each pop writes to a module and
    its name, memory pages an idle cell would otherwise hold copies of."""
    names = STATE["hide_left"] if len(sys.modules) == STATE.get("hidden_at") else STATE["hide"]
    for name in names:
        sys.modules.pop(name, None)
