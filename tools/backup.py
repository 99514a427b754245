#!/usr/bin/env python3
"""Back up and restore the job database, also while runs are working on it.

  create            copy the database with SQLite's online backup API into the backup folder
                    (default: <db>.backups/ beside it), named <db name>-<UTC time>.db; runs may go
                    on writing meanwhile. The copy is one consistent moment of the database (every
                    committed job up to then, nothing half-written) and passes PRAGMA integrity_check
                    before it gets its final name.
  list              the backups in the folder: time, size, files and jobs, schema version
  restore BACKUP    put a backup in place of the database (--db). Refused while the database is in
                    use (a run holds jobs, or a program holds its write lock) and, without --force,
                    when the database exists; with --force the database being replaced is backed up
                    first (<name>-<time>-before-restore.db), so a restore can be undone.

A backup is a database: tools/status.py --db BACKUP reads it as it is. Outputs (transcripts,
translations) are files under the output folder and are not part of it: back them up with the
usual tools; a restored database verifies them with tools/check_missing_transcripts.py.

Exit codes: 0 done, 2 usage error, a database in use, or a backup that fails its check.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

from db_manager import SCHEMA_VERSION, lease_lost_reason
from pipeline import config
from pipeline.settings import Settings

SUFFIX = ".db"
LOCK_PROBE_SECONDS = 0.5   # how long restore waits for the write lock before calling the database in use


def backup_folder(db_path: str, folder: str | None) -> Path:
    return Path(folder) if folder else Path(db_path + ".backups")


def _stamp() -> str:
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _check(path: str) -> dict:
    """Integrity, schema version and what a database file holds; ConfigError if it is no verbatim database."""
    conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if integrity != "ok":
            raise config.ConfigError(f"{path}: PRAGMA integrity_check says {integrity!r}")
        if not 1 <= version <= SCHEMA_VERSION:
            raise config.ConfigError(f"{path}: schema version {version}, not a verbatim job database this "
                                     f"verbatim can use (1 to {SCHEMA_VERSION})")
        files = conn.execute("SELECT COUNT(*) FROM media_files").fetchone()[0]
        jobs = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise config.ConfigError(f"{path}: not a usable database ({exc})") from exc
    finally:
        conn.close()
    return {"path": os.path.abspath(path), "size": os.path.getsize(path), "schema_version": version,
            "files": files, "jobs": jobs, "integrity": integrity}


def _copy(source: str, target: str) -> None:
    """SQLite's online backup from ``source`` into ``target`` in one step: one read transaction on
    the source, so the copy is a single consistent moment; in WAL mode writers are not held up."""
    src = sqlite3.connect(f"file:{os.path.abspath(source)}?mode=ro", uri=True, timeout=60)
    dst = sqlite3.connect(target, timeout=60)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


def create(db_path: str, folder: Path) -> dict:
    if not os.path.isfile(db_path):
        raise config.ConfigError(f"no database at {db_path} to back up (pass --db)")
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{Path(db_path).stem}-{_stamp()}{SUFFIX}"
    partial = folder / f".{final.name}.partial"
    try:
        _copy(db_path, str(partial))
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        info = _check(str(partial))
        os.replace(partial, final)
    finally:
        for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
            leftover.unlink(missing_ok=True)
    return {**info, "path": str(final.resolve())}


def backups(folder: Path) -> list[dict]:
    found = []
    for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []:
        try:
            found.append(_check(str(path)))
        except config.ConfigError as exc:
            found.append({"path": str(path.resolve()), "size": path.stat().st_size, "error": str(exc)})
    return found


def in_use(db_path: str) -> str | None:
    """Why the database at ``db_path`` is in use (a run holds jobs, a program holds the write lock),
    or None."""
    conn = sqlite3.connect(db_path, timeout=LOCK_PROBE_SECONDS, isolation_level=None)
    try:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            return f"a program holds its write lock ({exc})"
        try:
            rows = conn.execute("SELECT lease_owner, lease_expires_at, COUNT(*) FROM jobs"
                                " WHERE status = 'in_progress' GROUP BY lease_owner").fetchall()
        except sqlite3.DatabaseError:
            rows = []  # no jobs table: nothing runs on it
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()
    now = time.time()
    held = [(owner, n) for owner, expires, n in rows if lease_lost_reason(owner, expires, now) is None]
    if held:
        owners = "; ".join(f"{n} job(s) of {owner}" for owner, n in held)
        return f"a run is working on it ({owners})"
    return None


def restore(backup: str, db_path: str, folder: Path, force: bool) -> dict:
    if not os.path.isfile(backup):
        raise config.ConfigError(f"no backup at {backup}")
    info = _check(backup)
    replaced = None
    if os.path.exists(db_path):
        if not force:
            raise config.ConfigError(f"{db_path} exists: restoring replaces it; pass --force to do so "
                                     "(it is backed up first)")
        busy = in_use(db_path)
        if busy:
            raise config.ConfigError(f"{db_path} is in use: {busy}. Stop the runs first; nothing was changed")
        replaced = create(db_path, folder)
        replaced_path = Path(replaced["path"])
        renamed = replaced_path.with_name(replaced_path.stem + "-before-restore" + SUFFIX)
        os.replace(replaced_path, renamed)
        replaced["path"] = str(renamed)
        busy = in_use(db_path)  # again, just before: a run may have started meanwhile
        if busy:
            raise config.ConfigError(f"{db_path} is in use: {busy}. Stop the runs first; nothing was changed")
    _copy(backup, db_path)
    return {"restored": info["path"], "database": os.path.abspath(db_path), "files": info["files"],
            "jobs": info["jobs"], "schema_version": info["schema_version"], "replaced_backup": replaced}


def main(argv=None) -> int:
    parser = config.make_parser(__doc__, "python tools/backup.py create --db archive.db\n"
                                         "  python tools/backup.py restore archive.db.backups/archive-20261204T170000.000Z.db "
                                         "--db archive.db --force")
    parser.add_argument("action", choices=("create", "list", "restore"))
    parser.add_argument("backup", nargs="?", metavar="BACKUP", help="restore: the backup file to put in place")
    parser.add_argument("--to", metavar="DIR", help="backup folder (default: <db>.backups beside the database)")
    parser.add_argument("--force", action="store_true", help="restore: replace an existing database (not one in use)")
    config.add_common_args(parser)
    args = parser.parse_args(argv)
    settings = Settings.load(args)
    config.setup_logging(settings.debug)
    db_path = settings.db
    if db_path.startswith(("postgresql://", "postgres://")):
        raise config.ConfigError("backup.py backs up a SQLite job database; back up a PostgreSQL one with the"
                                 " server's tools (pg_dump), or copy it to SQLite with tools/migrate_db.py")
    folder = backup_folder(db_path, args.to)
    if (args.action == "restore") != bool(args.backup):
        raise config.ConfigError("restore takes the BACKUP to restore; create and list take none")
    if args.action == "create":
        result = create(db_path, folder)
        text = (f"backed up {db_path} to {result['path']}: {result['files']} files, {result['jobs']} jobs, "
                f"{result['size']:,} bytes, integrity ok")
    elif args.action == "list":
        result = backups(folder)
        text = "\n".join(f"{b['path']}  {b['size']:,} bytes  " + (
            f"{b['files']} files, {b['jobs']} jobs, schema {b['schema_version']}" if "error" not in b
            else f"UNUSABLE: {b['error']}") for b in result) or f"no backups in {folder}"
    else:
        result = restore(args.backup, db_path, folder, args.force)
        text = f"restored {result['restored']} to {result['database']}: {result['files']} files, {result['jobs']} jobs"
        if result["replaced_backup"]:
            text += f"; the database it replaced is kept as {result['replaced_backup']['path']}"
    print(json.dumps(result, ensure_ascii=True) if args.json else text)
    return config.EXIT_OK


if __name__ == "__main__":
    config.run_main(main)
