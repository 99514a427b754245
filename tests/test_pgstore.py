"""The PostgreSQL job store against a real server: what only PostgreSQL has to prove (SKIP
LOCKED, the server's clock, a server restarted mid-run, NOTIFY, read-only and schema checks,
a broken pooled connection), the migration tool's round trip, and a real run with --db URL.
The store's common behaviour is proven on both backends in test_db_manager.py."""

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
import time

import pytest

import db_manager as dbm
from db_manager import COMPLETED, IN_PROGRESS, NOT_STARTED, TRANSCRIPTION, TRANSLATION, DatabaseError, Outcome
from tests.conftest import ROOT, recorded_file, script_env


def records(n, prefix="/archive/file"):
    return [dbm.MediaRecord(f"{prefix}{i}.wav", hashlib.sha256(f"{prefix}{i}".encode()).hexdigest(), 100 + i, i,
                            "audio") for i in range(n)]


@pytest.fixture
def pg(pg_url):
    store = dbm.open_job_store(pg_url, pool_timeout=3)
    yield store
    store.close_all()


def test_a_claim_reads_the_queue_in_order_and_a_large_registration_is_analyzed(pg):
    pg.register_files(records(1500), ["en"])
    analyzed = {r[0] for r in pg.query("SELECT relname FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL")}
    assert {"media_files", "media_paths", "jobs", "events"} <= analyzed
    # The queue index ends with id (migration 6): the first jobs of the queue come from the index
    # in the claim's order, no sort of every runnable job first.
    plan = "\n".join(r[0] for r in pg.query(
        "EXPLAIN SELECT id FROM jobs WHERE stage = 'transcription' AND language = '' AND status = 'not_started'"
        " AND run_after <= ? ORDER BY run_after, id LIMIT 20 FOR UPDATE SKIP LOCKED", (pg.now(),)))
    assert "jobs_queue" in plan and "Sort" not in plan, plan
    # Transcripts completed since the ANALYZE (its statistics say none are): a translation claim
    # still reads its queue in order, not every completed transcript first.
    owner = dbm.make_owner()
    with pg.transaction():
        for job in pg.claim(owner, TRANSCRIPTION, limit=300):
            pg.complete(job, Outcome({}))
    plan = "\n".join(r[0] for r in pg.query(
        "EXPLAIN SELECT id FROM jobs WHERE stage = 'translation' AND language = 'en' AND status = 'not_started'"
        f" AND run_after <= ? AND {dbm._TRANSCRIBED_ROW} ORDER BY run_after, id LIMIT 1 FOR UPDATE SKIP LOCKED",
        (pg.now(),)))
    assert "jobs_queue" in plan and "Sort" not in plan, plan
    assert len(pg.claim(owner, TRANSLATION, "en", limit=400)) == 300


def test_a_claim_steps_over_rows_another_transaction_holds(pg, pg_url):
    import psycopg

    pg.register_files(records(3), [])
    first = pg.query("SELECT MIN(id) FROM jobs")[0][0]
    with psycopg.connect(pg_url) as holder:  # another machine's claim, still in its transaction
        holder.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first,))
        # Without SKIP LOCKED this claim would wait for the holder, which waits for this test:
        # run it aside, so such a wait fails here instead of hanging the suite.
        aside = ThreadPoolExecutor(1)
        try:
            jobs = aside.submit(pg.claim, dbm.make_owner(), TRANSCRIPTION, limit=3).result(timeout=60)
        finally:
            aside.shutdown(wait=False)  # not waiting here: the holder lets go when this block ends
        assert first not in {j.id for j in jobs} and len(jobs) == 2
    assert [j.id for j in pg.claim(dbm.make_owner(), TRANSCRIPTION, limit=3)] == [first]


RECLAIMER = textwrap.dedent("""
    import json, sys
    import time
    import db_manager as dbm
    db = dbm.open_job_store(sys.argv[1])
    print(json.dumps({"clock": time.time(), "reclaimed": db.reclaim()}))
""")


@pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime is not installed")
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_client_whose_clock_is_ahead_cannot_reclaim_a_live_lease(backend, request, tmp_path):
    """Leases are judged on the server's clock: a machine ten minutes ahead sees a lease of five
    minutes as valid. (SQLite, one machine, judges by the client's clock: there it is taken.)"""
    target = request.getfixturevalue("pg_url") if backend == "postgresql" else str(tmp_path / "jobs.db")
    db = dbm.open_job_store(target)
    db.register_files(records(1), [])
    elsewhere = dbm.make_owner(host="other-machine")  # not provable from here: only its lease counts
    (job,) = db.claim(elsewhere, TRANSCRIPTION, lease_seconds=300)
    db.close_all()
    out = subprocess.run(["faketime", "-f", "+10m", sys.executable, "-c", RECLAIMER, target],
                         capture_output=True, text=True, timeout=60, env=script_env())
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["clock"] > time.time() + 500  # the client's clock really was ahead
    assert result["reclaimed"] == ([] if backend == "postgresql" else [job.id])
    db = dbm.open_job_store(target)
    assert db.jobs()[0]["status"] == (IN_PROGRESS if backend == "postgresql" else NOT_STARTED)
    db.close_all()


def test_leases_are_written_with_the_server_clock(pg):
    pg.register_files(records(1), [])
    server_now = pg.now()
    (job,) = pg.claim(dbm.make_owner(), TRANSCRIPTION, lease_seconds=100)
    expires = pg.jobs()[0]["lease_expires_at"]
    assert server_now + 99 < expires < pg.now() + 101


def _until(action, seconds=60):
    """Call ``action`` until it stops raising DatabaseUnavailable; return its result."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return action()
        except dbm.DatabaseUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
def test_a_server_restarted_mid_run_pauses_calls_and_loses_nothing(pg, pg_server):
    pg.register_files(records(6), [])
    owner = dbm.make_owner()
    held = pg.claim(owner, TRANSCRIPTION, limit=2)
    done = Outcome({"txt": {"path": "/o/a.txt", "sha256": "0" * 64, "size": 1}}, provider="fake")
    pg_server.stop()
    try:
        for call in (lambda: pg.claim(owner, TRANSCRIPTION, limit=2), lambda: pg.complete(held[0], done),
                     lambda: pg.heartbeat(owner, [held[1].id]), lambda: pg.fail(held[1], "x", "y", retryable=True)):
            with pytest.raises(dbm.DatabaseUnavailable):  # retryable: the runner's sqlite3.OperationalError
                call()
    finally:
        pg_server.start()
    _until(lambda: pg.complete(held[0], done))  # the answer kept by the caller is recorded after all
    assert _until(lambda: pg.heartbeat(owner, [held[1].id])) == {held[1].id}
    pg.complete(held[1], done)
    rest = []
    while batch := pg.claim(owner, TRANSCRIPTION, limit=3):
        rest += batch
        for job in batch:
            pg.complete(job, done)
    assert len(rest) == 4
    assert pg.counts()[(TRANSCRIPTION, "")][COMPLETED] == 6
    claims = pg.query("SELECT COUNT(*) FROM events WHERE to_status = 'in_progress'")[0][0]
    assert claims == 6  # every job claimed once: nothing lost, nothing doubled


def test_a_broken_pooled_connection_is_discarded(pg, pg_server, pg_url):
    pg.register_files(records(1), [])
    assert pg.totals()["files"] == 1
    name = pg_url.rsplit("/", 1)[1]
    pg_server.admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    assert pg.totals()["files"] == 1  # the pool noticed and lent a fresh connection
    assert len(pg.claim(dbm.make_owner(), TRANSCRIPTION)) == 1


def test_a_completed_transcript_wakes_a_waiting_translation_run(pg):
    pg.register_files(records(1), ["en"])
    assert pg.wait_for_transcripts(0.3) is False  # nothing happened: it waited and says so
    woke = {}

    def wait():  # True: woken by the notification; False: the 20 s ran out
        woke["signalled"] = pg.wait_for_transcripts(20)

    pg.wait_for_transcripts(0.01)  # listening from now on
    waiter = threading.Thread(target=wait)
    waiter.start()
    (job,) = pg.claim(dbm.make_owner(), TRANSCRIPTION)
    pg.complete(job, Outcome({}))
    waiter.join(30)
    assert woke["signalled"] is True
    assert len(pg.claim(dbm.make_owner(), TRANSLATION, "en")) == 1
    stop = threading.Event()
    stop.set()
    assert pg.wait_for_transcripts(20, interrupt=stop) is False  # a stopping run is not held


def test_read_only_opening_and_schema_version_checks(pg, pg_url, pg_server):
    pg.register_files(records(2), [])
    assert pg.schema_version() == dbm.SCHEMA_VERSION
    reader = dbm.open_job_store(pg_url, read_only=True)
    assert reader.totals()["files"] == 2
    with pytest.raises(dbm.StoreError, match="read-only"):
        reader.register_files(records(1, "/new"), [])
    reader.close_all()
    with pg.transaction() as conn:
        conn.execute("UPDATE verbatim_schema SET version = ?", (dbm.SCHEMA_VERSION + 1,))
    with pytest.raises(DatabaseError, match="newer verbatim"):
        dbm.open_job_store(pg_url)
    assert pg.schema_version() == dbm.SCHEMA_VERSION + 1  # not downgraded
    empty = pg_server.create_database("empty_for_read_only")
    try:
        with pytest.raises(DatabaseError, match="not a verbatim job database"):
            dbm.open_job_store(empty, read_only=True)
    finally:
        pg_server.drop_database("empty_for_read_only")


def test_a_password_in_the_url_is_never_shown(pg_url):
    from pipeline.errors import redact
    from pipeline.pgstore import display_url

    secret_url = pg_url.replace("verbatim@", "verbatim:s3cret-canary@")
    assert "s3cret-canary" not in display_url(secret_url)
    store = dbm.open_job_store(secret_url)  # trust auth: the password is not even checked
    assert "s3cret-canary" not in store.location and "s3cret-canary" not in redact(f"boom {secret_url}")
    store.close_all()


def test_a_server_that_is_not_there_is_one_clear_line_at_once(tmp_path):
    """A wrong port or a stopped server: the run stops before it starts (exit 2), saying what
    psycopg was told, not after the pool's 30 s of retrying with a warning for each try."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "in").mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "parallel_transcription.py"), "--input", str(tmp_path / "in"),
                             "--db", f"postgresql://verbatim@127.0.0.1:{port}/archive", "--provider", "local"],
                            capture_output=True, text=True, timeout=120, env=script_env(), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "psycopg.pool" not in result.stderr and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"127.0.0.1:{port}" in line and "refused" in line.lower()


