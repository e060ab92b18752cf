"""jailcell: a fast, hardened local sandbox for model-generated Python.

>>> from jailcell import Sandbox
>>> with Sandbox() as sb:
...     print(sb.run("print(sum(range(10)))").stdout)
45
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:  # the names, for readers and type checkers; at run time each loads on first use
    from typing import Any

    from ._async import AsyncSandbox, AsyncSession
    from ._audit import AuditLog, audit_context
    from ._errors import (
        BackendUnavailable,
        InputError,
        JailcellError,
        JailError,
        MissingExtra,
        PolicyError,
        SandboxClosed,
        UsageError,
    )
    from ._metrics import enable_metrics
    from ._policy import Imports, Limits, Policy
    from ._pool import Pool
    from ._result import STATUSES, Result, Status
    from ._sandbox import Sandbox, Session

# Where each public name lives.  ``import jailcell`` loads none of them: a command that needs only
# a Result (the CLI's client of a daemon) must not pay for asyncio, threads and the engine.
_HOMES = {
    "AsyncSandbox": "_async", "AsyncSession": "_async", "AuditLog": "_audit", "audit_context": "_audit",
    "enable_metrics": "_metrics",
    "BackendUnavailable": "_errors", "InputError": "_errors", "JailcellError": "_errors", "JailError": "_errors",
    "MissingExtra": "_errors", "PolicyError": "_errors", "SandboxClosed": "_errors", "UsageError": "_errors",
    "Imports": "_policy", "Limits": "_policy", "Policy": "_policy",
    "Pool": "_pool",
    "STATUSES": "_result", "Result": "_result", "Status": "_result",
    "Sandbox": "_sandbox", "Session": "_sandbox",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name in _HOMES:
        value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # the next lookup is a plain one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES, "__version__"})


def _version() -> str:
    """One version source: the distribution's metadata (pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jailcell")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


__all__ = [
    "Sandbox",
    "AsyncSandbox",
    "Session",
    "AsyncSession",
    "Pool",
    "Result",
    "STATUSES",
    "Policy",
    "Limits",
    "Imports",
    "Status",
    "JailcellError",
    "PolicyError",
    "InputError",
    "BackendUnavailable",
    "JailError",
    "SandboxClosed",
    "UsageError",
    "MissingExtra",
    "AuditLog",
    "audit_context",
    "enable_metrics",
]
