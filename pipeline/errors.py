"""Provider errors, classified once.

Every provider turns whatever went wrong into exactly one of three kinds, and workers decide by
``except`` clause, never by parsing messages:

- ``RetryableError``: the same request may succeed later (429, 5xx, 408/409, timeouts, connection
  resets, truncated or invalid bodies). ``RateLimitError`` is the 429 flavour: it is the provider
  asking us to slow down, so it waits on the shared limiter and does not spend a job attempt.
- ``PermanentError``: this input will never work (undecodable audio, other 4xx, unsupported
  language, output that fails validation after the fallbacks). The job fails at once.
  ``TooLongError`` is the exception: the chunk was too long for the model, and is cut shorter.
- ``AccountError``: the key or the account is the problem (401/403 auth, ``insufficient_quota``,
  DeepL 456). Nothing is the file's fault: the run stops and jobs stay not_started.

``classify_http`` decides on the provider's structured code first (one function per provider family,
``FAMILIES``), then on the HTTP status, and on the message words only as a last resort.
``error_class`` is a short stable word stored in the database and counted by ``tools/status.py``.
"""

from __future__ import annotations

import email.utils
import errno
import json
import random
import re
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


class ConfigError(Exception):
    """A usage or configuration problem: the script prints the message and exits 2."""


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


def _structured(body) -> dict:
    """The error body as a dict (parsed from text when it is JSON), else {}."""
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except (TypeError, ValueError):
            return {}
    return body if isinstance(body, dict) else {}


