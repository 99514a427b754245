"""Provider errors, classified once.

Every provider turns whatever went wrong into exactly one of three kinds, and workers decide by
``except`` clause, never by parsing messages:

- ``RetryableError``: the same request may succeed later (429, 5xx, 408/409, timeouts, connection
  resets, truncated or invalid bodies). ``RateLimitError`` is the 429 flavour: it is the provider
  asking us to slow down, so it waits on the shared limiter and does not spend a job attempt.
- ``PermanentError``: this input will never work (undecodable audio, other 4xx, unsupported
  language, output that fails validation after the fallbacks). The job fails at once.
- ``AccountError``: the key or the account is the problem (401/403 auth, ``insufficient_quota``,
  DeepL 456). Nothing is the file's fault: the run stops and jobs stay not_started.

``error_class`` is a short stable word stored in the database and counted by ``tools/status.py``.
"""

from __future__ import annotations

import email.utils
import errno
import json
import random
import time
import urllib.parse

# Backoff numbers in one place (full jitter, AWS style). Tests shrink them via the environment.
RETRY_BASE_SECONDS = 2.0
RETRY_CAP_SECONDS = 300.0
# A Retry-After longer than this is not waited for in a thread: the job is requeued for later.
MAX_INLINE_WAIT_SECONDS = 60.0
# The most a server may ask us to wait at once: ``inf``, ``1e16`` or a date in the year 9999 would
# otherwise spin (a float overflow) or wait for ever.
MAX_RETRY_AFTER_SECONDS = 3600.0


_SECRETS: set[str] = set()


def _secret_forms(secret: str) -> set[str]:
    """Every form a secret takes in what we write: raw, JSON-escaped (``"`` and ``\\`` escaped,
    non-ASCII escaped or not), URL-encoded (in a path or query, or as form data)."""
    forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
             urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
    return {form for form in forms if form}


def register_secret(value: str | None) -> None:
    """Remember a configured key so that ``redact`` removes it, in every form, from every message
    we store or log, whatever its length (a short key is still a key)."""
    if value:
        _SECRETS.update(_secret_forms(value))


def register_url_credentials(url: str | None) -> None:
    """Register the password of a URL's userinfo (``http://user:password@proxy/``), as written
    there and decoded: clients log the URLs they call."""
    if not url or "@" not in url:
        return
    try:
        parts = urllib.parse.urlsplit(url.strip())
    except ValueError:
        return
    userinfo = parts.netloc.rpartition("@")[0]
    password = userinfo.partition(":")[2]
    if password:
        register_secret(password)
        register_secret(urllib.parse.unquote(password))


def redact(text: str) -> str:
    # Longest first: a form that contains another (raw inside URL-encoded) goes whole.
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "[REDACTED]")
    return text


class ProviderError(Exception):
    """Base class: ``error_class`` is stored with the job, ``status`` is the HTTP status if any."""

    error_class = "provider_error"

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after: float | None = None, error_class: str | None = None):
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        if error_class:
            self.error_class = error_class

    def __str__(self) -> str:
        prefix = f"HTTP {self.status}: " if self.status else ""
        return f"{prefix}{self.message}"


class RetryableError(ProviderError):
    error_class = "server_error"


class RateLimitError(RetryableError):
    """429: slow down. ``concurrency`` is True when the provider says too many requests run at once
    (ElevenLabs ``too_many_concurrent_requests``), as opposed to too many per unit of time."""

    error_class = "rate_limited"

    def __init__(self, message: str, *, concurrency: bool = False, **kwargs):
        super().__init__(message, **kwargs)
        self.concurrency = concurrency


class PermanentError(ProviderError):
    error_class = "bad_request"


class AccountError(ProviderError):
    error_class = "account"


class MachineError(OSError):
    """The machine, not the file: the output disk is full, over quota, read-only or refuses us.
    Like an account error it stops the run before it pays for more answers it cannot keep, and
    gives every held job back; no file is failed for it. (An OSError still, for callers that
    handle any failed write.)"""


