"""The fence carried past the database row (issue: fence everything a job touches): attempts
stage their outputs and only the committed winner publishes; owners prove who they are; a live
owner is never robbed by a clock; a lost lease cancels its attempt; a failed commit is retried and
never dropped; every paid answer is spooled and never bought twice. Each test attacks the way the
world does: another container, a paused process, a clock ahead, a database locked by another
program, a kill at every step.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from benchmarks.fakeserver import FakeServer
from pipeline.outputs import sha256_file
from tests.conftest import ROOT, recorded_file, script_env
from tests.fake_stt import FakeSTT, env_for
from tests.test_faults import (TRANSCRIBE, TRANSLATE, assert_exactly_once_and_verified, assert_nothing_left_over,
                               command, db_rows, run, tones)

pytestmark = pytest.mark.faults


@pytest.fixture
def stt():
    server = FakeServer().start()
    yield FakeSTT(server)
    server.stop()


def _wait_for_requests(server, n, timeout=60):
    deadline = time.monotonic() + timeout
    while server.count() < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.count() >= n


def _can(*cmd) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can("unshare", "--pid", "--fork", "--mount-proc", "true"),
                    reason="unshare of a PID namespace is not permitted here")
def test_a_run_in_its_own_pid_namespace_and_one_outside_pay_once(stt, tmp_path):
    """Two containers sharing the host's name: pids of one mean nothing (or another process) in
    the other, so neither may take the other's live jobs for dead."""
    files = 8
    tones(tmp_path / "in", files)
    assert run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"), "--dry-run").returncode == 0
    stt.server.latency = 1.0
    inside = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc",
                               *command(TRANSCRIBE, tmp_path, "--workers", "4")],
                              env=script_env(**env_for(stt)), stderr=subprocess.PIPE, text=True)
    _wait_for_requests(stt.server, 4)
    outside = run(TRANSCRIBE, tmp_path, env_for(stt), "--workers", "4")
    assert inside.wait(120) == 0 and outside.returncode == 0, (inside.stderr.read(), outside.stderr)
    assert_exactly_once_and_verified(tmp_path, "transcription", expected=files)
    assert stt.server.count() == files  # nothing sent twice


@pytest.mark.skipif(not _can("faketime", "-f", "+10m", "true"), reason="faketime is not installed")
def test_a_run_with_its_clock_ahead_steals_nothing_from_a_live_owner(stt, tmp_path):
    files = 8
    tones(tmp_path / "in", files)
    assert run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"), "--dry-run").returncode == 0
    stt.server.latency = 1.0
    first = subprocess.Popen(command(TRANSCRIBE, tmp_path, "--workers", "4"), env=script_env(**env_for(stt)),
                             stderr=subprocess.PIPE, text=True)
    _wait_for_requests(stt.server, 4)
    ahead = subprocess.run(["faketime", "-f", "+10m", *command(TRANSCRIBE, tmp_path, "--workers", "4")],
                           env=script_env(**env_for(stt)), capture_output=True, text=True, timeout=120)
    assert first.wait(120) == 0 and ahead.returncode == 0, (first.stderr.read(), ahead.stderr)
    assert_exactly_once_and_verified(tmp_path, "transcription", expected=files)
    assert stt.server.count() == files  # the live owner's leases "expired" by the other clock, and stood


def _stopped(pid: int) -> bool:
    from pipeline.identity import process_stat

    stat = process_stat(pid)
    return stat is not None and stat[0] == "T"


