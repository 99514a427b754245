"""The job store in PostgreSQL, shared by several machines (``--db postgresql://user@host/db``).

The same ``JobStore`` as SQLite's (``db_manager``): the same methods, SQL, migrations and schema
version numbers. What differs here:

- **Connections.** A ``psycopg_pool.ConnectionPool``: each transaction (and each read) borrows a
  connection for its duration only and gives it back; the pool checks a connection before lending
  it and drops one that broke, so a server restart costs failed calls, not a poisoned pool.
  Connections run in autocommit mode and ``transaction()`` says ``BEGIN`` / ``COMMIT`` itself.
- **Concurrency.** Writers do not queue behind one lock: rows are locked. A claim takes its rows
  with ``FOR UPDATE SKIP LOCKED`` (claimers on other machines step over them), a status change
  locks the rows it moves (``FOR UPDATE``, in id order), and reclaim skips rows another
  transaction holds. There is no group commit of our own: concurrent transactions already share
  the server's WAL flushes (its own group commit), and each runs in its own connection.
- **Time.** Leases, backoffs and history are written with the *server's* clock (``now()`` of the
  transaction): machines whose clocks disagree still agree on when a lease expires. Owners on
  another machine are "unknown" to ``pipeline.identity``, so only their lease frees their jobs.
- **Errors.** psycopg's errors become the store's (``db_manager``): a lost connection, a server
  that is down or restarting, a pool with no connection free in time, a deadlock or
  serialization failure are ``DatabaseUnavailable`` (retry later, as for a locked SQLite file);
  a constraint is ``StoreIntegrityError``; anything else ``StoreError``.
- **Round trips.** ``BEGIN`` comes back with the transaction's ``now()``, and a ``NOTIFY`` goes
  with the ``COMMIT``: a completion is one message less each way than it reads.
- **Waiting.** Completing a transcript sends ``NOTIFY verbatim_transcripts`` in its transaction;
  ``wait_for_transcripts`` listens on a connection of its own and returns when one arrives.
- **Reading.** ``read_only=True`` opens every connection with ``default_transaction_read_only``.
- **Schema version.** The ``verbatim_schema`` table (one row), where SQLite has ``PRAGMA
  user_version``; migrations run under an advisory lock, so machines starting together migrate once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.parse
from typing import Iterable, Iterator

import psycopg
import psycopg_pool
from psycopg.types.array import ListBinaryDumper

from db_manager import DatabaseUnavailable, JobStore, StoreError, StoreIntegrityError
from pipeline.dialects import POSTGRESQL, TRANSCRIPTS_CHANNEL
from pipeline.errors import register_url_credentials

log = logging.getLogger(__name__)

# Connections a store's pool opens at most, unless the opener says how many its threads use at
# once (the runs do: ``runner.connections_needed``); the tools use one or two.
DEFAULT_POOL_SIZE = 16
# How long a call waits for a pooled connection (the server down or every connection busy)
# before it fails as DatabaseUnavailable: the runner then retries it as it does a locked database.
DEFAULT_POOL_TIMEOUT = 30.0
CONNECT_TIMEOUT_SECONDS = 10
# A request on a connection whose peer vanished (a network cut) fails after this long instead of
# waiting for TCP's own timeout (many minutes); keepalives find idle dead connections.
TCP_USER_TIMEOUT_MS = 30_000
_MIGRATION_LOCK = 0x76657262  # pg_advisory_xact_lock key: "verb"


class Row:
    """A result row indexable by column name and by position, like ``sqlite3.Row``."""

    __slots__ = ("_values", "_index")

    def __init__(self, values, index: dict):
        self._values, self._index = tuple(values), index

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._index)

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self):
        return iter(self._values)

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, (Row, tuple)) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._index, self._values))!r})"


def _row_factory(cursor):
    index: dict = {}
    for position, column in enumerate(cursor.description or ()):
        index.setdefault(column.name, position)  # the first of a repeated name, as sqlite3.Row
    return lambda values: Row(values, index)


def _configure(conn: psycopg.Connection) -> None:
    """Each pooled connection sends lists (the arrays of ``Dialect.bulk_rows``) in binary: three
    times faster to encode than as text, which quotes every element."""
    conn.adapters.register_dumper(list, ListBinaryDumper)


def _mapped(exc: BaseException) -> BaseException:
    """psycopg's (and the pool's) error as the store's error class, its message kept."""
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout,
                        psycopg_pool.TooManyRequests)):  # deadlocks, serialization failures too
        return DatabaseUnavailable("database unavailable: " + " ".join(str(exc).split()))  # libpq's hint: same line
    if isinstance(exc, psycopg.IntegrityError):
        return StoreIntegrityError(str(exc))
    return StoreError(str(exc))


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except (psycopg.Error, psycopg_pool.PoolTimeout, psycopg_pool.TooManyRequests) as exc:
        raise _mapped(exc) from exc


