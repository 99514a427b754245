"""The output root, checked before the first paid request.

Two things are checked once per run, before any job is claimed:

- **It is writable.** A probe file is created, written, fsynced and removed. A read-only, full or
  forbidden folder would otherwise cost one paid answer per job before every job failed; instead
  the run exits 2 with the path and the reason.
- **It belongs to this database.** Two job databases pointed at one output folder would overwrite
  each other's outputs (output names derive from the file id, the same for the same content).
  The root holds a marker, ``.verbatim-archive.json``, with the random id of the database that
  writes it (``archive_identity`` in the database). A run of another database refuses the folder
  unless told to take it over (``--adopt-output-dir``). A folder without a marker is claimed.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from pipeline.errors import ConfigError

MARKER = ".verbatim-archive.json"
_PROBE_PREFIX = ".verbatim-probe-"


def check_writable(root: str) -> None:
    """Create, write, fsync and remove a probe file in ``root`` (made if missing); ConfigError if not."""
    probe = Path(root) / f"{_PROBE_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    try:
        os.makedirs(root, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\n")  # a full disk accepts an empty file, not a byte
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"the output folder {root} is not writable: {exc.strerror or exc}; nothing was sent")


def database_id(db) -> str:
    return db.query("SELECT id FROM archive_identity")[0][0]


def claim_output_root(db, root: str, *, adopt: bool = False) -> None:
    """Make sure ``root`` is this database's output folder (see the module docstring)."""
    own = database_id(db)
    recorded = _read_marker(Path(root) / MARKER)
    if recorded is not None and recorded.get("database_id") == own:
        return
    if recorded is not None and not adopt:
        raise ConfigError(
            f"the output folder {root} belongs to another job database ({recorded.get('database') or 'unknown'}):"
            " two databases writing one folder overwrite each other's outputs. Use that database (--db),"
            " another --output-dir, or pass --adopt-output-dir to make this database its owner")
    marker = {"database_id": own, "database": db.location}
    try:
        _write_marker(Path(root), json.dumps(marker, indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"the output folder {root} is not writable: {exc.strerror or exc}") from exc


def _write_marker(root: Path, text: str) -> None:
    """Write the marker atomically (temporary name, fsync, rename): never half a marker."""
    temp = root / f"{MARKER}.{uuid.uuid4().hex}.tmp"  # the name sweep_temp_files knows
    try:
        with open(temp, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, root / MARKER)
    finally:
        temp.unlink(missing_ok=True)


def _read_marker(path: Path) -> dict | None:
    """The marker's content; None when there is none. An unreadable one counts as foreign."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def prepare_output_root(db, root: str, *, adopt: bool = False) -> None:
    check_writable(root)
    claim_output_root(db, root, adopt=adopt)
