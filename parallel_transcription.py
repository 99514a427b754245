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
import os
import sys

from db_manager import DEFAULT_LEASE_SECONDS, NO_SPEECH_NOTE, REVIEW_NOTE, TRANSCRIPTION, Job, Outcome, display_path
from pipeline import config
from pipeline.archive import prepare_output_root
from pipeline.errors import PermanentError
from pipeline.faults import crash_point
from pipeline.limiter import RunRequests, limiter_for
from pipeline.liveruns import LiveRun
from pipeline.media import describe, register_inputs, still_registered_content
from pipeline.outputs import as_recorded, safe_join, staging_folder
from pipeline.runner import JobCalls, Plan, RunOptions, StopSignal, add_run_arguments, report, run_plans, thread_count
from pipeline.spool import Spool
from transcription import (Transcript, add_local_arguments, check_language, choose_transcriber,
                           transcribe_media, write_transcript_outputs)

log = logging.getLogger("verbatim.transcription")


class TranscriptionWork:
    """One job: find the media, transcribe it (through the shared limiter, every answer spooled),
    write the outputs into the attempt's staging folder; the runner publishes them once committed."""

    def __init__(self, db, transcriber, call: RunRequests, output_root: str, *,
                 language: str | None = None, prompt: str | None = None, expected_languages: list[str] | None = None):
        self.db = db
        self.expected_languages = expected_languages
        self.transcriber = transcriber
        self.call = call
        self.output_root = output_root
        self.language = language
        self.prompt = prompt
        self.spool = Spool(output_root)

    def __call__(self, job: Job) -> Outcome:
        media = self._media_path(job)
        calls = JobCalls(self.call, self.spool, job, encode=lambda t: t.to_dict(raw=True), decode=Transcript.from_dict)
        transcript = transcribe_media(media, self.transcriber, language=self.language, prompt=self.prompt,
                                      call=calls, content_id=job.file_id)
        crash_point("after_api")
        if not transcript.text.strip():  # silence, or a provider that heard no words: say so
            transcript.note = NO_SPEECH_NOTE
        elif unexpected_language(transcript.language, self.expected_languages):
            # Kept (it was paid for) but marked: a German interview heard as Latin is nonsense.
            transcript.note = (f"{REVIEW_NOTE} {transcript.language}, not one of {', '.join(self.expected_languages)}:"
                               " transcribe again with --language, or add it to VERBATIM_LANGUAGES")
        staged = staging_folder(self.output_root, job.id, job.claim)
        written = write_transcript_outputs(transcript, safe_join(self.output_root, job.folder), root=self.output_root,
                                           staging=staged)
        seconds = transcript.usage.get("audio_seconds") or transcript.duration or 0.0
        return Outcome(outputs=as_recorded(written), provider=transcript.provider, model=transcript.model,
                       audio_seconds=seconds, tokens=transcript.usage.get("tokens"),
                       cost=self.transcriber.estimate_cost(seconds), note=transcript.note,
                       duration=transcript.duration, source_language=transcript.language, staged=str(staged))

    def _media_path(self, job: Job) -> str:
        """The registered path, or another path where the same content was seen, that still holds
        this job's content: a recording replaced since registration is never sent as the old one."""
        replaced = []
        for path in dict.fromkeys([job.media_path, *self.db.paths_of(job.file_id)]):
            if not os.path.isfile(path):
                continue
            if still_registered_content(self.db, job.file_id, path):
                return path
            replaced.append(display_path(path))
        if replaced:
            raise PermanentError(f"media changed after registration: {', '.join(replaced)} now holds other content"
                                 " (registered as a new file); nothing was sent for this one",
                                 error_class="media_changed")
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


def unexpected_language(language: str | None, expected: list[str] | None) -> bool:
    return bool(expected and language and language not in expected)


