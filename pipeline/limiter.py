"""A per-provider limiter shared by every worker thread of a run.

It bounds how many requests run at once and how many start per second, and it is the one place
where a 429 is waited out: the request that got it is retried after the cool-down, and every
other thread waits for the same cool-down instead of adding to the storm.

Concurrency adapts (AIMD): a 429 lowers the allowed concurrency to just below what was in
flight; successes raise it again by one each (slow start) up to what was configured. When the
provider says the 429 is about *concurrent* requests (ElevenLabs ``too_many_concurrent_requests``),
the level that triggered it is remembered as a ceiling, and the limiter probes above it only after
``PROBE_INTERVAL`` seconds without a 429, so 32 workers on a 5-request plan settle at 5. Such a
429 is no request to slow down in time: the refused request waits for a free slot under the
ceiling (and for its own ``Retry-After``, if one came), and nobody else is held up. A provider
may free a slot a moment after it answers (its handler still finishes), so once a ceiling is
learned a slot freed by an answer is handed on only after a grace of ``SLOT_GRACE_SHARE`` of that
request's duration (at most ``SLOT_GRACE_MAX``): a few milliseconds for a short request, nothing
that matters for a long one. A refusal that still comes at the ceiling, not above it, doubles
that grace and leaves the ceiling where it is.

The request rate is learned too. After a 429 about the *rate*, once its cool-down is over (when
the answers of the requests that raced it are in), the limiter counts the requests the provider
accepted before it, and from then on starts requests no faster than ``RATE_MARGIN`` of that rate,
evenly spaced; after each ``RATE_PROBE_SECONDS`` without such a 429 it raises the pace by
``RATE_PROBE_STEP``, so it follows a provider whose limit grows. A configured
``VERBATIM_<PROVIDER>_RPM`` is a ceiling on top. The reason: providers answer a 100 ms wait with
a whole-second ``Retry-After``, which every thread waits out, so each 429 costs a second of work;
paced, they stay rare.

Providers that say their budget in response headers (OpenAI's ``x-ratelimit-limit-requests``,
``-remaining-requests``, ``-reset-requests``) report it after every answer (``report_rate_limit``,
a provider-neutral ``RateLimitInfo``), and then the budget paces the starts: of each report,
``remaining`` may start before its reset and ``limit`` after it, less the requests the provider
may have counted after the report's own (those started after it, and those started before it and
still out). Answers overtake each other on the way out and back, so the newest request's report is
not always the latest word: every report stands, and the tightest binds, until a request started
after it came back has reported too (or its reset is past and a newer report resets no earlier).
That holds for a fixed window (the count is back to ``limit`` at the reset) and for a token bucket
(full at the reset, topped up before it: the next answers say so), so ``remaining`` is never
driven to 0 before the reset. Such a provider's first request goes
alone (its budget is unknown, and a first wave of every worker at once is exactly what would be
refused); its answer's report then paces the rest, with every worker free to send.

Rate-limit waits do not spend job attempts; they are bounded by ``patience`` seconds per call,
after which (or when the server asks for more than ``MAX_INLINE_WAIT_SECONDS``) the error is
raised so the runner requeues the job for later instead of holding a thread. They also count
toward ``patience`` across calls: once the provider has answered nothing but 429 for longer than
that (or asks to wait beyond it), the run stops like on an account error, with one message,
instead of asking for ever.

Every reading of the time and every wait goes through the limiter's ``clock`` (``pipeline.clock``;
the real one unless a test passes a fake).
"""

from __future__ import annotations

import bisect
import contextvars
import random
import re
import threading
from collections import deque
from dataclasses import dataclass

from pipeline import errors
from pipeline.clock import SYSTEM, Clock

