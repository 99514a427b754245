"""Speech-to-text for one recording: providers, the per-file job, output files and a standalone CLI.

``transcribe_media`` is the whole job for one file: probe and prepare the audio in a private
temporary folder (``pipeline.audio``), send each chunk to a ``Transcriber`` through the caller's
``call`` wrapper (the runner's shared rate limiter; nothing here retries; a chunk the provider
calls too long is cut shorter and its pieces sent instead), and merge the chunk results into one
``Transcript`` with continuous timestamps. ``write_transcript_outputs`` writes it
atomically as ``transcript.txt/.json/.srt/.vtt`` plus the raw provider answers.

Providers are ``Transcriber`` subclasses registered in ``PROVIDERS``: one abstract method,
``transcribe_chunk``, which makes exactly one HTTP request and raises only
``pipeline.errors.ProviderError`` subclasses. Instances are shared by worker threads.
The ``local`` provider (faster-whisper, optional install) needs no key and uploads nothing: it
decodes the original file itself, so ``transcribe_media`` hands it that file whole.

The JSON written to ``transcript.json`` is ``Transcript.to_dict(raw=False)``; translation reads it,
so its shape is a contract: text, language, duration, provider, model, has_timestamps, note,
segments [{id, start, end, text, speaker}] with ids 1..n, usage {audio_seconds, tokens}.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import json
import logging
import os
import re
import sys
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import requests

from pipeline import audio, httpbounds
from pipeline.config import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ConfigError, check_header_value,
                             make_parser, positive_int, run_main, setup_logging, with_env_note)
from pipeline.errors import (AccountError, PermanentError, ProviderError, RetryableError, TooLongError,
                             classify_http, from_openai_exception, from_requests_exception, redact, register_secret)
from pipeline.httpbounds import (DEFAULT_MAX_RESPONSE_BYTES, Deadline, max_response_bytes, read_sdk_stream,
                                 request_timeout)
from pipeline.languages import reported_language
from pipeline.limiter import RateLimitInfo, expect_rate_limit_headers, report_rate_limit
from pipeline.outputs import WrittenFile, write_files
from pipeline.settings import Settings  # main() only: the entry point's settings
from pipeline.subtitles import RTL_LANGUAGES, Cue, format_srt, format_vtt

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
# A request's total deadline (upload, processing, answer) when VERBATIM_REQUEST_TIMEOUT does not set
# one: a base plus a share of the audio's length, as providers take longer for longer audio.
DEADLINE_BASE_SECONDS = 300.0
DEADLINE_PER_AUDIO_SECOND = 0.5
OUTPUT_NAMES = {"txt": "transcript.txt", "json": "transcript.json", "srt": "transcript.srt",
                "vtt": "transcript.vtt", "raw": "transcript.raw.json.gz"}

# -- the transcript contract ----------------------------------------------------------------
@dataclass
class Segment:
    start: float
    end: float
    text: str
    speaker: str | None = None

    def to_dict(self, segment_id: int) -> dict:
        return {"id": segment_id, "start": round(self.start, 3), "end": round(self.end, 3),
                "text": self.text, "speaker": self.speaker}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Segment":
        return cls(float(data["start"]), float(data["end"]), str(data["text"]), data.get("speaker"))


@dataclass
class Transcript:
    text: str
    segments: list[Segment]
    language: str | None
    duration: float | None
    provider: str
    model: str
    usage: dict
    has_timestamps: bool
    note: str | None = None
    raw_responses: list = field(default_factory=list)

    def to_dict(self, *, raw: bool = True) -> dict:
        """The ``transcript.json`` shape; ``raw=True`` adds the provider answers (kept out of that file)."""
        data = {"text": self.text, "language": self.language,
                "duration": None if self.duration is None else round(self.duration, 3),
                "provider": self.provider, "model": self.model, "has_timestamps": self.has_timestamps,
                "note": self.note,
                "segments": [segment.to_dict(n) for n, segment in enumerate(self.segments, 1)],
                "usage": dict(self.usage)}
        if raw:
            data["raw_responses"] = list(self.raw_responses)
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> "Transcript":
        return cls(text=data["text"], segments=[Segment.from_dict(s) for s in data.get("segments", [])],
                   language=data.get("language"), duration=data.get("duration"),
                   provider=data["provider"], model=data["model"], usage=dict(data.get("usage") or {}),
                   has_timestamps=bool(data["has_timestamps"]), note=data.get("note"),
                   raw_responses=list(data.get("raw_responses") or []))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(raw=False), ensure_ascii=False, indent=2) + "\n"

    def to_txt(self) -> str:
        """One paragraph per speaker turn (``speaker_0: ...``) when speakers are known, else one line
        per segment."""
        if not self.segments:
            return self.text.strip() + "\n" if self.text.strip() else ""
        if not any(segment.speaker for segment in self.segments):
            return "".join(segment.text + "\n" for segment in self.segments)
        turns: list[tuple[str | None, list[str]]] = []
        for segment in self.segments:
            if turns and turns[-1][0] == segment.speaker:
                turns[-1][1].append(segment.text)
            else:
                turns.append((segment.speaker, [segment.text]))
        paragraphs = [f"{speaker}: {' '.join(texts)}" if speaker else " ".join(texts) for speaker, texts in turns]
        return "\n\n".join(paragraphs) + "\n"

    def _cues(self) -> list[Cue]:
        if not self.has_timestamps:
            raise ValueError(f"{self.provider}/{self.model} gave no timestamps: no subtitles")
        return [Cue(n, s.start, s.end, s.text) for n, s in enumerate(self.segments, 1)]

    def to_srt(self) -> str:
        return format_srt(self._cues(), rtl=self.language in RTL_LANGUAGES)

    def to_vtt(self) -> str:
        return format_vtt(self._cues(), rtl=self.language in RTL_LANGUAGES)


# -- providers ------------------------------------------------------------------------------
def _upload_name(path) -> str:
    """``audio.<ext>``: the provider needs the extension, never the original (private) name."""
    suffix = os.path.splitext(os.fsdecode(path))[1].lower()
    return "audio" + suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else "audio"


def _invalid_response(provider: str, what: str) -> RetryableError:
    return RetryableError(f"{provider}: invalid response body ({what})", error_class="invalid_response")


class Transcriber(ABC):
    """A speech-to-text provider. Capabilities are class attributes; the base class handles keys,
    models, limits and cost estimates. Subclasses implement ``transcribe_chunk`` only, and make it
    thread-safe: one instance serves every worker thread."""

    name: ClassVar[str]
    key_env_var: ClassVar[str]
    base_url_env_var: ClassVar[str]
    default_base_url: ClassVar[str]
    default_model: ClassVar[str]
    models: ClassVar[tuple[str, ...]]
    max_upload_bytes: int | None = None                        # per request; None: no limit
    max_chunk_seconds: Mapping[str, float] = {}                # per model; absent: no limit
    price_per_minute: ClassVar[Mapping[str, float]] = {}       # USD per audio minute, estimates
    text_only_models: ClassVar[frozenset[str]] = frozenset()   # models without timestamps
    decodes_media: ClassVar[bool] = False     # True: takes the original file, no prepared upload
    max_concurrency: int | None = None        # requests it runs at once (None: no limit of its own)
    total_deadline: float | None = None       # seconds per request; None: scaled by the audio
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    # The languages the archive expects (VERBATIM_LANGUAGES): a provider that can restrict its
    # detection to them does (the local engine); every answer is checked against them after.
    expected_languages: list[str] | None = None

    def __init__(self, *, api_key: str, base_url: str | None = None, model: str | None = None,
                 timeout: float = 600.0):
        model = model or self.default_model
        if model not in self.models:
            raise ConfigError(f"{self.name}: unknown model {model!r}; choose from {', '.join(self.models)}")
        if not api_key:
            raise ConfigError(f"{self.name}: no API key; set {self.key_env_var}")
        register_secret(api_key)
        check_header_value(self.key_env_var, api_key)
        self._api_key = api_key
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self.model = model
        self.timeout = timeout

    @classmethod
    def from_env(cls, env: Mapping | None = None, model: str | None = None, *, workers: int | None = None,
                 device: str | None = None, compute_type: str | None = None) -> "Transcriber":
        """Key and base URL from the environment; ``VERBATIM_<NAME>_MAX_UPLOAD_BYTES`` lowers the
        upload limit (tests force splitting with it). ``device`` and ``compute_type`` are for the
        local engine only; ``workers`` does not concern an HTTP provider."""
        env = {} if env is None else env
        if device or compute_type:
            raise ConfigError(f"--device and --compute-type are for the local provider, not {cls.name}")
        key = env.get(cls.key_env_var)
        if not key:
            raise ConfigError(f"{cls.name} needs an API key: set {cls.key_env_var} in the environment or .env")
        # VERBATIM_REQUEST_TIMEOUT bounds one request (seconds): a server that never answers
        # becomes a retryable timeout instead of a hung worker.
        total = request_timeout(env)
        transcriber = cls(api_key=key, base_url=env.get(cls.base_url_env_var) or None, model=model,
                          timeout=total or 600.0)
        limit_var = f"VERBATIM_{cls.name.upper()}_MAX_UPLOAD_BYTES"
        if env.get(limit_var):
            transcriber.max_upload_bytes = positive_int(limit_var, env[limit_var])
        transcriber.total_deadline = total
        transcriber.max_response_bytes = max_response_bytes(env)
        return transcriber

    def deadline(self, audio_path) -> Deadline:
        """The total deadline of one request for ``audio_path``: VERBATIM_REQUEST_TIMEOUT, else
        scaled by the audio's length (from its header; from its size where the header says none)."""
        seconds = self.total_deadline
        if seconds is None:
            info = audio.quick_probe(audio_path)
            length = (info.duration if info and info.duration
                      else os.path.getsize(audio_path) / audio.OPUS_BYTES_PER_SECOND)
            seconds = DEADLINE_BASE_SECONDS + DEADLINE_PER_AUDIO_SECOND * length
        return Deadline(seconds, self.name)

    def load(self) -> None:
        """Get ready before the first file (the local engine loads its model); HTTP providers: nothing."""

    def estimate_cost(self, audio_seconds: float, prompt: str | None = None) -> float:
        """Estimated USD for ``audio_seconds`` of audio (list prices; see ``price_per_minute``), with
        what ``prompt`` adds where a provider bills it."""
        return audio_seconds / 60.0 * self.price_per_minute.get(self.model, 0.0)

    def cost_notes(self, prompt: str | None) -> list[str]:
        """What the estimate leaves out or how ``prompt`` is used, for ``--dry-run`` to say."""
        return []

    @abstractmethod
    def transcribe_chunk(self, audio_path: str, *, language: str | None = None,
                         prompt: str | None = None) -> Transcript:
        """Transcribe one prepared file with exactly one request; times relative to the file."""


