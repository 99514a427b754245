#!/usr/bin/env python3
"""Retry failed jobs: reset them (fresh attempts, their event history kept) and run them again
with the same runner, provider choice and rate limiter as parallel_transcription.py.

Failed transcriptions by default; --stage translation --language CODE retries the failed
translations into CODE instead, as parallel_translation.py would run them. Only the jobs reset
here are processed: other queued jobs wait for the normal run. --error-class picks one kind of
failure (see tools/status.py --failed), --limit caps how many are retried, and --dry-run lists
what would be reset and sends nothing.

Exit codes: 0 every retried job completed, 1 some failed again, 2 usage, configuration or
account error, 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from db_manager import NOT_STARTED, STAGES, TRANSCRIPTION, TRANSLATION
from pipeline import config
from pipeline.config import positive_argument as _positive
from pipeline.runner import Plan, StopSignal, connections_needed, report, run_plans
from pipeline.settings import Settings
from pipeline.stages import TranscriptionStage, TranslationStage
from transcription import add_local_arguments

log = logging.getLogger("verbatim.retry")


def list_jobs(rows, what: str, as_json: bool) -> int:
    jobs = [{"job_id": r["id"], "file_id": r["file_id"], "attempts": r["attempts"], "error_class": r["error_class"],
             "error": r["error_message"], "path": r["path_display"]} for r in rows]
    if as_json:
        print(json.dumps({"stage": what, "would_reset": len(jobs), "jobs": jobs}, ensure_ascii=True))
        return config.EXIT_OK
    for job in jobs:
        print(f"job {job['job_id']}  {job['file_id']}  {what}  [{job['error_class']}] after {job['attempts']} "
              f"attempt(s): {job['error']}  {job['path']}")
    print(f"would reset {len(jobs)} failed {what} job(s) to {NOT_STARTED} and retry them")
    return config.EXIT_OK


def stage_for(args, settings: Settings, stage: str):
    """The stage the scripts run ``stage`` through, with this tool's flags: the same provider
    choice, limiter, engine cap, loaded model and output folder, so a retry runs as the script would."""
    if stage == TRANSCRIPTION:
        return TranscriptionStage(settings, provider=args.provider, model=args.model, workers=args.workers,
                                  device=args.device, compute_type=args.compute_type,
                                  language=args.spoken_language, prompt=args.prompt)
    return TranslationStage(settings, [args.language], provider=args.provider, model=args.model, workers=args.workers)


def plan_for(stage, db, language: str, stop: StopSignal, args) -> Plan:
    """The stage's own plan; a translation provider must be configured (a retry is not a copy run)."""
    if isinstance(stage, TranscriptionStage):
        return stage.plan(db, stop, batch_size=args.batch_size, quiet=args.quiet, label="retry transcription")
    return stage.plan(db, language, stop, translator=stage.translator(language), batch_size=args.batch_size,
                      quiet=args.quiet, label=f"retry translation {language}")


def selection(args) -> tuple[str, str]:
    if args.stage == TRANSLATION:
        if not args.language:
            raise config.ConfigError("--stage translation needs --language CODE (the target language)")
        if args.spoken_language or args.prompt:
            raise config.ConfigError("--spoken-language and --prompt apply to transcriptions only")
        return TRANSLATION, Settings.language(args.language)
    if args.language:
        raise config.ConfigError("--language is a translation target: use it with --stage translation "
                                 "(--spoken-language is the transcription hint)")
    return TRANSCRIPTION, ""  # the stage sends --spoken-language as the code it is ("DE" -> "de")


def build_parser():
    parser = config.make_parser(
        __doc__, "python tools/retry_failed_transcriptions.py --workers 3 --error-class server_error\n"
                 "  python tools/retry_failed_transcriptions.py --stage translation --language he --dry-run")
    parser.add_argument("--stage", choices=STAGES, default=TRANSCRIPTION,
                        help="which failed jobs to retry (default: transcription)")
    parser.add_argument("--language", metavar="CODE", help="with --stage translation: the target language to retry")
    parser.add_argument("--workers", type=_positive, metavar="N",
                        help="parallel API calls (default 5 for transcription, 2 for translation)")
    parser.add_argument("--batch-size", type=_positive, metavar="N",
                        help="jobs claimed per batch (default 20 for transcription, 10 for translation)")
    parser.add_argument("--error-class", metavar="CLASS", help="retry only jobs that failed with this error class")
    parser.add_argument("--limit", type=_positive, metavar="N", help="retry at most N failed jobs (oldest first)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be reset; change and send nothing")
    parser.add_argument("--provider", help="provider to use (default: from .env, else the first configured)")
    parser.add_argument("--model", help="provider model (default: the provider's default)")
    parser.add_argument("--spoken-language", metavar="CODE", help="transcription: spoken language hint")
    parser.add_argument("--prompt", help="transcription: vocabulary hint (names and places)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    parser.add_argument("--adopt-output-dir", action="store_true",
                        help="take over an output folder another job database wrote (it is refused otherwise)")
    add_local_arguments(parser)
    config.add_common_args(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.load(args)
    config.setup_logging(settings.debug, args.quiet)
    stage, language = selection(args)
    what = stage + (f" {language}" if language else "")
    runs = stage_for(args, settings, stage)
    db = config.open_db(settings.db, must_exist=True, connections=connections_needed(runs.runner_threads()))
    db.actor = f"tool:{Path(__file__).name}"  # a file's history names the tool that changed it
    try:
        rows = db.failed_jobs(stage, language, error_class=args.error_class, limit=args.limit)
        if args.dry_run:
            return list_jobs(rows, what, args.json)
        if not rows:
            print(f"no failed {what} jobs to retry", file=sys.stderr)
            return config.EXIT_OK
        runs.prepare_output_root(db, adopt=args.adopt_output_dir)  # as the scripts: this database's, writable
        stop = StopSignal()
        # The provider is set up before anything is reset, so a missing key changes nothing.
        plan = plan_for(runs, db, language, stop, args)
        # Only the reset jobs run: a retry never starts unrelated queued work, and its summary and
        # exit code speak of the retried jobs alone.
        plan.options.file_ids = db.reset_failed(stage, language, error_class=args.error_class, limit=args.limit)
        log.info("reset %d failed %s job(s) for retry", len(plan.options.file_ids), what)
        stop.install()
        return report(run_plans(db, [plan], stop), stop, as_json=args.json)
    finally:
        db.close_all()


if __name__ == "__main__":
    config.run_main(main)
