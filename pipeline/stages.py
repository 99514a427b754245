"""One object per job kind that owns its wiring (style item 21): ``TranscriptionStage`` and
``TranslationStage``.

A stage knows, from the run's ``Settings`` and the flags of the command that runs it, its
provider choice, its provider's limiter (with an engine's own cap), its work function
(``pipeline.work``), its dry run, its output names and how a run of it is planned
(``runner.Plan``). Every entry point (``parallel_transcription.py``, ``parallel_translation.py``,
``tools/process.py``, ``tools/retry_failed_transcriptions.py``) builds its runs through a stage,
so a fix here lands in all of them at once.

Imports run one way: entry points -> stages -> {job store, runner, providers} -> small helpers;
nothing here imports a script.
"""

from __future__ import annotations

import json
import logging
import os

from db_manager import COMPLETED, DEFAULT_LEASE_SECONDS, NO_SPEECH_NOTE, TRANSCRIPTION, TRANSLATION
from pipeline.archive import prepare_output_root
from pipeline.config import EXIT_FAILED, EXIT_OK, ConfigError
from pipeline.limiter import RunRequests, limiter_for
from pipeline.outputs import keep_edits, resolve_recorded
from pipeline.runner import Plan, RunOptions, StopSignal, thread_count
from pipeline.settings import Settings
from pipeline.work import TranscriptionWork, TranslationWork
import transcription
import translation

log = logging.getLogger("verbatim.stages")


class _Stage:
    kind: str
    default_workers: int
    default_batch_size: int

    def __init__(self, settings: Settings, *, provider: str | None = None, model: str | None = None,
                 workers: int | None = None):
        self.settings = settings
        self.provider_name = provider
        self.model = model
        self.workers = workers or self.default_workers

    def runner_threads(self) -> list[int]:
        """Worker threads of each runner this stage starts (at most: a provider may allow fewer)."""
        return [thread_count(self.workers)]

    def prepare_output_root(self, db, *, adopt: bool = False) -> str:
        """The output folder is writable and this database's, or nothing runs (ConfigError)."""
        prepare_output_root(db, self.settings.output_dir, adopt=adopt)
        return self.settings.output_dir

    def _options(self, language: str, *, workers: int, batch_size: int | None, limit: int | None,
                 lease_seconds: float, quiet: bool, label: str, follow=None) -> RunOptions:
        return RunOptions(self.kind, language, workers=workers, threads=thread_count(workers),
                          batch_size=batch_size or self.default_batch_size, limit=limit,
                          lease_seconds=lease_seconds, label=label, quiet=quiet,
                          output_root=self.settings.output_dir, follow=follow,
                          retry_base_seconds=self.settings.retry_base_seconds,
                          retry_cap_seconds=self.settings.retry_cap_seconds)