class OpenAITranscriber(Transcriber):
    """OpenAI (or any OpenAI-compatible server) through the official SDK, its retries switched off:
    the runner retries in one layer."""

    name = "openai"
    key_env_var = "OPENAI_API_KEY"
    base_url_env_var = "OPENAI_BASE_URL"
    default_base_url = "https://api.openai.com/v1"
    default_model = "whisper-1"
    models = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-transcribe-diarize")
    # "Maximum content size limit (26214400)" counts the whole request body, so the file gets that
    # less room for the multipart boundaries and form fields (prompt included: at most 224 tokens).
    REQUEST_LIMIT_BYTES = 26214400
    MULTIPART_RESERVE_BYTES = 64 * 1024
    max_upload_bytes = REQUEST_LIMIT_BYTES - MULTIPART_RESERVE_BYTES
    # gpt-4o models refuse audio "longer than 1400 seconds which is the maximum for this model"
    # (reported: github.com/rishikanthc/Scriberr/issues/477, github.com/fastrepl/anarlog/pull/7135;
    # OpenAI's help centre says only that they "may use different validation, such as duration").
    # Chunks are planned 10 s below it; a refusal all the same makes the chunk smaller (TooLongError).
    # The diarize model has the same 1400 s cap (github.com/fastrepl/anarlog/pull/7135).
    max_chunk_seconds = {"gpt-4o-transcribe": 1390.0, "gpt-4o-mini-transcribe": 1390.0,
                         "gpt-4o-transcribe-diarize": 1390.0}
    # Diarize: "priced the same (estimated) cost of regular gpt-4o-transcribe" (ndurner.github.io,
    # 2025-10-24, "Transcription and Diarization with new GPT-4o").
    price_per_minute = {"whisper-1": 0.006, "gpt-4o-transcribe": 0.006, "gpt-4o-mini-transcribe": 0.003,
                        "gpt-4o-transcribe-diarize": 0.006}
    text_only_models = frozenset({"gpt-4o-transcribe", "gpt-4o-mini-transcribe"})
    diarize_models = frozenset({"gpt-4o-transcribe-diarize"})

    def __init__(self, *, api_key: str, base_url: str | None = None, model: str | None = None,
                 timeout: float = 600.0):
        super().__init__(api_key=api_key, base_url=base_url, model=model, timeout=timeout)
        import openai  # here, not at the top: the SDK takes 0.6 s to import and local runs never need it

        # One client for all threads (the SDK client is thread-safe).
        self._client = openai.OpenAI(api_key=api_key, base_url=self.base_url, max_retries=0,
                                     timeout=openai.Timeout(timeout, connect=CONNECT_TIMEOUT))
        # The SDK imports its audio resources on first use; do it here, once, rather than in every
        # worker thread at the same moment of the first wave.
        self._client.audio.transcriptions.with_streaming_response  # noqa: B018
        expect_rate_limit_headers(self.name)

    def transcribe_chunk(self, audio_path, *, language=None, prompt=None) -> Transcript:
        import openai

        text_only = self.model in self.text_only_models
        params = self._params(language, prompt)
        deadline = self.deadline(audio_path)
        with httpbounds.UploadFile(audio_path, deadline) as handle:
            try:
                left = deadline.remaining()
                with self._client.audio.transcriptions.with_streaming_response.create(
                        file=(_upload_name(audio_path), handle),
                        timeout=openai.Timeout(min(self.timeout, left), connect=min(CONNECT_TIMEOUT, left)),
                        **params) as response:
                    report_rate_limit(RateLimitInfo.from_headers(response.headers))
                    data = json.loads(read_sdk_stream(response, deadline=deadline, limit=self.max_response_bytes))
            except (openai.OpenAIError, ValueError) as exc:
                report_rate_limit(RateLimitInfo.from_headers(getattr(getattr(exc, "response", None), "headers", None)))
                if isinstance(exc.__cause__, ProviderError):  # the upload's deadline, wrapped by the SDK
                    raise exc.__cause__ from exc
                raise from_openai_exception(exc, provider=self.name) from exc
        return self._parse(data, language, text_only)

    def _params(self, language: str | None, prompt: str | None) -> dict:
        """Request parameters the model takes (openai-python types/audio/transcription_create_params.py):
        the diarize model needs ``diarized_json`` "to receive speaker annotations" and
        ``chunking_strategy`` for "inputs longer than 30 seconds", and takes no ``prompt`` nor
        ``timestamp_granularities``; gpt-4o models answer ``json`` only."""
        if self.model in self.diarize_models:
            params = {"model": self.model, "response_format": "diarized_json", "chunking_strategy": "auto"}
        elif self.model in self.text_only_models:
            params = {"model": self.model, "response_format": "json"}
        else:
            params = {"model": self.model, "response_format": "verbose_json", "timestamp_granularities": ["segment"]}
        if language:
            params["language"] = language
        if prompt and self.model not in self.diarize_models:
            params["prompt"] = prompt
        return params

    def _parse(self, data, language: str | None, text_only: bool) -> Transcript:
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise _invalid_response(self.name, "no text")
        try:  # diarized segments (TranscriptionDiarizedSegment) carry a speaker label: A, B, ...
            segments = [Segment(float(s["start"]), float(s["end"]), str(s["text"]).strip(),
                                f"speaker_{s['speaker']}" if s.get("speaker") else None)
                        for s in data.get("segments") or []]
        except (KeyError, TypeError, ValueError) as exc:
            raise _invalid_response(self.name, "malformed segments") from exc
        return Transcript(
            text=data["text"].strip(), segments=[s for s in segments if s.text],
            language=reported_language(data.get("language")) or language,
            duration=data.get("duration"), provider=self.name, model=self.model,
            usage=self._usage(data.get("usage")), has_timestamps=not text_only,
            note=f"{self.model} returns text only: no subtitles" if text_only else None,
            raw_responses=[data])

    @staticmethod
    def _usage(usage) -> dict:
        """``usage.seconds`` (whisper-1) or token counts (gpt-4o models)."""
        if not isinstance(usage, dict):
            return {}
        result = {}
        if usage.get("type") == "duration" and isinstance(usage.get("seconds"), (int, float)):
            result["audio_seconds"] = float(usage["seconds"])
        if isinstance(usage.get("total_tokens"), int):
            result["tokens"] = usage["total_tokens"]
        return result


