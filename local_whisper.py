"""Local, offline speech-to-text with faster-whisper (Whisper on CTranslate2; CPU or GPU; no torch).

This module is the engine behind the ``local`` provider (``transcription.LocalWhisperTranscriber``).
It imports ``faster_whisper`` at the top (0.5 s): import it only where the local provider is used.

- **One model per process.** ``engine_for(settings)`` returns the process-wide engine for those
  settings; its model is loaded once (``load``) and serves every worker thread.
- **Parallelism that fits the hardware.** ``workers`` is CTranslate2's own parallelism
  (``num_workers``: that many transcriptions run at once on one model, whose weights the workers
  share), never one model copy per thread. On CPU the workers are capped at the cores and split
  them (``cpu_threads = cores // workers``), so the cores are not oversubscribed. A semaphore
  holds any further caller back until a worker is free.
- **Bounded memory.** A recording is decoded with PyAV straight from the original file (any audio
  or video container; no re-encoding, no upload chunks) and transcribed window by window:
  ``WINDOW_SECONDS`` of audio at a time, each window ending at the quietest moment of its last
  ``CUT_SEARCH_SECONDS``, so hours of audio never sit in memory at once and no word is cut in half
  unless the speech has no pause at all.
- **Timestamps.** Voice-activity filtering (Silero VAD, shipped inside faster-whisper) is on; word
  timestamps are on and tighten each segment to its first and last word. Segments come back in
  order and never overlap.

A model is a Whisper size name (downloaded from the Hugging Face Hub on first use, then cached) or
the path of a folder holding a CTranslate2 model (``model.bin``), which works offline.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import av
import ctranslate2
import huggingface_hub
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.utils import available_models

from pipeline.errors import ConfigError, PermanentError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# Audio decoded and transcribed at a time: 10 minutes is 19 MB of 16-bit samples, and the
# features and VAD of one window stay well under 200 MB.
WINDOW_SECONDS = 600.0
# A window ends in the quietest half second of its last CUT_SEARCH_SECONDS.
CUT_SEARCH_SECONDS = 30.0
CUT_FRAME_SECONDS = 0.1
PAUSE_FRAMES = 5  # the quietest half second
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_COMPUTE_TYPES = {"cpu": "int8", "cuda": "float16"}
# The model when none is named, by the device it runs on (docs/local-transcription.md says why):
# on a CPU, ``small`` finishes an hour of German on a laptop's cores within the hour; on a GPU,
# ``turbo`` (large-v3's encoder, 4 decoder layers) is far more accurate and still many times real time.
DEFAULT_MODELS = {"cpu": "small", "cuda": "turbo"}
# The files of a CTranslate2 Whisper repository on the Hub (what faster-whisper itself fetches).
MODEL_FILES = ["config.json", "preprocessor_config.json", "model.bin", "tokenizer.json", "vocabulary.*"]
# Same decoding options for every window, and for the benchmark's direct calls.
TRANSCRIBE_OPTIONS = {"vad_filter": True, "word_timestamps": True}


CUDA_LIBRARIES_HINT = "pip install nvidia-cublas-cu12 nvidia-cudnn-cu12, or the system's CUDA 12 and cuDNN 9"


def warm_up(model: WhisperModel) -> None:
    """One second of silence through the model: the first real inference, where missing CUDA
    libraries show (the seam tests use, as CI has no GPU)."""
    pieces, _info = model.transcribe(np.zeros(SAMPLE_RATE, dtype=np.float32), language="en", beam_size=1,
                                     vad_filter=False)
    list(pieces)


# -- settings ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSettings:
    model: str            # a Whisper size name, or the absolute path of a CTranslate2 model folder
    device: str           # "cpu" or "cuda"
    compute_type: str
    workers: int          # transcriptions at once (CTranslate2 num_workers)
    cpu_threads: int      # threads per transcription (CTranslate2 intra_threads)
    chosen: bool = False  # the device was chosen for the user (auto): a GPU that cannot run falls back
    named: bool = True    # the model was named; else it is the device's default and follows a fallback

    @property
    def label(self) -> str:
        """The model's name for transcripts: the size name, or the folder's name."""
        return os.path.basename(self.model) if os.path.isabs(self.model) else self.model


def cpu_cores() -> int:
    """Cores this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# Whisper's multilingual models have this many tokens or more; the English-only ones (``*.en``) one
# fewer. CTranslate2 tells them apart the same way (``Whisper.is_multilingual``).
MULTILINGUAL_VOCABULARY = 51865


