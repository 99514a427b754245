"""Publishing a job's outputs: the fence carried from the database row to the files.

A worker writes its outputs into the staging folder of its attempt (``pipeline.outputs``); the
fenced commit in the job store decides which attempt won; only then are the winner's files moved
to their final names. Every staging folder left behind by a crash, a kill or a lost lease is
settled from what the database says of its attempt (``roll_forward``, run by every run at start
and by the status, check and fix tools):

- the job is completed by this attempt: the move is finished (a crash between commit and publish);
- the job is in progress under this attempt: a live worker is writing there, leave it;
- anything else (refused, failed, released, superseded): its files are discarded.

So final names always hold exactly what the database recorded. The spooled answers of jobs that
are completed or failed for good are removed at the same time, so the spool stays bounded.
"""

from __future__ import annotations

import json
import logging
import os

from db_manager import COMPLETED, FAILED, IN_PROGRESS, DatabaseManager
from pipeline.outputs import discard, publish, staged_attempts, staging_folder
from pipeline.spool import Spool

log = logging.getLogger(__name__)


def roll_forward(db: DatabaseManager, root: str | os.PathLike) -> dict:
    """Settle every staging folder and spent spool folder under ``root``; returns counts."""
    counts = {"published": 0, "discarded": 0, "spool_cleared": 0}
    found = staged_attempts(root)
    states = db.attempts(job_id for job_id, _claim, _folder in found) if found else {}
    for job_id, claim, folder in found:
        row = states.get(job_id)
        if row is not None and row["claims"] == claim and row["status"] == IN_PROGRESS:
            continue
        if row is not None and row["claims"] == claim and row["status"] == COMPLETED:
            publish(folder, json.loads(row["outputs"]), root)
            counts["published"] += 1
        else:
            discard(folder)
            counts["discarded"] += 1
    spool = Spool(root)
    for file_id, stage, language, folder in spool.entries():
        if db.job_status(file_id, stage, language) in (COMPLETED, FAILED, None):
            spool.clear(folder)
            counts["spool_cleared"] += 1
    if counts["published"]:
        log.info("finished publishing the outputs of %d completed job(s) interrupted by a crash",
                 counts["published"])
    return counts


def settle_quietly(db: DatabaseManager, root: str | os.PathLike) -> None:
    """``roll_forward`` for the tools: a read-only archive (a copy, a read-only mount) is read as
    it is, with a warning instead of an error."""
    try:
        roll_forward(db, root)
    except OSError as exc:
        log.warning("staged outputs under %s could not be settled (%s); reading the archive as it is", root, exc)


def settle(db: DatabaseManager, root: str | os.PathLike, job_id: int) -> bool:
    """Finish publishing one completed job whose outputs are still staged (another process
    committed it a moment ago and has not moved them yet, or crashed). True if it did."""
    row = db.attempts([job_id]).get(job_id)
    if row is None or row["status"] != COMPLETED:
        return False
    folder = staging_folder(root, job_id, row["claims"])
    if not folder.is_dir():
        return False
    publish(folder, json.loads(row["outputs"]), root)
    return True
