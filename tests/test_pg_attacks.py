"""Attacks on the PostgreSQL job store with the real scripts and a real server (issue 18: many
machines, one archive): three "machines" (own host name, own PID namespace) killed at random
over one output folder; the server stopped mid-run; a translation follower woken by NOTIFY; a
pool sized for the workers. Each asserts counts and order, never wall-clock durations.
"""

import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from benchmarks.fake_translate import FakeDeepL
from benchmarks.fakeserver import FakeServer
from pipeline.dialects import TRANSCRIPTS_CHANNEL
from pipeline.outputs import sha256_file
from pipeline.runner import thread_count
from tests.conftest import ROOT, recorded_file, script_env
from tests.fake_stt import FakeSTT, env_for
from tests.test_faults import SPOOLED_WITHIN, tones

pytestmark = pytest.mark.faults

TRANSCRIBE = str(ROOT / "parallel_transcription.py")
TRANSLATE = str(ROOT / "parallel_translation.py")
MACHINES = ("machine-a", "machine-b", "machine-c")


def _can(*cmd) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def stt():
    server = FakeServer().start()
    yield FakeSTT(server)
    server.stop()


def rows(url, sql, params=()):
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row, connect_timeout=10) as conn:
        return conn.execute(sql, params).fetchall()


def script(path, url, out, *args):
    return [sys.executable, path, "--db", url, "--output-dir", str(out), "--quiet", *args]


def on_machine(name, cmd):
    """``cmd`` as if on another machine: its own host name (UTS namespace) and PID namespace
    (pids start at 1 again), so no owner it writes is provable from here or from the others.
    ``--kill-child``: a SIGKILL of unshare takes the whole namespace with it."""
    return ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child",
            "sh", "-c", 'hostname "$0" && exec "$@"', name, *cmd]


def assert_each_once_and_verified(url, out, stage, language="", expected=None):
    """Every job completed, each by exactly one completion; its recorded outputs hash as recorded."""
    jobs = rows(url, "SELECT * FROM jobs WHERE stage = %s AND language = %s", (stage, language))
    assert expected is None or len(jobs) == expected
    assert Counter(j["status"] for j in jobs) == {"completed": len(jobs)}
    completions = Counter(r["job_id"] for r in rows(url, "SELECT job_id FROM events WHERE to_status = 'completed'"))
    assert all(completions[j["id"]] == 1 for j in jobs), "a job was completed more than once"
    for job in jobs:
        for info in json.loads(job["outputs"]).values():
            path = recorded_file(out, info)
            assert sha256_file(path) == info["sha256"] and os.path.getsize(path) == info["size"]
    assert list(out.rglob("*.tmp")) == []
    return jobs


def _expired_leases(url) -> bool:
    """No job is held under a lease the server still counts as valid (killed owners' ran out)."""
    return not rows(url, "SELECT 1 FROM jobs WHERE status = 'in_progress' AND lease_expires_at > extract(epoch FROM now())")


