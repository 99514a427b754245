"""A run registered in the job database while it lives, so other runs can tell it is coming.

A translation run follows a transcription run instead of leaving while transcripts are still to
come. Claimed transcription jobs show a run that is working; a run that is still starting,
scanning folders or hashing files has claimed nothing yet, so it says so here from its first
moment. The registration is seen again every ``SEEN_EVERY_SECONDS`` and removed at the end; a
killed run's registration counts no longer once its process is provably gone (on this host) or
it was not seen for a lease's length (elsewhere).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading

from db_manager import make_owner

log = logging.getLogger(__name__)

SEEN_EVERY_SECONDS = 60.0


class LiveRun:
    """Registers this process's run of ``stage`` from ``start()`` to ``stop()``."""

    def __init__(self, db, stage: str):
        self.db = db
        self.stage = stage
        self.owner = make_owner()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._keep_seen, name=f"live-{stage}", daemon=True)

    def start(self) -> "LiveRun":
        self.db.register_run(self.owner, self.stage)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)
        with contextlib.suppress(sqlite3.Error):  # a stale row only delays a follower until it expires
            self.db.end_run(self.owner)

    def _keep_seen(self) -> None:
        while not self._done.wait(SEEN_EVERY_SECONDS):
            try:
                self.db.seen_run(self.owner)
            except sqlite3.Error as exc:
                log.warning("could not renew this run's registration, will retry: %s", exc)