def transcription_plan(db, transcriber, stop: StopSignal, *, output_root: str, workers: int, batch_size: int,
                       limit: int | None = None, lease_seconds: float = DEFAULT_LEASE_SECONDS, quiet: bool = False,
                       language: str | None = None, prompt: str | None = None,
                       expected_languages: list[str] | None = None) -> Plan:
    """The transcription stage as a runner plan (its limiter, work and options), for ``run_plans``:
    this script runs it alone, ``tools/process.py`` beside the translation plans."""
    limiter = provider_limiter(transcriber)
    workers = min(workers, transcriber.max_concurrency or workers)  # no idle threads holding jobs
    work = TranscriptionWork(db, transcriber, RunRequests(limiter, workers, stop.stop), output_root,
                             language=language, prompt=prompt, expected_languages=expected_languages)
    transcriber.expected_languages = expected_languages  # a provider that can restrict detection does
    options = RunOptions(TRANSCRIPTION, "", workers=workers, threads=thread_count(workers), batch_size=batch_size,
                         limit=limit, lease_seconds=lease_seconds, label="transcription", quiet=quiet,
                         output_root=output_root)
    return Plan(options, work, limiter)


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
        print(json.dumps(plan))
    else:
        print(f"would transcribe {plan['jobs']} file(s), {plan['audio_hours']:.2f} h of audio"
              f"{f' ({unknown} of unknown length)' if unknown else ''} with {plan['provider']} {plan['model']},"
              f" estimated cost ${cost or 0:.2f}" + "".join(f"; {note}" for note in plan["notes"]))
    return config.EXIT_OK


def check_inputs(paths) -> None:
    """Every input must exist before anything is created (no empty database for a typo)."""
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise config.ConfigError("input not found: " + ", ".join(map(repr, missing)))


def nothing_to_do(db, inputs, scan, retry_failed: bool) -> tuple[str, int] | None:
    """(why, exit code) when no transcription job would run; None when there is work. Jobs of runs
    that died are taken back first, as a run would."""
    db.reclaim()
    pending, _ = db.pending(TRANSCRIPTION)
    counts = db.counts().get((TRANSCRIPTION, ""), {})
    failed = counts.get("failed", 0)
    if pending or (retry_failed and failed):
        return None
    if not sum(counts.values()):
        where = ", ".join(inputs) if inputs else "the database (pass --input PATH)"
        found = f" ({scan.skipped_not_media} non-media and {scan.skipped_hidden} hidden skipped)" if scan else ""
        return f"no media found in {where}{found}", config.EXIT_OK
    parts = [f"{counts.get('completed', 0)} completed"]
    if failed:
        parts.append(f"{failed} failed (use --retry-failed to try them again)")
    if counts.get("in_progress"):
        parts.append(f"{counts['in_progress']} in progress in another run")
    return ", ".join(parts), config.EXIT_FAILED if failed else config.EXIT_OK


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config.load_env(args.env_file)
    config.setup_logging(args.verbose, args.quiet)
    if args.language:  # validated and sent as the code it is ("DE" -> "de"), never as typed
        args.language = config.parse_languages([args.language])[0]
    check_inputs(args.input)
    # A dry run that registers nothing only reads: it works on a read-only database too.
    db = config.open_db(config.db_path(args), read_only=args.dry_run and not args.input,
                        must_exist=args.dry_run and not args.input)
    live = None if args.dry_run else LiveRun(db, TRANSCRIPTION).start()  # translation runs follow it
    try:
        scan = None
        if args.input:
            scan = register_inputs(db, args.input, config.target_languages())
            print(describe(scan), file=sys.stderr)
            if scan.missing_inputs:
                raise config.ConfigError("input not found: " + ", ".join(map(repr, scan.missing_inputs)))
        if not args.dry_run:  # the output folder is this database's and writable, or nothing runs
            prepare_output_root(db, config.output_dir(args), adopt=args.adopt_output_dir)
        idle = None if args.dry_run else nothing_to_do(db, args.input, scan, args.retry_failed)
        if idle:  # said before any provider is chosen or model loaded
            why, code = idle
            print(f"nothing to do: {why}", file=sys.stderr)
            if args.json:
                print(json.dumps({"exit_code": code, "nothing_to_do": why, "runs": []}))
            return code
        transcriber = choose_transcriber(args.provider, os.environ, model=args.model, workers=args.workers,
                                         device=args.device, compute_type=args.compute_type)
        check_language(transcriber, args.language)
        if args.dry_run:
            return dry_run(db, transcriber, args.limit, args.json, args.prompt)
        transcriber.load()
        if args.retry_failed:
            log.info("reset %d failed transcription job(s) for retry", len(db.reset_failed(TRANSCRIPTION)))
        stop = StopSignal()
        stop.install()
        plan = transcription_plan(db, transcriber, stop, output_root=config.output_dir(args), workers=args.workers,
                                  batch_size=args.batch_size, limit=args.limit, lease_seconds=args.lease_seconds,
                                  quiet=args.quiet, language=args.language, prompt=args.prompt,
                                  expected_languages=config.expected_languages())
        summaries = run_plans(db, [plan], stop)
        return report(summaries, stop, as_json=args.json)
    finally:
        if live is not None:
            live.stop()
        db.close_all()


if __name__ == "__main__":
    config.run_main(main)
