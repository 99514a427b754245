"""What the report shows, read from the job database and the output files: no HTML here.

Everything a page needs is gathered into plain dataclasses, so the templates only lay it out.
Names, paths, transcript text and error messages are untrusted data: they are passed on as they
are and escaped by the templates (Jinja2 autoescape), never formatted into markup here.
Links are relative (``os.path.relpath`` from the page's folder), percent-encoded byte by byte, so a
report opens from disk or from any web server and any file name stays one path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass, field

from db_manager import FAILED, NO_SPEECH_NOTE, REVIEW_NOTE, TRANSCRIPTION, TRANSLATION, is_postgres_url
from pipeline.errors import redact
from pipeline.outputs import UnsafePathError, recorded_state, resolve_recorded
from pipeline.subtitles import RTL_LANGUAGES

log = logging.getLogger("verbatim.report")

RETRY_SCRIPT = "tools/retry_failed_transcriptions.py"


@dataclass
class OutputLink:
    fmt: str
    name: str
    href: str
    size: int | None
    exists: bool


@dataclass
class JobView:
    key: str                   # "transcription" or the translation language
    stage: str
    language: str
    status: str
    attempts: int
    error_class: str | None
    error_message: str | None
    provider: str | None
    model: str | None
    cost: float | None
    outputs: list[OutputLink]
    json_path: str | None      # the recorded transcript/translation json, resolved, when it exists
    marks: list[str] = field(default_factory=list)   # "edited", "stale", "review", "no speech"
    note: str | None = None


@dataclass
class EventView:
    at: float
    job: str
    from_status: str | None
    to_status: str
    owner: str | None
    attempt: int | None
    error_class: str | None
    error_message: str | None


@dataclass
class Interview:
    file_id: str
    name: str                  # base name of the media file, for display
    path: str                  # the full path as registered, for display
    media_path: str            # the path to open (absolute)
    media_type: str
    media_exists: bool
    duration: float | None
    language: str | None
    folder: str
    jobs: dict[str, JobView]
    events: list[EventView]
    speakers: int | None = None   # filled from the transcript (or the build cache)

    @property
    def statuses(self) -> list[str]:
        return sorted({job.status for job in self.jobs.values()})


@dataclass
class Cue:
    start: float | None
    end: float | None
    speaker: str | None
    text: str
    translations: dict[str, str] = field(default_factory=dict)


@dataclass
class FailureGroup:
    stage: str
    language: str
    error_class: str
    command: str
    files: list[tuple[str, str, str]]    # (file_id, name, error message)


def href(target: str, start: str) -> str:
    """A relative link from folder ``start`` to ``target``, percent-encoded (quotes, ``#``, ``?``,
    spaces and non-UTF-8 bytes cannot end the attribute or change what the link means)."""
    relative = os.path.relpath(os.path.abspath(target), os.path.abspath(start))
    return urllib.parse.quote(os.fsencode(relative.replace(os.sep, "/")), safe="/")


def _resolve_output(recorded: str, output_dir: str) -> str | None:
    """Where a recorded output lies under the output root in use (``resolve_recorded``: relative
    records, and absolute ones of an archive since moved); None for a path that leaves the root."""
    try:
        return str(resolve_recorded(output_dir, recorded))
    except UnsafePathError:
        return None


def load_interviews(db, output_dir: str, page_dir: str) -> list[Interview]:
    """Every media file with its jobs and event history, in registration order.

    Three queries, however many files: a per-file query would cost a round trip per page."""
    jobs_by_file: dict[str, list] = defaultdict(list)
    for row in db.jobs():
        jobs_by_file[row["file_id"]].append(row)
    events_by_file: dict[str, list[EventView]] = defaultdict(list)
    for row in db.query("SELECT e.*, j.file_id, j.stage, j.language FROM events e JOIN jobs j ON j.id = e.job_id"
                        " ORDER BY e.id"):
        events_by_file[row["file_id"]].append(EventView(
            row["at"], row["language"] or row["stage"], row["from_status"], row["to_status"], row["owner"],
            row["attempt"], row["error_class"], row["error_message"]))
    interviews = []
    for media in db.files():
        path = os.fsdecode(bytes(media["path_bytes"]))
        media_path = os.path.abspath(path)
        jobs = {}
        rows = jobs_by_file.get(media["file_id"], [])
        transcript_sha = next((_recorded_sha(r, "json") for r in rows if r["stage"] == TRANSCRIPTION), None)
        for row in rows:
            job = _job_view(row, output_dir, page_dir)
            job.marks = _marks(row, transcript_sha, output_dir)
            jobs[job.key] = job
        interviews.append(Interview(
            file_id=media["file_id"], name=os.path.basename(media["path_display"]), path=media["path_display"],
            media_path=media_path, media_type=media["media_type"], media_exists=os.path.isfile(media_path),
            duration=media["duration"], language=media["source_language"], folder=media["folder"],
            jobs=jobs, events=events_by_file.get(media["file_id"], [])))
    return interviews


def _recorded_sha(row, fmt: str) -> str | None:
    try:
        return (json.loads(row["outputs"] or "{}").get(fmt) or {}).get("sha256")
    except ValueError:
        return None


def _marks(row, transcript_sha: str | None, output_dir: str) -> list[str]:
    """What an archivist should look at, beside the status: a hand edit not yet adopted, a
    translation of an older transcript, a transcript in a language the archive does not expect."""
    marks = []
    note = row["note"] or ""
    if note.startswith(REVIEW_NOTE):
        marks.append("review")
    if note == NO_SPEECH_NOTE:
        marks.append("no speech")
    if row["stage"] == TRANSLATION and row["status"] == "completed" and row["source_sha256"] \
            and row["source_sha256"] != transcript_sha:
        marks.append("stale")
    if row["status"] == "completed" and _edited(row, output_dir):
        marks.append("edited")
    return marks


def _edited(row, output_dir: str) -> bool:
    """A recorded .txt/.srt/.vtt whose content is no longer what was recorded (a hand correction)."""
    try:
        outputs = json.loads(row["outputs"] or "{}")
    except ValueError:
        return False
    return any(recorded_state(outputs[fmt], output_dir) == "changed" for fmt in ("txt", "srt", "vtt") if fmt in outputs)


def _job_view(row, output_dir: str, page_dir: str) -> JobView:
    links, json_path = [], None
    try:
        outputs = json.loads(row["outputs"] or "{}")
    except ValueError:
        outputs = {}
    for fmt, info in sorted(outputs.items()):
        recorded = str(info.get("path", ""))
        where = _resolve_output(recorded, output_dir) if recorded else None
        found = where if where and os.path.isfile(where) else None
        links.append(OutputLink(fmt, os.path.basename(recorded), href(where or recorded, page_dir),
                                info.get("size"), found is not None))
        if fmt == "json" and found:
            json_path = found
    key = TRANSCRIPTION if row["stage"] == TRANSCRIPTION else row["language"]
    return JobView(key, row["stage"], row["language"], row["status"], row["attempts"], row["error_class"],
                   row["error_message"], row["provider"], row["model"], row["cost"], links, json_path,
                   note=row["note"])


def _read_json(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _segments(doc: dict | None) -> list[dict]:
    segments = (doc or {}).get("segments") or []
    return [s for s in segments if isinstance(s, dict)]


def _time(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def load_cues(interview: Interview) -> tuple[list[Cue], list[str], int | None]:
    """The transcript's cues with each translation beside them, the translation languages shown,
    and the speaker count.

    A translation's json has one segment per source segment with the same timing
    (``translation.write_translation_outputs``), so segments pair up by position; if the counts
    differ (an older run), by start time, and a cue without a partner stays empty. A "translation"
    into the interview's own language is a copy of the transcript: it gets no column of its own."""
    transcript = interview.jobs.get(TRANSCRIPTION)
    doc = _read_json(transcript.json_path if transcript else None)
    cues = [Cue(_time(s.get("start")), _time(s.get("end")), s.get("speaker") or None, str(s.get("text") or ""))
            for s in _segments(doc)]
    languages = []
    for key, job in sorted(interview.jobs.items()):
        if job.stage != TRANSLATION or key == interview.language:
            continue
        segments = _segments(_read_json(job.json_path))
        if not segments:
            continue
        languages.append(key)
        if len(segments) == len(cues):
            for cue, segment in zip(cues, segments):
                cue.translations[key] = str(segment.get("text") or "")
        else:
            by_start = {_time(s.get("start")): str(s.get("text") or "") for s in segments}
            for cue in cues:
                if cue.start in by_start:
                    cue.translations[key] = by_start[cue.start]
    speakers = None if doc is None else len({c.speaker for c in cues if c.speaker})
    return cues, languages, speakers


