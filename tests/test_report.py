"""tools/report.py: the static report, checked in a real headless Chromium (Playwright) and on disk.

One archive in every state is built per module (real WAVs, transcripts and translations written by
the pipeline's writers) and one browser is started per module. Browser tests skip, with the reason,
when Playwright or a Chromium is missing; CI installs both (.ci/run, requirements-dev.txt).
"""

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest

from benchmarks.mediagen import make_video
from db_manager import DatabaseManager, MediaRecord
from pipeline import config
from pipeline.report import ReportOptions
from tests.conftest import ROOT, script_env
from tests.report_archive import ReportArchive, newest_mtimes, sample_segments
from tools import report as report_tool
from transcription import Segment

SCRIPT = str(ROOT / "tools" / "report.py")
ARTIFACTS = ROOT / "test-artifacts"      # screenshots, kept by CI; ignored by git
INJECTION = "</script><img src=x onerror=alert(1)>"
QUOTED_NAME = "a\"b'c.wav"
HEBREW = re.compile("[\u05d0-\u05ea]")


@pytest.fixture(autouse=True)
def no_logging_setup(monkeypatch):
    # In-process tool runs must not replace pytest's log handlers with one bound to a captured stderr.
    monkeypatch.setattr(config, "setup_logging", lambda *args, **kwargs: None)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Files in every state: completed with translations, an injection transcript under a quoted
    name, failed (two reasons, two stages), in progress, not started."""
    arc = ReportArchive(tmp_path_factory.mktemp("report"))
    ids = {name: arc.add(name) for name in ("one.wav", QUOTED_NAME, "three.wav", "four.wav", "five.wav", "six.wav")}
    segments = sample_segments(1)
    arc.transcribe(ids["one.wav"], segments)
    arc.translate(ids["one.wav"], "en", segments)
    arc.translate(ids["one.wav"], "he", segments)
    arc.transcribe(ids[QUOTED_NAME], [Segment(0.5, 2.0, INJECTION, "speaker_0"),
                                      Segment(2.5, 4.0, "Danach \"zitiert\" & 'so'", "<b>speaker_1</b>")])
    arc.fail(ids["three.wav"], "bad_request")
    arc.hold(ids["four.wav"])
    arc.transcribe(ids["six.wav"], sample_segments(2))
    arc.fail(ids["six.wav"], "wrong_language", "translation", "he")
    arc.ids = ids
    arc.segments = segments
    arc.report = str(arc.base / "report")
    result = report_tool.build_once(ReportOptions(arc.db_path, arc.out, arc.report))
    assert result.interviews == 6
    yield arc
    arc.close()


def unavailable(reason: str):
    """Skip on a developer's machine without a browser; fail under CI (CI=true), which installs one,
    so a broken install step cannot pass as a green run of skipped tests."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run the browser tests")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -r requirements-dev.txt)")
    executable = chromium_path()
    if not executable:
        unavailable("no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.errors = []
    page.dialogs = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    yield page
    assert page.errors == [], page.errors  # no script error on any page
    context.close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request lines in the test output
        pass


def url(archive, relative: str) -> str:
    return Path(archive.report, relative).as_uri()


def interview_url(archive, name: str) -> str:
    return url(archive, f"interviews/{archive.ids[name]}.html")


def visible_rows(page) -> list[str]:
    return page.eval_on_selector_all("#interview-table tbody tr:not([hidden])",
                                     "rows => rows.map(r => r.dataset.fileId)")


def name_column(page) -> list[str]:
    return page.eval_on_selector_all("#interview-table tbody td:first-child", "cells => cells.map(c => c.textContent)")


# -- the dashboard -------------------------------------------------------------------------------------
def test_dashboard_counts_equal_status_json(archive, page):
    status = subprocess.run([sys.executable, str(ROOT / "tools" / "status.py"), "--db", archive.db_path, "--json"],
                            capture_output=True, text=True, env=script_env(), timeout=60)
    assert status.returncode == 0, status.stderr
    expected = json.loads(status.stdout)
    page.goto(url(archive, "index.html"))
    shown = page.eval_on_selector_all("#counts tbody tr", """rows => rows.map(row => [
        row.dataset.stage, row.dataset.language,
        Object.fromEntries(Array.from(row.querySelectorAll('td[data-status]'),
                                      td => [td.dataset.status, Number(td.textContent)]))])""")
    assert ["transcription", "", expected["transcription"]] in shown
    for language, counts in expected["translation"].items():
        assert ["translation", language, counts] in shown
    assert len(shown) == 1 + len(expected["translation"])
    # every status occurs, so the comparison means something
    assert expected["transcription"] == {"not_started": 1, "in_progress": 1, "completed": 3, "failed": 1}
    assert expected["translation"]["he"]["failed"] == 1
    facts = page.inner_text(".facts")
    assert f"{expected['files']} files" in facts and f"${expected['cost_usd']:,.2f}" in facts


def test_failures_grouped_with_a_retry_command_that_works(archive, page):
    page.goto(url(archive, "index.html"))
    groups = page.eval_on_selector_all("details.failure-group", """groups => groups.map(g => [
        g.dataset.errorClass, g.querySelector('pre.command').textContent,
        Array.from(g.querySelectorAll('li a'), a => a.getAttribute('href'))])""")
    assert {g[0] for g in groups} == {"bad_request", "wrong_language"}
    for error_class, command, links in groups:
        argv = shlex.split(command)
        assert argv[:2] == ["python", "tools/retry_failed_transcriptions.py"]
        # the printed command, run for real with --dry-run: it selects exactly the linked files
        result = subprocess.run([sys.executable, *argv[1:], "--dry-run", "--json"], capture_output=True, text=True,
                                cwd=ROOT, env=script_env(), timeout=60)
        assert result.returncode == 0, result.stderr
        listed = {job["file_id"] for job in json.loads(result.stdout)["jobs"]}
        assert {f"interviews/{file_id}.html" for file_id in listed} == set(links)
        for link in links:
            assert Path(archive.report, link).is_file()


def test_filtering_by_failed_shows_exactly_the_failed_files(archive, page):
    page.goto(url(archive, "index.html"))
    page.select_option("#filter-status", "failed")
    assert set(visible_rows(page)) == {archive.ids["three.wav"], archive.ids["six.wav"]}
    assert page.inner_text("#filter-count") == "2"
    page.fill("#filter-text", "six")
    page.press("#filter-text", "Enter")  # submits nothing: the page stays
    assert visible_rows(page) == [archive.ids["six.wav"]]
    # the filter is in the URL: a reload (or a shared link) shows the same rows
    page.reload()
    assert page.input_value("#filter-status") == "failed"
    assert page.inner_text("#filter-count") == "1"


def test_sorting_by_duration_and_name(archive, page):
    page.goto(url(archive, "index.html"))
    page.click("#interview-table th:has-text('name')")
    names = name_column(page)
    assert names == sorted(names, key=str.lower) and len(names) == 6
    page.click("#interview-table th:has-text('name')")
    assert name_column(page) == names[::-1]


# -- the interview page ---------------------------------------------------------------------------------
def test_clicking_a_cue_seeks_the_player(archive, page):
    page.goto(interview_url(archive, "one.wav"))
    page.wait_for_function("document.getElementById('player').readyState >= 1")  # the relative link loads
    cue = page.locator("tr.cue").nth(2)
    start = float(cue.get_attribute("data-start"))
    assert start == archive.segments[2].start > 0
    # The click seeks and then plays; playing is stubbed so the position read is the seek's alone,
    # however slowly this machine reaches the next line (no wall-clock margin in the assertion).
    page.evaluate("HTMLMediaElement.prototype.play = function () { return Promise.resolve(); }")
    cue.click()
    position = page.evaluate("document.getElementById('player').currentTime")
    assert abs(position - start) < 1e-3
    page.locator("tr.cue.current").wait_for(state="attached")  # the seek's timeupdate highlights it
    assert page.locator("tr.cue.current").count() == 1
    assert "current" in cue.get_attribute("class")


def test_hebrew_column_is_rtl_and_shows_hebrew(archive, page):
    page.goto(interview_url(archive, "one.wav"))
    cells = page.locator("td.tr-col[data-lang='he']")
    assert cells.count() == len(archive.segments)
    for index in range(cells.count()):
        cell = cells.nth(index)
        assert cell.get_attribute("dir") == "rtl" and cell.get_attribute("lang") == "he"
        assert HEBREW.search(cell.inner_text())
        assert cell.evaluate("c => getComputedStyle(c).direction") == "rtl"
    assert page.locator("th.tr-col[data-lang='he']").get_attribute("dir") == "rtl"
    english = page.locator("td.tr-col[data-lang='en']").first
    assert english.get_attribute("dir") is None and english.evaluate("c => getComputedStyle(c).direction") == "ltr"


def test_language_switcher_on_a_narrow_screen(archive, page):
    page.set_viewport_size({"width": 420, "height": 800})
    page.goto(interview_url(archive, "one.wav"))
    assert page.locator("#lang-switch").is_visible()
    page.select_option("#lang-switch", "he")
    assert page.locator("td.tr-col[data-lang='he']").first.is_visible()
    assert not page.locator("td.tr-col[data-lang='en']").first.is_visible()


def test_untrusted_text_and_names_stay_text(archive, page):
    page.goto(interview_url(archive, QUOTED_NAME))
    page.wait_for_function("document.getElementById('player').readyState >= 1")  # a"b'c.wav, linked right
    assert page.locator("img").count() == 0
    cells = page.locator("tr.cue td.text")
    assert cells.nth(0).is_visible() and cells.nth(0).inner_text() == f"speaker_0 {INJECTION}"
    assert cells.nth(1).inner_text() == "<b>speaker_1</b> Danach \"zitiert\" & 'so'"
    assert page.locator("b", has_text="speaker_1").count() == 0
    assert page.inner_text("h1") == QUOTED_NAME
    page.goto(url(archive, "index.html"))
    assert page.get_by_role("link", name=QUOTED_NAME).is_visible()
    page.fill("#filter-text", "a\"b'c")
    assert page.inner_text("#filter-count") == "1"
    page.wait_for_timeout(100)  # an onerror would fire asynchronously
    assert page.dialogs == [] and page.locator("img").count() == 0


def test_job_history_and_output_links(archive, page):
    page.goto(interview_url(archive, "six.wav"))
    history = page.inner_text("table.events")
    assert "wrong_language" in history and "in progress → failed" in history
    hrefs = page.eval_on_selector_all("section.outputs a", "links => links.map(a => a.href)")
    assert any(h.endswith("/transcript.json") for h in hrefs)
    for href in hrefs:  # every output link resolves to the file on disk
        assert Path(href.removeprefix("file://")).is_file(), href


def test_served_over_http_with_copied_media(archive, page, tmp_path):
    """The same report from a web server: scripts and styles load under the page's CSP, and with
    --copy-media the player's source is served beside the pages."""
    report = tmp_path / "served"
    report_tool.build_once(ReportOptions(archive.db_path, archive.out, str(report), copy_media=True))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(report)))
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        page.goto(f"{base}/interviews/{archive.ids['one.wav']}.html")
        page.wait_for_function("document.getElementById('player').readyState >= 1")
        assert page.locator("#lang-switch").count() == 1
        page.goto(f"{base}/index.html")
        page.select_option("#filter-status", "in_progress")
        assert visible_rows(page) == [archive.ids["four.wav"]]
        assert page.locator("table.counts th").first.evaluate("th => getComputedStyle(th).position") == "sticky"
    finally:
        server.shutdown()
        server.server_close()


