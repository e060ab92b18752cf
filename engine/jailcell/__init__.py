"""jailcell: a fast, hardened local sandbox for model-generated Python.

>>> from jailcell import Sandbox
>>> with Sandbox() as sb:
...     print(sb.run("print(sum(range(10)))").stdout)
45
"""

from ._async import AsyncSandbox, AsyncSession
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
from ._policy import Imports, Limits, Policy
from ._pool import Pool
from ._result import STATUSES, Result, Status
from ._sandbox import Sandbox, Session

try:  # one version source: the distribution's metadata (pyproject.toml)
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("jailcell")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

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
]
