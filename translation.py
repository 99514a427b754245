#!/usr/bin/env python3
"""Translate verbatim transcripts into English, German or Hebrew; accept only provably right languages.

A transcript (``transcript.json``, a ``.txt`` or an ``.srt``/``.vtt``) becomes a list of units,
one per segment, cue or line. Units are sent in batches within each provider's limits, cut only
between units, with the preceding text as context, and reassembled in order. A provider that
answers a different number of units than it was sent, or stops at its token limit
(``finish_reason`` "length"), is never trusted: that batch is sent again in halves, down to single
units. A translator that lacks the target language is refused (or replaced by the fallback) at start.

A translation is accepted only after ``validate_translation``: every non-empty unit has a
non-empty translation, the total length is plausible, and the text is provably in the target
language (Hebrew by script, the others with lingua). A predecessor stored English text as
"Hebrew" hundreds of times; here such a result raises ``PermanentError("wrong_language")`` or goes
to the configured fallback provider. Units already in the target language are kept as they are
and not sent; a document already in the target language is copied without any request.

Translators do exactly one HTTP request per ``translate_units`` call and never retry: the
runner's ``call`` wrapper (a shared rate limiter) waits out 429s and the job queue retries the
rest. Errors are classified once into ``pipeline.errors`` kinds.

Run standalone (no database) to translate one file to stdout::

    python translation.py output/ab12cd34/transcript.json --to he --format srt
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import requests
from lingua import Language, LanguageDetectorBuilder

from pipeline import httpbounds
from pipeline.config import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError, check_header_value,
                             make_parser, run_main, setup_logging)
from pipeline.errors import (MAX_INLINE_WAIT_SECONDS, AccountError, PermanentError, ProviderError,
                             RetryableError, classify_http, from_openai_exception, from_requests_exception,
                             register_secret, retry_delay)
from pipeline.httpbounds import (DEFAULT_MAX_RESPONSE_BYTES, Deadline, max_response_bytes, read_sdk_stream,
                                 request_timeout)
from pipeline.languages import LANGUAGE_NAMES, SUPPORTED_LANGUAGES, language_code, language_name
from pipeline.limiter import RateLimitInfo, expect_rate_limit_headers, report_rate_limit
from pipeline.outputs import WrittenFile, write_files
from pipeline.settings import Settings  # main() only: the entry point's settings
from pipeline.subtitles import BIDI_MARKS, RTL_LANGUAGES, Cue, SubtitleError, format_srt, format_vtt, parse_srt, parse_vtt

log = logging.getLogger("translation")

# A translation request's total deadline where VERBATIM_REQUEST_TIMEOUT does not set one.
DEFAULT_TIMEOUT = 120.0

FORMATS = ("txt", "json", "srt", "vtt")
RLM = "\u200f"  # RIGHT-TO-LEFT MARK: makes a plain-text line render right to left

# Validation thresholds.
HEBREW_SHARE = 0.6             # Hebrew-script letters among all letters for a Hebrew(-script) text
HEBREW_SCRIPT_LANGUAGES = {"he", "yi"}
MIN_UNIT_WORDS = 4             # shorter units are too short for a confident per-unit language guess
MAX_FOREIGN_SHARE = 0.2        # share of the output (by characters) allowed in a confidently other language
LENGTH_RATIO = (0.3, 3.0)      # translated/source characters
MIN_CHARS_FOR_LENGTH_CHECK = 200

MAX_UNIT_CHARS = 1000          # untimed text: longer lines are cut at sentence ends into units of this size
CONTEXT_CHARS = 600            # preceding text sent along as context (DeepL `context`, chat "Context")
DETECT_CHARS = 20_000          # lingua's verdict on a long text does not change after this much


# -- source documents ---------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    text: str
    start: float | None = None
    end: float | None = None
    speaker: str | None = None


@dataclass
class SourceDocument:
    units: list[Unit]
    language: str | None
    has_timestamps: bool

    @property
    def text(self) -> str:
        return "\n".join(unit.text for unit in self.units if unit.text)


_SPEAKER_RE = re.compile(r"^(speaker_\w+):\s+(.*)$")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?…])\s+")


def _clean(text: str) -> str:
    """One line without bidi marks: units travel as single numbered lines, outputs add marks back."""
    return " ".join(text.translate(BIDI_MARKS).split())


def _bad_source(path, reason: str) -> PermanentError:
    return PermanentError(f"{path}: not a usable transcript: {reason}", error_class="bad_source")


def _split_long(text: str, speaker: str | None) -> list[Unit]:
    """Cut an over-long untimed line at sentence ends, so no single unit outgrows a request."""
    if len(text) <= MAX_UNIT_CHARS:
        return [Unit(text, speaker=speaker)]
    units, current = [], ""
    for sentence in _SENTENCE_END_RE.split(text):
        if current and len(current) + 1 + len(sentence) > MAX_UNIT_CHARS:
            units.append(Unit(current, speaker=speaker))
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    return units + [Unit(current, speaker=speaker)]


def _units_from_text(text: str) -> list[Unit]:
    units = []
    for line in text.splitlines():
        line = _clean(line)
        if not line:
            continue
        match = _SPEAKER_RE.match(line)
        speaker, line = (match.group(1), match.group(2)) if match else (None, line)
        units.extend(_split_long(line, speaker))
    return units


def _speaker(value) -> str | None:
    return None if value is None or value == "" else str(value)


def _timed(segment: dict) -> bool:
    return all(isinstance(segment.get(key), (int, float)) for key in ("start", "end"))


def _units_from_json(data, path) -> tuple[list[Unit], str | None, bool]:
    if not isinstance(data, dict) or not isinstance(data.get("text", ""), str):
        raise _bad_source(path, "expected a JSON object with a text field")
    segments = data.get("segments") or []
    if not segments:
        return _units_from_text(data.get("text") or ""), data.get("language"), False
    try:
        timed = bool(data.get("has_timestamps")) and all(_timed(s) for s in segments)
        units = [Unit(_clean(str(s.get("text") or "")), float(s["start"]) if timed else None,
                      float(s["end"]) if timed else None, _speaker(s.get("speaker"))) for s in segments]
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        raise _bad_source(path, f"malformed segments ({type(exc).__name__})") from exc
    return units, data.get("language"), timed


def load_source(path: str | os.PathLike) -> SourceDocument:
    """Read a transcript.json, .txt, .srt or .vtt; the language is detected when the file lacks it."""
    suffix = Path(path).suffix.lower()
    try:
        raw = Path(path).read_text(encoding="utf-8-sig")
        if suffix == ".json":
            units, language, timed = _units_from_json(json.loads(raw), path)
        elif suffix in (".srt", ".vtt"):
            cues = parse_srt(raw) if suffix == ".srt" else parse_vtt(raw)
            units, language, timed = [Unit(_clean(c.text), c.start, c.end) for c in cues], None, True
        else:
            units, language, timed = _units_from_text(raw), None, False
    except (UnicodeDecodeError, json.JSONDecodeError, SubtitleError) as exc:
        raise _bad_source(path, str(exc)) from exc
    document = SourceDocument(units, language_code(language), timed)
    if document.language is None:
        document.language = detect_language(document.text)
    return document


# -- language detection -------------------------------------------------------------------
_detector_lock = threading.Lock()
_detectors: dict[str, object] = {}


def _detector(confident: bool):
    """lingua detectors over the languages we handle, built once; they are safe to share."""
    kind = "confident" if confident else "plain"
    if kind in _detectors:
        return _detectors[kind]
    with _detector_lock:
        if kind not in _detectors:
            languages = [lang for lang in Language.all()
                         if lang.iso_code_639_1.name.lower() in SUPPORTED_LANGUAGES]
            # Low accuracy mode (trigrams only): its models load in 0.1 s instead of 1.9 s, during
            # which lingua holds the GIL and every worker stalls. On sentence-length units (4 to 12
            # words, 9 Latin-script languages, 69 samples) it gave the same verdicts as high
            # accuracy, and the confident variant still answers None rather than guess.
            builder = LanguageDetectorBuilder.from_languages(*languages).with_low_accuracy_mode()
            if confident:  # answer None rather than guess when two languages are close
                builder = builder.with_minimum_relative_distance(0.25)
            _detectors[kind] = builder.build()
        return _detectors[kind]


def _hebrew_share(text: str) -> float | None:
    """Share of Hebrew-script letters among all letters, None when there are no letters."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return None
    hebrew = sum(1 for ch in letters if "\u0590" <= ch <= "\u05ff" or "\ufb1d" <= ch <= "\ufb4f")
    return hebrew / len(letters)