def _pause_outside_a_transaction(proc, db_file):
    """SIGSTOP ``proc`` at a moment it holds no write lock (a process paused inside a write
    transaction blocks every writer until it continues: that is SQLite's, not ours to test)."""
    while True:
        proc.send_signal(signal.SIGSTOP)
        while not _stopped(proc.pid):
            time.sleep(0.01)
        probe = sqlite3.connect(db_file, timeout=0.2, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        finally:
            probe.close()


def test_a_paused_run_that_lost_its_lease_never_overwrites_the_winner(stt, tmp_path):
    """Run A sends a request and is paused (SIGSTOP: a laptop lid, a VM pause) past its lease;
    run B takes the job over, pays again and completes; A continues and gets its answer. A's
    files must never reach the final names: they hold what the database recorded (B's), and the
    translations made from them still complete."""
    from benchmarks.fake_translate import FakeDeepL

    tones(tmp_path / "in", 2)
    env = env_for(stt)
    assert run(TRANSCRIBE, tmp_path, env, "--input", str(tmp_path / "in"), "--dry-run").returncode == 0
    stt.server.latency = 2.0
    paused = subprocess.Popen(command(TRANSCRIBE, tmp_path, "--workers", "1", "--lease-seconds", "1"),
                              env=script_env(**env), stderr=subprocess.PIPE, text=True)
    _wait_for_requests(stt.server, 1)
    _pause_outside_a_transaction(paused, tmp_path / "jobs.db")
    try:
        deadline = time.monotonic() + 30
        while not _stopped(paused.pid) or db_rows(tmp_path, "SELECT 1 FROM jobs WHERE status = 'in_progress'"
                                                            " AND lease_expires_at > ?", (time.time(),)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stt.server.latency = 0.0
        winner = run(TRANSCRIBE, tmp_path, env, "--workers", "1")
        assert winner.returncode == 0, winner.stderr
        recorded = {r["id"]: r["outputs"] for r in db_rows(tmp_path, "SELECT id, outputs FROM jobs"
                                                                      " WHERE stage = 'transcription'")}
    finally:
        paused.send_signal(signal.SIGCONT)
    assert paused.wait(60) == 0, paused.stderr.read()
    assert stt.server.count() == 3  # A's request (never answered in time), then B's two
    assert {r["id"]: r["outputs"] for r in db_rows(tmp_path, "SELECT id, outputs FROM jobs"
                                                             " WHERE stage = 'transcription'")} == recorded
    assert_exactly_once_and_verified(tmp_path, "transcription", expected=2)
    assert_nothing_left_over(tmp_path)
    with FakeDeepL() as deepl:
        translated = run(TRANSLATE, tmp_path, {**deepl.env(), "VERBATIM_TRANSLATION_PROVIDER": "deepl"},
                         "--language", "he")
    assert translated.returncode == 0, translated.stderr
    assert_exactly_once_and_verified(tmp_path, "translation", "he", expected=2)


def _in_process_run(stt, tmp_path, *, db=None, owner=None, lease_seconds=300.0, commit_patience=600.0, files=1,
                    seconds=1.0):
    """A transcription run in this process (so a test can hold the database or steal a lease)."""
    import db_manager as dbm
    from pipeline.work import TranscriptionWork
    from pipeline.limiter import ProviderLimiter, RunRequests
    from pipeline.media import register_inputs
    from pipeline.runner import RunOptions, Runner, StopSignal
    from transcription import OpenAITranscriber

    if not (tmp_path / "in").exists():
        tones(tmp_path / "in", files, seconds=seconds)
    db = db or dbm.DatabaseManager(str(tmp_path / "jobs.db"))
    register_inputs(db, [str(tmp_path / "in")], [])
    stop = StopSignal()
    transcriber = OpenAITranscriber(api_key=stt.openai_key, base_url=stt.openai_base_url)
    work = TranscriptionWork(db, transcriber, RunRequests(ProviderLimiter("openai"), 1, stop.stop), str(tmp_path / "out"))
    options = RunOptions("transcription", workers=1, quiet=True, lease_seconds=lease_seconds,
                         commit_patience=commit_patience, output_root=str(tmp_path / "out"))
    return db, Runner(db, options, work, stop=stop, owner=owner), stop


def test_a_lost_lease_cancels_the_attempt(stt, tmp_path, monkeypatch):
    """The heartbeat finds the lease gone while the job still has requests to make: it sends no
    more of them, writes nothing and tries no commit; the attempt counts as lease_lost."""
    import db_manager as dbm
    from pipeline import audio

    stolen = threading.Event()

    def steal(request):
        if not stolen.is_set():  # while the first chunk is out, another machine takes the job over
            stolen.set()
            assert db.reclaim(now=time.time() + 5)
            assert db.claim(dbm.make_owner("thief", host="other-machine"), "transcription")
            deadline = time.monotonic() + 10
            while not runner._held or not all(j.cancel.is_set() for j in runner._held.values()):
                assert time.monotonic() < deadline, "the heartbeat never cancelled the attempt"
                time.sleep(0.01)
        return None

    tones(tmp_path / "in", 1, seconds=4.0)
    db, runner, _stop = _in_process_run(stt, tmp_path, owner=dbm.make_owner(host="paused-laptop"), lease_seconds=0.3)
    chunks = []
    monkeypatch.setattr(audio, "prepare", _split_in_four(chunks))
    stt.server.fault = steal
    summary = runner.run()
    assert summary.lease_lost == 1 and summary.completed == 0
    assert stt.server.count() == 1 < len(chunks)  # the other chunks were never sent
    events = db.events(file_id=db.jobs(stage="transcription")[0]["file_id"])
    assert not [e for e in events if e["to_status"] == "refused"]  # no commit was even tried
    assert not (tmp_path / "out" / ".verbatim" / "staging").exists() or not any(
        (tmp_path / "out" / ".verbatim" / "staging").iterdir())
    db.close_all()


def _split_in_four(seen):
    """audio.prepare, but always four chunks (as a long interview is split)."""
    from pipeline import audio

    def four(path, workdir, **kwargs):
        info = kwargs.get("info") or audio.probe(path)
        quarter = info.duration / 4
        parts = []
        for n in range(4):
            out = os.path.join(workdir, f"part{n}.wav")
            subprocess.run([audio.ffmpeg_path(), "-v", "error", "-y", "-ss", str(n * quarter), "-t", str(quarter),
                            "-i", os.fsdecode(path), out], check=True)
            parts.append(audio.Chunk(out, n * quarter, quarter))
        seen.extend(parts)
        return parts

    return four


def test_a_completion_waits_out_a_database_locked_by_another_program(stt, tmp_path):
    """A backup tool or a database browser holds an exclusive lock for longer than the commit's
    first tries: the answer is kept, the commit retried, and the run ends completed with exit 0."""
    import db_manager as dbm
    from pipeline.runner import exit_code

    db = dbm.DatabaseManager(str(tmp_path / "jobs.db"), busy_timeout=0.1)
    db, runner, stop = _in_process_run(stt, tmp_path, db=db)
    holder = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None, check_same_thread=False)

    def lock(request):
        if not holder.in_transaction:
            holder.execute("BEGIN EXCLUSIVE")
            threading.Timer(2.0, holder.execute, ("COMMIT",)).start()
        return None

    stt.server.fault = lock
    summary = runner.run()
    holder.close()
    assert summary.completed == 1 and exit_code([summary], stop) == 0
    db.close_all()
    assert_exactly_once_and_verified(tmp_path, "transcription", expected=1)
    assert stt.server.count() == 1


def test_an_answer_that_cannot_be_recorded_is_kept_and_the_next_run_pays_nothing(stt, tmp_path):
    """The database stays unwritable (a lock held for good, a full disk) past the commit's
    patience: the run stops with exit 2 and says so; the paid answer is in the spool, and the
    next run records it without a request."""
    import db_manager as dbm
    from pipeline.runner import exit_code

    db = dbm.DatabaseManager(str(tmp_path / "jobs.db"), busy_timeout=0.1)
    # as if the run were its own process, gone when the next run starts
    gone = subprocess.Popen(["true"])
    gone.wait()
    host, boot, namespace, *_ = dbm.make_owner().split(":")
    owner = ":".join((host, boot, namespace, str(gone.pid), "1", "gone"))
    db, runner, stop = _in_process_run(stt, tmp_path, db=db, commit_patience=1.0, files=2, owner=owner)
    holder = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None, check_same_thread=False)

    def lock(request):
        if not holder.in_transaction:
            holder.execute("BEGIN EXCLUSIVE")
        return None

    stt.server.fault = lock
    summary = runner.run()
    assert exit_code([summary], stop) == 2 and "spool" in stop.unrecorded
    assert summary.completed == 0
    holder.execute("ROLLBACK")
    holder.close()
    db.close_all()
    sent = stt.server.count()
    stt.server.fault = None
    rerun = run(TRANSCRIBE, tmp_path, env_for(stt), "--workers", "1")
    assert rerun.returncode == 0, rerun.stderr
    assert_exactly_once_and_verified(tmp_path, "transcription", expected=2)
    assert_nothing_left_over(tmp_path)
    assert stt.server.count() - sent == 2 - sent  # the answer bought before is not bought again


@pytest.mark.parametrize("tool", ["status.py", "check_missing_transcripts.py"])
def test_the_tools_finish_a_publication_a_crash_left_between_commit_and_rename(tool, stt, tmp_path):
    tones(tmp_path / "in", 2)
    crashed = run(TRANSCRIBE, tmp_path, {**env_for(stt), "VERBATIM_CRASH_AT": "after_commit"},
                  "--input", str(tmp_path / "in"), "--workers", "1")
    assert crashed.returncode == -signal.SIGKILL
    (row,) = db_rows(tmp_path, "SELECT outputs FROM jobs WHERE status = 'completed'")
    assert not any(recorded_file(tmp_path / "out", info).exists() for info in json.loads(row["outputs"]).values())
    checked = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--db", str(tmp_path / "jobs.db"),
                              "--output-dir", str(tmp_path / "out")], capture_output=True, text=True,
                             env=script_env(), timeout=60)
    assert checked.returncode in (0, 1), checked.stderr  # the check tool: 1 for the file never transcribed
    for info in json.loads(row["outputs"]).values():
        assert sha256_file(recorded_file(tmp_path / "out", info)) == info["sha256"]
    assert not list((tmp_path / "out" / ".verbatim" / "staging").iterdir())
