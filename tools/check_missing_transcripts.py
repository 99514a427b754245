#!/usr/bin/env python3
"""Verify the outputs of completed jobs against what the job database recorded.

For every completed job, each recorded output must exist, have the recorded size and sha256, and
parse: .txt non-empty UTF-8, .json an object with "text" and "segments", .srt/.vtt well formed,
transcript.raw.json.gz a gzip of JSON. A completed job that recorded no txt or json is reported too.
Without --stage/--language the whole archive is checked, which adds media files that vanished
from disk (none of their recorded paths exists) and folders under --output-dir that no media file
claims.

Problems: missing, truncated (smaller than recorded), changed (sha256 differs), unparsable,
media_missing, orphan_folder. Repair with tools/fix_transcript_status.py. Two are no damage:
edited (a .txt, .srt or .vtt changed by hand and still well formed: a correction, to be made the
record with tools/adopt_edits.py --apply) and stale (a translation made from a transcript that has
changed since: parallel_translation.py redoes it).

A completed job whose .txt was recorded empty is not a problem but is listed as "no speech found"
(silence, or a provider that heard no words; its translations are empty too): worth a listen.

Exit codes: 0 all is well, 1 problems found, 2 usage or configuration error.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from db_manager import COMPLETED, NO_SPEECH_NOTE, REVIEW_NOTE, STAGES, TRANSCRIPTION, TRANSLATION, display_path
from pipeline import config, publish
from pipeline.outputs import UnsafePathError, resolve_recorded, safe_join
from pipeline.settings import Settings
from pipeline.subtitles import parse_srt, parse_vtt
from transcription import OUTPUT_NAMES as TRANSCRIPT_NAMES
from translation import output_name as translation_name

REQUIRED_FORMATS = ("txt", "json")   # what readers and the translation stage need from every job
EDITABLE_FORMATS = ("txt", "srt", "vtt")   # what an archivist corrects by hand; json and raw are the machine's


class Unparsable(ValueError):
    """An output's content is not what its format promises."""


@dataclass
class Problem:
    kind: str                    # missing | truncated | changed | edited | unparsable | stale | media_missing | orphan_folder
    output: str                  # the expected output path (a folder for the last two kinds)
    detail: str
    file_id: str | None = None
    media_path: str | None = None
    stage: str | None = None
    language: str | None = None
    format: str | None = None

    def line(self) -> str:
        what = " ".join(p for p in (self.stage, self.language, self.format) if p) or "-"
        media = f"  media: {self.media_path}" if self.media_path else ""
        return f"{self.kind:<13} {self.file_id or '-':<16}  {what:<22} {display_path(self.output)}  ({self.detail}){media}"


# -- names and parsing, shared with tools/fix_transcript_status.py -------------------------------
def output_name(stage: str, language: str, fmt: str) -> str:
    """The file name the writers use: one source of names, so an audit never looks elsewhere."""
    return TRANSCRIPT_NAMES[fmt] if stage == TRANSCRIPTION else translation_name(language, fmt)


def expected_path(folder: Path, stage: str, language: str, fmt: str) -> str:
    try:
        return str(folder / output_name(stage, language, fmt))
    except (KeyError, ValueError):  # a format this stage never writes: point at the folder
        return str(folder)


def parse_output(fmt: str, data: bytes, *, allow_empty: bool = False):
    """The parsed content of one output (str, dict, cues or raw JSON); raises ``Unparsable``."""
    try:
        if fmt == "raw":
            return json.loads(gzip.decompress(data))
        text = data.decode("utf-8")
        if fmt == "txt":
            if not text.strip() and not allow_empty:
                raise Unparsable("empty text")
            return text
        if fmt == "json":
            return _transcript_like(json.loads(text))
        if fmt in ("srt", "vtt"):
            return parse_srt(text) if fmt == "srt" else parse_vtt(text)
    except (ValueError, OSError, EOFError, zlib.error) as exc:  # JSON, UTF-8, subtitle and gzip errors
        raise Unparsable(f"{type(exc).__name__}: {exc}"[:200]) from None
    raise Unparsable(f"unknown output format {fmt!r}")


def _transcript_like(doc):
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str) or not isinstance(doc.get("segments"), list):
        raise Unparsable('not a JSON object with "text" and "segments"')
    return doc