def _migrate(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools/migrate_db.py"), *args], capture_output=True,
                          text=True, timeout=120, env=script_env())


def _archive(db):
    """A store with some of everything: odd paths, every status, history, a live run."""
    recs = records(5) + [dbm.MediaRecord("/archive/bad-\udcff.wav", "f" * 64, 1, 1, "video", 12.5)]
    db.register_files(recs, ["en", "he"])
    owner = dbm.make_owner()
    a, b, c = db.claim(owner, TRANSCRIPTION, limit=3)
    db.complete(a, Outcome({"json": {"path": "/o/a.json", "sha256": "1" * 64, "size": 7}}, provider="p",
                           cost=0.125, audio_seconds=61.5, duration=61.5, source_language="de"))
    db.fail(b, "unsupported_media", "not audio", retryable=False)
    db.register_run(owner, TRANSCRIPTION)
    return c


def test_migrate_db_round_trip_sqlite_postgresql_sqlite(tmp_path, pg_url):
    first = str(tmp_path / "first.db")
    db = dbm.open_job_store(first)
    _archive(db)
    archive_id = db.query("SELECT id FROM archive_identity")[0][0]
    db.close_all()
    dry = _migrate(first, pg_url)
    assert dry.returncode == 0 and "would copy" in dry.stdout, dry.stderr
    import psycopg

    with psycopg.connect(pg_url) as conn:  # the dry run created nothing
        assert conn.execute("SELECT to_regclass('jobs')").fetchone()[0] is None
    forth = _migrate(first, pg_url, "--apply", "--json")
    assert forth.returncode == 0, forth.stderr
    report = json.loads(forth.stdout)
    assert report["verified"] and report["tables"]["events"]["rows"] > 10
    again = _migrate(first, pg_url, "--apply")  # TO now holds an archive: refused, unchanged
    assert again.returncode == 2 and "already holds an archive" in again.stderr
    back_path = str(tmp_path / "back.db")
    back = _migrate(pg_url, back_path, "--apply", "--json")
    assert back.returncode == 0, back.stderr
    from tools.migrate_db import summary

    stores = [dbm.open_job_store(p, read_only=True) for p in (first, pg_url, back_path)]
    summaries = [summary(s) for s in stores]
    assert summaries[0] == summaries[1] == summaries[2]  # counts and checksums, every table
    assert stores[2].query("SELECT id FROM archive_identity")[0][0] == archive_id  # the output folder stays its own
    for store in stores:
        store.close_all()
    # The copy is a working store: ids continue after the copied ones, claims go on where they were.
    pg = dbm.open_job_store(pg_url)
    before = pg.query("SELECT MAX(id) FROM events")[0][0]
    jobs = pg.claim(dbm.make_owner(), TRANSCRIPTION, limit=10)
    assert len(jobs) == 3 and pg.query("SELECT MIN(id) FROM events WHERE id > ?", (before,))[0][0] == before + 1
    assert pg.register_files(records(1, "/later"), [])["new_files"] == 1
    pg.close_all()
    replaced = _migrate(first, pg_url, "--apply", "--replace")
    assert replaced.returncode == 0 and "verified" in replaced.stdout, replaced.stderr