UNLIMITED = 1_000_000
PROBE_INTERVAL = 30.0
DEFAULT_PATIENCE = 900.0
# Learning a rate limit: the accepted requests of at most this many seconds before a 429 count ...
RATE_WINDOW = 5.0
# ... a window that starts fresh (the run's start, a cool-down's end) found the provider's bucket
# full, holding about this many seconds of requests, which the count must not take for rate ...
RATE_BURST_SECONDS = 1.0
# ... and requests then start at this share of the measured rate, raised by this step after
# every this many seconds without a rate 429.
RATE_MARGIN = 0.95
RATE_PROBE_STEP = 1.05
RATE_PROBE_SECONDS = 5.0
# A request refused for concurrency waits for a free slot, and also up to this long (jittered,
# doubling per refusal of the same request) so that a provider freeing slots late is not hammered.
CONCURRENCY_RETRY_BASE = 0.05
CONCURRENCY_RETRY_CAP = 2.0
# How long a provider may still count a request it has answered: this share of the request's
# duration, at most this many seconds; doubled (up to SLOT_GRACE_SCALE_MAX times) by each refusal
# that shows the provider freeing slots later still (see the module docstring).
SLOT_GRACE_SHARE = 0.05
SLOT_GRACE_MAX = 1.0
SLOT_GRACE_SCALE_MAX = 16.0


# A reported reset is trusted this much later than it says: the report's clock starts when its request
# was sent, a little before the provider counted it. A 429 all the same doubles it, up to the cap.
RESET_GUARD = 0.05
RESET_GUARD_CAP = 0.5


@dataclass(frozen=True)
class RateLimitInfo:
    """A provider's word on its request budget, from one answer: at most ``limit`` per window,
    ``remaining`` of them left, all back in ``reset_seconds``."""

    limit: int
    remaining: int
    reset_seconds: float

    @classmethod
    def from_headers(cls, headers) -> "RateLimitInfo | None":
        """OpenAI's headers (https://platform.openai.com/docs/guides/rate-limits, "Rate limits in
        headers": ``x-ratelimit-limit-requests: 60``, ``-remaining-requests: 59``,
        ``-reset-requests: 1s``); None when an answer carries none (DeepL, ElevenLabs, local servers)."""
        if not headers:
            return None
        try:
            limit = int(headers.get("x-ratelimit-limit-requests"))
            remaining = int(headers.get("x-ratelimit-remaining-requests"))
        except (TypeError, ValueError):
            return None
        reset = parse_duration(headers.get("x-ratelimit-reset-requests"))
        if reset is None or limit <= 0:
            return None
        return cls(limit, max(0, remaining), reset)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text) -> float | None:
    """Seconds from OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``, ``1h2m3.5s``."""
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(number) * scale[unit] for number, unit in parts)


@dataclass(frozen=True)
class _Start:
    at: float           # monotonic
    serial: int         # starts of this limiter before it: orders starts when the clock cannot


@dataclass(frozen=True)
class _Report:
    """A provider's report (``RateLimitInfo``) as a bound on the starts from now on."""
    serial: int         # of the request whose answer said it
    seen_after: int     # starts before the report came: a request with a later serial started after it
    remaining: int
    reset_at: float     # monotonic
    limit: int


# The call in progress on this thread: (limiter, _Start), for report_rate_limit.
_current_call: contextvars.ContextVar = contextvars.ContextVar("verbatim_limiter_call", default=None)
# Providers that send rate-limit headers (they say so when built), by limiter name.
_header_providers: set[str] = set()


def expect_rate_limit_headers(provider: str) -> None:
    """A provider that reports its budget in headers says so once, when it is built: its limiter
    then starts in slow start."""
    _header_providers.add(provider)
    with _registry_lock:
        limiter = _registry.get(provider)
    if limiter is not None:
        limiter.expect_headers()


def report_rate_limit(info: RateLimitInfo | None) -> None:
    """Called by a provider right after an answer (success or error) with what its headers said;
    reaches the limiter running this request on this thread, if any."""
    current = _current_call.get()
    if current is None or info is None:
        return
    limiter, start = current
    limiter.observe(info, start)


class Stopping(Exception):
    """The run is shutting down; the caller releases its job."""