def _lingua(text: str, confident: bool) -> str | None:
    language = _detector(confident).detect_language_of(text[:DETECT_CHARS])
    return language.iso_code_639_1.name.lower() if language is not None else None


def detect_language(text: str) -> str | None:
    """The ISO-639-1 code of ``text`` (``he`` by script, others by lingua), None without letters."""
    share = _hebrew_share(text)
    if share is None:
        return None
    return "he" if share >= HEBREW_SHARE else _lingua(text, confident=False)


def _confident_language(text: str) -> str | None:
    """A per-unit guess, only for units long enough and only when lingua is sure; else None."""
    if len(text.split()) < MIN_UNIT_WORDS:
        return None
    share = _hebrew_share(text)
    if share is None:
        return None
    return "he" if share >= HEBREW_SHARE else _lingua(text, confident=True)


def _detected_as(target: str) -> str:
    """What detection says for text in ``target``: Yiddish is written in Hebrew script."""
    return "he" if target in HEBREW_SCRIPT_LANGUAGES else target


def _in_language(text: str, target: str) -> bool:
    if target in HEBREW_SCRIPT_LANGUAGES:
        return (_hebrew_share(text) or 0.0) >= HEBREW_SHARE
    return detect_language(text) == target


# -- validation ---------------------------------------------------------------------------
def validate_translation(source_units: list[str], translated_units: list[str], target: str) -> None:
    """Raise PermanentError unless the translation is complete, plausible and in ``target``."""
    pairs = list(zip(source_units, translated_units, strict=True))
    empty = [n for n, (src, out) in enumerate(pairs, 1) if src.strip() and not out.strip()]
    if empty:
        raise PermanentError(f"{len(empty)} of {len(pairs)} units came back empty (first: unit {empty[0]})",
                             error_class="empty_output")
    source_chars = sum(len(src.strip()) for src in source_units)
    output_chars = sum(len(out.strip()) for out in translated_units)
    if source_chars >= MIN_CHARS_FOR_LENGTH_CHECK:
        ratio = output_chars / source_chars
        if not LENGTH_RATIO[0] <= ratio <= LENGTH_RATIO[1]:
            raise PermanentError(f"translation is {ratio:.2f}x the source length ({output_chars} vs "
                                 f"{source_chars} characters)", error_class="implausible_length")
    if not any(ch.isalpha() for src in source_units for ch in src):
        return  # numbers and punctuation only: no language to check
    text = "\n".join(translated_units)
    if not _in_language(text, target):
        raise PermanentError(f"output is {language_name(detect_language(text))}, "
                             f"not {language_name(target)}", error_class="wrong_language")
    foreign = [out for out in translated_units if _confident_language(out) not in (None, _detected_as(target))]
    if sum(map(len, foreign)) > MAX_FOREIGN_SHARE * output_chars:
        raise PermanentError(f"{len(foreign)} of {len(pairs)} units are not in {language_name(target)}",
                             error_class="wrong_language")


