"""Output files: where they go and how they are written.

Output folders are named from the file id (plus a readable slug of the original name,
``pipeline.names``); the original name is data and never becomes a path unchecked. Every path is
resolved and checked to stay under the output root. Every file is written atomically: a unique
temporary name in the destination folder, flush, fsync, ``os.replace``, and one fsync of the folder
for all of a job's files. Only after that may the job be committed ``completed`` with the size and
sha256 returned here. A SIGKILL can leave a temporary file behind
(``.<name>.<host>-<pid>.<random>.tmp``). Such a file is harmless, and it does not stay: the next
write of the same output removes temporary files whose writer process on this host is gone, and
``sweep_temp_files`` (used by the fix tool) removes old ones anywhere.

A job's outputs are fenced like its row: a worker writes them into the staging folder of its own
attempt (``staging_folder``: job id and claim number, under ``STATE_DIR``), where no final name can
be touched; only after its fenced commit won are they moved to their final names (``publish``). A
refused attempt's staging folder is discarded, and a crash between commit and publish is rolled
forward from the staging folder the database names (``pipeline.publish``).

The job store records each output's path relative to the output root (``as_recorded``), so the
database and the root move together as one folder; every reader resolves a record against the root
in use (``resolve_recorded``, which also reads the absolute records of older archives).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import MACHINE_ERRNOS, MachineError
from pipeline.faults import crash_point
from pipeline.identity import process_gone
from pipeline.names import MAX_SLUG_BYTES, UnsafePathError, folder_name, slugify  # noqa: F401 (re-exported)

TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")
_TEMP_WRITER_RE = re.compile(r"\.([A-Za-z0-9_]+)-(\d+)\.[0-9a-f]{32}\.tmp$")
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
# Under the output root: staging folders of attempts and the spool of paid answers. Interview
# folders are named by file id (hex), so this name never meets one.
STATE_DIR = ".verbatim"
_REMOVE_MANIFEST = ".remove.json"   # in a staging folder: final files the publication deletes


@dataclass(frozen=True)
class WrittenFile:
    path: str      # absolute, resolved
    sha256: str
    size: int
    recorded: str  # relative to the output root (``<folder>/<name>``): what the job store records


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """Join under ``root`` and refuse anything that resolves outside it (``..``, symlinks, absolute parts)."""
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, *parts))
    if target != base and not target.startswith(os.path.join(base, "")):
        raise UnsafePathError(f"output path escapes the output root: {target}")
    return Path(target)


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
    """Write ``data`` to ``path`` (under ``root``) atomically and durably; return hash and size."""
    path = Path(path)
    return write_files(path.parent, {path.name: data}, root=root)[path.name]


def _machine_faults_stop_the_run(write):
    """Raise ``MachineError`` for what only the machine can fix (ENOSPC, EDQUOT, EROFS, EACCES,
    EPERM): retrying the job would pay for another answer that cannot be written either."""
    @functools.wraps(write)
    def wrapper(folder, contents, *, root, **options):
        try:
            return write(folder, contents, root=root, **options)
        except OSError as exc:
            if exc.errno not in MACHINE_ERRNOS:
                raise
            raise MachineError(f"cannot write outputs under {os.fspath(root)}: {exc.strerror or exc}"
                               f" ({errno.errorcode.get(exc.errno, exc.errno)}); the machine must be fixed"
                               " (free space, quota, mount, permissions)") from exc
    return wrapper


@_machine_faults_stop_the_run
def write_files(folder: str | os.PathLike, contents: dict[str, bytes | str], *,
                root: str | os.PathLike, staging: Path | None = None,
                remove: tuple[str, ...] = ()) -> dict[str, WrittenFile]:
    """Write each ``name: data`` into ``folder`` (under ``root``) atomically and durably.

    Each file goes to a temporary name, is fsynced and renamed over its final name; the folder is
    fsynced once after the last rename (one journal flush for all of a job's files, not one per
    file). When this returns, every file is on disk, so the job may be committed ``completed``.
    On any OSError (ENOSPC, EIO from fsync, ...) the temporary files are removed and the error is
    raised: each final name holds either its complete previous or its complete new content.
    ``remove`` names files of ``folder`` that the new set replaces by nothing.

    With ``staging`` (an attempt's staging folder) nothing in ``folder`` is touched: the files are
    written durably into ``staging`` and the returned paths are the final names, for ``publish``.
    """
    folder = safe_join(root, os.fspath(folder))
    for name in (*contents, *remove):
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise UnsafePathError(f"not a plain file name: {name!r}")
    if staging is not None:
        return _stage(folder, contents, staging, [relative_to_root(root, folder / name) for name in remove],
                      root=root)
    if not _make_folder(folder):  # a fresh folder cannot hold a killed writer's leftovers
        _remove_dead_writers_temps(folder, contents)
    temps: dict[str, Path] = {}
    written = {}
    try:
        for name, data in contents.items():
            if isinstance(data, str):
                data = data.encode("utf-8")
            tmp = folder / f".{name}.{_HOST}-{os.getpid()}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
            with open(tmp, "xb") as handle:
                temps[name] = tmp
                _write_durably(handle, data)
            written[name] = WrittenFile(str(folder / name), hashlib.sha256(data).hexdigest(), len(data),
                                        relative_to_root(root, folder / name))
        for name in list(temps):
            os.replace(temps.pop(name), folder / name)
    except BaseException:
        for tmp in temps.values():
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    for name in remove:
        (folder / name).unlink(missing_ok=True)
    _fsync_dir(folder)
    return written


def _stage(folder: Path, contents: dict[str, bytes | str], staging: Path,
           remove: list[str], *, root: str | os.PathLike) -> dict[str, WrittenFile]:
    """Write an attempt's files into its own staging folder, durably; final names untouched."""
    staging.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, data in contents.items():
        if isinstance(data, str):
            data = data.encode("utf-8")
        with open(staging / name, "wb") as handle:
            _write_durably(handle, data)
        written[name] = WrittenFile(str(folder / name), hashlib.sha256(data).hexdigest(), len(data),
                                    relative_to_root(root, folder / name))
        crash_point("after_temp_write")
    if remove:
        with open(staging / _REMOVE_MANIFEST, "w", encoding="utf-8") as handle:
            _write_durably(handle, json.dumps(remove))
    _fsync_dir(staging)
    return written


def staging_folder(root: str | os.PathLike, job_id: int, claim: int) -> Path:
    """Where attempt ``claim`` of job ``job_id`` writes its outputs until its commit wins."""
    return safe_join(root, STATE_DIR, "staging", f"{int(job_id)}-{int(claim)}")


def staged_attempts(root: str | os.PathLike) -> list[tuple[int, int, Path]]:
    """(job id, claim, folder) of every staging folder under ``root``."""
    base = Path(root) / STATE_DIR / "staging"
    found = []
    try:
        entries = list(os.scandir(base))
    except FileNotFoundError:
        return found
    for entry in entries:
        job_id, _, claim = entry.name.partition("-")
        if job_id.isdigit() and claim.isdigit():
            found.append((int(job_id), int(claim), Path(entry.path)))
    return found


def publish(staging: str | os.PathLike, outputs: dict, root: str | os.PathLike) -> None:
    """Move a committed attempt's files from ``staging`` to their final names under ``root``
    (``outputs``: format -> {"path", ...} as recorded), delete the files it replaces by nothing,
    and remove the staging folder. Idempotent, so a crash part-way is finished by running it
    again: a file no longer staged was moved already."""
    staging = Path(staging)
    folders = set()
    for info in outputs.values():
        final = resolve_recorded(root, info["path"])
        if final.parent not in folders:
            final.parent.mkdir(parents=True, exist_ok=True)
            folders.add(final.parent)
        try:
            os.replace(staging / final.name, final)
        except FileNotFoundError:
            continue  # moved already by an earlier, interrupted publication
    try:
        with open(staging / _REMOVE_MANIFEST, encoding="utf-8") as handle:
            obsolete = json.load(handle)
    except FileNotFoundError:
        obsolete = []
    for recorded in obsolete:
        path = resolve_recorded(root, recorded)
        path.unlink(missing_ok=True)
        folders.add(path.parent)
    for folder in folders:
        _fsync_dir(folder)
    discard(staging)


def discard(staging: str | os.PathLike) -> None:
    """Remove an attempt's staging folder (a refused, failed or superseded attempt)."""
    shutil.rmtree(staging, ignore_errors=True)


def _make_folder(folder: Path) -> bool:
    """Create ``folder`` (and missing parents); True if this call created it."""
    try:
        os.mkdir(folder)
    except FileExistsError:
        return False
    except FileNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
    return True


def _write_durably(handle, data: bytes) -> None:
    """Write, flush and fsync; the seam where tests inject ENOSPC and EIO."""
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def _remove_dead_writers_temps(folder: Path, names) -> None:
    """Remove temporary files of ``names`` in ``folder`` left by a killed writer on this host."""
    prefixes = tuple(f".{name}." for name in names)
    try:
        entries = [e.name for e in os.scandir(folder) if e.name.startswith(prefixes)]
    except FileNotFoundError:
        return
    for name in entries:
        match = _TEMP_WRITER_RE.search(name)
        if is_temp_file(name) and match and match.group(1) == _HOST and process_gone(int(match.group(2))):
            try:
                os.unlink(folder / name)
            except FileNotFoundError:
                pass


def relative_to_root(root: str | os.PathLike, path: str | os.PathLike) -> str:
    """How the job store records ``path`` (a resolved path under ``root``): relative to the output
    root, with ``/`` between parts, so the database and the root move together as one folder."""
    return Path(path).relative_to(os.path.realpath(root)).as_posix()


def resolve_recorded(root: str | os.PathLike, recorded: str) -> Path:
    """Where a recorded output path lies under the output root in use, ``root``.

    Records are relative to the root (``<folder>/<name>``) and are joined to it (refused if they
    would leave it). A record made before that is absolute, ``<old root>/<folder>/<name>``, and is
    read re-rooted, as ``<root>/<folder>/<name>``, when that file exists or when the absolute one
    does not (a moved or remounted archive; a check then names the file where it belongs); as it
    stands only while the file still lies there and not under ``root``. Such records are not
    rewritten: each is replaced by a relative one when its job next completes."""
    if not os.path.isabs(recorded):
        return safe_join(root, recorded)
    old = Path(recorded)
    try:
        moved = safe_join(root, old.parent.name, old.name)
    except UnsafePathError:
        return old
    return moved if moved.exists() or not old.exists() else old


def recorded_state(info: dict, root: str | os.PathLike) -> str:
    """What the file of a recorded output (``{"path", "sha256", ...}``) under ``root`` holds now:
    "same" as was recorded, "changed" (by hand, or damaged), or "missing" (gone or unreadable)."""
    try:
        return "same" if sha256_file(resolve_recorded(root, info["path"])) == info.get("sha256") else "changed"
    except (OSError, KeyError, TypeError, UnsafePathError):
        return "missing"


def keep_edits(outputs: dict, root: str | os.PathLike, *, now: float | None = None) -> list[str]:
    """Before a job's recorded outputs are replaced: keep a copy of each one under ``root`` that no
    longer holds what was recorded (a hand edit) as ``<name>.edited-<UTC time>`` beside it. Returns
    the copies. Nothing ever overwrites an edit without this."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    kept = []
    for info in outputs.values():
        if recorded_state(info, root) != "changed":
            continue
        path = resolve_recorded(root, info["path"])
        copy = path.with_name(f"{path.name}.edited-{stamp}")
        shutil.copy2(path, copy)
        kept.append(str(copy))
    return kept


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
    """The ``outputs`` column: format -> {"path", "sha256", "size"}, each path relative to the
    output root (read back with ``resolve_recorded``)."""
    return {fmt: {"path": w.recorded, "sha256": w.sha256, "size": w.size} for fmt, w in written.items()}
