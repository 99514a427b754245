"""parallel_translation.py end to end: the real script as a subprocess against fake DeepL, Microsoft
and OpenAI-chat servers on 127.0.0.1, over a database of completed transcripts."""

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import db_manager as dbm
from benchmarks.fake_translate import FakeDeepL, FakeMicrosoft, FakeOpenAIChat, fake_translate, make_transcript
from benchmarks.fakeserver import Fault
from db_manager import TRANSCRIPTION, MediaRecord, Outcome
from pipeline.outputs import as_recorded, safe_join, sha256_file
from pipeline.subtitles import RLE, parse_srt, parse_vtt
from tests.conftest import ROOT, recorded_file, script_env
from transcription import Transcript, write_transcript_outputs

SCRIPT = str(ROOT / "parallel_translation.py")
FAKES = {"deepl": FakeDeepL, "microsoft": FakeMicrosoft, "openai": FakeOpenAIChat}


def make_archive(tmp_path, n_german=15, n_english=5) -> dict:
    """A database whose transcriptions are completed, with real transcript files on disk."""
    db = dbm.DatabaseManager(str(tmp_path / "jobs.db"))
    out = tmp_path / "out"
    docs = {}
    records = []
    for seed in range(n_german + n_english):
        language = "de" if seed < n_german else "en"
        docs[seed] = make_transcript(seed, language, n_segments=5)
        digest = hashlib.sha256(f"media {seed}".encode()).hexdigest()
        records.append(MediaRecord(f"/archive/interview-{seed}.mp3", digest, 1, 1, "audio"))
    db.register_files(records, ["en", "de", "he"])
    owner = dbm.make_owner()
    by_file = {}
    for job in db.claim(owner, TRANSCRIPTION, limit=len(records)):
        seed = int(Path(job.media_path).stem.split("-")[1])
        written = write_transcript_outputs(Transcript.from_dict(docs[seed]), safe_join(out, job.folder), root=out)
        db.complete(job, Outcome(as_recorded(written), provider="fake"))
        by_file[job.file_id] = docs[seed]
    db.close_all()
    return by_file