def test_screenshots_of_each_page_type(archive, page):
    ARTIFACTS.mkdir(exist_ok=True)
    for name, target in (("dashboard", url(archive, "index.html")), ("interview", interview_url(archive, "one.wav"))):
        page.goto(target)
        shot = ARTIFACTS / f"report-{name}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


# -- building -------------------------------------------------------------------------------------------
def test_rebuild_writes_only_what_changed(tmp_path):
    arc = ReportArchive(tmp_path)
    first, second, _third = (arc.add(name) for name in ("a.wav", "b.wav", "c.wav"))
    arc.transcribe(first, sample_segments(3))
    options = ReportOptions(arc.db_path, arc.out, str(tmp_path / "report"))
    built = report_tool.build_once(options)
    assert built.rendered == 3 and "index.html" in built.written
    before = newest_mtimes(options.out_dir)
    time.sleep(0.01)  # a rewrite would show a newer mtime even on coarse clocks
    again = report_tool.build_once(options)
    assert again.written == [] and again.rendered == 0
    assert newest_mtimes(options.out_dir) == before  # same inode and mtime: nothing rewritten

    arc.transcribe(second, sample_segments(4))
    changed = report_tool.build_once(options)
    after = newest_mtimes(options.out_dir)
    rewritten = {path for path in after if after[path] != before.get(path)}
    assert rewritten == {f"interviews/{second}.html", "index.html"} == set(changed.written)
    assert changed.rendered == 1  # the pages of the first and third file were not even rendered

    # a page of a file no longer in the database goes; what someone else put there stays
    stale, notes = Path(options.out_dir, "interviews", "0123456789abcdef.html"), Path(options.out_dir, "notes.html")
    stale.write_text("old")
    notes.write_text("mine")
    assert report_tool.build_once(options).removed == ["interviews/0123456789abcdef.html"]
    assert not stale.exists() and notes.exists()
    arc.close()