# -- verifying recorded outputs ----------------------------------------------------------------------
def verify_recorded(fmt: str, info: dict, root: str) -> tuple[str, str] | None:
    """(kind, detail) of the first thing wrong with one recorded output under the output root
    ``root``, or None when it is sound."""
    if not info.get("path"):
        return "missing", "no path recorded"
    try:
        data = resolve_recorded(root, info["path"]).read_bytes()
    except UnsafePathError:
        return "missing", "its recorded path leaves the output root"
    except FileNotFoundError:
        return "missing", "file does not exist"
    except OSError as exc:
        return "missing", f"cannot be read: {exc.strerror or exc}"
    size = info.get("size")
    try:
        parse_output(fmt, data, allow_empty=size == 0)
        parse_error = None
    except Unparsable as exc:
        parse_error = str(exc)
    changed = hashlib.sha256(data).hexdigest() != info.get("sha256")
    if changed and fmt in EDITABLE_FORMATS and not parse_error and data.strip():
        # Outputs are only ever replaced whole (staged, then renamed): a text that differs and is
        # still well formed was changed by someone, shorter or longer. It is a correction.
        return "edited", (f"changed by hand since it was recorded ({len(data)} bytes, {size} recorded); make it"
                          " the record: tools/adopt_edits.py --apply")
    if isinstance(size, int) and len(data) < size:
        return "truncated", f"{len(data)} of {size} bytes"
    if changed:
        return "changed", "sha256 differs from the recorded one; " + (
            f"unparsable: {parse_error}" if parse_error else "it still parses")
    if parse_error:
        return "unparsable", parse_error
    return None


def output_path(root: str, info: dict) -> str | None:
    """The file a recorded output names, under the output root ``root`` (None: no usable path)."""
    try:
        return str(resolve_recorded(root, info["path"])) if info.get("path") else None
    except UnsafePathError:
        return None


def output_problems(stage: str, language: str, outputs: dict, folder: Path, *,
                    root: str) -> list[tuple[str, str, str, str]]:
    """(format, kind, detail, path) for each problem of one job's recorded outputs (under ``root``,
    the job's folder ``folder``)."""
    found = [(fmt, "missing", "not recorded in the database", expected_path(folder, stage, language, fmt))
             for fmt in REQUIRED_FORMATS if fmt not in outputs]
    for fmt, info in sorted(outputs.items()):
        info = info if isinstance(info, dict) else {}
        problem = verify_recorded(fmt, info, root)
        if problem:
            found.append((fmt, *problem, output_path(root, info) or expected_path(folder, stage, language, fmt)))
    return found


def job_problems(row, root: str) -> list[Problem]:
    outputs = json.loads(row["outputs"] or "{}")
    folder = safe_join(root, row["folder"])
    return [Problem(kind, path, detail, row["file_id"], row["path_display"], row["stage"],
                    row["language"] or None, fmt)
            for fmt, kind, detail, path in output_problems(row["stage"], row["language"], outputs, folder,
                                                                  root=root)]


def stale_translations(db, root: str, language: str | None) -> list[Problem]:
    folders = {media["file_id"]: media for media in db.files()}
    return [Problem("stale", str(safe_join(root, folders[row["file_id"]]["folder"])),
                    "its transcript changed since it was translated; parallel_translation.py redoes it",
                    row["file_id"], folders[row["file_id"]]["path_display"], TRANSLATION, row["language"])
            for row in db.stale_translations(language)]


# -- the archive as a whole --------------------------------------------------------------------------
def vanished_media(db, root: str) -> list[Problem]:
    problems = []
    for media in db.files():
        paths = {os.fsdecode(bytes(media["path_bytes"])), *db.paths_of(media["file_id"])}
        if not any(os.path.isfile(p) for p in paths):
            problems.append(Problem("media_missing", str(safe_join(root, media["folder"])),
                                    f"none of its {len(paths)} recorded path(s) exists",
                                    media["file_id"], media["path_display"]))
    return problems


def orphan_folders(db, root: str) -> list[Problem]:
    """Folders directly under the output root that no media file's folder name matches."""
    if not os.path.isdir(root):
        return []
    known = {media["folder"] for media in db.files()}
    return [Problem("orphan_folder", entry.path, "no media file in the database uses this folder")
            for entry in sorted(os.scandir(root), key=lambda e: e.name)
            if entry.is_dir() and not entry.name.startswith(".") and entry.name not in known]


