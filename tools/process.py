#!/usr/bin/env python3
"""Register, transcribe and translate in one run.

Registers the media under --input (files or folders), then runs the transcription and one
translation per --language at once, each with its own progress bar: a file's translations start as
soon as its transcript is committed, and the translations follow the transcription until it has
nothing left. It is the same work as parallel_transcription.py followed by parallel_translation.py
(the same runners, job store and outputs; interrupt it and run it again to resume), with one
summary at the end.

A language needs a translation provider (a key, see .env.example) unless it is the spoken
language (--spoken-language): transcripts already in it are copied.

Exit codes: 0 all done, 1 some jobs failed, 2 usage/configuration/account error, 130 interrupted.
"""

import argparse
import json
import logging
import sys

from db_manager import DEFAULT_LEASE_SECONDS, TRANSCRIPTION, TRANSLATION
from pipeline import config
from pipeline.config import positive_argument as _positive
from pipeline.media import describe, register_inputs
from pipeline.runner import StopSignal, connections_needed, report, run_plans
from pipeline.settings import Settings
from pipeline.stages import TranscriptionStage, TranslationStage, check_inputs, nothing_to_do
from transcription import add_local_arguments

log = logging.getLogger("verbatim.process")


def build_parser():
    parser = config.make_parser(__doc__, "python tools/process.py --input /archive/interviews --language en de he")
    parser.add_argument("--input", action="append", metavar="PATH", default=[],
                        help="media file or folder to register first (repeatable)")
    parser.add_argument("--language", nargs="+", metavar="CODE",
                        help="translation languages (default: $VERBATIM_TARGET_LANGUAGES, else en de he)")
    parser.add_argument("--spoken-language", metavar="CODE", help="spoken language hint (default: detected)")
    parser.add_argument("--prompt", help="vocabulary hint for transcription: names and places")
    parser.add_argument("--workers", type=_positive, default=5, metavar="N",
                        help="parallel transcription requests (default 5)")
    parser.add_argument("--translation-workers", type=_positive, default=2, metavar="N",
                        help="parallel translation requests per language (default 2)")
    parser.add_argument("--provider", help="transcription provider (default: from .env, else the first configured)")
    parser.add_argument("--model", help="transcription model (default: the provider's default)")
    parser.add_argument("--translation-provider", help="translation provider (default: from .env, else the first "
                        "configured)")
    parser.add_argument("--translation-model", help="translation model (default: the provider's default)")
    add_local_arguments(parser)
    parser.add_argument("--retry-failed", action="store_true", help="also retry jobs that failed before")
    parser.add_argument("--adopt-output-dir", action="store_true",
                        help="take over an output folder another job database wrote (it is refused otherwise)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("--lease-seconds", type=float, default=DEFAULT_LEASE_SECONDS, help=argparse.SUPPRESS)
    config.add_common_args(parser)
    return parser


def _waiting(db, languages) -> int:
    """Translation jobs not started yet (whether or not their transcript is done)."""
    counts = db.counts()
    return sum(counts.get((TRANSLATION, lang), {}).get("not_started", 0) for lang in languages)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.load(args, target_languages=args.language)
    config.setup_logging(settings.debug, args.quiet)
    languages = list(settings.target_languages)  # --language, else $VERBATIM_TARGET_LANGUAGES, as codes
    transcribe = TranscriptionStage(settings, provider=args.provider, model=args.model, workers=args.workers,
                                    device=args.device, compute_type=args.compute_type,
                                    language=args.spoken_language, prompt=args.prompt)
    spoken = transcribe.language
    translate = TranslationStage(settings, languages, provider=args.translation_provider,
                                 model=args.translation_model, workers=args.translation_workers)
    check_inputs(args.input)
    db = config.open_db(settings.db,
                        connections=connections_needed(transcribe.runner_threads() + translate.runner_threads()))
    try:
        scan = None
        if args.input:
            scan = register_inputs(db, args.input, languages)
            print(describe(scan), file=sys.stderr)
        for language in languages:
            db.ensure_jobs(TRANSLATION, language)
        if args.retry_failed:
            reset = len(db.reset_failed(TRANSCRIPTION))
            reset += sum(len(db.reset_failed(TRANSLATION, lang)) for lang in languages)
            log.info("reset %d failed job(s) for retry", reset)
        transcribe.prepare_output_root(db, adopt=args.adopt_output_dir)  # this database's and writable, as the scripts
        idle = nothing_to_do(db, args.input, scan, False)
        if idle and not _waiting(db, languages):
            why, code = idle
            print(f"nothing to do: {why}", file=sys.stderr)
            if args.json:
                print(json.dumps({"exit_code": code, "nothing_to_do": why, "runs": []}))
            return code
        transcribing = idle is None
        # Without a provider only copies run: transcripts already in this language (and empty ones).
        translate.require_providers(db, transcripts_to_come=transcribing, spoken=spoken)
        stop = StopSignal()
        plans = []
        if transcribing:
            plans.append(transcribe.plan(db, stop, lease_seconds=args.lease_seconds, quiet=args.quiet))

        def transcripts_to_come() -> bool:
            """The transcription beside the translations still has files to do (none when it stopped)."""
            return transcribing and not stop.stop.is_set() and db.pending(TRANSCRIPTION)[0] > 0

        for language in languages:
            plans.append(translate.plan(db, language, stop, lease_seconds=args.lease_seconds, quiet=args.quiet,
                                        follow=transcripts_to_come))
        stop.install()
        return report(run_plans(db, plans, stop), stop, as_json=args.json)
    finally:
        db.close_all()


if __name__ == "__main__":
    config.run_main(main)