def is_rtl(language: str) -> bool:
    return language in RTL_LANGUAGES


def failure_groups(interviews: list[Interview], db_path: str, output_dir: str) -> list[FailureGroup]:
    """Failed jobs grouped by stage, language and error class, largest group first, each with
    the ``tools/retry_failed_transcriptions.py`` command that resets and reruns exactly them."""
    groups: dict[tuple[str, str, str], FailureGroup] = {}
    for interview in interviews:
        for job in interview.jobs.values():
            if job.status != FAILED:
                continue
            error_class = job.error_class or ""
            key = (job.stage, job.language, error_class)
            if key not in groups:
                groups[key] = FailureGroup(job.stage, job.language, error_class or "unknown",
                                           retry_command(db_path, output_dir, *key), [])
            groups[key].files.append((interview.file_id, interview.name, job.error_message or ""))
    return sorted(groups.values(), key=lambda g: (-len(g.files), g.stage, g.language, g.error_class))


def retry_command(db_path: str, output_dir: str, stage: str, language: str, error_class: str) -> str:
    """A shell command (run in the verbatim folder) that retries these failed jobs. Paths are made
    absolute and every argument is shell-quoted: an error class is provider data."""
    database = redact(db_path) if is_postgres_url(db_path) else os.path.abspath(db_path)
    argv = ["python", RETRY_SCRIPT, "--db", database, "--output-dir", os.path.abspath(output_dir)]
    if stage == TRANSLATION:
        argv += ["--stage", TRANSLATION, "--language", language]
    if error_class:  # a failure without a class (none are written so) is retried with its stage
        argv += ["--error-class", error_class]
    return shlex.join(argv)


def fingerprint(*parts) -> str:
    """A stable hash of JSON-able parts: the build cache's key for one page's inputs."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()
