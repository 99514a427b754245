"""Provider answers within bounds: a total deadline per request and a cap on the bytes read.

Client timeouts are per socket operation: a server that sends one byte a second, or reads an
upload a kilobyte at a time, never trips them, and the heartbeat keeps the job's lease alive
meanwhile, so the job would never end. A ``Deadline`` bounds the whole request instead: the
per-read timeout is at most what is left of it, the upload is read from an ``UploadFile`` that
checks it before every block it hands to the client, and the answer is read in pieces as they
arrive (at most one socket read each), the deadline checked after every piece. The same loop caps the body: an answer beyond ``max_response_bytes``
(far above any real transcript of a ten-hour recording) fails the request as
``invalid_response`` before it fills the memory of the machine.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterable, Mapping

from pipeline.config import positive_float
from pipeline.errors import PermanentError, RetryableError

DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
_PIECE_BYTES = 64 * 1024


def max_response_bytes(env: Mapping) -> int:
    """``VERBATIM_MAX_RESPONSE_BYTES`` of the settings' ``env`` (validated by ``Settings``), else 64 MiB."""
    value = env.get("VERBATIM_MAX_RESPONSE_BYTES")
    return int(value) if value and value.strip().isdigit() and int(value) > 0 else DEFAULT_MAX_RESPONSE_BYTES


def request_timeout(env: Mapping) -> float | None:
    """``VERBATIM_REQUEST_TIMEOUT`` of the settings' ``env``: the total deadline of one request, in
    seconds, for every provider (transcription and translation alike); None where it is not set."""
    value = env.get("VERBATIM_REQUEST_TIMEOUT")
    if not value:
        return None
    return positive_float("VERBATIM_REQUEST_TIMEOUT", value)


class ThreadSessions:
    """``sessions()``: this thread's ``requests.Session``, made on first use. requests does not
    promise that one Session is thread-safe, and a provider instance serves every worker thread."""

    def __init__(self):
        self._local = threading.local()

    def __call__(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = self._local.session = requests.Session()
        return session


class Deadline:
    """The moment a request must be answered by, ``seconds`` from now."""

    def __init__(self, seconds: float, provider: str):
        self.seconds = seconds
        self.provider = provider
        self._at = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; raises a retryable ``timeout`` once there are none."""
        left = self._at - time.monotonic()
        if left <= 0:
            raise RetryableError(f"{self.provider}: no complete answer within the request's total deadline"
                                 f" of {self.seconds:.0f} s", error_class="timeout")
        return left


class UploadFile(io.FileIO):
    """A file opened for upload that refuses to hand out more once ``deadline`` has passed: the
    client reads the next block only when the server took the last one."""

    def __init__(self, path, deadline: Deadline):
        super().__init__(path, "rb")
        self.deadline = deadline

    def read(self, size: int = -1) -> bytes:
        self.deadline.remaining()
        return super().read(size)

    def readinto(self, buffer) -> int:
        self.deadline.remaining()
        return super().readinto(buffer)


def too_large(provider: str, limit: int) -> PermanentError:
    """Permanent: the same request would get the same answer, and be paid for again."""
    return PermanentError(f"{provider}: the answer is larger than {limit} bytes (VERBATIM_MAX_RESPONSE_BYTES);"
                          " not read", error_class="invalid_response")


def check_length(headers, limit: int, provider: str) -> None:
    declared = (headers or {}).get("content-length")
    if declared and declared.strip().isdigit() and int(declared) > limit:
        raise too_large(provider, limit)


def read_bounded(pieces: Iterable[bytes], *, deadline: Deadline, limit: int) -> bytes:
    """Join ``pieces`` as they arrive; fail past ``limit`` bytes or past the deadline."""
    body = bytearray()
    for piece in pieces:
        body += piece
        if len(body) > limit:
            raise too_large(deadline.provider, limit)
        deadline.remaining()
    return bytes(body)


def _requests_pieces(response):
    """The body of a streamed ``requests`` response, one socket read at a time, with urllib3's
    errors turned into the ``requests`` exceptions callers classify."""
    import requests
    from urllib3.exceptions import ProtocolError, ReadTimeoutError

    try:
        while piece := response.raw.read1(_PIECE_BYTES, decode_content=True):
            yield piece
    except ReadTimeoutError as exc:
        raise requests.exceptions.ReadTimeout(str(exc)) from exc
    except ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(str(exc)) from exc


def post(session, url: str, *, deadline: Deadline, limit: int, read_timeout: float = float("inf"),
         **kwargs) -> tuple[int, Mapping, bytes]:
    """POST with ``requests`` within ``deadline`` and ``limit``: (status, headers, body).
    Transport errors are raised as ``requests`` exceptions."""
    left = deadline.remaining()
    timeout = (min(CONNECT_TIMEOUT, left), min(read_timeout, left))
    with session.post(url, stream=True, timeout=timeout, **kwargs) as response:
        check_length(response.headers, limit, deadline.provider)
        body = read_bounded(_requests_pieces(response), deadline=deadline, limit=limit)
        return response.status_code, response.headers, body


def read_sdk_stream(response, *, deadline: Deadline, limit: int) -> bytes:
    """The body of an ``openai`` SDK streaming response (``with_streaming_response``) within
    bounds. The SDK's HTTP library (httpx or its fork) raises its own errors while streaming:
    they are classified here as transport errors."""
    check_length(response.headers, limit, deadline.provider)
    try:
        return read_bounded(response.iter_bytes(), deadline=deadline, limit=limit)
    except Exception as exc:
        if not type(exc).__module__.startswith(("httpx", "httpcore")):
            raise
        kind = "timeout" if "Timeout" in type(exc).__name__ else "connection"
        raise RetryableError(f"{deadline.provider}: reading the answer failed ({type(exc).__name__})",
                             error_class=kind) from exc
