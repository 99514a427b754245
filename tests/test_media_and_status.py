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
    real = media.sha256_file
    monkeypatch.setattr(media, "sha256_file", lambda p: hashed.append(p) or real(p))
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


# -- a file's history, --files in full, the languages the database has -------------------------------
def status_tool(db_path, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools/status.py"), "--db", db_path, *args],
                          capture_output=True, text=True, env=script_env(), timeout=60)


def record(sha: str, name: str) -> dbm.MediaRecord:
    return dbm.MediaRecord(f"/archive/{name}", sha, 1, 1, "audio")


def lived_history(db, tmp_path) -> tuple[str, str, str]:
    """One file claimed, retried, completed, reset by the fix tool; returns (file id, owner, txt path)."""
    db.register_files([record("ab" * 32, "a.wav"), record("cd" * 32, "b.wav")], ["fr"])
    file_id = "ab" * 8
    owner = dbm.make_owner()
    job = db.claim(owner, TRANSCRIPTION, file_ids=[file_id])[0]
    db.fail(job, "server_error", "HTTP 503 from the provider", retryable=True)
    db.query("UPDATE jobs SET run_after = 0")  # no backoff wait in a test
    job = db.claim(owner, TRANSCRIPTION, file_ids=[file_id])[0]
    out = tmp_path / "t.txt"
    out.write_text("hello")
    db.complete(job, Outcome({"txt": {"path": str(out), "sha256": "5891b5b5", "size": 5}}, provider="openai"))
    db.actor = "tool:fix_transcript_status.py"
    db.reset([job.id], "outputs broken: txt missing", from_statuses=("completed",))
    db.actor = "tool"
    return file_id, owner, str(out)


def test_history_tells_every_event_of_a_file(db, tmp_path):
    file_id, owner, out = lived_history(db, tmp_path)
    db.close_all()
    for key in (file_id, file_id[:5], "/archive/a.wav"):
        result = status_tool(db.path, "--history", key, "--json")
        assert result.returncode == 0, result.stderr
        history = json.loads(result.stdout)
        assert history["file_id"] == file_id and history["path"] == "/archive/a.wav"
    jobs = {(j["stage"], j["language"]): j for j in history["jobs"]}
    assert set(jobs) == {("transcription", None), ("translation", "fr")}
    events = jobs[("transcription", None)]["events"]
    assert [e["event"] for e in events] == ["registered", "claimed", "retry", "claimed", "completed", "reset"]
    assert events[1]["owner"] == owner and events[1]["attempt"] == 1
    assert events[2]["error_class"] == "server_error" and "HTTP 503" in events[2]["error"]
    assert events[4]["outputs"] == {"txt": {"path": out, "sha256": "5891b5b5", "size": 5}}
    assert events[5]["owner"] == "tool:fix_transcript_status.py" and "txt missing" in events[5]["error"]
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)

    text = status_tool(db.path, "--history", file_id[:6]).stdout
    assert f"File {file_id}" in text and "/archive/a.wav" in text
    assert f"claimed by {owner} (attempt 1)" in text
    assert "retry: [server_error] HTTP 503 from the provider" in text
    assert "completed by" in text and "5891b5b5" in text and out in text
    assert "reset by tool:fix_transcript_status.py: outputs broken: txt missing" in text


def test_history_of_an_ambiguous_or_unknown_file_is_a_usage_error(db, tmp_path):
    db.register_files([record("ab" * 32, "a.wav"), record("ab" + "ef" * 31, "b.wav")], [])
    db.close_all()
    ambiguous = status_tool(db.path, "--history", "ab")
    assert ambiguous.returncode == 2 and "ambiguous" in ambiguous.stderr and "abab" in ambiguous.stderr
    unknown = status_tool(db.path, "--history", "/archive/none.wav")
    assert unknown.returncode == 2 and "no file" in unknown.stderr and "Traceback" not in unknown.stderr


def test_files_view_shows_attempts_errors_and_outputs(db, tmp_path):
    file_id, _owner, out = lived_history(db, tmp_path)
    other = "cd" * 8
    job = db.claim(dbm.make_owner(), TRANSCRIPTION, file_ids=[other])[0]
    db.fail(job, "unsupported_media", "not audio", retryable=False)
    job = db.claim(dbm.make_owner(), TRANSCRIPTION, file_ids=[file_id])[0]
    db.complete(job, Outcome({"txt": {"path": out, "sha256": "5891b5b5", "size": 5}}))
    db.close_all()
    text = status_tool(db.path, "--files").stdout
    assert "attempts 1" in text and "[unsupported_media] not audio" in text
    assert f"txt {out}" in text


def test_human_status_lists_the_languages_the_database_has(db):
    db.register_files([record("ab" * 32, "a.wav")], ["fr"])
    db.close_all()
    text = status_tool(db.path).stdout
    assert "French translations:" in text
    assert "English" not in text and "German" not in text and "Hebrew" not in text
    assert set(json.loads(status_tool(db.path, "--json").stdout)["translation"]) == {"fr"}
