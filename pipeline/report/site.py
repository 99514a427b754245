"""Build the static report folder: ``index.html``, one page per interview, and the assets.

Layout of ``out_dir``::

    index.html                 dashboard: counts, progress chart, failures, every interview
    interviews/<file_id>.html  one page per media file: player, cues, translations, history
    assets/report.css, report.js
    media/<file_id>.<ext>      only with copy_media: the media beside the report

Incremental: a page is rendered only when its inputs changed, and written only when its bytes
changed, so a rebuild of an unchanged archive writes nothing and a web server or rsync sees no
change. A page's inputs are everything it shows (its media row, jobs, events, output files' size
and mtime) plus a fingerprint of the templates and of this package's code; their hash is written
into the page itself (a ``<meta>`` in its first bytes, with the speaker count the dashboard needs),
so a rebuild reads the head of each page and no transcript of an unchanged one, and no cache file
can disagree with the pages. The index is rendered every build (one page) and written only if its
bytes differ. Files are written
with ``pipeline.outputs.atomic_write``: a web server never serves half a page.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jinja2

from db_manager import COMPLETED, FAILED, IN_PROGRESS, NOT_STARTED, STATUSES, TRANSCRIPTION
from pipeline.config import DEFAULT_TARGET_LANGUAGES
from pipeline.outputs import atomic_write
from pipeline.report import data
from pipeline.report.chart import build_chart

log = logging.getLogger("verbatim.report")

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
ASSETS = HERE / "assets"
HEAD_BYTES = 4096            # the <meta> keys are within the first few hundred bytes of a page
_META_RE = re.compile(rb'<meta name="verbatim-(inputs|speakers)" content="([0-9a-f]*)">')
PAGES_DIR = "interviews"
MEDIA_DIR = "media"
_PAGE_RE = re.compile(r"^[0-9a-f]{8,64}(\.html|\.[A-Za-z0-9]{1,8})?$")
_EXT_RE = re.compile(r"^\.[A-Za-z0-9]{1,8}$")

STATUS_MEANINGS = {
    COMPLETED: "outputs written atomically and recorded with their size and sha256",
    NOT_STARTED: "waiting to run: new, released by a stopped run, waiting for its transcript, or backing off"
                 " before a retry",
    IN_PROGRESS: "leased by a running worker, renewed by its heartbeat while it works",
    FAILED: "a permanent error, or the retryable attempts are used up; the reason is stored",
}


@dataclass(frozen=True)
class ReportOptions:
    db_path: str
    output_dir: str
    out_dir: str
    copy_media: bool = False
    languages: tuple[str, ...] = DEFAULT_TARGET_LANGUAGES  # the settings' target languages


@dataclass
class BuildResult:
    out_dir: str
    interviews: int
    rendered: int                      # interview pages whose inputs changed
    written: list[str] = field(default_factory=list)   # paths (relative to out_dir) rewritten
    removed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def environment() -> jinja2.Environment:
    """Jinja2 with autoescape on for every template: all data is text unless a template says otherwise."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["duration"] = format_duration
    env.filters["utc"] = lambda at: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at)) if at else ""
    env.filters["cue_time"] = format_cue_time
    env.filters["size"] = format_size
    return env


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    total = int(round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def format_cue_time(seconds: float | None) -> str:
    if seconds is None:
        return ""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def format_size(size: int | None) -> str:
    if size is None:
        return ""
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


_CODE_FINGERPRINT: str | None = None


def code_fingerprint() -> str:
    """Hash of the templates, assets and this package's code: a change to any of them re-renders every page."""
    global _CODE_FINGERPRINT
    if _CODE_FINGERPRINT is None:
        files = sorted(p for folder in (TEMPLATES, ASSETS, HERE) for p in folder.iterdir() if p.is_file()
                       and p.suffix in (".html", ".css", ".js", ".py"))
        _CODE_FINGERPRINT = data.fingerprint([(p.name, p.read_bytes().hex()) for p in files])
    return _CODE_FINGERPRINT


class _Writer:
    """Writes files under the report folder only when their bytes changed, and lists what it wrote."""

    def __init__(self, root: Path):
        self.root = root
        self.written: list[str] = []

    def write(self, relative: str, content: str | bytes) -> bool:
        payload = content.encode("utf-8") if isinstance(content, str) else content
        path = self.root / relative
        try:
            if path.read_bytes() == payload:
                return False
        except FileNotFoundError:
            pass
        atomic_write(path, payload, root=self.root)
        self.written.append(relative)
        return True

    def copy(self, source: str, relative: str) -> bool:
        """Copy a media file unless an identical-looking copy (size and mtime) is there already."""
        target = self.root / relative
        stat = os.stat(source)
        try:
            have = target.stat()
            if have.st_size == stat.st_size and have.st_mtime_ns == stat.st_mtime_ns:
                return False
        except FileNotFoundError:
            pass
        temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, temp)  # keeps the mtime, which is what the next build compares
        os.replace(temp, target)
        self.written.append(relative)
        return True


