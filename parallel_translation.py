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

import json
import logging
import os

from db_manager import COMPLETED, DEFAULT_LEASE_SECONDS, NO_SPEECH_NOTE, REVIEW_NOTE, TRANSCRIPTION, TRANSLATION, Job, Outcome
from pipeline import config
from pipeline.archive import prepare_output_root
from pipeline.errors import AccountError, PermanentError
from pipeline.faults import crash_point
from pipeline.limiter import RunRequests, limiter_for
from pipeline import publish
from pipeline.outputs import (as_recorded, keep_edits, recorded_state, resolve_recorded, safe_join, sha256_file,
                              staging_folder)
from pipeline.runner import JobCalls, Plan, RunOptions, StopSignal, add_run_arguments, report, run_plans, thread_count
from pipeline.spool import Spool
from translation import (TRANSLATORS, Translation, UnitBatch, choose_fallback, choose_translator, load_source,
                         needs_provider, translate_document, write_translation_outputs)

log = logging.getLogger("verbatim.translation")


def _spooled_batch(answer):
    """A batch's answer as spooled; a unit mismatch is split and asked again, never kept."""
    return {"texts": answer.texts, "usage": answer.usage} if isinstance(answer, UnitBatch) else None


class TranslationWork:
    """One job: load the recorded transcript, translate and validate it (every answer spooled),
    write the outputs into the attempt's staging folder; the runner publishes them once committed."""

    def __init__(self, db, translator, fallback, call: RunRequests, output_root: str, language: str):
        self.db = db
        self.translator = translator
        self.fallback = fallback
        self.call = call
        self.output_root = output_root
        self.language = language
        self.spool = Spool(output_root)

    def __call__(self, job: Job) -> Outcome:
        self._not_under_review(job)
        source = load_source(self._transcript_path(job))
        if not source.text.strip():
            return self._no_speech(job, source)
        if self.translator is None and needs_provider(source, self.language):
            # Only copies could run without a provider; this one needs translating: stop the run
            # (every held job goes back, none is failed), as a missing key at start would.
            raise AccountError(f"no translation provider configured for {self.language}, and file {job.file_id} "
                               f"needs translating: {NO_PROVIDER_HINT}", error_class="no_provider")
        calls = JobCalls(self.call, self.spool, job, encode=_spooled_batch, decode=lambda d: UnitBatch(**d))
        translation = translate_document(source, self.language, self.translator, fallback=self.fallback,
                                         call=calls)
        translation.source_sha256 = _source_sha(job)
        crash_point("after_api")
        staged = staging_folder(self.output_root, job.id, job.claim)
        written = write_translation_outputs(translation, safe_join(self.output_root, job.folder),
                                            root=self.output_root, staging=staged)
        return Outcome(outputs=as_recorded(written), provider=translation.provider, model=translation.model,
                       characters=translation.usage.get("characters"), tokens=translation.usage.get("tokens"),
                       cost=translation.cost, staged=str(staged), source_sha256=translation.source_sha256)

    def _no_speech(self, job: Job, source) -> Outcome:
        """A transcript without text: an empty translation, noted, made without any provider (there is
        nothing to send, and a provider would be asked to translate nothing)."""
        empty = Translation(units=[], text="", source_language=source.language, language=self.language,
                            provider=None, model=None, usage={}, cost=0.0, has_timestamps=source.has_timestamps,
                            kept_units=0, source_sha256=_source_sha(job))
        staged = staging_folder(self.output_root, job.id, job.claim)
        written = write_translation_outputs(empty, safe_join(self.output_root, job.folder), root=self.output_root,
                                            staging=staged)
        return Outcome(outputs=as_recorded(written), cost=0.0, note=NO_SPEECH_NOTE, staged=str(staged),
                       source_sha256=empty.source_sha256)

    def _not_under_review(self, job: Job) -> None:
        """A transcript heard in a language the archive does not expect is never translated as if
        it were right: the job fails with the reason until the transcript is redone."""
        note = (self.db.jobs(stage=TRANSCRIPTION, file_id=job.file_id) or [{"note": None}])[0]["note"]
        if note and note.startswith(REVIEW_NOTE):
            raise PermanentError(f"not translated: the transcript is marked for review ({note}); redo it, then"
                                 " run parallel_translation.py --retry-failed", error_class="language_review")

    def _transcript_path(self, job: Job) -> str:
        """The transcript this job's transcription recorded, under this run's output root, verified
        against its recorded hash.
        A transcript committed a moment ago by another process may still be staged: finish its
        publication before calling it missing or changed."""
        recorded = job.outputs.get("json") or job.outputs.get("txt")
        if not recorded:
            raise PermanentError("the transcription job recorded no transcript output",
                                 error_class="transcript_missing")
        path = str(resolve_recorded(self.output_root, recorded["path"]))
        if recorded_state(recorded, self.output_root) != "same" and job.transcript_job is not None:
            publish.settle(self.db, self.output_root, job.transcript_job)
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            raise PermanentError(f"transcript missing: {path}", error_class="transcript_missing") from None
        if actual != recorded["sha256"]:
            raise PermanentError(f"transcript changed since it was recorded: {path}",
                                 error_class="transcript_changed")
        return path


