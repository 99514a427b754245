"""The fault-injection suite: inject each fault of the matrix in ../shared/reference/reliability.md
on this machine and assert what must hold afterwards. Run alone with ``pytest -m faults``.

Each test drives the real scripts as subprocesses (or the real runner in-process where the fault
must be injected inside the process) against fake providers on 127.0.0.1.
"""

import errno
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import mediagen
from benchmarks.fake_translate import FakeDeepL
from benchmarks.fakeserver import Fault, FakeServer
from pipeline.faults import POINTS
from pipeline.limiter import PROBE_INTERVAL
from pipeline.outputs import sha256_file
from tests.conftest import ROOT, recorded_file, script_env
from tests.fake_stt import FakeSTT, env_for
from tests.fakeclock import FakeClock
from tests.test_parallel_translation import make_archive

pytestmark = pytest.mark.faults

TRANSCRIBE = str(ROOT / "parallel_transcription.py")
TRANSLATE = str(ROOT / "parallel_translation.py")


# -- helpers ------------------------------------------------------------------------------------

@pytest.fixture
def stt():
    server = FakeServer().start()
    yield FakeSTT(server)
    server.stop()


def tones(folder: Path, n: int, seconds: float = 1.0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [mediagen.make_tone(folder / f"f{i:03d}.{('wav', 'ogg')[i % 2]}", freq=300 + 20 * i, seconds=seconds)
            for i in range(n)]


def command(script, tmp_path, *args):
    return [sys.executable, script, "--db", str(tmp_path / "jobs.db"), "--output-dir", str(tmp_path / "out"),
            "--quiet", *args]


def run(script, tmp_path, env, *args, timeout=240):
    return subprocess.run(command(script, tmp_path, *args), capture_output=True, text=True, timeout=timeout,
                          env=script_env(**env))


def db_rows(tmp_path, sql, params=()):
    conn = sqlite3.connect(tmp_path / "jobs.db")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def assert_exactly_once_and_verified(tmp_path, stage, language="", expected=None):
    """Every job completed exactly once, outputs verify, nothing in progress, DB intact, no temp files."""
    jobs = db_rows(tmp_path, "SELECT * FROM jobs WHERE stage = ? AND language = ?", (stage, language))
    assert expected is None or len(jobs) == expected
    assert {j["status"] for j in jobs} == {"completed"}, Counter(j["status"] for j in jobs)
    completions = Counter(r["job_id"] for r in db_rows(tmp_path, "SELECT job_id FROM events WHERE to_status = "
                                                                 "'completed'"))
    assert all(completions[j["id"]] == 1 for j in jobs), "a job was completed more than once"
    for job in jobs:
        for info in json.loads(job["outputs"]).values():
            path = recorded_file(tmp_path / "out", info)  # recorded relative to the output root
            assert sha256_file(path) == info["sha256"] and os.path.getsize(path) == info["size"]
            assert not os.path.isabs(info["path"]) and path.is_relative_to((tmp_path / "out").resolve())
    assert db_rows(tmp_path, "PRAGMA integrity_check")[0][0] == "ok"
    assert not db_rows(tmp_path, "SELECT 1 FROM jobs WHERE status = 'in_progress'")
    assert list((tmp_path / "out").rglob("*.tmp")) == []


SPOOLED_WITHIN = 0.1  # seconds an answer may take, once written out, to reach the client's spool


def kill_loop(cmd, env, kills, rng, server, low=0.3, high=1.5) -> int:
    """Start and SIGKILL the command ``kills`` times; returns how many of its requests a kill
    could cost: those the server still held at the kill, and those answered in the instant
    before it (their answer may not have reached the spool yet). Nothing else may be paid again."""
    exposed = 0
    for _ in range(kills):
        proc = subprocess.Popen(cmd, env=script_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(low, high))
        with server.lock:
            killed_at, held = time.monotonic(), server.in_flight
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        with server.lock:
            exposed += held + sum(1 for t in server.answered_at if killed_at - SPOOLED_WITHIN <= t <= killed_at)
    return exposed


# -- kill loops ---------------------------------------------------------------------------------

def test_kill_loop_transcription(stt, tmp_path):
    files, workers, kills = 40, 4, 20
    tones(tmp_path / "in", files)
    stt.server.latency = 0.15
    env = env_for(stt)
    assert run(TRANSCRIBE, tmp_path, env, "--input", str(tmp_path / "in"), "--dry-run").returncode == 0
    interrupted = kill_loop(command(TRANSCRIBE, tmp_path, "--workers", str(workers), "--batch-size", "4"), env,
                            kills, random.Random(7), stt.server)
    final = run(TRANSCRIBE, tmp_path, env, "--workers", str(workers))
    assert final.returncode == 0, final.stderr
    assert_exactly_once_and_verified(tmp_path, "transcription", expected=files)
    assert_nothing_left_over(tmp_path)
    # Every answer is spooled before it is used: a kill costs only the requests it interrupted.
    assert stt.server.count() <= files + interrupted, (stt.server.count(), interrupted)


def test_kill_loop_translation(tmp_path):
    make_archive(tmp_path, n_german=20, n_english=0)
    workers, kills = 2, 10
    with FakeDeepL() as fake:
        fake.server.latency = 0.15
        interrupted = kill_loop(command(TRANSLATE, tmp_path, "--language", "he", "--workers", str(workers),
                                        "--batch-size", "2"), fake.env(), kills, random.Random(11), fake.server,
                                low=0.4, high=1.6)
        final = run(TRANSLATE, tmp_path, fake.env(), "--language", "he", "--workers", str(workers))
        requests = fake.server.count()
    assert final.returncode == 0, final.stderr
    assert_exactly_once_and_verified(tmp_path, "translation", "he", expected=20)
    assert_nothing_left_over(tmp_path)
    assert requests <= 20 + interrupted, (requests, interrupted)  # one request per transcript, once


def assert_nothing_left_over(tmp_path):
    """No attempt's staging folder and no spooled answer outlive a finished run."""
    state = tmp_path / "out" / ".verbatim"  # rglob of a folder that does not exist finds nothing
    assert [p for p in state.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("point", POINTS)
def test_named_crash_points_then_rerun(point, stt, tmp_path):
    tones(tmp_path / "in", 3)
    env = env_for(stt)
    crashed = run(TRANSCRIBE, tmp_path, {**env, "VERBATIM_CRASH_AT": point}, "--input", str(tmp_path / "in"),
                  "--workers", "1")
    assert crashed.returncode == -signal.SIGKILL
    sent = stt.server.count()
    assert sent == (0 if point == "after_claim" else 1)
    rerun = run(TRANSCRIBE, tmp_path, env, "--workers", "1")
    assert rerun.returncode == 0, rerun.stderr
    assert_exactly_once_and_verified(tmp_path, "transcription", expected=3)
    assert_nothing_left_over(tmp_path)
    # An answer the crash left behind (spooled, staged or committed) is not paid for again:
    # the rerun sends only the files that were never answered.
    assert stt.server.count() == 3


@pytest.mark.parametrize("point", ["after_api", "before_commit", "after_commit"])
def test_named_crash_point_in_translation(point, tmp_path):
    make_archive(tmp_path, n_german=2, n_english=0)
    with FakeDeepL() as fake:
        crashed = run(TRANSLATE, tmp_path, {**fake.env(), "VERBATIM_CRASH_AT": point}, "--language", "en",
                      "--workers", "1")
        assert crashed.returncode == -signal.SIGKILL
        sent = fake.server.count()
        rerun = run(TRANSLATE, tmp_path, fake.env(), "--language", "en", "--workers", "1")
        assert rerun.returncode == 0, rerun.stderr
        assert fake.server.count() - sent == 1  # only the transcript that was never answered
    assert_exactly_once_and_verified(tmp_path, "translation", "en", expected=2)
    assert_nothing_left_over(tmp_path)


# -- rate limits --------------------------------------------------------------------------------

def test_429_storm_is_waited_out_without_multiplying_requests(stt, tmp_path):
    files, workers = 80, 8
    tones(tmp_path / "in", files, seconds=0.6)
    assert run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"), "--dry-run").returncode == 0
    storm = {}

    def storm_fault(request):
        start = storm.setdefault("start", time.monotonic())
        if time.monotonic() - start < 10:
            return Fault("status", 429, {"error": {"message": "Rate limit reached for requests",
                                                   "type": "requests", "code": "rate_limit_exceeded"}},
                         {"Retry-After": "1"})
        return None

    stt.server.fault = storm_fault
    result = run(TRANSCRIBE, tmp_path, env_for(stt), "--workers", str(workers), "--json")
    assert result.returncode == 0, result.stderr
    counts = db_rows(tmp_path, "SELECT status, COUNT(*) FROM jobs WHERE stage='transcription' GROUP BY status")
    assert dict(counts) == {"completed": files}
    assert stt.server.count() <= 1.2 * files + workers, stt.server.count()


def test_concurrency_cap_is_learned(stt, tmp_path):
    files, workers, cap = 64, 32, 5
    tones(tmp_path / "in", files, seconds=0.6)
    assert run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"), "--dry-run").returncode == 0
    stt.server.latency = 0.25
    stt.server.concurrency_cap = cap
    result = run(TRANSCRIBE, tmp_path, env_for(stt), "--provider", "elevenlabs", "--workers", str(workers))
    assert result.returncode == 0, result.stderr
    assert dict(db_rows(tmp_path, "SELECT status, COUNT(*) FROM jobs WHERE stage = 'transcription'"
                        " GROUP BY status")) == {"completed": files}
    # The first wave learns the cap. From the fake's ordered log, not from seconds: once a request
    # accepted after the first refusal has succeeded, no request meets the cap again (a probe
    # above it is allowed once per probe interval; this run is far shorter than one) ...
    log = stt.server.cap_log
    first_refusal = next(i for i, entry in enumerate(log) if entry[0] == "reject")
    learned = next(i for i in range(first_refusal, len(log)) if log[i][0] == "done")
    late = [entry for entry in log[learned:] if entry[0] == "reject"]
    assert len(late) <= (log[-1][2] - log[learned][2]) // PROBE_INTERVAL, late
    assert 0 < stt.server.rejected_for_concurrency <= workers
    # ... and the cap is used to the end of the run, not undershot
    second_half = [level for event, level, _at in log[len(log) // 2:] if event == "accept"]
    assert max(second_half) == cap


# -- server faults ------------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_thirty_percent_server_errors(stt, tmp_path):
    files = 30
    tones(tmp_path / "in", files)
    rng, lock = random.Random(3), threading.Lock()

    def flaky(request):
        with lock:
            return Fault("status", rng.choice([500, 502, 503]), "upstream error") if rng.random() < 0.3 else None

    stt.server.fault = flaky
    result = run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"), "--workers", "6")
    assert result.returncode in (0, 1), result.stderr
    jobs = db_rows(tmp_path, "SELECT status, error_class, attempts FROM jobs WHERE stage='transcription'")
    assert all(j["status"] == "completed" or (j["status"] == "failed" and j["error_class"]) for j in jobs)
    assert sum(j["status"] == "completed" for j in jobs) >= files - 1
    assert all(j["attempts"] <= 5 for j in jobs)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["reset", "reset_mid_body", "truncate", "garbage", "hang"])
def test_broken_responses_are_retried_and_never_completed_empty(kind, stt, tmp_path):
    tones(tmp_path / "in", 4)
    broken = {"left": 3}
    lock = threading.Lock()

    def fault(request):
        with lock:
            if broken["left"]:
                broken["left"] -= 1
                return Fault(kind)
        return None

    stt.server.fault = fault
    held_before = stt.server.holding
    result = run(TRANSCRIBE, tmp_path, {**env_for(stt), "VERBATIM_REQUEST_TIMEOUT": "2"},
                 "--input", str(tmp_path / "in"), "--workers", "4", timeout=120)
    assert result.returncode == 0, result.stderr
    if kind == "hang":  # the run was done while the server still held the three hung requests
        assert stt.server.holding - held_before == 3
    assert_exactly_once_and_verified(tmp_path, "transcription", expected=4)
    for row in db_rows(tmp_path, "SELECT outputs FROM jobs WHERE stage='transcription'"):
        text = recorded_file(tmp_path / "out", json.loads(row["outputs"])["txt"]).read_text()
        assert "tone" in text  # real content, never the broken body
    retried = db_rows(tmp_path, "SELECT error_class FROM events WHERE to_status = 'not_started' AND error_class"
                                " IS NOT NULL")
    assert len(retried) == 3 and {r[0] for r in retried} <= {"connection", "invalid_response", "timeout"}


# -- account faults -----------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [
    Fault("status", 401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}),
    Fault("status", 429, {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}}),
])
def test_account_faults_stop_transcription(fault, stt, tmp_path):
    tones(tmp_path / "in", 6)
    stt.server.fault = lambda request: fault
    # 4 workers run on 5 threads: the spare one, waiting for a request slot, must not send either
    result = run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"), "--workers", "4")
    assert result.returncode == 2
    assert result.stderr.count("error: ") == 1  # one clear message
    assert dict(db_rows(tmp_path, "SELECT status, COUNT(*) FROM jobs WHERE stage='transcription'"
                                  " GROUP BY status")) == {"not_started": 6}
    assert stt.server.count() <= 4


