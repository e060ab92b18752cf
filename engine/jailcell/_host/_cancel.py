"""Cancelling one run from another thread (the async twins' cancel token)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._jail import Jail


class RunCancelled(Exception):
    """A run cancelled before its program started (it never ran).  Internal: the async twins turn
    a cancelled run into CancelledError."""


class Cancel:
    """Cancels one run from another thread: before it starts (then it never starts) or while it
    runs (its cell is killed, as by an interrupt).  Only the run it was given to is touched."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jail: Jail | None = None
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._jail is not None:
                self._jail.interrupt()

    def enter(self, jail: "Jail") -> bool:
        """The run is about to start on ``jail``: False if it was cancelled already."""
        with self._lock:
            if self.cancelled:
                return False
            self._jail = jail
            return True

    def leave(self) -> None:
        with self._lock:
            self._jail = None
