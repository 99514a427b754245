"""The job store: exactly-once claims under threads and processes, fencing, reclaim, migrations.

Every test that takes ``db`` or ``store_url`` runs against both backends, SQLite and a real
PostgreSQL server; those about SQLite itself (PRAGMAs, its file, its group commit) take
``sqlite_db`` or ``db_path``."""

import dataclasses
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest

import db_manager as dbm
from db_manager import (COMPLETED, FAILED, IN_PROGRESS, NOT_STARTED, TRANSCRIPTION, TRANSLATION,
                        DatabaseError, DatabaseManager, LeaseLostError, MediaRecord, Outcome)
from tests.conftest import ROOT, script_env


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """Where a job store lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def db(store_url):
    manager = dbm.open_job_store(store_url)
    yield manager
    manager.close_all()


@pytest.fixture
def sqlite_db(db_path):
    manager = DatabaseManager(db_path)
    yield manager
    manager.close_all()


def records(n, prefix="/archive/file"):
    return [MediaRecord(f"{prefix}{i}.wav", hashlib.sha256(f"{prefix}{i}".encode()).hexdigest(), 100 + i, i,
                        "audio") for i in range(n)]


def test_pragmas_and_schema(sqlite_db):
    db = sqlite_db
    conn = db.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 30000
    assert db.schema_version() == dbm.SCHEMA_VERSION


def test_reopen_is_idempotent_and_newer_schema_is_refused(db_path):
    first = DatabaseManager(db_path)
    first.register_files(records(3), ["en"])
    first.close_all()
    again = DatabaseManager(db_path)  # migrations do not run twice, data kept
    assert again.totals()["files"] == 3
    again.close_all()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {dbm.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(DatabaseError, match="newer verbatim"):
        DatabaseManager(db_path)
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == dbm.SCHEMA_VERSION + 1  # not downgraded
    conn.close()


def test_register_is_idempotent_and_duplicates_are_one_file(db):
    recs = records(4)
    counts = db.register_files(recs, ["en", "he"])
    assert counts["new_files"] == 4
    same_content = MediaRecord("/elsewhere/copy.wav", recs[0].sha256, recs[0].size, 5, "audio")
    counts = db.register_files(recs + [same_content], ["en", "he"])
    assert counts["new_files"] == 0 and counts["duplicates"] == 5
    assert db.totals()["files"] == 4
    file_id = recs[0].sha256[:16]
    assert db.paths_of(file_id) == ["/archive/file0.wav", "/elsewhere/copy.wav"]
    summary = db.counts()
    assert summary[(TRANSCRIPTION, "")][NOT_STARTED] == 4
    assert summary[(TRANSLATION, "he")][NOT_STARTED] == 4
    assert db.ensure_jobs(TRANSLATION, "de") == 4  # a language asked for later
    assert db.ensure_jobs(TRANSLATION, "de") == 0


def test_bulk_registration_is_what_one_insert_after_another_would_be(db):
    recs = records(1100)  # three transactions of bulk inserts (_CHUNK = 500)
    copy = MediaRecord("/elsewhere/copy.wav", recs[3].sha256, recs[3].size, 7, "audio")  # same content, same chunk
    moved = MediaRecord(recs[5].path, recs[5].sha256, 999, 9, "audio")                  # a path listed twice: the last
    counts = db.register_files([*recs[:10], copy, moved, *recs[10:]], ["en", "he", "en"])
    assert counts == {"new_files": 1100, "new_paths": 1102, "duplicates": 2}
    assert db.paths_of(recs[3].sha256[:16]) == [recs[3].path, "/elsewhere/copy.wav"]
    assert db.known_paths()[recs[5].path.encode()][:2] == (999, 9)
    assert {key: c[NOT_STARTED] for key, c in db.counts().items()} == {
        (TRANSCRIPTION, ""): 1100, (TRANSLATION, "en"): 1100, (TRANSLATION, "he"): 1100}
    created = db.query("SELECT job_id, owner, from_status, to_status, attempt FROM events ORDER BY id")
    assert [tuple(r)[1:] for r in created] == [(None, None, NOT_STARTED, 0)] * 3300
    assert sorted(r[0] for r in created) == sorted(r["id"] for r in db.jobs())  # one creation event per job

    done = db.claim(dbm.make_owner(), TRANSCRIPTION, limit=1)[0]
    db.complete(done, Outcome({"json": {"path": "t/transcript.json", "sha256": "1" * 64, "size": 1}}))
    db.register_files(recs[:600], ["en", "de"])  # a language added later: waits unless transcribed
    parked = {r["file_id"]: r["run_after"] for r in db.jobs(stage=TRANSLATION, language="de")}
    assert parked.pop(done.file_id) < dbm.PARKED and set(parked.values()) == {dbm.PARKED} and len(parked) == 599


def test_touch_paths_marks_only_the_paths_seen(db):
    recs = records(600)
    db.register_files(recs, [])
    seen = lambda: {bytes(r[0]): r[1] for r in db.query("SELECT path_bytes, last_seen FROM media_paths")}  # noqa: E731
    before = seen()
    time.sleep(0.01)
    db.touch_paths([r.path.encode() for r in recs[::2]])
    after = seen()
    assert all((after[k] > before[k]) == (int(k.decode()[len("/archive/file"):-4]) % 2 == 0) for k in after)


def test_registration_with_many_languages_splits_its_statements(db):
    languages = ["en", "de", "he", "fr", "es", "it", "pl", "ru", "uk", "yi"]  # 5,000 translation jobs in a chunk
    assert db.register_files(records(500), languages)["new_files"] == 500
    assert sum(c[NOT_STARTED] for (stage, _), c in db.counts().items() if stage == TRANSLATION) == 5000


def test_a_batch_claim_gives_each_job_its_media_transcript_and_event(db):
    db.register_files(records(30), ["en"])
    owner = dbm.make_owner()
    transcribed = db.claim(owner, TRANSCRIPTION, limit=25)
    assert len(transcribed) == 25 and len({j.id for j in transcribed}) == 25
    paths = {r.sha256[:16]: r.path for r in records(30)}
    assert all(j.media_path == paths[j.file_id] and j.outputs == {} and j.transcript_job is None for j in transcribed)
    for n, job in enumerate(transcribed[:20]):
        db.complete(job, Outcome({"json": {"path": f"{job.folder}/transcript.json", "sha256": f"{n:064d}", "size": n}}))
    translations = db.claim(owner, TRANSLATION, "en", limit=50)
    assert {j.file_id for j in translations} == {j.file_id for j in transcribed[:20]}
    by_file = {j.file_id: j for j in transcribed}
    for job in translations:
        assert job.transcript_job == by_file[job.file_id].id and job.media_path == paths[job.file_id]
        assert job.outputs["json"]["path"] == f"{job.folder}/transcript.json"
    for job in [*transcribed, *translations]:
        claimed = [e for e in db.events(job.id) if e["to_status"] == IN_PROGRESS]
        assert [(e["owner"], e["from_status"], e["attempt"]) for e in claimed] == [(owner, NOT_STARTED, 1)]


ODD_NAMES = [
    "with\nnewline.wav", "-leading-dash.mp3", "../../escape.wav", "x" * 240 + ".wav",
    "spaces and ümlauts – דוד.mp3", os.fsdecode(b"bad-\xff\xfe-bytes.wav"), "tab\there.wav",
]


def test_odd_file_names_are_stored_and_listed(db, tmp_path):
    recs = [MediaRecord(os.path.join("/archive", name), hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest(),
                        1, 1, "audio") for name in ODD_NAMES]
    db.register_files(recs, ["en"])
    stored = {os.path.basename(r["path_display"]) for r in db.files()}
    assert len(stored) == len(ODD_NAMES)
    by_id = {r["file_id"]: r for r in db.files()}
    for rec in recs:
        row = by_id[rec.sha256[:16]]
        assert os.fsdecode(bytes(row["path_bytes"])) == rec.path  # exact round trip, bad bytes included
        assert "\n" not in row["path_display"]
        assert "/" not in row["folder"] and ".." not in row["folder"] and len(row["folder"]) <= 57
    # the status tool lists them all, as JSON, without error
    out = subprocess.run([sys.executable, str(ROOT / "tools/status.py"), "--db", db.path, "--files", "--json"],
                         capture_output=True, text=True, check=True, env=script_env()).stdout
    items = json.loads(out)["items"]
    assert sorted(i["path"] for i in items) == sorted(rec.path for rec in recs)


def test_claim_complete_fail_release_lifecycle(db):
    db.register_files(records(3), [])
    owner = dbm.make_owner()
    a, b, c = db.claim(owner, TRANSCRIPTION, limit=3)
    assert (a.attempts, a.claim) == (1, 1)
    db.complete(a, Outcome({"txt": {"path": "/o/t.txt", "sha256": "0" * 64, "size": 3}}, provider="openai"))
    assert db.fail(b, "server_error", "HTTP 503", retryable=True, delay=0) == NOT_STARTED
    assert db.fail(c, "unsupported_media", "not audio", retryable=False) == FAILED
    again = db.claim(owner, TRANSCRIPTION, limit=5)
    assert [j.id for j in again] == [b.id] and again[0].attempts == 2
    assert db.release(again, "shutdown") == 1
    row = db.jobs(file_id=b.file_id, stage=TRANSCRIPTION)[0]
    assert row["status"] == NOT_STARTED and row["attempts"] == 1  # release spends no attempt
    history = [(e["from_status"], e["to_status"]) for e in db.events(b.id)]
    assert history == [(None, NOT_STARTED), (NOT_STARTED, IN_PROGRESS), (IN_PROGRESS, NOT_STARTED),
                       (NOT_STARTED, IN_PROGRESS), (IN_PROGRESS, NOT_STARTED)]


def test_retryable_errors_fail_after_max_attempts(db):
    db.register_files(records(1), [])
    owner = dbm.make_owner()
    for attempt in range(1, dbm.DEFAULT_MAX_ATTEMPTS + 1):
        (job,) = db.claim(owner, TRANSCRIPTION)
        assert job.attempts == attempt
        status = db.fail(job, "server_error", "boom", retryable=True)
    assert status == FAILED
    assert db.claim(owner, TRANSCRIPTION) == []
    assert len(db.reset_failed(TRANSCRIPTION)) == 1
    (job,) = db.claim(owner, TRANSCRIPTION)
    assert job.attempts == 1  # fresh attempts, history kept
    assert len(db.events(job.id)) > 2 * dbm.DEFAULT_MAX_ATTEMPTS


def test_backoff_delays_the_next_claim(db):
    db.register_files(records(1), [])
    owner = dbm.make_owner()
    (job,) = db.claim(owner, TRANSCRIPTION)
    db.fail(job, "rate_limited", "429", retryable=True, delay=30, spend_attempt=False)
    assert db.claim(owner, TRANSCRIPTION) == []
    count, earliest = db.pending(TRANSCRIPTION)
    assert count == 1 and earliest > time.time() + 25
    assert db.jobs(stage=TRANSCRIPTION)[0]["attempts"] == 0


def test_fenced_completion_refuses_a_late_worker(db):
    db.register_files(records(1), [])
    slow = dbm.make_owner("slow", host="paused-laptop")  # not provably alive: its lease decides
    (stale,) = db.claim(slow, TRANSCRIPTION, lease_seconds=10)
    assert db.reclaim(now=time.time() + 11) == [stale.id]  # the lease expired
    fresh_owner = dbm.make_owner("fresh")
    (fresh,) = db.claim(fresh_owner, TRANSCRIPTION)
    with pytest.raises(LeaseLostError):
        db.complete(stale, Outcome({"txt": {"path": "/late", "sha256": "1" * 64, "size": 1}}))
    with pytest.raises(LeaseLostError):
        db.fail(stale, "server_error", "late", retryable=True)
    assert db.heartbeat(slow, [stale.id]) == set()
    assert db.heartbeat(fresh_owner, [fresh.id]) == {fresh.id}
    db.complete(fresh, Outcome({"txt": {"path": "/fresh", "sha256": "2" * 64, "size": 1}}))
    row = db.jobs(stage=TRANSCRIPTION)[0]
    assert row["status"] == COMPLETED and json.loads(row["outputs"])["txt"]["path"] == "/fresh"
    assert [e["to_status"] for e in db.events(stale.id)].count("refused") == 2


def test_a_completion_retried_after_its_commit_is_taken_once(db):
    """A commit whose answer was lost (the connection cut during COMMIT) is retried: the retry of
    the very same completion is recognised, anything else by that claim is still refused."""
    db.register_files(records(1), [])
    owner = dbm.make_owner()
    (job,) = db.claim(owner, TRANSCRIPTION)
    outcome = Outcome({"txt": {"path": "/o/t.txt", "sha256": "0" * 64, "size": 3}})
    db.complete(job, outcome)
    db.complete(job, outcome)  # the retry: no error, nothing changed
    with pytest.raises(LeaseLostError):
        db.complete(job, Outcome({"txt": {"path": "/o/other.txt", "sha256": "1" * 64, "size": 3}}))
    with pytest.raises(LeaseLostError):
        db.complete(dataclasses.replace(job, owner=dbm.make_owner("other")), outcome)
    assert [e["to_status"] for e in db.events(job.id)].count(COMPLETED) == 1


def test_same_owner_reclaimed_lease_is_fenced_by_claim_number(db):
    db.register_files(records(1), [])
    owner = dbm.make_owner(host="paused-laptop")
    (first,) = db.claim(owner, TRANSCRIPTION, lease_seconds=10)
    assert db.reclaim(now=time.time() + 11) == [first.id]
    (second,) = db.claim(owner, TRANSCRIPTION)
    assert second.attempts == first.attempts and second.claim == first.claim + 1
    with pytest.raises(LeaseLostError):
        db.complete(first, Outcome({}))
    db.complete(second, Outcome({}))


def test_reclaim_never_touches_a_live_owner(db):
    db.register_files(records(2), [])
    live = db.claim(dbm.make_owner(), TRANSCRIPTION, limit=2)
    assert db.reclaim() == []
    assert all(r["status"] == IN_PROGRESS for r in db.jobs(stage=TRANSCRIPTION))
    assert len(live) == 2


def test_translation_needs_a_completed_transcript(db):
    db.register_files(records(2), ["he"])
    owner = dbm.make_owner()
    assert db.claim(owner, TRANSLATION, "he") == []
    (job,) = db.claim(owner, TRANSCRIPTION)
    db.complete(job, Outcome({"json": {"path": "/o/transcript.json", "sha256": "3" * 64, "size": 9}}))
    (translation,) = db.claim(owner, TRANSLATION, "he", limit=5)
    assert translation.file_id == job.file_id
    assert translation.outputs["json"]["path"] == "/o/transcript.json"
    with pytest.raises(ValueError):
        db.claim(owner, TRANSLATION, "")


def test_sixteen_threads_claim_two_thousand_jobs_exactly_once(store_url):
    db = dbm.open_job_store(store_url)
    db.register_files(records(2000), [])
    owner = dbm.make_owner()
    done, errors = Counter(), []
    lock = threading.Lock()

    def worker():
        try:
            while True:
                jobs = db.claim(owner, TRANSCRIPTION, limit=7)
                if not jobs:
                    return
                for job in jobs:
                    db.complete(job, Outcome({}))
                    with lock:
                        done[job.id] += 1
        except Exception as exc:  # any escape (e.g. "database is locked") fails the test
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    db.close_all()
    assert errors == []
    assert len(done) == 2000 and set(done.values()) == {1}
    check = dbm.open_job_store(store_url)
    assert check.counts()[(TRANSCRIPTION, "")][COMPLETED] == 2000
    claims = check.query("SELECT COUNT(*) FROM events WHERE to_status = 'in_progress'")[0][0]
    assert claims == 2000
    check.close_all()


WORKER_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import db_manager as dbm
    db = dbm.open_job_store(sys.argv[1])
    owner = dbm.make_owner()
    done, errors = [], []
    while time.time() < float(sys.argv[2]):  # all processes start together, however slow their start-up
        time.sleep(0.001)
    def work():
        try:
            while True:
                jobs = db.claim(owner, "transcription", limit=5)
                if not jobs:
                    return
                # The "API call": no transaction is open here. Real calls take seconds; a call so
                # short that the database is never idle would let one process's writers, which
                # hand over within the process, win most turns against the others' busy handler.
                time.sleep(0.02)
                for job in jobs:
                    db.complete(job, dbm.Outcome({}))
                    done.append(job.id)
        except Exception as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(json.dumps({"done": done, "errors": errors}))
""")


