"""Output files: where they go and how they are written.

Output folders are named from the file id (plus a readable slug of the original name); the
original name is data and never becomes a path unchecked. Every path is resolved and checked to
stay under the output root. Every file is written atomically: a unique temporary name in the
destination folder, flush, fsync, ``os.replace``, fsync of the folder. Only after that may the
job be committed ``completed`` with the size and sha256 returned here. A SIGKILL can leave a
temporary file behind (``.<name>.<host>-<pid>.<random>.tmp``). Such a file is harmless, and it does
not stay: the next write of the same output removes temporary files whose writer process on this
host is gone, and ``sweep_temp_files`` (used by the fix tool) removes old ones anywhere.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.faults import crash_point

TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")
_TEMP_WRITER_RE = re.compile(r"\.([A-Za-z0-9_]+)-(\d+)\.[0-9a-f]{32}\.tmp$")
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
_SLUG_RE = re.compile(r"[^A-Za-z0-9]+")


class UnsafePathError(ValueError):
    """An output path would land outside the output root."""


@dataclass(frozen=True)
class WrittenFile:
    path: str      # absolute, resolved
    sha256: str
    size: int


def slugify(name: str, max_len: int = 40) -> str:
    stem = os.path.splitext(os.path.basename(name))[0]
    slug = _SLUG_RE.sub("-", stem).strip("-").lower()
    return slug[:max_len].strip("-")


def folder_name(file_id: str, original_name: str = "") -> str:
    """``<file_id>`` or ``<file_id>-<slug>``: unique by the id, readable by the slug."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", file_id):
        raise UnsafePathError(f"not a file id: {file_id!r}")
    slug = slugify(original_name)
    return f"{file_id}-{slug}" if slug else file_id


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """Join under ``root`` and refuse anything that resolves outside it."""
    base = Path(root).resolve()
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"output path escapes the output root: {target}")
    return target


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform lets a folder be opened; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, root: str | os.PathLike) -> WrittenFile:
    """Write ``data`` to ``path`` (under ``root``) atomically and durably; return hash and size.

    On any OSError (ENOSPC, EIO from fsync, ...) the temporary file is removed and the error is
    raised: the final name either holds the complete previous/new content or does not exist.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    target = Path(path).resolve()
    safe_join(root, os.path.relpath(target, Path(root).resolve()))
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_temps(target)
    tmp = target.parent / f".{target.name}.{_HOST}-{os.getpid()}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
    try:
        with open(tmp, "xb") as handle:
            _write_durably(handle, data)
        crash_point("after_temp_write")
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)
    return WrittenFile(str(target), hashlib.sha256(data).hexdigest(), len(data))


def _write_durably(handle, data: bytes) -> None:
    """Write, flush and fsync; the seam where tests inject ENOSPC and EIO."""
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def process_gone(pid: int) -> bool:
    """True only when no process ``pid`` exists on this host (the one liveness probe we use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove_dead_writers_temps(target: Path) -> None:
    """Remove temporary files of ``target`` left by a killed writer on this host."""
    prefix = f".{target.name}."
    try:
        entries = [e.name for e in os.scandir(target.parent) if e.name.startswith(prefix)]
    except FileNotFoundError:
        return
    for name in entries:
        match = _TEMP_WRITER_RE.search(name)
        if is_temp_file(name) and match and match.group(1) == _HOST and process_gone(int(match.group(2))):
            try:
                os.unlink(target.parent / name)
            except FileNotFoundError:
                pass


def is_temp_file(name: str) -> bool:
    return bool(_TEMP_RE.match(name))


def sweep_temp_files(root: str | os.PathLike, older_than: float = 3600.0, *, apply: bool = True) -> list[str]:
    """Remove (or with ``apply=False`` only list) orphan temporary files left by a killed run.

    Only files older than ``older_than`` seconds are touched, so a live writer's temp file is safe.
    """
    found = []
    cutoff = time.time() - older_than
    root = Path(root)
    if not root.is_dir():
        return found
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if not is_temp_file(name):
                continue
            full = os.path.join(dirpath, name)
            try:
                if os.stat(full).st_mtime > cutoff:
                    continue
                if apply:
                    os.unlink(full)
            except FileNotFoundError:
                continue
            found.append(full)
    return found


def as_recorded(written: dict[str, WrittenFile]) -> dict:
    """The ``outputs`` column: format -> {"path", "sha256", "size"}."""
    return {fmt: {"path": w.path, "sha256": w.sha256, "size": w.size} for fmt, w in written.items()}