def test_deepl_456_stops_translation(tmp_path):
    make_archive(tmp_path, n_german=4, n_english=0)
    with FakeDeepL() as fake:
        fake.server.fault = lambda request: Fault("status", 456, {"message": "Quota Exceeded"})
        result = run(TRANSLATE, tmp_path, fake.env(), "--language", "he", "--workers", "2")
    assert result.returncode == 2 and result.stderr.count("error: ") == 1
    assert {r[0] for r in db_rows(tmp_path, "SELECT status FROM jobs WHERE stage='translation'")} == {"not_started"}


# -- bad inputs ---------------------------------------------------------------------------------

def test_bad_inputs_fail_with_reasons_and_the_batch_continues(stt, tmp_path):
    good = tones(tmp_path / "in", 3)
    mediagen.make_empty(tmp_path / "in" / "empty.mp3")
    mediagen.make_truncated(good[0], tmp_path / "in" / "truncated.wav", keep_bytes=44)
    mediagen.make_text_as_audio(tmp_path / "in" / "notes.mp3")
    mediagen.make_video_without_audio(tmp_path / "in" / "silent.mp4")
    result = run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"), "--workers", "3")
    assert result.returncode == 1
    rows = {Path(r["path_display"]).name: r for r in db_rows(
        tmp_path, "SELECT j.*, m.path_display FROM jobs j JOIN media_files m USING (file_id)"
                  " WHERE stage='transcription'")}
    assert all(rows[p.name]["status"] == "completed" for p in good)
    for name in ("empty.mp3", "truncated.wav", "notes.mp3", "silent.mp4"):
        assert rows[name]["status"] == "failed" and rows[name]["error_class"] and rows[name]["error_message"]
        assert rows[name]["attempts"] == 1