class TranscriptionStage(_Stage):
    """Transcription: one job per file, against one speech-to-text provider.

    ``language`` (the spoken language hint) is normalised here (``DE`` -> ``de``); ``device`` and
    ``compute_type`` are for the local engine."""

    kind = TRANSCRIPTION
    label = "transcription"
    default_workers = 5
    default_batch_size = 20
    output_names = transcription.OUTPUT_NAMES

    def __init__(self, settings: Settings, *, provider: str | None = None, model: str | None = None,
                 workers: int | None = None, device: str | None = None, compute_type: str | None = None,
                 language: str | None = None, prompt: str | None = None):
        super().__init__(settings, provider=provider, model=model, workers=workers)
        self.device = device
        self.compute_type = compute_type
        self.language = settings.language(language)
        self.prompt = prompt
        self._transcriber = None

    @property
    def expected_languages(self) -> list[str] | None:
        expected = self.settings.expected_languages
        return list(expected) if expected else None

    def transcriber(self) -> transcription.Transcriber:
        """The provider (chosen once): ``--provider``, else the settings' choice; the spoken
        language checked against the model."""
        if self._transcriber is None:
            chosen = transcription.choose_transcriber(
                self.provider_name, self.settings.env, model=self.model, workers=self.workers, device=self.device,
                compute_type=self.compute_type)
            transcription.check_language(chosen, self.language)
            chosen.expected_languages = self.expected_languages  # a provider that can restrict detection does
            self._transcriber = chosen
        return self._transcriber

    def load(self) -> transcription.Transcriber:
        """The provider, ready (the local engine's model loaded) before any job is claimed."""
        chosen = self.transcriber()
        chosen.load()
        return chosen

    def limiter(self, transcriber=None):
        """The provider's shared limiter. A provider with parallelism of its own (the local engine's
        workers) sets the limiter's concurrency to exactly that."""
        transcriber = transcriber or self.transcriber()
        return limiter_for(transcriber.name, self.settings.limits(transcriber.name, cap=transcriber.max_concurrency))

    def plan(self, db, stop: StopSignal, *, batch_size: int | None = None, limit: int | None = None,
             lease_seconds: float = DEFAULT_LEASE_SECONDS, quiet: bool = False, label: str | None = None) -> Plan:
        """The stage as a runner plan (its limiter, work and options), for ``run_plans``; the
        provider is loaded first."""
        transcriber = self.load()
        limiter = self.limiter(transcriber)
        workers = min(self.workers, transcriber.max_concurrency or self.workers)  # no idle threads holding jobs
        work = TranscriptionWork(db, transcriber, RunRequests(limiter, workers, stop.stop), self.settings.output_dir,
                                 language=self.language, prompt=self.prompt,
                                 expected_languages=self.expected_languages)
        options = self._options("", workers=workers, batch_size=batch_size, limit=limit, lease_seconds=lease_seconds,
                                quiet=quiet, label=label or self.label)
        return Plan(options, work, limiter)

    def dry_run(self, db, limit, as_json: bool) -> int:
        """What would run: jobs, audio hours (probed locally where unknown), estimated cost."""
        from pipeline import config
        from pipeline.audio import probe

        transcriber = self.transcriber()
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
        cost = transcriber.estimate_cost(seconds, prompt=self.prompt)
        plan = {"jobs": len(rows), "audio_seconds": round(seconds, 1), "audio_hours": round(seconds / 3600, 3),
                "unknown_duration": unknown, "provider": transcriber.name, "model": transcriber.model,
                "estimated_cost_usd": round(cost, 4), "notes": transcriber.cost_notes(self.prompt)}
        if as_json:
            print(json.dumps(plan))
        else:
            print(f"would transcribe {plan['jobs']} file(s), {plan['audio_hours']:.2f} h of audio"
                  f"{f' ({unknown} of unknown length)' if unknown else ''} with {plan['provider']} {plan['model']},"
                  f" estimated cost ${cost or 0:.2f}" + "".join(f"; {note}" for note in plan["notes"]))
        return config.EXIT_OK


