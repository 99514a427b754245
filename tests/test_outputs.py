"""Output files: path safety and the atomic, durable group write."""

import errno
import hashlib
import os
import subprocess
import sys

import pytest

from pipeline import outputs
from pipeline.outputs import UnsafePathError, safe_join, write_files


def test_safe_join_refuses_paths_that_leave_the_root(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    assert safe_join(root, "a", "b.txt") == (root / "a" / "b.txt").resolve()
    assert safe_join(root, str(root / "x")) == (root / "x").resolve()  # absolute but inside
    for parts in (("..", "escape"), ("a", "..", "..", "escape"), (str(tmp_path / "elsewhere"),)):
        with pytest.raises(UnsafePathError):
            safe_join(root, *parts)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError):
        safe_join(root, "link", "escape")
    sibling = tmp_path / "out-sibling"  # shares the root's name as a prefix, is not under it
    with pytest.raises(UnsafePathError):
        safe_join(root, str(sibling))


def test_write_files_writes_every_file_with_its_hash_and_leaves_no_temp(tmp_path):
    folder = tmp_path / "out" / "0123456789abcdef-name"
    written = write_files(folder, {"transcript.txt": "Hallo\n", "raw.json.gz": b"\x1f\x8b"}, root=tmp_path / "out")
    assert (folder / "transcript.txt").read_text() == "Hallo\n"
    assert written["transcript.txt"].sha256 == hashlib.sha256(b"Hallo\n").hexdigest()
    assert written["raw.json.gz"].size == 2 and written["raw.json.gz"].path == str(folder / "raw.json.gz")
    assert sorted(os.listdir(folder)) == ["raw.json.gz", "transcript.txt"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b.txt", "../x.txt"])
def test_write_files_refuses_names_that_are_not_plain(tmp_path, name):
    with pytest.raises(UnsafePathError):
        write_files(tmp_path / "out" / "f", {name: "x"}, root=tmp_path / "out")


def test_a_failed_write_removes_its_temps_and_keeps_the_old_files(tmp_path, monkeypatch):
    root = tmp_path / "out"
    folder = root / "f"
    write_files(folder, {"a.txt": "old a", "b.txt": "old b"}, root=root)
    real = outputs._write_durably
    calls = []

    def full_disk_on_second(handle, data):
        calls.append(data)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(handle, data)

    monkeypatch.setattr(outputs, "_write_durably", full_disk_on_second)
    with pytest.raises(OSError):
        write_files(folder, {"a.txt": "new a", "b.txt": "new b"}, root=root)
    # No rename happens before every temporary file is written: both old files are intact.
    assert (folder / "a.txt").read_text() == "old a" and (folder / "b.txt").read_text() == "old b"
    assert sorted(os.listdir(folder)) == ["a.txt", "b.txt"]


def test_leftover_temps_of_a_dead_writer_are_swept_and_a_live_ones_kept(tmp_path):
    root = tmp_path / "out"
    folder = root / "f"
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = outputs._HOST
    dead_temp = folder / f".a.txt.{host}-{dead}.{'0' * 32}.tmp"
    live_temp = folder / f".a.txt.{host}-{os.getppid()}.{'1' * 32}.tmp"
    other_temp = folder / f".b.txt.{host}-{dead}.{'2' * 32}.tmp"  # another output: not ours to touch
    for path in (dead_temp, live_temp, other_temp):
        path.write_text("partial")
    write_files(folder, {"a.txt": "done"}, root=root)
    assert not dead_temp.exists() and live_temp.exists() and other_temp.exists()


# -- folder names keep every script -----------------------------------------------------------
def test_folder_names_keep_letters_and_digits_of_every_script():
    import unicodedata

    from pipeline.outputs import folder_name

    file_id = "0123456789abcdef"
    mixed = folder_name(file_id, "/a/04 Brief an Tante U\u0308lla \u2013 \u05de\u05db\u05ea\u05d1 \u05dc\u05d3\u05d5\u05d3\u05d4.wav")
    assert mixed == f"{file_id}-04-brief-an-tante-\u00fclla-\u05de\u05db\u05ea\u05d1-\u05dc\u05d3\u05d5"  # 40 bytes at most
    assert unicodedata.is_normalized("NFC", mixed)
    assert folder_name(file_id, "\u05e8\u05d0\u05d9\u05d5\u05df 3.mp3") == f"{file_id}-\u05e8\u05d0\u05d9\u05d5\u05df-3"
    assert folder_name(file_id, "\u0418\u043d\u0442\u0435\u0440\u0432\u044c\u044e.wav").endswith("-\u0438\u043d\u0442\u0435\u0440\u0432\u044c\u044e")
    assert folder_name(file_id, "\u30a4\u30f3\u30bf\u30d3\u30e5\u30fc.wav").endswith("-\u30a4\u30f3\u30bf\u30d3\u30e5\u30fc")


@pytest.mark.parametrize("name", [
    'a<b>c:d"e/f\\g|h?i*j.wav', "tab\there\nnew\x00line\x1f.wav", "trailing dot. .wav", "CON.wav", "nul",
    "\u202eevil\u202c\u200f\u200e.wav", "\ud800\udcff bad bytes.wav", "x" * 300 + ".wav",
    "\u05d0" * 200 + ".wav", "\u00e9" * 90 + "\u0301" * 5 + ".wav", "...", "---", "   .wav"])
def test_folder_names_are_safe_on_every_file_system(name):
    from pipeline.outputs import MAX_SLUG_BYTES, folder_name

    folder = folder_name("0123456789abcdef", name)
    assert folder.startswith("0123456789abcdef")
    assert not set('<>:"/\\|?*') & set(folder)
    assert all(ch.isprintable() and ch not in "\u202e\u202c\u200f\u200e" for ch in folder)
    assert not folder.endswith((".", " ", "-"))
    assert len(folder.encode("utf-8")) <= 17 + MAX_SLUG_BYTES
    folder.encode("utf-8")  # no lone surrogates
    assert folder.split(".")[0].upper() not in {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)),
                                                *(f"LPT{i}" for i in range(10))}


