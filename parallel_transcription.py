#!/usr/bin/env python3
"""Transcribe every registered interview in parallel, resumably.

Registers --input files and folders first (if given), then claims transcription jobs in batches
and runs them on --workers threads against the chosen speech-to-text provider. Every result is
written atomically under the output folder and recorded in the job database; an interrupted or
killed run is resumed by running the same command again: completed files are never sent twice.

Exit codes: 0 all done, 1 some jobs failed, 2 usage/configuration/account error, 130 interrupted.
"""

import json
import logging
import sys

from db_manager import TRANSCRIPTION
from pipeline import config
from pipeline.liveruns import LiveRun
from pipeline.media import describe, register_inputs
from pipeline.runner import StopSignal, add_run_arguments, connections_needed, report, run_plans
from pipeline.settings import Settings
from pipeline.stages import TranscriptionStage, check_inputs, nothing_to_do
from transcription import add_local_arguments

log = logging.getLogger("verbatim.transcription")


def build_parser():
    parser = config.make_parser(__doc__, "python parallel_transcription.py --input /archive/interviews --workers 5")
    parser.add_argument("--input", action="append", metavar="PATH", default=[],
                        help="media file or folder to register first (repeatable)")
    parser.add_argument("--language", help="spoken language hint, ISO-639-1 (default: auto-detect)")
    parser.add_argument("--prompt", help="vocabulary hint: names and places spoken in the interviews")
    add_run_arguments(parser, workers=5, batch_size=20)
    add_local_arguments(parser)
    config.add_common_args(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.load(args)
    config.setup_logging(settings.debug, args.quiet)
    stage = TranscriptionStage(settings, provider=args.provider, model=args.model, workers=args.workers,
                               device=args.device, compute_type=args.compute_type, language=args.language,
                               prompt=args.prompt)  # --language is sent as the code it is ("DE" -> "de")
    check_inputs(args.input)
    # A dry run that registers nothing only reads: it works on a read-only database too.
    db = config.open_db(settings.db, read_only=args.dry_run and not args.input,
                        must_exist=args.dry_run and not args.input,
                        connections=connections_needed(stage.runner_threads()))
    live = None if args.dry_run else LiveRun(db, TRANSCRIPTION).start()  # translation runs follow it
    try:
        scan = None
        if args.input:
            scan = register_inputs(db, args.input, list(settings.target_languages))
            print(describe(scan), file=sys.stderr)
            if scan.missing_inputs:
                raise config.ConfigError("input not found: " + ", ".join(map(repr, scan.missing_inputs)))
        if not args.dry_run:  # the output folder is this database's and writable, or nothing runs
            stage.prepare_output_root(db, adopt=args.adopt_output_dir)
        idle = None if args.dry_run else nothing_to_do(db, args.input, scan, args.retry_failed)
        if idle:  # said before any provider is chosen or model loaded
            why, code = idle
            print(f"nothing to do: {why}", file=sys.stderr)
            if args.json:
                print(json.dumps({"exit_code": code, "nothing_to_do": why, "runs": []}))
            return code
        if args.dry_run:
            return stage.dry_run(db, args.limit, args.json)
        stage.load()
        if args.retry_failed:
            log.info("reset %d failed transcription job(s) for retry", len(db.reset_failed(TRANSCRIPTION)))
        stop = StopSignal()
        stop.install()
        plan = stage.plan(db, stop, batch_size=args.batch_size, limit=args.limit, lease_seconds=args.lease_seconds,
                          quiet=args.quiet)
        summaries = run_plans(db, [plan], stop)
        return report(summaries, stop, as_json=args.json)
    finally:
        if live is not None:
            live.stop()
        db.close_all()


if __name__ == "__main__":
    config.run_main(main)