# ElevenLabs words are grouped into subtitle-sized segments.
PAUSE_SECONDS = 1.0          # a longer pause starts a new segment
SENTENCE_MIN_CHARS = 25      # a sentence end closes a segment once it is this long
MAX_SEGMENT_SECONDS = 15.0
MAX_SEGMENT_CHARS = 250


def _breaks_before(segment: Segment, start: float, end: float, speaker, text: str) -> bool:
    body = segment.text.strip()
    return (speaker != segment.speaker
            or start - segment.end > PAUSE_SECONDS
            or (body.rstrip("\"'»«“”)").endswith((".", "?", "!")) and len(body) >= SENTENCE_MIN_CHARS)
            or end - segment.start > MAX_SEGMENT_SECONDS
            or len(body) + 1 + len(text) > MAX_SEGMENT_CHARS)


def _timed(value) -> float | None:
    return None if value is None else float(value)


def place_untimed(words: list[dict]) -> list[dict]:
    """Words with ``start`` and ``end`` filled in: an item without times (the official SDK types them
    optional: elevenlabs-python ``src/elevenlabs/types/speech_to_text_word_response_model.py``)
    starts where the previous timed item ended and ends where the next one starts."""
    placed = [dict(item, start=_timed(item.get("start")), end=_timed(item.get("end"))) for item in words]
    previous_end = 0.0
    for index, item in enumerate(placed):
        if item["start"] is None:
            item["start"] = previous_end
        if item["end"] is None:
            following = next((w["start"] for w in placed[index + 1:] if w["start"] is not None), None)
            item["end"] = max(item["start"], following if following is not None else item["start"])
        previous_end = max(previous_end, item["end"])
    return placed


