"""The work function of each job kind: what one claimed job does, from its inputs to its staged
outputs. ``pipeline.stages`` builds them (with the provider, its request gate and the output root);
the runner calls one per job and records the ``Outcome``.
"""

from __future__ import annotations

import os

from db_manager import NO_SPEECH_NOTE, REVIEW_NOTE, TRANSCRIPTION, Job, Outcome, display_path
from pipeline import publish
from pipeline.errors import AccountError, PermanentError
from pipeline.faults import crash_point
from pipeline.limiter import RunRequests
from pipeline.media import still_registered_content
from pipeline.outputs import as_recorded, recorded_state, resolve_recorded, safe_join, sha256_file, staging_folder
from pipeline.runner import JobCalls
from pipeline.spool import Spool
from transcription import Transcript, transcribe_media, write_transcript_outputs
from translation import (TRANSLATORS, Translation, UnitBatch, load_source, needs_provider, translate_document,
                         write_translation_outputs)


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


def unexpected_language(language: str | None, expected: list[str] | None) -> bool:
    return bool(expected and language and language not in expected)


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


