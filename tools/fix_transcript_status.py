#!/usr/bin/env python3
"""Repair job statuses that disagree with the outputs on disk or with the runs holding the jobs.

A dry run by default: every change is listed, ending with "would change N". --apply makes them
and ends with "changed N". The repairs, in this order (later ones see the earlier ones):

  reclaim  in-progress jobs whose lease expired or whose owner process is gone -> not_started
           (a job that a live run holds under a valid lease is never touched)
  reset    completed jobs whose recorded outputs are missing, truncated, changed or unparsable
           -> not_started (a .txt/.srt/.vtt edited by hand is no damage: it is left alone, to be
           made the record with tools/adopt_edits.py; reset for other damage, it is kept first
           as <name>.edited-<time>)
  adopt    failed or not-started jobs whose complete output set is already in their folder ->
           completed, recording each file's sha256 and size. Adopted only when every expected
           file exists, parses and agrees with the json (txt, json and raw; srt and vtt when
           timed); a translation also needs its json in the job's language, made from the
           file's completed transcript as it is now (its recorded source sha256), with its
           segments and timings
  reset    translations whose transcript is no longer completed -> not_started (completed ones
           too: their source is gone)
  sweep    orphan temporary files (.<name>.<hex>.tmp) older than --temp-age seconds

Safe while a pipeline runs: each change re-checks its condition inside one database
transaction when it is made; a change whose condition no longer holds is skipped and reported.

Exit codes: 0 done (or, in a dry run, listed), 1 some change could not be made, 2 usage or
configuration error.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from db_manager import (COMPLETED, FAILED, IN_PROGRESS, MAX_LOST_LEASES, NOT_STARTED, TRANSCRIPTION,
                        TRANSLATION, lease_lost_reason)
from pipeline import config, publish
from pipeline.outputs import keep_edits, resolve_recorded, safe_join, sweep_temp_files
from pipeline.settings import Settings
from pipeline.subtitles import BIDI_MARKS
from tools.check_missing_transcripts import Unparsable, output_name, output_problems, parse_output

log = logging.getLogger("verbatim.fix")

DEFAULT_TEMP_AGE = 3600.0   # a live writer's temp file exists for milliseconds; an hour-old one is orphaned
ADOPTED_NOTE = "adopted by fix_transcript_status: its valid outputs were already on disk"
_TIME_TOLERANCE = 0.002     # json keeps times to 1 ms and subtitles round to 1 ms


@dataclass
class JobState:
    """One job as it will be once the changes planned so far are made."""

    id: int
    file_id: str
    stage: str
    language: str
    status: str
    outputs: dict
    folder: str
    lease_owner: str | None
    lease_expires_at: float | None
    lost_leases: int

    @classmethod
    def from_row(cls, row) -> "JobState":
        return cls(row["id"], row["file_id"], row["stage"], row["language"], row["status"],
                   json.loads(row["outputs"] or "{}"), row["folder"], row["lease_owner"],
                   row["lease_expires_at"], row["lost_leases"])

    @property
    def subject(self) -> str:
        return f"job {self.id} {self.file_id} {self.stage}" + (f" {self.language}" if self.language else "")


@dataclass
class Change:
    action: str                          # reclaim | reset | adopt | sweep
    subject: str                         # the job, or the temporary file
    transition: str                      # "completed -> not_started", "delete"
    reason: str
    apply: Callable[[], bool] = field(repr=False)  # re-checks, changes, True when it changed something
    job_id: int | None = None
    done: bool | None = None

    def line(self) -> str:
        return f"{self.action:<8} {self.subject}  {self.transition}: {self.reason}"

    def as_dict(self) -> dict:
        return {"action": self.action, "job_id": self.job_id, "subject": self.subject,
                "transition": self.transition, "reason": self.reason, "done": self.done}


# -- what a valid output set is ----------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Text compared without bidi marks and line layout (the renderers add both)."""
    return text.translate(BIDI_MARKS).split()


def agrees_with_json(fmt: str, parsed, doc: dict) -> bool:
    """Whether a txt/srt/vtt output says what the json beside it says (same cues, same words)."""
    segments = doc["segments"]
    if fmt in ("srt", "vtt"):
        return len(parsed) == len(segments) and all(
            _same_times(cue.start, cue.end, seg) and words(cue.text) == words(str(seg.get("text") or ""))
            for cue, seg in zip(parsed, segments))
    if fmt == "txt":
        labels = {f"{seg['speaker']}:" for seg in segments if seg.get("speaker")}
        expected = [w for seg in segments for w in words(str(seg.get("text") or ""))] if segments \
            else words(doc["text"])
        return [w for w in words(parsed) if w not in labels] == expected
    return True