def run(tmp_path, env, *args, timeout=180):
    cmd = [sys.executable, SCRIPT, "--db", str(tmp_path / "jobs.db"), "--output-dir", str(tmp_path / "out"),
           "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=script_env(**env))


def translation_jobs(tmp_path, language) -> list:
    db = dbm.DatabaseManager(str(tmp_path / "jobs.db"))
    try:
        return db.jobs(stage="translation", language=language)
    finally:
        db.close_all()


@pytest.mark.parametrize("provider", sorted(FAKES))
def test_twenty_transcripts_into_three_languages(provider, tmp_path):
    docs = make_archive(tmp_path)
    with FAKES[provider]() as fake:
        result = run(tmp_path, fake.env(), "--language", "en", "de", "he", "--workers", "3", "--json")
    assert result.returncode == 0, result.stderr
    runs = {r["language"]: r for r in json.loads(result.stdout)["runs"]}
    assert all(runs[lang]["completed"] == 20 for lang in ("en", "de", "he"))
    for language in ("en", "de", "he"):
        for row in translation_jobs(tmp_path, language):
            doc = docs[row["file_id"]]
            outputs = json.loads(row["outputs"])
            assert set(outputs) == {"txt", "json", "srt", "vtt"}
            for info in outputs.values():
                assert sha256_file(recorded_file(tmp_path / "out", info)) == info["sha256"]
                assert recorded_file(tmp_path / "out", info).name.startswith(f"translation.{language}.")
            cues = parse_srt(recorded_file(tmp_path / "out", outputs["srt"]).read_text())
            source = [(s["start"], s["end"]) for s in doc["segments"]]
            assert [(c.start, c.end) for c in cues] == source  # the cue count and timings are the source's
            assert len(parse_vtt(recorded_file(tmp_path / "out", outputs["vtt"]).read_text())) == len(source)
            if doc["language"] == language:
                assert row["provider"] == "copy" and row["cost"] == 0
                assert [c.text for c in cues] == [s["text"] for s in doc["segments"]]
            else:
                assert row["provider"] == provider
                expected = [fake_translate(s["text"], language) for s in doc["segments"]]
                shown = [c.text.replace(RLE, "").replace("\u202c", "") for c in cues]
                assert shown == expected  # in order, unit for unit
            if language == "he":
                assert all(c.text.startswith(RLE) for c in cues)
                assert "\u200f" in recorded_file(tmp_path / "out", outputs["txt"]).read_text()
                assert "\u202b" not in recorded_file(tmp_path / "out", outputs["json"]).read_text()
    # German sources were copied for "de": only the English transcripts were sent for German
    english = {s["text"] for doc in docs.values() if doc["language"] == "en" for s in doc["segments"]}
    into_german = [t for b in fake.batches if str(b["target"]).lower().startswith("de") for t in b["texts"]]
    assert into_german and set(into_german) <= english


def test_english_returned_for_hebrew_is_never_completed(tmp_path):
    make_archive(tmp_path, n_german=4, n_english=0)
    with FakeDeepL() as fake:
        fake.wrong_language = True
        result = run(tmp_path, fake.env(), "--language", "he", "--workers", "2")
    assert result.returncode == 1
    rows = translation_jobs(tmp_path, "he")
    assert [r["status"] for r in rows] == ["failed"] * 4
    assert {r["error_class"] for r in rows} == {"wrong_language"}
    assert all(json.loads(r["outputs"]) == {} for r in rows)
    assert not list((tmp_path / "out").rglob("translation.he.*"))


def test_the_fallback_provider_rescues_a_wrong_language_answer(tmp_path):
    make_archive(tmp_path, n_german=3, n_english=0)
    with FakeDeepL() as deepl, FakeOpenAIChat() as chat:
        deepl.wrong_language = True
        env = {**deepl.env(), **chat.env(), "VERBATIM_TRANSLATION_PROVIDER_HE": "deepl",
               "VERBATIM_TRANSLATION_FALLBACK": "openai"}
        result = run(tmp_path, env, "--language", "he")
    assert result.returncode == 0, result.stderr
    assert {r["provider"] for r in translation_jobs(tmp_path, "he")} == {"openai"}


def test_a_language_the_provider_lacks_is_refused_at_start(tmp_path):
    """Microsoft Translator has no Yiddish: exit 2 with a clear message before any job is claimed."""
    make_archive(tmp_path, n_german=2, n_english=0)
    with FakeMicrosoft() as fake:
        result = run(tmp_path, fake.env(), "--language", "yi")
        assert fake.server.count() == 0
    assert result.returncode == 2
    assert "microsoft" in result.stderr and "Yiddish" in result.stderr
    assert translation_jobs(tmp_path, "yi") == [] or all(r["status"] == "not_started"
                                                         for r in translation_jobs(tmp_path, "yi"))


def test_fewer_lines_are_retried_smaller_and_stay_aligned(tmp_path):
    docs = make_archive(tmp_path, n_german=2, n_english=0)
    with FakeOpenAIChat() as fake:
        fake.drop_units = 1
        result = run(tmp_path, fake.env(), "--language", "en")
        sizes = [len(t) for t in fake.sent_texts()]
    assert result.returncode == 0, result.stderr
    assert max(sizes) == 5 and 1 in sizes  # whole batches, then halves down to single units
    for row in translation_jobs(tmp_path, "en"):
        data = json.loads(recorded_file(tmp_path / "out", json.loads(row["outputs"])["json"]).read_text())
        texts = [u["text"] for u in data.get("units", data.get("segments", []))]
        assert texts == [fake_translate(s["text"], "en") for s in docs[row["file_id"]]["segments"]]


def test_rate_limits_and_server_errors_are_retried(tmp_path):
    make_archive(tmp_path, n_german=6, n_english=0)
    with FakeMicrosoft() as fake:
        faults = iter([Fault("status", 429, {"error": {"code": 429001, "message": "too many requests"}},
                             {"Retry-After": "1"}),
                       Fault("status", 500, {"error": {"code": 500000, "message": "internal"}}),
                       Fault("reset")])
        fake.server.fault = lambda request: next(faults, None)
        result = run(tmp_path, fake.env(), "--language", "en", "--workers", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in translation_jobs(tmp_path, "en")] == ["completed"] * 6


def test_deepl_quota_exceeded_stops_the_run(tmp_path):
    make_archive(tmp_path, n_german=5, n_english=0)
    with FakeDeepL() as fake:
        fake.server.fault = lambda request: Fault("status", 456, {"message": "Quota Exceeded"})
        result = run(tmp_path, fake.env(), "--language", "en", "he", "--workers", "2")
        requests = fake.server.count()
    assert result.returncode == 2
    assert "quota" in result.stderr.lower() and "no job was marked failed" in result.stderr
    for language in ("en", "he"):
        assert {r["status"] for r in translation_jobs(tmp_path, language)} == {"not_started"}
    assert requests <= 4  # one per worker and language, then the run stopped


def test_sigkill_mid_run_then_resume_without_retranslating(tmp_path):
    docs = make_archive(tmp_path, n_german=12, n_english=0)
    with FakeDeepL() as fake:
        fake.server.latency = 0.3
        cmd = [sys.executable, SCRIPT, "--db", str(tmp_path / "jobs.db"), "--output-dir", str(tmp_path / "out"),
               "--quiet", "--language", "en", "--workers", "2", "--batch-size", "2"]
        proc = subprocess.Popen(cmd, env=script_env(**fake.env()), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while fake.server.answered < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        done = {r["file_id"] for r in translation_jobs(tmp_path, "en") if r["status"] == "completed"}
        assert 0 < len(done) < 12
        sent_before = len(fake.batches)
        fake.server.latency = 0.0
        result = run(tmp_path, fake.env(), "--language", "en", "--workers", "2")
        resent = [text for batch in fake.batches[sent_before:] for text in batch["texts"]]
    assert result.returncode == 0, result.stderr
    assert {r["status"] for r in translation_jobs(tmp_path, "en")} == {"completed"}
    done_texts = {s["text"] for file_id in done for s in docs[file_id]["segments"]}
    assert not done_texts & set(resent)  # completed translations were not sent again


def test_only_completed_transcripts_are_eligible(tmp_path):
    make_archive(tmp_path, n_german=2, n_english=0)
    db = dbm.DatabaseManager(str(tmp_path / "jobs.db"))
    db.register_files([MediaRecord("/archive/new.mp3", hashlib.sha256(b"new").hexdigest(), 1, 1, "audio")],
                      ["en"])
    db.close_all()
    with FakeDeepL() as fake:
        result = run(tmp_path, fake.env(), "--language", "en", "--json")
    assert result.returncode == 3, result.stderr  # work is left: a transcript is not done
    assert json.loads(result.stdout)["runs"][0]["waiting_for_transcripts"] == 1
    statuses = sorted(r["status"] for r in translation_jobs(tmp_path, "en"))
    assert statuses == ["completed", "completed", "not_started"]


def test_dry_run_counts_characters_and_sends_nothing(tmp_path):
    docs = make_archive(tmp_path, n_german=3, n_english=0)
    with FakeDeepL() as fake:
        result = run(tmp_path, fake.env(), "--language", "he", "--dry-run", "--json")
        assert fake.server.count() == 0
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)["he"]
    assert plan["jobs"] == 3 and plan["estimated_cost_usd"] > 0
    assert plan["characters"] >= sum(len(s["text"]) for d in docs.values() for s in d["segments"])


def test_a_hand_correction_is_adopted_and_its_translations_are_redone_once(tmp_path):
    """The archivist's correction workflow, end to end: edit transcript.srt, the check tool calls
    it edited, adopt_edits makes it the record (keeping the edit), the translations made from the
    old transcript are stale and redone once, and a translation edited by hand is kept first."""
    make_archive(tmp_path, n_german=2, n_english=0)
    tool = lambda name, *args: subprocess.run(  # noqa: E731
        [sys.executable, str(ROOT / "tools" / name), "--db", str(tmp_path / "jobs.db"), "--output-dir",
         str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=60, env=script_env())
    with FakeDeepL() as fake:
        assert run(tmp_path, fake.env(), "--language", "en").returncode == 0
        first = fake.server.count()
        (job, other) = translation_jobs(tmp_path, "en")
        transcript = json.loads(translation_jobs_transcript(tmp_path, job["file_id"]))
        assert job["source_sha256"] == transcript["json"]["sha256"]  # each translation names its source
        srt = recorded_file(tmp_path / "out", transcript["srt"])
        edited = srt.read_text().replace(parse_srt(srt.read_text())[0].text, "Korrigiert von Hand.", 1)
        srt.write_text(edited)
        en_txt = recorded_file(tmp_path / "out", json.loads(job["outputs"])["txt"])
        checked = tool("check_missing_transcripts.py", "--json", "--stage", "transcription")
        kinds = {(p["kind"], p["format"]) for p in json.loads(checked.stdout)["problems"]}
        assert checked.returncode == 1 and kinds == {("edited", "srt")}

        adopted = tool("adopt_edits.py", "--apply")
        assert adopted.returncode == 0 and "adopted 1" in adopted.stdout, adopted.stdout + adopted.stderr
        transcript = json.loads(translation_jobs_transcript(tmp_path, job["file_id"]))
        assert "Korrigiert von Hand." in recorded_file(tmp_path / "out", transcript["json"]).read_text()
        assert "Korrigiert von Hand." in recorded_file(tmp_path / "out", transcript["txt"]).read_text()
        assert [p.read_text() for p in srt.parent.glob("transcript.srt.edited-*")] == [edited]
        stale = tool("check_missing_transcripts.py", "--json", "--stage", "translation")
        assert {(p["kind"], p["file_id"]) for p in json.loads(stale.stdout)["problems"]} == {("stale", job["file_id"])}

        en_txt.write_text("My own better translation.\n" * 5)  # the archivist also edited the old translation
        assert run(tmp_path, fake.env(), "--language", "en").returncode == 0
        assert fake.server.count() > first  # the stale one was translated again ...
        redone = fake.server.count()
        assert run(tmp_path, fake.env(), "--language", "en").returncode == 0
        assert fake.server.count() == redone  # ... once
    assert [p.read_text() for p in en_txt.parent.glob("translation.en.txt.edited-*")] == [
        "My own better translation.\n" * 5]
    assert tool("check_missing_transcripts.py", "--stage", "translation").returncode == 0
    (job, _other) = translation_jobs(tmp_path, "en")
    assert job["source_sha256"] == transcript["json"]["sha256"] and job["status"] == "completed"


def translation_jobs_transcript(tmp_path, file_id) -> str:
    db = dbm.DatabaseManager(str(tmp_path / "jobs.db"))
    try:
        return db.jobs(stage="transcription", file_id=file_id)[0]["outputs"]
    finally:
        db.close_all()


# -- no provider needed: a dry run, same-language copies ------------------------------------------
def test_dry_run_without_a_key_says_no_provider_configured(tmp_path):
    make_archive(tmp_path, n_german=2, n_english=0)
    result = run(tmp_path, {}, "--language", "he", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)["he"]
    assert plan["jobs"] == 2 and plan["characters"] > 0
    assert plan["provider"] is None and plan["estimated_cost_usd"] is None
    text = run(tmp_path, {}, "--language", "he", "--dry-run")
    assert text.returncode == 0 and "no provider configured" in text.stdout


def test_same_language_copies_need_no_key(tmp_path):
    docs = make_archive(tmp_path, n_german=0, n_english=3)
    result = run(tmp_path, {}, "--language", "en", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runs"][0]["completed"] == 3
    jobs = translation_jobs(tmp_path, "en")
    assert {j["status"] for j in jobs} == {"completed"} and {j["provider"] for j in jobs} == {"copy"}
    for job in jobs:
        data = json.loads(recorded_file(tmp_path / "out", json.loads(job["outputs"])["json"]).read_text())
        assert [s["text"] for s in data["segments"]] == [s["text"] for s in docs[job["file_id"]]["segments"]]


def test_jobs_that_need_a_provider_without_one_still_exit_2(tmp_path):
    make_archive(tmp_path, n_german=2, n_english=2)
    result = run(tmp_path, {}, "--language", "en")
    assert result.returncode == 2
    assert "no translation provider configured for en" in result.stderr and "Traceback" not in result.stderr
    assert {j["status"] for j in translation_jobs(tmp_path, "en")} == {"not_started"}
