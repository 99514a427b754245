#!/usr/bin/env python3
"""Report where the archive stands: per stage and language, how many jobs are completed,
not started, in progress and failed; audio hours; cost so far; the most common errors.

  --files   one entry per media file with each job's status, attempts, error and outputs
  --failed  the failed jobs with their error class and message
"""

import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db_manager import COMPLETED, FAILED, IN_PROGRESS, NOT_STARTED, STATUSES, TRANSCRIPTION, TRANSLATION  # noqa: E402
from pipeline import config, publish  # noqa: E402

LANGUAGE_NAMES = {"en": "English", "de": "German", "he": "Hebrew", "fr": "French", "es": "Spanish",
                  "it": "Italian", "nl": "Dutch", "pl": "Polish", "ru": "Russian", "uk": "Ukrainian",
                  "cs": "Czech", "hu": "Hungarian", "yi": "Yiddish", "ar": "Arabic"}


def summary(db, languages) -> dict:
    counts = db.counts()
    totals = db.totals()
    empty = dict.fromkeys(STATUSES, 0)
    languages = list(languages) + sorted({lang for stage, lang in counts if stage == TRANSLATION} - set(languages))
    stale = Counter(row["language"] for row in db.stale_translations())
    return {
        "files": totals["files"],
        "transcription": counts.get((TRANSCRIPTION, ""), dict(empty)),
        "translation": {lang: counts.get((TRANSLATION, lang), dict(empty)) for lang in languages},
        # completed translations whose transcript changed since (parallel_translation.py redoes them)
        "stale": {lang: stale[lang] for lang in languages if stale[lang]},
        "audio_hours": round(totals["audio_seconds"] / 3600, 3),
        "cost_usd": round(totals["cost"], 4),
        "errors": {
            "transcription": dict(db.error_classes(TRANSCRIPTION, "")),
            "translation": {lang: dict(db.error_classes(TRANSLATION, lang)) for lang in languages},
        },
    }


def _line(label: str, counts: dict, width: int) -> str:
    parts = [f"{status.replace('_', ' ')} {counts[status]:,}" for status in (COMPLETED, NOT_STARTED, IN_PROGRESS, FAILED)]
    return f"{label + ':':<{width}} " + " · ".join(parts)


def render(report: dict) -> str:
    labels = {"Transcription": report["transcription"]}
    for lang, counts in report["translation"].items():
        labels[f"{LANGUAGE_NAMES.get(lang, lang)} translations"] = counts
    width = max(len(label) for label in labels) + 1
    lines = [f"Files: {report['files']:,} · audio {report['audio_hours']:,.1f} h · cost so far ${report['cost_usd']:,.2f}"]
    stale = {f"{LANGUAGE_NAMES.get(lang, lang)} translations": n for lang, n in report.get("stale", {}).items()}
    lines += [_line(label, counts, width) + (f" (stale {stale[label]:,}: transcript changed since)" if label in stale
                                             else "") for label, counts in labels.items()]
    errors = [("transcription", report["errors"]["transcription"])]
    errors += [(f"{lang} translation", e) for lang, e in report["errors"]["translation"].items()]
    shown = [f"  {where}: " + ", ".join(f"{cls} {n}" for cls, n in classes.items())
             for where, classes in errors if classes]
    if shown:
        lines += ["Most common errors of failed jobs:"] + shown
    return "\n".join(lines)


def _job_entry(row) -> dict:
    outputs = json.loads(row["outputs"] or "{}")
    entry = {"status": row["status"], "attempts": row["attempts"],
             "error": (f"{row['error_class']}: {row['error_message']}" if row["status"] == FAILED
                       else None),
             "outputs": {fmt: os.path.abspath(info["path"]) for fmt, info in outputs.items()
                         if fmt in ("txt", "json", "srt", "vtt")}}
    if row["note"]:
        entry["note"] = row["note"]
    return entry


def file_items(db) -> list[dict]:
    items: dict[str, dict] = {}
    for row in db.jobs():
        item = items.setdefault(row["file_id"], {"file_id": row["file_id"], "path": os.fsdecode(bytes(row["path_bytes"])),
                                                 "transcription": None, "translation": {}})
        if row["stage"] == TRANSCRIPTION:
            item["transcription"] = _job_entry(row)
        else:
            item["translation"][row["language"]] = _job_entry(row)
    return list(items.values())


def failed_jobs(db) -> list[dict]:
    return [{"file_id": r["file_id"], "path": r["path_display"], "stage": r["stage"], "language": r["language"] or None,
             "attempts": r["attempts"], "error_class": r["error_class"], "error": r["error_message"]}
            for r in db.jobs(status=FAILED)]


def main(argv=None) -> int:
    parser = config.make_parser(__doc__, "python tools/status.py --db archive.db --failed")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--files", action="store_true", help="list every media file and its jobs")
    group.add_argument("--failed", action="store_true", help="list failed jobs with their errors")
    config.add_common_args(parser)
    args = parser.parse_args(argv)
    config.load_env(args.env_file)
    config.setup_logging(args.verbose)
    db = config.open_db(config.db_path(args), must_exist=True, read_only=True)
    try:
        publish.settle_quietly(db, config.output_dir(args))  # a crash's staged outputs count as what they are
        report = summary(db, config.target_languages())
        if args.files:
            report["items"] = file_items(db)
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
            jobs = [f"transcription {item['transcription']['status']}"] if item["transcription"] else []
            jobs += [f"{lang} {entry['status']}" for lang, entry in item["translation"].items()]
            print(f"{item['file_id']}  {', '.join(jobs)}  {_printable(item['path'])}")
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
