"""An archive is one folder: the job database and the output root moved (or mounted elsewhere)
together keep working, because recorded output paths are relative to the output root."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import mediagen
from tests.conftest import ROOT, script_env
from tests.fake_stt import FakeSTT, env_for
from benchmarks.fake_translate import FakeDeepL
from benchmarks.fakeserver import FakeServer

FILES = 3


@pytest.fixture
def stt():
    server = FakeServer().start()
    yield FakeSTT(server)
    server.stop()


def tool(script, archive: Path, *args, env=None, cwd=None):
    cmd = [sys.executable, str(ROOT / script), "--db", str(archive / "jobs.db"), "--output-dir",
           str(archive / "out"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=script_env(**(env or {})),
                          cwd=cwd)


def query(archive: Path, sql: str) -> list:
    import sqlite3
    conn = sqlite3.connect(archive / "jobs.db")
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
def moved(stt, tmp_path):
    """Transcribed into tmp/A (database and outputs), then A renamed to tmp/B; returns B."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(FILES):
        mediagen.make_tone(inputs / f"interview-{i}.wav", freq=400 + 40 * i, seconds=1.2)
    first, second = tmp_path / "A", tmp_path / "B"
    first.mkdir()
    result = tool("parallel_transcription.py", first, "--input", str(inputs), "--workers", "2", "--quiet",
                  env=env_for(stt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    os.rename(first, second)
    return second


def test_translation_of_a_moved_archive_completes(moved, tmp_path):
    with FakeDeepL() as deepl:
        env = {**deepl.env(), "VERBATIM_TRANSLATION_PROVIDER": "deepl"}
        result = tool("parallel_translation.py", moved, "--language", "he", "--workers", "2", "--quiet", env=env,
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = query(moved, "SELECT status, error_class, outputs FROM jobs WHERE stage = 'translation'"
                        " AND language = 'he'")
    assert len(rows) == FILES and {(status, error) for status, error, _ in rows} == {("completed", None)}
    for _status, _error, outputs in rows:
        for info in json.loads(outputs).values():
            assert (moved / "out" / info["path"]).is_file()  # recorded relative to the output root


def test_tools_judge_a_moved_archive_by_its_new_place(moved, tmp_path):
    check = tool("tools/check_missing_transcripts.py", moved, "--json", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["problems"] == []

    status = tool("tools/status.py", moved, "--files", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    items = json.loads(status.stdout)["items"]
    assert len(items) == FILES
    for item in items:
        outputs = item["transcription"]["outputs"]
        assert set(outputs) == {"txt", "json", "srt", "vtt"}
        for path in outputs.values():
            assert Path(path).is_file() and Path(path).is_relative_to(moved / "out"), path

    fix = tool("tools/fix_transcript_status.py", moved, "--apply", "--json", cwd=tmp_path)
    assert fix.returncode == 0, fix.stderr
    assert query(moved, "SELECT DISTINCT status FROM jobs WHERE stage = 'transcription'") == [("completed",)]

    edited = next((moved / "out").glob("*/transcript.txt"))
    edited.write_text(edited.read_text(encoding="utf-8").replace("tone", "Tone", 1), encoding="utf-8")
    adopt = tool("tools/adopt_edits.py", moved, "--apply", "--json", cwd=tmp_path)
    assert adopt.returncode == 0, adopt.stdout + adopt.stderr
    assert list(edited.parent.glob("transcript.txt.edited-*"))  # the edit was found at its new place

    report = tool("tools/report.py", moved, "--out", str(tmp_path / "report"), "--quiet", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    pages = [p.read_text(encoding="utf-8") for p in (tmp_path / "report").rglob("*.html")]
    assert any("Tone" in page for page in pages)  # the adopted transcript, read from the moved root


def test_an_archive_recorded_with_absolute_paths_still_works_after_a_move(tmp_path):
    """Archives written before paths were recorded relative hold absolute paths: they are read
    re-rooted under the output root in use, and left as recorded (no rewrite)."""
    import hashlib

    import db_manager as dbm
    from db_manager import TRANSCRIPTION, MediaRecord, Outcome
    from pipeline.outputs import safe_join
    from benchmarks.fake_translate import make_transcript
    from transcription import Transcript, write_transcript_outputs

    first, second = tmp_path / "A", tmp_path / "B"
    first.mkdir()
    db = dbm.DatabaseManager(str(first / "jobs.db"))
    db.register_files([MediaRecord(f"/archive/interview-{n}.mp3", hashlib.sha256(b"%d" % n).hexdigest(), 1, 1,
                                   "audio") for n in range(FILES)], ["en"])
    for n, job in enumerate(db.claim(dbm.make_owner(), TRANSCRIPTION, limit=FILES)):
        written = write_transcript_outputs(Transcript.from_dict(make_transcript(n, "en", n_segments=3)),
                                           safe_join(first / "out", job.folder), root=first / "out")
        legacy = {fmt: {"path": w.path, "sha256": w.sha256, "size": w.size} for fmt, w in written.items()}
        db.complete(job, Outcome(legacy, provider="fake"))
    db.close_all()
    os.rename(first, second)

    result = tool("parallel_translation.py", second, "--language", "en", "--quiet", cwd=tmp_path)  # copies: no key
    assert result.returncode == 0, result.stderr
    rows = query(second, "SELECT stage, status, outputs FROM jobs")
    assert {(stage, status) for stage, status, _ in rows} == {("transcription", "completed"),
                                                              ("translation", "completed")}
    for stage, _status, outputs in rows:
        paths = [info["path"] for info in json.loads(outputs).values()]
        # the old records stay as they were; the new ones are relative
        assert all(os.path.isabs(p) == (stage == "transcription") for p in paths), paths
    for stage in ("transcription", "translation"):  # (the whole-archive check adds media, never on disk here)
        check = tool("tools/check_missing_transcripts.py", second, "--stage", stage, "--json", cwd=tmp_path)
        assert check.returncode == 0 and json.loads(check.stdout)["problems"] == [], check.stdout