def _source_sha(job: Job) -> str:
    """The sha256 of the transcript a translation is made from (its json, as the stale check reads)."""
    return (job.outputs.get("json") or job.outputs.get("txt"))["sha256"]


NO_PROVIDER_HINT = ("set one of " + ", ".join(cls.key_env_var for cls in TRANSLATORS.values())
                    + " (and optionally VERBATIM_TRANSLATION_PROVIDER)")


def provider_configured(language: str, name: str | None, env) -> bool:
    """Whether a translation provider is named or has a key for ``language`` (else only copies run)."""
    return bool(name or env.get(f"VERBATIM_TRANSLATION_PROVIDER_{language.upper()}")
                or env.get("VERBATIM_TRANSLATION_PROVIDER")
                or any(env.get(cls.key_env_var) for cls in TRANSLATORS.values()))


def translators_for(languages, name: str | None, model: str | None, env) -> dict:
    """language -> its translator, or None where no provider is configured (copies need none)."""
    return {lang: choose_translator(lang, name, env, model=model) if provider_configured(lang, name, env) else None
            for lang in languages}


def needing_provider(db, language: str, root: str) -> int:
    """Runnable ``language`` translations that need a provider: their transcript is in another (or an
    unknown) language. Read from each transcript.json's recorded language (under the output root
    ``root``), without detection."""
    count = 0
    for row in db.jobs(stage=TRANSLATION, language=language, status="not_started"):
        if not _transcript_done(db, row["file_id"]):
            continue
        transcript = db.jobs(stage="transcription", file_id=row["file_id"])[0]
        if transcript["note"] == NO_SPEECH_NOTE:
            continue
        try:
            path = resolve_recorded(root, json.loads(transcript["outputs"] or "{}")["json"]["path"])
            with open(path, encoding="utf-8") as handle:
                spoken = json.load(handle).get("language")
        except (OSError, KeyError, ValueError, AttributeError):
            spoken = None
        count += spoken != language
    return count


def build_parser():
    parser = config.make_parser(__doc__, "python parallel_translation.py --language en de he --workers 2")
    parser.add_argument("--language", nargs="+", metavar="CODE",
                        help="target language(s) (default: $VERBATIM_TARGET_LANGUAGES, else en de he)")
    add_run_arguments(parser, workers=2, batch_size=10)
    config.add_common_args(parser)
    return parser


def translation_plan(db, language: str, translator, stop: StopSignal, *, output_root: str, workers: int,
                     batch_size: int, limit: int | None = None, lease_seconds: float = DEFAULT_LEASE_SECONDS,
                     quiet: bool = False, follow=None) -> Plan:
    """One language's translation stage as a runner plan, for ``run_plans`` (this script runs one per
    language; ``tools/process.py`` runs them beside the transcription, ``follow`` saying while
    transcripts are still to come). ``translator`` None: only copies and empty transcripts run."""
    limiter = limiter_for(translator.name if translator else "copy")
    fallback = choose_fallback(language, os.environ, translator.name) if translator else None
    work = TranslationWork(db, translator, fallback, RunRequests(limiter, workers, stop.stop), output_root, language)
    options = RunOptions(TRANSLATION, language, workers=workers, threads=thread_count(workers), batch_size=batch_size,
                         limit=limit, lease_seconds=lease_seconds, label=f"translation {language}", quiet=quiet,
                         output_root=output_root, follow=follow)
    return Plan(options, work, limiter)