def test_copy_media_puts_the_media_beside_the_report(tmp_path):
    arc = ReportArchive(tmp_path)
    file_id = arc.add("x y#1.wav")
    options = ReportOptions(arc.db_path, arc.out, str(tmp_path / "report"), copy_media=True)
    built = report_tool.build_once(options)
    assert f"media/{file_id}.wav" in built.written
    copy = Path(options.out_dir, "media", f"{file_id}.wav")
    assert copy.read_bytes() == (arc.media / "x y#1.wav").read_bytes()
    page = Path(options.out_dir, "interviews", f"{file_id}.html").read_text()
    assert f'src="../media/{file_id}.wav"' in page
    assert report_tool.build_once(options).written == []
    arc.close()


def test_without_copy_media_the_link_is_relative_and_encoded(tmp_path):
    arc = ReportArchive(tmp_path)
    file_id = arc.add("x y#1.wav")
    options = ReportOptions(arc.db_path, arc.out, str(tmp_path / "report"))
    report_tool.build_once(options)
    page = Path(options.out_dir, "interviews", f"{file_id}.html").read_text()
    assert 'src="../../media/x%20y%231.wav"' in page
    arc.close()


def test_video_media_get_a_video_player(tmp_path):
    arc = ReportArchive(tmp_path)
    clip = make_video(arc.media / "clip.mp4")
    data = clip.read_bytes()
    arc.db.register_files([MediaRecord(str(clip), hashlib.sha256(data).hexdigest(), len(data), 1, "video")], ["en"])
    file_id = hashlib.sha256(data).hexdigest()[:16]
    options = ReportOptions(arc.db_path, arc.out, str(tmp_path / "report"))
    report_tool.build_once(options)
    page = Path(options.out_dir, "interviews", f"{file_id}.html").read_text()
    assert '<video id="player" controls preload="metadata" src="../../media/clip.mp4">' in page
    assert "<audio" not in page
    arc.close()


