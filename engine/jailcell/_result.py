"""The outcome of one execution.  Errors in user code are values here, never exceptions."""

from __future__ import annotations

from typing import Any, Literal, get_args

from ._values import Value

__all__ = ["Result", "STATUSES", "Status"]

Status = Literal["ok", "error", "timeout", "memory_limit", "output_limit", "killed", "policy_violation"]
STATUSES: tuple[str, ...] = get_args(Status)


class Result(Value):
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

    __slots__ = ("status", "stdout", "stderr", "result", "error", "outputs", "files", "duration_s", "cpu_s",
                 "peak_memory_bytes", "isolation")

    def __init__(self, status: Status, stdout: str = "", stderr: str = "", result: str | None = None,
                 error: dict[str, str] | None = None, outputs: list[dict[str, str]] | None = None,
                 files: list[dict[str, Any]] | None = None, duration_s: float = 0.0, cpu_s: float = 0.0,
                 peak_memory_bytes: int = 0, isolation: dict[str, Any] | None = None) -> None:
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        self.result = result
        self.error = error
        self.outputs = outputs if outputs is not None else []
        self.files = files if files is not None else []
        self.duration_s = duration_s
        self.cpu_s = cpu_s
        self.peak_memory_bytes = peak_memory_bytes
        self.isolation = isolation if isolation is not None else {}

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every field, its lists and dicts copied."""
        return {name: _copied(value) for name, value in self.as_dict().items()}

    def to_json(self) -> str:
        import json  # at first use: `jailcell run` without --json never needs it

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


def _copied(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    return value


def _clip(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