def group_words(words: list[dict]) -> list[Segment]:
    """Segments from Scribe's word list: a new one at a speaker change, a pause, a sentence end once
    the segment has some length, or at the length limits. Spacing items join words as sent; items
    without times are placed between their neighbours."""
    segments: list[Segment] = []
    for item in place_untimed(words):
        text = str(item.get("text") or "")
        if item.get("type") == "spacing":
            if segments:
                segments[-1].text += text
            continue
        start, end, speaker = float(item["start"]), float(item["end"]), item.get("speaker_id")
        if not segments or _breaks_before(segments[-1], start, end, speaker, text):
            segments.append(Segment(start, end, "", speaker))
        segments[-1].text += text
        segments[-1].end = max(segments[-1].end, end)
    cleaned = (Segment(s.start, s.end, s.text.strip(), s.speaker) for s in segments)
    return [s for s in cleaned if s.text]


class _MultipartFile:
    """A multipart/form-data body that streams its file from disk, with a known length.

    ``requests`` would build the whole body in memory; this keeps hours of audio on disk, and the
    known length avoids chunked transfer encoding.
    """

    def __init__(self, fields: Mapping[str, str | list[str]], filename: str, path, deadline: Deadline | None = None):
        boundary = uuid.uuid4().hex
        pairs = [(name, item) for name, value in fields.items()
                 for item in (value if isinstance(value, list) else [value])]  # a list: one part per item
        head = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                        f"{value}\r\n".encode() for name, value in pairs)
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        self.content_type = f"multipart/form-data; boundary={boundary}"
        self._file = open(path, "rb") if deadline is None else httpbounds.UploadFile(path, deadline)
        self._length = len(head) + os.fstat(self._file.fileno()).st_size + len(tail)
        self._parts = [io.BytesIO(head), self._file, io.BytesIO(tail)]

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        pieces = []
        while self._parts and size != 0:
            data = self._parts[0].read(size)
            if not data:
                self._parts.pop(0)
                continue
            pieces.append(data)
            if size > 0:
                size -= len(data)
        return b"".join(pieces)

    def __iter__(self):
        while block := self.read(1 << 16):
            yield block

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


