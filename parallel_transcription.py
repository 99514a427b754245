#!/usr/bin/env python3
"""Transcribe every registered interview in parallel, resumably.

Registers --input files and folders first (if given), then claims transcription jobs in batches
and runs them on --workers threads against the chosen speech-to-text provider. Every result is
written atomically under the output folder and recorded in the job database; an interrupted or
killed run is resumed by running the same command again: completed files are never sent twice.

Exit codes: 0 all done, 1 some jobs failed, 2 usage/configuration/account error, 130 interrupted.
"""

import logging
import os
import sys

from db_manager import TRANSCRIPTION, Job, Outcome
from pipeline import config
from pipeline.errors import PermanentError
from pipeline.faults import crash_point
from pipeline.limiter import RunRequests, limiter_for
from pipeline.media import describe, register_inputs
from pipeline.outputs import as_recorded, safe_join
from pipeline.runner import Plan, RunOptions, StopSignal, add_run_arguments, report, run_plans, thread_count
from transcription import add_local_arguments, choose_transcriber, transcribe_media, write_transcript_outputs

log = logging.getLogger("verbatim.transcription")


class TranscriptionWork:
    """One job: find the media, transcribe it (through the shared limiter), write the outputs."""

    def __init__(self, db, transcriber, call: RunRequests, output_root: str, *,
                 language: str | None = None, prompt: str | None = None):
        self.db = db
        self.transcriber = transcriber
        self.call = call
        self.output_root = output_root
        self.language = language
        self.prompt = prompt

    def __call__(self, job: Job) -> Outcome:
        media = self._media_path(job)
        transcript = transcribe_media(media, self.transcriber, language=self.language, prompt=self.prompt,
                                      call=self.call)
        crash_point("after_api")
        folder = safe_join(self.output_root, job.folder)
        written = write_transcript_outputs(transcript, folder, root=self.output_root)
        seconds = transcript.usage.get("audio_seconds") or transcript.duration or 0.0
        return Outcome(outputs=as_recorded(written), provider=transcript.provider, model=transcript.model,
                       audio_seconds=seconds, tokens=transcript.usage.get("tokens"),
                       cost=self.transcriber.estimate_cost(seconds), note=transcript.note,
                       duration=transcript.duration, source_language=transcript.language)

    def _media_path(self, job: Job) -> str:
        """The registered path, or another path where the same content was seen."""
        for path in [job.media_path, *self.db.paths_of(job.file_id)]:
            if os.path.isfile(path):
                return path
        raise PermanentError(f"media file no longer exists: {os.fsencode(job.media_path)!r}",
                             error_class="missing_media")


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


def provider_limiter(transcriber):
    """The provider's shared limiter. A provider with parallelism of its own (the local engine's
    workers) sets the limiter's concurrency to exactly that."""
    env = os.environ
    if transcriber.max_concurrency:
        env = {**os.environ, f"VERBATIM_{transcriber.name.upper()}_MAX_CONCURRENCY": str(transcriber.max_concurrency)}
    return limiter_for(transcriber.name, env)


def dry_run(db, transcriber, limit, as_json: bool, prompt: str | None = None) -> int:
    """What would run: jobs, audio hours (probed locally where unknown), estimated cost."""
    from pipeline.audio import probe

    rows = [r for r in db.jobs(stage=TRANSCRIPTION, status="not_started")][:limit]
    seconds, unknown = 0.0, 0
    for row in rows:
        duration = row["duration"]
        if duration is None:
            try:
                duration = probe(os.fsdecode(bytes(row["path_bytes"]))).duration
            except Exception:  # unreadable now: it will fail with a reason when it runs
                duration = None
        if duration is None:
            unknown += 1
        else:
            seconds += duration
    cost = transcriber.estimate_cost(seconds, prompt=prompt) if transcriber else None
    plan = {"jobs": len(rows), "audio_seconds": round(seconds, 1), "audio_hours": round(seconds / 3600, 3),
            "unknown_duration": unknown,
            "provider": getattr(transcriber, "name", None), "model": getattr(transcriber, "model", None),
            "estimated_cost_usd": None if cost is None else round(cost, 4),
            "notes": transcriber.cost_notes(prompt) if transcriber else []}
    if as_json:
        import json
        print(json.dumps(plan))
    else:
        print(f"would transcribe {plan['jobs']} file(s), {plan['audio_hours']:.2f} h of audio"
              f"{f' ({unknown} of unknown length)' if unknown else ''} with {plan['provider']} {plan['model']},"
              f" estimated cost ${cost or 0:.2f}" + "".join(f"; {note}" for note in plan["notes"]))
    return config.EXIT_OK


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config.load_env(args.env_file)
    config.setup_logging(args.verbose, args.quiet)
    if args.language:
        config.parse_languages([args.language])
    db = config.open_db(config.db_path(args))
    try:
        if args.input:
            scan = register_inputs(db, args.input, config.target_languages())
            print(describe(scan), file=sys.stderr)
            if scan.missing_inputs:
                raise config.ConfigError("input not found: " + ", ".join(map(repr, scan.missing_inputs)))
        transcriber = choose_transcriber(args.provider, os.environ, model=args.model, workers=args.workers,
                                         device=args.device, compute_type=args.compute_type)
        if args.dry_run:
            return dry_run(db, transcriber, args.limit, args.json, args.prompt)
        transcriber.load()
        if args.retry_failed:
            log.info("reset %d failed transcription job(s) for retry", len(db.reset_failed(TRANSCRIPTION)))
        limiter = provider_limiter(transcriber)
        workers = min(args.workers, transcriber.max_concurrency or args.workers)  # no idle threads holding jobs
        stop = StopSignal()
        stop.install()
        work = TranscriptionWork(db, transcriber, RunRequests(limiter, workers, stop.stop),
                                 config.output_dir(args), language=args.language, prompt=args.prompt)
        options = RunOptions(TRANSCRIPTION, "", workers=workers, threads=thread_count(workers),
                             batch_size=args.batch_size,
                             limit=args.limit, lease_seconds=args.lease_seconds, label="transcription",
                             quiet=args.quiet)
        summaries = run_plans(db, [Plan(options, work, limiter)], stop)
        return report(summaries, stop, as_json=args.json)
    finally:
        db.close_all()


if __name__ == "__main__":
    config.run_main(main)
