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
from pipeline.limiter import ProviderLimiter

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
    from pipeline.limiter import RateLimitInfo, parse_duration

    assert parse_duration("6m0s") == 360.0 and parse_duration("20ms") == 0.02
    assert parse_duration("1h2m3.5s") == 3723.5 and parse_duration("soon") is None
    assert [parse_duration(openai_duration(s)) for s in (0.0004, 0.25, 1.5, 61.0)] == [0.001, 0.25, 1.5, 61.0]
    info = RateLimitInfo.from_headers({"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
                                       "x-ratelimit-reset-requests": "1s"})
    assert info == RateLimitInfo(60, 59, 1.0)
    assert RateLimitInfo.from_headers({"content-type": "application/json"}) is None
