"""Turning a Result into what a model should read."""

from __future__ import annotations

from .._result import Result

__all__ = ["format_result"]


def _clip(text: str, budget: int, label: str) -> str:
    if len(text) <= budget:
        return text
    head = text[: budget * 2 // 3]
    tail = text[-(budget - len(head)) :] if budget > len(head) else ""
    return f"{head}\n[... {label} truncated: {len(text) - len(head) - len(tail)} of {len(text)} characters omitted ...]\n{tail}"


def format_result(result: Result, max_chars: int = 8000) -> str:
    """A compact, model-readable account of a run: status, output, value, error, images.

    Long outputs keep their head and tail with a truncation notice, within ``max_chars``.
    """
    parts = []
    if result.status != "ok":
        message = (result.error or {}).get("message", "")
        parts.append(f"[status: {result.status}{': ' + message if message else ''}]")
    budget = max(200, max_chars - 400)
    streams = [(name, text) for name, text in (("stdout", result.stdout), ("stderr", result.stderr)) if text]
    for name, text in streams:
        parts.append(f"[{name}]\n{_clip(text.rstrip(), budget // max(1, len(streams)), name)}")
    if result.result is not None:
        parts.append(f"[result]\n{_clip(result.result, 2000, 'result')}")
    if result.error and result.error.get("traceback"):
        parts.append(f"[traceback]\n{_clip(result.error['traceback'].rstrip(), 3000, 'traceback')}")
    for i, out in enumerate(result.outputs, 1):
        parts.append(f"[image {i}: {out.get('mime_type')}, returned separately]")
    if result.files:
        parts.append("[files written: " + ", ".join(f"{f['name']} ({f['size']} bytes)" for f in result.files[:20]) + "]")
    if not parts:
        parts.append("[no output]")
    return _clip("\n".join(parts), max_chars, "output")