def to_review(db) -> list[dict]:
    """Transcripts heard in a language the archive does not expect: kept, shown, not translated."""
    return [{"file_id": row["file_id"], "note": row["note"], "media_path": row["path_display"]}
            for row in db.jobs(stage=TRANSCRIPTION, status=COMPLETED) if (row["note"] or "").startswith(REVIEW_NOTE)]


def no_speech(db, root: str, stage: str | None = None, language: str | None = None) -> list[dict]:
    """Completed jobs with nothing said: noted "no speech found", or an empty .txt recorded."""
    found = []
    for row in db.jobs(stage=stage, language=language, status=COMPLETED):
        txt = json.loads(row["outputs"] or "{}").get("txt") or {}
        if row["note"] == NO_SPEECH_NOTE or txt.get("size") == 0:
            found.append({"file_id": row["file_id"], "stage": row["stage"], "language": row["language"] or None,
                          "media_path": row["path_display"], "output": output_path(root, txt)})
    return found


def check(db, root: str, stage: str | None = None, language: str | None = None) -> tuple[list[Problem], dict]:
    """All problems found, and what was checked."""
    rows = db.jobs(stage=stage, language=language, status=COMPLETED)
    problems = [p for row in rows for p in job_problems(row, root)]
    if stage in (None, TRANSLATION):
        problems += stale_translations(db, root, language)
    checked = {"completed_jobs": len(rows),
               "outputs": sum(len(json.loads(r["outputs"] or "{}")) for r in rows)}
    if stage is None:
        problems += vanished_media(db, root) + orphan_folders(db, root)
        checked["media_files"] = len(db.files())
    return problems, checked


# -- command line ----------------------------------------------------------------------------------
def selection(args) -> tuple[str | None, str | None]:
    """(stage, language) to check; a language alone means its translations."""
    language = config.parse_languages([args.language])[0] if args.language else None
    stage = args.stage or (TRANSLATION if language else None)
    if stage == TRANSCRIPTION and language:
        raise config.ConfigError("--language selects translations; it cannot be used with --stage transcription")
    if stage == TRANSCRIPTION:
        language = ""
    return stage, language


def build_parser():
    parser = config.make_parser(__doc__, "python tools/check_missing_transcripts.py --db archive.db "
                                         "--output-dir output --stage translation --language he")
    parser.add_argument("--stage", choices=STAGES, help="check only this stage's jobs (default: everything)")
    parser.add_argument("--language", metavar="CODE", help="check only translations into this language")
    config.add_common_args(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.load(args)
    config.setup_logging(settings.debug)
    stage, language = selection(args)
    db = config.open_db(settings.db, must_exist=True, read_only=True)
    try:
        publish.settle_quietly(db, settings.output_dir)  # finish what a crash left staged, then check
        problems, checked = check(db, settings.output_dir, stage, language)
        silent = no_speech(db, settings.output_dir, stage, language)
        review = to_review(db) if stage in (None, TRANSCRIPTION) else []
    finally:
        db.close_all()
    if args.json:
        print(json.dumps({"ok": not problems, "checked": checked, "problems": [asdict(p) for p in problems],
                          "no_speech": silent, "review": review}, ensure_ascii=True))
    else:
        for problem in problems:
            print(problem.line())
        for job in silent:
            what = job["stage"] + (f" {job['language']}" if job["language"] else "")
            print(f"{'no speech':<13} {job['file_id']:<16}  {what:<22} {NO_SPEECH_NOTE}  media: {job['media_path']}")
        for job in review:
            print(f"{'review':<13} {job['file_id']:<16}  {'transcription':<22} {job['note']}  media: {job['media_path']}")
        scope = ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in checked.items())
        print(f"checked {scope}: " + (f"{len(problems)} problem(s)" if problems else "all well")
              + (f" · {len(silent)} with no speech found" if silent else "")
              + (f" · {len(review)} to review (language not expected)" if review else ""))
    return config.EXIT_FAILED if problems else config.EXIT_OK


if __name__ == "__main__":
    config.run_main(main)
