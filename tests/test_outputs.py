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
