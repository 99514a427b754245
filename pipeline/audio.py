"""Audio preparation with ffmpeg: probe a recording, extract and compact its audio, split it to fit.

Speech-to-text APIs take one audio file per request, with an upload limit (OpenAI: 25 MiB) and for
some models a length limit (gpt-4o: 1400 s, reported). An interview is hours of audio or video, so
``prepare`` turns any input into a list of ``Chunk`` files inside a per-job working folder (and
``resplit`` cuts one again, shorter, when a provider still finds it too long):

- the audio track is extracted from video;
- audio is re-encoded to 16 kHz mono Ogg/Opus at 24 kbit/s (about 11 MB per hour) when that is
  clearly smaller than the original, or when the original is video or a container a provider may
  not accept; otherwise, and for any small original in an accepted container (re-encoding it would
  cost more than the few kilobytes it saves), the original is used as it is (through a safely named
  symlink);
- when the result is still too big or too long it is cut into chunks at silences (ffmpeg
  ``silencedetect``), the nearest silence below each limit, so no word is cut in half unless the
  audio has no pause at all; every chunk knows its exact offset in the original.

Probing costs no process for the common audio-only formats: WAV (PCM), MP3, Ogg (Opus, Vorbis)
and FLAC are described from their headers in Python, the way ``ffmpeg -i`` describes them; any
other file, or one whose header is unusual, is probed by ffmpeg. Per file that leaves at most the
one ffmpeg run that decodes and encodes, and none for a small compact original.

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
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError, PermanentError, RetryableError
from pipeline.names import display_path

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
OPUS_BITRATE = 24000
# Opus is variable bitrate and Ogg adds framing: budget 15% above the nominal rate.
OPUS_BYTES_PER_SECOND = OPUS_BITRATE / 8 * 1.15
# Keep the original when re-encoding would not save at least a fifth: a second lossy
# generation costs recognition accuracy for little gain.
KEEP_ORIGINAL_RATIO = 0.8
# An original this small (in an accepted container, within the limits) is sent as it is: an
# ffmpeg run costs about 40 ms of CPU, more than uploading the quarter megabyte it could save.
KEEP_SMALL_BYTES = 256 * 1024
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

# Providers refuse shorter audio ("Minimum audio length is 0.1 seconds"): fail it before paying.
MIN_AUDIO_SECONDS = 0.1
# Audio this much shorter than its header promises was cut off (a copy or a recorder that died).
TRUNCATION_TOLERANCE_SECONDS = 0.05

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


@dataclass(frozen=True)
class MediaInfo:
    duration: float | None
    has_audio: bool
    has_video: bool
    audio_codec: str | None
    size: int
    container: str | None = None
    claimed_duration: float | None = None   # what the header promises, where it says (WAV)


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


# -- probing ---------------------------------------------------------------------------------
def probe(path: str | bytes | os.PathLike) -> MediaInfo:
    """Describe a media file from ``ffmpeg -i``; decode it for the duration only when the header lacks one.

    Raises ``PermanentError`` when the file is missing, empty or not media ffmpeg can read. A
    video without sound is described (``has_audio=False``), not refused: ``prepare`` refuses it.
    """
    try:
        size = os.stat(os.fsencode(path)).st_size
        _check_readable(path)
    except FileNotFoundError as exc:
        raise PermanentError(f"no such file: {display_path(path)}", error_class="not_found") from exc
    except PermissionError as exc:
        raise PermanentError(f"permission denied: this process may not read {display_path(path)}",
                             error_class="permission_denied") from exc
    if size == 0:
        raise PermanentError(f"empty file (0 bytes): {display_path(path)}", error_class="empty_file")
    info = quick_probe(path, size)
    if info is not None:
        return info
    text = _stderr(run_ffmpeg(["-i", ffmpeg_input(path)], timeout=PROBE_TIMEOUT))
    info = _parse_probe(text, size)
    if info is None:
        raise PermanentError(f"not a readable audio or video file ({_last_error_line(text)}): {display_path(path)}",
                             error_class="unsupported_media")
    if info.duration is None and info.has_audio:
        info = MediaInfo(_decoded_duration(path, PROBE_TIMEOUT * 10), info.has_audio, info.has_video,
                         info.audio_codec, info.size, info.container)
    return info


def _check_readable(path) -> None:
    """Open and close ``path``: a file we may not read fails as such, not as undecodable media."""
    os.close(os.open(os.fsencode(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)))


def check_complete(info: MediaInfo, path) -> None:
    """Refuse audio cut off before the length its header promises, or shorter than providers take."""
    duration = info.duration or 0.0
    if info.claimed_duration is not None and info.claimed_duration - duration > TRUNCATION_TOLERANCE_SECONDS:
        raise PermanentError(f"truncated: the header promises {info.claimed_duration:.3g} s of audio, the file"
                             f" holds {duration:.3g} s: {display_path(path)}", error_class="truncated")
    if info.duration is not None and duration < MIN_AUDIO_SECONDS:
        raise PermanentError(f"too short: {duration:.3g} s of audio, providers need at least {MIN_AUDIO_SECONDS} s:"
                             f" {display_path(path)}", error_class="too_short")


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
        raise PermanentError(f"no decodable audio ({_last_error_line(_stderr(result))}): {display_path(path)}",
                             error_class="unsupported_media")
    return seconds


# -- probing in Python: the common audio-only formats from their headers ------------------------
_HEAD_BYTES = 64 * 1024
_TAIL_BYTES = 64 * 1024


def quick_probe(path: str | bytes | os.PathLike, size: int | None = None) -> MediaInfo | None:
    """Describe a WAV (PCM), MP3, Ogg (Opus or Vorbis) or FLAC file from its headers, as
    ``ffmpeg -i`` would, without starting a process; None for any other or unusual file (a
    video, several streams, a header that does not add up): then ffmpeg must look at it."""
    try:
        with open(os.fsencode(path), "rb") as handle:
            size = os.fstat(handle.fileno()).st_size if size is None else size
            head = handle.read(_HEAD_BYTES)
            if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
                return _wav_info(head, size)
            if head[:4] == b"OggS":
                return _ogg_info(handle, head, size)
            if head[:4] == b"fLaC":
                return _flac_info(head, size)
            return _mp3_info(handle, head, size)
    except (OSError, ValueError, IndexError, struct.error):
        return None


_PCM_CODECS = {(1, 8): "pcm_u8", (1, 16): "pcm_s16le", (1, 24): "pcm_s24le", (1, 32): "pcm_s32le",
               (3, 32): "pcm_f32le", (3, 64): "pcm_f64le"}


def _wav_info(head: bytes, size: int) -> MediaInfo | None:
    fmt, at = None, 12
    while at + 8 <= len(head):
        chunk, length = head[at:at + 4], int.from_bytes(head[at + 4:at + 8], "little")
        body = at + 8
        if chunk == b"fmt ":
            if length < 16 or body + length > len(head):
                return None
            tag, channels, rate, _byte_rate, align, bits = struct.unpack_from("<HHIIHH", head, body)
            if tag == 0xFFFE and length >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format's tag
                tag = int.from_bytes(head[body + 24:body + 26], "little")
            fmt = (_PCM_CODECS.get((tag, bits)), channels, rate, align, bits)
        elif chunk == b"data":
            if fmt is None or fmt[0] is None:
                return None
            codec, channels, rate, align, bits = fmt
            if not channels or not rate or align != channels * bits // 8:
                return None
            available = size - body
            unknown = length in (0, 0xFFFFFFFF)  # a streaming writer's placeholder: no promise
            frames = (available if unknown else min(length, available)) // align
            if frames <= 0 and unknown:
                return None
            claimed = None if unknown else length // align / rate
            return MediaInfo(frames / rate, True, False, codec, size, "wav", claimed)
        at = body + length + (length & 1)
    return None


def _ogg_page(data: bytes, at: int) -> tuple[int, int, int, int] | None:
    """(flags, granule, serial, end of page) of the Ogg page at ``at``, None if there is none."""
    if data[at:at + 4] != b"OggS" or at + 27 > len(data) or data[at + 4] != 0:
        return None
    segments = data[at + 26]
    end = at + 27 + segments + sum(data[at + 27:at + 27 + segments])
    if end > len(data):  # cut off
        return None
    return (data[at + 5], int.from_bytes(data[at + 6:at + 14], "little", signed=True),
            int.from_bytes(data[at + 14:at + 18], "little"), end)


def _ogg_info(handle, head: bytes, size: int) -> MediaInfo | None:
    first = _ogg_page(head, 0)
    if first is None or not first[0] & 0x02:  # the first page begins a stream
        return None
    _flags, _granule, serial, end = first
    packet = head[27 + head[26]:end]
    if packet[:8] == b"OpusHead":
        codec, rate, preskip = "opus", 48000, int.from_bytes(packet[10:12], "little")
    elif packet[:7] == b"\x01vorbis":
        codec, rate, preskip = "vorbis", int.from_bytes(packet[12:16], "little"), 0
    else:
        return None
    second = _ogg_page(head, end)
    if second is None or second[0] & 0x02:  # another stream (video, a second track): ffmpeg decides
        return None
    handle.seek(max(0, size - _TAIL_BYTES))
    tail = handle.read(_TAIL_BYTES)
    # The file must end with a whole page of this stream: its granule position is the length in
    # samples. A file cut off mid-page (ffmpeg refuses some of those) goes to ffmpeg.
    at = tail.rfind(b"OggS")
    while at >= 0:
        page = _ogg_page(tail, at)
        if page is not None and page[3] == len(tail):
            if page[2] != serial or page[1] <= 0 or not rate:
                return None
            seconds = (page[1] - preskip) / rate
            return MediaInfo(seconds, True, False, codec, size, "ogg") if seconds > 0 else None
        at = tail.rfind(b"OggS", 0, at)
    return None


def _flac_info(head: bytes, size: int) -> MediaInfo | None:
    if head[4] & 0x7F != 0 or int.from_bytes(head[5:8], "big") != 34:  # STREAMINFO comes first
        return None
    info = head[8:42]
    rate = int.from_bytes(info[10:13], "big") >> 4
    samples = int.from_bytes(info[13:18], "big") & 0xFFFFFFFFF
    if not rate or not samples:
        return None
    return MediaInfo(samples / rate, True, False, "flac", size, "flac")


_MP3_KBPS = {1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),      # MPEG-1
             2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}          # MPEG-2, 2.5
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mp3_frame(data: bytes, at: int) -> tuple[int, int, int, int, int] | None:
    """(version, channel mode, sample rate, kbit/s, frame length) of an MPEG layer III frame header."""
    if at + 4 > len(data):
        return None
    header = int.from_bytes(data[at:at + 4], "big")
    version, layer = (header >> 19) & 3, (header >> 17) & 3
    index, rate_index = (header >> 12) & 15, (header >> 10) & 3
    if header >> 21 != 0x7FF or version == 1 or layer != 1 or index in (0, 15) or rate_index == 3:
        return None
    kbps = _MP3_KBPS[1 if version == 3 else 2][index]
    rate = _MP3_RATES[version][rate_index]
    length = (144 if version == 3 else 72) * kbps * 1000 // rate + ((header >> 9) & 1)
    return version, (header >> 6) & 3, rate, kbps, length


def _mp3_info(handle, head: bytes, size: int) -> MediaInfo | None:
    start = 0
    if head[:3] == b"ID3":
        start = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
        start += 10 if head[5] & 0x10 else 0  # footer
        handle.seek(start)
        head = handle.read(8192)
    frame = _mp3_frame(head, 0)
    if frame is None:
        return None
    version, mode, rate, kbps, length = frame
    at = 0
    for _ in range(2):  # a decoder trusts three frames in a row, and so do we
        at += length
        following = _mp3_frame(head, at)
        if following is None or following[0] != version or following[2] != rate:
            return None
        length = following[4]
    samples = 1152 if version == 3 else 576
    side = (32 if mode != 3 else 17) if version == 3 else (17 if mode != 3 else 9)
    tag = head[4 + side:8 + side]
    if tag in (b"Xing", b"Info"):
        flags = int.from_bytes(head[8 + side:12 + side], "big")
        if not flags & 1:
            return None
        count = int.from_bytes(head[12 + side:16 + side], "big") * samples
        lame = 16 + side + (4 if flags & 2 else 0) + (100 if flags & 4 else 0) + (4 if flags & 8 else 0)
        if head[lame:lame + 4] in (b"LAME", b"Lavf", b"Lavc"):  # encoder delay and padding, as ffmpeg
            pads = int.from_bytes(head[lame + 21:lame + 24], "big")
            count -= (pads >> 12) + (pads & 0xFFF)
        seconds = count / rate
    elif head[36:40] == b"VBRI":
        seconds = int.from_bytes(head[50:54], "big") * samples / rate
    else:  # constant bitrate: what ffmpeg estimates too
        handle.seek(max(0, size - 128))
        id3v1 = 128 if handle.read(3) == b"TAG" else 0
        seconds = (size - start - id3v1) * 8 / (kbps * 1000)
    return MediaInfo(seconds, True, False, "mp3", size, "mp3") if seconds > 0 else None


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
        raise PermanentError(f"video without an audio track: {display_path(path)}", error_class="no_audio")
    limits = _Limits(max_upload_bytes, max_chunk_seconds)
    upload_ext = None if info.has_video else _UPLOAD_EXTENSIONS.get(info.container or "")
    estimate = info.duration * OPUS_BYTES_PER_SECOND
    worth_keeping = info.size <= KEEP_SMALL_BYTES or estimate > info.size * KEEP_ORIGINAL_RATIO
    if upload_ext and worth_keeping and limits.fits(info.size, info.duration):
        return [Chunk(_link_original(path, workdir, upload_ext), 0.0, info.duration)]
    compact = workdir / "audio.ogg" if limits.fits(estimate, info.duration) else None
    duration, silences = _scan(path, compact, _work_timeout(info.duration))
    if compact is not None and limits.fits(compact.stat().st_size, duration):
        return [Chunk(str(compact), 0.0, duration)]
    return _split(path, workdir, duration, silences, limits)


def resplit(chunk: Chunk, folder: str | os.PathLike, max_seconds: float, *,
            max_upload_bytes: int | None = None) -> list[Chunk]:
    """``chunk`` cut again into pieces of at most ``max_seconds`` (at silences, as ``prepare``
    cuts), offsets counted from the start of the original recording. ``folder`` must not exist."""
    Path(folder).mkdir()
    pieces = prepare(chunk.path, folder, max_upload_bytes=max_upload_bytes, max_chunk_seconds=max_seconds)
    return [Chunk(piece.path, chunk.offset + piece.offset, piece.duration) for piece in pieces]


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
        raise PermanentError(f"audio could not be decoded ({_last_error_line(text)}): {display_path(path)}",
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