def test_the_job_store_imports_nothing_above_it():
    """db_manager names a file's folder from pipeline.names, which imports no other module."""
    code = ("import sys, db_manager as d; d.DatabaseManager(':memory:').register_files("
            "[d.MediaRecord('/a/b.wav', 'ab' * 32, 1, 1, 'audio')], ['he']); above = sorted(m for m in sys.modules"
            " if m.startswith('pipeline.') and m not in ('pipeline.errors', 'pipeline.faults', 'pipeline.identity',"
            " 'pipeline.names', 'pipeline.dialects')); print(above)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.stdout.strip() == "[]"


def test_existing_archives_keep_their_folder_names(db, tmp_path):
    import db_manager as dbm

    sha = "ab" * 32
    db.register_files([dbm.MediaRecord("/archive/04 Brief an Tante Ülla.wav", sha, 1, 1, "audio")], [])
    db.query("UPDATE media_files SET folder = ?", (f"{sha[:16]}-04-brief-an-tante-lla",))  # the old slug
    db.register_files([dbm.MediaRecord("/archive/04 Brief an Tante Ülla.wav", sha, 1, 2, "audio"),
                       dbm.MediaRecord("/elsewhere/copy.wav", sha, 1, 1, "audio")], [])
    assert [r["folder"] for r in db.files()] == [f"{sha[:16]}-04-brief-an-tante-lla"]


# -- recorded paths: relative to the output root ----------------------------------------------------
def test_recorded_paths_are_relative_and_legacy_absolute_ones_are_re_rooted(tmp_path):
    from pipeline.outputs import as_recorded, resolve_recorded

    root = tmp_path / "root"
    written = write_files(root / "abcdef0123456789-talk", {"transcript.txt": "hi"}, root=root)
    assert as_recorded(written)["transcript.txt"]["path"] == "abcdef0123456789-talk/transcript.txt"
    assert str(resolve_recorded(root, "abcdef0123456789-talk/transcript.txt")) == written["transcript.txt"].path
    with pytest.raises(UnsafePathError):
        resolve_recorded(root, "../elsewhere/transcript.txt")

    old = tmp_path / "old-root" / "abcdef0123456789-talk" / "transcript.txt"
    # the old root is gone (moved): read under the root in use
    assert resolve_recorded(root, str(old)) == (root / "abcdef0123456789-talk" / "transcript.txt").resolve()
    old.parent.mkdir(parents=True)
    old.write_text("hi")
    # both exist (a copy): the root in use wins
    assert resolve_recorded(root, str(old)) == (root / "abcdef0123456789-talk" / "transcript.txt").resolve()
    os.unlink(root / "abcdef0123456789-talk" / "transcript.txt")
    # only the recorded one exists (the tool was pointed at another root): read as recorded
    assert resolve_recorded(root, str(old)) == old
