"""Language codes: the one table of the languages verbatim handles, and the one way a code, a
name or a provider's spelling becomes an ISO 639-1 code.

Below everything else (settings, providers, outputs and tools all name languages), so it imports
nothing of the pipeline.
"""

from __future__ import annotations

# The languages a job may have (an allowlist: a job's language is never free text) and their
# English names, for prompts and reports.
LANGUAGE_NAMES = {"en": "English", "de": "German", "he": "Hebrew", "fr": "French", "es": "Spanish",
                  "it": "Italian", "nl": "Dutch", "pl": "Polish", "ru": "Russian", "uk": "Ukrainian",
                  "cs": "Czech", "hu": "Hungarian", "yi": "Yiddish", "ar": "Arabic"}
SUPPORTED_LANGUAGES = frozenset(LANGUAGE_NAMES)

# Providers name languages differently (Whisper: "german", Scribe: "deu"); ISO 639-2 codes, both
# the terminology and the bibliographic ones, and the English names all lead to one code.
_ISO_639_2 = {"deu": "de", "ger": "de", "eng": "en", "heb": "he", "fra": "fr", "fre": "fr", "spa": "es",
              "ita": "it", "nld": "nl", "dut": "nl", "pol": "pl", "rus": "ru", "ukr": "uk", "ces": "cs",
              "cze": "cs", "hun": "hu", "yid": "yi", "ara": "ar"}
_ALIASES = {**_ISO_639_2, **{name.lower(): code for code, name in LANGUAGE_NAMES.items()}}


def language_code(value) -> str | None:
    """``de``, ``DE``, ``de-DE``, ``de_AT``, ``German``, ``deu`` -> ``de``; anything that names no
    language of ours (or is not text) -> None."""
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    code = _ALIASES.get(value) or value.replace("_", "-").split("-")[0]
    return code if code in LANGUAGE_NAMES else None


def reported_language(value) -> str | None:
    """What a provider says it heard, as we store it: our code where it names one of our
    languages, else its own spelling in lower case (kept, not dropped: it is still true)."""
    if not value:
        return None
    return language_code(value) or str(value).strip().lower()


def language_name(code: str | None, unknown: str = "unknown") -> str:
    """``de`` -> ``German``; a code we do not name stays itself; no code at all -> ``unknown``."""
    return LANGUAGE_NAMES.get(code, code) if code else unknown