class Machines:
    """Three machines running ``cmd`` against one database and one output folder; ``kill_loop``
    SIGKILLs one at a random moment and starts it again, ``kills`` times, then lets them finish."""

    def __init__(self, cmd, env, server, rng):
        self.cmd, self.env, self.server, self.rng = cmd, env, server, rng
        self.procs: dict[str, subprocess.Popen] = {}
        self.exposed = 0      # requests a kill may have cost (held by the server, or just answered)
        self.codes: list[int] = []

    def start(self, name):
        self.procs[name] = subprocess.Popen(on_machine(name, self.cmd), env=script_env(**self.env),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def kill_loop(self, kills, low=0.4, high=1.6):
        for name in MACHINES:
            self.start(name)
        for _ in range(kills):
            time.sleep(self.rng.uniform(low, high))
            name = self.rng.choice(MACHINES)
            proc = self.procs[name]
            with self.server.lock:
                killed_at, held = time.monotonic(), self.server.in_flight
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            # Requests in flight on any machine (an over-count: only the killed one's are lost),
            # and those answered in the instant before the kill (their answer may not be spooled).
            with self.server.lock:
                self.exposed += held + sum(1 for t in self.server.answered_at
                                           if killed_at - SPOOLED_WITHIN <= t <= killed_at)
            self.start(name)

    def finish(self, url, timeout=180):
        """Let every machine end; while a killed owner's lease still holds jobs, run one again."""
        for proc in self.procs.values():
            _, err = proc.communicate(timeout=timeout)
            self.codes.append(proc.returncode)
            assert proc.returncode == 0, err[-3000:]
        for _ in range(3):
            if not rows(url, "SELECT 1 FROM jobs WHERE status <> 'completed'"):
                return
            deadline = time.monotonic() + 60
            while not _expired_leases(url):
                assert time.monotonic() < deadline, "a lease never expired"
                time.sleep(0.2)
            again = subprocess.run(on_machine(MACHINES[0], self.cmd), env=script_env(**self.env),
                                   capture_output=True, text=True, timeout=timeout)
            self.codes.append(again.returncode)
            assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.skipif(not _can("unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child",
                             "sh", "-c", "hostname probe"),
                    reason="unshare of UTS and PID namespaces is not permitted here (needs root or user namespaces)")
def test_three_machines_killed_at_random_transcribe_and_translate_each_file_once(stt, pg_url, tmp_path):
    files, workers, kills = 30, 2, 12
    out = tmp_path / "out"
    tones(tmp_path / "in", files)
    env = {**env_for(stt), "VERBATIM_TARGET_LANGUAGES": "he"}
    registered = subprocess.run(script(TRANSCRIBE, pg_url, out, "--input", str(tmp_path / "in"), "--dry-run"),
                                env=script_env(**env), capture_output=True, text=True, timeout=120)
    assert registered.returncode == 0, registered.stderr
    stt.server.latency = 0.2
    # A short lease: a killed machine's jobs go back after 3 s (the server's clock), not 5 minutes.
    run_args = ("--workers", str(workers), "--batch-size", "2", "--lease-seconds", "3")
    machines = Machines(script(TRANSCRIBE, pg_url, out, *run_args), env, stt.server, random.Random(18))
    machines.kill_loop(kills)
    machines.finish(pg_url)
    jobs = assert_each_once_and_verified(pg_url, out, "transcription", expected=files)
    for job in jobs:  # what the fake heard in each file (its tone) is what the transcript says
        text = recorded_file(out, json.loads(job["outputs"])["txt"]).read_text()
        assert "tone" in text
    owners = {r["owner"].split(":")[0] for r in rows(pg_url, "SELECT owner FROM events WHERE to_status = 'completed'")}
    assert owners <= set(MACHINES) and len(owners) > 1, owners
    requests = stt.server.count()
    # Every answer is spooled before it is used, in the shared output folder: a kill costs only
    # the requests it interrupted, and a take-over on another machine reuses the spooled ones.
    assert requests <= files + min(machines.exposed, kills * thread_count(workers)), (requests, machines.exposed)
    print(f"transcription: {files} files, {kills} kills, {requests} requests, exposed {machines.exposed}")

    with FakeDeepL() as deepl:
        deepl.server.latency = 0.2
        tenv = {**deepl.env(), "VERBATIM_TRANSLATION_PROVIDER": "deepl"}
        machines = Machines(script(TRANSLATE, pg_url, out, "--language", "he", *run_args), tenv, deepl.server,
                            random.Random(19))
        machines.kill_loop(kills)
        machines.finish(pg_url)
        requests = deepl.server.count()
    assert_each_once_and_verified(pg_url, out, "translation", "he", expected=files)
    assert requests <= files + min(machines.exposed, kills * thread_count(workers)), (requests, machines.exposed)
    print(f"translation: {files} files, {kills} kills, {requests} requests, exposed {machines.exposed}")


def _wait_for(condition, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_server_stopped_for_ten_seconds_mid_run_loses_nothing_and_pays_nothing_twice(stt, pg_server, pg_url,
                                                                                      tmp_path):
    """The database server goes away for 10 s while a transcription run and a translation run that
    follows it are working: both wait it out and finish with exit 0; every file is asked for once."""
    files = 10
    out = tmp_path / "out"
    tones(tmp_path / "in", files)
    env = {**env_for(stt), "VERBATIM_TARGET_LANGUAGES": "he"}
    registered = subprocess.run(script(TRANSCRIBE, pg_url, out, "--input", str(tmp_path / "in"), "--dry-run"),
                                env=script_env(**env), capture_output=True, text=True, timeout=120)
    assert registered.returncode == 0, registered.stderr
    stt.server.latency = 0.3
    with FakeDeepL() as deepl:
        tenv = {**deepl.env(), "VERBATIM_TRANSLATION_PROVIDER": "deepl"}
        transcribing = subprocess.Popen(script(TRANSCRIBE, pg_url, out, "--workers", "2", "--batch-size", "2"),
                                        env=script_env(**env), stderr=subprocess.PIPE, text=True)
        translating = subprocess.Popen(script(TRANSLATE, pg_url, out, "--language", "he", "--workers", "2"),
                                       env=script_env(**tenv), stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(lambda: stt.server.answered >= 3, "the first answers")
            pg_server.stop()
            stopped_at = stt.server.answered
            time.sleep(10)  # the outage itself; nothing is asserted about time
            pg_server.start()
            _, terr = transcribing.communicate(timeout=240)
            _, lerr = translating.communicate(timeout=240)
        finally:
            for proc in (transcribing, translating):
                if proc.poll() is None:
                    proc.kill()
        translated = deepl.server.count()
    assert transcribing.returncode == 0, terr[-3000:]
    assert translating.returncode == 0, lerr[-3000:]
    assert stopped_at < files  # the outage came mid-run
    assert_each_once_and_verified(pg_url, out, "transcription", expected=files)
    assert_each_once_and_verified(pg_url, out, "translation", "he", expected=files)
    assert stt.server.count() == files and translated == files  # nothing paid for twice
    assert "psycopg.pool" not in terr + lerr  # not a warning per reconnect try: the runner speaks for the wait
    print(f"outage after {stopped_at} answers; warnings: transcription {terr.count('WARNING')},"
          f" translation {lerr.count('WARNING')}")


class _Seen(logging.Handler):
    """Sets ``event`` when the runner logs a message containing ``text``."""

    def __init__(self, text):
        super().__init__(logging.DEBUG)
        self.text, self.event, self.messages = text, threading.Event(), []

    def emit(self, record):
        self.messages.append(record.getMessage())
        if self.text in record.getMessage():
            self.event.set()


@contextlib.contextmanager
def _runner_says(text):
    """A ``_Seen`` on the runner's log for the block."""
    from pipeline import runner as runner_module

    seen = _Seen(text)
    runner_module.log.addHandler(seen)
    try:
        yield seen
    finally:
        runner_module.log.removeHandler(seen)


def _run_aside(runner):
    """``runner.run()`` started on a thread; its summary lands in the dict once it returns."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("summary", runner.run()))
    thread.start()
    return thread, result


def _store_with_files(pg_url, count):
    """The store on a pool that waits 0.5 s (shorter than any outage here), ``count`` files registered."""
    import hashlib

    import db_manager as dbm

    store = dbm.open_job_store(pg_url, pool_timeout=0.5)
    store.register_files([dbm.MediaRecord(f"/archive/f{i}.wav", hashlib.sha256(b"%d" % i).hexdigest(), 1, 1, "audio")
                          for i in range(count)], [])
    return store


def _following_runner(pg_url, *, patience):
    """A translation run with nothing to claim yet that follows a transcription (``follow``): it
    keeps asking the store for work, on a pool whose wait (0.5 s) is shorter than the outage."""
    import db_manager as dbm
    from pipeline.runner import RunOptions, Runner

    store = dbm.open_job_store(pg_url, pool_timeout=0.5)
    following = threading.Event()
    following.set()
    options = RunOptions("translation", "he", workers=1, quiet=True, commit_patience=patience,
                         follow=following.is_set)
    return store, Runner(store, options, lambda job: None), following


def test_an_outage_longer_than_the_pool_wait_is_waited_out_by_a_run_looking_for_work(pg_server, pg_url):
    from pipeline import runner as runner_module

    store, runner, following = _following_runner(pg_url, patience=600)
    with _runner_says("retrying") as seen:
        thread, result = _run_aside(runner)
        try:
            pg_server.stop()
            try:
                assert seen.event.wait(60), seen.messages  # the store said "unavailable" to the waiting run
            finally:
                pg_server.start()
            following.clear()  # the transcription it followed is over: the run may end
            thread.join(120)
        finally:
            following.clear()
            if thread.is_alive():
                runner.stop.request()
                thread.join(30)
            store.close_all()
    assert "summary" in result, "the run died while the database was away"
    assert runner_module.exit_code([result["summary"]], runner.stop) == 0 and runner.stop.unrecorded is None


def test_a_database_away_longer_than_the_patience_stops_the_run_with_exit_2_and_one_message(pg_server, pg_url):
    from pipeline import runner as runner_module

    store, runner, following = _following_runner(pg_url, patience=0.5)
    thread, result = _run_aside(runner)
    try:
        _wait_for(lambda: store.query("SELECT 1"), "the run to start")
        pg_server.stop()
        try:
            thread.join(120)
        finally:
            pg_server.start()
    finally:
        following.clear()
        store.close_all()
    assert not thread.is_alive() and "summary" in result, "the run died or hung while the database was away"
    assert runner_module.exit_code([result["summary"]], runner.stop) == 2
    assert "job database" in runner.stop.unrecorded and "unavailable" in runner.stop.unrecorded


WOKEN = "a completed transcript woke this run"


def test_a_following_translation_run_is_woken_by_notify_not_by_its_poll(stt, pg_url, tmp_path):
    """A translation run started beside a transcription run follows it: it LISTENs, and each
    completed transcript's NOTIFY wakes it (its debug log says so) before its poll would have."""
    files = 3
    out = tmp_path / "out"
    tones(tmp_path / "in", files)
    env = {**env_for(stt), "VERBATIM_TARGET_LANGUAGES": "he"}
    registered = subprocess.run(script(TRANSCRIBE, pg_url, out, "--input", str(tmp_path / "in"), "--dry-run"),
                                env=script_env(**env), capture_output=True, text=True, timeout=120)
    assert registered.returncode == 0, registered.stderr

    def listening():
        return rows(pg_url, "SELECT 1 FROM pg_stat_activity WHERE query = %s",
                    (f"LISTEN {TRANSCRIPTS_CHANNEL}",))

    def hold_until_listening(request):  # no transcript is answered before the follower listens
        _wait_for(listening, "the translation run to LISTEN", timeout=120)
        return None

    stt.server.fault = hold_until_listening
    with FakeDeepL() as deepl:
        tenv = {**deepl.env(), "VERBATIM_TRANSLATION_PROVIDER": "deepl"}
        follower = subprocess.Popen([sys.executable, TRANSLATE, "--db", pg_url, "--output-dir", str(out),
                                     "--language", "he", "--workers", "1", "-v"],
                                    env=script_env(**tenv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
        try:
            transcribed = subprocess.run(script(TRANSCRIBE, pg_url, out, "--workers", "1", "--batch-size", "1"),
                                         env=script_env(**env), capture_output=True, text=True, timeout=180)
            _, err = follower.communicate(timeout=180)
        finally:
            if follower.poll() is None:
                follower.kill()
    assert transcribed.returncode == 0, transcribed.stderr[-3000:]
    assert follower.returncode == 0, err[-3000:]
    assert_each_once_and_verified(pg_url, out, "translation", "he", expected=files)
    woken = err.count(WOKEN)
    assert woken >= 1, err[-3000:]
    print(f"the follower was woken by NOTIFY {woken} time(s) for {files} transcripts")


def test_the_pool_is_sized_for_every_thread_of_a_run(pg_url):
    """Every thread of a run (workers, each runner's loop and heartbeat, the process) may be in a
    transaction at the same moment (a slow server, a lock held elsewhere): with the pool sized by
    ``connections_needed`` none of them waits for a connection another holds, and none fails."""
    import db_manager as dbm
    from pipeline.runner import connections_needed

    threads = thread_count(32)
    needed = connections_needed([threads])
    assert needed == threads + 3 == 43
    assert connections_needed([thread_count(2)] * 3) == 3 * (2 + 2) + 1  # translation into three languages

    def all_at_once(store, n):
        """``n`` threads each hold a transaction until all ``n`` are in one (or gave up)."""
        barrier, failures = threading.Barrier(n, timeout=30), []

        def hold():
            try:
                with store.transaction() as conn:
                    conn.execute("SELECT 1")
                    barrier.wait()
            except dbm.DatabaseUnavailable as exc:
                failures.append(exc)
                barrier.abort()
            except threading.BrokenBarrierError:
                pass

        workers = [threading.Thread(target=hold) for _ in range(n)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        return failures

    sized = dbm.open_job_store(pg_url, pool_size=needed, pool_timeout=5)
    default = dbm.open_job_store(pg_url, pool_timeout=1)
    try:
        assert all_at_once(sized, needed) == []
        assert all_at_once(default, needed)  # the default pool starves a run of --workers 32
    finally:
        sized.close_all()
        default.close_all()


def test_a_run_opens_its_pool_for_its_workers(stt, pg_url, tmp_path):
    from pipeline.runner import connections_needed

    tones(tmp_path / "in", 1)
    done = subprocess.run([sys.executable, TRANSCRIBE, "--db", pg_url, "--output-dir", str(tmp_path / "out"),
                           "--input", str(tmp_path / "in"), "--workers", "32", "-v"],
                          env=script_env(**env_for(stt)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"a pool of up to {connections_needed([thread_count(32)])} connections" in done.stderr


def test_a_job_whose_work_finds_the_database_away_is_retried_not_left_in_progress(pg_server, pg_url):
    """The work itself reads the store (a transcription looks up the file's paths) and the server
    is gone for longer than the pool's wait: the job is not the file's failure, and recording that
    must wait for the server too, or the run would end with exit 0 and the job still in progress."""
    import db_manager as dbm
    from pipeline import runner as runner_module
    from pipeline.runner import RunOptions, Runner

    store = _store_with_files(pg_url, 2)
    calls = []

    def work(job):
        calls.append(job.id)
        if len(calls) == 1:
            pg_server.stop()  # restarted once the run has said that it waits for the server
            threading.Thread(target=lambda: (seen.event.wait(30), pg_server.start())).start()
        store.paths_of(job.file_id)
        return dbm.Outcome({}, provider="fake")

    runner = Runner(store, RunOptions("transcription", workers=1, threads=1, batch_size=1, quiet=True), work)
    with _runner_says("retrying") as seen:
        try:
            summary = runner.run()
        finally:
            _wait_for(lambda: _server_up(store), "the server to be back")
    jobs = store.jobs(stage="transcription")
    store.close_all()
    assert [j["status"] for j in jobs] == ["completed", "completed"], [dict(j) for j in jobs]
    assert runner_module.exit_code([summary], runner.stop) == 0
    assert summary.errors == {"database_unavailable": 1} and summary.retried == 1 and summary.failed == 0


def test_a_run_stopped_while_the_database_is_away_ends_without_giving_back_its_queue(pg_server, pg_url):
    """Ctrl-C while the server is down: the queued jobs cannot be given back. The run says so in
    one warning and ends (they return when their lease expires); the job it was doing still
    waits for the server to record its paid answer."""
    import db_manager as dbm
    from pipeline.runner import RunOptions, Runner

    store = _store_with_files(pg_url, 4)
    runner = Runner(store, RunOptions("transcription", workers=1, threads=1, batch_size=4, quiet=True), None)

    def work(job):
        pg_server.stop()
        runner.stop.request()  # the user's Ctrl-C, while three claimed jobs wait in the queue
        seen.event.wait(60)
        pg_server.start()
        return dbm.Outcome({}, provider="fake")

    runner.work = work
    with _runner_says("could not give back") as seen:
        try:
            summary = runner.run()
        finally:
            _wait_for(lambda: _server_up(store), "the server to be back")
    statuses = sorted(j["status"] for j in store.jobs(stage="transcription"))
    store.close_all()
    assert seen.event.is_set() and summary.completed == 1 and summary.released == 0
    assert statuses == ["completed", "in_progress", "in_progress", "in_progress"]
    assert runner.stop.unrecorded is None


def _server_up(store) -> bool:
    import db_manager as dbm

    try:
        return bool(store.query("SELECT 1"))
    except dbm.DatabaseUnavailable:
        return False
