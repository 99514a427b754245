#!/usr/bin/env python3
"""Report where the archive stands: per stage and language, how many jobs are completed,
not started, in progress and failed; audio hours; cost so far; the most common errors.

  --files           one entry per media file with each job's status, attempts, error and outputs
  --failed          the failed jobs with their error class and message
  --history FILE    every job of one file (FILE: its id, a unique prefix of it, or a media path)
                    with its events in time order: who claimed it, why it was retried or failed,
                    what a completion recorded (outputs and sha256), which tool reset it
"""

import json
import os
import re
import time
from collections import Counter

from db_manager import (COMPLETED, FAILED, IN_PROGRESS, NO_SPEECH_NOTE, NOT_STARTED, REVIEW_NOTE, STATUSES,
                        TRANSCRIPTION, TRANSLATION)
from pipeline import config, publish
from pipeline.languages import LANGUAGE_NAMES
from pipeline.outputs import resolve_recorded
from pipeline.settings import Settings


def summary(db, languages) -> dict:
    counts = db.counts()
    totals = db.totals()
    empty = dict.fromkeys(STATUSES, 0)
    # The languages the database has jobs for (configured ones first, in their order), not zeros for
    # languages this archive never asked for.
    present = {lang for stage, lang in counts if stage == TRANSLATION}
    languages = [lang for lang in languages if lang in present] + sorted(present - set(languages))
    stale = Counter(row["language"] for row in db.stale_translations())
    return {
        "files": totals["files"],
        "transcription": counts.get((TRANSCRIPTION, ""), dict(empty)),
        "translation": {lang: counts.get((TRANSLATION, lang), dict(empty)) for lang in languages},
        # completed translations whose transcript changed since (parallel_translation.py redoes them)
        "stale": {lang: stale[lang] for lang in languages if stale[lang]},
        "no_speech": no_speech(db),
        # transcripts heard in a language the archive does not expect (VERBATIM_LANGUAGES): to review
        "review": db.query("SELECT COUNT(*) FROM jobs WHERE stage = 'transcription' AND status = 'completed'"
                           " AND note LIKE ?", (REVIEW_NOTE + "%",))[0][0],
        "audio_hours": round(totals["audio_seconds"] / 3600, 3),
        "cost_usd": round(totals["cost"], 4),
        "errors": {
            "transcription": dict(db.error_classes(TRANSCRIPTION, "")),
            "translation": {lang: dict(db.error_classes(TRANSLATION, lang)) for lang in languages},
        },
    }


def no_speech(db) -> dict:
    """Completed jobs with no speech found, by stage (translation: by language); zeros left out."""
    found: dict = {}
    for row in db.query("SELECT stage, language, COUNT(*) FROM jobs WHERE status = 'completed' AND note = ?"
                        " GROUP BY stage, language", (NO_SPEECH_NOTE,)):
        if row[0] == TRANSCRIPTION:
            found[TRANSCRIPTION] = row[2]
        else:
            found.setdefault(TRANSLATION, {})[row[1]] = row[2]
    return found


def _line(label: str, counts: dict, width: int, silent: int = 0, review: int = 0) -> str:
    parts = [f"{status.replace('_', ' ')} {counts[status]:,}" for status in (COMPLETED, NOT_STARTED, IN_PROGRESS, FAILED)]
    if silent:
        parts.append(f"no speech {silent:,}")
    if review:
        parts.append(f"to review {review:,} (language not expected)")
    return f"{label + ':':<{width}} " + " · ".join(parts)


def render(report: dict) -> str:
    labels = {"Transcription": report["transcription"]}
    for lang, counts in report["translation"].items():
        labels[f"{LANGUAGE_NAMES.get(lang, lang)} translations"] = counts
    width = max(len(label) for label in labels) + 1
    lines = [f"Files: {report['files']:,} · audio {report['audio_hours']:,.1f} h · cost so far ${report['cost_usd']:,.2f}"]
    stale = {f"{LANGUAGE_NAMES.get(lang, lang)} translations": n for lang, n in report.get("stale", {}).items()}
    silent = report.get("no_speech", {})
    lines += [_line(label, counts, width, *((silent.get(TRANSCRIPTION, 0), report.get("review", 0))
                                           if label == "Transcription" else ()))
              + (f" (stale {stale[label]:,}: transcript changed since)" if label in stale else "")
              for label, counts in labels.items()]
    errors = [("transcription", report["errors"]["transcription"])]
    errors += [(f"{lang} translation", e) for lang, e in report["errors"]["translation"].items()]
    shown = [f"  {where}: " + ", ".join(f"{cls} {n}" for cls, n in classes.items())
             for where, classes in errors if classes]
    if shown:
        lines += ["Most common errors of failed jobs:"] + shown
    return "\n".join(lines)