# -- translators --------------------------------------------------------------------------
@dataclass
class UnitBatch:
    texts: list[str]
    usage: dict = field(default_factory=dict)


class UnitMismatchError(RetryableError):
    """The answer held a different number of units than were sent; ``usage`` was still spent."""

    error_class = "unit_mismatch"

    def __init__(self, sent: int, received: int, *, usage: dict | None = None):
        super().__init__(f"unit count mismatch: sent {sent}, got {received}")
        self.usage = usage or {}

    def unsplittable(self) -> ProviderError:
        """What a single unit answered this way raises (a mismatch may come out right next time)."""
        return self


class IncompleteAnswerError(UnitMismatchError):
    """The model stopped at its token limit (``finish_reason == "length"``, openai-python
    ``types/chat/chat_completion.py``: "the maximum number of tokens ... was reached"): the answer
    is cut, whatever it looks like. Split like a mismatch; a single unit cut short cannot be split."""

    error_class = "incomplete"

    def __init__(self, sent: int, *, usage: dict | None = None):
        super().__init__(sent, sent, usage=usage)
        self.message = f"answer cut at the token limit (finish_reason length) for {sent} unit(s)"

    def __str__(self) -> str:
        return self.message

    def unsplittable(self) -> ProviderError:
        return PermanentError(f"{self.message}: the model's context is too small for this unit",
                              error_class="incomplete")


class Translator(ABC):
    """One provider. ``translate_units`` does one request; instances are shared by worker threads."""

    name: str
    key_env_var: str
    base_url_env_var: str
    default_base_url: str
    model_env_var: str | None = None
    default_model: str | None = None
    max_items: int
    max_chars: int
    price: float | tuple[float, float]  # USD per 1M characters sent (list price, an estimate)
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    targets: frozenset[str] | None = None  # target languages it has (ISO 639-1); None: any

    @classmethod
    def supports(cls, language: str) -> bool:
        return cls.targets is None or language in cls.targets

    def __init__(self, *, api_key: str, base_url: str | None = None, model: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT):
        if not api_key:
            raise ConfigError(f"{self.name}: no API key: set {self.key_env_var}")
        register_secret(api_key)
        check_header_value(self.key_env_var, api_key)
        self._api_key = api_key
        self.base_url = (base_url or self._default_base(api_key)).rstrip("/")
        self.model = model or self.default_model
        self.timeout = timeout

    def _default_base(self, api_key: str) -> str:
        return self.default_base_url

    @classmethod
    def from_env(cls, env=None, model: str | None = None) -> "Translator":
        env = {} if env is None else env
        key = env.get(cls.key_env_var)
        if not key:
            raise ConfigError(f"{cls.name}: no API key: set {cls.key_env_var} in the environment or the .env file")
        if cls.model_env_var:
            model = model or env.get(cls.model_env_var)
        # VERBATIM_REQUEST_TIMEOUT: the total deadline of one request, as for transcription.
        timeout = request_timeout(env) or DEFAULT_TIMEOUT
        translator = cls(api_key=key, base_url=env.get(cls.base_url_env_var) or None, model=model,
                         timeout=timeout, **cls._options_from_env(env))
        translator.max_response_bytes = max_response_bytes(env)
        return translator

    @classmethod
    def _options_from_env(cls, env) -> dict:
        return {}

    def cost(self, usage: dict) -> float:
        return usage.get("characters", 0) * self.price / 1_000_000

    @abstractmethod
    def translate_units(self, texts: list[str], *, source: str | None, target: str,
                        context: str | None = None) -> UnitBatch:
        """Translate ``texts`` in one request; raise only ProviderError kinds."""

    def _checked(self, sent: list[str], texts: list[str], usage: dict) -> UnitBatch:
        if len(texts) != len(sent):
            raise UnitMismatchError(len(sent), len(texts), usage=usage)
        return UnitBatch(texts, usage)

    def _invalid(self, what: str) -> RetryableError:
        return RetryableError(f"{self.name}: invalid response: {what}", error_class="invalid_response")


