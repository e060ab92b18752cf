"""The typed boundary between the public classes and a jail: what a run asks for (:class:`RunRequest`,
built and checked by the engine) and what the host observed of it (:class:`Outcome`, decided by the
supervisor from its own observations and the cell's validated report).  The engine turns an Outcome
into a :class:`~jailcell.Result`; nothing in between reshapes dicts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from .._result import Status


@dataclass(frozen=True)
class RunRequest:
    """One run, as the engine checked it: what the cell gets (``frame``)."""

    code: str
    timeout: float                      # wall-clock seconds
    cpu_s: float                        # CPU seconds
    files: Mapping[str, str] = field(default_factory=dict)  # input files: name -> base64 (names checked)
    functions: tuple[str, ...] = ()     # host functions the program may call

    def frame(self) -> dict[str, Any]:
        """The one request frame a cell reads (``_injail/_cell.serve``)."""
        frame: dict[str, Any] = {"code": self.code, "timeout": self.timeout, "cpu_s": self.cpu_s,
                                 "files": dict(self.files)}
        if self.functions:
            frame["functions"] = list(self.functions)
        return frame

    def without_files(self) -> RunRequest:
        return dataclasses.replace(self, files={})


@dataclass
class Outcome:
    """How a run ended, as the host decided it (``_supervisor.outcome``)."""

    status: Status = "ok"
    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    error: dict[str, Any] | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float = 0.0
    cpu_s: float = 0.0
    peak_memory_bytes: int = 0
    signal: str | None = None           # the signal that ended the cell, if one did
    exit_code: int | None = None
    input_error: str | None = None      # the request's input files could not be written

    def fail(self, status: Status, kind: str, message: str) -> Outcome:
        self.status, self.error = status, {"type": kind, "message": message, "traceback": ""}
        return self
