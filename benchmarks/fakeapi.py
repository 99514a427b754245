"""A lean fake API for benchmarks: fixed latency, optional rate and concurrency limits, no decoding.

The test suite's fake speech-to-text server decodes every upload with ffmpeg so it can answer
from the audio; on two cores that would make the fake the bottleneck. This one only reads the
request body, sleeps the configured latency and answers a fixed, valid body, so what is measured
is verbatim. It speaks two wire formats:

- OpenAI ``POST /v1/audio/transcriptions`` (multipart; ``verbose_json`` answer with one segment);
- DeepL ``POST /v2/translate`` (JSON; the test fakes' dictionary translation, so the output really
  is in the target language and verbatim's validation accepts it).

Limits, as providers enforce them:

- ``rate``: requests per second, in one of two shapes: ``shape="bucket"`` a token bucket holding
  one second of the rate, refilled continuously; ``shape="window"`` a fixed one-second window
  holding ``rate`` requests, the count reset at each window's end. A request over it is answered
  at once with 429 and ``Retry-After`` (whole seconds, at least 1, as HTTP allows);
  ``retry_after_ms`` adds the exact ``retry-after-ms``. Every answer, 200 or 429, carries OpenAI's
  ``x-ratelimit-limit-requests``, ``-remaining-requests`` and ``-reset-requests`` (the time until
  the budget is whole again, in OpenAI's format: ``20ms``, ``1s``, ``6m0s``).
- ``concurrency``: requests in flight; over it, 429 at once with a ``too_many_concurrent_requests``
  body (ElevenLabs' wording) and no Retry-After.

The server runs in the benchmark's process, the script under test in its own: they do not share
a GIL. Only 127.0.0.1 is bound.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from benchmarks.common import FAKE_DEEPL_KEY, FAKE_OPENAI_KEY
from benchmarks.fakeserver import serve_local

STT_PATH = "/v1/audio/transcriptions"
DEEPL_PATH = "/v2/translate"
_DEEPL_TARGETS = {"EN-US": "en", "EN-GB": "en", "DE": "de", "HE": "he"}


@dataclass
class Stats:
    requests: int = 0
    answered: int = 0                 # 200s
    rate_limited: int = 0             # 429 for the rate
    concurrency_limited: int = 0      # 429 for concurrency
    rejected_other: int = 0           # 4xx for bad requests (should stay 0)
    bytes_in: int = 0                 # request bodies of answered requests
    first_request: float | None = None
    last_response: float | None = None
    in_flight: int = 0
    peak_in_flight: int = 0
    uploads: list = field(default_factory=list)   # (body bytes, upload file name) of answered STT requests
    spans: list = field(default_factory=list)     # (arrival, answered) of answered requests, monotonic
    refusals: list = field(default_factory=list)  # arrival times of the requests answered 429, monotonic

    def as_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k not in ("uploads", "spans", "refusals")}
        data["uploads"] = len(self.uploads)
        return data


class FakeAPI:
    def __init__(self, *, latency: float = 0.0, rate: float | None = None, concurrency: int | None = None,
                 retry_after_ms: bool = False, shape: str = "bucket"):
        self.latency = latency
        self.rate = rate
        self.shape = shape
        self.concurrency = concurrency
        self.retry_after_ms = retry_after_ms
        self.stats = Stats()
        self.lock = threading.Lock()
        self._tokens = float(rate or 0)
        self._refilled = time.monotonic()
        self._window = (0, 0)  # (window number, requests counted in it)
        self._accepted_in_flight = 0
        self._httpd = None

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> "FakeAPI":
        self._httpd = serve_local(self._handle, name="fake-api", queue_size=1024)
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> "FakeAPI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def reset(self, **settings) -> None:
        with self.lock:
            for key, value in settings.items():
                setattr(self, key, value)
            self.stats = Stats()
            self._tokens = float(self.rate or 0)
            self._refilled = time.monotonic()
            self._window = (0, 0)

    def openai_env(self) -> dict:
        return {"OPENAI_API_KEY": FAKE_OPENAI_KEY, "OPENAI_BASE_URL": self.url + "/v1",
                "VERBATIM_TRANSCRIPTION_PROVIDER": "openai"}

    def deepl_env(self) -> dict:
        return {"DEEPL_API_KEY": FAKE_DEEPL_KEY, "DEEPL_BASE_URL": self.url,
                "VERBATIM_TRANSLATION_PROVIDER": "deepl"}

    # -- limits -----------------------------------------------------------------------------
    def _admit(self, now: float) -> tuple[str | None, float, dict]:
        """(None, 0, headers) to serve; ("rate", wait, headers) or ("concurrency", 0, {}) to refuse.
        Holds ``self.lock``."""
        if self.concurrency is not None and self._accepted_in_flight >= self.concurrency:
            return "concurrency", 0.0, {}
        headers = {}
        if self.rate:
            take = self._take_window if self.shape == "window" else self._take_bucket
            admitted, wait, remaining, reset = take(now)
            headers = _ratelimit_headers(int(self.rate), remaining, reset)
            if not admitted:
                return "rate", wait, headers
        self._accepted_in_flight += 1
        return None, 0.0, headers

    def _take_bucket(self, now: float) -> tuple[bool, float, int, float]:
        """(admitted, wait for a token, tokens left, seconds until the bucket is full again)."""
        self._tokens = min(self.rate, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        admitted = self._tokens >= 1.0
        if admitted:
            self._tokens -= 1.0
        wait = 0.0 if admitted else (1.0 - self._tokens) / self.rate
        return admitted, wait, math.floor(self._tokens), (self.rate - self._tokens) / self.rate

    def _take_window(self, now: float) -> tuple[bool, float, int, float]:
        """(admitted, wait for the next window, requests left in this one, seconds to its end)."""
        number = math.floor(now)  # one-second windows on the monotonic clock
        used = self._window[1] if self._window[0] == number else 0
        admitted = used < self.rate
        used += admitted
        self._window = (number, used)
        reset = number + 1.0 - now
        return admitted, 0.0 if admitted else reset, int(self.rate) - used, reset

    # -- serving ----------------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        now = time.monotonic()
        with self.lock:
            stats = self.stats
            stats.requests += 1
            if stats.first_request is None:
                stats.first_request = now
            stats.in_flight += 1
            stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
            refused, wait, limits = self._admit(now)
        try:
            if refused:
                self._refuse(handler, refused, wait, limits)
                return
            try:
                time.sleep(self.latency)
                status, payload, upload_name = self._answer(handler.path, handler.headers, body)
            finally:
                # The plan's slot is the work, not the socket write: free once the answer exists,
                # as on a real server (where the answer then still travels for milliseconds).
                with self.lock:
                    self._accepted_in_flight -= 1
            self._send(handler, status, payload, limits)
            with self.lock:
                if status == 200:
                    stats.answered += 1
                    stats.bytes_in += len(body)
                    stats.last_response = time.monotonic()
                    stats.spans.append((now, stats.last_response))
                    if upload_name is not None:
                        stats.uploads.append((len(body), upload_name))
                else:
                    stats.rejected_other += 1
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with self.lock:
                stats.in_flight -= 1

    def _refuse(self, handler, kind: str, wait: float, limits: dict) -> None:
        with self.lock:
            self.stats.refusals.append(time.monotonic())
            if kind == "rate":
                self.stats.rate_limited += 1
            else:
                self.stats.concurrency_limited += 1
        if kind == "concurrency":
            message = "too_many_concurrent_requests: too many concurrent requests for your plan"
            self._send(handler, 429, {"error": {"message": message, "type": "requests",
                                                "code": "too_many_concurrent_requests"}})
            return
        headers = {"Retry-After": str(max(1, math.ceil(wait))), **limits}
        if self.retry_after_ms:
            headers["retry-after-ms"] = str(max(1, round(wait * 1000)))
        self._send(handler, 429, {"error": {"message": "Rate limit reached for requests", "type": "requests",
                                            "code": "rate_limit_exceeded"}}, headers)

    def _answer(self, path: str, headers, body: bytes) -> tuple[int, dict, str | None]:
        if path == STT_PATH:
            if headers.get("Authorization") != f"Bearer {FAKE_OPENAI_KEY}":
                return 401, {"error": {"message": "Incorrect API key", "code": "invalid_api_key"}}, None
            return 200, {"task": "transcribe", "language": "german", "duration": 3.0,
                         "text": "Wir wohnten in einem kleinen Dorf.",
                         "segments": [{"id": 0, "start": 0.0, "end": 2.5,
                                       "text": " Wir wohnten in einem kleinen Dorf."}],
                         "usage": {"type": "duration", "seconds": 3}}, _upload_name(body)
        if path == DEEPL_PATH:
            from benchmarks.fake_translate import fake_translate
            if headers.get("Authorization") != f"DeepL-Auth-Key {FAKE_DEEPL_KEY}":
                return 403, {"message": "Forbidden"}, None
            request = json.loads(body)
            target = _DEEPL_TARGETS.get(request.get("target_lang", ""))
            if target is None:
                return 400, {"message": "Value for 'target_lang' not supported"}, None
            return 200, {"translations": [{"detected_source_language": "DE", "text": fake_translate(text, target)}
                                          for text in request.get("text") or []]}, None
        return 404, {"message": "no such route"}, None

    @staticmethod
    def _send(handler, status: int, payload: dict, headers: dict | None = None) -> None:
        """Status line, headers and body in one write: separate small writes would meet Nagle's
        algorithm and the peer's delayed ACK, and add 40 ms to every request."""
        data = json.dumps(payload).encode("utf-8")
        lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}", "Content-Type: application/json",
                 *(f"{key}: {value}" for key, value in (headers or {}).items()), f"Content-Length: {len(data)}"]
        handler.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
        handler.wfile.flush()


