"""parallel_transcription.py end to end: the real script as a subprocess, the real SDK and requests,
fake providers on 127.0.0.1."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks import mediagen
from benchmarks.fakeserver import Fault, FakeServer
from pipeline.outputs import sha256_file
from pipeline.subtitles import parse_srt
from tests.conftest import ROOT, recorded_file, script_env
from tests.fake_stt import FakeSTT, env_for

SCRIPT = str(ROOT / "parallel_transcription.py")


@pytest.fixture
def fake():
    server = FakeServer().start()
    stt = FakeSTT(server)
    yield stt
    server.stop()


def run(stt, tmp_path, *args, timeout=120, **env):
    cmd = [sys.executable, SCRIPT, "--db", str(tmp_path / "jobs.db"), "--output-dir", str(tmp_path / "out"),
           "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          env=script_env(**{**env_for(stt), **env}))


def status(tmp_path) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "tools/status.py"), "--db", str(tmp_path / "jobs.db"),
                          "--output-dir", str(tmp_path / "out"), "--files", "--json"], capture_output=True, text=True, env=script_env(), check=True)
    return json.loads(out.stdout)


def tone_files(folder: Path, n: int, start: int = 0) -> dict[str, int]:
    """n short tone files with distinct frequencies; returns name -> frequency."""
    folder.mkdir(parents=True, exist_ok=True)
    tones = {}
    for i in range(start, start + n):
        freq = 300 + 20 * i
        path = folder / f"interview-{i:02d}.{('wav', 'mp3', 'ogg')[i % 3]}"
        mediagen.make_tone(path, freq=freq, seconds=1.5)
        tones[path.name] = freq
    return tones


def test_thirty_files_eight_workers_distinct_transcripts_and_bad_files(fake, tmp_path):
    inputs = tmp_path / "in"
    tones = tone_files(inputs, 30)
    mediagen.make_video(inputs / "video-interview.mp4", freq=900, seconds=1.5)
    bad = {"empty.wav": mediagen.make_empty, "text.mp3": mediagen.make_text_as_audio,
           "silent-video.mp4": mediagen.make_video_without_audio}
    for name, make in bad.items():
        make(inputs / name)
    mediagen.make_truncated(inputs / "interview-00.wav", inputs / "truncated.wav", keep_bytes=40)

    result = run(fake, tmp_path, "--input", str(inputs), "--workers", "8", "--batch-size", "5", "--json")
    assert result.returncode == 1, result.stderr  # some jobs failed: exit 1
    summary = json.loads(result.stdout)
    assert summary["runs"][0]["completed"] == 31

    items = {Path(i["path"]).name: i for i in status(tmp_path)["items"]}
    db = sqlite3.connect(tmp_path / "jobs.db")
    db.row_factory = sqlite3.Row
    for name, freq in tones.items():
        job = items[name]["transcription"]
        assert job["status"] == "completed", (name, job)
        text = Path(job["outputs"]["txt"]).read_text()
        assert f"tone{freq}" in text and all(f"tone{f}" not in text for f in tones.values() if f != freq)
        assert set(job["outputs"]) == {"txt", "json", "srt", "vtt"}
        cues = parse_srt(Path(job["outputs"]["srt"]).read_text())
        assert cues and cues[0].start < cues[0].end <= 1.6
        recorded = json.loads(db.execute("SELECT outputs FROM jobs j JOIN media_files m USING (file_id) "
                                         "WHERE m.path_display LIKE ? AND stage='transcription'",
                                         (f"%{name}",)).fetchone()[0])
        for fmt, info in recorded.items():
            path = recorded_file(tmp_path / "out", info)  # recorded relative to the output root
            assert sha256_file(path) == info["sha256"] and os.path.getsize(path) == info["size"]
            assert not os.path.isabs(info["path"]) and path.is_relative_to((tmp_path / "out").resolve())
    assert "tone900" in Path(items["video-interview.mp4"]["transcription"]["outputs"]["txt"]).read_text()

    reasons = {name: items[name]["transcription"] for name in [*bad, "truncated.wav"]}
    assert all(job["status"] == "failed" for job in reasons.values()), reasons
    assert reasons["empty.wav"]["error"].startswith("empty_file")
    assert reasons["text.mp3"]["error"].startswith("unsupported_media")
    assert reasons["silent-video.mp4"]["error"].startswith("no_audio")
    assert all(job["attempts"] == 1 for job in reasons.values())  # permanent: no retry storm
    # each good file was uploaded exactly once; nothing of the bad ones reached the provider twice
    assert len(fake.uploads) <= 31 + 1


def test_oversized_file_is_split_at_silences_and_merged(fake, tmp_path):
    media = tmp_path / "in" / "long.wav"
    media.parent.mkdir()
    mediagen.make_tones_with_gaps(media, [(400, 2.0), (500, 2.0), (600, 2.0), (700, 2.0)], gap=1.0)
    result = run(fake, tmp_path, "--input", str(media), VERBATIM_OPENAI_MAX_UPLOAD_BYTES="40000")
    assert result.returncode == 0, result.stderr
    assert len(fake.uploads) >= 2  # really split
    (item,) = status(tmp_path)["items"]
    transcript = json.loads(Path(item["transcription"]["outputs"]["json"]).read_text())
    segments = transcript["segments"]
    assert [s["id"] for s in segments] == list(range(1, len(segments) + 1))
    assert [s["text"].split()[0] for s in segments] == ["tone400", "tone500", "tone600", "tone700"]
    for expected_start, segment in zip((0, 3, 6, 9), segments):
        assert abs(segment["start"] - expected_start) < 0.35
        assert segment["end"] > segment["start"]
    assert all(a["end"] <= b["start"] for a, b in zip(segments, segments[1:]))
    assert abs(transcript["duration"] - 11.0) < 0.3


def test_transient_faults_are_retried_to_completion(fake, tmp_path):
    tone_files(tmp_path / "in", 8)
    faults = iter([Fault("status", 429, {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}},
                         {"Retry-After": "1"}),
                   Fault("status", 500, {"error": {"message": "server error"}}),
                   Fault("reset"), Fault("garbage"), Fault("truncate"),
                   Fault("status", 503, "upstream unavailable")])
    lock = threading.Lock()

    def inject(request):
        with lock:
            return next(faults, None)

    fake.server.fault = inject
    result = run(fake, tmp_path, "--input", str(tmp_path / "in"), "--workers", "4", "--json")
    assert result.returncode == 0, result.stderr
    report = status(tmp_path)
    assert report["transcription"]["completed"] == 8 and report["transcription"]["failed"] == 0
    assert fake.server.count() == 8 + 6  # one request per fault, no more


def test_rejected_key_stops_the_run_and_leaves_jobs_not_started(fake, tmp_path):
    tone_files(tmp_path / "in", 6)
    result = run(fake, tmp_path, "--input", str(tmp_path / "in"), "--workers", "2",
                 OPENAI_API_KEY="sk-wrong-key-1234567")
    assert result.returncode == 2
    assert result.stderr.count("rejected") >= 1 and "no job was marked failed" in result.stderr
    counts = status(tmp_path)["transcription"]
    assert counts == {"completed": 0, "not_started": 6, "in_progress": 0, "failed": 0}
    assert fake.server.count() <= 2  # stopped claiming at once: at most one request per worker


def test_insufficient_quota_is_an_account_error(fake, tmp_path):
    tone_files(tmp_path / "in", 3)
    fake.server.fault = lambda r: Fault("status", 429, {"error": {"message": "You exceeded your current quota",
                                                                  "type": "insufficient_quota",
                                                                  "code": "insufficient_quota"}})
    result = run(fake, tmp_path, "--input", str(tmp_path / "in"), "--workers", "1")
    assert result.returncode == 2 and "quota" in result.stderr
    assert status(tmp_path)["transcription"]["not_started"] == 3


def test_sigkill_mid_run_then_rerun_never_resends_completed_files(fake, tmp_path):
    tone_files(tmp_path / "in", 16)
    fake.server.latency = 0.3
    cmd = [sys.executable, SCRIPT, "--db", str(tmp_path / "jobs.db"), "--output-dir", str(tmp_path / "out"),
           "--quiet", "--input", str(tmp_path / "in"), "--workers", "3", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, env=script_env(**env_for(fake)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while fake.server.answered < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    before = status(tmp_path)["transcription"]
    assert 0 < before["completed"] < 16 and before["in_progress"] > 0  # killed holding jobs
    sent_before = fake.server.count()
    # answers the kill caught after they were paid for but before their commit: kept in the spool
    conn = sqlite3.connect(tmp_path / "jobs.db")
    done = {row[0] for row in conn.execute("SELECT file_id FROM jobs WHERE stage = 'transcription'"
                                            " AND status = 'completed'")}
    conn.close()
    kept = {p.parent.parent.name for p in (tmp_path / "out" / ".verbatim" / "spool").rglob("*.json")} - done

    fake.server.latency = 0.0
    result = run(fake, tmp_path, "--workers", "3")
    assert result.returncode == 0, result.stderr
    after = status(tmp_path)["transcription"]
    assert after == {"completed": 16, "not_started": 0, "in_progress": 0, "failed": 0}
    # the done ones were not re-sent, nor the ones whose answer was kept
    assert fake.server.count() - sent_before == 16 - before["completed"] - len(kept)
    leftovers = [p for p in (tmp_path / "out").rglob("*.tmp")]
    assert leftovers == [] or all(p.name.startswith(".") for p in leftovers)


def test_canary_key_never_leaks(tmp_path):
    canary = "sk-CANARY-7f3e9c1d-do-not-leak"
    server = FakeServer().start()
    try:
        stt = FakeSTT(server, openai_key=canary)
        tone_files(tmp_path / "in", 2)
        mediagen.make_text_as_audio(tmp_path / "in" / "broken.mp3")
        result = run(stt, tmp_path, "--input", str(tmp_path / "in"), "-v", "--json", VERBATIM_DEBUG="1")
    finally:
        server.stop()
    assert result.returncode == 1  # the broken file failed; the others completed
    assert "DEBUG" in result.stderr  # debug logging really was on
    written = [result.stdout, result.stderr]
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.name.endswith((".wav", ".mp3", ".ogg")):
            written.append(path.read_bytes().decode("latin-1"))
    assert all(canary not in text for text in written)


def test_dry_run_sends_nothing(fake, tmp_path):
    tone_files(tmp_path / "in", 3)
    result = run(fake, tmp_path, "--input", str(tmp_path / "in"), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["jobs"] == 3 and 4.0 < plan["audio_seconds"] < 5.0 and plan["estimated_cost_usd"] > 0
    assert fake.server.count() == 0
    assert status(tmp_path)["transcription"]["not_started"] == 3


def test_dry_run_says_the_keyterm_surcharge(fake, tmp_path):
    tone_files(tmp_path / "in", 2)
    args = ("--input", str(tmp_path / "in"), "--provider", "elevenlabs", "--model", "scribe_v2",
            "--prompt", "Theresienstadt, Łódź", "--dry-run", "--json")
    unpriced = json.loads(run(fake, tmp_path, *args).stdout)
    assert any("keyterms bill extra" in note for note in unpriced["notes"])
    priced = json.loads(run(fake, tmp_path, *args, VERBATIM_ELEVENLABS_KEYTERMS_USD_PER_HOUR="3600").stdout)
    assert priced["estimated_cost_usd"] == pytest.approx(unpriced["estimated_cost_usd"]
                                                         + priced["audio_seconds"], abs=0.01)
    assert fake.server.count() == 0


def test_elevenlabs_provider_end_to_end_with_speakers(fake, tmp_path):
    media = tmp_path / "in" / "dialogue.wav"
    media.parent.mkdir()
    mediagen.make_tones_with_gaps(media, [(400, 1.0), (600, 1.0), (800, 1.0)], gap=1.5)
    result = run(fake, tmp_path, "--input", str(media), "--provider", "elevenlabs")
    assert result.returncode == 0, result.stderr
    (item,) = status(tmp_path)["items"]
    text = Path(item["transcription"]["outputs"]["txt"]).read_text()
    assert "speaker_0" in text and "speaker_1" in text
    assert fake.uploads[0].provider == "elevenlabs" and fake.uploads[0].fields["diarize"] == "true"


def write_silence(path: Path, seconds: float = 5.0) -> Path:
    import wave

    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
        out.writeframes(b"\0\0" * int(seconds * 16000))
    return path


def test_silence_completes_as_no_speech_found_and_is_never_sent_to_translation(fake, tmp_path):
    from benchmarks.fake_translate import FakeDeepL

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_silence(inputs / "silence.wav")
    result = run(fake, tmp_path, "--input", str(inputs), "--json")
    assert result.returncode == 0, result.stderr
    items = {Path(i["path"]).name: i for i in status(tmp_path)["items"]}
    silent = items["silence.wav"]["transcription"]
    assert silent["status"] == "completed" and silent["note"] == "no speech found"
    assert json.loads(Path(silent["outputs"]["json"]).read_text())["note"] == "no speech found"

    env = script_env()
    report = json.loads(subprocess.run([sys.executable, str(ROOT / "tools/status.py"), "--db",
                                        str(tmp_path / "jobs.db"), "--json"], capture_output=True, text=True,
                                       env=env, check=True).stdout)
    assert report["no_speech"] == {"transcription": 1}
    text = subprocess.run([sys.executable, str(ROOT / "tools/status.py"), "--db", str(tmp_path / "jobs.db")],
                          capture_output=True, text=True, env=env, check=True).stdout
    assert "Transcription:" in text and "no speech 1" in text
    check = subprocess.run([sys.executable, str(ROOT / "tools/check_missing_transcripts.py"), "--db",
                            str(tmp_path / "jobs.db"), "--output-dir", str(tmp_path / "out")],
                           capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout
    assert "no speech found" in check.stdout and "silence.wav" in check.stdout and "1 with no speech" in check.stdout

    silent_id = items["silence.wav"]["file_id"]
    with FakeDeepL() as translator:
        translated = subprocess.run([sys.executable, str(ROOT / "parallel_translation.py"), "--db",
                                     str(tmp_path / "jobs.db"), "--output-dir", str(tmp_path / "out"), "--quiet",
                                     "--language", "de", "--json"],
                                    capture_output=True, text=True, env=script_env(**translator.env()), timeout=120)
        assert translator.server.count() == 0
    assert translated.returncode == 0, translated.stderr
    de = {i["file_id"]: i for i in status(tmp_path)["items"]}[silent_id]["translation"]["de"]
    assert de["status"] == "completed" and de["note"] == "no speech found", de
    assert Path(de["outputs"]["txt"]).read_text() == ""


def test_nothing_to_do_says_why(fake, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(fake, tmp_path, "--input", str(empty))
    assert result.returncode == 0, result.stderr
    assert "nothing to do: no media found in" in result.stderr and str(empty) in result.stderr

    inputs = tmp_path / "in"
    tone_files(inputs, 2)
    mediagen.make_text_as_audio(inputs / "text.mp3")
    assert run(fake, tmp_path, "--input", str(inputs)).returncode == 1
    sent = fake.server.count()
    again = run(fake, tmp_path, "--input", str(inputs), "--json")
    assert again.returncode == 1 and fake.server.count() == sent
    assert "nothing to do: 2 completed, 1 failed (use --retry-failed to try them again)" in again.stderr
    assert json.loads(again.stdout)["nothing_to_do"].startswith("2 completed, 1 failed")


def test_nothing_to_do_loads_no_model_and_needs_no_provider(tmp_path):
    """An empty folder with the local provider (installed or not): nothing is loaded, exit 0."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.modules['faster_whisper'] = None; "
                             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')", SCRIPT,
                             "--input", str(empty), "--provider", "local", "--db", str(tmp_path / "jobs.db")],
                            capture_output=True, text=True, env=script_env(), cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "nothing to do: no media found" in result.stderr and "loading" not in result.stderr