def english_only(model: str) -> bool:
    """True for an English-only Whisper: a ``*.en`` size name, or a model folder named so or whose
    vocabulary is the English-only one. Known without loading the model."""
    if os.path.basename(model.rstrip("/")).endswith(".en"):
        return True
    if os.path.isdir(model):
        try:
            with open(os.path.join(model, "vocabulary.txt"), encoding="utf-8") as handle:
                return sum(1 for _line in handle) < MULTILINGUAL_VOCABULARY
        except OSError:
            return False  # no vocabulary file to tell by: the engine will say what it can
    return False


def resolve_model(model: str) -> str:
    """A size name as it is, a model folder as an absolute path; anything else is a ConfigError."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model.bin")):
            raise ConfigError(f"local: {model!r} is not a CTranslate2 model folder (no model.bin in it)")
        return os.path.abspath(model)
    if model in available_models():
        return model
    raise ConfigError(f"local: --model {model!r} is neither a Whisper size ({', '.join(available_models())}) "
                      "nor a folder holding a CTranslate2 model")


def settings_for(model: str | None, *, device: str | None = None, compute_type: str | None = None,
                 workers: int | None = None, cores: int | None = None) -> EngineSettings:
    """Validated settings: ``device`` auto/cpu/cuda (auto: cuda when CTranslate2 sees a GPU),
    ``model`` the device's default (``DEFAULT_MODELS``) unless named, ``compute_type`` int8 on CPU
    and float16 on GPU by default, ``workers`` capped at the cores on CPU, and the cores shared out
    among the workers."""
    device = (device or "auto").strip().lower()
    if device not in DEVICES:
        raise ConfigError(f"local: --device {device!r}; choose from {', '.join(DEVICES)}")
    gpus = ctranslate2.get_cuda_device_count()
    chosen = device == "auto"
    if chosen:
        device = "cuda" if gpus else "cpu"
    elif device == "cuda" and not gpus:
        raise ConfigError("local: --device cuda, but no CUDA device is visible to CTranslate2")
    named = bool(model)
    model = resolve_model(model or DEFAULT_MODELS[device])
    compute_type = (compute_type or DEFAULT_COMPUTE_TYPES[device]).strip().lower()
    supported = ctranslate2.get_supported_compute_types(device)
    if compute_type not in supported and compute_type not in ("auto", "default"):
        raise ConfigError(f"local: --compute-type {compute_type!r} is not supported on {device} here; "
                          f"choose from {', '.join(sorted(supported))}")
    cores = cores or cpu_cores()
    wanted = max(1, workers or 1)
    workers = min(wanted, cores) if device == "cpu" else wanted
    if workers < wanted:
        log.info("local: %d workers asked, %d cores: %d transcriptions at a time", wanted, cores, workers)
    return EngineSettings(model, device, compute_type, workers, max(1, cores // workers), chosen, named)


# -- results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimedText:
    start: float
    end: float
    text: str


@dataclass
class EngineResult:
    segments: list[TimedText]
    language: str | None
    duration: float                     # seconds of audio decoded
    raw: list[dict]                     # one entry per window; times are from the start of the file


# -- the engine -------------------------------------------------------------------------------
class LocalWhisperEngine:
    """One faster-whisper model and the slots to run it; thread-safe."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self._model: WhisperModel | None = None
        self._load_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(settings.workers)

    def load(self) -> WhisperModel:
        """Load the model once (downloading a named one on first use); ConfigError if that fails.

        On a GPU, one second of silence is transcribed first: CTranslate2 may see the GPU and load
        the model, yet every transcription fail for a missing CUDA library (libcublas.so.12), which
        would fail every file of the archive. A device chosen for the user then falls back to the
        CPU with one line saying why; a GPU asked for is a configuration error naming the library."""
        with self._load_lock:
            if self._model is None:
                model = self._open(self.settings)
                if self.settings.device == "cuda":
                    model = self._warmed_up(model)
                self._model = model
            return self._model

    def _open(self, s: EngineSettings) -> WhisperModel:
        log.info("local: loading Whisper model %r on %s (%s), %d worker(s) x %d thread(s)",
                 s.label, s.device, s.compute_type, s.workers, s.cpu_threads)
        try:
            folder = s.model if os.path.isabs(s.model) else fetch_model(s.model)
            return WhisperModel(folder, device=s.device, compute_type=s.compute_type,
                                cpu_threads=s.cpu_threads, num_workers=s.workers)
        except Exception as exc:  # hub, network, disk and CTranslate2 errors all mean "cannot load"
            raise ConfigError(_load_error(s, exc)) from exc

    def _warmed_up(self, model: WhisperModel) -> WhisperModel:
        try:
            warm_up(model)
            return model
        except (RuntimeError, OSError) as exc:
            why = str(exc).strip() or type(exc).__name__
            if not self.settings.chosen:
                raise ConfigError(f"local: --device cuda cannot run Whisper here: {why}. Install NVIDIA's CUDA 12"
                                  f" libraries ({CUDA_LIBRARIES_HINT}) or use --device cpu") from exc
            log.warning("local: the GPU cannot run Whisper (%s); transcribing on the CPU instead (%s to use it)",
                        why, CUDA_LIBRARIES_HINT)
            model = self.settings.model if self.settings.named else None  # a default follows the device
            self.settings = settings_for(model, device="cpu", workers=self.settings.workers)
            return self._open(self.settings)

    def transcribe(self, path, *, language: str | None = None, prompt: str | None = None,
                   expected: list[str] | None = None) -> EngineResult:
        """Transcribe one recording (any container PyAV reads), window by window, in one worker slot.
        Without ``language``, the language is detected in the first window, among ``expected``
        only when the archive names the languages it expects."""
        model = self.load()
        with self._slots:
            segments: list[TimedText] = []
            raw: list[dict] = []
            samples_seen = 0
            for offset, samples in decode_windows(path):
                window_end = (offset + len(samples)) / SAMPLE_RATE
                if language is None and expected:
                    language = likeliest_expected(model, samples, expected)
                pieces, info = model.transcribe(samples, language=language, initial_prompt=prompt,
                                                **TRANSCRIBE_OPTIONS)
                pieces = list(pieces)  # the generator does the work: run it here
                language = language or info.language  # detected in the first window, kept after
                raw.append(_raw_window(offset / SAMPLE_RATE, window_end, info, pieces))
                segments += _timed(pieces, offset / SAMPLE_RATE, window_end)
                samples_seen = offset + len(samples)
        return EngineResult(_ordered(segments), language, samples_seen / SAMPLE_RATE, raw)


