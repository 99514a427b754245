"""Audio preparation with ffmpeg: probe a recording, extract and compact its audio, split it to fit.

Speech-to-text APIs take one audio file per request, with an upload limit (OpenAI: 25 MiB) and for
some models a length limit (1500 s). An interview is hours of audio or video, so ``prepare`` turns
any input into a list of ``Chunk`` files inside a per-job working folder:

- the audio track is extracted from video;
- audio is re-encoded to 16 kHz mono Ogg/Opus at 24 kbit/s (about 11 MB per hour) when that is
  clearly smaller than the original, or when the original is video or a container a provider may
  not accept; otherwise the original is used as it is (through a safely named symlink);
- when the result is still too big or too long it is cut into chunks at silences (ffmpeg
  ``silencedetect``), the nearest silence below each limit, so no word is cut in half unless the
  audio has no pause at all; every chunk knows its exact offset in the original.

ffmpeg reads and writes every file itself: no audio passes through Python memory. Input names
are passed as ``file:`` plus the absolute path in bytes, so names with a leading ``-``, newlines,
non-UTF-8 bytes or a ``proto:`` prefix are never read as options, stdin or a protocol. Every
subprocess runs with a timeout. Bad input raises ``PermanentError`` with ``error_class``
``not_found``, ``empty_file``, ``unsupported_media`` or ``no_audio``.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.errors import PermanentError, RetryableError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
OPUS_BITRATE = 24000
# Opus is variable bitrate and Ogg adds framing: budget 15% above the nominal rate.
OPUS_BYTES_PER_SECOND = OPUS_BITRATE / 8 * 1.15
# Keep the original when re-encoding would not save at least a fifth: a second lossy
# generation costs recognition accuracy for little gain.
KEEP_ORIGINAL_RATIO = 0.8
# A pause is at least this long and this quiet (interviews: breaths, sentence ends).
SILENCE_NOISE = "-35dB"
SILENCE_MIN_SECONDS = 0.4
# Cutting closer than this to the previous cut would only make tiny chunks.
MIN_CHUNK_SECONDS = 1.0
# The segment muxer cuts at the first packet at or after a cut time (Opus: 20 ms frames), so
# planned lengths stay this far below a length limit.
CUT_SLACK_SECONDS = 0.1
# Size-based chunk lengths are planned with this share of the limit (Ogg headers, rate swings);
# a plan whose chunks still come out too big is redone at the measured rate, this often at most.
SIZE_MARGIN = 0.9
SPLIT_ATTEMPTS = 3

PROBE_TIMEOUT = 120.0
# Decoding plus Opus encoding runs at well over 20x real time; the rest is headroom.
WORK_TIMEOUT_BASE = 300.0
WORK_TIMEOUT_PER_SECOND = 0.05

# Containers (as ffmpeg names them) that every provider accepts for upload, with the file
# extension the upload must carry. Anything else is re-encoded.
_UPLOAD_EXTENSIONS = {
    "wav": ".wav",
    "mp3": ".mp3",
    "flac": ".flac",
    "ogg": ".ogg",
    "mov,mp4,m4a,3gp,3g2,mj2": ".m4a",
}
# ffmpeg "opens" plain text as ANSI art (container tty): that is not a recording.
_NOT_MEDIA_CONTAINERS = {"tty"}

_INPUT_RE = re.compile(r"^Input #0, (.+?), from ", re.M)
_DURATION_RE = re.compile(r"^\s+Duration: (N/A|(\d+):(\d{2}):(\d{2}(?:\.\d+)?))", re.M)
_STREAM_RE = re.compile(r"^\s+Stream #0:\d+.*?: (Audio|Video): ([^\s,]+)(.*)$", re.M)
_OUT_TIME_RE = re.compile(r"^out_time_us=(\d+)$", re.M)
_SILENCE_RE = re.compile(r"silence_(start|end): (-?\d+(?:\.\d+)?)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class MediaInfo:
    duration: float | None
    has_audio: bool
    has_video: bool
    audio_codec: str | None
    size: int
    container: str | None = None


@dataclass(frozen=True)
class Chunk:
    path: str          # inside the job's working folder
    offset: float      # seconds from the start of the original recording
    duration: float


@functools.lru_cache(maxsize=1)
def ffmpeg_path() -> str:
    """An ffmpeg on PATH if there is one (the system's, kept up to date), else imageio-ffmpeg's."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        raise ConfigError("ffmpeg not found: install ffmpeg or the imageio-ffmpeg package") from exc


def ffmpeg_input(path: str | bytes | os.PathLike) -> bytes:
    """The name to give ffmpeg for ``path``: never an option, stdin or another protocol."""
    return b"file:" + os.path.abspath(os.fsencode(path))


def run_ffmpeg(args: list, *, timeout: float) -> subprocess.CompletedProcess:
    """Run ffmpeg with ``args`` (str or bytes), stdin closed, output captured, within ``timeout``."""
    command = [ffmpeg_path(), "-hide_banner", "-nostdin", *args]
    try:
        return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RetryableError(f"ffmpeg did not finish within {timeout:.0f} s",
                             error_class="ffmpeg_timeout") from exc


def _stderr(result: subprocess.CompletedProcess) -> str:
    return result.stderr.decode("utf-8", "replace")


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _display(path) -> str:
    """A file name fit for a one-line message: undecodable bytes and control characters escaped."""
    text = os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL_RE.sub(lambda match: repr(match.group())[1:-1], text)


# -- probing ---------------------------------------------------------------------------------
def probe(path: str | bytes | os.PathLike) -> MediaInfo:
    """Describe a media file from ``ffmpeg -i``; decode it for the duration only when the header lacks one.

    Raises ``PermanentError`` when the file is missing, empty or not media ffmpeg can read. A
    video without sound is described (``has_audio=False``), not refused: ``prepare`` refuses it.
    """
    try:
        size = os.stat(os.fsencode(path)).st_size
    except FileNotFoundError as exc:
        raise PermanentError(f"no such file: {_display(path)}", error_class="not_found") from exc
    if size == 0:
        raise PermanentError(f"empty file (0 bytes): {_display(path)}", error_class="empty_file")
    text = _stderr(run_ffmpeg(["-i", ffmpeg_input(path)], timeout=PROBE_TIMEOUT))
    info = _parse_probe(text, size)
    if info is None:
        raise PermanentError(f"not a readable audio or video file ({_last_error_line(text)}): {_display(path)}",
                             error_class="unsupported_media")
    if info.duration is None and info.has_audio:
        info = MediaInfo(_decoded_duration(path, PROBE_TIMEOUT * 10), info.has_audio, info.has_video,
                         info.audio_codec, info.size, info.container)
    return info


def _parse_probe(text: str, size: int) -> MediaInfo | None:
    """Parse ``ffmpeg -i`` stderr; None when ffmpeg found no media in the file."""
    container = _INPUT_RE.search(text)
    if not container or container.group(1) in _NOT_MEDIA_CONTAINERS:
        return None
    audio_codec, has_video = None, False
    for kind, codec, rest in _STREAM_RE.findall(text):
        if kind == "Audio" and audio_codec is None:
            audio_codec = codec
        elif kind == "Video" and "(attached pic)" not in rest:  # cover art is not video
            has_video = True
    if audio_codec is None and not has_video:
        return None
    return MediaInfo(_parse_duration(text), audio_codec is not None, has_video, audio_codec, size,
                     container.group(1))


def _parse_duration(text: str) -> float | None:
    match = _DURATION_RE.search(text)
    if not match or match.group(1) == "N/A":
        return None
    return int(match.group(2)) * 3600 + int(match.group(3)) * 60 + float(match.group(4))


def _progress_seconds(stdout: bytes) -> float:
    """The last ``out_time_us`` that ``-progress pipe:1`` reported: the decoded length."""
    times = _OUT_TIME_RE.findall(stdout.decode("ascii", "replace"))
    return int(times[-1]) / 1e6 if times else 0.0


def _decoded_duration(path, timeout: float) -> float:
    result = run_ffmpeg(["-nostats", "-i", ffmpeg_input(path), "-map", "0:a:0", "-f", "null", "-",
                         "-progress", "pipe:1"], timeout=timeout)
    seconds = _progress_seconds(result.stdout)
    if result.returncode != 0 or seconds <= 0:
        raise PermanentError(f"no decodable audio ({_last_error_line(_stderr(result))}): {_display(path)}",
                             error_class="unsupported_media")
    return seconds


# -- preparing -------------------------------------------------------------------------------
def prepare(path: str | bytes | os.PathLike, workdir: str | os.PathLike, *,
            max_upload_bytes: int | None = None, max_chunk_seconds: float | None = None,
            info: MediaInfo | None = None) -> list[Chunk]:
    """Turn a recording into upload-ready audio chunks inside ``workdir`` (the caller cleans it up).

    ``info`` may pass in a ``probe`` result the caller already has.
    """
    info = info or probe(path)
    workdir = Path(os.path.abspath(workdir))
    if not info.has_audio:
        raise PermanentError(f"video without an audio track: {_display(path)}", error_class="no_audio")
    limits = _Limits(max_upload_bytes, max_chunk_seconds)
    upload_ext = None if info.has_video else _UPLOAD_EXTENSIONS.get(info.container or "")
    estimate = info.duration * OPUS_BYTES_PER_SECOND
    if upload_ext and estimate > info.size * KEEP_ORIGINAL_RATIO and limits.fits(info.size, info.duration):
        return [Chunk(_link_original(path, workdir, upload_ext), 0.0, info.duration)]
    compact = workdir / "audio.ogg" if limits.fits(estimate, info.duration) else None
    duration, silences = _scan(path, compact, _work_timeout(info.duration))
    if compact is not None and limits.fits(compact.stat().st_size, duration):
        return [Chunk(str(compact), 0.0, duration)]
    return _split(path, workdir, duration, silences, limits)


@dataclass(frozen=True)
class _Limits:
    max_bytes: int | None
    max_seconds: float | None

    def fits(self, size: float, seconds: float) -> bool:
        return ((self.max_bytes is None or size <= self.max_bytes)
                and (self.max_seconds is None or seconds <= self.max_seconds))

    def chunk_seconds(self, bytes_per_second: float) -> float:
        """The longest chunk that stays under both limits at ``bytes_per_second``."""
        seconds = self.max_seconds - CUT_SLACK_SECONDS if self.max_seconds is not None else float("inf")
        if self.max_bytes is not None:
            seconds = min(seconds, self.max_bytes * SIZE_MARGIN / bytes_per_second)
        return seconds


def _work_timeout(duration: float) -> float:
    return WORK_TIMEOUT_BASE + duration * WORK_TIMEOUT_PER_SECOND


def _link_original(path, workdir: Path, ext: str) -> str:
    """A safely named symlink to the untouched original, so uploads never carry the original name."""
    link = workdir / f"original{ext}"
    os.symlink(os.path.abspath(os.fsencode(path)), os.fsencode(link))
    return str(link)


def _opus_args() -> list[str]:
    return ["-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "libopus",
            "-b:a", str(OPUS_BITRATE), "-application", "voip"]


def _scan(path, compact: Path | None, timeout: float) -> tuple[float, list[tuple[float, float]]]:
    """One decoding pass: the exact duration and the silences, writing the compact file on the way."""
    output = ["-f", "ogg", "-y", ffmpeg_input(compact)] if compact is not None else ["-f", "null", "-"]
    codec = _opus_args() if compact is not None else []
    result = run_ffmpeg(["-nostats", "-i", ffmpeg_input(path), "-map", "0:a:0",
                         "-af", f"silencedetect=noise={SILENCE_NOISE}:duration={SILENCE_MIN_SECONDS}",
                         *codec, *output, "-progress", "pipe:1"], timeout=timeout)
    text = _stderr(result)
    duration = _progress_seconds(result.stdout)
    if result.returncode != 0 or duration <= 0:
        raise PermanentError(f"audio could not be decoded ({_last_error_line(text)}): {_display(path)}",
                             error_class="unsupported_media")
    return duration, parse_silences(text, duration)


def parse_silences(text: str, duration: float) -> list[tuple[float, float]]:
    """(start, end) pairs from silencedetect's log; a silence still open at the end lasts to ``duration``."""
    silences, start = [], None
    for kind, value in _SILENCE_RE.findall(text):
        if kind == "start":
            start = max(0.0, float(value))
        elif start is not None:
            silences.append((start, float(value)))
            start = None
    if start is not None:
        silences.append((start, duration))
    return silences


def plan_cuts(duration: float, silences: list[tuple[float, float]], max_seconds: float) -> list[float]:
    """Cut times so that no piece is longer than ``max_seconds``.

    Each cut goes into the silence nearest below the limit (its middle, or the limit itself when
    the silence reaches past it); only a stretch with no pause at all is cut hard at the limit.
    """
    cuts, start = [], 0.0
    while duration - start > max_seconds:
        limit = start + max_seconds
        candidates = [min((s + e) / 2, limit) for s, e in silences if s < limit]
        candidates = [c for c in candidates if c >= start + MIN_CHUNK_SECONDS]
        cut = max(candidates, default=limit)
        cuts.append(cut)
        start = cut
    return cuts


def _split(path, workdir: Path, duration: float, silences, limits: _Limits) -> list[Chunk]:
    """Cut into Opus chunks at planned times; if a chunk still comes out too big, plan again
    with the byte rate the densest chunk really had."""
    rate = OPUS_BYTES_PER_SECOND
    for attempt in range(SPLIT_ATTEMPTS):
        cuts = plan_cuts(duration, silences, limits.chunk_seconds(rate))
        chunks = _encode_pieces(path, workdir / f"split{attempt}", cuts, duration)
        sizes = [os.path.getsize(c.path) for c in chunks]
        too_big = [size / max(c.duration, 1e-3)  # their real byte rate
                   for size, c in zip(sizes, chunks) if not limits.fits(size, c.duration)]
        if not too_big:
            log.debug("split into %d chunks at %s", len(chunks), [round(c, 2) for c in cuts])
            return chunks
        shutil.rmtree(workdir / f"split{attempt}")  # hours of audio: do not keep a failed plan
        rate = max(rate * 1.25, *too_big)
    raise PermanentError(f"could not split the audio under {limits.max_bytes} bytes per chunk",
                         error_class="too_large")


def _encode_pieces(path, folder: Path, cuts: list[float], duration: float) -> list[Chunk]:
    """One decoding pass through ffmpeg's segment muxer: every piece re-encoded, offsets as cut."""
    folder.mkdir()
    listing = folder / "pieces.csv"
    pattern = os.fsencode(folder).replace(b"%", b"%%") + b"/piece%04d.ogg"  # only our %04d is a pattern
    args = ["-nostats", "-i", ffmpeg_input(path), "-map", "0:a:0", *_opus_args(),
            "-f", "segment", "-segment_format", "ogg", "-reset_timestamps", "1",
            "-segment_list", ffmpeg_input(listing), "-segment_list_type", "csv", "-y"]
    if cuts:
        args += ["-segment_times", ",".join(f"{cut:.3f}" for cut in cuts)]
    result = run_ffmpeg([*args, b"file:" + pattern], timeout=_work_timeout(duration))
    if result.returncode != 0 or not listing.exists():
        raise PermanentError(f"audio could not be split ({_last_error_line(_stderr(result))})",
                             error_class="unsupported_media")
    with open(listing, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    starts = [float(row[1]) for row in rows]
    ends = starts[1:] + [duration]
    return [Chunk(str(folder / row[0]), start, max(0.0, end - start))
            for row, start, end in zip(rows, starts, ends)]