class _HttpTranslator(Translator):
    """JSON over ``requests``; one Session per thread (a Session is not safe to share)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._session = httpbounds.ThreadSessions()

    def _post(self, url: str, payload, *, headers: dict, params: dict | None = None):
        # ensure_ascii=False: German and Hebrew stay 2 bytes a character instead of 6-byte escapes.
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        try:
            status, answer_headers, content = httpbounds.post(
                self._session(), url, params=params, data=body, deadline=Deadline(self.timeout, self.name),
                limit=self.max_response_bytes,
                headers={"Content-Type": "application/json; charset=UTF-8", **headers})
        except requests.RequestException as exc:
            raise from_requests_exception(exc, provider=self.name) from exc
        report_rate_limit(RateLimitInfo.from_headers(answer_headers))
        if status != 200:
            raise classify_http(status, content.decode("utf-8", "replace"), answer_headers, provider=self.name,
                                media=False)
        try:
            return json.loads(content)
        except ValueError as exc:
            raise from_requests_exception(exc, provider=self.name) from exc


class DeepLTranslator(_HttpTranslator):
    name = "deepl"
    key_env_var = "DEEPL_API_KEY"
    base_url_env_var = "DEEPL_BASE_URL"
    default_base_url = "https://api.deepl.com"
    free_base_url = "https://api-free.deepl.com"
    max_items = 50
    # The limit is 128 KiB of request body; 40,000 characters fit even at 3 UTF-8 bytes each.
    max_chars = 40_000
    price = 25.0  # DeepL API Pro, per 1M characters
    # Target languages among ours, from DeepLcom/api-docs docs/getting-started/supported-languages.mdx
    # (Hebrew: text translation only, which is what we use). No Yiddish.
    targets = frozenset({"ar", "cs", "de", "en", "es", "fr", "he", "hu", "it", "nl", "pl", "ru", "uk"})

    def _default_base(self, api_key: str) -> str:
        return self.free_base_url if api_key.endswith(":fx") else self.default_base_url

    def translate_units(self, texts, *, source, target, context=None) -> UnitBatch:
        payload = {"text": texts, "target_lang": "EN-US" if target == "en" else target.upper(),
                   "preserve_formatting": True}
        if source:
            payload["source_lang"] = source.upper()
        if context:
            payload["context"] = context  # not billed; helps pronouns and register across batches
        data = self._post(f"{self.base_url}/v2/translate", payload,
                          headers={"Authorization": f"DeepL-Auth-Key {self._api_key}"})
        try:
            out = [str(item["text"]) for item in data["translations"]]
        except (KeyError, TypeError) as exc:
            raise self._invalid(f"no translations ({type(exc).__name__})") from exc
        return self._checked(texts, out, {"characters": sum(map(len, texts))})


class MicrosoftTranslator(_HttpTranslator):
    name = "microsoft"
    key_env_var = "MS_TRANSLATOR_KEY"
    base_url_env_var = "MS_TRANSLATOR_BASE_URL"
    region_env_var = "MS_TRANSLATOR_REGION"
    default_base_url = "https://api.cognitive.microsofttranslator.com"
    max_items = 1000
    max_chars = 50_000
    price = 10.0  # Azure Translator S1, per 1M characters
    # Target languages among ours, from the language list (https://docs.azure.cn/ai-services/translator/
    # language-support, the same table as learn.microsoft.com): Hebrew `he` yes, Yiddish not listed.
    targets = frozenset({"ar", "cs", "de", "en", "es", "fr", "he", "hu", "it", "nl", "pl", "ru", "uk"})

    def __init__(self, *, region: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.region = region

    @classmethod
    def _options_from_env(cls, env) -> dict:
        return {"region": env.get(cls.region_env_var) or None}

    def translate_units(self, texts, *, source, target, context=None) -> UnitBatch:
        params = {"api-version": "3.0", "to": target}
        if source:
            params["from"] = source
        headers = {"Ocp-Apim-Subscription-Key": self._api_key}
        if self.region:
            headers["Ocp-Apim-Subscription-Region"] = self.region
        data = self._post(f"{self.base_url}/translate", [{"Text": text} for text in texts],
                          headers=headers, params=params)
        try:
            out = [str(item["translations"][0]["text"]) for item in data]
        except (KeyError, TypeError, IndexError) as exc:
            raise self._invalid(f"no translations ({type(exc).__name__})") from exc
        return self._checked(texts, out, {"characters": sum(map(len, texts))})


_NUMBERED_RE = re.compile(r"^\s*\[(\d+)\]\s?(.*)$")

_SYSTEM_PROMPT = """\
You translate verbatim transcripts of recorded oral-history interviews.
Translate every numbered line from {source} into {target} ({code}), faithfully and completely.
- This is a verbatim record: keep the speaker's own voice, register and sentence structure.
- Keep hesitations and fillers (German "ähm", "äh", "hm") as their natural {target} equivalents.
- Keep repetitions, false starts, broken-off sentences, self-corrections and speaker labels.
- Never summarise, shorten, smooth, explain, censor, omit or add anything.
- Keep names, places, dates and numbers; translate bracketed notes such as [laughs].
- Answer with exactly one line per numbered input line, in the same order, each starting with its
  number in brackets ("[1] ..."). Never merge, split, skip or reorder lines.