def test_migrate_db_configuration_errors(tmp_path, pg_url):
    missing = _migrate(str(tmp_path / "nothing.db"), pg_url)
    assert missing.returncode == 2 and "no database at" in missing.stderr
    same = _migrate(str(tmp_path / "a.db"), str(tmp_path / "a.db"))
    assert same.returncode == 2 and "same job store" in same.stderr
    assert _migrate("--help").returncode == 0


def test_parallel_transcription_with_db_url_end_to_end(pg_url, tmp_path):
    """The real script, --db postgresql://..., a fake provider on 127.0.0.1: every file done once,
    its outputs verified, the status tool reading the same server; a second run finds nothing to do."""
    import os

    from pipeline.outputs import sha256_file
    from benchmarks import mediagen
    from tests.fake_stt import FakeSTT, env_for
    from benchmarks.fakeserver import FakeServer

    server = FakeServer().start()
    try:
        stt = FakeSTT(server)
        inputs = tmp_path / "in"
        inputs.mkdir()
        for i in range(6):
            mediagen.make_tone(inputs / f"interview-{i}.wav", freq=300 + 40 * i, seconds=1.0)

        def transcribe(*args):
            return subprocess.run([sys.executable, str(ROOT / "parallel_transcription.py"), "--db", pg_url,
                                   "--output-dir", str(tmp_path / "out"), "--quiet", *args],
                                  capture_output=True, text=True, timeout=180, cwd=tmp_path,
                                  env=script_env(**env_for(stt)))

        result = transcribe("--input", str(inputs), "--workers", "3", "--batch-size", "2", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["runs"][0]["completed"] == 6
        assert len(stt.uploads) == 6
        assert transcribe().returncode == 0 and len(stt.uploads) == 6  # nothing to do the second time
    finally:
        server.stop()
    out = subprocess.run([sys.executable, str(ROOT / "tools/status.py"), "--db", pg_url, "--files", "--json",
                          "--output-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, env=script_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    items = json.loads(out.stdout)["items"]
    assert len(items) == 6 and all(i["transcription"]["status"] == "completed" for i in items)
    for item in items:
        for path in item["transcription"]["outputs"].values():
            assert os.path.getsize(path) > 0
    db = dbm.open_job_store(pg_url, read_only=True)
    for row in db.jobs(stage=TRANSCRIPTION):
        for info in json.loads(row["outputs"]).values():
            assert sha256_file(recorded_file(tmp_path / "out", info)) == info["sha256"]
    assert db.query("SELECT COUNT(*) FROM live_runs")[0][0] == 0  # the run said goodbye
    db.close_all()
    from pipeline.archive import MARKER

    marker = json.loads((tmp_path / "out" / MARKER).read_text())
    assert marker["database"] == pg_url  # the output folder names the server's database, not a file
