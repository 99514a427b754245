"""SubRip (.srt) and WebVTT (.vtt) writing and parsing, shared by transcripts and translations.

Parsing exists so that tools can verify an output is well formed and so tests can compare cue
counts and timings between a transcript and its translations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Right-to-left embedding for players that do not apply the Unicode bidi algorithm per line.
RLE, PDF = "\u202b", "\u202c"
RTL_LANGUAGES = {"he", "ar", "fa", "ur", "yi"}
# The directional marks, embeddings and overrides (LRM, RLM, LRE, RLE, PDF, LRO, RLO): outputs add
# them for display; text that is compared or translated goes without them (``text.translate``).
BIDI_MARKS = dict.fromkeys(map(ord, "\u200e\u200f\u202a\u202b\u202c\u202d\u202e"))


class SubtitleError(ValueError):
    """A subtitle file is not well formed."""


@dataclass(frozen=True)
class Cue:
    index: int
    start: float
    end: float
    text: str


def _timestamp(seconds: float, sep: str) -> str:
    millis = max(0, int(round(seconds * 1000)))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{millis:03d}"


def _cue_text(text: str, rtl: bool) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()] or [" "]
    if rtl:
        lines = [f"{RLE}{line}{PDF}" for line in lines]
    return "\n".join(lines)


def format_srt(cues: list[Cue], *, rtl: bool = False) -> str:
    blocks = [f"{n}\n{_timestamp(c.start, ',')} --> {_timestamp(c.end, ',')}\n{_cue_text(c.text, rtl)}"
              for n, c in enumerate(cues, 1)]
    return "\n\n".join(blocks) + "\n" if blocks else ""


def format_vtt(cues: list[Cue], *, rtl: bool = False) -> str:
    blocks = ["WEBVTT"]
    blocks += [f"{n}\n{_timestamp(c.start, '.')} --> {_timestamp(c.end, '.')}\n{_cue_text(c.text, rtl)}"
               for n, c in enumerate(cues, 1)]
    return "\n\n".join(blocks) + "\n"


_TIME_RE = re.compile(r"^(?:(\d+):)?(\d{2}):(\d{2})[,.](\d{3})$")


def _parse_time(value: str) -> float:
    match = _TIME_RE.match(value.strip())
    if not match:
        raise SubtitleError(f"bad timestamp {value!r}")
    hours, minutes, seconds, millis = match.groups()
    total_ms = ((int(hours or 0) * 60 + int(minutes)) * 60 + int(seconds)) * 1000 + int(millis)
    return total_ms / 1000


def _parse_blocks(blocks: list[str]) -> list[Cue]:
    cues = []
    for block in blocks:
        lines = block.strip("\n").splitlines()
        if not lines:
            continue
        arrow = next((i for i, line in enumerate(lines) if "-->" in line), None)
        if arrow is None or arrow > 1:
            raise SubtitleError(f"cue without a timing line: {block[:60]!r}")
        start_text, end_text = lines[arrow].split("-->", 1)
        start, end = _parse_time(start_text), _parse_time(end_text.split()[0])
        if end < start:
            raise SubtitleError(f"cue ends before it starts: {lines[arrow]!r}")
        cues.append(Cue(len(cues) + 1, start, end, "\n".join(lines[arrow + 1:])))
    return cues


def parse_srt(text: str) -> list[Cue]:
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    return _parse_blocks([b for b in re.split(r"\n\s*\n", text) if b.strip()])


def parse_vtt(text: str) -> list[Cue]:
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    if not text.startswith("WEBVTT"):
        raise SubtitleError("missing WEBVTT header")
    blocks = [b for b in re.split(r"\n\s*\n", text)[1:] if b.strip() and not b.startswith("NOTE")]
    return _parse_blocks(blocks)
