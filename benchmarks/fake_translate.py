"""Fake DeepL, Microsoft Translator and OpenAI chat-completions servers for offline tests.

Each fake runs on a ``FakeServer`` (127.0.0.1 only), speaks its provider's wire format, checks the
auth header (a wrong key gets that provider's real 401/403 shape) and records every batch it was
asked to translate. The "translation" is deterministic and really in the target language, so the
production validation passes on it: a small de/en/he dictionary translates word by word, and
words the dictionary lacks stay as they are, except into Hebrew, where they are transliterated
into Hebrew letters. ``fake_translate(text, target)`` is that function, so tests can compute the
exact expected output of every unit and check order and alignment.

Misbehaviour switches: ``wrong_language`` (answers in English when asked for Hebrew, in German when
asked for English: the predecessor's bug), ``drop_units`` (answers N fewer units for any batch of
more than one, renumbered so the answer looks well formed), and faults through ``fake.server.fault``.

``make_transcript`` generates small German or English transcripts from the same dictionary.
"""

from __future__ import annotations

import random
import re
import threading
import time

from benchmarks.fakeserver import FakeServer, Request, json_response

# (German, English, Hebrew). German and English entries are single words and never collide with
# a word of the other column, so a lookup by any word is unambiguous.
VOCAB = [
    ("ich", "I", "אני"), ("wir", "we", "אנחנו"), ("er", "he", "הוא"), ("und", "and", "וגם"),
    ("aber", "but", "אבל"), ("nicht", "not", "לא"), ("sehr", "very", "מאוד"), ("dann", "then", "אז"),
    ("Haus", "house", "בית"), ("Vater", "father", "אבא"), ("Mutter", "mother", "אמא"),
    ("Schule", "school", "בית ספר"), ("Stadt", "city", "עיר"), ("Jahre", "years", "שנים"),
    ("Familie", "family", "משפחה"), ("Bruder", "brother", "אח"), ("Schwester", "sister", "אחות"),
    ("Kinder", "children", "ילדים"), ("Freund", "friend", "חבר"), ("Arbeit", "work", "עבודה"),
    ("Zeit", "time", "זמן"), ("Tag", "day", "יום"), ("Nacht", "night", "לילה"), ("immer", "always", "תמיד"),
    ("nie", "never", "אף פעם"), ("heute", "today", "היום"), ("gestern", "yesterday", "אתמול"),
    ("Wasser", "water", "מים"), ("Brot", "bread", "לחם"), ("Essen", "food", "אוכל"),
    ("groß", "big", "גדול"), ("klein", "small", "קטן"), ("jung", "young", "צעיר"), ("gut", "good", "טוב"),
    ("schlecht", "bad", "רע"), ("schön", "beautiful", "יפה"), ("schwer", "hard", "קשה"),
    ("gehen", "go", "ללכת"), ("kommen", "come", "לבוא"), ("sehen", "see", "לראות"),
    ("wissen", "know", "לדעת"), ("sprechen", "speak", "לדבר"), ("erinnern", "remember", "לזכור"),
    ("leben", "live", "לחיות"), ("wohnten", "lived", "גרנו"), ("hatten", "had", "היה לנו"),
    ("waren", "were", "היינו"), ("mit", "with", "עם"), ("ohne", "without", "בלי"),
    ("nach", "after", "אחרי"), ("vor", "before", "לפני"), ("zusammen", "together", "ביחד"),
    ("allein", "alone", "לבד"), ("viel", "much", "הרבה"), ("ja", "yes", "כן"), ("nein", "no", "לא"),
    ("ähm", "um", "אממ"), ("äh", "uh", "אה"), ("Garten", "garden", "גן"), ("Kirche", "church", "כנסייה"),
    ("Zug", "train", "רכבת"), ("Dorf", "village", "כפר"), ("Lehrer", "teacher", "מורה"),
    ("Geschichte", "story", "סיפור"), ("Musik", "music", "מוזיקה"), ("Buch", "book", "ספר"),
    ("Straße", "street", "רחוב"), ("Fenster", "window", "חלון"), ("Sommer", "summer", "קיץ"),
    ("Vergangenheit", "past", "עבר"), ("Erinnerung", "memory", "זיכרון"),
    ("Großmutter", "grandmother", "סבתא"),
]
_COLUMN = {"de": 0, "en": 1, "he": 2}
_LOOKUP = {row[col].lower(): row for row in VOCAB for col in (0, 1)}
_LATIN_TO_HEBREW = dict(zip("abcdefghijklmnopqrstuvwxyzäöüß", "אבקדהפגהייכלמנופקרסטווואיזאוווס"))
_TOKEN_RE = re.compile(r"\w+|\W+")
_NUMBERED_RE = re.compile(r"^\[(\d+)\] ?(.*)$")
_TARGET_RE = re.compile(r"into [A-Za-z]+ \((\w+)\)")

REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
DEEPL_TARGETS = {"EN-US": "en", "EN-GB": "en", "DE": "de", "HE": "he", "FR": "fr"}


def _translate_word(word: str, target: str) -> str:
    row = _LOOKUP.get(word.lower())
    if row is not None:
        out = row[_COLUMN[target]]
        return out[:1].upper() + out[1:] if word[:1].isupper() and target != "he" else out
    if target == "he" and not word.isdigit():
        return "".join(_LATIN_TO_HEBREW.get(ch, ch) for ch in word.lower())
    return word


def fake_translate(text: str, target: str) -> str:
    """The fakes' deterministic translation of one unit into ``target`` (en, de or he)."""
    return "".join(_translate_word(tok, target) if tok[0].isalnum() else tok
                   for tok in _TOKEN_RE.findall(text))


def make_sentence(rng: random.Random, language: str, number: int) -> str:
    """A sentence of 6-9 dictionary words; ``number`` keeps every unit distinguishable."""
    words = [row[_COLUMN[language]] for row in rng.sample(VOCAB, rng.randint(6, 9))]
    words[0] = words[0][:1].upper() + words[0][1:]
    return f"{' '.join(words)} {number}."


def make_transcript(seed: int, language: str = "de", n_segments: int = 6, *, speakers: int = 2,
                    timestamps: bool = True) -> dict:
    """A transcript.json payload as the transcription side writes it."""
    rng = random.Random(seed)
    segments, clock = [], 0.0
    for index in range(1, n_segments + 1):
        length = round(rng.uniform(1.5, 6.0), 3)
        segments.append({"id": index, "start": clock if timestamps else None,
                         "end": round(clock + length, 3) if timestamps else None,
                         "text": make_sentence(rng, language, seed * 100 + index),
                         "speaker": f"speaker_{index % speakers}" if speakers else None})
        clock = round(clock + length + rng.uniform(0.0, 1.0), 3)
    return {"text": " ".join(s["text"] for s in segments), "language": language,
            "duration": clock if timestamps else None, "provider": "fake", "model": "fake-stt",
            "has_timestamps": timestamps, "note": None, "segments": segments, "usage": {}}


class _FakeTranslator:
    """Shared plumbing: the server, the switches, and what was asked of it."""

    def __init__(self, key: str = "test-key"):
        self.default_key = key
        self.server = FakeServer()
        self.lock = threading.Lock()
        self._register()
        self.reset()

    def reset(self) -> None:
        """Forget requests, switches and faults, so one running server can serve many tests."""
        with self.lock, self.server.lock:
            self.key = self.default_key
            self.wrong_language = False
            self.drop_units = 0
            self.overloaded = 0         # DeepL: answer this many requests 529 "Too many requests"
            self.free_quota_used = False  # Microsoft: answer 403001, the free tier's quota is used up
            self.max_answer_chars = None  # chat: a small context cuts longer answers, finish_reason "length"
            self.batches: list[dict] = []   # {"texts", "target", "source", "context", "headers"}
            self.server.fault = None
            self.server.requests.clear()

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    def sent_texts(self) -> list[list[str]]:
        with self.lock:
            return [batch["texts"] for batch in self.batches]

    def _record(self, request: Request, texts, target, source=None, context=None) -> None:
        with self.lock:
            self.batches.append({"texts": list(texts), "target": target, "source": source,
                                 "context": context, "headers": request.headers, "body": request.body})

    def _answer(self, texts: list[str], target: str) -> list[str]:
        """Translate a batch, applying the misbehaviour switches."""
        if self.wrong_language:
            target = "de" if target == "en" else "en"
        out = [fake_translate(text, target) for text in texts]
        if self.drop_units and len(out) > 1:
            middle = len(out) // 2
            del out[middle:middle + min(self.drop_units, len(out) - 1)]
        return out


