#!/usr/bin/env python3
"""Copy an archive's job store from SQLite to PostgreSQL, or back: every table, row for row.

FROM and TO are each a SQLite file (a path or sqlite:///path) or a postgresql://user@host/dbname
URL. A dry run by default: it reads FROM, counts what it would copy and checks that TO is empty,
changing nothing. --apply creates TO's schema (the same version as FROM's), copies every table in
one transaction (the archive's identity, files, paths, jobs with their ids, claim numbers and
leases, the event history, live runs) and then verifies the copy: per table, the row counts and a
checksum over every row (its values in a canonical form, the rows in a canonical order) must be
equal on both sides.

Stop the pipeline's runs first: a job claimed in FROM during the copy is not seen in TO.
TO must be empty (a new SQLite file, or a PostgreSQL database without verbatim's tables or with
empty ones); --replace empties a TO that holds an archive already. The copy keeps the archive's
identity, so its output folder stays its own: point the runs at TO (--db) afterwards.

Exit codes: 0 copied and verified (or, in a dry run, ready to copy), 1 the verification found a
difference (TO is left as copied, for inspection), 2 usage or configuration error.
"""

from __future__ import annotations

import hashlib
import json
import os

from pipeline import config
from pipeline.settings import Settings

# Every table of the schema, parents before children, with the column that identifies a row.
TABLES = (("archive_identity", "id"), ("media_files", "file_id"), ("media_paths", "path_bytes"),
          ("jobs", "id"), ("events", "id"), ("live_runs", "owner"))
_CHUNK = 1000


def _canonical(value) -> str:
    """One value as text that both databases give alike (a REAL 3.0 and an INTEGER 3 agree)."""
    if value is None:
        return "N"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "b" + bytes(value).hex()
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return f"i{value}"
    if isinstance(value, float):
        return f"f{value!r}"
    return "s" + json.dumps(value, ensure_ascii=True)


def table_rows(store, table: str) -> list:
    return store.query(f"SELECT * FROM {table}")


def table_digest(rows) -> tuple[int, str]:
    """(row count, sha256 over the rows): each row's columns by name, the rows' digests sorted,
    so neither column order nor either database's collation changes the result."""
    digests = sorted(hashlib.sha256(json.dumps([[k, _canonical(row[k])] for k in sorted(row.keys())])
                                    .encode("ascii")).digest() for row in rows)
    return len(digests), hashlib.sha256(b"".join(digests)).hexdigest()


def summary(store) -> dict:
    """{table: {"rows": n, "checksum": hex}} of every table."""
    result = {}
    for table, _key in TABLES:
        count, digest = table_digest(table_rows(store, table))
        result[table] = {"rows": count, "checksum": digest}
    return result


def archive_rows(store) -> int:
    """Rows that make the store an archive (its identity row alone does not: every new store has one)."""
    return sum(store.query(f"SELECT COUNT(*) FROM {table}")[0][0] for table, _ in TABLES if table != "archive_identity")


def copy(source, target, *, replace: bool = False) -> None:
    """Copy every table of ``source`` into ``target`` in one transaction (``target`` must be
    empty unless ``replace``)."""
    with target.transaction() as conn:
        if archive_rows(target) and not replace:
            raise config.ConfigError(f"{target.location} already holds an archive: nothing was copied"
                                     " (pass --replace to empty it first)")
        for table, _key in reversed(TABLES):
            conn.execute(f"DELETE FROM {table}")
        for table, key in TABLES:
            rows = table_rows(source, table)
            if not rows:
                continue
            columns = list(rows[0].keys())
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            for start in range(0, len(rows), _CHUNK):
                conn.executemany(sql, [tuple(row[c] for c in columns) for row in rows[start:start + _CHUNK]])
        if target.dialect.name == "postgresql":  # identity columns continue after the copied ids
            for table in ("jobs", "events"):
                conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                             f" COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)")


def build_parser():
    parser = config.make_parser(__doc__, "python tools/migrate_db.py verbatim.db postgresql://verbatim@db-host/archive"
                                         " --apply")
    parser.add_argument("source", metavar="FROM", help="the job store to copy (SQLite path or postgresql:// URL)")
    parser.add_argument("target", metavar="TO", help="where to copy it (SQLite path or postgresql:// URL)")
    parser.add_argument("--apply", action="store_true", help="copy and verify (default: a dry run)")
    parser.add_argument("--replace", action="store_true", help="empty a TO that already holds an archive")
    parser.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    parser.add_argument("--env-file", metavar="PATH", help="settings file to load (default: ./.env)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return parser


def _same(a: str, b: str) -> bool:
    from db_manager import is_postgres_url, sqlite_path

    if is_postgres_url(a) or is_postgres_url(b):
        return a == b
    return os.path.realpath(sqlite_path(a)) == os.path.realpath(sqlite_path(b))


def _open_target_to_look(target: str):
    """TO for a dry run, read-only; None when it does not exist yet or has no verbatim schema."""
    from db_manager import DatabaseError, is_postgres_url, sqlite_path

    if not is_postgres_url(target) and not os.path.exists(sqlite_path(target)):
        return None
    try:
        return config.open_db(target, read_only=True)
    except config.ConfigError as exc:
        if isinstance(exc.__cause__, DatabaseError) and "is not a verbatim job database" in str(exc):
            return None
        raise


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config.setup_logging(Settings.load(args).debug)
    if _same(args.source, args.target):
        raise config.ConfigError("FROM and TO are the same job store")
    source = config.open_db(args.source, must_exist=True, read_only=True)
    target = None
    try:
        before = summary(source)
        if not args.apply:
            target = _open_target_to_look(args.target)
            if target is not None and archive_rows(target) and not args.replace:
                raise config.ConfigError(f"{target.location} already holds an archive"
                                         " (pass --replace to empty it first)")
            total = sum(t["rows"] for t in before.values())
            if args.json:
                print(json.dumps({"applied": False, "from": source.location, "tables": before, "would_copy": total}))
            else:
                for table, info in before.items():
                    print(f"{table}: {info['rows']} rows")
                print(f"would copy {total} rows from {source.location} to {args.target if target is None else target.location}")
            return config.EXIT_OK
        target = config.open_db(args.target)
        copy(source, target, replace=args.replace)
        after = summary(target)
    finally:
        source.close_all()
        if target is not None:
            target.close_all()
    different = [table for table in before if before[table] != after[table]]
    total = sum(t["rows"] for t in after.values())
    if args.json:
        print(json.dumps({"applied": True, "from": source.location, "to": target.location, "tables": after,
                          "copied": total, "verified": not different, "different": different}))
    else:
        for table, info in after.items():
            mark = "DIFFERENT" if table in different else "equal"
            print(f"{table}: {info['rows']} rows, checksum {info['checksum'][:16]} {mark}")
        print(f"copied {total} rows to {target.location}; " + (
            f"verification FAILED for {', '.join(different)}" if different else "verified: counts and checksums equal"))
    return config.EXIT_FAILED if different else config.EXIT_OK


if __name__ == "__main__":
    config.run_main(main)
