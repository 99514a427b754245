"""Finding audio and video files and registering them in the job store.

A scan walks files and folders recursively, skipping hidden entries, non-media and media names
that are not regular files (a FIFO or a device would block hashing for ever; all counted). A
file whose path, size and mtime are already known is not hashed again, so a rescan of a large
archive costs one ``stat`` per file. New or changed files are hashed (sha256, read in
1 MiB blocks) and registered; the same content at a second path is recorded as a second path of
the same file, never as a second file.
"""

from __future__ import annotations

import logging
import os
import stat as stat_module
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from db_manager import DatabaseManager, MediaRecord, display_path, path_to_bytes
from pipeline.errors import PermanentError
from pipeline.outputs import sha256_file

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = {".wav", ".mp3", ".m4a", ".aac", ".flac", ".ogg", ".oga", ".opus", ".wma", ".aif",
                    ".aiff", ".amr"}
VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".3gp",
                    ".mts", ".ts", ".flv"}
_HASH_THREADS = 4  # hashing is I/O bound; a few threads overlap reads on slow disks


@dataclass
class ScanReport:
    found: int = 0
    hashed: int = 0
    unchanged: int = 0
    skipped_hidden: int = 0
    skipped_not_media: int = 0
    skipped_not_regular: int = 0
    unreadable: list = field(default_factory=list)
    new_files: int = 0
    duplicates: int = 0
    missing_inputs: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: (len(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


def media_type(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    if ext in AUDIO_EXTENSIONS:
        return "audio"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None


def is_regular_file(path) -> bool:
    """True for a regular file (through symlinks). A FIFO, a device or a socket is never media:
    opening or reading one blocks or never ends."""
    try:
        return stat_module.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _media_file(path: str, report: ScanReport) -> bool:
    """Whether ``path`` (found by name) is a media file to register; counts why not."""
    if not media_type(path):
        report.skipped_not_media += 1
        return False
    if os.path.exists(path) and not is_regular_file(path):
        report.skipped_not_regular += 1
        log.warning("skipped %s: not a regular file", display_path(path))
        return False
    return True


def iter_media(inputs, report: ScanReport):
    """Yield media file paths under ``inputs`` (files or folders), counting what is skipped."""
    for raw in inputs:
        top = os.fsdecode(raw) if isinstance(raw, bytes) else raw
        if os.path.exists(top) and not os.path.isdir(top):
            if _media_file(top, report):
                yield os.path.abspath(top)
            continue
        if not os.path.isdir(top):
            report.missing_inputs.append(top)
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            hidden = [d for d in dirnames if d.startswith(".")]
            report.skipped_hidden += len(hidden)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    report.skipped_hidden += 1
                elif _media_file(os.path.join(dirpath, name), report):
                    yield os.path.abspath(os.path.join(dirpath, name))


def _record(path: str) -> MediaRecord | tuple[str, str]:
    try:
        stat = os.stat(path)
        return MediaRecord(path, sha256_file(path), stat.st_size, stat.st_mtime_ns, media_type(path))
    except OSError as exc:
        return path, f"{type(exc).__name__}: {exc.strerror or exc}"


def register_inputs(db: DatabaseManager, inputs, languages) -> ScanReport:
    """Scan ``inputs`` and register what is new or changed; returns what happened."""
    report = ScanReport()
    known = db.known_paths()
    unchanged, to_hash = [], []
    for path in iter_media(inputs, report):
        report.found += 1
        raw = path_to_bytes(path)
        try:
            stat = os.stat(path)
        except OSError as exc:
            report.unreadable.append((path, str(exc)))
            continue
        seen = known.get(raw)
        if seen and seen[0] == stat.st_size and seen[1] == stat.st_mtime_ns:
            unchanged.append(raw)
        else:
            to_hash.append(path)
    report.unchanged = len(unchanged)
    db.touch_paths(unchanged)
    with ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="hash") as pool:
        results = list(pool.map(_record, to_hash))
    records = [r for r in results if isinstance(r, MediaRecord)]
    for item in results:
        if not isinstance(item, MediaRecord):
            report.unreadable.append(item)
            log.warning("cannot read %s: %s", display_path(item[0]), item[1])
    report.hashed = len(records)
    counts = db.register_files(records, languages)
    report.new_files, report.duplicates = counts["new_files"], counts["duplicates"]
    return report


def still_registered_content(db: DatabaseManager, file_id: str, path: str) -> bool:
    """Whether ``path`` still holds the content of ``file_id``, checked before paying for it.

    Size and mtime as recorded for this path: yes, without reading. Otherwise the file is hashed:
    the same content (only touched) updates the path's record; other content (the recording was
    replaced) is registered as the new file it now is, with its own jobs, and False is returned.
    """
    stat = os.stat(path)
    rows = db.query("SELECT size, mtime_ns, file_id FROM media_paths WHERE path_bytes = ?", (path_to_bytes(path),))
    if rows and tuple(rows[0]) == (stat.st_size, stat.st_mtime_ns, file_id):
        return True
    record = _record(path)
    if not isinstance(record, MediaRecord):  # changed, and now unreadable: the file's fault
        raise PermanentError(f"cannot read {display_path(path)}: {record[1]}", error_class="unreadable_media")
    languages = [r["language"] for r in db.jobs(stage="translation", file_id=file_id)]
    db.register_files([record], languages)
    if record.sha256[:16] == file_id:
        return True
    log.warning("%s was replaced after registration: registered its new content as %s", display_path(path),
                record.sha256[:16])
    return False


def describe(report: ScanReport) -> str:
    text = (f"found {report.found} media files: {report.new_files} new, {report.duplicates} duplicate content,"
            f" {report.unchanged} unchanged; skipped {report.skipped_hidden} hidden and"
            f" {report.skipped_not_media} non-media")
    if report.skipped_not_regular:
        text += f", {report.skipped_not_regular} not regular files (FIFO, device, socket)"
    if report.unreadable:
        text += f"; {len(report.unreadable)} unreadable"
    if report.missing_inputs:
        text += f"; not found: {', '.join(display_path(p) for p in report.missing_inputs)}"
    return text