def _ratelimit_headers(limit: int, remaining: int, reset: float) -> dict:
    return {"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": str(max(0, remaining)),
            "x-ratelimit-reset-requests": openai_duration(reset)}


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms`` under a second, else ``1.5s`` or ``6m0s``."""
    if seconds < 1.0:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    return f"{int(minutes)}m{rest:g}s" if minutes else f"{rest:g}s"


def _upload_name(body: bytes) -> str | None:
    """The file name of the multipart ``file`` part, found without parsing the whole body."""
    marker = body.find(b'name="file"; filename="')
    if marker < 0:
        return None
    start = marker + len(b'name="file"; filename="')
    end = body.find(b'"', start)
    return body[start:end].decode("utf-8", "replace") if end > 0 else None


def main(argv=None) -> int:
    """Serve until interrupted (for profiling a script by hand); prints the base URL."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Run the lean fake API on 127.0.0.1 until Ctrl-C.")
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--shape", choices=("bucket", "window"), default="bucket")
    args = parser.parse_args(argv)
    api = FakeAPI(latency=args.latency, rate=args.rate, concurrency=args.concurrency, shape=args.shape).start()
    print(api.url, flush=True)
    try:
        while True:
            time.sleep(5)
            print(json.dumps(api.stats.as_dict()), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
