#!/usr/bin/env python3
"""Make hand corrections the record: a transcript or translation edited by hand becomes the
version of record instead of being overwritten.

An archivist corrects transcript.txt, transcript.srt or transcript.vtt (or translation.<lang>.*)
in a text editor; tools/check_missing_transcripts.py then reports it as "edited". This tool, for
every completed job with such an edit:

  1. keeps the edited file as it is, as <name>.edited-<UTC time> beside it;
  2. reads the edit into the transcript (or translation): an .srt/.vtt edit gives the cues' text
     and timings; a .txt edit gives the text of each line (one per segment) or, when speakers are
     known, of each speaker turn, whose label may be renamed; timings are kept;
  3. writes every format again from it (txt, json, srt, vtt; the provider's raw answer stays);
  4. records the new files and their sha256 with the job, in the job's history.

A transcript's translations made from the old version are then stale: parallel_translation.py
redoes each once (a translation edited by hand is kept beside it first). To throw an edit away and
transcribe again instead, ask for it: --retranscribe FILE_ID (the edit is kept as above).

A dry run by default: lists what it would adopt, ending with "would adopt N"; --apply adopts.

Exit codes: 0 done (or listed), 1 an edit could not be adopted (the reason is printed; nothing of
that job changed), 2 usage or configuration error.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from db_manager import COMPLETED, TRANSCRIPTION
from pipeline import config, publish
from pipeline.outputs import as_recorded, keep_edits, resolve_recorded, safe_join
from pipeline.settings import Settings
from pipeline.subtitles import parse_srt, parse_vtt
from tools.check_missing_transcripts import EDITABLE_FORMATS, verify_recorded
from transcription import Segment, Transcript, write_transcript_outputs
from translation import Translation, Unit, write_translation_outputs

log = logging.getLogger("verbatim.adopt")
_MARKS = dict.fromkeys(map(ord, "\u200e\u200f\u202a\u202b\u202c\u202d\u202e"))  # bidi marks the writers add


class CannotAdopt(ValueError):
    """The edit cannot be read back into its document; the message says what to do instead."""


@dataclass
class Edit:
    job: object            # the job's row
    fmt: str               # the edited format
    path: str              # the edited file, under the output root in use

    @property
    def subject(self) -> str:
        row = self.job
        return f"job {row['id']} {row['file_id']} {row['stage']}" + (f" {row['language']}" if row["language"] else "")


# -- finding edits ---------------------------------------------------------------------------------
def find_edits(db, root: str, file_id: str | None = None) -> list[Edit]:
    """One ``Edit`` per completed job whose txt/srt/vtt differs from the record and still parses
    (with two edited formats of one job, both are returned: the caller refuses the conflict)."""
    edits = []
    for row in db.jobs(status=COMPLETED, file_id=file_id):
        for fmt, info in sorted(json.loads(row["outputs"] or "{}").items()):
            if fmt in EDITABLE_FORMATS and (verify_recorded(fmt, info, root) or ("",))[0] == "edited":
                edits.append(Edit(row, fmt, str(resolve_recorded(root, info["path"]))))
    return edits


# -- reading an edit back --------------------------------------------------------------------------
def _clean(text: str) -> str:
    return " ".join(text.translate(_MARKS).split())


def _cues(fmt: str, path: str):
    text = Path(path).read_text(encoding="utf-8")
    return parse_srt(text) if fmt == "srt" else parse_vtt(text)


def _speaker_at(segments: list[Segment], start: float, end: float) -> str | None:
    """The speaker of the old segment that overlaps [start, end] most (a re-cut cue keeps its voice)."""
    best, overlap = None, 0.0
    for segment in segments:
        shared = min(end, segment.end) - max(start, segment.start)
        if shared > overlap:
            best, overlap = segment.speaker, shared
    return best


def transcript_from_edit(old: Transcript, fmt: str, path: str) -> Transcript:
    if fmt in ("srt", "vtt"):
        segments = [Segment(c.start, c.end, _clean(c.text), _speaker_at(old.segments, c.start, c.end))
                    for c in _cues(fmt, path)]
    else:
        segments = _segments_from_txt(old, Path(path).read_text(encoding="utf-8"))
    text = " ".join(s.text for s in segments if s.text) if segments else _clean(Path(path).read_text(encoding="utf-8"))
    return Transcript(text=text, segments=segments, language=old.language, duration=old.duration,
                      provider=old.provider, model=old.model, usage=old.usage, has_timestamps=old.has_timestamps,
                      note="hand correction adopted", raw_responses=old.raw_responses)


def _segments_from_txt(old: Transcript, text: str) -> list[Segment]:
    if not old.segments:
        return []
    if not any(s.speaker for s in old.segments):
        lines = [_clean(line) for line in text.splitlines() if line.strip()]
        if len(lines) != len(old.segments):
            raise CannotAdopt(f"the edited text has {len(lines)} lines for {len(old.segments)} segments: edit the"
                              " .srt or .vtt to change where segments begin and end")
        return [Segment(s.start, s.end, line, s.speaker) for s, line in zip(old.segments, lines)]
    turns = _turns(old.segments)
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    if len(paragraphs) != len(turns):
        raise CannotAdopt(f"the edited text has {len(paragraphs)} speaker turns for {len(turns)}: edit the .srt"
                          " or .vtt to change where turns begin and end")
    segments = []
    for turn, paragraph in zip(turns, paragraphs):
        label, sep, said = _clean(paragraph).partition(": ")
        speaker, words = (label, said) if sep and turn[0].speaker else (turn[0].speaker, _clean(paragraph))
        # a turn is one segment from its first start to its last end: its words can no longer
        # be placed on the old segments inside it
        segments.append(Segment(turn[0].start, turn[-1].end, words, speaker))
    return segments


def _turns(segments: list[Segment]) -> list[list[Segment]]:
    turns: list[list[Segment]] = []
    for segment in segments:
        if turns and turns[-1][0].speaker == segment.speaker:
            turns[-1].append(segment)
        else:
            turns.append([segment])
    return turns


def translation_from_edit(doc: dict, fmt: str, path: str) -> Translation:
    units = [Unit(str(s.get("text") or ""), s.get("start"), s.get("end"), s.get("speaker")) for s in doc["segments"]]
    if fmt in ("srt", "vtt"):
        cues = _cues(fmt, path)
        if len(cues) != len(units):
            raise CannotAdopt(f"the edited subtitles have {len(cues)} cues for {len(units)}: a translation keeps"
                              " the transcript's cues; change the words only")
        texts = [_clean(c.text) for c in cues]
    else:
        lines = [_clean(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        spoken = [u for u in units if u.text]
        if len(lines) != len(spoken):
            raise CannotAdopt(f"the edited text has {len(lines)} lines for {len(spoken)}: one line per cue")
        by_unit = iter(lines)
        texts = [_strip_label(next(by_unit), u.speaker) if u.text else "" for u in units]
    new_units = [Unit(text, u.start, u.end, u.speaker) for u, text in zip(units, texts)]
    return Translation(units=new_units, text="\n".join(t for t in texts if t), source_language=doc.get("source_language"),
                       language=doc["language"], provider=doc.get("provider") or "", model=doc.get("model"),
                       usage=doc.get("usage") or {}, cost=doc.get("cost") or 0.0,
                       has_timestamps=bool(doc.get("has_timestamps")), kept_units=doc.get("kept_units") or 0,
                       source_sha256=doc.get("source_sha256"))


def _strip_label(line: str, speaker: str | None) -> str:
    prefix = f"{speaker}: " if speaker else ""
    return line[len(prefix):] if prefix and line.startswith(prefix) else line


# -- adopting ------------------------------------------------------------------------------------------
def adopt(db, root: str, edit: Edit) -> list[str]:
    """Make ``edit`` the record of its job; returns the copies kept of the edited files."""
    row = edit.job
    outputs = json.loads(row["outputs"])
    doc = json.loads(resolve_recorded(root, outputs["json"]["path"]).read_text(encoding="utf-8"))
    folder = safe_join(root, row["folder"])
    if row["stage"] == TRANSCRIPTION:
        raw = resolve_recorded(root, outputs["raw"]["path"]).read_bytes() if "raw" in outputs else None
        old = Transcript.from_dict({**doc, "raw_responses": json.loads(gzip.decompress(raw)) if raw else []})
        new = transcript_from_edit(old, edit.fmt, edit.path)
        kept = keep_edits(outputs, root)
        written = as_recorded(write_transcript_outputs(new, folder, root=root))
    else:
        new = translation_from_edit(doc, edit.fmt, edit.path)
        kept = keep_edits(outputs, root)
        written = as_recorded(write_translation_outputs(new, folder, root=root))
    note = f"hand correction adopted from {Path(edit.path).name} (kept as {', '.join(Path(k).name for k in kept)})"
    if not db.record_edit(row["id"], written, outputs, note):
        raise CannotAdopt("the job changed while the edit was read; run the tool again")
    return kept


def retranscribe(db, root: str, file_id: str) -> int:
    """Throw the transcript of record away (edits kept first) and put the file back in the queue."""
    rows = db.jobs(stage=TRANSCRIPTION, file_id=file_id)
    if not rows:
        raise config.ConfigError(f"no file {file_id!r} in the database")
    kept = keep_edits(json.loads(rows[0]["outputs"] or "{}"), root)
    for copy in kept:
        print(f"kept {copy}")
    return db.reset([rows[0]["id"]], "re-transcription asked for (tools/adopt_edits.py --retranscribe)",
                    reset_attempts=True)


def build_parser():
    parser = config.make_parser(__doc__, "python tools/adopt_edits.py --db archive.db --output-dir output --apply")
    parser.add_argument("--apply", action="store_true", help="adopt the edits (default: only list them)")
    parser.add_argument("--file", metavar="FILE_ID", help="only this file's jobs")
    parser.add_argument("--retranscribe", metavar="FILE_ID",
                        help="instead: keep the edits aside and transcribe this file again")
    config.add_common_args(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.load(args)
    config.setup_logging(settings.debug)
    db = config.open_db(settings.db, must_exist=True)
    root = settings.output_dir
    try:
        if args.retranscribe:
            done = retranscribe(db, root, args.retranscribe)
            print(f"{args.retranscribe}: {'queued for transcription' if done else 'nothing to reset'}")
            return config.EXIT_OK
        publish.settle_quietly(db, root)
        return _adopt_all(db, root, find_edits(db, root, args.file), args.apply)
    finally:
        db.close_all()


def _adopt_all(db, root: str, edits: list[Edit], apply: bool) -> int:
    by_job: dict[int, list[Edit]] = {}
    for edit in edits:
        by_job.setdefault(edit.job["id"], []).append(edit)
    adopted, failed = 0, 0
    for job_edits in by_job.values():
        edit = job_edits[0]
        if len(job_edits) > 1:
            names = " and ".join(Path(e.path).name for e in job_edits)
            print(f"cannot adopt {edit.subject}: {names} were both edited; keep one edit (restore the other"
                  " from its recorded version) and run again")
            failed += 1
            continue
        if not apply:
            print(f"adopt    {edit.subject}  {Path(edit.path).name}")
            adopted += 1
            continue
        try:
            adopt(db, root, edit)
        except (CannotAdopt, ValueError, OSError, KeyError) as exc:
            print(f"cannot adopt {edit.subject} from {Path(edit.path).name}: {exc}")
            failed += 1
            continue
        print(f"adopted  {edit.subject}  {Path(edit.path).name}")
        adopted += 1
    stale = len(db.stale_translations())
    if apply and stale:
        print(f"{stale} translation(s) are now stale: parallel_translation.py redoes them")
    print(f"adopted {adopted}" if apply else f"would adopt {adopted}")
    return config.EXIT_FAILED if failed else config.EXIT_OK


if __name__ == "__main__":
    config.run_main(main)