def test_a_transcript_in_a_language_the_archive_does_not_expect_is_marked_and_not_translated(fake, tmp_path):
    """VERBATIM_LANGUAGES names what the archive speaks. A provider that hears another language
    (the fake hears German) gives a transcript that is kept but marked for review in the status
    and the check tool, and its translations are refused with the reason, nothing sent."""
    from benchmarks.fake_translate import FakeDeepL

    tone_files(tmp_path / "in", 2)
    expects = {"VERBATIM_LANGUAGES": "en,he"}
    result = run(fake, tmp_path, "--input", str(tmp_path / "in"), **expects)
    assert result.returncode == 0, result.stderr
    jobs = [item["transcription"] for item in status(tmp_path)["items"]]
    assert all(job["status"] == "completed" and job["note"].startswith("review: detected language de")
               for job in jobs)
    shown = subprocess.run([sys.executable, str(ROOT / "tools/status.py"), "--db", str(tmp_path / "jobs.db")],
                           capture_output=True, text=True, env=script_env(), check=True).stdout
    assert "to review 2 (language not expected)" in shown
    checked = subprocess.run([sys.executable, str(ROOT / "tools/check_missing_transcripts.py"), "--db",
                              str(tmp_path / "jobs.db"), "--output-dir", str(tmp_path / "out"), "--json"],
                             capture_output=True, text=True, env=script_env())
    assert len(json.loads(checked.stdout)["review"]) == 2
    with FakeDeepL() as deepl:
        translated = subprocess.run(
            [sys.executable, str(ROOT / "parallel_translation.py"), "--db", str(tmp_path / "jobs.db"), "--output-dir",
             str(tmp_path / "out"), "--quiet", "--language", "en", "--json"],
            capture_output=True, text=True, timeout=120, env=script_env(**deepl.env(), **expects))
        assert deepl.server.count() == 0
    assert translated.returncode == 1, translated.stderr
    assert json.loads(translated.stdout)["runs"][0]["errors"] == {"language_review": 2}
    # said otherwise, the same audio is what the archive expects: nothing is marked
    fresh = tmp_path / "again"
    fresh.mkdir()
    again = run(fake, fresh, "--input", str(tmp_path / "in"), VERBATIM_LANGUAGES="de,en")
    assert again.returncode == 0 and not any(item["transcription"].get("note") for item in status(fresh)["items"])