def dry_run(db, translators: dict, limit, as_json: bool, root: str) -> int:
    """Characters that would be sent and their estimated cost, per language; no API call."""
    plans = {}
    for language, translator in translators.items():
        eligible = [r for r in db.jobs(stage=TRANSLATION, language=language, status="not_started")
                    if _transcript_done(db, r["file_id"])][:limit]
        chars = sum(_transcript_chars(db, r["file_id"], root) for r in eligible)
        usage = {"characters": chars, "prompt_tokens": chars // 3, "completion_tokens": chars // 3}
        plans[language] = {"jobs": len(eligible), "characters": chars,
                           "provider": translator.name if translator else None,
                           "model": translator.model if translator else None,
                           "estimated_cost_usd": round(translator.cost(usage), 4) if translator else None}
    if as_json:
        print(json.dumps(plans))
    else:
        for language, plan in plans.items():
            cost = (f"with {plan['provider']} {plan['model'] or ''}, estimated cost ${plan['estimated_cost_usd']:.2f}"
                    if plan["provider"] else "with no provider configured (cost unknown; copies of transcripts"
                                             f" already in {language} need none)")
            print(f"{language}: would translate {plan['jobs']} transcript(s), {plan['characters']:,} characters, {cost}")
    return config.EXIT_OK


def _transcript_done(db, file_id) -> bool:
    rows = db.jobs(stage="transcription", file_id=file_id)
    return bool(rows) and rows[0]["status"] == COMPLETED


def _transcript_chars(db, file_id, root: str) -> int:
    outputs = json.loads(db.jobs(stage="transcription", file_id=file_id)[0]["outputs"] or "{}")
    try:
        return len(load_source(resolve_recorded(root, outputs["json"]["path"])).text)
    except Exception:  # unreadable now: it will fail with a reason when it runs
        return 0


def redo_stale(db, language: str, root: str) -> int:
    """Translations whose transcript changed since (redone, or a hand correction adopted) go back
    to the queue, once per change: the new translation records the new transcript. A translation
    edited by hand is kept beside it (``.edited-<time>``) before it is redone."""
    stale = db.stale_translations(language)
    for row in stale:
        for copy in keep_edits(json.loads(row["outputs"]), root):
            log.warning("kept the hand-edited %s before redoing its stale translation", copy)
    redone = db.reset_stale([row["id"] for row in stale])
    if redone:
        log.info("%d %s translation(s) are redone: their transcript changed since", redone, language)
    return redone


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config.load_env(args.env_file)
    config.setup_logging(args.verbose, args.quiet)
    languages = config.parse_languages(args.language) if args.language else config.target_languages()
    db = config.open_db(config.db_path(args), must_exist=True, read_only=args.dry_run)
    try:
        translators = translators_for(languages, args.provider, args.model, os.environ)
        if args.dry_run:
            return dry_run(db, translators, args.limit, args.json, config.output_dir(args))
        for language, translator in translators.items():
            if translator is None and needing_provider(db, language, config.output_dir(args)):
                choose_translator(language, None, os.environ)  # raises the usual "no provider configured" error
        prepare_output_root(db, config.output_dir(args), adopt=args.adopt_output_dir)
        stop = StopSignal()
        stop.install()
        plans = []
        for language, translator in translators.items():
            db.ensure_jobs(TRANSLATION, language)
            redo_stale(db, language, config.output_dir(args))
            if args.retry_failed:
                log.info("reset %d failed %s job(s) for retry", len(db.reset_failed(TRANSLATION, language)), language)
            plans.append(translation_plan(db, language, translator, stop, output_root=config.output_dir(args),
                                          workers=args.workers, batch_size=args.batch_size, limit=args.limit,
                                          lease_seconds=args.lease_seconds, quiet=args.quiet))
        return report(run_plans(db, plans, stop), stop, as_json=args.json)
    finally:
        db.close_all()


if __name__ == "__main__":
    config.run_main(main)