class TooLongError(PermanentError):
    """The provider refused a chunk for its duration: cut it smaller and send it again.
    ``max_seconds`` is the limit the provider named, if it named one."""

    error_class = "too_long"

    def __init__(self, message: str, *, max_seconds: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.max_seconds = max_seconds


# OpenAI gpt-4o transcription models: "audio duration 1830.5 seconds is longer than 1400 seconds which is
# the maximum for this model" (400, code invalid_value), reported in
# https://github.com/murtaza-nasir/speakr/issues/168 and https://github.com/rishikanthc/Scriberr/issues/477.
_TOO_LONG_RE = re.compile(r"longer than ([\d.]+) seconds which is the maximum", re.I)


def _openai(http: int, data: dict, text: str, where: str, **kw) -> ProviderError | None:
    """OpenAI and compatible servers: ``{"error": {"message", "type", "param", "code"}}`` (the SDK
    passes the inner object). Codes from https://developers.openai.com/docs/guides/error-codes."""
    err = data.get("error") if isinstance(data.get("error"), dict) else data
    code, kind, param = (str(err.get(k) or "") for k in ("code", "type", "param"))
    message = str(err.get("message") or "")
    if "insufficient_quota" in (code, kind):
        return AccountError(f"{where}quota exhausted: {message}", error_class="quota", **kw)
    if code == "invalid_api_key" or http == 401:
        return AccountError(f"{where}the API key was rejected: {message}", error_class="auth", **kw)
    if http == 429:
        return RateLimitError(f"{where}rate limited: {message or code}", concurrency="concurren" in text.lower(), **kw)
    too_long = _TOO_LONG_RE.search(message)
    if http == 400 and too_long:
        return TooLongError(f"{where}chunk too long: {message}", max_seconds=float(too_long.group(1)), **kw)
    if http == 400 and param:  # a request parameter the model refuses (e.g. temperature): not the input's fault
        return PermanentError(f"{where}request rejected ({param}): {message}", error_class="bad_request", **kw)
    return None


def _elevenlabs(http: int, data: dict, text: str, where: str, **kw) -> ProviderError | None:
    """ElevenLabs: ``{"detail": {"status", "message"}}``. ``quota_exceeded`` comes as 400 or 401
    (https://help.elevenlabs.io/hc/en-us/articles/19572237925521-API-Error-Code-400-or-401), so
    the code decides, not the HTTP status."""
    detail = data.get("detail") if isinstance(data.get("detail"), dict) else {}
    code, message = str(detail.get("status") or ""), str(detail.get("message") or "")
    if code == "quota_exceeded":
        return AccountError(f"{where}quota exceeded: {message}", error_class="quota", **kw)
    if code == "invalid_api_key":
        return AccountError(f"{where}the API key was rejected: {message}", error_class="auth", **kw)
    if code in ("too_many_concurrent_requests", "system_busy"):
        return RateLimitError(f"{where}{code}: {message}", concurrency=code == "too_many_concurrent_requests", **kw)
    return None


def _deepl(http: int, data: dict, text: str, where: str, **kw) -> ProviderError | None:
    """DeepL answers with status codes and ``{"message"}``: 429 and 529 are both "Too many
    requests" in its OpenAPI spec (https://developers.deepl.com/api-reference/openapi.yaml), 456
    is the used-up quota (https://developers.deepl.com/docs/best-practices/error-handling)."""
    message = str(data.get("message") or text.strip()[:300])
    if http in (429, 529):
        return RateLimitError(f"{where}too many requests ({http}): {message}", **kw)
    if http == 456:
        return AccountError(f"{where}quota exceeded: {message}", error_class="quota", **kw)
    if http == 403:
        return AccountError(f"{where}the API key was rejected: {message}", error_class="auth", **kw)
    return None


def _microsoft(http: int, data: dict, text: str, where: str, **kw) -> ProviderError | None:
    """Microsoft Translator: ``{"error": {"code": 403001, "message"}}``, six digits, the HTTP status
    first. 403001 is the free tier's used-up quota, not a rejected key
    (https://learn.microsoft.com/azure/ai-services/translator/text-translation/reference/status-response-codes)."""
    err = data.get("error") if isinstance(data.get("error"), dict) else {}
    code, message = err.get("code"), str(err.get("message") or "")
    if code == 403001:
        return AccountError(f"{where}the free tier's translation quota is used up (403001): {message}",
                            error_class="quota", **kw)
    if isinstance(code, int) and code // 1000 == 401:
        return AccountError(f"{where}the API key was rejected ({code}): {message}", error_class="auth", **kw)
    if isinstance(code, int) and code // 1000 == 429:
        return RateLimitError(f"{where}rate limited ({code}): {message}", **kw)
    return None


# One classifier per provider family, keyed by the provider names the providers use.
FAMILIES = {"openai": _openai, "elevenlabs": _elevenlabs, "deepl": _deepl, "microsoft": _microsoft}


def classify_http(status: int, body=None, headers=None, *, provider: str = "", media: bool = True) -> ProviderError:
    """Map an HTTP error response to the one error kind the workers act on: the provider's structured
    code first, the status and message text only as a fallback. ``media=False`` (text requests):
    nothing the provider says makes it a media error."""
    text = _body_text(body)
    retry_after = parse_retry_after(headers)
    where = f"{provider}: " if provider else ""
    family = FAMILIES.get(provider)
    decided = family(status, _structured(body), text, where, status=status, retry_after=retry_after) if family else None
    return decided or _by_status(status, text, retry_after, where, media)


def _by_status(status: int, text: str, retry_after, where: str, media: bool) -> ProviderError:
    """The fallback: HTTP status, then words in the message."""
    lowered = text.lower()
    short = text.strip().replace("\n", " ")[:300] or "(empty body)"
    if "insufficient_quota" in lowered or "quota_exceeded" in lowered:
        return AccountError(f"{where}quota exhausted: {short}", status=status, error_class="quota")
    if status == 429:
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
    if media and (status in (415, 422) or "decod" in lowered or "invalid file format" in lowered
                  or "unsupported" in lowered):
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


def from_openai_exception(exc: Exception, *, provider: str = "openai", media: bool = True) -> ProviderError:
    """Classify an exception raised by the ``openai`` SDK (its own retries are switched off)."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        headers = getattr(exc.response, "headers", None)
        return classify_http(exc.status_code, exc.body if exc.body is not None else exc.message,
                             headers, provider=provider, media=media)
    if isinstance(exc, openai.APITimeoutError):
        return RetryableError(f"{provider}: request timed out", error_class="timeout")
    if isinstance(exc, openai.APIConnectionError):
        return RetryableError(f"{provider}: connection failed ({type(exc.__cause__ or exc).__name__})",
                              error_class="connection")
    if isinstance(exc, (openai.APIResponseValidationError, ValueError)):
        return RetryableError(f"{provider}: invalid response body ({type(exc).__name__})",
                              error_class="invalid_response")
    return RetryableError(f"{provider}: {type(exc).__name__}", error_class="provider_error")