- Text under "Context" is the preceding part of the interview, for reference only: do not translate it.
- Write only the numbered lines, in {target}, nothing else."""


class OpenAIChatTranslator(Translator):
    """Chat completions through the ``openai`` SDK, against OpenAI or any compatible server."""

    name = "openai"
    key_env_var = "OPENAI_API_KEY"
    base_url_env_var = "OPENAI_BASE_URL"
    default_base_url = "https://api.openai.com/v1"
    model_env_var = "VERBATIM_TRANSLATION_MODEL"
    default_model = "gpt-4o-mini"
    CHARS_PER_TOKEN = 4
    MAX_INPUT_TOKENS = 3000
    max_items = 80  # a longer numbered list makes a skipped or merged line more likely
    # The budget covers the units; the system prompt and context are reserved for separately.
    max_chars = MAX_INPUT_TOKENS * CHARS_PER_TOKEN - len(_SYSTEM_PROMPT) - CONTEXT_CHARS
    price = (0.15, 0.60)  # USD per 1M input/output tokens (gpt-4o-mini), for models not in PRICES
    PRICES = {"gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00), "gpt-4.1-mini": (0.40, 1.60),
              "gpt-4.1": (2.00, 8.00)}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        import openai  # here, not at the top: the SDK takes 0.5 s to import and DeepL runs never need it

        # max_retries=0: the runner retries in one layer; SDK retries would multiply requests.
        self._client = openai.OpenAI(api_key=self._api_key, base_url=self.base_url,
                                     timeout=self.timeout, max_retries=0)
        # The SDK imports its chat resources on first use; do it here, once, rather than in every
        # worker thread at the same moment of the first wave.
        self._client.chat.completions.with_streaming_response  # noqa: B018
        expect_rate_limit_headers(self.name)

    # Reasoning models take only the default temperature: a 400 "'temperature' does not support 0 with
    # this model. Only the default (1) value is supported." is reported for o1, o3 and gpt-5
    # (github.com/OpenHands/OpenHands/issues/4131, github.com/tmc/langchaingo/issues/1355).
    REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")

    def sampling(self) -> dict:
        """Sampling parameters this model accepts: temperature 0 (the most literal translation)
        except for reasoning models, which get none."""
        name = self.model.rsplit("/", 1)[-1]  # "openai/gpt-5" on routers
        return {} if name.startswith(self.REASONING_PREFIXES) else {"temperature": 0}

    def cost(self, usage: dict) -> float:
        per_input, per_output = self.PRICES.get(self.model, self.price)
        return (usage.get("prompt_tokens", 0) * per_input + usage.get("completion_tokens", 0) * per_output) / 1e6

    @staticmethod
    def messages(texts: list[str], *, source: str | None, target: str, context: str | None) -> list[dict]:
        source_name = LANGUAGE_NAMES.get(source, "the source language") if source else "the source language"
        system = _SYSTEM_PROMPT.format(source=source_name, target=language_name(target), code=target)
        numbered = "\n".join(f"[{n}] {text}" for n, text in enumerate(texts, 1))
        user = f"Translate into {language_name(target)}:\n{numbered}"
        if context:
            user = f"Context (do not translate):\n{context}\n\n{user}"
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def translate_units(self, texts, *, source, target, context=None) -> UnitBatch:
        import openai

        try:
            data = self._complete(texts, source=source, target=target, context=context)
        except (openai.OpenAIError, ValueError) as exc:  # ValueError: a body that is not JSON
            report_rate_limit(RateLimitInfo.from_headers(getattr(getattr(exc, "response", None), "headers", None)))
            raise from_openai_exception(exc, provider=self.name, media=False) from exc
        try:
            choice = data["choices"][0]
            content = choice["message"]["content"] or ""
            tokens = data.get("usage") or {}
            usage = {"characters": sum(map(len, texts)), "prompt_tokens": tokens.get("prompt_tokens") or 0,
                     "completion_tokens": tokens.get("completion_tokens") or 0}
        except (AttributeError, IndexError, KeyError, TypeError) as exc:
            raise self._invalid(f"no message ({type(exc).__name__})") from exc
        if choice.get("finish_reason") == "length":
            raise IncompleteAnswerError(len(texts), usage=usage)
        numbered = _parse_numbered(content)
        if not numbered and len(texts) == 1 and content.strip():
            numbered = [(1, " ".join(content.split()))]  # a lone line often comes back without "[1]"
        if [n for n, _ in numbered] != list(range(1, len(texts) + 1)):
            raise UnitMismatchError(len(texts), len(numbered), usage=usage)
        return UnitBatch([text for _, text in numbered], usage)


    def _complete(self, texts, *, source, target, context) -> dict:
        """One chat completion, its answer read within the total deadline and the size cap."""
        deadline = Deadline(self.timeout, self.name)
        with self._client.chat.completions.with_streaming_response.create(
                model=self.model, timeout=deadline.remaining(), **self.sampling(),
                messages=self.messages(texts, source=source, target=target, context=context)) as response:
            report_rate_limit(RateLimitInfo.from_headers(response.headers))
            return json.loads(read_sdk_stream(response, deadline=deadline, limit=self.max_response_bytes))


def _parse_numbered(content: str) -> list[tuple[int, str]]:
    """``[n] text`` lines in answer order; unnumbered lines continue the previous one (wrapping)."""
    found: list[tuple[int, str]] = []
    for line in content.splitlines():
        match = _NUMBERED_RE.match(line)
        if match:
            found.append((int(match.group(1)), match.group(2).strip()))
        elif line.strip() and found:
            number, text = found[-1]
            found[-1] = (number, f"{text} {line.strip()}")
    return found


TRANSLATORS: dict[str, type[Translator]] = {
    cls.name: cls for cls in (OpenAIChatTranslator, DeepLTranslator, MicrosoftTranslator)}


def _translator_class(name: str) -> type[Translator]:
    cls = TRANSLATORS.get(name.strip().lower())
    if cls is None:
        raise ConfigError(f"unknown translation provider {name!r}; choose from {', '.join(TRANSLATORS)}")
    return cls


def choose_translator(language: str, name: str | None = None, env: Mapping | None = None,
                      model: str | None = None) -> Translator:
    """``name``, else VERBATIM_TRANSLATION_PROVIDER_<LANG>, VERBATIM_TRANSLATION_PROVIDER, else the
    first provider (openai, deepl, microsoft) whose key is set and that has ``language``. A named
    provider without the language gives way to the configured fallback if that has it; otherwise
    the run is refused here, before any job is claimed. ``env`` is the settings' snapshot
    (``Settings.env``); nothing here reads the process environment."""
    env = {} if env is None else env
    name = (name or env.get(f"VERBATIM_TRANSLATION_PROVIDER_{language.upper()}")
            or env.get("VERBATIM_TRANSLATION_PROVIDER"))
    if name:
        cls = _translator_class(name)
        if cls.supports(language):
            return cls.from_env(env, model=model)
        fallback = _fallback_name(language, env)
        if fallback and _translator_class(fallback).supports(language):
            log.info("%s cannot translate into %s; using the fallback %s", cls.name, language_name(language),
                     fallback)
            return _translator_class(fallback).from_env(env, model=model)
        raise ConfigError(_unsupported(cls, language))
    for cls in TRANSLATORS.values():
        if env.get(cls.key_env_var) and cls.supports(language):
            return cls.from_env(env, model=model)
    keyed = [cls for cls in TRANSLATORS.values() if env.get(cls.key_env_var)]
    if keyed:
        raise ConfigError(_unsupported(keyed[0], language))
    keys = ", ".join(cls.key_env_var for cls in TRANSLATORS.values())
    raise ConfigError(f"no translation provider configured for {language}: set one of {keys} "
                      "(and optionally VERBATIM_TRANSLATION_PROVIDER)")


def _unsupported(cls: type[Translator], language: str) -> str:
    able = ", ".join(c.name for c in TRANSLATORS.values() if c.supports(language)) or "none"
    return (f"{cls.name} cannot translate into {language_name(language)} ({language}); providers that can: "
            f"{able}. Set VERBATIM_TRANSLATION_PROVIDER_{language.upper()} or "
            f"VERBATIM_TRANSLATION_FALLBACK_{language.upper()} to one of them")


def _fallback_name(language: str, env) -> str | None:
    return env.get(f"VERBATIM_TRANSLATION_FALLBACK_{language.upper()}") or env.get("VERBATIM_TRANSLATION_FALLBACK")


def choose_fallback(language: str, env, primary_name: str) -> Translator | None:
    """The translator named by VERBATIM_TRANSLATION_FALLBACK_<LANG> or _FALLBACK, unless it is the
    primary or lacks the language."""
    name = _fallback_name(language, env)
    if not name or name.strip().lower() == primary_name or not _translator_class(name).supports(language):
        return None
    return _translator_class(name).from_env(env)


# -- chunking -----------------------------------------------------------------------------
def plan_batches(texts: list[str], *, max_items: int, max_chars: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges within both limits, cut only between units; an over-long unit goes alone."""
    batches, start, size = [], 0, 0
    for index, text in enumerate(texts):
        if index > start and (index - start >= max_items or size + len(text) > max_chars):
            batches.append((start, index))
            start, size = index, 0
        size += len(text)
    if start < len(texts):
        batches.append((start, len(texts)))
    return batches