@dataclass
class LimiterStats:
    requests: int = 0
    rate_limited: int = 0
    waits: int = 0
    wait_seconds: float = 0.0
    learned_rps: float | None = None   # the request rate learned from 429s, if any


class ProviderLimiter:
    def __init__(self, name: str, *, max_concurrency: int | None = None, rpm: float | None = None,
                 patience: float = DEFAULT_PATIENCE, clock: Clock = SYSTEM):
        self.name = name
        self.clock = clock  # every reading of the time and every wait goes through it
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
        self._limited_since: float | None = None   # first 429 since the last success
        # rate learning
        self._learned_rps: float | None = None
        self._first_start: float | None = None
        self._running: list[_Start] = []           # the requests in flight, by serial
        self._accepted: deque[float] = deque()     # start times of recent successful requests
        self._answered: deque[tuple[float, float]] = deque()  # (end, grace) of recent successes
        self._cap_learned = False                  # a concurrency 429 set the ceiling
        self._grace_scale = 1.0
        self._episode: tuple[float, float, bool] | None = None  # (429 at, window start, fresh)
        self._learned_at = 0.0
        self._rate_probed = 0.0
        self._tokens = self._burst()
        self._refilled = self.clock.monotonic()
        # header budget
        self._reports: list[_Report] = []   # every report that may still be the tightest, by serial
        self._started_count = 0
        self._reset_guard = RESET_GUARD
        if name in _header_providers:
            self.limit = 1

    def expect_headers(self) -> None:
        """Start in slow start (see the module docstring), unless a budget is known already."""
        with self._cond:
            if not self._reports and self.limit == self.ceiling:
                self.limit = 1

    # -- the public entry point -----------------------------------------------------------
    def call(self, fn, stop: threading.Event | None = None):
        """Run ``fn()`` (one request) under the limits; wait out 429s; return its result."""
        deadline = self.clock.monotonic() + self.patience
        refused = 0
        while True:
            start = self._acquire(stop, deadline)
            started = start.at
            token = _current_call.set((self, start))
            try:
                result = fn()
            except errors.RateLimitError as exc:
                _current_call.reset(token)
                self._release(start)
                if exc.concurrency:
                    refused += 1
                    delay = self._on_concurrency_limited(exc, refused, started)
                else:
                    delay = self._on_rate_limited(exc, started)
                self._check_patience(exc, delay)
                if delay > errors.MAX_INLINE_WAIT_SECONDS or self.clock.monotonic() + delay > deadline:
                    raise
                if exc.concurrency and delay > 0:  # this request's own wait; the others go on
                    if stop is None:
                        self.clock.sleep(delay)
                    elif self.clock.wait(stop, delay):
                        raise Stopping(f"{self.name}: run is stopping") from None
                continue
            except BaseException:
                _current_call.reset(token)
                self._release(start)
                raise
            _current_call.reset(token)
            self._release(start, success=True)
            return result

    def _check_patience(self, exc: errors.RateLimitError, delay: float) -> None:
        """Raise AccountError once only-429 answers (and the wait now asked for) outlast ``patience``."""
        now = self.clock.monotonic()
        with self._cond:
            if self._limited_since is None:
                self._limited_since = now
            limited_for = now - self._limited_since
        if limited_for + delay > self.patience:
            raise errors.AccountError(
                f"{self.name}: the provider has answered only 429 (rate limited) for {limited_for:.0f} s and asks"
                f" to wait {delay:.0f} s more, beyond the patience of {self.patience:.0f} s"
                f" (VERBATIM_RATE_LIMIT_PATIENCE); try later or with fewer workers. Last answer: {exc}",
                status=429, error_class="rate_limited") from exc

    # -- acquiring and releasing a slot ---------------------------------------------------
    def _acquire(self, stop, deadline) -> _Start:
        """Wait until a request may start; returns when it did."""
        started = self.clock.monotonic()
        waited = False
        with self._cond:
            while True:
                if stop is not None and stop.is_set():
                    raise Stopping(f"{self.name}: run is stopping")
                now = self.clock.monotonic()
                wait = self._cooldown_until - now
                if wait > errors.MAX_INLINE_WAIT_SECONDS or (wait > 0 and now + wait > deadline):
                    raise errors.RateLimitError(
                        f"{self.name}: provider asked us to wait {wait:.0f} s", retry_after=wait)
                if wait <= 0 and self._episode is not None:
                    self._learn_rate(now)
                if wait <= 0:
                    wait = self._start_wait(now)
                    if wait == 0.0:
                        break
                waited = True
                self.clock.wait(self._cond, min(max(wait, 0.01), 0.5) if wait is not None and wait > 0 else 0.5)
            self._in_flight += 1
            start = _Start(now, self._started_count)
            self._running.append(start)
            self._started_count += 1
            if self._first_start is None:
                self._first_start = now
            self.stats.requests += 1
            if waited:
                self.stats.waits += 1
                self.stats.wait_seconds += now - started
        return start

    def _release(self, start: _Start, success: bool = False) -> None:
        started = start.at
        with self._cond:
            self._in_flight -= 1
            self._running.remove(start)
            if success:
                now = self.clock.monotonic()
                self._consecutive_429 = 0
                self._limited_since = None
                self._accepted.append(started)
                grace = min(SLOT_GRACE_MAX, SLOT_GRACE_SHARE * self._grace_scale * (now - started))
                self._answered.append((now, grace))
                while self._accepted and self._accepted[0] < now - 2 * RATE_WINDOW:
                    self._accepted.popleft()
                while self._answered and self._answered[0][0] < now - 2 * RATE_WINDOW:
                    self._answered.popleft()
                if self.limit < self.ceiling:
                    self.limit += 1
                elif self.limit < self.max_concurrency and now - self._last_429 > PROBE_INTERVAL:
                    self.limit += 1
                    self.ceiling = self.limit
                    self._last_429 = now  # next probe only after another quiet interval
                if (self._learned_rps is not None and now - self._last_429 > RATE_PROBE_SECONDS
                        and now - self._rate_probed > RATE_PROBE_SECONDS):
                    self._set_learned(self._learned_rps * RATE_PROBE_STEP)
                    self._rate_probed = now
            self._cond.notify_all()

    def _start_wait(self, now: float) -> float | None:
        """0 when a request may start now (a pacing token is then taken); else seconds to wait, or
        None to wait for a request to end."""
        for gate in (self._slot_free_in, self._budget_wait, self._take_token):
            wait = gate(now)
            if wait != 0.0:
                return wait
        return 0.0

    def _budget_wait(self, now: float) -> float | None:
        """0 when every report still standing has a request left for now; else until the latest
        reset among those that have none before it, or None (wait for an answer) when a reset is
        past and that report's whole limit is already out."""
        self._drop_overtaken_reports(now)
        waits = []
        for report in self._reports:
            since = self._started_since(report)
            allowed = report.limit if now >= report.reset_at else report.remaining
            if allowed - since >= 1:
                continue
            if now < report.reset_at:
                waits.append(report.reset_at - now)
            else:
                return None if self._in_flight else 0.0  # nothing out: no newer report will come
        return max(waits, default=0.0)

    def _started_since(self, report: _Report) -> int:
        """Requests the provider may have counted after the report's own: those started after it,
        and those started before it and still out (they may have reached the provider later).
        One started before it and answered since has a report of its own, which counts it."""
        return (self._started_count - report.serial - 1) + bisect.bisect_left(self._running, report.serial, key=lambda s: s.serial)

    def _drop_overtaken_reports(self, now: float) -> None:
        """A report whose reset is past says no more than a newer one that resets no earlier."""
        kept, latest_newer = [], float("-inf")
        for report in reversed(self._reports):
            if not (now >= report.reset_at and latest_newer >= report.reset_at):
                kept.append(report)
            latest_newer = max(latest_newer, report.reset_at)
        kept.reverse()
        self._reports = kept

    def observe(self, info: RateLimitInfo, start: _Start) -> None:
        """A provider's report from the answer to the request ``start``. Answers overtake each
        other, on the way out and on the way in, so the newest request's report is not always
        the latest word: every report stands as a bound on the starts from now on (the tightest
        one binds), until a request started after it came back has reported too."""
        with self._cond:
            if not self._reports:
                # The first report ends the slow start: from now on the budget paces the starts,
                # so holding the concurrency low as well would only idle the workers.
                self.limit = max(self.limit, self.ceiling)
            reset_at = start.at + info.reset_seconds + self._reset_guard
            report = _Report(start.serial, self._started_count, info.remaining, reset_at, info.limit)
            self._reports = [r for r in self._reports if r.seen_after > start.serial]
            bisect.insort(self._reports, report, key=lambda r: r.serial)
            self._cond.notify_all()

    def _slot_free_in(self, now: float) -> float | None:
        """0 when a request may take a slot now; else the seconds until a slot the provider may
        still count for an answered request is free, or None (wait for a request to end)."""
        if self._in_flight >= self.limit:
            return None
        if not self._cap_learned:
            return 0.0
        lingering = sorted(end + grace for end, grace in self._answered if end + grace > now)
        excess = self._in_flight + len(lingering) - self.limit
        return 0.0 if excess < 0 else lingering[excess] - now

    def _held_by_provider(self, since: float) -> int:
        """Requests the provider may have been holding at a moment after ``since``: those still
        out, and those answered from shortly before it on (their slot may not have been freed)."""
        return self._in_flight + sum(1 for end, grace in self._answered if end + grace > since)

    # -- pacing ---------------------------------------------------------------------------
    def _pace(self) -> float | None:
        """Requests per second allowed to start: the configured and the learned rate, the lower."""
        rates = [r for r in ((self.rpm / 60.0) if self.rpm else None, self._learned_rps) if r]
        return min(rates) if rates else None

    def _burst(self) -> float:
        """Tokens the bucket holds: a second of the configured rate; one once a rate was learned
        (evenly spaced starts do not drain a provider's bucket in bursts)."""
        if self._learned_rps is not None:
            return 1.0
        return max(1.0, (self.rpm or 0) / 60.0)

    def _take_token(self, now: float) -> float:
        """0 when a request may start now (a token is taken), else seconds until one is due."""
        rate = self._pace()
        if not rate:
            return 0.0
        self._tokens = min(self._burst(), self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / rate

    def _set_learned(self, rps: float) -> None:
        self._learned_rps = self.stats.learned_rps = rps
        self._tokens = min(self._tokens, self._burst())

    # -- 429s -----------------------------------------------------------------------------
    def _on_rate_limited(self, exc: errors.RateLimitError, started: float) -> float:
        """A 429 about the rate: every thread waits out the cool-down. The first such 429 of an
        episode (not an echo of requests sent before the pace last changed) opens a measurement."""
        with self._cond:
            now = self.clock.monotonic()
            self.stats.rate_limited += 1
            self._consecutive_429 += 1
            self._last_429 = now
            # ``_in_flight`` no longer counts this request: it is what the provider did accept.
            self.limit = max(1, min(self.limit, self._in_flight))
            if self._reports:
                # The provider states its budget: a refusal means its reset came later than we
                # reckoned, not that the rate is unknown. Trust resets a little later from now on.
                self._reset_guard = min(RESET_GUARD_CAP, self._reset_guard * 2)
            elif self._episode is None and started >= self._learned_at:
                # Up to now, not to this request's start: requests race, and whichever the
                # provider took before it refused this one started around the same time.
                window = now - RATE_WINDOW
                fresh = max(self._first_start or started,
                            self._cooldown_until if self._cooldown_until <= started else 0.0)
                self._episode = (now, max(window, fresh), fresh > window)
            delay = errors.retry_delay(self._consecutive_429, exc.retry_after, base=0.5, cap=30.0)
            self._cooldown_until = max(self._cooldown_until, now + delay)
            self._cond.notify_all()
            return max(0.0, self._cooldown_until - now)

    def _learn_rate(self, now: float) -> None:
        """After the cool-down: the requests that started in the window before the 429 and were
        accepted (answered, or still running long after the refusals came back) give the rate."""
        refused_at, since, fresh = self._episode
        self._episode = None
        accepted = (sum(1 for t in self._accepted if since <= t < refused_at)
                    + sum(1 for s in self._running if since <= s.at < refused_at))
        span = refused_at - since + (RATE_BURST_SECONDS if fresh else 0.0)
        if accepted and span > 0:
            measured = accepted / span
            current = self._learned_rps
            self._set_learned(RATE_MARGIN * (measured if current is None else min(current, measured)))
        self._learned_at = self._rate_probed = now

    def _on_concurrency_limited(self, exc: errors.RateLimitError, refused: int, started: float) -> float:
        """A 429 about concurrency: the level the provider accepted becomes the ceiling. Returns
        how long this request waits before it tries again (a free slot is waited for anyway)."""
        with self._cond:
            self.stats.rate_limited += 1
            self._last_429 = self.clock.monotonic()
            held = self._held_by_provider(started)
            if self._cap_learned and held >= self.ceiling:
                # Refused at the learned ceiling, not above it: the provider frees slots later
                # than we allowed for. The ceiling stands; slots are handed on later.
                self._grace_scale = min(SLOT_GRACE_SCALE_MAX, self._grace_scale * 2)
            self.limit = self.ceiling = max(1, min(self.limit, held))
            self._cap_learned = True
            self._cond.notify_all()
        if exc.retry_after is not None:
            return exc.retry_after
        return random.uniform(0.0, min(CONCURRENCY_RETRY_CAP, CONCURRENCY_RETRY_BASE * 2 ** (refused - 1)))


class RunRequests:
    """How one run makes a request: at most ``workers`` of its own requests at once, each also
    under the provider's shared limiter. The run has a few more threads than that, so while
    ``workers`` requests are out, the other threads write the last answers' outputs and prepare
    the next files; a finished request's slot goes at once to a thread that is ready to send."""

    def __init__(self, limiter: ProviderLimiter, workers: int, stop: threading.Event | None = None):
        self.limiter = limiter
        self.stop = stop
        self._slots = threading.BoundedSemaphore(workers)

    def __call__(self, fn, key: dict | None = None):
        """Run one request ``fn``; ``key`` (the request's identity) is for callers that spool."""
        while not self._slots.acquire(timeout=0.5):
            if self.stop is not None and self.stop.is_set():
                raise Stopping(f"{self.limiter.name}: run is stopping")
        try:
            return self.limiter.call(fn, self.stop)
        except errors.AccountError:
            # Stop the run before the slot is free: a thread waiting for it must not send
            # another request with a rejected key (the runner records the reason right after).
            if self.stop is not None:
                self.stop.set()
            raise
        finally:
            self._slots.release()


_registry: dict[str, ProviderLimiter] = {}
_registry_lock = threading.Lock()


def limiter_for(provider: str, settings=None) -> ProviderLimiter:
    """The process-wide limiter of ``provider``, made on first use from ``settings`` (a
    ``pipeline.settings.LimiterSettings``: ``VERBATIM_<PROVIDER>_MAX_CONCURRENCY``, ``_RPM`` and
    ``VERBATIM_RATE_LIMIT_PATIENCE``, validated once by the entry point); None: no limits set."""
    with _registry_lock:
        if provider not in _registry:
            _registry[provider] = ProviderLimiter(
                provider, max_concurrency=getattr(settings, "max_concurrency", None),
                rpm=getattr(settings, "rpm", None), patience=getattr(settings, "patience", DEFAULT_PATIENCE))
        return _registry[provider]