def likeliest_expected(model, samples, expected: list[str]) -> str | None:
    """Of the languages the archive expects, the one Whisper scores likeliest for this audio.
    Whisper scores every language; left to itself it may pick one the archive never speaks (German
    espeak speech was read as Latin, and came out as nonsense). None for an English-only model."""
    if not getattr(getattr(model, "model", None), "is_multilingual", True):
        return None
    _best, _probability, scores = model.detect_language(samples)
    probabilities = dict(scores)
    return max(expected, key=lambda code: probabilities.get(code, 0.0))


_engines: dict[EngineSettings, LocalWhisperEngine] = {}
_engines_lock = threading.Lock()


def engine_for(settings: EngineSettings) -> LocalWhisperEngine:
    """The process-wide engine for ``settings`` (its model is loaded on first use)."""
    with _engines_lock:
        if settings not in _engines:
            _engines[settings] = LocalWhisperEngine(settings)
        return _engines[settings]


def fetch_model(name: str) -> str:
    """The folder of Whisper size ``name``: the cached copy (no network call), else downloaded from
    the Hugging Face Hub into its cache with a progress bar on stderr. faster-whisper downloads
    without one, and a first model is 0.5 to 1.6 GB: a run must not look hung meanwhile."""
    from faster_whisper.utils import _MODELS, download_model  # faster-whisper's size -> repository map
    from huggingface_hub.errors import LocalEntryNotFoundError
    from tqdm import tqdm

    try:
        return download_model(name, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    log.info("local: downloading Whisper model %r from the Hugging Face Hub (first use; cached after)", name)
    return huggingface_hub.snapshot_download(_MODELS[name], allow_patterns=MODEL_FILES, tqdm_class=tqdm)


def _load_error(settings: EngineSettings, exc: Exception) -> str:
    detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if os.path.isabs(settings.model):
        return f"local: could not load the model in {settings.model!r} ({detail})"
    return (f"local: could not load Whisper model {settings.model!r} ({detail}). A size name is downloaded "
            "from the Hugging Face Hub on first use and cached; offline, pass --model PATH to a folder "
            "holding a CTranslate2 model")


# -- segments ---------------------------------------------------------------------------------
def _timed(pieces, offset: float, window_end: float) -> list[TimedText]:
    """Segments of one window with times from the start of the file, tightened to their words."""
    result = []
    for piece in pieces:
        text = piece.text.strip()
        if not text:
            continue
        words = piece.words or []
        start = float(words[0].start if words else piece.start) + offset
        end = float(words[-1].end if words else piece.end) + offset
        result.append(TimedText(start, min(end, window_end), text))
    return result


def _ordered(segments: list[TimedText]) -> list[TimedText]:
    """In order and never overlapping: a segment starts no earlier than the previous one ended."""
    result: list[TimedText] = []
    previous_end = 0.0
    for segment in segments:
        start = max(segment.start, previous_end)
        end = max(segment.end, start)
        result.append(TimedText(round(start, 3), round(end, 3), segment.text))
        previous_end = end
    return result


def _raw_window(start: float, end: float, info, pieces) -> dict:
    def words(piece):
        return [{"start": round(float(w.start) + start, 3), "end": round(float(w.end) + start, 3),
                 "word": w.word, "probability": round(float(w.probability), 4)} for w in piece.words or []]

    return {"start": round(start, 3), "end": round(end, 3), "language": info.language,
            "language_probability": round(float(info.language_probability), 4),
            "segments": [{"start": round(float(p.start) + start, 3), "end": round(float(p.end) + start, 3),
                          "text": p.text, "avg_logprob": round(float(p.avg_logprob), 4),
                          "no_speech_prob": round(float(p.no_speech_prob), 4), "words": words(p)}
                         for p in pieces]}


# -- streaming decode -------------------------------------------------------------------------
def decode_windows(path):
    """Yield ``(offset_in_samples, float32 samples)`` windows of 16 kHz mono audio, decoded from
    ``path`` as it is read: at most one window (plus the search margin) is held at a time.

    The file is opened by Python and handed to PyAV as a file object, so its name is never read as
    a protocol or an option. Undecodable frames are skipped (as faster-whisper does); a file with
    no decodable audio raises ``PermanentError``.
    """
    window = int(WINDOW_SECONDS * SAMPLE_RATE)
    search = int(CUT_SEARCH_SECONDS * SAMPLE_RATE)
    frame = max(1, int(CUT_FRAME_SECONDS * SAMPLE_RATE))
    pending: list[np.ndarray] = []
    buffered = offset = 0
    for block in _decoded_blocks(path):
        pending.append(block)
        buffered += len(block)
        while buffered >= window:
            samples = np.concatenate(pending)
            cut = quiet_cut(samples[:window], search, frame)
            yield offset, _to_float(samples[:cut])
            rest = samples[cut:]
            pending, buffered, offset = [rest], len(rest), offset + cut
    if buffered:
        yield offset, _to_float(np.concatenate(pending))
    elif offset == 0:
        raise PermanentError("no decodable audio in the file", error_class="unsupported_media")


def quiet_cut(samples: np.ndarray, search: int, frame: int) -> int:
    """Where to end a window: the middle of the quietest stretch (``PAUSE_FRAMES`` frames of
    ``frame`` samples, smoothed) in the last ``search`` samples; of equally quiet stretches, the
    middle of the last run of them."""
    start = max(0, len(samples) - search)
    count = (len(samples) - start) // frame
    if count == 0:
        return len(samples)
    tail = samples[start:start + count * frame].astype(np.float32).reshape(count, frame)
    span = min(count, PAUSE_FRAMES)
    energy = np.convolve(np.square(tail).mean(axis=1), np.ones(span) / span, mode="same")
    ties = np.flatnonzero(energy <= energy.min())
    breaks = np.flatnonzero(np.diff(ties) > 1)
    first = ties[breaks[-1] + 1] if len(breaks) else ties[0]
    return start + int((first + ties[-1]) // 2) * frame + frame // 2


def _to_float(samples: np.ndarray) -> np.ndarray:
    return samples.astype(np.float32) / 32768.0


def _decoded_blocks(path):
    """16-bit mono 16 kHz sample blocks of the first audio stream, as decoded."""
    resampler = av.audio.resampler.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    try:
        with open(path, "rb") as handle, av.open(handle, mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise PermanentError("no audio track in the file", error_class="no_audio")
            for frame in _valid_frames(container.decode(audio=0)):
                frame.pts = None  # resample by sample count; broken timestamps do not matter
                for out in resampler.resample(frame):
                    yield out.to_ndarray().reshape(-1)
            for out in resampler.resample(None):  # flush
                yield out.to_ndarray().reshape(-1)
    except av.FFmpegError as exc:
        raise PermanentError(f"audio could not be decoded ({exc})", error_class="unsupported_media") from exc


def _valid_frames(frames):
    iterator = iter(frames)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            continue
