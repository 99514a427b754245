"""The job store: media files, jobs and their history, in SQLite (one machine) or PostgreSQL (many).

Backends
--------
``JobStore`` holds the interface and all the logic; ``SqliteJobStore`` (``DatabaseManager``, the
name every caller knows) keeps it in one SQLite file, ``pipeline.pgstore.PostgresJobStore`` in a
PostgreSQL database that several machines share. ``open_job_store(target)`` picks one from a path
or a ``postgresql://`` URL. Both run the same SQL (the few differences live in
``pipeline.dialects``), the same numbered migrations and schema version numbers, return rows
indexable by name and position, and raise sqlite3's exception classes (``DatabaseUnavailable``
is a ``sqlite3.OperationalError``: retry later). The sections below describe SQLite; the
PostgreSQL store's docstring says what differs there (a connection pool, row locks with
``SKIP LOCKED`` instead of one writer, the server's clock, ``NOTIFY``).

Transaction rule
----------------
Every public method is one unit of work: it runs inside ``transaction()`` (``BEGIN IMMEDIATE`` ...
``COMMIT``, or ``ROLLBACK`` on any exception), so a method either happens completely or not at
all. ``with db.transaction():`` groups several calls into one unit. No transaction is ever held
open across an API call or any other slow work: workers claim, let go of the database, call the
provider, write their files, and then record the outcome in a new short transaction.

Writers of one process queue on a Python lock before ``BEGIN IMMEDIATE`` (SQLite's own busy
handler sleeps in steps of up to 100 ms, which left the lock idle under contention), and
completions and failures that arrive while another commit is running share the next commit
(``_grouped``): one fsync for many jobs, each job still its own all-or-nothing unit. The price:
when one process keeps the database busy back to back (no API call between its writes), its own
writers hand over within the process and other processes, polling in SQLite's busy handler, get
fewer turns. Real runs write a few times per API call and leave the database idle most of the time.

Connections
-----------
One connection per thread (``threading.local``), all made by ``_connect()`` and kept in a locked
registry so ``close_all()`` can close them after the pool has shut down (``check_same_thread``
is off only for that). A thread whose connection broke gets a fresh one. We chose thread-local
connections over one shared connection behind a lock because several *processes* also share the
file and SQLite's own locking (WAL, ``busy_timeout``) is what serialises writers across them
anyway; per-thread connections add readers that never block, and nothing is shared between
threads, so the predecessor's "Recursive use of cursors" cannot happen.

Job lifecycle
-------------
A job is one (file, stage, language): stage ``transcription`` (language ``''``) or
``translation`` with a target language. Its status is one of ``STATUSES``, changed only by
``_transition()``, which also appends to the ``events`` log. ``claim()`` leases jobs to an owner;
``complete()``/``fail()``/``release()`` are fenced by the claim token (owner + claim number), so a
worker whose lease was taken over cannot overwrite the new holder's work. ``reclaim()`` returns
jobs of owners that are provably dead (``pipeline.identity``: same host, boot and PID namespace,
process gone) or whose lease expired, except that an owner provably alive on this host is never
robbed, whatever the clocks say. Leases are compared with the store's clock (``_now``): this
machine's for SQLite, as SQLite shared by several machines (a network filesystem) is not supported
(its locking is not safe there); the server's for PostgreSQL, one clock for every machine. A
translation job waits *parked* (see ``PARKED``) until its transcript is completed.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sqlite3
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from pipeline.errors import redact
from pipeline.dialects import POSTGRESQL, SQLITE, Dialect  # noqa: F401 (POSTGRESQL: for the PostgreSQL store)
from pipeline.faults import crash_point
from pipeline.identity import ALIVE, DEAD, HOSTNAME, make_owner, owner_state  # noqa: F401 (HOSTNAME, make_owner: part of the job store API)
from pipeline.names import display_path, folder_name  # noqa: F401 (display_path: part of the job store API)

NOT_STARTED = "not_started"
IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
STATUSES = (NOT_STARTED, IN_PROGRESS, COMPLETED, FAILED)

# The note of a job completed with nothing to say: a transcript without any text (silence, or a
# provider that heard no words), and each translation of it (made without any provider).
NO_SPEECH_NOTE = "no speech found"
# The start of a transcript's note when the language it was detected in is not one the archive
# expects (VERBATIM_LANGUAGES): it is kept, shown for review, and not translated until redone.
REVIEW_NOTE = "review: detected language"

TRANSCRIPTION = "transcription"
TRANSLATION = "translation"
STAGES = (TRANSCRIPTION, TRANSLATION)

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_LEASE_SECONDS = 300.0
BUSY_TIMEOUT_SECONDS = 60.0
# A job whose lease was lost this many times (its runner killed each time) is failed: it is
# probably what kills the runner. Generous, because a kill loop of a healthy run also loses leases.
MAX_LOST_LEASES = 50
# ``run_after`` of a translation whose transcript is not completed yet ("parked"): it sorts after
# every runnable job in the queue index, so a claim never steps over thousands of jobs that cannot
# run yet. Completing (or adopting) the transcript sets it to now; the claim still checks the
# transcript itself, and a run releases any parked job whose transcript is done (``release_parked``).
PARKED = 1e15


def _transcript_is(status: str) -> str:
    """SQL: the transcription job of the ``jobs`` row at hand has ``status`` (one of STATUSES)."""
    return ("EXISTS (SELECT 1 FROM jobs t WHERE t.file_id = jobs.file_id AND t.stage = 'transcription'"
            f" AND t.language = '' AND t.status = '{status}')")


_TRANSCRIBED = _transcript_is(COMPLETED)
# The same test for the claim, as a value looked up per row: PostgreSQL turns EXISTS into a join it
# may start from the completed transcripts when its statistics say they are few (as they were when
# the archive was registered), reading every one of them for each claim (35 ms with 10,000 done);
# a scalar subquery keeps the plan the queue index's order, checking each candidate by the unique
# index. One transcription job per file at most (UNIQUE file_id, stage, language).
_TRANSCRIBED_ROW = ("(SELECT t.status FROM jobs t WHERE t.file_id = jobs.file_id AND t.stage = 'transcription'"
                    f" AND t.language = '') = '{COMPLETED}'")
_CHUNK = 500  # records per transaction when registering in bulk
# A registration of at least this many new files refreshes the planner's statistics (PostgreSQL).
REFRESH_STATISTICS_AFTER = 1000

class DatabaseError(Exception):
    """The database cannot be used (for example it was written by a newer verbatim)."""


# Errors of the store itself, whichever the backend. They are sqlite3's exception classes on
# purpose: every caller (the runner's commit retry, the heartbeat, the tools) already tells
# "retry later" (``sqlite3.OperationalError``: locked, busy) from the rest (``sqlite3.Error``),
# and the PostgreSQL store maps psycopg's errors onto these, so no caller needs to know which
# database it has.
class StoreError(sqlite3.DatabaseError):
    """A database error of the PostgreSQL store (the SQLite store raises sqlite3's own)."""


class DatabaseUnavailable(StoreError, sqlite3.OperationalError):
    """The store cannot be reached now (its server restarting, the network cut, no pooled
    connection free in time) or a transaction lost a lock conflict: retry later."""


class StoreIntegrityError(StoreError, sqlite3.IntegrityError):
    """A constraint refused a write (as ``sqlite3.IntegrityError``)."""


class LeaseLostError(Exception):
    """A fenced update found that this worker no longer holds the job."""


@dataclass(frozen=True)
class MediaRecord:
    """One file found on disk, ready to be registered."""

    path: str             # as the OS gave it (may hold surrogate escapes for non-UTF-8 bytes)
    sha256: str
    size: int
    mtime_ns: int
    media_type: str       # audio | video
    duration: float | None = None


@dataclass(frozen=True)
class Job:
    """A claimed job: everything a worker needs, plus the fencing token."""

    id: int
    file_id: str
    stage: str
    language: str
    attempts: int
    max_attempts: int
    claim: int
    owner: str
    media_path: str
    media_type: str
    folder: str | None
    source_language: str | None
    outputs: dict = field(default_factory=dict)   # a translation's: its transcript's recorded outputs
    transcript_job: int | None = None              # a translation's: the id of its transcription job
    # Set when this attempt lost its lease (the runner's heartbeat): it sends and records nothing more.
    cancel: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)