class ElevenLabsTranscriber(Transcriber):
    """ElevenLabs Scribe over ``requests`` (one Session per thread), diarized, word timestamps."""

    name = "elevenlabs"
    key_env_var = "ELEVENLABS_API_KEY"
    base_url_env_var = "ELEVENLABS_BASE_URL"
    default_base_url = "https://api.elevenlabs.io"
    default_model = "scribe_v1"
    models = ("scribe_v1", "scribe_v2")
    max_upload_bytes = None  # 3 GB / 10 h per file: never split
    price_per_minute = {"scribe_v1": 0.40 / 60, "scribe_v2": 0.40 / 60}  # about USD 0.40 per hour
    diarize = True
    # Keyterms bias recognition towards names and places. "Keyterm prompting is available with the
    # Scribe v2 model ... and comes at an additional cost" (elevenlabs.io/docs/eleven-api/guides/how-to/
    # speech-to-text/batch/keyterm-prompting). Limits, the stricter of that page (1000 per batch
    # request, 50 characters) and the official SDK (elevenlabs-python src/elevenlabs/speech_to_text/
    # raw_client.py: "cannot exceed 100", "less than 50 characters", "at most 5 words").
    keyterm_models = frozenset({"scribe_v2"})
    MAX_KEYTERMS = 100
    MAX_KEYTERM_CHARS = 49
    MAX_KEYTERM_WORDS = 5
    # The surcharge is priced on ElevenLabs' pricing page, not in its API docs: unknown unless set
    # (VERBATIM_ELEVENLABS_KEYTERMS_USD_PER_HOUR).
    keyterm_price_per_hour: float | None = None

    def __init__(self, *, api_key: str, base_url: str | None = None, model: str | None = None,
                 timeout: float = 600.0):
        super().__init__(api_key=api_key, base_url=base_url, model=model, timeout=timeout)
        self._session = httpbounds.ThreadSessions()  # one requests.Session per worker thread
        self._warned_no_keyterms = False

    @classmethod
    def from_env(cls, env=None, model=None, **engine) -> "Transcriber":
        env = {} if env is None else env
        transcriber = super().from_env(env, model, **engine)
        price = env.get("VERBATIM_ELEVENLABS_KEYTERMS_USD_PER_HOUR")
        if price:
            try:
                transcriber.keyterm_price_per_hour = float(price)
            except ValueError:
                raise ConfigError(f"VERBATIM_ELEVENLABS_KEYTERMS_USD_PER_HOUR must be a number, not {price!r}") from None
        return transcriber

    @classmethod
    def keyterms(cls, prompt: str | None) -> list[str]:
        """Names and places from ``--prompt`` (separated by commas, semicolons or lines) within the
        documented limits; a term too long for them is left out."""
        terms: list[str] = []
        for term in re.split(r"[,;\n]", prompt or ""):
            term = " ".join(term.split())
            if term and len(term) <= cls.MAX_KEYTERM_CHARS and len(term.split()) <= cls.MAX_KEYTERM_WORDS \
                    and term not in terms:
                terms.append(term)
        return terms[:cls.MAX_KEYTERMS]

    def cost_notes(self, prompt: str | None) -> list[str]:
        if not self.keyterms(prompt):
            return []
        if self.model not in self.keyterm_models:
            return [f"--prompt is not sent: keyterms need scribe_v2 (this run uses {self.model}; --model scribe_v2)"]
        if self.keyterm_price_per_hour is None:
            return ["keyterms bill extra, not included in this estimate (ElevenLabs prices them on its pricing "
                    "page; set VERBATIM_ELEVENLABS_KEYTERMS_USD_PER_HOUR to include them)"]
        return [f"includes keyterms at ${self.keyterm_price_per_hour:g} per hour of audio"]

    def estimate_cost(self, audio_seconds: float, prompt: str | None = None) -> float:
        cost = super().estimate_cost(audio_seconds)
        if self.keyterm_price_per_hour and self.model in self.keyterm_models and self.keyterms(prompt):
            cost += audio_seconds / 3600.0 * self.keyterm_price_per_hour
        return cost


    def transcribe_chunk(self, audio_path, *, language=None, prompt=None) -> Transcript:
        """``prompt``: names and places, sent as ``keyterms`` (scribe_v2 only; see ``cost_notes``)."""
        fields: dict[str, str | list[str]] = {"model_id": self.model, "diarize": "true" if self.diarize else "false",
                                              "timestamps_granularity": "word"}
        if language:
            fields["language_code"] = language
        if self.model in self.keyterm_models and self.keyterms(prompt):
            fields["keyterms"] = self.keyterms(prompt)
        elif prompt and self.model not in self.keyterm_models and not self._warned_no_keyterms:
            self._warned_no_keyterms = True  # once per run, not once per chunk
            log.warning("%s: --prompt is not sent: keyterms need scribe_v2 (this run uses %s)", self.name, self.model)
        deadline = self.deadline(audio_path)
        try:
            with _MultipartFile(fields, _upload_name(audio_path), audio_path, deadline) as body:
                status, headers, content = httpbounds.post(
                    self._session(), f"{self.base_url}/v1/speech-to-text", data=body,
                    headers={"xi-api-key": self._api_key, "Content-Type": body.content_type},
                    deadline=deadline, limit=self.max_response_bytes, read_timeout=self.timeout)
            report_rate_limit(RateLimitInfo.from_headers(headers))
            if status != 200:
                raise classify_http(status, content.decode("utf-8", "replace"), headers, provider=self.name)
            data = json.loads(content)
        except (requests.RequestException, ValueError) as exc:
            raise from_requests_exception(exc, provider=self.name) from exc
        return self._parse(data, language)

    def _parse(self, data, language: str | None) -> Transcript:
        if not isinstance(data, dict) or not isinstance(data.get("text"), str) \
                or not isinstance(data.get("words", []), list):
            raise _invalid_response(self.name, "no text or words")
        try:
            segments = group_words(data.get("words") or [])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _invalid_response(self.name, "malformed words") from exc
        return Transcript(text=data["text"].strip(), segments=segments,
                          language=reported_language(data.get("language_code")) or language,
                          duration=None, provider=self.name, model=self.model, usage={},
                          has_timestamps=True, raw_responses=[data])


LOCAL_INSTALL_HINT = "pip install -r requirements.txt (faster-whisper is part of it)"


