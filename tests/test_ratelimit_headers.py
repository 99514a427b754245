"""Pacing from the provider's rate-limit headers, against a fake that enforces its limit.

The benchmarks' fake API answers every request with OpenAI's ``x-ratelimit-*-requests`` headers
and refuses requests over its limit with 429. The real OpenAI transcriber (the openai SDK on the
wire) runs through one ``ProviderLimiter`` from many threads; what is asserted is how many 429s
that cost per file, not how long it took.
"""

from __future__ import annotations

import threading

import pytest

import transcription as T
from benchmarks.common import FAKE_OPENAI_KEY
from benchmarks.fakeapi import FakeAPI
from pipeline.limiter import ProviderLimiter, RateLimitInfo, parse_duration, report_rate_limit
from tests.fakeclock import FakeClock

FILES = 60
THREADS = 24        # well over the provider's budget of RATE requests per second
RATE = 12.0


@pytest.fixture(scope="module")
def upload(tmp_path_factory):
    path = tmp_path_factory.mktemp("upload") / "clip.mp3"
    path.write_bytes(b"ID3" + bytes(2000))  # the lean fake never decodes what it is sent
    return str(path)


def run_files(api: FakeAPI, upload: str) -> ProviderLimiter:
    transcriber = T.OpenAITranscriber(api_key=FAKE_OPENAI_KEY, base_url=api.url + "/v1")
    limiter = ProviderLimiter(transcriber.name)  # a fresh one, as a run's limiter_for(provider) makes
    files = iter(range(FILES))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if next(files, None) is None:
                    return
            limiter.call(lambda: transcriber.transcribe_chunk(upload))

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return limiter


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", ["bucket", "window"])
def test_reported_budget_keeps_429s_rare_unconfigured(upload, shape):
    with FakeAPI(latency=0.05, rate=RATE, shape=shape) as api:
        run_files(api, upload)
        stats = api.stats
    assert stats.answered == FILES
    assert stats.rate_limited <= 0.05 * FILES, f"{stats.rate_limited} 429s for {FILES} files ({shape})"


def test_header_formats():
    from benchmarks.fakeapi import openai_duration

    assert parse_duration("6m0s") == 360.0 and parse_duration("20ms") == 0.02
    assert parse_duration("1h2m3.5s") == 3723.5 and parse_duration("soon") is None
    assert [parse_duration(openai_duration(s)) for s in (0.0004, 0.25, 1.5, 61.0)] == [0.001, 0.25, 1.5, 61.0]
    info = RateLimitInfo.from_headers({"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
                                       "x-ratelimit-reset-requests": "1s"})
    assert info == RateLimitInfo(60, 59, 1.0)
    assert RateLimitInfo.from_headers({"content-type": "application/json"}) is None


# -- reports that overtake each other (a fake clock: nothing here waits on real time) ---------

class Held:
    """One request on its own thread: it starts under the limiter, then waits until the test lets
    the provider's answer (with its rate-limit report) come back."""

    def __init__(self, limiter: ProviderLimiter, report=None):
        self.report, self.answer, self.started = report, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=limiter.call, args=(self._request,), daemon=True)
        self.thread.start()

    def _request(self):
        self.started.set()
        assert self.answer.wait(30)
        report_rate_limit(self.report)

    def answered(self) -> None:
        self.answer.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def started_alone(limiter: ProviderLimiter, report, clock) -> Held:
    held = Held(limiter, report)
    assert held.started.wait(30)
    clock.advance(0.001)  # the next request starts a moment later
    return held


def test_a_report_overtaken_on_the_way_back_still_counts():
    """A token bucket of 4 per second (full: 4). P, Q, R start in that order; the provider counts
    Q, R, P (4 - 1 for the first request: 2, 1, 0 left) and the answers come back Q, P, R. R is the
    newest request, but P's report is the latest word: nothing is left until the bucket refills."""
    clock = FakeClock()
    limiter = ProviderLimiter("overtaken", clock=clock)
    started_alone(limiter, RateLimitInfo(4, 3, 0.25), clock).answered()
    p = started_alone(limiter, RateLimitInfo(4, 0, 1.0), clock)
    q = started_alone(limiter, RateLimitInfo(4, 2, 0.5), clock)
    r = started_alone(limiter, RateLimitInfo(4, 1, 0.75), clock)
    for held in (q, p, r):
        held.answered()
    fourth = Held(limiter)
    assert not fourth.started.wait(0.3), "a request started while the provider's bucket was empty"
    clock.advance(1.2)
    assert fourth.started.wait(30), "the bucket refilled, but no request started"
    fourth.answered()


def test_a_late_report_from_a_long_request_holds_nobody_back():
    """A long request's report arrives after a dozen newer ones: its window reset long ago, and the
    newer reports say more; the next request starts at once, though another is still out (counted
    from the long request on, its whole limit of 12 has started since)."""
    clock = FakeClock()
    limiter = ProviderLimiter("late-report", clock=clock)
    long = started_alone(limiter, RateLimitInfo(12, 11, 1.0), clock)
    clock.advance(5.0)
    for left in range(11, 0, -1):
        started_alone(limiter, RateLimitInfo(12, left, 1.0), clock).answered()
    clock.advance(5.0)
    out = started_alone(limiter, RateLimitInfo(12, 11, 1.0), clock)
    long.answered()
    nxt = Held(limiter, RateLimitInfo(12, 10, 1.0))
    assert nxt.started.wait(30), "a stale report held the next request back"
    for held in (out, nxt):
        held.answered()
