"""Background threads that start at first use -- and again in a forked child, where threads
do not survive ``fork()`` (an embedding application may fork after using jailcell)."""

from __future__ import annotations

import os
import threading
from typing import Callable


class LazyThread:
    """A daemon thread started by :meth:`ensure`.  In a forked child it is gone: ``after_fork``
    runs there first (while the child is still single-threaded), so that the owner can make new
    locks -- the parent's may have been held by a thread that does not exist in the child -- and
    drop what belongs to the parent."""

    def __init__(self, name: str, target: Callable[[], None], after_fork: Callable[[], None]) -> None:
        self._name, self._target, self._after_fork = name, target, after_fork
        self._thread: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._thread = None
        self._after_fork()

    def ensure(self) -> None:
        """Start the thread unless it runs already (call it under the owner's lock)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._target, name=self._name, daemon=True)
            self._thread.start()
