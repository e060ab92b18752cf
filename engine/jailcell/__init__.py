"""jailcell: a fast, hardened local sandbox for model-generated Python.

>>> from jailcell import Sandbox
>>> with Sandbox() as sb:
...     print(sb.run("print(sum(range(10)))").stdout)
45
"""

from ._errors import BackendUnavailable, InputError, JailcellError, JailError, PolicyError, SandboxClosed, UsageError
from ._policy import Policy
from ._result import STATUSES, Result
from ._sandbox import AsyncSandbox, AsyncSession, Pool, Sandbox, Session

__version__ = "0.1.0"

__all__ = [
    "Sandbox",
    "AsyncSandbox",
    "Session",
    "AsyncSession",
    "Pool",
    "Result",
    "STATUSES",
    "Policy",
    "JailcellError",
    "PolicyError",
    "InputError",
    "BackendUnavailable",
    "JailError",
    "SandboxClosed",
    "UsageError",
]
