"""Fake OpenAI and ElevenLabs speech-to-text APIs on a ``FakeServer``, answering from the audio itself.

The fakes decode every upload with ffmpeg (16 kHz mono PCM), so an undecodable file is refused the
way the real API refuses it, and the transcript is derived from what was sent: each voiced run
(silences under a quarter second bridged) becomes one segment with its real start and end, and
every second of it a word named after its frequency by zero-crossing count (``tone440``); the run's
last word ends the sentence. Different tone files therefore give different, predictable
transcripts, and a split upload gives the same segments (chunk-relative) as a whole one.

Wire formats follow the providers: OpenAI ``verbose_json`` / ``json`` / ``text`` bodies and
``{"error": {...}}`` errors; ElevenLabs ``words`` with spacing items and ``{"detail": {...}}``
errors; speakers alternate by segment when ``diarize`` is on. Every upload is recorded in
``FakeSTT.uploads``; faults are injected through ``FakeServer.fault``.
"""

from __future__ import annotations

import math
import subprocess
import tempfile
from array import array
from dataclasses import dataclass, field

from benchmarks.fakeserver import FakeServer, Request, Response, json_response
from pipeline.audio import ffmpeg_input, ffmpeg_path

OPENAI_PATH = "/v1/audio/transcriptions"
ELEVENLABS_PATH = "/v1/speech-to-text"
OPENAI_MAX_BYTES = 26214400
OPENAI_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-transcribe-diarize")
DIARIZE_MODEL = "gpt-4o-transcribe-diarize"
ELEVENLABS_MODELS = ("scribe_v1", "scribe_v2")

RATE = 16000
BLOCK = 160                  # 10 ms analysis blocks
VOICED_LEVEL = 300           # mean |sample| above this is sound (a test sine is about 2600)
BRIDGE_BLOCKS = 25           # silences shorter than 0.25 s do not end a run

_LANGUAGE_NAMES = {"de": ("german", "deu"), "en": ("english", "eng"), "he": ("hebrew", "heb")}


@dataclass
class Word:
    start: float
    end: float
    text: str


@dataclass
class Run:
    start: float
    end: float
    words: list[Word] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)


@dataclass
class Upload:
    """One request as the fake understood it, for tests to assert on."""

    provider: str
    fields: dict
    filename: str
    size: int
    duration: float = 0.0


class UndecodableAudio(ValueError):
    pass