def _job_entry(row, root: str) -> dict:
    outputs = json.loads(row["outputs"] or "{}")
    entry = {"status": row["status"], "attempts": row["attempts"],
             "error": (f"{row['error_class']}: {row['error_message']}" if row["status"] == FAILED
                       else None),
             "outputs": {fmt: str(resolve_recorded(root, info["path"])) for fmt, info in outputs.items()
                         if fmt in ("txt", "json", "srt", "vtt")}}
    if row["note"]:
        entry["note"] = row["note"]
    return entry


def file_items(db, root: str) -> list[dict]:
    """Every media file with its jobs; output paths as they lie under the output root ``root``."""
    items: dict[str, dict] = {}
    for row in db.jobs():
        item = items.setdefault(row["file_id"], {"file_id": row["file_id"], "path": os.fsdecode(bytes(row["path_bytes"])),
                                                 "transcription": None, "translation": {}})
        if row["stage"] == TRANSCRIPTION:
            item["transcription"] = _job_entry(row, root)
        else:
            item["translation"][row["language"]] = _job_entry(row, root)
    return list(items.values())


def _files_line(item: dict) -> str:
    """One file of ``--files``: each job's status, attempts, error and outputs, then the path."""
    jobs = [("transcription", item["transcription"])] if item["transcription"] else []
    jobs += sorted(item["translation"].items())
    lines = [f"{item['file_id']}  {_printable(item['path'])}"]
    for name, entry in jobs:
        line = f"  {name:<13} {entry['status'].replace('_', ' ')} · attempts {entry['attempts']}"
        if entry["error"]:
            cls, _, message = entry["error"].partition(": ")
            line += f" · [{cls}] {message}"
        if entry.get("note"):
            line += f" · {entry['note']}"
        lines.append(line)
        lines += [f"      {fmt} {path}" for fmt, path in entry["outputs"].items()]
    return "\n".join(lines)


# -- one file's history ------------------------------------------------------------------------------
def resolve_file(db, key: str) -> str:
    """The file id ``key`` names: a file id, a unique prefix of one (or of its sha256), or a media
    path (as registered, or relative to here). ConfigError (exit 2) when none or several match."""
    if re.fullmatch(r"[0-9a-fA-F]{1,64}", key):
        rows = db.query("SELECT file_id FROM media_files WHERE sha256 LIKE ? ORDER BY file_id",
                        (key.lower() + "%",))
        if len(rows) > 1:
            shown = ", ".join(r[0] for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
            raise config.ConfigError(f"file id prefix {key!r} is ambiguous: it matches {len(rows)} files "
                                     f"({shown}); give more digits")
        if rows:
            return rows[0][0]
    for candidate in dict.fromkeys((key, os.path.abspath(key), os.path.realpath(key))):
        rows = db.query("SELECT file_id FROM media_paths WHERE path_bytes = ?", (os.fsencode(candidate),))
        if rows:
            return rows[0][0]
    raise config.ConfigError(f"no file {key!r} in the database: give a file id, a unique prefix of one, "
                             "or the path of a registered media file (tools/status.py --files lists them)")


def _event_kind(event) -> str:
    to, before, cls = event["to_status"], event["from_status"], event["error_class"]
    if to == "refused":
        return "refused"
    if before is None:
        return "registered"
    if cls == "reset":
        return "reset"
    if to == IN_PROGRESS:
        return "claimed"
    if to == COMPLETED:
        return "completed" if before == IN_PROGRESS else "adopted"
    if to == FAILED:
        return "failed"
    return {"released": "released", "lease_lost": "reclaimed"}.get(cls, "retry")


def history(db, file_id: str) -> dict:
    """Every job of ``file_id`` with its events in time order."""
    media = db.query("SELECT * FROM media_files WHERE file_id = ?", (file_id,))[0]
    jobs = {row["id"]: row for row in db.jobs(file_id=file_id)}
    events: dict[int, list] = {job_id: [] for job_id in jobs}
    for row in db.events(file_id=file_id):
        recorded = row["outputs"] if "outputs" in row.keys() else None  # older schemas lack the column
        events[row["job_id"]].append({
            "at": row["at"], "event": _event_kind(row), "owner": row["owner"], "from": row["from_status"],
            "to": row["to_status"], "attempt": row["attempt"], "error_class": row["error_class"],
            "error": row["error_message"], "outputs": json.loads(recorded) if recorded else None})
    return {"file_id": file_id, "path": os.fsdecode(bytes(media["path_bytes"])),
            "paths": db.paths_of(file_id), "folder": media["folder"], "duration": media["duration"],
            "source_language": media["source_language"],
            "jobs": [{"stage": row["stage"], "language": row["language"] or None, "status": row["status"],
                      "attempts": row["attempts"], "provider": row["provider"], "model": row["model"],
                      "note": row["note"], "outputs": json.loads(row["outputs"] or "{}"),
                      "events": sorted(events[job_id], key=lambda e: e["at"])}
                     for job_id, row in jobs.items()]}


def _describe_event(event: dict) -> list[str]:
    kind, owner, why = event["event"], event["owner"], event["error"] or ""
    reason = f"[{event['error_class']}] {why}" if event["error_class"] else why
    text = {"registered": "registered (not started)",
            "claimed": f"claimed by {owner} (attempt {event['attempt']})",
            "completed": f"completed by {owner}",
            "adopted": f"adopted by {owner} (its outputs already existed)",
            "retry": f"retry: {reason}", "failed": f"failed: {reason}",
            "released": f"released by {owner}: {why}", "reclaimed": f"reclaimed from {owner}: {why}",
            "reset": f"reset by {owner}: {why}", "refused": f"refused: {why}"}[kind]
    lines = [f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(event['at']))}  {text}"]
    for fmt, info in (event["outputs"] or {}).items():
        lines.append(f"    {fmt:<4} {_printable(info.get('path', ''))}  sha256 {info.get('sha256')}"
                     f"  {info.get('size')} bytes")
    return lines


