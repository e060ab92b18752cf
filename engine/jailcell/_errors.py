"""jailcell's exception hierarchy.

Errors in the *user's* code are never exceptions: they come back as a
:class:`~jailcell.Result` with a non-"ok" status.  Exceptions are reserved for
problems of jailcell itself, and each message says how to fix it::

    JailcellError
    ├── PolicyError          a policy name, file, key or value is wrong
    ├── InputError           the code, a file name or a size is not acceptable
    ├── BackendUnavailable   the requested isolation cannot be set up here
    ├── JailError            a jail broke in a way jailcell could not recover from
    ├── SandboxClosed        the Sandbox / Session / Pool was already closed
    ├── UsageError           a call jailcell cannot serve (run() from inside one of its own runs)
    └── MissingExtra         an optional part needs an extra that is not installed (also an ImportError)
"""

from __future__ import annotations


def warn(message: str, *args: object) -> None:
    """A warning on the "jailcell" logger.  logging is imported only when there is one to give, not by
    every `jailcell run` (~3 ms at each call)."""
    import logging

    logging.getLogger("jailcell").warning(message, *args)


class JailcellError(Exception):
    """Base class of every error raised by jailcell itself."""


class PolicyError(JailcellError, ValueError):
    """A policy name, file, key or value is invalid."""


class InputError(JailcellError, ValueError):
    """Code, file names or sizes passed to jailcell are not acceptable."""


class BackendUnavailable(JailcellError, RuntimeError):
    """The requested backend (isolation mechanism) cannot run on this machine."""


class JailError(JailcellError, RuntimeError):
    """A jail failed to start or broke and could not be replaced."""


class SandboxClosed(JailcellError, RuntimeError):
    """The object was used after ``close()``."""


class UsageError(JailcellError, RuntimeError):
    """jailcell was called in a way it cannot serve, e.g. ``run()`` on a Sandbox from inside one
    of its own host functions (which run inside that Sandbox's run)."""


class MissingExtra(JailcellError, ImportError):
    """An optional part of jailcell (the gateway, MCP, an agent adapter, the benchmark) needs an extra
    that is not installed; the message says which (``pip install "jailcell[serve]"``)."""

    def __init__(self, what: str, extra: str, missing: str | None = None) -> None:
        self.extra = extra
        detail = f" ({missing} is missing)" if missing else ""
        super().__init__(f'{what} needs the {extra} extra{detail}: pip install "jailcell[{extra}]"')