class LocalWhisperTranscriber(Transcriber):
    """Whisper on this machine through faster-whisper (``local_whisper``): no key, no upload, no cost.

    ``model`` is a Whisper size name (downloaded on first use and cached) or a CTranslate2 model
    folder (offline). One model per process serves every thread; ``workers`` becomes the engine's
    own parallelism and ``max_concurrency``. faster-whisper is imported only when this provider is
    built, so everything else works without the optional install.
    """

    name = "local"
    key_env_var = None
    base_url_env_var = None
    default_base_url = None
    default_model = None  # by device: local_whisper.DEFAULT_MODELS
    models = ()  # any Whisper size name or model folder; checked by the engine
    decodes_media = True

    def __init__(self, *, model: str | None = None, device: str | None = None, compute_type: str | None = None,
                 workers: int | None = None):
        engine = _local_engine_module()
        self._engine = engine.engine_for(engine.settings_for(model, device=device,
                                                             compute_type=compute_type, workers=workers))
        self.settings = self._engine.settings
        self.model = self.settings.label
        self.max_concurrency = self.settings.workers
        self.base_url, self.timeout = None, None
        self.alternative: str | None = None  # said when loading fails, if chosen for want of a key

    @classmethod
    def from_env(cls, env=None, model=None, *, workers=None, device=None, compute_type=None) -> "Transcriber":
        """Flags first, then ``VERBATIM_LOCAL_MODEL``, ``_DEVICE``, ``_COMPUTE_TYPE`` and
        ``_MAX_CONCURRENCY`` (a cap on ``workers``) from the environment."""
        env = {} if env is None else env
        cap = env.get("VERBATIM_LOCAL_MAX_CONCURRENCY")
        if cap:
            workers = min(workers or 1, positive_int("VERBATIM_LOCAL_MAX_CONCURRENCY", cap))
        return cls(model=model or env.get("VERBATIM_LOCAL_MODEL") or None,
                   device=device or env.get("VERBATIM_LOCAL_DEVICE") or None,
                   compute_type=compute_type or env.get("VERBATIM_LOCAL_COMPUTE_TYPE") or None, workers=workers)

    @staticmethod
    def installed() -> bool:
        return importlib.util.find_spec("faster_whisper") is not None

    def load(self) -> None:
        try:
            self._engine.load()
        except ConfigError as exc:
            if self.alternative:
                raise ConfigError(f"{exc}. {self.alternative}") from exc
            raise
        # A GPU that could not run moved the engine to the CPU: its parallelism is the CPU's now.
        self.settings = self._engine.settings
        self.max_concurrency = self.settings.workers

    def transcribe_chunk(self, audio_path, *, language=None, prompt=None) -> Transcript:
        """The whole recording, decoded and transcribed window by window by the engine."""
        try:
            self.load()
        except ConfigError as exc:  # in a worker: stop the run as for a rejected key; no file is at fault
            raise AccountError(str(exc), error_class="local_model") from exc
        result = self._engine.transcribe(audio_path, language=language, prompt=prompt,
                                         expected=self.expected_languages)
        segments = [Segment(s.start, s.end, s.text) for s in result.segments]
        return Transcript(text=" ".join(s.text for s in segments), segments=segments,
                          language=reported_language(result.language) or language, duration=result.duration,
                          provider=self.name, model=self.model, usage={}, has_timestamps=True,
                          raw_responses=result.raw)


def _local_engine_module():
    if not LocalWhisperTranscriber.installed():
        raise ConfigError(f"the local provider needs faster-whisper, which is not installed: {LOCAL_INSTALL_HINT}")
    try:
        import local_whisper
    except ImportError as exc:
        raise ConfigError(f"the local provider could not import faster-whisper ({exc}); "
                          f"reinstall it: {LOCAL_INSTALL_HINT}") from exc
    return local_whisper


# Registry, in auto-selection order: a cloud provider whose key is set, else the local engine.
PROVIDERS: dict[str, type[Transcriber]] = {
    OpenAITranscriber.name: OpenAITranscriber,
    ElevenLabsTranscriber.name: ElevenLabsTranscriber,
    LocalWhisperTranscriber.name: LocalWhisperTranscriber,
}


def choose_transcriber(name: str | None = None, env: Mapping | None = None, model: str | None = None,
                       **engine) -> Transcriber:
    """``name``, else ``$VERBATIM_TRANSCRIPTION_PROVIDER``, else the first provider whose key is set,
    else ``local`` when faster-whisper is installed. ``engine``: ``workers``, ``device`` and
    ``compute_type`` for the local engine (see ``Transcriber.from_env``)."""
    env = {} if env is None else env  # the settings' snapshot (Settings.env); never the process environment
    name = (name or env.get("VERBATIM_TRANSCRIPTION_PROVIDER") or "").strip().lower()
    if name:
        if name not in PROVIDERS:
            raise ConfigError(f"unknown transcription provider {name!r}; choose from {', '.join(PROVIDERS)}")
        return PROVIDERS[name].from_env(env, model, **engine)
    for cls in PROVIDERS.values():
        if cls.key_env_var and env.get(cls.key_env_var):
            return cls.from_env(env, model, **engine)
    keys = " or ".join(cls.key_env_var for cls in PROVIDERS.values() if cls.key_env_var)
    if LocalWhisperTranscriber.installed():
        local = LocalWhisperTranscriber.from_env(env, model, **engine)
        local.alternative = f"No cloud key is set: set {keys} (environment or .env) to use a cloud provider instead"
        return local
    raise ConfigError(f"no transcription provider configured: set {keys} "
                      "(environment or .env), or VERBATIM_TRANSCRIPTION_PROVIDER, "
                      f"or install the local engine for offline transcription: {LOCAL_INSTALL_HINT}")