def build(db, summary: dict, options: ReportOptions, language_names: dict[str, str]) -> BuildResult:
    """One build of the report from ``db`` (any DatabaseManager) and the outputs.

    ``summary`` is ``tools/status.py``'s summary of the same database: the dashboard shows those
    numbers, so the report and the status tool cannot disagree."""
    started = time.monotonic()
    root = Path(os.path.abspath(options.out_dir))
    root.mkdir(parents=True, exist_ok=True)
    pages_dir = root / PAGES_DIR
    writer = _Writer(root)
    env = environment()
    interviews = data.load_interviews(db, options.output_dir, str(pages_dir))

    def name_of(code: str) -> str:
        return language_names.get(code, code)

    page_template = env.get_template("interview.html")
    rendered = 0
    for interview in interviews:
        media_href = _media_href(interview, options, writer, pages_dir)
        key = data.fingerprint(code_fingerprint(), asdict(interview), media_href, _json_stats(interview),
                               language_names)
        page = f"{PAGES_DIR}/{interview.file_id}.html"
        written = _page_keys(root / page)
        if written.get("inputs") == key:
            interview.speakers = int(written["speakers"]) if written.get("speakers") else None
        else:
            cues, languages, interview.speakers = data.load_cues(interview)
            html = page_template.render(
                root="../", title=interview.name, interview=interview, cues=cues, media_href=media_href,
                columns=[{"code": code, "name": name_of(code), "rtl": data.is_rtl(code)} for code in languages],
                jobs=_ordered_jobs(interview), name_of=name_of, inputs_key=key)
            writer.write(page, html)
            rendered += 1

    languages = list(summary["translation"])
    languages += sorted({k for i in interviews for k in i.jobs if k != TRANSCRIPTION} - set(languages))
    events = [event for interview in interviews for event in interview.events]
    chart = build_chart(events, lambda job: "Transcription" if job == TRANSCRIPTION
                        else f"{name_of(job)} translations")
    index = env.get_template("index.html").render(
        root="", title="verbatim archive report", summary=summary, statuses=STATUSES, meanings=STATUS_MEANINGS,
        interviews=interviews, languages=languages, name_of=name_of, chart=chart,
        failures=data.failure_groups(interviews, options.db_path, options.output_dir),
        spoken=sorted({i.language for i in interviews if i.language}),
        last_event=max((e.at for e in events), default=None))
    writer.write("index.html", index)
    for asset in sorted(ASSETS.iterdir()):
        writer.write(f"assets/{asset.name}", asset.read_bytes())

    keep = {f"{i.file_id}.html" for i in interviews}
    removed = _remove_stale(pages_dir, keep, PAGES_DIR)
    if options.copy_media:
        removed += _remove_stale(root / MEDIA_DIR, {i.file_id for i in interviews}, MEDIA_DIR, by_stem=True)
    return BuildResult(str(root), len(interviews), rendered, writer.written, removed,
                       round(time.monotonic() - started, 3))


def _ordered_jobs(interview: data.Interview) -> list[data.JobView]:
    return sorted(interview.jobs.values(), key=lambda job: (job.key != TRANSCRIPTION, job.key))


def _json_stats(interview: data.Interview) -> list:
    """Size and mtime of the json outputs a page reads: an output rewritten on disk re-renders its page."""
    stats = []
    for job in interview.jobs.values():
        if job.json_path:
            try:
                stat = os.stat(job.json_path)
                stats.append((job.key, stat.st_size, stat.st_mtime_ns))
            except FileNotFoundError:
                stats.append((job.key, None, None))
    return sorted(stats)


def _media_href(interview: data.Interview, options: ReportOptions, writer: _Writer, pages_dir: Path) -> str:
    """The player's source: the original media (relative link), or with ``copy_media`` a copy
    under ``media/``, named by file id and the original extension (never the original name)."""
    if options.copy_media and interview.media_exists:
        ext = os.path.splitext(interview.media_path)[1].lower()
        relative = f"{MEDIA_DIR}/{interview.file_id}{ext if _EXT_RE.match(ext) else ''}"
        writer.copy(interview.media_path, relative)
        return data.href(str(writer.root / relative), str(pages_dir))
    return data.href(interview.media_path, str(pages_dir))


def _page_keys(path: Path) -> dict[str, str]:
    """The keys a previous build wrote into a page's head; empty when there is no such page."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEAD_BYTES)
    except OSError:
        return {}
    return {name.decode(): value.decode() for name, value in _META_RE.findall(head)}


def _remove_stale(folder: Path, keep: set[str], label: str, *, by_stem: bool = False) -> list[str]:
    """Remove pages (or media copies) of files no longer in the database; only names this
    builder makes (a file id) are touched, never anything else someone put there."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        name = entry.name
        if not entry.is_file() or not _PAGE_RE.match(name):
            continue
        if (name.split(".")[0] if by_stem else name) in keep:
            continue
        os.unlink(entry.path)
        removed.append(f"{label}/{name}")
    return removed