def test_the_database_is_opened_read_only(tmp_path):
    arc = ReportArchive(tmp_path)
    arc.add("a.wav")
    arc.close()
    db = DatabaseManager(arc.db_path, read_only=True)
    try:
        assert db.counts()
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            db.ensure_jobs("translation", "de")
    finally:
        db.close_all()


def test_watch_rebuilds_until_interrupted(tmp_path, monkeypatch):
    arc = ReportArchive(tmp_path)
    arc.add("a.wav")
    options = ReportOptions(arc.db_path, arc.out, str(tmp_path / "report"))
    builds, sleeps = [], []
    report_tool.watch(options, 5, sleep=sleeps.append, iterations=3, on_build=builds.append)
    assert sleeps == [5, 5, 5] and len(builds) == 3
    assert builds[0].rendered == 1 and builds[1].written == []

    def interrupt(_seconds):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        report_tool.watch(options, 5, sleep=interrupt)
    arc.close()


def test_watch_cli_exits_130_on_ctrl_c(tmp_path):
    arc = ReportArchive(tmp_path)
    arc.add("a.wav")
    arc.close()
    process = subprocess.Popen([sys.executable, SCRIPT, "--db", arc.db_path, "--output-dir", arc.out,
                                "--out", str(tmp_path / "report"), "--watch", "0.1", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env())
    try:
        first = json.loads(process.stdout.readline())
        assert first["interviews"] == 1
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
    finally:
        if process.poll() is None:
            process.kill()


def test_help_exits_zero_and_usage_errors_exit_two(tmp_path):
    help_run = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, env=script_env(),
                              timeout=60)
    assert help_run.returncode == 0 and "example" in help_run.stdout and "--copy-media" in help_run.stdout
    missing = subprocess.run([sys.executable, SCRIPT, "--db", str(tmp_path / "none.db"), "--out",
                              str(tmp_path / "r")], capture_output=True, text=True, env=script_env(), timeout=60)
    assert missing.returncode == 2 and "no database" in missing.stderr
    assert not (tmp_path / "none.db").exists()
    bad = subprocess.run([sys.executable, SCRIPT, "--watch", "0"], capture_output=True, text=True,
                         env=script_env(), timeout=60)
    assert bad.returncode == 2