def test_three_processes_share_one_database(store_url, tmp_path):
    db = dbm.open_job_store(store_url)
    db.register_files(records(1200), [])
    db.close_all()
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    start = str(time.time() + 2.0)
    procs = [subprocess.Popen([sys.executable, str(script), store_url, start], stdout=subprocess.PIPE, env=script_env(),
                              text=True) for _ in range(3)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(r["errors"] == [] for r in results)
    ids = Counter(i for r in results for i in r["done"])
    assert len(ids) == 1200 and set(ids.values()) == {1}
    assert all(r["done"] for r in results)  # the work really was shared
    check = dbm.open_job_store(store_url)
    assert check.counts()[(TRANSCRIPTION, "")][COMPLETED] == 1200
    if check.dialect.name == "sqlite":
        assert check.query("PRAGMA integrity_check")[0][0] == "ok"
    check.close_all()


HOLDER_SCRIPT = textwrap.dedent("""
    import sys, time
    import db_manager as dbm
    db = dbm.open_job_store(sys.argv[1])
    jobs = db.claim(dbm.make_owner(), "transcription", limit=3, lease_seconds=3600)
    print(len(jobs), flush=True)
    time.sleep(600)
""")


def test_jobs_of_a_killed_process_are_reclaimed_at_once(store_url, tmp_path):
    db = dbm.open_job_store(store_url)
    db.register_files(records(5), [])
    script = tmp_path / "holder.py"
    script.write_text(HOLDER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), store_url], stdout=subprocess.PIPE, text=True,
                            env=script_env())
    assert proc.stdout.readline().strip() == "3"
    assert db.reclaim() == []  # alive, lease valid for an hour: untouchable
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    reclaimed = db.reclaim()
    assert len(reclaimed) == 3  # not an hour later: the owner is provably dead
    rows = db.jobs(stage=TRANSCRIPTION)
    assert all(r["status"] == NOT_STARTED and r["attempts"] == 0 for r in rows)
    assert all(r["lost_leases"] == 1 for r in rows if r["id"] in reclaimed)
    assert len(db.claim(dbm.make_owner(), TRANSCRIPTION, limit=10)) == 5
    db.close_all()