def check_language(transcriber: Transcriber, language: str | None) -> None:
    """Refuse, before anything runs, a spoken language the model cannot transcribe: an English-only
    Whisper (``*.en``) given ``--language de`` writes English words and records "de"."""
    if not language or language == "en" or transcriber.name != LocalWhisperTranscriber.name:
        return
    if _local_engine_module().english_only(transcriber.settings.model):
        raise ConfigError(f"local: {transcriber.model!r} is an English-only Whisper model and cannot transcribe "
                          f"--language {language}; choose a multilingual model (e.g. --model turbo, small, "
                          "large-v3) or leave out --language")


# -- the per-file job -----------------------------------------------------------------------
def _call_now(fn: Callable[[], Transcript], key: dict | None = None) -> Transcript:
    return fn()


def transcribe_media(path, transcriber: Transcriber, *, language: str | None = None,
                     prompt: str | None = None, call: Callable | None = None,
                     content_id: str | None = None) -> Transcript:
    """Transcribe one recording: prepare its audio, send each chunk through ``call``, merge.

    ``call(fn, key=...)`` runs one provider request (the runner passes its rate limiter and spool;
    errors propagate, nothing is retried here). With ``content_id`` (the recording's content
    hash) each request gets a key naming what its answer depends on, so a spooled answer is found
    again. The working folder with the chunks is removed whatever happens.
    """
    call = call or _call_now

    def key(chunk: audio.Chunk) -> dict | None:
        if content_id is None:
            return None
        return {"stage": "transcription", "content": content_id, "offset": round(chunk.offset, 3),
                "duration": round(chunk.duration or 0.0, 3), "provider": transcriber.name,
                "model": transcriber.model, "language": language, "prompt": prompt,
                # the local engine's detection depends on them; a cloud answer does not
                "expected": transcriber.expected_languages if transcriber.decodes_media else None}

    info = audio.probe(path)
    audio.check_complete(info, path)
    if transcriber.decodes_media:  # the local engine reads the original itself, as one request
        if not info.has_audio:
            raise PermanentError("video without an audio track", error_class="no_audio")
        whole = audio.Chunk(os.fsdecode(path), 0.0, info.duration)
        part = call(functools.partial(transcriber.transcribe_chunk, whole.path, language=language, prompt=prompt),
                    key=key(whole))
        return merge_chunks([(whole, part)], duration=info.duration, language=language)
    with tempfile.TemporaryDirectory(prefix="verbatim-") as workdir:
        chunks = audio.prepare(path, workdir, max_upload_bytes=transcriber.max_upload_bytes,
                               max_chunk_seconds=transcriber.max_chunk_seconds.get(transcriber.model),
                               info=info)
        log.debug("%d chunk(s) for %s/%s", len(chunks), transcriber.name, transcriber.model)
        send = functools.partial(_send_chunk, transcriber, call, workdir, language=language, prompt=prompt, key=key)
        pieces = [pair for chunk in chunks for pair in send(chunk)]
    return merge_chunks(pieces, duration=info.duration, language=language)


# A chunk refused as too long is cut again at most this often (each cut at most halves it).
MAX_RESPLITS = 4


def _send_chunk(transcriber: Transcriber, call: Callable, workdir: str, chunk: audio.Chunk, *,
                language: str | None, prompt: str | None, key: Callable,
                depth: int = 0) -> list[tuple[audio.Chunk, Transcript]]:
    """One chunk's transcript; when the provider says the chunk is too long, the chunk is cut
    shorter and each piece sent instead (and the model's chunks stay that short from then on).
    ``key(chunk)``: the request's identity, for the spool."""
    try:
        return [(chunk, call(functools.partial(transcriber.transcribe_chunk, chunk.path,
                                                language=language, prompt=prompt), key=key(chunk)))]
    except TooLongError as exc:
        shorter = _shorter(chunk.duration, exc.max_seconds)
        if depth >= MAX_RESPLITS or shorter < audio.MIN_CHUNK_SECONDS:
            raise
        log.info("%s/%s: %.0f s chunk refused as too long; cutting to %.0f s", transcriber.name,
                 transcriber.model, chunk.duration, shorter)
        transcriber.max_chunk_seconds = {**transcriber.max_chunk_seconds, transcriber.model: shorter}
        pieces = audio.resplit(chunk, os.path.join(workdir, f"resplit-{uuid.uuid4().hex}"), shorter,
                               max_upload_bytes=transcriber.max_upload_bytes)
        return [pair for piece in pieces
                for pair in _send_chunk(transcriber, call, workdir, piece, language=language, prompt=prompt,
                                        key=key, depth=depth + 1)]


def _shorter(seconds: float, provider_max: float | None) -> float:
    """Half the refused length, and below the maximum the provider named (5% off for cutting slack)."""
    limit = seconds / 2
    return min(limit, provider_max * 0.95) if provider_max else limit