def decode_pcm(data: bytes) -> array:
    """16 kHz mono signed 16-bit samples of an uploaded file, decoded by ffmpeg from a temp copy."""
    with tempfile.NamedTemporaryFile(prefix="fake-stt-", suffix=".upload") as handle:
        handle.write(data)
        handle.flush()
        result = subprocess.run([ffmpeg_path(), "-hide_banner", "-nostdin", "-loglevel", "error",
                                 "-i", ffmpeg_input(handle.name), "-map", "0:a:0", "-ac", "1",
                                 "-ar", str(RATE), "-f", "s16le", "-"],
                                stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    if result.returncode != 0 or not result.stdout:
        raise UndecodableAudio(result.stderr.decode("utf-8", "replace").strip()[-200:])
    samples = array("h")
    samples.frombytes(result.stdout[: len(result.stdout) // 2 * 2])
    return samples


def _block_stats(samples: array) -> tuple[list[bool], list[int]]:
    """Per 10 ms block: is it voiced, and how many zero crossings does it hold."""
    voiced, crossings = [], []
    previous_negative = False
    for offset in range(0, len(samples) - BLOCK + 1, BLOCK):
        block = samples[offset:offset + BLOCK]
        voiced.append(sum(map(abs, block)) / BLOCK > VOICED_LEVEL)
        count = 0
        for sample in block:
            negative = sample < 0
            count += negative != previous_negative
            previous_negative = negative
        crossings.append(count)
    return voiced, crossings


def _voiced_spans(voiced: list[bool]) -> list[tuple[int, int]]:
    """[first, last+1) block ranges of sound, bridging short silences."""
    spans: list[list[int]] = []
    for index, is_voiced in enumerate(voiced):
        if not is_voiced:
            continue
        if spans and index - spans[-1][1] <= BRIDGE_BLOCKS:
            spans[-1][1] = index + 1
        else:
            spans.append([index, index + 1])
    return [(a, b) for a, b in spans]


def _word(voiced, crossings, first: int, last: int) -> str:
    blocks = [i for i in range(first, last) if voiced[i]] or list(range(first, last))
    frequency = sum(crossings[i] for i in blocks) / (2 * len(blocks) * BLOCK / RATE)
    return f"tone{int(round(frequency / 10.0)) * 10}"


def analyse(samples: array) -> list[Run]:
    """Voiced runs with one word per second of sound, named by frequency."""
    voiced, crossings = _block_stats(samples)
    runs = []
    per_second = RATE // BLOCK
    for first, last in _voiced_spans(voiced):
        count = max(1, round((last - first) / per_second))
        run = Run(first * BLOCK / RATE, last * BLOCK / RATE)
        for n in range(count):
            a = first + n * per_second
            b = last if n == count - 1 else a + per_second
            run.words.append(Word(a * BLOCK / RATE, b * BLOCK / RATE, _word(voiced, crossings, a, b)))
        run.words[-1].text += "."
        runs.append(run)
    return runs


def _openai_error(status: int, message: str, type_: str, code: str | None = None) -> Response:
    return json_response({"error": {"message": message, "type": type_, "param": None, "code": code}}, status)


def _elevenlabs_error(status: int, kind: str, message: str) -> Response:
    return json_response({"detail": {"status": kind, "message": message}}, status)


class FakeSTT:
    """Registers the two speech-to-text routes on ``server`` and checks keys, sizes and formats."""

    def __init__(self, server: FakeServer, *, openai_key: str = "sk-test-openai-0000",
                 elevenlabs_key: str = "el-test-elevenlabs-0000"):
        self.server = server
        self.openai_key = openai_key
        self.elevenlabs_key = elevenlabs_key
        self.uploads: list[Upload] = []
        # ElevenLabs: spacing items and an audio event without times, as the official SDK allows
        # (SpeechToTextWordResponseModel.start/end are Optional).
        self.untimed_items = False
        # OpenAI: the longest audio a model takes, in seconds. gpt-4o models refuse more than 1400 s
        # (reported: github.com/rishikanthc/Scriberr/issues/477); whisper-1 has no cap.
        self.duration_caps = {model: 1400.0 for model in OPENAI_MODELS if model != "whisper-1"}
        server.route("POST", OPENAI_PATH)(self._openai)
        server.route("POST", ELEVENLABS_PATH)(self._elevenlabs)

    @property
    def openai_base_url(self) -> str:
        return self.server.url + "/v1"

    @property
    def elevenlabs_base_url(self) -> str:
        return self.server.url

    def _record(self, provider: str, fields: dict, files: dict) -> tuple[Upload, bytes | None]:
        filename, data = files.get("file", ("", None))
        upload = Upload(provider, fields, filename, len(data or b""))
        with self.server.lock:
            self.uploads.append(upload)
        return upload, data

    # -- OpenAI ---------------------------------------------------------------------------
    def _openai(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.openai_key}":
            return _openai_error(401, "Incorrect API key provided. You can find your API key at "
                                      "https://platform.openai.com/account/api-keys.",
                                 "invalid_request_error", "invalid_api_key")
        if len(request.body) > OPENAI_MAX_BYTES:
            return _openai_error(413, f"Maximum content size limit ({OPENAI_MAX_BYTES}) exceeded "
                                      f"({len(request.body)} bytes read)", "server_error")
        upload, data = self._record("openai", *request.form())
        model, fmt = upload.fields.get("model"), upload.fields.get("response_format", "json")
        if model not in OPENAI_MODELS or data is None:
            return _openai_error(400, f"Invalid model or missing file: {model!r}", "invalid_request_error")
        refusal = self._diarize_refusal(upload.fields) if model == DIARIZE_MODEL else None
        if refusal is not None:
            return refusal
        if model not in ("whisper-1", DIARIZE_MODEL) and fmt not in ("json", "text"):
            return _openai_error(400, f"response_format '{fmt}' is not compatible with model '{model}'. "
                                      "Use 'json' or 'text' instead.", "invalid_request_error",
                                 "unsupported_value")
        try:
            samples = decode_pcm(data)
        except UndecodableAudio:
            return _openai_error(400, "Invalid file format. Supported formats: ['flac', 'm4a', 'mp3', "
                                      "'mp4', 'mpeg', 'mpga', 'oga', 'ogg', 'wav', 'webm']",
                                 "invalid_request_error")
        upload.duration = len(samples) / RATE
        cap = self.duration_caps.get(model)
        if cap is not None and upload.duration > cap:
            return _openai_error(400, f"audio duration {upload.duration} seconds is longer than {cap:g} seconds "
                                      "which is the maximum for this model", "invalid_request_error",
                                 "invalid_value")
        if model == DIARIZE_MODEL and upload.duration > 30 and upload.fields.get("chunking_strategy") is None:
            return _openai_error(400, "chunking_strategy is required for diarization models when the input "
                                      "is longer than 30 seconds", "invalid_request_error", "invalid_value")
        if fmt == "diarized_json":
            return self._diarized_answer(analyse(samples), upload)
        return self._openai_answer(analyse(samples), upload, fmt)

    @staticmethod
    def _diarize_refusal(fields: dict) -> Response | None:
        """What openai-python's transcription_create_params.py says the diarize model does not take."""
        fmt = fields.get("response_format", "json")
        if fmt not in ("json", "text", "diarized_json"):
            return _openai_error(400, f"response_format '{fmt}' is not compatible with model "
                                      f"'{DIARIZE_MODEL}'.", "invalid_request_error", "unsupported_value")
        for name in ("prompt", "timestamp_granularities[]", "timestamp_granularities"):
            if name in fields:
                return _openai_error(400, f"Unsupported parameter: '{name}' is not supported with this model.",
                                     "invalid_request_error", "unsupported_parameter")
        return None

    @staticmethod
    def _diarized_answer(runs: list[Run], upload: Upload) -> Response:
        """``TranscriptionDiarized``: segments with speakers labelled A, B, ... (alternating here)."""
        segments = [{"type": "transcript.text.segment", "id": f"seg_{i}", "start": run.start, "end": run.end,
                     "text": run.text, "speaker": "AB"[i % 2]} for i, run in enumerate(runs)]
        tokens = 10 + 5 * sum(len(run.words) for run in runs)
        return json_response({"task": "transcribe", "duration": upload.duration,
                              "text": " ".join(run.text for run in runs), "segments": segments,
                              "usage": {"type": "tokens", "input_tokens": tokens, "output_tokens": tokens // 2,
                                        "total_tokens": tokens + tokens // 2}})

    def _openai_answer(self, runs: list[Run], upload: Upload, fmt: str) -> Response:
        text = " ".join(run.text for run in runs)
        if fmt == "text":
            return Response(200, text + "\n")
        if fmt == "json":
            tokens = 10 + 5 * sum(len(run.words) for run in runs)
            return json_response({"text": text, "usage": {
                "type": "tokens", "input_tokens": tokens, "output_tokens": tokens // 2,
                "total_tokens": tokens + tokens // 2,
                "input_token_details": {"text_tokens": 0, "audio_tokens": tokens}}})
        language = _LANGUAGE_NAMES.get(upload.fields.get("language", "de"), ("german",))[0]
        segments = [{"id": i, "seek": 0, "start": run.start, "end": run.end, "text": " " + run.text,
                     "tokens": [50364 + i], "temperature": 0.0, "avg_logprob": -0.21,
                     "compression_ratio": 1.1, "no_speech_prob": 0.01} for i, run in enumerate(runs)]
        return json_response({"task": "transcribe", "language": language, "duration": upload.duration,
                              "text": text, "segments": segments,
                              "usage": {"type": "duration", "seconds": math.ceil(upload.duration)}})

    # -- ElevenLabs -----------------------------------------------------------------------
    def _elevenlabs(self, request: Request) -> Response:
        if request.headers.get("xi-api-key") != self.elevenlabs_key:
            return _elevenlabs_error(401, "invalid_api_key", "Invalid API key")
        upload, data = self._record("elevenlabs", *request.form())
        if upload.fields.get("model_id") not in ELEVENLABS_MODELS or data is None:
            return json_response({"detail": [{"loc": ["body", "model_id"], "msg": "Field required",
                                              "type": "missing"}]}, 422)
        try:
            samples = decode_pcm(data)
        except UndecodableAudio:
            return _elevenlabs_error(400, "invalid_content", "The audio file could not be decoded.")
        upload.duration = len(samples) / RATE
        runs = analyse(samples)
        diarize = upload.fields.get("diarize") == "true"
        language = _LANGUAGE_NAMES.get(upload.fields.get("language_code", "de"), ("", "deu"))[1]
        return json_response({"language_code": language, "language_probability": 0.98,
                              "text": " ".join(run.text for run in runs),
                              "words": self._elevenlabs_words(runs, diarize, self.untimed_items)})

    @staticmethod
    def _elevenlabs_words(runs: list[Run], diarize: bool, untimed: bool = False) -> list[dict]:
        items: list[dict] = []
        if untimed:
            items.append({"text": "(music)", "start": None, "end": None, "type": "audio_event",
                          "speaker_id": "speaker_0" if diarize else None, "logprob": 0.0})
        for index, run in enumerate(runs):
            speaker = f"speaker_{index % 2}" if diarize else None
            for word in run.words:
                if items:
                    gap = (None, None) if untimed else (items[-1]["end"], word.start)
                    items.append({"text": " ", "start": gap[0], "end": gap[1],
                                  "type": "spacing", "speaker_id": speaker, "logprob": 0.0})
                items.append({"text": word.text, "start": word.start, "end": word.end, "type": "word",
                              "speaker_id": speaker, "logprob": 0.0})
        return items


def env_for(stt: FakeSTT, **extra) -> dict:
    """Environment variables that point both providers at the fake (for from_env and the CLI)."""
    env = {"OPENAI_API_KEY": stt.openai_key, "OPENAI_BASE_URL": stt.openai_base_url,
           "ELEVENLABS_API_KEY": stt.elevenlabs_key, "ELEVENLABS_BASE_URL": stt.elevenlabs_base_url}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}