_NAME_PARTS = st.sampled_from(["\n", "../", "..", "-", "--", " ", "\t", "ü", "ש", "\udcff", "\udc80", "a", "b",
                               "interview", "'", '"', "$HOME", "*", "é"])


@st.composite
def odd_names(draw):
    parts = draw(st.lists(_NAME_PARTS, min_size=1, max_size=12))
    name = "".join(parts).replace("/", "_")
    if draw(st.booleans()):
        name = "-" + name
    if draw(st.booleans()):
        name += "x" * draw(st.integers(100, 200))
    return name[:240] + draw(st.sampled_from([".wav", ".ogg", ".mp3"]))


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(odd_names(), min_size=4, max_size=6, unique=True))
def test_generated_file_names_stay_under_the_output_root(names, stt, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("names")
    source = mediagen.make_tone(tmp_path / "source.wav", freq=500, seconds=0.8)
    folder = tmp_path / "in"
    folder.mkdir()
    made = 0
    for i, name in enumerate(names):
        try:  # a different tone per file, so every file is distinct content
            mediagen.make_tone(os.path.join(os.fsencode(folder), os.fsencode(name)), freq=400 + 40 * i, seconds=0.8)
            made += 1
        except OSError:  # a name this file system refuses (too long once encoded): nothing to test
            continue
    del source
    result = run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(folder), "--workers", "3", "--json")
    assert result.returncode in (0, 1), result.stderr
    rows = db_rows(tmp_path, "SELECT * FROM jobs WHERE stage='transcription'")
    hidden = sum(1 for n in names if n.startswith("."))
    assert len(rows) == made - hidden
    assert all(r["status"] in ("completed", "failed") for r in rows)
    assert all(r["status"] == "completed" for r in rows)  # real audio, odd names: all transcribed
    folders = set()
    for row in rows:
        for info in json.loads(row["outputs"]).values():
            path = recorded_file(tmp_path / "out", info)
            assert not os.path.isabs(info["path"]) and path.is_relative_to((tmp_path / "out").resolve())
            folders.add(path.parent)
    assert len(folders) == len(rows)  # distinct inputs, distinct outputs


