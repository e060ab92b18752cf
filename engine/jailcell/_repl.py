"""``jailcell repl``: an interactive Python session whose code runs in a jail.

Each complete input (a line, or a block ended by an empty line, as in Python's own prompt) is one run
of a :class:`~jailcell.Session`: variables, imports and files persist between inputs.  Ctrl-C during
a run kills that run and keeps the state from before it; Ctrl-C at the prompt drops the input being
typed; Ctrl-D (or ``exit()``) leaves.  On a terminal, input has line editing and a history kept in
``~/.jailcell_history`` (``--history FILE``; ``--history ''`` keeps none).
"""

from __future__ import annotations

import codeop
import os
import sys
from typing import TextIO

from ._policy import Policy
from ._result import Result
from ._sandbox import Sandbox, Session

PS1, PS2 = ">>> ", "... "
DEFAULT_HISTORY = "~/.jailcell_history"
HISTORY_LENGTH = 1000


def _setup_history(path: str | None) -> None:
    """Line editing and a persistent history, on a terminal only (``readline`` may be missing)."""
    try:
        import atexit
        import readline
    except ImportError:
        return
    if not path:
        return
    path = os.path.expanduser(path)
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(HISTORY_LENGTH)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


def _complete(source: str) -> bool:
    """Whether ``source`` is a complete input (Python's own rule: a block ends with an empty line;
    a syntax error is complete too -- the run reports it)."""
    try:
        return codeop.compile_command(source, "<cell>", "exec") is not None
    except (SyntaxError, ValueError, OverflowError):
        return True


def _show(result: Result, out: TextIO, err: TextIO) -> None:
    if result.stdout:
        out.write(result.stdout if result.stdout.endswith("\n") else result.stdout + "\n")
    if result.stderr:
        err.write(result.stderr if result.stderr.endswith("\n") else result.stderr + "\n")
    if result.result is not None:
        out.write(result.result + "\n")
    for item in result.outputs:
        out.write(f"[{item['mime_type']} output: {len(item['data']) * 3 // 4} bytes]\n")
    if not result.ok:
        error = result.error or {}
        text = error.get("traceback") or f"{error.get('type', result.status)}: {error.get('message', '')}\n"
        err.write(text if text.endswith("\n") else text + "\n")
    out.flush()
    err.flush()


def _read(prompt: str, interactive: bool) -> str:
    if interactive:
        return input(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def run_repl(policy: Policy, *, backend: str | None = None, history: str | None = DEFAULT_HISTORY) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        _setup_history(history)
    with Sandbox(policy, backend=backend) as sandbox, sandbox.session() as session:
        if interactive:
            iso = session.isolation
            sys.stderr.write(f"jailcell repl: policy {policy.name!r}, backend {iso.get('backend')}, "
                             f"{policy.limits.wall_s:g} s per input. Ctrl-C stops a run, Ctrl-D leaves.\n")
        return _loop(session, interactive)


def _loop(session: Session, interactive: bool) -> int:
    lines: list[str] = []
    while True:
        try:
            line = _read(PS2 if lines else PS1, interactive)
        except EOFError:
            if lines:  # the last block, ended by end of input
                _run_one(session, "\n".join(lines))
            if interactive:
                sys.stderr.write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt: drop what was typed
            sys.stderr.write("\nKeyboardInterrupt\n")
            lines = []
            continue
        lines.append(line)
        source = "\n".join(lines)
        if not source.strip():
            lines = []
            continue
        if not _complete(source + "\n"):
            continue
        lines = []
        if source.strip() in ("exit()", "quit()", "exit", "quit"):
            return 0
        _run_one(session, source)


def _run_one(session: Session, source: str) -> None:
    try:
        result = session.run(source)
    except KeyboardInterrupt:  # the cell was killed on the way out; the session's state is as before
        sys.stderr.write("KeyboardInterrupt (the run was stopped; the state from before it is kept)\n")
        return
    _show(result, sys.stdout, sys.stderr)
