"""Test media made on the spot by ffmpeg's lavfi sources: no fixtures in git, no network.

Tones stand in for speech: the fake speech-to-text servers (``tests/fake_stt.py``; its HTTP base is ``benchmarks/fakeserver.py``) turn each
voiced second into a word named after its frequency, so a file's expected transcript follows from
how it was made. Everything is short, mono and low bitrate so the tests stay fast.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from pipeline.audio import ffmpeg_path

RATE = 16000

# Encoder settings by output suffix: small files, each container in its usual codec.
_AUDIO_CODECS = {
    ".wav": ["-c:a", "pcm_s16le"],
    ".mp3": ["-c:a", "libmp3lame", "-b:a", "32k"],
    ".flac": ["-c:a", "flac"],
    ".ogg": ["-c:a", "libopus", "-b:a", "24k"],
    ".m4a": ["-c:a", "aac", "-b:a", "32k"],
}


def _ffmpeg(*args) -> None:
    subprocess.run([ffmpeg_path(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                   check=True, stdin=subprocess.DEVNULL, timeout=60)


def _codec_for(path, bitrate: str | None = None) -> list[str]:
    suffix = os.path.splitext(os.fsdecode(path))[1].lower()
    if suffix not in _AUDIO_CODECS:
        raise ValueError(f"no test encoder for {suffix!r}")
    return _AUDIO_CODECS[suffix] + (["-b:a", bitrate] if bitrate else [])


def _out(path) -> bytes:
    return b"file:" + os.path.abspath(os.fsencode(path))


def make_tone(path, freq: int = 440, seconds: float = 3.0, bitrate: str | None = None):
    """A sine tone; the format follows the suffix (.wav, .mp3, .flac, .ogg, .m4a)."""
    _ffmpeg("-f", "lavfi", "-i", f"sine=frequency={freq}:duration={seconds}:sample_rate={RATE}",
            "-ac", "1", *_codec_for(path, bitrate), _out(path))
    return path


def make_tones_with_gaps(path, tones: list[tuple[int, float]], gap: float = 1.0):
    """Tone, ``gap`` seconds of silence, tone, ... : pauses where a splitter should cut."""
    inputs, labels = [], []
    for index, (freq, seconds) in enumerate(tones):
        pad = f",apad=pad_dur={gap}" if index < len(tones) - 1 else ""
        inputs += ["-f", "lavfi", "-i", f"sine=frequency={freq}:duration={seconds}:sample_rate={RATE}{pad}"]
        labels.append(f"[{index}:a]")
    graph = f"{''.join(labels)}concat=n={len(tones)}:v=0:a=1[out]"
    _ffmpeg(*inputs, "-filter_complex", graph, "-map", "[out]", "-ac", "1", *_codec_for(path), _out(path))
    return path


def make_video(path, freq: int = 440, seconds: float = 3.0):
    """An mp4 with a tiny test-pattern video track and a sine audio track."""
    _ffmpeg("-f", "lavfi", "-i", f"testsrc=size=64x48:rate=5:duration={seconds}",
            "-f", "lavfi", "-i", f"sine=frequency={freq}:duration={seconds}:sample_rate={RATE}",
            "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-b:a", "32k", "-ac", "1",
            "-shortest", _out(path))
    return path


def make_video_without_audio(path, seconds: float = 2.0):
    _ffmpeg("-f", "lavfi", "-i", f"testsrc=size=64x48:rate=5:duration={seconds}",
            "-c:v", "libx264", "-preset", "ultrafast", _out(path))
    return path


def make_empty(path):
    open(path, "wb").close()
    return path


def make_truncated(source, path, keep_bytes: int = 2000):
    """The first ``keep_bytes`` of ``source``: for an mp4 that cuts off the index ffmpeg needs."""
    with open(source, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(keep_bytes))
    return path


def make_text_as_audio(path):
    """A text file with an audio name, as found in real archives (notes saved as .mp3)."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("Interview notes, not audio.\n" * 20)
    return path


def copy_to(source, path):
    """Copy ``source`` to ``path`` (str or bytes, any odd name)."""
    shutil.copyfile(os.fsencode(source), os.fsencode(path))
    return path