# -- disk errors --------------------------------------------------------------------------------

def test_disk_errors_on_output_writes(stt, tmp_path, monkeypatch):
    """EIO from fsync: the attempt fails retryably, no partial final file. (ENOSPC, EDQUOT, EROFS
    and EACCES are the machine's faults and stop the run: tests/test_hostile.py.)"""
    import db_manager as dbm
    from pipeline.work import TranscriptionWork
    from pipeline import outputs
    from pipeline.limiter import ProviderLimiter, RunRequests
    from pipeline.media import register_inputs
    from pipeline.runner import RunOptions, Runner, StopSignal
    from transcription import OpenAITranscriber

    tones(tmp_path / "in", 2)
    db = dbm.DatabaseManager(str(tmp_path / "jobs.db"))
    register_inputs(db, [str(tmp_path / "in")], [])
    failures = {"left": 2, "seen_final": []}
    real = outputs._write_durably

    def broken(handle, data):
        if failures["left"]:
            failures["left"] -= 1
            temp = Path(handle.name)
            final = temp.parent / temp.name[1:].rsplit(".", 3)[0]
            handle.write(data)
            handle.flush()
            failures["seen_final"].append(final.exists())
            raise OSError(errno.EIO, "Input/output error")
        return real(handle, data)

    monkeypatch.setattr(outputs, "_write_durably", broken)
    transcriber = OpenAITranscriber(api_key=stt.openai_key, base_url=stt.openai_base_url)
    stop = StopSignal()
    call = RunRequests(ProviderLimiter("openai"), 1, stop.stop)
    work = TranscriptionWork(db, transcriber, call, str(tmp_path / "out"))
    summary = Runner(db, RunOptions("transcription", workers=1, batch_size=1, quiet=True,
                                    output_root=str(tmp_path / "out")), work, stop=stop).run()
    assert summary.completed == 2 and summary.retried == 2
    assert summary.errors["disk"] == 2
    assert not any(failures["seen_final"])  # the final name never held a partial file
    db.close_all()
    assert_exactly_once_and_verified(tmp_path, "transcription", expected=2)


