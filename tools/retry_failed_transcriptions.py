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

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from db_manager import NOT_STARTED, STAGES, TRANSCRIPTION, TRANSLATION
from pipeline import config
from pipeline.runner import Plan, StopSignal, report, run_plans
from transcription import add_local_arguments

log = logging.getLogger("verbatim.retry")

DEFAULT_WORKERS = {TRANSCRIPTION: 5, TRANSLATION: 2}      # as parallel_transcription / parallel_translation
DEFAULT_BATCH_SIZE = {TRANSCRIPTION: 20, TRANSLATION: 10}


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


def transcription_plan(args, db, stop: StopSignal) -> Plan:
    """The transcription script's own plan (its provider limiter, the local engine's cap and
    model, the expected languages), so a retry runs as the script would."""
    from parallel_transcription import transcription_plan as stage_plan
    from transcription import check_language, choose_transcriber

    workers = args.workers or DEFAULT_WORKERS[TRANSCRIPTION]
    transcriber = choose_transcriber(args.provider, os.environ, model=args.model, workers=workers,
                                     device=args.device, compute_type=args.compute_type)
    check_language(transcriber, args.spoken_language)
    transcriber.load()
    plan = stage_plan(db, transcriber, stop, output_root=config.output_dir(args), workers=workers,
                      batch_size=args.batch_size or DEFAULT_BATCH_SIZE[TRANSCRIPTION], quiet=args.quiet,
                      language=args.spoken_language, prompt=args.prompt,
                      expected_languages=config.expected_languages())
    plan.options.label = "retry transcription"
    return plan


def translation_plan(args, db, language: str, stop: StopSignal) -> Plan:
    """The translation script's own plan for ``language``."""
    from parallel_translation import translation_plan as stage_plan
    from translation import choose_translator

    translator = choose_translator(language, args.provider, os.environ, model=args.model)
    plan = stage_plan(db, language, translator, stop, output_root=config.output_dir(args),
                      workers=args.workers or DEFAULT_WORKERS[TRANSLATION],
                      batch_size=args.batch_size or DEFAULT_BATCH_SIZE[TRANSLATION], quiet=args.quiet)
    plan.options.label = f"retry translation {language}"
    return plan


def selection(args) -> tuple[str, str]:
    if args.stage == TRANSLATION:
        if not args.language:
            raise config.ConfigError("--stage translation needs --language CODE (the target language)")
        if args.spoken_language or args.prompt:
            raise config.ConfigError("--spoken-language and --prompt apply to transcriptions only")
        return TRANSLATION, config.parse_languages([args.language])[0]
    if args.language:
        raise config.ConfigError("--language is a translation target: use it with --stage translation "
                                 "(--spoken-language is the transcription hint)")
    if args.spoken_language:  # sent as the code it is ("DE" -> "de"), never as typed
        args.spoken_language = config.parse_languages([args.spoken_language])[0]
    return TRANSCRIPTION, ""


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


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
    add_local_arguments(parser)
    config.add_common_args(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config.load_env(args.env_file)
    config.setup_logging(args.verbose, args.quiet)
    stage, language = selection(args)
    what = stage + (f" {language}" if language else "")
    db = config.open_db(config.db_path(args), must_exist=True)
    db.actor = f"tool:{Path(__file__).name}"  # a file's history names the tool that changed it
    try:
        rows = db.failed_jobs(stage, language, error_class=args.error_class, limit=args.limit)
        if args.dry_run:
            return list_jobs(rows, what, args.json)
        if not rows:
            print(f"no failed {what} jobs to retry", file=sys.stderr)
            return config.EXIT_OK
        stop = StopSignal()
        # The provider is set up before anything is reset, so a missing key changes nothing.
        plan = transcription_plan(args, db, stop) if stage == TRANSCRIPTION else translation_plan(args, db, language, stop)
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
