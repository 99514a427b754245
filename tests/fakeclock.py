"""A fake ``pipeline.clock.Clock`` for the runner and the limiter: time moves only when a test says so.

Two ways to move it:

- ``FakeClock()``: still until the test calls ``advance(seconds)``. A wait that is not ended by
  its event (or its condition being notified) lasts until the clock has been advanced past its
  end, however long that takes: a heartbeat on this clock never beats unless the test moves it.
- ``FakeClock(autojump=True)``: every sleep or timed wait moves the clock at once to its own end
  (never back), so code that waits runs straight through, and the test reads from the clock when
  each thing happened instead of measuring how long it took.

Waits still hand the condition's lock (or the CPU) to other threads for a moment, so threaded
code on an autojump clock makes progress the way it does on the real one.
"""

from __future__ import annotations

import threading

# How long a waiting thread gives other threads (real seconds) before it looks at the clock again.
_REAL_SLICE = 0.002


class FakeClock:
    def __init__(self, start: float = 1000.0, *, wall: float = 1_700_000_000.0, autojump: bool = False):
        self._now = start
        self._wall_offset = wall - start
        self.autojump = autojump
        self._lock = threading.Lock()
        self.waits: list[float] = []   # every sleep or timed wait asked for, in order (seconds)

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def time(self) -> float:
        with self._lock:
            return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        self.wait(threading.Event(), seconds)

    def wait(self, waitable, seconds: float | None) -> bool:
        """Like ``Clock.wait``; the wait's end is on this clock. Other threads get a moment (real)
        before the clock jumps, so they reach their own waits first, as they would in real time."""
        with self._lock:
            end = None if seconds is None else self._now + seconds
            if seconds is not None:
                self.waits.append(seconds)
        while True:
            if waitable.wait(_REAL_SLICE):
                return True  # the event is set, or the condition was notified: the caller looks again
            with self._lock:
                if end is not None and self.autojump:
                    self._now = max(self._now, end)
                if end is not None and self._now >= end:
                    return isinstance(waitable, threading.Event) and waitable.is_set()
