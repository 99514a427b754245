"""Registering media (scan, hashing, duplicates, idempotence) and the status report."""

import json
import os
import subprocess
import sys

import db_manager as dbm
from db_manager import TRANSCRIPTION, TRANSLATION, Outcome
from pipeline import media
from tests.conftest import ROOT, script_env


def make_tree(root):
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for i, ext in enumerate(["wav", "MP3", "m4a", "flac", "ogg", "opus", "wma", "aac", "mp4", "mov", "mkv",
                             "avi", "webm", "m4v", "mpg", "mpeg"]):
        (root / f"f{i}.{ext}").write_bytes(f"content {i}".encode())
    (root / "sub" / "copy.wav").write_bytes(b"content 0")  # same content as f0.wav
    (root / "notes.txt").write_text("not media")
    (root / ".secret.wav").write_bytes(b"hidden file")
    (root / ".hidden" / "x.wav").write_bytes(b"hidden folder")


def test_scan_registers_media_once_and_rescans_without_hashing(db, tmp_path, monkeypatch):
    make_tree(tmp_path / "in")
    report = media.register_inputs(db, [str(tmp_path / "in")], ["en", "de", "he"])
    assert (report.found, report.new_files, report.duplicates) == (17, 16, 1)
    assert report.skipped_not_media == 1 and report.skipped_hidden == 2
    assert {r["media_type"] for r in db.files()} == {"audio", "video"}
    counts = db.counts()
    assert counts[(TRANSCRIPTION, "")]["not_started"] == 16
    assert all(counts[(TRANSLATION, lang)]["not_started"] == 16 for lang in ("en", "de", "he"))

    hashed = []
    real = media.sha256_of
    monkeypatch.setattr(media, "sha256_of", lambda p: hashed.append(p) or real(p))
    again = media.register_inputs(db, [str(tmp_path / "in")], ["en", "de", "he"])
    assert again.unchanged == 17 and hashed == [] and again.new_files == 0
    (tmp_path / "in" / "f1.MP3").write_bytes(b"changed content")
    third = media.register_inputs(db, [str(tmp_path / "in")], ["en"])
    assert len(hashed) == 1 and third.new_files == 1


def test_add_media_tool_and_missing_input(tmp_path):
    make_tree(tmp_path / "in")
    cmd = [sys.executable, str(ROOT / "tools/add_media.py"), str(tmp_path / "in"), "--db", str(tmp_path / "a.db"),
           "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=script_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["new_files"] == 16
    missing = subprocess.run(cmd[:2] + [str(tmp_path / "nope")] + cmd[3:], capture_output=True, text=True,
                             env=script_env(), timeout=60)
    assert missing.returncode == 2


def test_status_report_counts_and_json_shape(db, tmp_path):
    make_tree(tmp_path / "in")
    media.register_inputs(db, [str(tmp_path / "in")], ["en", "de", "he"])
    owner = dbm.make_owner()
    out = tmp_path / "out" / "t.txt"
    out.parent.mkdir()
    out.write_text("hello")
    first, second, third = db.claim(owner, TRANSCRIPTION, limit=3)
    db.complete(first, Outcome({"txt": {"path": str(out), "sha256": "x", "size": 5}}, cost=0.25, duration=3600))
    db.fail(second, "unsupported_media", "not audio", retryable=False)
    db.close_all()

    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "tools/status.py"), "--db", db.path, *a],
                                    capture_output=True, text=True, env=script_env(), timeout=60)
    report = json.loads(run("--json").stdout)
    assert report["files"] == 16
    assert report["transcription"] == {"completed": 1, "not_started": 13, "in_progress": 1, "failed": 1}
    assert set(report["translation"]) == {"en", "de", "he"}
    assert report["translation"]["he"] == {"completed": 0, "not_started": 16, "in_progress": 0, "failed": 0}

    text = run().stdout
    assert "Transcription:" in text and "completed 1 · not started 13 · in progress 1 · failed 1" in text
    assert "Hebrew translations:" in text and "unsupported_media 1" in text and "$0.25" in text

    items = {i["file_id"]: i for i in json.loads(run("--files", "--json").stdout)["items"]}
    done = items[first.file_id]
    assert done["transcription"]["status"] == "completed"
    assert done["transcription"]["outputs"] == {"txt": str(out)} and os.path.isabs(done["path"])
    assert set(done["translation"]) == {"en", "de", "he"}
    assert items[second.file_id]["transcription"]["error"].startswith("unsupported_media")

    failed = run("--failed")
    assert "unsupported_media" in failed.stdout and "not audio" in failed.stdout