def _context_before(texts: list[str], index: int) -> str | None:
    """Up to CONTEXT_CHARS of the document just before unit ``index``, whole units only."""
    lines, size = [], 0
    for text in reversed(texts[:index]):
        if not text:
            continue
        if size + len(text) > CONTEXT_CHARS:
            break
        lines.append(text)
        size += len(text) + 1
    return "\n".join(reversed(lines)) or None


# -- translating a document ---------------------------------------------------------------
@dataclass
class Translation:
    units: list[Unit]              # aligned 1:1 with the source units, same timing and speaker
    text: str
    source_language: str | None
    language: str
    provider: str
    model: str | None
    usage: dict                    # characters sent, tokens, requests (all attempts, fallback included)
    cost: float                    # USD estimate
    has_timestamps: bool
    kept_units: int                # units already in the target language, kept as they are
    source_sha256: str | None = None   # the transcript json it was made from (a pipeline run's)


@dataclass
class _Spend:
    characters: int = 0
    tokens: int = 0
    requests: int = 0
    cost: float = 0.0

    def add(self, translator: Translator, usage: dict) -> None:
        self.characters += usage.get("characters", 0)
        self.tokens += usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
        self.requests += 1
        self.cost += translator.cost(usage)

    def usage(self) -> dict:
        return {"characters": self.characters, "tokens": self.tokens, "requests": self.requests}