# -- concurrency --------------------------------------------------------------------------------

def test_two_runs_at_once_process_each_job_once(stt, tmp_path):
    files = 30
    tones(tmp_path / "in", files)
    assert run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"), "--dry-run").returncode == 0
    stt.server.latency = 0.1
    cmd = command(TRANSCRIBE, tmp_path, "--workers", "4", "--batch-size", "3")
    procs = [subprocess.Popen(cmd, env=script_env(**env_for(stt)), stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert_exactly_once_and_verified(tmp_path, "transcription", expected=files)
    assert stt.server.count() == files  # not one file sent twice
    owners = {r[0] for r in db_rows(tmp_path, "SELECT DISTINCT owner FROM events WHERE to_status='completed'")}
    assert len(owners) == 2  # both runs really worked
    assert not db_rows(tmp_path, "SELECT 1 FROM events WHERE error_message LIKE '%locked%'")


def test_transcription_and_translation_at_once(stt, tmp_path):
    files = 12
    tones(tmp_path / "in", files)
    assert run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"), "--dry-run").returncode == 0
    stt.server.latency = 0.2
    with FakeDeepL() as deepl:
        env = {**env_for(stt), **deepl.env(), "VERBATIM_TRANSLATION_PROVIDER": "deepl"}
        transcribe = subprocess.Popen(command(TRANSCRIBE, tmp_path, "--workers", "2"), env=script_env(**env),
                                      stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # the translation run starts while transcripts are being produced
        translate = subprocess.Popen(command(TRANSLATE, tmp_path, "--language", "he", "--workers", "2"),
                                     env=script_env(**env), stderr=subprocess.PIPE, text=True)
        errors = [transcribe.communicate(timeout=180)[1], translate.communicate(timeout=180)[1]]
        assert [transcribe.returncode, translate.returncode] == [0, 0], errors
    assert_exactly_once_and_verified(tmp_path, "transcription", expected=files)
    assert_exactly_once_and_verified(tmp_path, "translation", "he", expected=files)
    assert not db_rows(tmp_path, "SELECT 1 FROM events WHERE error_message LIKE '%locked%'")


# -- lease lost ---------------------------------------------------------------------------------

def test_a_lease_that_expires_while_the_worker_runs(stt, tmp_path):
    import db_manager as dbm
    from pipeline.work import TranscriptionWork
    from pipeline.limiter import ProviderLimiter, RunRequests
    from pipeline.media import register_inputs
    from pipeline.runner import RunOptions, Runner, StopSignal
    from transcription import OpenAITranscriber

    tones(tmp_path / "in", 1)
    db = dbm.DatabaseManager(str(tmp_path / "jobs.db"))
    register_inputs(db, [str(tmp_path / "in")], [])
    stt.server.latency = 1.0
    stop = StopSignal()
    transcriber = OpenAITranscriber(api_key=stt.openai_key, base_url=stt.openai_base_url)
    call = RunRequests(ProviderLimiter("openai"), 1, stop.stop)
    work = TranscriptionWork(db, transcriber, call, str(tmp_path / "out"))
    # The worker is alive but its heartbeat stalls: the runner's clock never moves, so it never beats.
    runner = Runner(db, RunOptions("transcription", workers=1, lease_seconds=10, limit=1, quiet=True,
                                   output_root=str(tmp_path / "out")), work,
                    stop=stop, owner=dbm.make_owner(host="paused-laptop"), clock=FakeClock())
    thread = threading.Thread(target=runner.run)
    thread.start()
    deadline = time.monotonic() + 30
    while not stt.server.count() and time.monotonic() < deadline:  # its request is out
        time.sleep(0.01)
    assert db.reclaim(now=time.time() + 11)  # the lease expired: another run takes over and finishes first
    stt.server.latency = 0.0
    other = Runner(db, RunOptions("transcription", workers=1, quiet=True, output_root=str(tmp_path / "out")), work,
                   stop=StopSignal())
    assert other.run().completed == 1
    thread.join(30)
    assert runner.summary.lease_lost == 1 and runner.summary.completed == 0
    db.close_all()
    assert_exactly_once_and_verified(tmp_path, "transcription", expected=1)


# -- secrets ------------------------------------------------------------------------------------

def test_canary_keys_never_leak(tmp_path):
    canary_stt, canary_deepl = "sk-CANARY-stt-91c2f0aa", "CANARY-deepl-5be1:fx"
    server = FakeServer().start()
    try:
        stt = FakeSTT(server, openai_key=canary_stt)
        tones(tmp_path / "in", 2)
        mediagen.make_text_as_audio(tmp_path / "in" / "broken.mp3")
        outputs = [run(TRANSCRIBE, tmp_path, {**env_for(stt), "VERBATIM_DEBUG": "1"}, "--input",
                       str(tmp_path / "in"), "-v", "--json")]
        with FakeDeepL(key=canary_deepl) as deepl:
            env = {**deepl.env(), "VERBATIM_DEBUG": "1"}
            outputs.append(run(TRANSLATE, tmp_path, env, "--language", "he", "-v", "--json"))
            bad_key = {**env, "DEEPL_API_KEY": canary_deepl.replace("5be1", "0000")}
            outputs.append(run(TRANSLATE, tmp_path, bad_key, "--language", "en", "-v", "--json"))
        outputs.append(subprocess.run([sys.executable, str(ROOT / "tools/status.py"), "--db",
                                       str(tmp_path / "jobs.db"), "--files", "--json", "--failed"],
                                      capture_output=True, text=True, env=script_env(**env_for(stt))))
    finally:
        server.stop()
    assert outputs[1].returncode == 0 and outputs[2].returncode == 2
    assert "DEBUG" in outputs[0].stderr
    texts = [o.stdout + o.stderr for o in outputs]
    texts += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()
              and p.suffix not in (".wav", ".ogg", ".mp3")]
    for canary in (canary_stt, canary_deepl, canary_deepl.replace("5be1", "0000")):
        assert all(canary not in text for text in texts), canary
