#!/usr/bin/env python3
"""Translate every completed transcript into one or more languages, in parallel, resumably.

For each --language a runner claims translation jobs whose transcript is completed, translates
the transcript segment by segment (so subtitles keep their cues and timings), validates that the
result really is in the target language, and writes translation.<lang>.txt/.json/.srt/.vtt
beside the transcript. Several languages run at once, each with its own progress bar. Run the
same command again to resume: completed translations are never redone.

A translation whose transcript is not done yet waits for it while a transcription run is live
(or starting beside this one); when none is, the run ends and says that work is left (exit 3).

Exit codes: 0 all done, 1 some jobs failed, 2 usage/configuration/account error, 3 nothing failed but
translations wait for transcripts not done yet (run parallel_transcription.py, then this again),
130 interrupted.
"""

import logging

from pipeline import config
from pipeline.runner import StopSignal, add_run_arguments, connections_needed, report, run_plans
from pipeline.settings import Settings
from pipeline.stages import TranslationStage

log = logging.getLogger("verbatim.translation")


def build_parser():
    parser = config.make_parser(__doc__, "python parallel_translation.py --language en de he --workers 2")
    parser.add_argument("--language", nargs="+", metavar="CODE",
                        help="target language(s) (default: $VERBATIM_TARGET_LANGUAGES, else en de he)")
    add_run_arguments(parser, workers=2, batch_size=10)
    config.add_common_args(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.load(args)
    config.setup_logging(settings.debug, args.quiet)
    stage = TranslationStage(settings, args.language, provider=args.provider, model=args.model,
                             workers=args.workers)  # --language DE runs as "de"
    db = config.open_db(settings.db, must_exist=True, read_only=args.dry_run,
                        connections=connections_needed(stage.runner_threads()))
    try:
        if args.dry_run:
            return stage.dry_run(db, args.limit, args.json)
        stage.require_providers(db)
        stage.prepare_output_root(db, adopt=args.adopt_output_dir)
        stop = StopSignal()
        stop.install()
        plans = []
        for language in stage.languages:
            stage.prepare(db, language, retry_failed=args.retry_failed)
            plans.append(stage.plan(db, language, stop, batch_size=args.batch_size, limit=args.limit,
                                    lease_seconds=args.lease_seconds, quiet=args.quiet))
        return report(run_plans(db, plans, stop), stop, as_json=args.json)
    finally:
        db.close_all()


if __name__ == "__main__":
    config.run_main(main)
