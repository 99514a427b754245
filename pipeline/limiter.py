"""A per-provider limiter shared by every worker thread of a run.

It bounds how many requests run at once and how many start per minute, and it is the one place
where a 429 is waited out: the request that got it is retried after the cool-down, and every
other thread waits for the same cool-down instead of adding to the storm.

Concurrency adapts (AIMD): a 429 lowers the allowed concurrency to just below what was in
flight; successes raise it again by one each (slow start) up to what was configured. When the
provider says the 429 is about *concurrent* requests (ElevenLabs ``too_many_concurrent_requests``),
the level that triggered it is remembered as a ceiling, and the limiter probes above it only after
``PROBE_INTERVAL`` seconds without a 429, so 32 workers on a 5-request plan settle at 5.

Rate-limit waits do not spend job attempts; they are bounded by ``patience`` seconds per call,
after which (or when the server asks for more than ``MAX_INLINE_WAIT_SECONDS``) the error is
raised so the runner requeues the job for later instead of holding a thread.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from pipeline import errors

UNLIMITED = 1_000_000
PROBE_INTERVAL = 30.0
DEFAULT_PATIENCE = 900.0


class Stopping(Exception):
    """The run is shutting down; the caller releases its job."""


@dataclass
class LimiterStats:
    requests: int = 0
    rate_limited: int = 0
    waits: int = 0
    wait_seconds: float = 0.0


class ProviderLimiter:
    def __init__(self, name: str, *, max_concurrency: int | None = None, rpm: float | None = None,
                 patience: float = DEFAULT_PATIENCE):
        self.name = name
        self.max_concurrency = max_concurrency or UNLIMITED
        self.limit = self.max_concurrency
        self.ceiling = self.max_concurrency
        self.rpm = rpm
        self.patience = patience
        self.stats = LimiterStats()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._cooldown_until = 0.0
        self._last_429 = 0.0
        self._consecutive_429 = 0
        self._tokens = self._burst()
        self._refilled = time.monotonic()

    def _burst(self) -> float:
        return max(1.0, (self.rpm or 0) / 60.0)

    # -- the public entry point -----------------------------------------------------------
    def call(self, fn, stop: threading.Event | None = None):
        """Run ``fn()`` (one request) under the limits; wait out 429s; return its result."""
        deadline = time.monotonic() + self.patience
        while True:
            self._acquire(stop, deadline)
            try:
                result = fn()
            except errors.RateLimitError as exc:
                self._release()
                delay = self._on_rate_limited(exc)
                if delay > errors.MAX_INLINE_WAIT_SECONDS or time.monotonic() + delay > deadline:
                    raise
                continue
            except BaseException:
                self._release()
                raise
            self._release(success=True)
            return result

    # -- internals ------------------------------------------------------------------------
    def _acquire(self, stop, deadline) -> None:
        started = time.monotonic()
        waited = False
        with self._cond:
            while True:
                if stop is not None and stop.is_set():
                    raise Stopping(f"{self.name}: run is stopping")
                now = time.monotonic()
                wait = self._cooldown_until - now
                if wait > errors.MAX_INLINE_WAIT_SECONDS or (wait > 0 and now + wait > deadline):
                    raise errors.RateLimitError(
                        f"{self.name}: provider asked us to wait {wait:.0f} s", retry_after=wait)
                if wait <= 0 and self._in_flight < self.limit:
                    wait = self._take_token(now)
                    if wait <= 0:
                        break
                waited = True
                self._cond.wait(timeout=min(max(wait, 0.01), 0.5) if wait > 0 else 0.5)
            self._in_flight += 1
            self.stats.requests += 1
            if waited:
                self.stats.waits += 1
                self.stats.wait_seconds += time.monotonic() - started

    def _take_token(self, now: float) -> float:
        """0 when a request may start now (a token is taken), else seconds until one is due."""
        if not self.rpm:
            return 0.0
        self._tokens = min(self._burst(), self._tokens + (now - self._refilled) * self.rpm / 60.0)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) * 60.0 / self.rpm

    def _release(self, success: bool = False) -> None:
        with self._cond:
            self._in_flight -= 1
            if success:
                self._consecutive_429 = 0
                now = time.monotonic()
                if self.limit < self.ceiling:
                    self.limit += 1
                elif self.limit < self.max_concurrency and now - self._last_429 > PROBE_INTERVAL:
                    self.limit += 1
                    self.ceiling = self.limit
                    self._last_429 = now  # next probe only after another quiet interval
            self._cond.notify_all()

    def _on_rate_limited(self, exc: errors.RateLimitError) -> float:
        with self._cond:
            now = time.monotonic()
            self.stats.rate_limited += 1
            self._consecutive_429 += 1
            self._last_429 = now
            # ``_in_flight`` no longer counts this request: it is what the provider did accept.
            self.limit = max(1, min(self.limit, self._in_flight))
            if exc.concurrency:
                self.ceiling = self.limit
            delay = errors.retry_delay(self._consecutive_429, exc.retry_after, base=0.5, cap=30.0)
            self._cooldown_until = max(self._cooldown_until, now + delay)
            self._cond.notify_all()
            return max(0.0, self._cooldown_until - now)

    @property
    def in_flight(self) -> int:
        return self._in_flight


_registry: dict[str, ProviderLimiter] = {}
_registry_lock = threading.Lock()


def limiter_for(provider: str, env=None) -> ProviderLimiter:
    """The process-wide limiter of ``provider``, configured from the environment:
    ``VERBATIM_<PROVIDER>_MAX_CONCURRENCY`` and ``VERBATIM_<PROVIDER>_RPM``."""
    env = os.environ if env is None else env
    with _registry_lock:
        if provider not in _registry:
            prefix = f"VERBATIM_{provider.upper()}_"
            concurrency = env.get(prefix + "MAX_CONCURRENCY")
            rpm = env.get(prefix + "RPM")
            _registry[provider] = ProviderLimiter(
                provider, max_concurrency=int(concurrency) if concurrency else None,
                rpm=float(rpm) if rpm else None,
                patience=float(env.get("VERBATIM_RATE_LIMIT_PATIENCE", DEFAULT_PATIENCE)))
        return _registry[provider]