def merge_chunks(pieces: list[tuple[audio.Chunk, Transcript]], *, duration: float | None,
                 language: str | None = None) -> Transcript:
    """One transcript from chunk transcripts: times shifted by each chunk's offset, texts joined,
    usage summed. A text-only chunk becomes one segment spanning the chunk, so readers that walk
    segments (translation) still get all text; ``has_timestamps`` stays False for them."""
    parts = [part for _chunk, part in pieces]
    segments = []
    for number, (chunk, part) in enumerate(pieces, 1):
        if part.has_timestamps:
            segments += [Segment(s.start + chunk.offset, s.end + chunk.offset, s.text,
                                 _chunk_speaker(s.speaker, number, len(pieces)))
                         for s in part.segments if s.text]
        elif part.text:
            segments.append(Segment(chunk.offset, chunk.offset + chunk.duration, part.text))
    return Transcript(
        text=" ".join(part.text for part in parts if part.text), segments=segments,
        language=next((part.language for part in parts if part.language), language),
        duration=duration, provider=parts[0].provider, model=parts[0].model,
        usage=_sum_usage(pieces), has_timestamps=all(part.has_timestamps for part in parts),
        note=parts[0].note,
        raw_responses=[{"offset": chunk.offset, "duration": chunk.duration, "response": raw}
                       for chunk, part in pieces for raw in part.raw_responses])


def _chunk_speaker(speaker: str | None, number: int, chunks: int) -> str | None:
    """A provider labels speakers per request: with several chunks, "speaker_A" of one chunk need
    not be "speaker_A" of the next, so the label says its chunk."""
    return f"{speaker}_part{number}" if speaker and chunks > 1 else speaker


def _sum_usage(pieces) -> dict:
    """Summed usage; a chunk whose provider reports no audio seconds counts its own length."""
    total: dict = {}
    for chunk, part in pieces:
        usage = {"audio_seconds": chunk.duration, **part.usage}
        for key, value in usage.items():
            total[key] = total.get(key, 0) + value
    if "audio_seconds" in total:
        total["audio_seconds"] = round(total["audio_seconds"], 3)
    return total


# -- output files ---------------------------------------------------------------------------
def write_transcript_outputs(transcript: Transcript, folder, *, root, staging=None) -> dict[str, WrittenFile]:
    """Write every format atomically under ``root`` (into ``staging`` first, if given); subtitles
    only when there are timestamps (a stale subtitle from an earlier run with another model is
    removed)."""
    contents: dict[str, str | bytes] = {"txt": transcript.to_txt(), "json": transcript.to_json()}
    stale: tuple[str, ...] = ()
    if transcript.has_timestamps:
        contents["srt"], contents["vtt"] = transcript.to_srt(), transcript.to_vtt()
    else:
        stale = (OUTPUT_NAMES["srt"], OUTPUT_NAMES["vtt"])
    # A provider may echo what it was sent (a key among it): the raw answers are redacted too.
    raw = redact(json.dumps(transcript.raw_responses, ensure_ascii=False, sort_keys=True)).encode("utf-8")
    contents["raw"] = gzip.compress(raw, mtime=0)  # mtime 0: same answers, same bytes, same hash
    written = write_files(folder, {OUTPUT_NAMES[key]: data for key, data in contents.items()}, root=root,
                          staging=staging, remove=stale)
    return {key: written[OUTPUT_NAMES[key]] for key in contents}


# -- standalone command line ----------------------------------------------------------------
RENDERERS = {"txt": Transcript.to_txt, "json": Transcript.to_json, "srt": Transcript.to_srt,
             "vtt": Transcript.to_vtt}


def build_parser():
    parser = make_parser(
        "Transcribe one audio or video file and print the transcript (no database).",
        "python transcription.py interview.mp4 --provider openai --language de --format srt > interview.srt")
    parser.add_argument("file", help="audio or video file (put -- before a name that starts with '-')")
    parser.add_argument("--provider", choices=sorted(PROVIDERS),
                        help="default: $VERBATIM_TRANSCRIPTION_PROVIDER, else the first with a key set")
    parser.add_argument("--model", help="provider model; local: a Whisper size (tiny ... large-v3, turbo) "
                        "or a CTranslate2 model folder (default: the provider's default)")
    add_local_arguments(parser)
    parser.add_argument("--language", help="spoken language, ISO 639-1 (default: detected)")
    parser.add_argument("--prompt", help="vocabulary hint: names and terms, comma-separated (OpenAI, local; "
                                         "ElevenLabs scribe_v2 as keyterms, billed extra)")
    parser.add_argument("--format", choices=sorted(RENDERERS), default="txt", help="output format (default: txt)")
    parser.add_argument("--env-file", metavar="PATH", help="settings file to load (default: ./.env)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return parser


def add_local_arguments(parser) -> None:
    """``--device`` and ``--compute-type``, for the local engine."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="local provider: where Whisper runs (default: $VERBATIM_LOCAL_DEVICE, else auto)")
    parser.add_argument("--compute-type", metavar="TYPE",
                        help="local provider: CTranslate2 compute type (default: int8 on CPU, float16 on GPU)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not os.path.isfile(args.file):
            raise ConfigError(f"{args.file!r}: no such file")
        settings = Settings.load(args)
        setup_logging(settings.debug)
        transcriber = choose_transcriber(args.provider, settings.env, args.model, device=args.device,
                                         compute_type=args.compute_type)
        language = settings.language(args.language)
        check_language(transcriber, language)
        if args.format in ("srt", "vtt") and transcriber.model in transcriber.text_only_models:
            raise ConfigError(f"--format {args.format} needs timestamps; {transcriber.model} returns text only")
        log.debug("transcribing %r with %s/%s", args.file, transcriber.name, transcriber.model)
        transcript = transcribe_media(args.file, transcriber, language=language, prompt=args.prompt)
    except (ConfigError, AccountError) as exc:
        print(f"transcription.py: {with_env_note(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except ProviderError as exc:
        print(f"transcription.py: {args.file!r} failed [{exc.error_class}]: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if not transcript.text.strip():
        log.warning("%s: no speech found (the transcript is empty)", args.file)
    sys.stdout.write(RENDERERS[args.format](transcript))
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
