"""The spool: every paid provider answer, kept durably until its job is done.

An answer is written here, keyed by the identity of the request that bought it (content, stage,
language, provider, model, options: whatever the request depended on), before anything else is
done with it. A retry, a takeover by another run or a rerun after a crash that asks the same
question gets the spooled answer instead of paying again, so a crash costs only the requests that
were still unanswered. A job's answers are removed once the job is completed (its outputs
published) or has failed for good, so the spool holds only the answers of unfinished jobs.

Layout: ``<output root>/.verbatim/spool/<file id>/<stage>[-<language>]/<sha256 of the key>.json``.
Each entry is written atomically and fsynced (``pipeline.outputs.write_files``); it is not
compressed, as it lives only until its job is done and compressing costs CPU on every answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from pipeline.outputs import STATE_DIR, safe_join, write_files


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class Spool:
    def __init__(self, root: str | os.PathLike):
        self.root = root

    def folder(self, file_id: str, stage: str, language: str = "") -> Path:
        return safe_join(self.root, STATE_DIR, "spool", file_id, f"{stage}-{language}" if language else stage)

    def get(self, folder: Path, key: dict):
        """The answer spooled for ``key``, or None."""
        try:
            with open(folder / f"{_digest(key)}.json", encoding="utf-8") as handle:
                entry = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # a torn entry (a crash while it was written elsewhere): ask again
        return entry["answer"] if entry.get("key") == key else None

    def put(self, folder: Path, key: dict, answer) -> None:
        data = json.dumps({"key": key, "answer": answer}, ensure_ascii=False)
        write_files(folder, {f"{_digest(key)}.json": data}, root=self.root)

    def clear(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.parent.rmdir()  # the file's folder, once none of its jobs has answers left
        except OSError:
            pass

    def entries(self) -> list[tuple[str, str, str, Path]]:
        """(file id, stage, language, folder) of every job that has spooled answers."""
        base = Path(self.root) / STATE_DIR / "spool"
        found = []
        for file_dir in _subfolders(base):
            for job_dir in _subfolders(file_dir):
                stage, _, language = job_dir.name.partition("-")
                found.append((file_dir.name, stage, language, job_dir))
        return found


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [Path(entry.path) for entry in os.scandir(folder) if entry.is_dir()]
    except FileNotFoundError:
        return []
