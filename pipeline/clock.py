"""The time seen by the runner and the limiter, injectable.

They read the time and wait only through a ``Clock``: ``monotonic()`` for intervals, ``time()``
for the wall clock the job database schedules retries by, ``sleep()``, and ``wait(waitable,
seconds)`` for a wait that an ``Event`` being set, or a ``Condition`` being notified, ends early.
``SYSTEM`` is the real clock, the default everywhere; tests pass a fake one
(``tests/fakeclock.py``) that moves only when they say so, instead of sleeping or patching.
"""

from __future__ import annotations

import threading
import time


class Clock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait(self, waitable: threading.Event | threading.Condition, seconds: float | None) -> bool:
        """Wait at most ``seconds`` on an event (True once it is set) or on a condition whose lock
        the caller holds (True when notified, False on the timeout)."""
        return waitable.wait(seconds)


SYSTEM = Clock()