class _Cursor:
    """What ``execute`` returns: ``fetchone``/``fetchall``/iteration/``rowcount``, as sqlite3's."""

    __slots__ = ("_cursor",)

    def __init__(self, cursor):
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def fetchone(self):
        if self._cursor.description is None:
            return None
        with _store_errors():
            return self._cursor.fetchone()

    def fetchall(self) -> list:
        if self._cursor.description is None:
            return []
        with _store_errors():
            return self._cursor.fetchall()

    def __iter__(self):
        return iter(self.fetchall())


_NOW = "SELECT CAST(extract(epoch FROM now()) AS double precision)"


class Connection:
    """A pooled psycopg connection that takes the store's SQL as written (``?``, SQLite types).

    ``begin()`` and ``commit()`` each take one round trip to the server, the transaction's clock
    and its notifications riding along (several statements in one message, no parameters)."""

    dialect = POSTGRESQL

    def __init__(self, conn: psycopg.Connection):
        self.raw = conn
        self._notify: list[str] = []

    def begin(self, read_only: bool) -> float:
        """``BEGIN`` and the new transaction's ``now()`` (epoch seconds), in one message."""
        self._notify = []
        with _store_errors():
            cursor = self.raw.execute(f"BEGIN{' READ ONLY' if read_only else ''}; {_NOW}")
            cursor.nextset()
            return cursor.fetchone()[0]

    def notify_at_commit(self, channel: str) -> None:
        """``NOTIFY channel`` in this transaction: sent with its ``COMMIT`` (delivered only if it commits)."""
        if channel not in self._notify:
            self._notify.append(channel)

    def commit(self) -> None:
        statements = [f"NOTIFY {channel}" for channel in self._notify] + ["COMMIT"]
        self._notify = []
        with _store_errors():
            self.raw.execute("; ".join(statements))

    def execute(self, sql: str, params: Iterable = ()) -> _Cursor:
        with _store_errors():
            return _Cursor(self.raw.execute(POSTGRESQL.translate(sql), tuple(params)))

    def executemany(self, sql: str, rows: Iterable) -> _Cursor:
        with _store_errors():
            cursor = self.raw.cursor()
            cursor.executemany(POSTGRESQL.translate(sql), [tuple(row) for row in rows])
            return _Cursor(cursor)


