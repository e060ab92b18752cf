"""The outcome of one execution.  Errors in user code are values here, never exceptions."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

__all__ = ["Result", "STATUSES", "Status"]

Status = Literal["ok", "error", "timeout", "memory_limit", "output_limit", "killed", "policy_violation"]
STATUSES: tuple[str, ...] = get_args(Status)


@dataclass
class Result:
    """What happened when a program ran.

    ``status`` is one of :data:`STATUSES`:

    - ``ok``: the program finished without an uncaught exception;
    - ``error``: an uncaught Python exception (see ``error``) or a non-zero ``sys.exit``;
    - ``timeout``: the wall-clock or CPU limit was reached and the program was killed;
    - ``memory_limit``: the memory limit was reached (killed by the cgroup, or ``MemoryError``);
    - ``output_limit``: stdout+stderr exceeded the limit; the head is kept, the program killed;
    - ``killed``: the program died from a signal (segfault, abort, ``kill -9``);
    - ``policy_violation``: the policy refused the code (a blocked import, restricted syntax).
    """

    status: Status
    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    error: dict[str, str] | None = None
    outputs: list[dict[str, str]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float = 0.0
    cpu_s: float = 0.0
    peak_memory_bytes: int = 0
    isolation: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def __repr__(self) -> str:  # short: stdout may be megabytes
        bits = [f"status={self.status!r}"]
        if self.stdout:
            bits.append(f"stdout={_clip(self.stdout)!r}")
        if self.result is not None:
            bits.append(f"result={_clip(self.result)!r}")
        if self.error:
            bits.append(f"error={self.error.get('type')}: {_clip(self.error.get('message', ''))}")
        bits.append(f"duration_s={self.duration_s:.4f}")
        return f"Result({', '.join(bits)})"


def _clip(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
