"""Host functions: plain Python callables on the host that sandboxed code calls like local functions.

Inside the cell, ``search("x")`` sends ``{"call": "search", "args": ["x"], "kwargs": {}}`` up the
run's result channel; the host's supervisor (``_host/_supervisor.py``) checks the name, shapes, size
and count, then looks the name up in the mapping it was given and calls that function -- nothing
else the cell sends is ever evaluated.  The value (JSON) or the exception (type name and message)
goes back down, and the time spent counts against the run's wall-clock limit (a run whose limit
passed while a host function ran is stopped when the function returns).
"""

from __future__ import annotations

import keyword
from typing import Any, Callable, Mapping

from ._errors import InputError
from ._injail import _protocol as proto

MAX_VALUE_BYTES = 8 * 1024 * 1024 - 4096  # what fits in a call-result frame the cell accepts


class HostFunctions:
    """The host functions of a sandbox.  The mapping is kept, not copied, and read at every run,
    so functions added to it later (an agent's tools) are seen by the next run."""

    def __init__(self, functions: Mapping[str, Callable[..., Any]] | None) -> None:
        if functions is None:
            functions = {}
        if not isinstance(functions, Mapping):
            raise InputError("functions must be a mapping of {name: callable}")
        self.functions = functions
        self._check()

    def _check(self) -> None:
        for name, fn in self.functions.items():
            if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
                raise InputError(f"host function name {name!r} is not a Python identifier")
            if name.startswith("__"):
                raise InputError(f"host function name {name!r} may not start with '__'")
            if not callable(fn):
                raise InputError(f"host function {name!r} is not callable (got {type(fn).__name__})")

    @property
    def names(self) -> list[str]:
        self._check()
        return sorted(self.functions)

    def __bool__(self) -> bool:
        return bool(self.functions)

    def __call__(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Answer one call from a cell: ``{"value": ...}`` or ``{"error": {"type", "message"}}``."""
        name, args, kwargs = msg.get("name"), msg.get("args"), msg.get("kwargs")
        fn = self.functions.get(name) if isinstance(name, str) else None
        if fn is None:
            return _error("NameError", f"host function {name!r} is not defined; defined: {', '.join(self.names)}")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            return _error("TypeError", f"{name}(): malformed arguments")
        try:
            value = _resolve(fn(*args, **kwargs))
        except Exception as exc:  # the function's error is the program's to handle
            message = str(exc.args[0]) if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
            return _error(type(exc).__name__, message)
        try:
            size = len(proto.encode(value)) - proto.HEADER.size  # as the answer's frame will carry it
        except (TypeError, ValueError) as exc:
            return _error("TypeError", f"host function {name}() returned a {type(value).__name__}, which is not a "
                                       f"JSON value ({exc})")
        if size > MAX_VALUE_BYTES:
            return _error("ValueError", f"host function {name}() returned {size} bytes of JSON; the limit is "
                                        f"{MAX_VALUE_BYTES}")
        return {"value": value}


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


def _resolve(value: Any) -> Any:
    """Await what an async host function returned (the host thread runs no loop of ours)."""
    import inspect  # here, not at the top: a program that calls no host function never needs these

    if not inspect.isawaitable(value):
        return value
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    async def wait() -> Any:
        return await value

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    with ThreadPoolExecutor(max_workers=1) as ex:  # called from inside a running loop
        return ex.submit(asyncio.run, wait()).result()