def display_url(url: str) -> str:
    """The URL without its password (for messages and the output folder's marker)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc[0].split(":", 1)[0] + ":***@" + netloc[1]))


class PostgresJobStore(JobStore):
    dialect = POSTGRESQL

    def __init__(self, url: str, *, read_only: bool = False, pool_size: int = DEFAULT_POOL_SIZE,
                 pool_timeout: float = DEFAULT_POOL_TIMEOUT):
        register_url_credentials(url)  # a password in the URL never reaches a log or an error
        self.url = url
        self.path = display_url(url)
        self.read_only = read_only
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        self._local = threading.local()
        self._listener: psycopg.Connection | None = None
        self._listener_lock = threading.Lock()
        try:
            self._first_contact()
            if read_only:
                self._check_schema()
            else:
                self._migrate()
        except BaseException:
            self.close_all()  # a refused store leaves no pool (and its threads) behind
            raise

    # -- connections and transactions ----------------------------------------------------------
    def _connect_kwargs(self) -> dict:
        kwargs = dict(autocommit=True, row_factory=_row_factory, connect_timeout=CONNECT_TIMEOUT_SECONDS,
                      keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
                      tcp_user_timeout=TCP_USER_TIMEOUT_MS, application_name="verbatim")
        if self.read_only:
            kwargs["options"] = "-c default_transaction_read_only=on"
        return kwargs

    def _first_contact(self) -> None:
        """One direct connection before the pool: a wrong address, a stopped server or a refused
        login ends the opening at once with psycopg's reason, where the pool would keep trying
        for ``pool_timeout`` seconds, warning at each try (right mid-run, wrong at the start)."""
        with _store_errors():
            psycopg.connect(self.url, **self._connect_kwargs()).close()

    @property
    def pool(self) -> psycopg_pool.ConnectionPool:
        """The connection pool, opened on first use (and again after ``close_all``)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = psycopg_pool.ConnectionPool(
                    self.url, min_size=1, max_size=self.pool_size, kwargs=self._connect_kwargs(),
                    timeout=self.pool_timeout, open=False, name="verbatim",
                    check=psycopg_pool.ConnectionPool.check_connection,  # a broken one is replaced, not lent
                    reconnect_timeout=max(60.0, self.pool_timeout), configure=_configure)
                self._pool.open(wait=False)
                log.debug("job store %s: a pool of up to %d connections", self.path, self.pool_size)
            return self._pool

    @contextlib.contextmanager
    def _borrow(self) -> Iterator[Connection]:
        """A pooled connection for one unit of work; a broken one is discarded by the pool."""
        with _store_errors(), self.pool.connection() as raw:
            yield Connection(raw)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """``BEGIN`` ... ``COMMIT``; ``ROLLBACK`` on error. Nested calls join the outer one."""
        if getattr(self._local, "depth", 0):
            self._local.depth += 1
            try:
                yield self._local.conn
            finally:
                self._local.depth -= 1
            return
        with self._borrow() as conn:
            self._local.conn, self._local.depth = conn, 1
            try:
                self._local.now = conn.begin(self.read_only)
                yield conn
                conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.raw.execute("ROLLBACK")
                raise
            finally:
                self._local.conn, self._local.depth, self._local.now = None, 0, None

    def _grouped(self, unit, *args):
        """Each unit in its own transaction: PostgreSQL groups concurrent commits in its WAL flush."""
        with self.transaction() as conn:
            return unit(conn, *args)

    def query(self, sql: str, params: Iterable = ()) -> list:
        """A read: in the caller's transaction when there is one, else on a pooled connection."""
        if getattr(self._local, "depth", 0):
            return self._local.conn.execute(sql, params).fetchall()
        with self._borrow() as conn:
            return conn.execute(sql, params).fetchall()

    def _now(self, conn) -> float:
        """The server's clock: ``now()`` of this transaction (asked once per transaction)."""
        if getattr(self._local, "depth", 0) and self._local.now is not None:
            return self._local.now
        now = conn.execute(_NOW).fetchone()[0]
        if getattr(self._local, "depth", 0):
            self._local.now = now
        return now

    def now(self) -> float:
        return self.query("SELECT CAST(extract(epoch FROM clock_timestamp()) AS double precision)")[0][0]

    def close_all(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        with self._listener_lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                listener.close()
        self._local = threading.local()

    # -- waiting for transcripts ----------------------------------------------------------------
    def wait_for_transcripts(self, timeout: float, *, interrupt: threading.Event | None = None) -> bool:
        """Wait up to ``timeout`` s for ``NOTIFY verbatim_transcripts`` (a transcript completed);
        True when one came. A connection of its own LISTENs; if it cannot, this waits like SQLite's."""
        deadline = time.monotonic() + timeout
        with self._listener_lock:
            try:
                if self._listener is None or self._listener.closed:
                    self._listener = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS)
                    self._listener.execute(f"LISTEN {TRANSCRIPTS_CHANNEL}")
                while (left := deadline - time.monotonic()) > 0 and not (interrupt and interrupt.is_set()):
                    for _ in self._listener.notifies(timeout=min(left, 0.25), stop_after=1):
                        return True
                return False
            except psycopg.Error:
                with contextlib.suppress(Exception):
                    self._listener.close()
                self._listener = None
        return super().wait_for_transcripts(max(0.0, deadline - time.monotonic()), interrupt=interrupt)

    def _refresh_statistics(self) -> None:
        """``ANALYZE`` the tables a registration filled: until autovacuum gets to it (a minute or
        more), the planner judges the claim's queries by the empty tables it saw before."""
        with self._borrow() as conn:
            conn.execute("ANALYZE media_files, media_paths, jobs, events")

    # -- schema --------------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))  # one machine migrates
            conn.execute("CREATE TABLE IF NOT EXISTS verbatim_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM verbatim_schema").fetchone()
            if row is None:
                conn.execute("INSERT INTO verbatim_schema (version) VALUES (0)")
            self._upgrade(conn, row[0] if row else 0)

    def _set_version(self, conn, version: int) -> None:
        conn.execute("UPDATE verbatim_schema SET version = ?", (version,))

    def schema_version(self) -> int:
        if not self.query("SELECT to_regclass('verbatim_schema') IS NOT NULL")[0][0]:
            return 0
        return self.query("SELECT version FROM verbatim_schema")[0][0]

