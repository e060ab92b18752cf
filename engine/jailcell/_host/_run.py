"""The typed boundary between the public classes and a jail: what a run asks for (:class:`RunRequest`,
built and checked by the engine) and what the host observed of it (:class:`Outcome`, decided by the
supervisor from its own observations and the cell's validated report).  The engine turns an Outcome
into a :class:`~jailcell.Result`; nothing in between reshapes dicts."""

from __future__ import annotations

from typing import Any, Mapping

from .._result import Result, Status
from .._values import Frozen


class RunRequest(Frozen):
    """One run, as the engine checked it: what the cell gets (``frame``)."""

    __slots__ = ("code", "timeout", "cpu_s", "files", "functions")
    code: str
    timeout: float                      # wall-clock seconds
    cpu_s: float                        # CPU seconds
    files: Mapping[str, str]            # input files: name -> base64 (names checked)
    functions: tuple[str, ...]          # host functions the program may call

    def __init__(self, code: str, timeout: float, cpu_s: float, files: Mapping[str, str] | None = None,
                 functions: tuple[str, ...] = ()) -> None:
        self._set(code=code, timeout=timeout, cpu_s=cpu_s, files=files if files is not None else {},
                  functions=functions)

    def frame(self) -> dict[str, Any]:
        """The one request frame a cell reads (``_injail/_cell.serve``)."""
        frame: dict[str, Any] = {"code": self.code, "timeout": self.timeout, "cpu_s": self.cpu_s,
                                 "files": dict(self.files)}
        if self.functions:
            frame["functions"] = list(self.functions)
        return frame

    def without_files(self) -> RunRequest:
        return self.replace(files={})


class Outcome(Result):
    """How a run ended, as the host decided it (``_supervisor.outcome``): a Result's fields (the engine
    then adds what applied, ``isolation``, and what the host's cgroups say of a SIGKILL) and how the
    cell ended."""

    __slots__ = ("signal", "exit_code", "input_error")

    def __init__(self, status: Status = "ok", *, signal: str | None = None, exit_code: int | None = None,
                 input_error: str | None = None, **fields: Any) -> None:
        super().__init__(status, **fields)
        self.signal = signal                # the signal that ended the cell, if one did
        self.exit_code = exit_code
        self.input_error = input_error      # the request's input files could not be written

    def fail(self, status: Status, kind: str, message: str) -> Outcome:
        self.status, self.error = status, {"type": kind, "message": message, "traceback": ""}
        return self
