"""tools/backup.py: online backups while a run writes, and restores that never hit a database in use."""

import hashlib
import json
import sqlite3
import subprocess
import sys

import pytest

import db_manager as dbm
from tests.conftest import ROOT, script_env

TOOL = str(ROOT / "tools/backup.py")

# Registers one file per transaction, for ever, and says after each commit how many it committed.
WRITER = """
import hashlib, sys
from db_manager import DatabaseManager, MediaRecord
db = DatabaseManager(sys.argv[1])
n = 0
while True:
    n += 1
    db.register_files([MediaRecord(f"/archive/{n}.wav", hashlib.sha256(b"%d" % n).hexdigest(), 1, 1, "audio")],
                      ["en", "de"])
    print(n, flush=True)
"""

HOLDER = """
import sys, time
from db_manager import DatabaseManager, make_owner
db = DatabaseManager(sys.argv[1])
db.claim(make_owner(), "transcription")
print("holding", flush=True)
time.sleep(120)
"""

LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(120)
"""


def tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=script_env(), timeout=120)


def make_db(path, n: int) -> None:
    db = dbm.DatabaseManager(str(path))
    db.register_files([dbm.MediaRecord(f"/archive/{i}.wav", hashlib.sha256(b"%d" % i).hexdigest(), 1, 1, "audio")
                       for i in range(n)], ["en"])
    db.close_all()


def rows(path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT COUNT(*) FROM media_files").fetchone()[0]
    finally:
        conn.close()


def test_backups_taken_while_a_run_writes_are_whole(tmp_path):
    db_path = str(tmp_path / "jobs.db")
    dbm.DatabaseManager(db_path).close_all()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, db_path], stdout=subprocess.PIPE, text=True,
                              env=script_env())
    try:
        made = []
        for _ in range(3):
            committed = 0
            while committed < 20 * (len(made) + 1):   # the writer is well under way
                committed = int(writer.stdout.readline())
            result = tool("create", "--db", db_path, "--json")
            assert result.returncode == 0, result.stderr
            made.append((json.loads(result.stdout), committed))
        assert writer.poll() is None   # it wrote throughout
    finally:
        writer.kill()
        writer.wait()
    for info, committed in made:
        backup = info["path"]
        assert backup.startswith(db_path + ".backups/")
        conn = sqlite3.connect(backup)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            files = conn.execute("SELECT COUNT(*) FROM media_files").fetchone()[0]
            jobs = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        finally:
            conn.close()
        assert files >= committed and jobs == 3 * files == info["jobs"]   # whole transactions only
    listed = json.loads(tool("list", "--db", db_path, "--json").stdout)
    assert [b["path"] for b in listed] == sorted(info["path"] for info, _ in made)


def test_restore_refuses_an_existing_database_without_force_then_replaces_it(tmp_path):
    db_path = tmp_path / "jobs.db"
    make_db(db_path, 5)
    backup = json.loads(tool("create", "--db", str(db_path), "--json").stdout)["path"]
    make_db(db_path, 9)   # the database moves on after the backup
    refused = tool("restore", backup, "--db", str(db_path))
    assert refused.returncode == 2 and "--force" in refused.stderr and rows(db_path) == 9
    done = tool("restore", backup, "--db", str(db_path), "--force", "--json")
    assert done.returncode == 0, done.stderr
    assert rows(db_path) == 5
    kept = json.loads(done.stdout)["replaced_backup"]["path"]
    assert kept.endswith("-before-restore.db") and rows(kept) == 9
    fresh = tmp_path / "elsewhere.db"
    assert tool("restore", backup, "--db", str(fresh)).returncode == 0 and rows(fresh) == 5
    manager = dbm.DatabaseManager(str(fresh))   # a usable job store
    assert manager.counts()[("transcription", "")]["not_started"] == 5
    manager.close_all()


@pytest.mark.parametrize("program", ["holder", "locker"])
def test_restore_refuses_a_database_in_use_even_with_force(tmp_path, program):
    db_path = tmp_path / "jobs.db"
    make_db(db_path, 3)
    backup = json.loads(tool("create", "--db", str(db_path), "--json").stdout)["path"]
    args = [HOLDER, str(db_path)] if program == "holder" else [LOCKER, str(db_path)]
    other = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True, env=script_env())
    try:
        other.stdout.readline()
        before = db_path.read_bytes()
        refused = tool("restore", backup, "--db", str(db_path), "--force")
        assert refused.returncode == 2 and "in use" in refused.stderr, refused.stderr
        assert ("a run is working on it" if program == "holder" else "write lock") in refused.stderr
        assert db_path.read_bytes() == before
    finally:
        other.kill()
        other.wait()