def render_history(item: dict) -> str:
    lines = [f"File {item['file_id']}  {_printable(item['path'])}"]
    lines += [f"  also at {_printable(p)}" for p in item["paths"] if p != item["path"]]
    for job in item["jobs"]:
        name = job["stage"] + (f" {job['language']}" if job["language"] else "")
        state = f"{job['status'].replace('_', ' ')} · attempts {job['attempts']}"
        lines.append(f"{name}: {state}" + (f" · {job['note']}" if job["note"] else ""))
        lines += ["  " + line for event in job["events"] for line in _describe_event(event)]
    return "\n".join(lines)


def failed_jobs(db) -> list[dict]:
    return [{"file_id": r["file_id"], "path": r["path_display"], "stage": r["stage"], "language": r["language"] or None,
             "attempts": r["attempts"], "error_class": r["error_class"], "error": r["error_message"]}
            for r in db.jobs(status=FAILED)]


def main(argv=None) -> int:
    parser = config.make_parser(__doc__, "python tools/status.py --db archive.db --failed")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--files", action="store_true", help="list every media file and its jobs")
    group.add_argument("--failed", action="store_true", help="list failed jobs with their errors")
    group.add_argument("--history", metavar="FILE",
                       help="one file's jobs and events in time order (a file id, a unique prefix, or a media path)")
    config.add_common_args(parser)
    args = parser.parse_args(argv)
    settings = Settings.load(args)
    config.setup_logging(settings.debug)
    db = config.open_db(settings.db, must_exist=True, read_only=True)
    try:
        publish.settle_quietly(db, settings.output_dir)  # a crash's staged outputs count as what they are
        if args.history:
            item = history(db, resolve_file(db, args.history))
            print(json.dumps(item, ensure_ascii=True) if args.json else render_history(item))
            return config.EXIT_OK
        report = summary(db, list(settings.target_languages))
        if args.files:
            report["items"] = file_items(db, settings.output_dir)
        if args.failed:
            report["failed"] = failed_jobs(db)
    finally:
        db.close_all()
    if args.json:
        # surrogateescape'd names cannot be encoded as UTF-8: JSON escapes them instead
        print(json.dumps(report, ensure_ascii=True))
        return config.EXIT_OK
    print(render(report))
    if args.files:
        for item in report["items"]:
            print(_files_line(item))
    if args.failed:
        for job in report["failed"]:
            where = job["stage"] + (f" {job['language']}" if job["language"] else "")
            print(f"{job['file_id']}  {where}  [{job['error_class']}] {job['error']}  {job['path']}")
    return config.EXIT_OK


def _printable(path: str) -> str:
    from db_manager import display_path
    return display_path(path)


if __name__ == "__main__":
    config.run_main(main)