# OSError numbers that say the output disk itself cannot take our writes.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def parse_retry_after(headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if not headers:
        return None
    getter = headers.get
    ms = getter("retry-after-ms") or getter("Retry-After-Ms")
    if ms:
        try:
            return _server_wait(float(ms) / 1000.0)
        except ValueError:
            pass
    value = getter("retry-after") or getter("Retry-After")
    if not value:
        return None
    try:
        return _server_wait(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return _server_wait(when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _server_wait(seconds: float) -> float | None:
    """A server's wait, capped at ``MAX_RETRY_AFTER_SECONDS``; None (our own backoff) for 0, a
    negative or NaN wait: honouring 0 would resend at once, hundreds of times a second."""
    if not seconds > 0:  # also NaN
        return None
    return min(seconds, MAX_RETRY_AFTER_SECONDS)


def retry_delay(attempt: int, retry_after: float | None = None, *,
                base: float | None = None, cap: float | None = None) -> float:
    """Seconds before attempt ``attempt + 1``: the server's word if it gave one, else full jitter."""
    if retry_after is not None:
        return retry_after
    base = RETRY_BASE_SECONDS if base is None else base
    cap = RETRY_CAP_SECONDS if cap is None else cap
    return random.uniform(0.0, min(cap, base * (2 ** max(0, attempt - 1))))


def _body_text(body) -> str:
    if body is None:
        return ""
    if isinstance(body, (dict, list)):
        return json.dumps(body)[:2000]
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return str(body)[:2000]


def classify_http(status: int, body=None, headers=None, *, provider: str = "") -> ProviderError:
    """Map an HTTP error response to the one error kind the workers act on."""
    text = _body_text(body)
    lowered = text.lower()
    retry_after = parse_retry_after(headers)
    where = f"{provider}: " if provider else ""
    short = text.strip().replace("\n", " ")[:300] or "(empty body)"
    if status == 429:
        if "insufficient_quota" in lowered or "quota_exceeded" in lowered:
            return AccountError(f"{where}quota exhausted: {short}", status=status, error_class="quota")
        return RateLimitError(f"{where}rate limited: {short}", status=status, retry_after=retry_after,
                              concurrency="concurren" in lowered)
    if status == 456:  # DeepL: character quota for the billing period is used up
        return AccountError(f"{where}quota exceeded: {short}", status=status, error_class="quota")
    if status in (401, 403):
        return AccountError(f"{where}the API key was rejected: {short}", status=status, error_class="auth")
    if status == 402:
        return AccountError(f"{where}payment required: {short}", status=status, error_class="quota")
    if status in (408, 409) or status >= 500:
        return RetryableError(f"{where}server error: {short}", status=status, retry_after=retry_after,
                              error_class="timeout" if status == 408 else "server_error")
    if status == 413:
        return PermanentError(f"{where}request too large: {short}", status=status, error_class="too_large")
    if status in (415, 422) or "decod" in lowered or "invalid file format" in lowered \
            or "could not be decoded" in lowered or "unsupported" in lowered:
        return PermanentError(f"{where}input rejected: {short}", status=status, error_class="unsupported_media")
    return PermanentError(f"{where}request rejected: {short}", status=status, error_class="bad_request")


def from_requests_exception(exc: Exception, *, provider: str = "") -> ProviderError:
    """Classify a transport-level ``requests`` exception (no HTTP status came back)."""
    import requests

    where = f"{provider}: " if provider else ""
    if isinstance(exc, requests.exceptions.Timeout):
        return RetryableError(f"{where}request timed out ({type(exc).__name__})", error_class="timeout")
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return RetryableError(f"{where}connection failed ({type(exc).__name__})", error_class="connection")
    if isinstance(exc, ValueError):  # JSON decoding of a truncated or garbled body
        return RetryableError(f"{where}invalid response body ({type(exc).__name__})",
                              error_class="invalid_response")
    return RetryableError(f"{where}request failed ({type(exc).__name__})", error_class="connection")


def from_openai_exception(exc: Exception, *, provider: str = "openai") -> ProviderError:
    """Classify an exception raised by the ``openai`` SDK (its own retries are switched off)."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        headers = getattr(exc.response, "headers", None)
        return classify_http(exc.status_code, exc.body if exc.body is not None else exc.message,
                             headers, provider=provider)
    if isinstance(exc, openai.APITimeoutError):
        return RetryableError(f"{provider}: request timed out", error_class="timeout")
    if isinstance(exc, openai.APIConnectionError):
        return RetryableError(f"{provider}: connection failed ({type(exc.__cause__ or exc).__name__})",
                              error_class="connection")
    if isinstance(exc, (openai.APIResponseValidationError, ValueError)):
        return RetryableError(f"{provider}: invalid response body ({type(exc).__name__})",
                              error_class="invalid_response")
    return RetryableError(f"{provider}: {type(exc).__name__}", error_class="provider_error")