def _same_times(start, end, segment: dict) -> bool:
    try:
        return (abs(float(start) - float(segment["start"])) <= _TIME_TOLERANCE
                and abs(float(end) - float(segment["end"])) <= _TIME_TOLERANCE)
    except (KeyError, TypeError, ValueError):
        return False


def translation_mismatch(doc: dict, source: dict, language: str, source_sha: str | None = None) -> str | None:
    """Why a translation json was not made from ``source`` (whose sha256 is ``source_sha``) into
    ``language`` (None: it was)."""
    if doc.get("language") != language:
        return f"its language is {doc.get('language')!r}, not {language!r}"
    if source_sha is not None and doc.get("source_sha256") != source_sha:
        return ("it was made from another version of the transcript" if doc.get("source_sha256")
                else "it does not record which transcript it was made from")
    if not source["segments"] or len(doc["segments"]) != len(source["segments"]):
        return (f"{len(doc['segments'])} segments, the transcript has {len(source['segments'])}")
    if bool(doc.get("has_timestamps")) != bool(source.get("has_timestamps")):
        return "timestamps differ from the transcript's"
    if source.get("has_timestamps") and not all(
            _same_times(seg.get("start"), seg.get("end"), src) for seg, src in zip(doc["segments"], source["segments"])):
        return "segment timings differ from the transcript's"
    if doc.get("source_language") and source.get("language") and doc["source_language"] != source["language"]:
        return f"made from a {doc['source_language']!r} text, the transcript is {source['language']!r}"
    return None


def _read_valid(path: Path, fmt: str):
    data = path.read_bytes()
    return data, parse_output(fmt, data)


