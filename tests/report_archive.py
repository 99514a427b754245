"""Archives for the report tests and the report demo: a job database in every state, with real
transcript and translation files written by the pipeline's own writers and real short WAVs.

No network: media are tones made by ffmpeg (``benchmarks.mediagen``), translations come from the
offline dictionary of ``benchmarks.fake_translate`` (Hebrew really in Hebrew letters).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from benchmarks.fake_translate import fake_translate
from benchmarks.mediagen import make_tone
from db_manager import TRANSCRIPTION, TRANSLATION, DatabaseManager, MediaRecord, Outcome, make_owner
from pipeline.outputs import as_recorded, safe_join
from transcription import Segment, Transcript, write_transcript_outputs
from translation import Translation, Unit, write_translation_outputs

LANGUAGES = ("en", "he")
MEDIA_SECONDS = 8.0


class ReportArchive:
    """A database, an output root and a media folder under ``base``."""

    def __init__(self, base: Path, languages=LANGUAGES):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.db_path = str(self.base / "jobs.db")
        self.db = DatabaseManager(self.db_path)
        self.out = str(self.base / "out")
        self.media = self.base / "media"
        self.media.mkdir(parents=True, exist_ok=True)
        self.languages = list(languages)
        self.owner = make_owner()
        self.tones = 0

    def add(self, name: str, *, seconds: float = MEDIA_SECONDS) -> str:
        """A real WAV named ``name``, registered with a job per language; returns its file id."""
        path = self.media / name
        self.tones += 1  # another pitch for each file: equal content would be one file (same sha256)
        make_tone(path, freq=300 + 20 * self.tones, seconds=seconds)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        stat = path.stat()
        self.db.register_files([MediaRecord(str(path), digest, stat.st_size, stat.st_mtime_ns, "audio", seconds)],
                               self.languages)
        return digest[:16]

    def folder(self, file_id: str) -> Path:
        return safe_join(self.out, self.db.jobs(file_id=file_id)[0]["folder"])

    def _claim(self, file_id: str, stage: str, language: str = ""):
        return self.db.claim(self.owner, stage, language, file_ids=[file_id])[0]

    def transcribe(self, file_id: str, segments: list[Segment], language: str = "de") -> None:
        transcript = Transcript(text=" ".join(s.text for s in segments), segments=segments, language=language,
                                duration=max(s.end for s in segments), provider="fake", model="fake-stt",
                                usage={}, has_timestamps=True)
        job = self._claim(file_id, TRANSCRIPTION)
        written = write_transcript_outputs(transcript, self.folder(file_id), root=self.out)
        self.db.complete(job, Outcome(as_recorded(written), provider="fake", audio_seconds=transcript.duration,
                                      cost=0.006 * transcript.duration / 60, source_language=language,
                                      duration=transcript.duration))

    def translate(self, file_id: str, language: str, segments: list[Segment], source: str = "de") -> None:
        units = [Unit(fake_translate(s.text, language), s.start, s.end, s.speaker) for s in segments]
        translation = Translation(units=units, text="\n".join(u.text for u in units), source_language=source,
                                  language=language, provider="fake", model=None, usage={}, cost=0.001,
                                  has_timestamps=True, kept_units=0)
        job = self._claim(file_id, TRANSLATION, language)
        translation.source_sha256 = job.outputs["json"]["sha256"]  # made from the transcript of record
        written = write_translation_outputs(translation, self.folder(file_id), root=self.out)
        self.db.complete(job, Outcome(as_recorded(written), provider="fake", cost=0.001,
                                      source_sha256=translation.source_sha256))

    def fail(self, file_id: str, error_class: str, stage: str = TRANSCRIPTION, language: str = "") -> None:
        job = self._claim(file_id, stage, language)
        self.db.fail(job, error_class, f"{error_class}: the provider refused this file", retryable=False)

    def hold(self, file_id: str, stage: str = TRANSCRIPTION, language: str = "") -> None:
        """Leave the job in progress (a live lease of this process)."""
        self._claim(file_id, stage, language)

    def close(self) -> None:
        self.db.close_all()


def sample_segments(seed: int = 0, count: int = 4) -> list[Segment]:
    """German-dictionary sentences, two speakers, starting after 0 s with pauses between cues."""
    from benchmarks.fake_translate import make_transcript

    doc = make_transcript(seed, "de", n_segments=count)
    segments, clock = [], 0.8
    for index, segment in enumerate(doc["segments"]):
        length = 1.5
        segments.append(Segment(round(clock, 3), round(clock + length, 3), segment["text"], f"speaker_{index % 2}"))
        clock += length + 0.2
    return segments


def newest_mtimes(folder: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: (inode, mtime_ns), to see which files a build rewrote."""
    result = {}
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            stat = os.stat(os.path.join(dirpath, name))
            result[os.path.relpath(os.path.join(dirpath, name), folder)] = (stat.st_ino, stat.st_mtime_ns)
    return result