@dataclass
class _Plan:
    send: list[int]                # indices of the units that need translating
    source: str | None             # the source language to name, None to let the provider detect
    kept: int


def _plan(doc: SourceDocument, target: str) -> _Plan:
    """Which units to send: not those confidently in the target language already, nor, in a document
    in the target language, those too short to tell."""
    send, mixed = [], False
    for index, unit in enumerate(doc.units):
        if not unit.text:
            continue
        detected = _confident_language(unit.text)
        if detected == target or (detected is None and doc.language == target):
            continue
        send.append(index)
        mixed |= detected is not None and detected != doc.language
    kept = sum(1 for unit in doc.units if unit.text) - len(send)
    source = None if mixed or doc.language == target else doc.language
    return _Plan(send, source, kept)


class _DocumentRun:
    """Sends one document's units through one translator, batch by batch, splitting on mismatch."""

    def __init__(self, translator: Translator, texts: list[str], plan: _Plan, *, target: str, call, spend: _Spend):
        self.translator, self.texts, self.plan = translator, texts, plan
        self.target, self.call, self.spend = target, call, spend

    def translate(self) -> list[str]:
        out = list(self.texts)  # kept and empty units stay as they are
        sent = [self.texts[i] for i in self.plan.send]
        for start, end in plan_batches(sent, max_items=self.translator.max_items,
                                       max_chars=self.translator.max_chars):
            self._batch(self.plan.send[start:end], out)
        return out

    def _batch(self, indices: list[int], out: list[str]) -> None:
        batch = [self.texts[i] for i in indices]
        context = _context_before(self.texts, indices[0])

        def request():
            try:
                return self.translator.translate_units(batch, source=self.plan.source, target=self.target,
                                                       context=context)
            except UnitMismatchError as exc:
                return exc  # handled by splitting below, never by the call wrapper's retry policy

        key = {"stage": "translation", "provider": self.translator.name, "model": self.translator.model,
               "source": self.plan.source, "target": self.target, "texts": batch, "context": context}
        result = self.call(request, key=key)
        self.spend.add(self.translator, result.usage)
        if isinstance(result, UnitMismatchError):
            if len(indices) == 1:
                raise result.unsplittable()
            middle = len(indices) // 2
            log.info("%s: %s; retrying %d units as %d + %d", self.translator.name, result,
                     len(indices), middle, len(indices) - middle)
            self._batch(indices[:middle], out)
            self._batch(indices[middle:], out)
            return
        for index, text in zip(indices, result.texts, strict=True):
            out[index] = _clean(text)


def needs_provider(doc: SourceDocument, target: str) -> bool:
    """Whether translating ``doc`` into ``target`` sends anything: False for a document already in
    ``target`` (a copy) and for one without text."""
    return bool(_plan(doc, target).send)


def _direct_call(fn, key=None):
    return fn()


def translate_document(doc: SourceDocument, target: str, translator: Translator, *,
                       fallback: Translator | None = None, call=None) -> Translation:
    """Translate ``doc`` into ``target`` and validate it; on a permanent failure (validation or a
    rejected request) try ``fallback`` once. ``call(fn)`` wraps every single HTTP request."""
    call = call or _direct_call
    plan = _plan(doc, target)
    source_texts = [unit.text for unit in doc.units]
    spend = _Spend()
    if not plan.send:
        validate_translation(source_texts, source_texts, target)
        return _translation(doc, target, source_texts, "copy", None, spend, plan.kept)

    def attempt(current: Translator) -> Translation:
        texts = _DocumentRun(current, source_texts, plan, target=target, call=call, spend=spend).translate()
        try:
            validate_translation(source_texts, texts, target)
        except PermanentError as exc:  # say whose output it was: the message is stored with the job
            raise PermanentError(f"{current.name}: {exc.message}", error_class=exc.error_class) from exc
        return _translation(doc, target, texts, current.name, current.model, spend, plan.kept)

    try:
        return attempt(translator)
    except PermanentError as exc:
        if fallback is None:
            raise
        log.warning("%s translation into %s not accepted (%s); trying %s", translator.name, target, exc,
                    fallback.name)
    return attempt(fallback)


def _translation(doc: SourceDocument, target: str, texts: list[str], provider: str, model: str | None,
                 spend: _Spend, kept: int) -> Translation:
    units = [replace(unit, text=text) for unit, text in zip(doc.units, texts, strict=True)]
    return Translation(units=units, text="\n".join(t for t in texts if t), source_language=doc.language,
                       language=target, provider=provider, model=model, usage=spend.usage(),
                       cost=round(spend.cost, 6), has_timestamps=doc.has_timestamps, kept_units=kept)


# -- outputs ------------------------------------------------------------------------------
def output_name(lang: str, fmt: str) -> str:
    """The one name pattern for translation files: ``translation.<lang>.<fmt>``."""
    if lang not in SUPPORTED_LANGUAGES or fmt not in FORMATS:
        raise ValueError(f"no translation output for language {lang!r} and format {fmt!r}")
    return f"translation.{lang}.{fmt}"