@dataclass(frozen=True)
class Outcome:
    """What a worker records when its job succeeded."""

    outputs: dict                          # format -> {"path", "sha256", "size"}
    provider: str | None = None
    model: str | None = None
    audio_seconds: float | None = None
    characters: int | None = None
    tokens: int | None = None
    cost: float | None = None
    note: str | None = None
    duration: float | None = None          # of the media, learned while transcribing
    source_language: str | None = None     # detected while transcribing
    staged: str | None = None              # the attempt's staging folder, published once committed
    source_sha256: str | None = None       # a translation's: the transcript json it was made from


# --------------------------------------------------------------------------------------------
# Schema migrations: an ordered list of small functions, the same for both backends; their count
# is the schema version (SQLite: PRAGMA user_version; PostgreSQL: the verbatim_schema table).
# A migration takes ``(conn)`` and runs plain portable SQL (written as for SQLite: the PostgreSQL
# connection maps ``?`` and SQLite's column types, see pipeline.dialects), or ``(conn, dialect)``
# when it must say something only one database understands. Add new ones at the end.

def _run_script(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it COMMITs first, which would break the migration's transaction.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _m001_initial(conn: sqlite3.Connection) -> None:
    _run_script(conn, """
        CREATE TABLE media_files (
            file_id         TEXT PRIMARY KEY,
            sha256          TEXT NOT NULL UNIQUE,
            path_bytes      BLOB NOT NULL,      -- os.fsencode(path): exact, whatever the bytes
            path_display    TEXT NOT NULL,      -- readable form for reports
            size            INTEGER NOT NULL,
            mtime_ns        INTEGER NOT NULL,
            duration        REAL,
            media_type      TEXT NOT NULL CHECK (media_type IN ('audio', 'video')),
            source_language TEXT,
            folder          TEXT NOT NULL,      -- output folder name under the output root
            added_at        REAL NOT NULL
        );
        CREATE TABLE media_paths (
            path_bytes   BLOB PRIMARY KEY,
            path_display TEXT NOT NULL,
            file_id      TEXT NOT NULL REFERENCES media_files(file_id),
            size         INTEGER NOT NULL,
            mtime_ns     INTEGER NOT NULL,
            first_seen   REAL NOT NULL,
            last_seen    REAL NOT NULL
        );
        CREATE INDEX media_paths_file ON media_paths(file_id);
        CREATE TABLE jobs (
            id               INTEGER PRIMARY KEY,
            file_id          TEXT NOT NULL REFERENCES media_files(file_id),
            stage            TEXT NOT NULL CHECK (stage IN ('transcription', 'translation')),
            language         TEXT NOT NULL DEFAULT '',
            status           TEXT NOT NULL DEFAULT 'not_started'
                             CHECK (status IN ('not_started', 'in_progress', 'completed', 'failed')),
            attempts         INTEGER NOT NULL DEFAULT 0,
            max_attempts     INTEGER NOT NULL DEFAULT 5,
            claims           INTEGER NOT NULL DEFAULT 0,   -- fencing token: +1 on every claim
            lost_leases      INTEGER NOT NULL DEFAULT 0,
            lease_owner      TEXT,
            lease_expires_at REAL,
            run_after        REAL NOT NULL DEFAULT 0,
            error_class      TEXT,
            error_message    TEXT,
            provider         TEXT,
            model            TEXT,
            outputs          TEXT NOT NULL DEFAULT '{}',   -- {"txt": {"path","sha256","size"}, ...}
            note             TEXT,
            audio_seconds    REAL,
            characters       INTEGER,
            tokens           INTEGER,
            cost             REAL,
            created_at       REAL NOT NULL,
            started_at       REAL,
            completed_at     REAL,
            updated_at       REAL NOT NULL,
            UNIQUE (file_id, stage, language)
        );
        CREATE INDEX jobs_queue ON jobs(stage, language, status, run_after);
        CREATE INDEX jobs_lease ON jobs(status, lease_expires_at);
        CREATE TABLE events (
            id            INTEGER PRIMARY KEY,
            at            REAL NOT NULL,
            job_id        INTEGER NOT NULL REFERENCES jobs(id),
            owner         TEXT,
            from_status   TEXT,
            to_status     TEXT NOT NULL,
            attempt       INTEGER,
            error_class   TEXT,
            error_message TEXT
        );
        CREATE INDEX events_job ON events(job_id);
    """)


def _m002_park_waiting_translations(conn: sqlite3.Connection) -> None:
    conn.execute(f"UPDATE jobs SET run_after = {PARKED} WHERE stage = 'translation' AND status = 'not_started'"
                 f" AND NOT {_TRANSCRIBED}")


def _m003_archive_id(conn: sqlite3.Connection) -> None:
    """Who uses this database: a random id for it, recorded in the output folder it writes
    (pipeline.archive), so a second database pointed at the same folder is refused instead of
    overwriting it; and the transcription runs live on it (``live_runs``), so a translation run
    knows whether transcripts are still to come."""
    conn.execute("CREATE TABLE archive_identity (id TEXT NOT NULL)")
    conn.execute("INSERT INTO archive_identity (id) VALUES (?)", (os.urandom(16).hex(),))
    conn.execute("CREATE TABLE live_runs (owner TEXT PRIMARY KEY, stage TEXT NOT NULL, started_at REAL NOT NULL,"
                 " seen_at REAL NOT NULL)")


def _m004_translation_source(conn: sqlite3.Connection) -> None:
    # A translation records the sha256 of the transcript json it was made from: when the
    # transcript changes (redone, or a hand correction adopted) the translation is stale.
    conn.execute("ALTER TABLE jobs ADD COLUMN source_sha256 TEXT")


def _m005_event_outputs(conn: sqlite3.Connection) -> None:
    # What a completion recorded (format -> path, sha256, size), kept in its event: a later reset
    # forgets the job's outputs, but a file's history still says what the completion produced.
    conn.execute("ALTER TABLE events ADD COLUMN outputs TEXT")


def _m006_queue_index_ends_with_id(conn: sqlite3.Connection, dialect: Dialect) -> None:
    """The claim takes jobs ``ORDER BY run_after, id``: the queue index must give that order itself.
    SQLite's indexes end with the row id already (nothing to do there); PostgreSQL's did not, so
    each claim sorted every runnable job of its queue (most share run_after 0) to find the first
    few: 40 ms a claim with 100,000 waiting instead of well under one (benchmarks/scale.py)."""
    if dialect.name == "postgresql":
        conn.execute("DROP INDEX jobs_queue")
        conn.execute("CREATE INDEX jobs_queue ON jobs(stage, language, status, run_after, id)")


MIGRATIONS = [_m001_initial, _m002_park_waiting_translations, _m003_archive_id, _m004_translation_source,
              _m005_event_outputs, _m006_queue_index_ends_with_id]
SCHEMA_VERSION = len(MIGRATIONS)


def lease_lost_reason(owner: str | None, expires_at: float | None, now: float, state: str | None = None) -> str | None:
    """Why the holder of a lease has lost it, or None while it holds it: its process is provably
    gone, or its lease expired and it is not provably alive on this host (a live owner here is
    never robbed, whatever the clocks say). ``state``: the owner's, if already looked up."""
    state = owner_state(owner) if state is None else state
    if state == DEAD:
        return f"its owner process is gone ({owner})"
    if state != ALIVE and (expires_at or 0) < now:
        return f"its lease expired {now - (expires_at or 0):.0f} s ago"
    return None


def path_to_bytes(path: str | bytes) -> bytes:
    return path if isinstance(path, bytes) else os.fsencode(path)


class _Unit:
    """One queued unit of work of a group commit, and what became of it."""

    __slots__ = ("unit", "args", "result", "error", "done")

    def __init__(self, unit, args):
        self.unit, self.args = unit, args
        self.result, self.error, self.done = None, None, False

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result


# --------------------------------------------------------------------------------------------

class JobStore:
    """The job store's interface and the logic both backends share (see the module docstring).

    A backend provides ``transaction()``, ``query()``, ``_grouped()``, ``close_all()``, the
    schema version and ``_now(conn)`` (the clock leases are judged by); everything else is here,
    written once in SQL both SQLite and PostgreSQL run, with the differences in ``self.dialect``."""

    dialect: Dialect = SQLITE
    read_only = False

    # -- what a backend provides -------------------------------------------------------------------
    def transaction(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def query(self, sql: str, params: Iterable = ()) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def _grouped(self, unit, *args):  # pragma: no cover - abstract
        raise NotImplementedError

    def close_all(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def schema_version(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def location(self) -> str:
        """Where the store is, as shown to people (never with a password)."""
        return self.path

    def _now(self, conn) -> float:
        """The clock leases, backoffs and history are written with, inside a transaction: this
        machine's for SQLite (one machine), the server's for PostgreSQL (one clock for all)."""
        return time.time()

    def now(self) -> float:
        """The store's clock outside a transaction (see ``_now``)."""
        return time.time()

    def wait_for_transcripts(self, timeout: float, *, interrupt: threading.Event | None = None) -> bool:
        """Wait up to ``timeout`` s for a transcript to be completed; True when one was signalled.

        SQLite cannot signal: this waits out the poll interval (or until ``interrupt`` is set) and
        says False, and the caller looks again, as it always did. PostgreSQL returns on the
        completing transaction's ``NOTIFY``."""
        if interrupt is not None:
            interrupt.wait(timeout)
        else:
            time.sleep(timeout)
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close_all()

    # -- schema --------------------------------------------------------------------------------
    def _upgrade(self, conn, version: int) -> None:
        """Run the migrations after ``version``, recording each one's number (``_set_version``)."""
        if version > SCHEMA_VERSION:
            raise DatabaseError(
                f"{self.location} has schema version {version}, but this verbatim knows only up to "
                f"{SCHEMA_VERSION}: it was written by a newer verbatim. Upgrade verbatim; "
                "the database was not changed.")
        for number in range(version, SCHEMA_VERSION):
            migration = MIGRATIONS[number]
            if len(inspect.signature(migration).parameters) > 1:
                migration(conn, self.dialect)
            else:
                migration(conn)
            self._set_version(conn, number + 1)

    def _set_version(self, conn, version: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_schema(self) -> None:
        """Read-only: nothing is migrated, so the schema must be exactly the code's."""
        version = self.schema_version()
        if version == 0:
            raise DatabaseError(f"{self.location} is not a verbatim job database (it has no verbatim schema)")
        if version != SCHEMA_VERSION:
            age = "older" if version < SCHEMA_VERSION else "newer"
            raise DatabaseError(
                f"{self.location} has schema version {version}, {age} than this verbatim's {SCHEMA_VERSION}, and"
                " it is opened read-only here, so it is not " + ("upgraded: run any writing command on it (for"
                " example tools/add_media.py) where it is writable first" if age == "older"
                else "readable: upgrade verbatim"))

    # Who maintenance calls (reset, reset_failed, adopt) are logged as in ``events.owner``: a tool
    # sets its own name ("tool:fix_transcript_status.py"), so a file's history says which tool did it.
    actor = "tool"
    # -- events and the single place statuses change ---------------------------------------------
    @staticmethod
    def _log(conn, job_id: int, owner, from_status, to_status, attempt=None,
             error_class=None, error_message=None, at=None, outputs=None) -> None:
        extra = ", outputs" if outputs is not None else ""  # a completion's outputs (schema version 3)
        conn.execute(
            "INSERT INTO events (at, job_id, owner, from_status, to_status, attempt, error_class, "
            f"error_message{extra}) VALUES (?, ?, ?, ?, ?, ?, ?, ?{', ?' if extra else ''})",
            (at or time.time(), job_id, owner, from_status, to_status, attempt, error_class,
             redact(error_message) if error_message else None, *((outputs,) if extra else ())))

    def _transition(self, conn, where: str, params: tuple, to_status: str, *, owner=None,
                    sets: dict | None = None, error_class=None, error_message=None) -> list[sqlite3.Row]:
        """Move the jobs matching ``where`` to ``to_status`` and log each move. Returns the rows.

        This is the only code that writes ``jobs.status``.
        """
        if to_status not in STATUSES:
            raise ValueError(f"unknown status {to_status!r}")
        now = self._now(conn)
        sets = dict(sets or {})
        sets.update(status=to_status, updated_at=now)
        if error_message is not None:
            error_message = redact(error_message)[:2000]
        assignments = ", ".join(f"{column} = {value}" if isinstance(value, _Sql) else f"{column} = ?"
                                for column, value in sets.items())
        values = [v for v in sets.values() if not isinstance(v, _Sql)]
        # PostgreSQL: FOR UPDATE locks the rows and re-checks ``where`` on their newest version, so a
        # fenced move sees the row as it is, never as it was before a concurrent commit.
        old = {r["id"]: r["status"] for r in conn.execute(
            f"SELECT id, status FROM jobs WHERE {where} ORDER BY id{self.dialect.for_update}", params)}
        if not old:
            return []
        marks = ",".join("?" * len(old))
        rows = conn.execute(f"UPDATE jobs SET {assignments} WHERE id IN ({marks}) RETURNING *",
                            (*values, *old)).fetchall()
        recorded = sets.get("outputs") if to_status == COMPLETED else None  # kept in the history
        recorded = None if recorded == "{}" else recorded                        # (nothing to keep)
        for row in rows:
            self._log(conn, row["id"], owner or row["lease_owner"], old[row["id"]], to_status,
                      row["attempts"], error_class, error_message, at=now, outputs=recorded)
        return rows

    # -- media registration -----------------------------------------------------------------------
    def known_paths(self) -> dict[bytes, tuple[int, int, str]]:
        """path bytes -> (size, mtime_ns, file_id), so a rescan hashes only new or changed files."""
        return {bytes(r[0]): (r[1], r[2], r[3])
                for r in self.query("SELECT path_bytes, size, mtime_ns, file_id FROM media_paths")}

    def touch_paths(self, paths: Iterable[bytes]) -> None:
        """Mark paths seen now (a rescan found them unchanged): one statement per chunk."""
        paths = list(paths)
        for start in range(0, len(paths), _CHUNK):
            with self.transaction() as conn:
                source, params = self.dialect.bulk_rows(("BLOB",), [(p,) for p in paths[start:start + _CHUNK]])
                conn.execute(f"UPDATE media_paths SET last_seen = ? WHERE path_bytes IN ({source})",
                             (self._now(conn), *params))

    def register_files(self, records: Iterable[MediaRecord], languages: Iterable[str] = (),
                       *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> dict:
        """Register media in bulk and ensure their transcription and translation jobs.

        Identical content at a second path is one file: the path is recorded, no new file.
        Returns counts: ``new_files``, ``new_paths``, ``duplicates``. Each chunk of ``_CHUNK``
        records is one transaction of a few bulk inserts (``_register_chunk``).
        """
        languages = list(dict.fromkeys(languages))
        records = list(records)
        counts = {"new_files": 0, "new_paths": 0, "duplicates": 0}
        for start in range(0, len(records), _CHUNK):
            chunk = records[start:start + _CHUNK]
            with self.transaction() as conn:
                new = self._register_chunk(conn, chunk, languages, max_attempts)
            counts["new_files"] += new
            counts["duplicates"] += len(chunk) - new
            counts["new_paths"] += len(chunk)
        if counts["new_files"] >= REFRESH_STATISTICS_AFTER:
            self._refresh_statistics()
        return counts

    def _register_chunk(self, conn, records: list[MediaRecord], languages: list[str], max_attempts: int) -> int:
        """Part of ``register_files`` in one transaction: the files, their paths, their jobs and the
        jobs' first events, each table in one bulk insert. Returns how many files were new."""
        now = self._now(conn)
        files: dict[str, tuple] = {}
        paths: dict[bytes, tuple] = {}
        for rec in records:
            file_id, raw, shown = rec.sha256[:16], path_to_bytes(rec.path), display_path(rec.path)
            # The first record of a content is its file (the others are duplicates); a path listed
            # twice is recorded as its last record says, as one insert after the other would.
            files.setdefault(file_id, (file_id, rec.sha256, raw, shown, rec.size, rec.mtime_ns, rec.duration,
                                       rec.media_type, folder_name(file_id, shown), now))
            paths[raw] = (raw, shown, file_id, rec.size, rec.mtime_ns, now, now)
        new = self._bulk_insert(
            conn, "media_files (file_id, sha256, path_bytes, path_display, size, mtime_ns, duration, media_type,"
            " folder, added_at)", ("TEXT", "TEXT", "BLOB", "TEXT", "INTEGER", "INTEGER", "REAL", "TEXT", "TEXT", "REAL"),
            list(files.values()), "ON CONFLICT DO NOTHING RETURNING file_id")
        self._bulk_insert(
            conn, "media_paths (path_bytes, path_display, file_id, size, mtime_ns, first_seen, last_seen)",
            ("BLOB", "TEXT", "TEXT", "INTEGER", "INTEGER", "REAL", "REAL"), list(paths.values()),
            "ON CONFLICT(path_bytes) DO UPDATE SET file_id = excluded.file_id, size = excluded.size,"
            " mtime_ns = excluded.mtime_ns, last_seen = excluded.last_seen")
        wanted = [(f, TRANSCRIPTION, "") for f in files] + [(f, TRANSLATION, lang) for f in files for lang in languages]
        self._add_jobs(conn, wanted, max_attempts, now)
        return len(new)

    def _bulk_insert(self, conn, into: str, types: tuple[str, ...], rows: list[tuple], tail: str = "") -> list:
        """``INSERT INTO <into> <rows> <tail>`` in as few statements as the dialect takes
        (``Dialect.bulk_rows``; ``types``: the columns' SQLite types). Returns RETURNING's rows."""
        returned: list = []
        step = self.dialect.bulk_limit(len(types))
        for start in range(0, len(rows), step):
            source, params = self.dialect.bulk_rows(types, rows[start:start + step])
            returned += conn.execute(f"INSERT INTO {into} {source} {tail}", params).fetchall()
        return returned

    def _log_many(self, conn, events: list[tuple]) -> None:
        """Many ``_log`` rows in one insert: (at, job_id, owner, from_status, to_status, attempt)."""
        if events:
            self._bulk_insert(conn, "events (at, job_id, owner, from_status, to_status, attempt)",
                              ("REAL", "INTEGER", "TEXT", "TEXT", "TEXT", "INTEGER"), events)

    def _refresh_statistics(self) -> None:
        """After a large registration: let the database's planner see the new rows (a backend
        whose planner needs it says so; SQLite's plans here do not depend on statistics)."""

    def _add_jobs(self, conn, wanted: list[tuple[str, str, str]], max_attempts: int, now: float) -> int:
        """Create the jobs ``wanted`` ((file_id, stage, language)) that do not exist yet, in bulk,
        each with its first event; a translation is parked unless its transcript is done (one
        lookup for all). Returns how many were created."""
        translated = sorted({f for f, stage, _ in wanted if stage == TRANSLATION})
        transcribed = {row[0] for row in conn.execute(
            "SELECT file_id FROM jobs WHERE stage = 'transcription' AND language = '' AND status = 'completed'"
            f" AND file_id IN ({self.dialect.json_list('?')})", (json.dumps(translated),))} if translated else set()
        created = self._bulk_insert(
            conn, "jobs (file_id, stage, language, max_attempts, run_after, created_at, updated_at)",
            ("TEXT", "TEXT", "TEXT", "INTEGER", "REAL", "REAL", "REAL"),
            [(f, stage, language, max_attempts, PARKED if stage == TRANSLATION and f not in transcribed else 0.0,
              now, now) for f, stage, language in wanted], "ON CONFLICT DO NOTHING RETURNING id")
        self._log_many(conn, [(now, job_id, None, None, NOT_STARTED, 0) for job_id in sorted(r[0] for r in created)])
        return len(created)

    def ensure_jobs(self, stage: str, language: str = "", *,
                    max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> int:
        """Create the (stage, language) job for every registered file that lacks one."""
        _check_stage(stage, language)
        with self.transaction() as conn:
            now = self._now(conn)
            missing = conn.execute(
                "SELECT file_id FROM media_files WHERE file_id NOT IN"
                " (SELECT file_id FROM jobs WHERE stage = ? AND language = ?)", (stage, language)).fetchall()
            return self._add_jobs(conn, [(r[0], stage, language) for r in missing], max_attempts, now)

    @staticmethod
    def _release_translations(conn, file_id: str, now: float) -> None:
        """The transcript of ``file_id`` is completed: its parked translations join the queue."""
        conn.execute("UPDATE jobs SET run_after = ? WHERE file_id = ? AND stage = 'translation'"
                     " AND run_after >= ?", (now, file_id, PARKED))

    def release_parked(self, language: str) -> int:
        """Release parked ``language`` translations whose transcript is completed (a safety net:
        completing a transcript releases them already). Returns how many were released."""
        with self.transaction() as conn:
            return conn.execute(
                "UPDATE jobs SET run_after = ? WHERE stage = 'translation' AND language = ?"
                f" AND status = 'not_started' AND run_after >= ? AND {_TRANSCRIBED}",
                (self._now(conn), language, PARKED)).rowcount

    # -- the lease protocol ---------------------------------------------------------------------
    def claim(self, owner: str, stage: str, language: str = "", *, limit: int = 1,
              lease_seconds: float = DEFAULT_LEASE_SECONDS, file_ids: Iterable[str] | None = None) -> list[Job]:
        """Atomically lease up to ``limit`` eligible jobs to ``owner``.

        Eligible: not_started, ``run_after`` passed, and for translations a completed transcript.
        """
        _check_stage(stage, language)
        where = ("stage = ? AND language = ? AND status = 'not_started' AND run_after <= ?")
        if stage == TRANSLATION:
            where += f" AND {_TRANSCRIBED_ROW}"
        with self.transaction() as conn:
            now = self._now(conn)
            where, params = _scoped(self.dialect, where, [stage, language, now], file_ids)
            # PostgreSQL: FOR UPDATE SKIP LOCKED, so claimers on other machines step over the rows
            # another claim holds instead of queueing behind it (SQLite: the write lock serialises).
            rows = conn.execute(
                "UPDATE jobs SET status = 'in_progress', attempts = attempts + 1, claims = claims + 1,"
                " lease_owner = ?, lease_expires_at = ?, started_at = ?, updated_at = ?"
                f" WHERE id IN (SELECT id FROM jobs WHERE {where} ORDER BY run_after, id LIMIT ?"
                f"{self.dialect.skip_locked})"
                " RETURNING id, file_id, stage, language, attempts, max_attempts, claims",
                (owner, now + lease_seconds, now, now, *params, limit)).fetchall()
            if not rows:
                return []
            self._log_many(conn, [(now, row["id"], owner, NOT_STARTED, IN_PROGRESS, row["attempts"]) for row in rows])
            return self._jobs(conn, rows, owner)

    def _jobs(self, conn, rows, owner) -> list[Job]:
        """The claimed rows as Jobs: their media files, and a translation's transcript, read in one
        query for the whole batch (a claim is a few statements, whatever its size)."""
        media = {m["file_id"]: m for m in conn.execute(
            "SELECT m.file_id, m.path_bytes, m.media_type, m.folder, m.source_language, t.id AS transcript_job,"
            " t.outputs AS transcript_outputs FROM media_files m LEFT JOIN jobs t ON t.file_id = m.file_id"
            " AND t.stage = 'transcription' AND t.language = ''"
            f" WHERE m.file_id IN ({self.dialect.json_list('?')})", (json.dumps(sorted({r["file_id"] for r in rows})),))}
        jobs = []
        for row in rows:
            m = media[row["file_id"]]
            outputs, transcript_job = {}, None
            if row["stage"] == TRANSLATION and m["transcript_job"] is not None:
                outputs, transcript_job = json.loads(m["transcript_outputs"]), m["transcript_job"]
            jobs.append(Job(row["id"], row["file_id"], row["stage"], row["language"], row["attempts"],
                            row["max_attempts"], row["claims"], owner, os.fsdecode(bytes(m["path_bytes"])),
                            m["media_type"], m["folder"], m["source_language"], outputs, transcript_job))
        return jobs

    def attempts(self, job_ids: Iterable[int]) -> dict[int, sqlite3.Row]:
        """job id -> its row's (id, file_id, stage, language, status, claims, outputs): which
        attempt of a job is current, and what it recorded."""
        ids = list(job_ids)
        found = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start:start + _CHUNK]
            for row in self.query("SELECT id, file_id, stage, language, status, claims, outputs FROM jobs"
                                  f" WHERE id IN ({','.join('?' * len(chunk))})", chunk):
                found[row["id"]] = row
        return found

    def job_status(self, file_id: str, stage: str, language: str = "") -> str | None:
        row = self.query("SELECT status FROM jobs WHERE file_id = ? AND stage = ? AND language = ?",
                         (file_id, stage, language))
        return row[0][0] if row else None

    def heartbeat(self, owner: str, job_ids: Iterable[int], lease_seconds: float = DEFAULT_LEASE_SECONDS) -> set[int]:
        """Extend the leases ``owner`` still holds; returns the ids it still holds."""
        ids = list(job_ids)
        if not ids:
            return set()
        with self.transaction() as conn:
            rows = conn.execute(
                f"UPDATE jobs SET lease_expires_at = ? WHERE status = 'in_progress' AND lease_owner = ?"
                f" AND id IN ({','.join('?' * len(ids))}) RETURNING id",
                (self._now(conn) + lease_seconds, owner, *ids)).fetchall()
        return {r[0] for r in rows}

    _FENCE = "id = ? AND status = 'in_progress' AND lease_owner = ? AND claims = ?"

    def complete(self, job: Job, outcome: Outcome) -> None:
        """Record success, fenced: raises ``LeaseLostError`` (and changes nothing) if the lease moved on."""
        refused = self._grouped(self._complete, job, outcome)
        if refused:
            raise refused

    def _complete(self, conn, job: Job, outcome: Outcome) -> LeaseLostError | None:
        sets = dict(lease_owner=None, lease_expires_at=None, completed_at=self._now(conn),
                    error_class=None, error_message=None, outputs=json.dumps(outcome.outputs),
                    provider=outcome.provider, model=outcome.model, note=outcome.note,
                    audio_seconds=outcome.audio_seconds, characters=outcome.characters,
                    tokens=outcome.tokens, cost=outcome.cost)
        if job.stage == TRANSLATION:
            sets["source_sha256"] = outcome.source_sha256
        rows = self._transition(conn, self._FENCE, (job.id, job.owner, job.claim), COMPLETED, owner=job.owner,
                                sets=sets)
        crash_point("in_commit")
        if not rows:
            if self._recorded_already(conn, job, sets["outputs"]):
                return None
            return self._refuse(conn, job, "complete")
        if job.stage == TRANSCRIPTION:
            self._release_translations(conn, job.file_id, self._now(conn))
            self.dialect.notify_transcripts(conn)
        if outcome.duration is not None or outcome.source_language:
            conn.execute("UPDATE media_files SET duration = COALESCE(?, duration),"
                         " source_language = COALESCE(?, source_language) WHERE file_id = ?",
                         (outcome.duration, outcome.source_language, job.file_id))
        return None

    @staticmethod
    def _recorded_already(conn, job: Job, outputs: str) -> bool:
        """This very completion is already committed: a retry after a commit whose answer was lost
        (a PostgreSQL connection cut during COMMIT leaves its outcome unknown). The same claim
        number, the same outputs, and the last completion logged by this owner."""
        row = conn.execute("SELECT status, claims, outputs FROM jobs WHERE id = ?", (job.id,)).fetchone()
        if row is None or (row["status"], row["claims"], row["outputs"]) != (COMPLETED, job.claim, outputs):
            return False
        last = conn.execute("SELECT owner FROM events WHERE job_id = ? AND to_status = 'completed'"
                            " ORDER BY id DESC LIMIT 1", (job.id,)).fetchone()
        return last is not None and last["owner"] == job.owner

    def fail(self, job: Job, error_class: str, message: str, *, retryable: bool,
             delay: float = 0.0, spend_attempt: bool = True) -> str:
        """Record a failed attempt, fenced. Returns the job's new status.

        Retryable errors go back to not_started after ``delay`` seconds until the attempts are used
        up; permanent ones fail at once. ``spend_attempt=False`` (rate limits, a requeue after a
        long Retry-After) gives the attempt back.
        """
        status, refused = self._grouped(self._fail, job, error_class, message, retryable, delay, spend_attempt)
        if refused:
            raise refused
        return status

    def _fail(self, conn, job: Job, error_class, message, retryable, delay, spend_attempt):
        exhausted = retryable and spend_attempt and job.attempts >= job.max_attempts
        status = NOT_STARTED if retryable and not exhausted else FAILED
        sets = dict(lease_owner=None, lease_expires_at=None, error_class=error_class,
                    error_message=redact(message)[:2000], run_after=self._now(conn) + max(0.0, delay))
        if not spend_attempt:
            sets["attempts"] = _GIVE_BACK_ATTEMPT
        rows = self._transition(conn, self._FENCE, (job.id, job.owner, job.claim), status,
                                owner=job.owner, sets=sets, error_class=error_class, error_message=message)
        return status, (None if rows else self._refuse(conn, job, "fail"))

    def release(self, jobs: Iterable[Job], reason: str = "released") -> int:
        """Graceful give-back (shutdown, account error): not_started, the attempt not spent."""
        released = 0
        with self.transaction() as conn:
            for job in jobs:
                released += len(self._transition(
                    conn, self._FENCE, (job.id, job.owner, job.claim), NOT_STARTED, owner=job.owner,
                    sets=dict(lease_owner=None, lease_expires_at=None, attempts=_GIVE_BACK_ATTEMPT),
                    error_class="released", error_message=reason))
        return released

    def _refuse(self, conn, job: Job, action: str) -> LeaseLostError:
        """Log a fenced-out write (committed with the transaction) and return the error to raise."""
        row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job.id,)).fetchone()
        message = f"late {action} refused: claim {job.claim} of {job.owner} no longer holds the lease"
        self._log(conn, job.id, job.owner, row["status"] if row else None, "refused", job.attempts,
                  "lease_lost", message, at=self._now(conn))
        return LeaseLostError(f"job {job.id} ({job.stage} {job.language}): {message}")

    def reclaim(self, *, now: float | None = None) -> list[int]:
        """Return to not_started the jobs whose lease expired or whose owner process is dead.

        The lost attempt is given back (the file is not at fault for a killed runner); a job that
        keeps losing its lease fails after ``MAX_LOST_LEASES`` so a file that kills its runner
        cannot loop forever. Owners alive on this host are never touched, nor valid leases.
        """
        with self.transaction() as conn:
            now = self._now(conn) if now is None else now
            # PostgreSQL: the rows are locked until the transaction ends (a heartbeat cannot renew
            # one between this look and the take-over); rows another transaction holds right now
            # (a completion, a heartbeat) are skipped: their owner is evidently at work.
            held = conn.execute("SELECT id, lease_owner, lease_expires_at FROM jobs"
                                f" WHERE status = 'in_progress'{self.dialect.skip_locked}").fetchall()
            states = {owner: owner_state(owner) for owner in {r["lease_owner"] for r in held}}
            lost = [r["id"] for r in held
                    if lease_lost_reason(r["lease_owner"], r["lease_expires_at"], now, states[r["lease_owner"]])]
            if not lost:
                return []
            marks = ",".join("?" * len(lost))
            give_back = dict(lease_owner=None, lease_expires_at=None, run_after=0,
                             attempts=_GIVE_BACK_ATTEMPT, lost_leases=_Sql("lost_leases + 1"))
            self._transition(conn, f"id IN ({marks}) AND lost_leases + 1 < ?", (*lost, MAX_LOST_LEASES),
                             NOT_STARTED, sets=give_back, error_class="lease_lost",
                             error_message="lease expired or its owner process died; reclaimed")
            self._transition(conn, f"id IN ({marks}) AND status = 'in_progress'", tuple(lost), FAILED,
                             sets=give_back, error_class="lease_lost_repeatedly",
                             error_message=f"the runner died {MAX_LOST_LEASES} times while holding this job")
        return lost

    # -- maintenance used by the tools ------------------------------------------------------------
    def reset(self, job_ids: Iterable[int], reason: str, *, reset_attempts: bool = False,
              from_statuses: Iterable[str] = (COMPLETED, FAILED, NOT_STARTED)) -> int:
        """Put jobs back to not_started (never one in progress). Outputs are forgotten."""
        ids = list(job_ids)
        if not ids:
            return 0
        statuses = [s for s in from_statuses if s != IN_PROGRESS]
        sets = dict(run_after=0, outputs="{}", completed_at=None)
        if reset_attempts:
            sets.update(attempts=0, lost_leases=0)
        with self.transaction() as conn:
            return len(self._transition(
                conn, f"id IN ({','.join('?' * len(ids))}) AND status IN ({','.join('?' * len(statuses))})",
                (*ids, *statuses), NOT_STARTED, owner=self.actor, sets=sets, error_class="reset",
                error_message=reason))

    def reset_failed(self, stage: str, language: str = "", *, error_class: str | None = None,
                     limit: int | None = None) -> list[str]:
        """Failed jobs back to not_started with fresh attempts (history kept in events).

        Returns the file ids whose job was reset, so a retry can be scoped to exactly those."""
        sql, params = self._failed_query(stage, language, error_class, limit)
        sets = dict(run_after=0, outputs="{}", completed_at=None, attempts=0, lost_leases=0)
        with self.transaction() as conn:
            ids = [r["id"] for r in conn.execute(sql, params)]
            rows = self._transition(conn, f"id IN ({','.join('?' * len(ids))}) AND status = 'failed'", tuple(ids),
                                    NOT_STARTED, owner=self.actor, sets=sets, error_class="reset",
                                    error_message="retry of failed job") if ids else []
        return [r["file_id"] for r in rows]

    def failed_jobs(self, stage: str, language: str = "", *, error_class: str | None = None,
                    limit: int | None = None) -> list[sqlite3.Row]:
        """The failed jobs ``reset_failed`` with the same arguments would reset (same filter and order)."""
        return self.query(*self._failed_query(stage, language, error_class, limit))

    @staticmethod
    def _failed_query(stage, language, error_class, limit) -> tuple[str, list]:
        _check_stage(stage, language)
        sql = ("SELECT j.id, j.file_id, j.attempts, j.error_class, j.error_message, m.path_display"
               " FROM jobs j JOIN media_files m USING (file_id)"
               " WHERE j.stage = ? AND j.language = ? AND j.status = 'failed'")
        params: list = [stage, language]
        if error_class:
            sql += " AND j.error_class = ?"
            params.append(error_class)
        sql += " ORDER BY j.id"
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        return sql, params

    def adopt(self, job_id: int, outputs: dict, note: str = "adopted existing valid output", *,
              source_sha256: str | None = None) -> bool:
        """Mark a failed/not_started job completed because its valid output already exists."""
        with self.transaction() as conn:
            rows = self._transition(
                conn, "id = ? AND status IN ('failed', 'not_started')", (job_id,), COMPLETED, owner=self.actor,
                sets=dict(outputs=json.dumps(outputs), completed_at=self._now(conn), error_class=None,
                          error_message=None, note=note, source_sha256=source_sha256))
            for row in rows:
                if row["stage"] == TRANSCRIPTION:
                    self._release_translations(conn, row["file_id"], self._now(conn))
                    self.dialect.notify_transcripts(conn)
            return bool(rows)

    def record_edit(self, job_id: int, outputs: dict, previous: dict, note: str) -> bool:
        """A hand correction becomes the record of a completed job: its new outputs, as long as the
        job still records ``previous`` (nothing else changed it meanwhile). A transcript's
        translations become stale by their recorded source."""
        with self.transaction() as conn:
            return bool(self._transition(
                conn, "id = ? AND status = 'completed' AND outputs = ?", (job_id, json.dumps(previous)),
                COMPLETED, owner=self.actor, sets=dict(outputs=json.dumps(outputs), note=note),
                error_message=note))

    @property
    def _STALE(self) -> str:
        return ("SELECT j.id, j.file_id, j.language, j.outputs, j.source_sha256 FROM jobs j JOIN jobs t"
                " ON t.file_id = j.file_id AND t.stage = 'transcription' AND t.language = ''"
                " WHERE j.stage = 'translation' AND j.status = 'completed' AND j.source_sha256 IS NOT NULL"
                f" AND j.source_sha256 {self.dialect.is_distinct} {self.dialect.json_text('t.outputs', 'json', 'sha256')}")

    def stale_translations(self, language: str | None = None) -> list[sqlite3.Row]:
        """Completed translations made from a transcript that has changed since (redone, or a hand
        correction adopted). Translations from before sources were recorded are never stale."""
        if language is None:
            return self.query(self._STALE + " ORDER BY j.id")
        return self.query(self._STALE + " AND j.language = ? ORDER BY j.id", (language,))

    def reset_stale(self, job_ids: Iterable[int]) -> int:
        """Stale translations back to not_started (re-checked under the write lock), fresh attempts."""
        ids = list(job_ids)
        if not ids:
            return 0
        with self.transaction() as conn:
            still = [r["id"] for r in conn.execute(self._STALE + f" AND j.id IN ({','.join('?' * len(ids))})", ids)]
            if not still:
                return 0
            return len(self._transition(
                conn, f"id IN ({','.join('?' * len(still))})", tuple(still), NOT_STARTED, owner="translation",
                sets=dict(run_after=0, outputs="{}", completed_at=None, attempts=0, lost_leases=0),
                error_class="stale", error_message="its transcript changed since it was translated"))

    # -- reports ----------------------------------------------------------------------------------
    def counts(self, *, file_ids: Iterable[str] | None = None) -> dict:
        """{(stage, language): {status: n}} for every stage/language that has jobs."""
        result: dict = {}
        where, params = _scoped(self.dialect, "1 = 1", [], file_ids)
        for row in self.query(f"SELECT stage, language, status, COUNT(*) AS n FROM jobs WHERE {where}"
                              " GROUP BY stage, language, status", params):
            bucket = result.setdefault((row["stage"], row["language"]), dict.fromkeys(STATUSES, 0))
            bucket[row["status"]] = row["n"]
        return result

    def totals(self) -> dict:
        row = self.query("SELECT COUNT(*), COALESCE(SUM(duration), 0) FROM media_files")[0]
        cost = self.query("SELECT COALESCE(SUM(cost), 0) FROM jobs WHERE status = 'completed'")[0][0]
        return {"files": row[0], "audio_seconds": row[1], "cost": cost}

    def error_classes(self, stage: str | None = None, language: str | None = None, limit: int = 5) -> list:
        sql = "SELECT error_class, COUNT(*) AS n FROM jobs WHERE status = 'failed'"
        params: list = []
        if stage:
            sql += " AND stage = ?"
            params.append(stage)
        if language is not None:
            sql += " AND language = ?"
            params.append(language)
        sql += " GROUP BY error_class ORDER BY n DESC, error_class LIMIT ?"
        return [(r[0] or "unknown", r[1]) for r in self.query(sql, (*params, limit))]

    def jobs(self, *, stage=None, language=None, status=None, file_id=None) -> list[sqlite3.Row]:
        """Job rows joined with their media file (path included), filtered."""
        sql = ("SELECT j.*, m.path_bytes, m.path_display, m.folder, m.media_type, m.duration"
               " FROM jobs j JOIN media_files m USING (file_id) WHERE 1 = 1")
        params: list = []
        for column, value in (("j.stage", stage), ("j.language", language), ("j.status", status),
                              ("j.file_id", file_id)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        return self.query(sql + " ORDER BY j.file_id, j.stage, j.language", params)

    def files(self) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM media_files ORDER BY added_at, file_id")

    def paths_of(self, file_id: str) -> list[str]:
        return [os.fsdecode(bytes(r[0])) for r in
                self.query("SELECT path_bytes FROM media_paths WHERE file_id = ? ORDER BY first_seen",
                           (file_id,))]

    def events(self, job_id: int | None = None, file_id: str | None = None) -> list[sqlite3.Row]:
        if file_id is not None:
            return self.query("SELECT e.* FROM events e JOIN jobs j ON j.id = e.job_id"
                              " WHERE j.file_id = ? ORDER BY e.id", (file_id,))
        return self.query("SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,))

    def pending(self, stage: str, language: str = "", *,
                file_ids: Iterable[str] | None = None) -> tuple[int, float | None]:
        """(not_started jobs that are or will become eligible, earliest run_after among them)."""
        where = "stage = ? AND language = ? AND status = 'not_started'"
        if stage == TRANSLATION:
            where += f" AND {_TRANSCRIBED}"
        where, params = _scoped(self.dialect, where, [stage, language], file_ids)
        row = self.query(f"SELECT COUNT(*), MIN(run_after) FROM jobs WHERE {where}", params)[0]
        return row[0], row[1]


    def awaiting_transcripts(self, language: str, *, file_ids: Iterable[str] | None = None) -> int:
        """Translation jobs whose transcript a running transcription is producing right now."""
        where, params = _scoped(self.dialect, "stage = 'translation' AND language = ? AND status = 'not_started'"
                                f" AND {_transcript_is(IN_PROGRESS)}", [language], file_ids)
        return self.query(f"SELECT COUNT(*) FROM jobs WHERE {where}", params)[0][0]

    # -- live runs: who may still produce transcripts ------------------------------------------------
    def register_run(self, owner: str, stage: str) -> None:
        """Say that a run of ``stage`` is live on this database (``seen`` it now and then)."""
        with self.transaction() as conn:
            now = self._now(conn)
            conn.execute("INSERT INTO live_runs (owner, stage, started_at, seen_at) VALUES (?, ?, ?, ?)"
                         " ON CONFLICT (owner) DO UPDATE SET stage = excluded.stage,"
                         " started_at = excluded.started_at, seen_at = excluded.seen_at",
                         (owner, stage, now, now))

    def seen_run(self, owner: str) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE live_runs SET seen_at = ? WHERE owner = ?", (self._now(conn), owner))

    def end_run(self, owner: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM live_runs WHERE owner = ?", (owner,))

    def live_runs(self, stage: str, *, stale_after: float = DEFAULT_LEASE_SECONDS) -> int:
        """Runs of ``stage`` that are live: not provably dead, and seen within ``stale_after``."""
        rows = self.query("SELECT owner FROM live_runs WHERE stage = ? AND seen_at > ?",
                          (stage, self.now() - stale_after))
        return sum(1 for row in rows if owner_state(row[0]) != DEAD)

    def untranscribed_translations(self, language: str, *, file_ids: Iterable[str] | None = None) -> int:
        """not_started ``language`` translations whose transcript is not done but may still be
        (its job is not_started or in_progress; a failed one waits for a retry)."""
        coming = f"({_transcript_is(NOT_STARTED)} OR {_transcript_is(IN_PROGRESS)})"
        where, params = _scoped(self.dialect, f"stage = 'translation' AND language = ? AND status = 'not_started' AND {coming}",
                                [language], file_ids)
        return self.query(f"SELECT COUNT(*) FROM jobs WHERE {where}", params)[0][0]


class SqliteJobStore(JobStore):
    """The embedded job store: one SQLite file on a local disk, for one machine."""

    dialect = SQLITE

    @property
    def location(self) -> str:
        return os.path.abspath(self.path)

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT_SECONDS, read_only: bool = False):
        self.path = str(path)
        self.busy_timeout = busy_timeout
        # Reading tools open read-only: a copied archive or a read-only mount must still report.
        self.read_only = read_only
        self._local = threading.local()
        self._registry: set[sqlite3.Connection] = set()
        self._registry_lock = threading.Lock()
        # Writers of this process queue here, not in SQLite: SQLite's busy handler polls with
        # sleeps of up to 100 ms, so 32 threads contending for BEGIN IMMEDIATE leave the lock
        # idle most of the time (measured: 76% of worker time, 600 jobs/s). A Python lock hands
        # over at once; other processes still meet us at SQLite's lock and busy_timeout.
        self._write_lock = threading.Lock()
        self._queue: list[_Unit] = []     # units waiting for a group commit (see _grouped)
        self._queue_lock = threading.Lock()
        if read_only:
            self._check_schema()
        else:
            self._migrate()

    # -- connections and transactions ----------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            return self._connect_read_only()
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        with self._registry_lock:
            self._registry.add(conn)
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection, made on first use and remade if it broke or was closed."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                conn.total_changes  # raises ProgrammingError once closed
                return conn
            except sqlite3.ProgrammingError:
                self._forget(conn)
        conn = self._local.conn = self._connect()
        self._local.depth = 0
        return conn

    def _forget(self, conn: sqlite3.Connection) -> None:
        with self._registry_lock:
            self._registry.discard(conn)
        with contextlib.suppress(sqlite3.Error):
            conn.close()
        self._local.conn = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; ``ROLLBACK`` on error. Nested calls join the outer one."""
        conn = self.conn
        if getattr(self._local, "depth", 0):
            self._local.depth += 1
            try:
                yield conn
            finally:
                self._local.depth -= 1
            return
        with self._write_lock, self._immediate(conn):
            yield conn

    @contextlib.contextmanager
    def _immediate(self, conn: sqlite3.Connection) -> Iterator[None]:
        """The transaction proper; the caller holds ``_write_lock``."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                self._forget(conn)  # a broken connection: the next call gets a new one
            raise
        self._local.depth = 1
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        finally:
            self._local.depth = 0

    def _grouped(self, unit, *args):
        """Run ``unit(conn, *args)`` as its own unit of work, committed together with others.

        Group commit: workers that finish while another thread is committing queue their unit;
        the next thread to get the write lock runs every queued unit in one transaction (each in
        a savepoint, so one unit's error undoes only that unit) and hands each its result. Under
        load one commit serves many jobs; alone, a unit commits at once as before. Either every
        unit of a batch is committed or, if the commit fails, each caller gets the error.
        """
        if getattr(self._local, "depth", 0):  # inside the caller's transaction: join it
            return unit(self.conn, *args)
        item = _Unit(unit, args)
        with self._queue_lock:
            self._queue.append(item)
        with self._write_lock:
            if not item.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._commit_units(batch)
        return item.outcome()

    def _commit_units(self, batch: list[_Unit]) -> None:
        conn = self.conn
        try:
            with self._immediate(conn):
                for item in batch:
                    conn.execute("SAVEPOINT unit")
                    try:
                        item.result = item.unit(conn, *item.args)
                    except Exception as exc:
                        conn.execute("ROLLBACK TO unit")
                        item.error = exc
                    conn.execute("RELEASE unit")
        except BaseException as exc:  # nothing of the batch was committed: every caller hears it
            for item in batch:
                item.result, item.error = None, exc
        finally:
            for item in batch:
                item.done = True

    def query(self, sql: str, params: Iterable = ()) -> list[sqlite3.Row]:
        """A read outside any write transaction (WAL readers never block writers)."""
        return self.conn.execute(sql, tuple(params)).fetchall()

    def close_all(self) -> None:
        with self._registry_lock:
            conns, self._registry = list(self._registry), set()
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    # -- schema --------------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self.transaction() as conn:
            self._upgrade(conn, conn.execute("PRAGMA user_version").fetchone()[0])

    def _set_version(self, conn, version: int) -> None:
        conn.execute(f"PRAGMA user_version = {int(version)}")

    def schema_version(self) -> int:
        return self.query("PRAGMA user_version")[0][0]

    def _connect_read_only(self) -> sqlite3.Connection:
        """``mode=ro``; where SQLite cannot even keep its shared-memory file beside the database
        (a WAL database on a read-only mount), ``immutable=1``: nobody can write there anyway."""
        base = "file:" + urllib.parse.quote(os.path.abspath(self.path))
        for flags in ("?mode=ro", "?mode=ro&immutable=1"):
            conn = sqlite3.connect(base + flags, uri=True, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute("PRAGMA query_only = ON")
                conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                break
            except sqlite3.OperationalError:
                conn.close()
                if "immutable" in flags:
                    raise
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        with self._registry_lock:
            self._registry.add(conn)
        return conn


# The name every caller knows: the SQLite job store.
DatabaseManager = SqliteJobStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(target: str) -> bool:
    return str(target).startswith(POSTGRES_SCHEMES)


def sqlite_path(target: str) -> str:
    """The file of a SQLite target: a plain path, or ``sqlite:///path`` (``sqlite:////abs/path``)."""
    target = str(target)
    return target[len("sqlite:///"):] if target.startswith("sqlite:///") else target


def open_job_store(target: str, *, read_only: bool = False, **options) -> JobStore:
    """The job store at ``target``: ``postgresql://user@host/db`` (PostgreSQL, shared by many
    machines; needs psycopg), or a path / ``sqlite:///path`` (SQLite, one machine). ``options``
    go to the backend (SQLite: ``busy_timeout``; PostgreSQL: ``pool_size``, ``pool_timeout``)."""
    if is_postgres_url(target):
        from pipeline.pgstore import PostgresJobStore

        return PostgresJobStore(str(target), read_only=read_only, **options)
    return SqliteJobStore(sqlite_path(target), read_only=read_only, **options)



class _Sql(str):
    """A literal SQL expression for ``_transition`` sets (never user input)."""


# The attempt given back (a release, a rate limit, a reclaim), never below zero; portable SQL
# (SQLite's two-argument MAX is PostgreSQL's GREATEST).
_GIVE_BACK_ATTEMPT = _Sql("CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END")


def _scoped(dialect: "Dialect", where: str, params: list, file_ids: Iterable[str] | None) -> tuple[str, list]:
    """Narrow a WHERE clause to some files: one JSON parameter, however many ids."""
    if file_ids is None:
        return where, list(params)
    return where + f" AND file_id IN ({dialect.json_list('?')})", [*params, json.dumps(list(file_ids))]


def _check_stage(stage: str, language: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if (stage == TRANSCRIPTION) != (language == ""):
        raise ValueError("transcription jobs have no language; translation jobs need one")