def test_owner_liveness_checks():
    from pipeline import identity

    me = dbm.make_owner()
    assert identity.owner_state(me) == identity.ALIVE
    host, boot, namespace, pid, start, token = me.split(":")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert identity.owner_state(":".join((host, boot, namespace, str(gone.pid), "1", "x"))) == identity.DEAD
    assert identity.owner_state(":".join((host, boot, namespace, pid, "1", "x"))) == identity.DEAD  # pid reused
    # only the lease can tell: another host, another boot, another PID namespace, an old owner format
    for other in ((f"{host}-b", boot, namespace), (host, "other-boot", namespace), (host, boot, "4026531999")):
        assert identity.owner_state(":".join((*other, str(gone.pid), "1", "x"))) == identity.UNKNOWN
    assert identity.owner_state(f"{dbm.HOSTNAME}:999999999:0:abcd") == identity.UNKNOWN
    assert identity.owner_state("garbage") == identity.UNKNOWN


def test_a_stopped_owner_is_left_to_its_lease_and_a_live_one_to_nobody(db, store_url):
    """SIGSTOP (a paused VM, a laptop lid): the process exists but holds its work still, so its
    lease decides. A running owner on this host is never robbed, whatever the clock says."""
    from pipeline import identity

    db.register_files(records(2), [])
    script = textwrap.dedent("""
        import sys, time
        import db_manager as dbm
        db = dbm.open_job_store(sys.argv[1])
        print(len(db.claim(dbm.make_owner(), "transcription", limit=1, lease_seconds=60)), flush=True)
        time.sleep(600)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, store_url], stdout=subprocess.PIPE, text=True,
                              env=script_env())
             for _ in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["1", "1"]
        procs[0].send_signal(signal.SIGSTOP)
        while identity.process_stat(procs[0].pid)[0] != "T":  # the signal is delivered
            time.sleep(0.01)
        owners = {r["id"]: r["lease_owner"] for r in db.jobs(stage=TRANSCRIPTION)}
        assert db.reclaim() == []  # both leases valid
        (stopped,) = [i for i, o in owners.items() if o.split(":")[3] == str(procs[0].pid)]
        assert db.reclaim(now=time.time() + 3600) == [stopped]  # a clock an hour ahead: only the stopped one
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_broken_connection_is_replaced(sqlite_db):
    db = sqlite_db
    db.register_files(records(1), [])
    db.conn.close()
    assert db.totals()["files"] == 1
    db.close_all()
    assert db.counts()[(TRANSCRIPTION, "")][NOT_STARTED] == 1


def test_write_transactions_roll_back_on_error(db):
    db.register_files(records(1), [])
    with pytest.raises(RuntimeError):
        with db.transaction() as conn:
            conn.execute("UPDATE jobs SET status = 'failed'")
            raise RuntimeError("boom")
    assert db.counts()[(TRANSCRIPTION, "")][NOT_STARTED] == 1
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as conn:
            conn.execute("UPDATE jobs SET status = 'done'")  # the CHECK keeps statuses closed


def _queue_behind_the_write_lock(db, calls):
    """Start one thread per call while the test holds the write lock; return them once all queued."""
    results = {}

    def run(name, fn):
        try:
            results[name] = ("ok", fn())
        except BaseException as exc:  # noqa: BLE001 - what each caller got is the point
            results[name] = ("error", exc)

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(db._queue) < len(calls) and time.monotonic() < deadline:
        time.sleep(0.005)
    return threads, results


def test_completions_that_arrive_together_share_one_commit(sqlite_db, monkeypatch):
    db = sqlite_db
    db.register_files(records(6), [])
    owner = dbm.make_owner()
    jobs = db.claim(owner, TRANSCRIPTION, limit=6)
    stale = dataclasses.replace(jobs[5], claim=99)
    batches = []
    commit_units = db._commit_units
    monkeypatch.setattr(db, "_commit_units", lambda batch: (batches.append(len(batch)), commit_units(batch)))
    calls = {f"done-{j.id}": (lambda j=j: db.complete(j, Outcome({}, provider="p"))) for j in jobs[:4]}
    calls["fail"] = lambda: db.fail(jobs[4], "server_error", "503", retryable=True)
    calls["stale"] = lambda: db.complete(stale, Outcome({}))
    with db._write_lock:
        threads, results = _queue_behind_the_write_lock(db, calls)
        assert len(db._queue) == 6
    for thread in threads:
        thread.join(10)
    assert batches == [6]  # one transaction, one fsync, for six units of work
    assert results["fail"] == ("ok", NOT_STARTED)
    assert results["stale"][0] == "error" and isinstance(results["stale"][1], LeaseLostError)
    assert all(results[f"done-{j.id}"] == ("ok", None) for j in jobs[:4])
    statuses = {r["id"]: r["status"] for r in db.jobs(stage=TRANSCRIPTION)}
    assert [statuses[j.id] for j in jobs] == [COMPLETED] * 4 + [NOT_STARTED, IN_PROGRESS]
    assert [e["to_status"] for e in db.events(stale.id)][-1] == "refused"  # the refusal is logged


def test_a_group_commit_that_fails_reaches_every_caller_and_keeps_nothing(sqlite_db):
    db = sqlite_db
    db.register_files(records(2), [])
    owner = dbm.make_owner()
    first, second = db.claim(owner, TRANSCRIPTION, limit=2)

    def interrupted(conn):
        raise KeyboardInterrupt  # not a unit's own error: the whole transaction rolls back

    calls = {"first": lambda: db.complete(first, Outcome({})), "interrupt": lambda: db._grouped(interrupted),
             "second": lambda: db.complete(second, Outcome({}))}
    with db._write_lock:
        threads, results = _queue_behind_the_write_lock(db, calls)
    for thread in threads:
        thread.join(10)
    assert {name: type(got[1]) for name, got in results.items()} == {
        "first": KeyboardInterrupt, "interrupt": KeyboardInterrupt, "second": KeyboardInterrupt}
    assert db.counts()[(TRANSCRIPTION, "")][IN_PROGRESS] == 2  # nothing of the batch was committed
    db.complete(first, Outcome({}))  # and the store is usable afterwards
    assert db.counts()[(TRANSCRIPTION, "")][COMPLETED] == 1


def _run_after(db, file_id, language):
    return db.query("SELECT run_after FROM jobs WHERE file_id = ? AND stage = 'translation' AND language = ?",
                    (file_id, language))[0][0]


def test_translations_stay_parked_until_their_transcript_completes(db):
    db.register_files(records(3), ["en"])
    owner = dbm.make_owner()
    files = [r["file_id"] for r in db.jobs(stage=TRANSCRIPTION)]
    assert {_run_after(db, f, "en") for f in files} == {dbm.PARKED}  # out of the queue's way
    assert db.claim(owner, TRANSLATION, "en", limit=5) == []
    first = db.claim(owner, TRANSCRIPTION, limit=1)[0]
    db.complete(first, Outcome({}))
    assert _run_after(db, first.file_id, "en") <= time.time()
    assert [j.file_id for j in db.claim(owner, TRANSLATION, "en", limit=5)] == [first.file_id]
    # A language asked for later: ready where the transcript is done, parked elsewhere.
    assert db.ensure_jobs(TRANSLATION, "de") == 3
    assert _run_after(db, first.file_id, "de") < dbm.PARKED
    assert {_run_after(db, f, "de") for f in files if f != first.file_id} == {dbm.PARKED}
    # The same content found again: its new translation job is ready at once.
    sha = db.query("SELECT sha256 FROM media_files WHERE file_id = ?", (first.file_id,))[0][0]
    db.register_files([dbm.MediaRecord("/elsewhere/copy.wav", sha, 1, 1, "audio")], ["he"])
    assert _run_after(db, first.file_id, "he") < dbm.PARKED


def test_adopting_a_transcript_releases_its_translations(db):
    db.register_files(records(1), ["en"])
    job_id = db.jobs(stage=TRANSCRIPTION)[0]["id"]
    assert db.adopt(job_id, {"txt": {"path": "/o/t.txt", "sha256": "0" * 64, "size": 1}})
    assert len(db.claim(dbm.make_owner(), TRANSLATION, "en")) == 1


def test_migration_parks_translations_that_wait_and_only_those(store_url, monkeypatch):
    with monkeypatch.context() as m:  # a database made by the first schema version
        m.setattr(dbm, "MIGRATIONS", dbm.MIGRATIONS[:1])
        m.setattr(dbm, "SCHEMA_VERSION", 1)
        old = dbm.open_job_store(store_url)
        old.register_files(records(2), ["en"])
        with old.transaction() as conn:
            conn.execute("UPDATE jobs SET run_after = 0")  # what version 1 wrote
        done = old.claim(dbm.make_owner(), TRANSCRIPTION)[0]
        old.complete(done, Outcome({}))
        with old.transaction() as conn:
            conn.execute("UPDATE jobs SET run_after = 0")
        assert old.schema_version() == 1
        old.close_all()
    new = dbm.open_job_store(store_url)
    assert new.schema_version() == dbm.SCHEMA_VERSION
    parked = {r["file_id"]: r["run_after"] for r in new.jobs(stage=TRANSLATION)}
    assert parked.pop(done.file_id) == 0 and list(parked.values()) == [dbm.PARKED]
    new.close_all()