def valid_output_set(job: JobState, folder: Path, source: dict | None,
                     source_sha: str | None = None) -> tuple[dict | None, str]:
    """(outputs to record, "") when the folder holds this job's complete, valid output set; (None,
    why not) when it holds a set that is not valid; (None, "") when it holds none. ``source`` is the
    completed transcript's json (translations only)."""
    if not folder.name.startswith(job.file_id):
        return None, f"folder {folder.name} is not named after file {job.file_id}"
    name = output_name(job.stage, job.language, "json")
    try:
        _data, doc = _read_valid(folder / name, "json")
    except FileNotFoundError:
        return None, ""
    except (OSError, Unparsable) as exc:
        return None, f"{name}: {exc}"
    if source is not None and (why := translation_mismatch(doc, source, job.language, source_sha)):
        return None, f"{name} does not belong to this transcript: {why}"
    formats = ["txt", "json"] + (["srt", "vtt"] if doc.get("has_timestamps") else [])
    formats += ["raw"] if job.stage == TRANSCRIPTION else []
    outputs = {}
    for fmt in formats:
        path = folder / output_name(job.stage, job.language, fmt)
        try:
            data, parsed = _read_valid(path, fmt)
        except (OSError, Unparsable) as exc:
            return None, f"{path.name}: {exc.strerror if isinstance(exc, OSError) else exc}"
        if not agrees_with_json(fmt, parsed, doc):
            return None, f"{path.name} does not agree with {name}"
        outputs[fmt] = {"path": f"{job.folder}/{path.name}",  # relative to the output root, as runs record
                        "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return outputs, ""


def transcript_source(outputs: dict, root: str) -> tuple[dict, str] | None:
    """(transcript json, its sha256) when the recorded transcript json under ``root`` is intact, else None."""
    recorded = outputs.get("json") or {}
    try:
        data, doc = _read_valid(resolve_recorded(root, recorded["path"]), "json")
    except (KeyError, TypeError, OSError, ValueError, Unparsable):
        return None
    sha = hashlib.sha256(data).hexdigest()
    return (doc, sha) if sha == recorded.get("sha256") else None


# -- planning ------------------------------------------------------------------------------------------
class Planner:
    """Plans every repair on a picture of the jobs that each planned change updates, so a later
    step sees an earlier one (a transcript planned for reset makes its translations stale)."""

    def __init__(self, db, root: str, *, now: float | None = None):
        self.db = db
        self.root = root
        self.now = time.time() if now is None else now
        self.jobs = [JobState.from_row(row) for row in db.jobs()]
        self.transcripts = {job.file_id: job for job in self.jobs if job.stage == TRANSCRIPTION}
        self._planned_reclaims: set[int] = set()
        self._reclaimed: set[int] | None = None

    def plan(self, temp_age: float) -> list[Change]:
        return (self.reclaims() + self.broken_outputs() + self.adoptions(TRANSCRIPTION)
                + self.stale_translations() + self.adoptions(TRANSLATION) + self.temp_files(temp_age))

    def folder(self, job: JobState) -> Path:
        return safe_join(self.root, job.folder)

    # reclaim ---------------------------------------------------------------------------------------
    def reclaims(self) -> list[Change]:
        changes, live = [], 0
        for job in self.jobs:
            if job.status != IN_PROGRESS:
                continue
            reason = self._lost_lease(job)
            if reason is None:
                live += 1
                continue
            to = FAILED if job.lost_leases + 1 >= MAX_LOST_LEASES else NOT_STARTED
            changes.append(Change("reclaim", job.subject, f"{IN_PROGRESS} -> {to}", reason,
                                  functools.partial(self._reclaim, job.id), job.id))
            job.status = to
            self._planned_reclaims.add(job.id)
        if live:
            log.info("left alone: %d in-progress job(s) held by live runs", live)
        return changes

    def _lost_lease(self, job: JobState) -> str | None:
        """Why the job's holder lost it (DatabaseManager.reclaim's rule), or None while it holds it."""
        return lease_lost_reason(job.lease_owner, job.lease_expires_at, self.now)

    def _reclaim(self, job_id: int) -> bool:
        # reclaim() re-checks every lease in one transaction and takes all lost ones at once: run it
        # at the first reclaim change; the others just look up their job.
        if self._reclaimed is None:
            self._reclaimed = set(self.db.reclaim())
        return job_id in self._reclaimed

    def unplanned_reclaims(self) -> list[int]:
        """Jobs reclaim() took that were still live when the plan was made (their lease ran out since)."""
        return sorted((self._reclaimed or set()) - self._planned_reclaims)

    # reset broken outputs -----------------------------------------------------------------------------
    def broken_outputs(self) -> list[Change]:
        changes = []
        edited = 0
        for job in self.jobs:
            if job.status != COMPLETED:
                continue
            problems = output_problems(job.stage, job.language, job.outputs, self.folder(job), root=self.root)
            if problems and all(kind == "edited" for _fmt, kind, _detail, _path in problems):
                edited += 1  # a correction, not damage
                continue
            if not problems:
                continue
            reason = "; ".join(f"{fmt} {kind} ({detail})" for fmt, kind, detail, _path in problems)
            changes.append(Change("reset", job.subject, f"{COMPLETED} -> {NOT_STARTED}", reason,
                                  functools.partial(self._reset_broken, job, job.outputs, reason), job.id))
            job.status, job.outputs = NOT_STARTED, {}
        if edited:
            log.warning("left alone: %d completed job(s) with outputs edited by hand; make them the record with"
                        " tools/adopt_edits.py --apply", edited)
        return changes

    def _reset_broken(self, job: JobState, outputs: dict, reason: str) -> bool:
        with self.db.transaction() as conn:
            row = conn.execute("SELECT status, outputs FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row["status"] != COMPLETED or json.loads(row["outputs"] or "{}") != outputs:
                return False
            # Re-verified under the write lock: transcripts are small, and no runner can rewrite
            # them between this check and the reset.
            if not output_problems(job.stage, job.language, outputs, self.folder(job), root=self.root):
                return False
            keep_edits(outputs, self.root)  # a hand edit beside the damage is kept before the job is redone
            return self.db.reset([job.id], f"outputs broken: {reason}"[:2000], from_statuses=(COMPLETED,)) == 1

    # adopt valid outputs -----------------------------------------------------------------------------
    def adoptions(self, stage: str) -> list[Change]:
        changes = []
        for job in self.jobs:
            if job.stage != stage or job.status not in (FAILED, NOT_STARTED):
                continue
            if not (self.folder(job) / output_name(stage, job.language, "json")).is_file():
                continue  # the usual case: nothing written yet, so nothing to read or hash
            source_doc = source_sha = None
            if stage == TRANSLATION:
                transcript = self.transcripts.get(job.file_id)
                source = transcript_source(transcript.outputs, self.root) if transcript and transcript.status == COMPLETED \
                    else None
                if source is None:
                    continue  # nothing to translate from: the job must wait for its transcript
                source_doc, source_sha = source
            outputs, why = valid_output_set(job, self.folder(job), source_doc, source_sha)
            if outputs is None:
                if why:
                    log.info("not adopting %s: %s", job.subject, why)
                continue
            changes.append(Change("adopt", job.subject, f"{job.status} -> {COMPLETED}",
                                  f"valid outputs already in {self.folder(job)}",
                                  functools.partial(self._adopt, job, outputs, source_sha), job.id))
            job.status, job.outputs = COMPLETED, outputs
        return changes

    def _adopt(self, job: JobState, outputs: dict, source_sha: str | None) -> bool:
        with self.db.transaction() as conn:
            source_doc = None
            if job.stage == TRANSLATION:
                row = conn.execute("SELECT status, outputs FROM jobs WHERE file_id = ? AND stage = ?",
                                   (job.file_id, TRANSCRIPTION)).fetchone()
                if row is None or row["status"] != COMPLETED:
                    return False
                source = transcript_source(json.loads(row["outputs"] or "{}"), self.root)
                if source is None or source[1] != source_sha:
                    return False
                source_doc = source[0]
            again, _why = valid_output_set(job, self.folder(job), source_doc, source_sha)
            if again != outputs:
                return False
            return self.db.adopt(job.id, outputs, note=ADOPTED_NOTE, source_sha256=source_sha)

    # translations without a transcript -----------------------------------------------------------------
    def stale_translations(self) -> list[Change]:
        changes = []
        for job in self.jobs:
            if job.stage != TRANSLATION or job.status not in (COMPLETED, FAILED):
                continue
            transcript = self.transcripts.get(job.file_id)
            source_status = transcript.status if transcript else "missing"
            if source_status == COMPLETED:
                continue
            changes.append(Change("reset", job.subject, f"{job.status} -> {NOT_STARTED}",
                                  f"its transcript is {source_status}",
                                  functools.partial(self._reset_stale, job), job.id))
            job.status, job.outputs = NOT_STARTED, {}
        return changes

    def _reset_stale(self, job: JobState) -> bool:
        with self.db.transaction() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE file_id = ? AND stage = ?",
                               (job.file_id, TRANSCRIPTION)).fetchone()
            if row and row["status"] == COMPLETED:
                return False
            # Fresh attempts: earlier failures may have come from the source that is being redone.
            return self.db.reset([job.id], "its transcript is no longer completed", reset_attempts=True,
                                 from_statuses=(COMPLETED, FAILED)) == 1

    # orphan temporary files ------------------------------------------------------------------------------
    def temp_files(self, age: float) -> list[Change]:
        return [Change("sweep", path, "delete", f"orphan temporary file older than {age:.0f} s",
                       functools.partial(_remove_if_old, path, age))
                for path in sweep_temp_files(self.root, age, apply=False)]


def _remove_if_old(path: str, age: float) -> bool:
    try:
        if os.stat(path).st_mtime > time.time() - age:
            return False  # rewritten meanwhile: a live writer's file
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# -- applying and reporting --------------------------------------------------------------------------------
def apply_changes(planner: Planner, changes: list[Change]) -> list[Change]:
    """Make each change; returns the changes, each marked done or not, plus unplanned reclaims."""
    for change in changes:
        try:
            change.done = change.apply()
        except (sqlite3.Error, OSError) as exc:
            log.error("could not %s %s: %s", change.action, change.subject, exc)
            change.done = False
    extra = [Change("reclaim", f"job {job_id}", f"{IN_PROGRESS} -> {NOT_STARTED}",
                    "its lease ran out while this tool ran", lambda: True, job_id, True)
             for job_id in planner.unplanned_reclaims()]
    return changes + extra


def build_parser():
    parser = config.make_parser(__doc__, "python tools/fix_transcript_status.py --db archive.db --output-dir output\n"
                                         "  python tools/fix_transcript_status.py --db archive.db --output-dir output --apply")
    parser.add_argument("--apply", action="store_true", help="make the changes (default: only list them)")
    parser.add_argument("--temp-age", type=float, default=DEFAULT_TEMP_AGE, metavar="SECONDS",
                        help=f"sweep temporary files older than this (default {DEFAULT_TEMP_AGE:.0f})")
    config.add_common_args(parser)
    return parser


def report(changes: list[Change], applied: bool, as_json: bool) -> None:
    done = sum(1 for c in changes if c.done) if applied else len(changes)
    if as_json:
        key = "changed" if applied else "would_change"
        print(json.dumps({"applied": applied, key: done, "changes": [c.as_dict() for c in changes]},
                         ensure_ascii=True))
        return
    for change in changes:
        prefix = "" if not applied or change.done else "skipped (no longer applies): "
        print(prefix + change.line())
    print(f"changed {done}" if applied else f"would change {done}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.temp_age < 0:
        raise config.ConfigError("--temp-age must be zero or more seconds")
    settings = Settings.load(args)
    config.setup_logging(settings.debug)
    db = config.open_db(settings.db, must_exist=True)
    db.actor = f"tool:{Path(__file__).name}"  # a file's history names the tool that changed it
    try:
        if args.apply:
            publish.roll_forward(db, settings.output_dir)  # staged outputs of a crash, before judging files
        planner = Planner(db, settings.output_dir)
        changes = planner.plan(args.temp_age)
        if args.apply:
            changes = apply_changes(planner, changes)
    finally:
        db.close_all()
    report(changes, args.apply, args.json)
    return config.EXIT_FAILED if args.apply and not all(c.done for c in changes) else config.EXIT_OK


if __name__ == "__main__":
    config.run_main(main)