def test_an_empty_archive_builds(tmp_path):
    arc = ReportArchive(tmp_path)
    options = ReportOptions(arc.db_path, arc.out, str(tmp_path / "report"))
    built = report_tool.build_once(options)  # nothing registered yet: a dashboard that says so
    index = Path(options.out_dir, "index.html").read_text()
    assert built.interviews == 0 and "No job has completed or failed yet." in index
    arc.close()


def test_a_foreign_database_is_a_usage_error(tmp_path, capsys):
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()
    with pytest.raises(config.ConfigError, match="not a verbatim job database"):
        report_tool.main(["--db", str(other), "--out", str(tmp_path / "r")])
    assert os.path.getsize(other) == 0


def test_the_table_marks_edits_stale_translations_and_transcripts_to_review(tmp_path):
    import json as _json

    arc = ReportArchive(tmp_path)
    redone, edited, review = (arc.add(name) for name in ("redone.wav", "edited.wav", "review.wav"))
    for file_id in (redone, edited, review):
        arc.transcribe(file_id, sample_segments(2))
    arc.translate(redone, "en", sample_segments(2))
    # redone: its transcript changed after it was translated (a correction adopted)
    job = arc.db.jobs(stage="transcription", file_id=redone)[0]
    json_path = arc.folder(redone) / "transcript.json"
    json_path.write_text(json_path.read_text().replace('"text"', '"text" ', 1))
    outputs = _json.loads(job["outputs"])
    new = dict(outputs, json=dict(outputs["json"], sha256=hashlib.sha256(json_path.read_bytes()).hexdigest()))
    assert arc.db.record_edit(job["id"], new, outputs, "hand correction adopted")
    # edited: its srt corrected by hand, not adopted yet
    srt = arc.folder(edited) / "transcript.srt"
    srt.write_text(srt.read_text() + "\n")
    # review: heard in a language the archive does not expect
    with arc.db.transaction() as conn:
        conn.execute("UPDATE jobs SET note = ? WHERE file_id = ? AND stage = 'transcription'",
                     ("review: detected language la, not one of de, en", review))
    arc.close()
    report_tool.build_once(ReportOptions(arc.db_path, arc.out, str(tmp_path / "report")))
    index = (tmp_path / "report" / "index.html").read_text()

    def marks(file_id):
        row = index[index.index(f'data-file-id="{file_id}"'):]
        row = row[:row.index("</tr>")]
        return set(re.findall(r'class="badge mark mark-[^"]*"[^>]*>([^<]+)<', row))

    assert marks(redone) == {"stale"} and marks(edited) == {"edited"} and marks(review) == {"review"}