class FakeDeepL(_FakeTranslator):
    """``POST /v2/translate``; 50 texts and 128 KiB per request, as the real API enforces."""

    def env(self) -> dict:
        return {"DEEPL_API_KEY": self.key, "DEEPL_BASE_URL": self.url}

    def _register(self):
        self.server.route("POST", "/v2/translate")(self._translate)

    def _translate(self, request: Request):
        if request.headers.get("authorization") != f"DeepL-Auth-Key {self.key}":
            return json_response({"message": "Forbidden"}, 403)
        if len(request.body) > 128 * 1024:
            return json_response({"message": "Request Entity Too Large"}, 413)
        with self.lock:
            overloaded, self.overloaded = self.overloaded > 0, max(0, self.overloaded - 1)
        if overloaded:  # DeepL's OpenAPI spec lists 529 beside 429 as "Too many requests"
            return json_response({"message": "Too many requests"}, 529)
        body = request.json()
        texts, target = body.get("text") or [], body.get("target_lang", "")
        if target == "EN":
            return json_response({"message": "Value for 'target_lang' not supported: 'EN' is deprecated, "
                                             "please use 'EN-GB' or 'EN-US' instead."}, 400)
        if target not in DEEPL_TARGETS:
            return json_response({"message": f"Value for 'target_lang' not supported: {target!r}"}, 400)
        if not texts or len(texts) > 50:
            return json_response({"message": "Parameter 'text' must hold between 1 and 50 texts."}, 400)
        self._record(request, texts, target, body.get("source_lang"), body.get("context"))
        detected = body.get("source_lang") or "DE"
        return json_response({"translations": [{"detected_source_language": detected, "text": text}
                                               for text in self._answer(texts, DEEPL_TARGETS[target])]})


class FakeMicrosoft(_FakeTranslator):
    """``POST /translate?api-version=3.0``; 1,000 items and 50,000 characters per request."""

    def env(self) -> dict:
        return {"MS_TRANSLATOR_KEY": self.key, "MS_TRANSLATOR_BASE_URL": self.url,
                "MS_TRANSLATOR_REGION": "westeurope"}

    def _register(self):
        self.server.route("POST", "/translate")(self._translate)

    @staticmethod
    def _error(status: int, code: int, message: str):
        return json_response({"error": {"code": code, "message": message}}, status)

    def _translate(self, request: Request):
        if request.headers.get("ocp-apim-subscription-key") != self.key:
            return self._error(401, 401000, "The request is not authorized because credentials are "
                                            "missing or invalid.")
        if self.free_quota_used:
            return self._error(403, 403001, "The operation is not allowed because the subscription has "
                                            "exceeded its free quota.")
        if request.query.get("api-version") != ["3.0"]:
            return self._error(400, 400021, "The API version parameter is missing or invalid.")
        targets = request.query.get("to") or []
        if len(targets) != 1 or targets[0] not in _COLUMN:
            return self._error(400, 400036, "The target language is not valid.")
        items = request.json()
        texts = [item["Text"] for item in items]
        if len(texts) > 1000:
            return self._error(400, 400077, "The maximum number of array elements has been exceeded.")
        if sum(len(t) for t in texts) > 50_000:
            return self._error(400, 400050, "The input text is too long.")
        source = (request.query.get("from") or [None])[0]
        self._record(request, texts, targets[0], source)
        detected = {} if source else {"detectedLanguage": {"language": "de", "score": 1.0}}
        return json_response([{**detected, "translations": [{"text": text, "to": targets[0]}]}
                              for text in self._answer(texts, targets[0])])


class FakeOpenAIChat(_FakeTranslator):
    """``POST /v1/chat/completions``: finds the numbered lines and the target in the prompt."""

    def env(self) -> dict:
        return {"OPENAI_API_KEY": self.key, "OPENAI_BASE_URL": f"{self.url}/v1"}

    def _register(self):
        self.server.route("POST", "/v1/chat/completions")(self._complete)

    def _complete(self, request: Request):
        if request.headers.get("authorization") != f"Bearer {self.key}":
            # The real API echoes a masked fragment of the key, never the whole key.
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            return json_response({"error": {
                "message": f"Incorrect API key provided: {given[:3]}***{given[-2:]}.",
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}, 401)
        body = request.json()
        if body["model"].startswith(REASONING_PREFIXES) and body.get("temperature", 1) != 1:
            # As reported for o1/o3/gpt-5 (e.g. github.com/tmc/langchaingo/issues/1355).
            return json_response({"error": {
                "message": f"Unsupported value: 'temperature' does not support {body['temperature']} with this "
                           "model. Only the default (1) value is supported.",
                "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value"}}, 400)
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        target = _TARGET_RE.search(system).group(1)
        numbered = [m.group(2) for m in map(_NUMBERED_RE.match, user.splitlines()) if m]
        context = user.split("\n\n")[0] if user.startswith("Context") else None
        self._record(request, numbered, target, context=context)
        lines = [f"[{n}] {text}" for n, text in enumerate(self._answer(numbered, target), 1)]
        content, finish = "\n".join(lines), "stop"
        if self.max_answer_chars is not None and len(content) > self.max_answer_chars:
            content, finish = content[:self.max_answer_chars], "length"
        return json_response({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": len(system + user) // 4, "completion_tokens": len(content) // 4,
                      "total_tokens": len(system + user) // 4 + len(content) // 4}})