def _render_txt(translation: Translation) -> str:
    mark = RLM if translation.language in RTL_LANGUAGES else ""
    lines = [f"{mark}{unit.speaker}: {unit.text}" if unit.speaker else f"{mark}{unit.text}"
             for unit in translation.units if unit.text]
    return "\n".join(lines) + "\n" if lines else ""


def _render_json(translation: Translation) -> str:
    segments = [{"id": n, "start": u.start, "end": u.end, "text": u.text, "speaker": u.speaker}
                for n, u in enumerate(translation.units, 1)]
    payload = {"text": translation.text, "language": translation.language,
               "source_language": translation.source_language, "provider": translation.provider,
               "model": translation.model, "has_timestamps": translation.has_timestamps,
               "kept_units": translation.kept_units, "usage": translation.usage, "cost": translation.cost,
               "source_sha256": translation.source_sha256, "segments": segments}
    return json.dumps(payload, ensure_ascii=False, indent=2) + "\n"


def render_output(translation: Translation, fmt: str) -> str:
    """The file content for ``fmt``; srt/vtt need timestamps (one cue per source cue, same timings)."""
    if fmt == "txt":
        return _render_txt(translation)
    if fmt == "json":
        return _render_json(translation)
    if fmt not in ("srt", "vtt"):
        raise ValueError(f"unknown format {fmt!r}")
    if not translation.has_timestamps:
        raise ValueError(f"{fmt} needs a source with timestamps")
    cues = [Cue(n, unit.start, unit.end, unit.text) for n, unit in enumerate(translation.units, 1)]
    writer = format_srt if fmt == "srt" else format_vtt
    return writer(cues, rtl=translation.language in RTL_LANGUAGES)


def write_translation_outputs(translation: Translation, folder: str | os.PathLike, *,
                              root: str | os.PathLike, staging=None) -> dict[str, WrittenFile]:
    """Write txt and json (and srt, vtt when timed) atomically under ``root`` (into ``staging``
    first, if given)."""
    formats = FORMATS if translation.has_timestamps else ("txt", "json")
    names = {fmt: output_name(translation.language, fmt) for fmt in formats}
    written = write_files(folder, {names[fmt]: render_output(translation, fmt) for fmt in formats}, root=root,
                          staging=staging)
    return {fmt: written[names[fmt]] for fmt in formats}


# -- command line -------------------------------------------------------------------------
CLI_ATTEMPTS = 4


def _retrying_call(fn, key=None):
    """The standalone CLI has no runner: retry transient errors a few times, honouring Retry-After."""
    for attempt in range(1, CLI_ATTEMPTS + 1):
        try:
            return fn()
        except RetryableError as exc:
            delay = retry_delay(attempt, exc.retry_after)
            if attempt == CLI_ATTEMPTS or delay > MAX_INLINE_WAIT_SECONDS:
                raise
            log.warning("%s; retrying in %.1f s", exc, delay)
            time.sleep(delay)


def _parser():
    parser = make_parser("Translate one transcript (json, txt, srt or vtt) and print the translation; "
                         "no database is used.",
                         "python translation.py output/ab12cd34/transcript.json --to he --format srt")
    parser.add_argument("input", help="transcript.json, a .txt, .srt or .vtt file")
    parser.add_argument("--to", required=True, metavar="LANG", help="target language (en, de, he, ...)")
    parser.add_argument("--from", dest="source", metavar="LANG", help="source language (default: from the file, "
                                                                      "else detected)")
    parser.add_argument("--provider", choices=sorted(TRANSLATORS),
                        help="default: $VERBATIM_TRANSLATION_PROVIDER[_<LANG>], else the first with a key set")
    parser.add_argument("--fallback", choices=sorted(TRANSLATORS),
                        help="provider to try when the first result is not accepted "
                             "(default: $VERBATIM_TRANSLATION_FALLBACK[_<LANG>])")
    parser.add_argument("--model", help="chat model (default: $VERBATIM_TRANSLATION_MODEL or gpt-4o-mini)")
    parser.add_argument("--format", choices=FORMATS, default="txt", help="output format (default: txt)")
    parser.add_argument("--env-file", metavar="PATH", help="settings file to load (default: ./.env)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings.load(args)
    setup_logging(settings.debug)
    env = settings.env
    target = settings.language(args.to)
    if not os.path.isfile(args.input):
        raise ConfigError(f"{args.input!r}: no such file")
    try:
        doc = load_source(args.input)
        if args.source:
            doc.language = settings.language(args.source)
        if args.format in ("srt", "vtt") and not doc.has_timestamps:
            raise ConfigError(f"--format {args.format} needs a source with timestamps; {args.input} has none")
        translator = choose_translator(target, args.provider, env, args.model)
        fallback = (_translator_class(args.fallback).from_env(env) if args.fallback
                    else choose_fallback(target, env, translator.name))
        translation = translate_document(doc, target, translator, fallback=fallback, call=_retrying_call)
    except AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ProviderError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(render_output(translation, args.format))
    log.info("%s -> %s via %s: %d units, %d kept, %d requests, ~$%.4f", translation.source_language, target,
             translation.provider, len(translation.units), translation.kept_units,
             translation.usage["requests"], translation.cost)
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