class TranslationStage(_Stage):
    """Translation: one job per file and target language; one runner per language."""

    kind = TRANSLATION
    default_workers = 2
    default_batch_size = 10

    def __init__(self, settings: Settings, languages=None, *, provider: str | None = None,
                 model: str | None = None, workers: int | None = None):
        super().__init__(settings, provider=provider, model=model, workers=workers)
        self.languages = settings.languages(languages)  # "DE" -> "de"; none given: the target languages
        self._translators: dict | None = None

    def runner_threads(self) -> list[int]:
        """One runner per language, each with its worker threads."""
        return [thread_count(self.workers)] * len(self.languages)

    @staticmethod
    def output_name(language: str, fmt: str) -> str:
        return translation.output_name(language, fmt)

    def provider_configured(self, language: str) -> bool:
        """Whether a provider is named or has a key for ``language`` (else only copies run)."""
        env = self.settings.env
        return bool(self.provider_name or env.get(f"VERBATIM_TRANSLATION_PROVIDER_{language.upper()}")
                    or env.get("VERBATIM_TRANSLATION_PROVIDER")
                    or any(env.get(cls.key_env_var) for cls in translation.TRANSLATORS.values()))

    def translator(self, language: str) -> translation.Translator:
        """``language``'s provider; refused (ConfigError) when none is configured."""
        return translation.choose_translator(language, self.provider_name, self.settings.env, model=self.model)

    def translators(self) -> dict:
        """language -> its translator, or None where no provider is configured (copies need none)."""
        if self._translators is None:
            self._translators = {lang: self.translator(lang) if self.provider_configured(lang) else None
                                 for lang in self.languages}
        return self._translators

    def require_providers(self, db, *, transcripts_to_come: bool = False, spoken: str | None = None) -> None:
        """Refuse to start (the usual "no provider configured" error) a language without a provider
        whose jobs need one: transcripts in another language, done or (``transcripts_to_come``) to come."""
        for language, translator in self.translators().items():
            if translator is None and (needing_provider(db, language, self.settings.output_dir)
                                       or (transcripts_to_come and spoken != language)):
                self.translator(language)  # raises

    def fallback(self, language: str, translator):
        return translation.choose_fallback(language, self.settings.env, translator.name) if translator else None

    def limiter(self, translator):
        name = translator.name if translator else "copy"
        return limiter_for(name, self.settings.limits(name))

    def prepare(self, db, language: str, *, retry_failed: bool = False) -> None:
        """Before a run of ``language``: its jobs exist, stale ones are queued again, failed ones
        reset when asked."""
        db.ensure_jobs(TRANSLATION, language)
        redo_stale(db, language, self.settings.output_dir)
        if retry_failed:
            log.info("reset %d failed %s job(s) for retry", len(db.reset_failed(TRANSLATION, language)), language)

    def plan(self, db, language: str, stop: StopSignal, *, translator=None, batch_size: int | None = None,
             limit: int | None = None, lease_seconds: float = DEFAULT_LEASE_SECONDS, quiet: bool = False,
             follow=None, label: str | None = None) -> Plan:
        """One language's run as a runner plan, for ``run_plans`` (``follow``: while transcripts are
        still to come). ``translator`` defaults to this stage's choice; None: only copies and empty
        transcripts run."""
        if translator is None:
            translator = self.translators().get(language)
        limiter = self.limiter(translator)
        work = TranslationWork(db, translator, self.fallback(language, translator),
                               RunRequests(limiter, self.workers, stop.stop), self.settings.output_dir, language)
        options = self._options(language, workers=self.workers, batch_size=batch_size, limit=limit,
                                lease_seconds=lease_seconds, quiet=quiet, label=label or f"translation {language}",
                                follow=follow)
        return Plan(options, work, limiter)

    def dry_run(self, db, limit, as_json: bool) -> int:
        """Characters that would be sent and their estimated cost, per language; no API call."""
        from pipeline import config

        plans = {}
        for language, translator in self.translators().items():
            eligible = [r for r in db.jobs(stage=TRANSLATION, language=language, status="not_started")
                        if _transcript_done(db, r["file_id"])][:limit]
            chars = sum(_transcript_chars(db, r["file_id"], self.settings.output_dir) for r in eligible)
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
                print(f"{language}: would translate {plan['jobs']} transcript(s), {plan['characters']:,} characters,"
                      f" {cost}")
        return config.EXIT_OK


def check_inputs(paths) -> None:
    """Every input must exist before anything is created (no empty database for a typo)."""
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise ConfigError("input not found: " + ", ".join(map(repr, missing)))


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
        return f"no media found in {where}{found}", EXIT_OK
    parts = [f"{counts.get('completed', 0)} completed"]
    if failed:
        parts.append(f"{failed} failed (use --retry-failed to try them again)")
    if counts.get("in_progress"):
        parts.append(f"{counts['in_progress']} in progress in another run")
    return ", ".join(parts), EXIT_FAILED if failed else EXIT_OK


def needing_provider(db, language: str, root: str) -> int:
    """Runnable ``language`` translations that need a provider: their transcript is in another (or an
    unknown) language. Read from each transcript.json's recorded language (under the output root
    ``root``), without detection."""
    count = 0
    for row in db.jobs(stage=TRANSLATION, language=language, status="not_started"):
        if not _transcript_done(db, row["file_id"]):
            continue
        transcript = db.jobs(stage=TRANSCRIPTION, file_id=row["file_id"])[0]
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


def _transcript_done(db, file_id) -> bool:
    rows = db.jobs(stage=TRANSCRIPTION, file_id=file_id)
    return bool(rows) and rows[0]["status"] == COMPLETED


def _transcript_chars(db, file_id, root: str) -> int:
    outputs = json.loads(db.jobs(stage=TRANSCRIPTION, file_id=file_id)[0]["outputs"] or "{}")
    try:
        return len(translation.load_source(resolve_recorded(root, outputs["json"]["path"])).text)
    except Exception:  # unreadable now: it will fail with a reason when it runs
        return 0
