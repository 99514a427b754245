"""The one job runner behind ``parallel_transcription.py`` and ``parallel_translation.py``.

Shape: claim a batch -> hand the jobs to a thread pool -> each worker calls ``work(job)`` (the
provider call and the atomic output writes happen there, outside any transaction) -> the worker
records the outcome in its own short transaction -> the next batch is claimed *before* the
current one drains, so workers never wait for the main thread -> summary and exit code.

Errors are acted on by kind (see ``pipeline.errors``): retryable ones go back to not_started with
full-jitter backoff until the job's attempts are spent, rate limits are waited out by the shared
limiter and never spend attempts, permanent ones fail the job with the reason, account-level ones
stop the run and give every held job back. A heartbeat thread keeps the leases of held jobs
alive; when it finds one lost, that attempt is cancelled (``Job.cancel``): it sends no further
request, writes nothing and commits nothing. A completion after the lease moved on is refused by
the database and only counted.

What a job paid for is never thrown away: every provider answer is spooled before it is used
(``JobCalls``, ``pipeline.spool``), outputs are staged per attempt and published only after the
fenced commit won (``pipeline.publish``), and a commit that fails (a lock held by another
program, a full disk) is retried for ``commit_patience`` seconds; if it still cannot be recorded,
the run stops and exits 2, and the next run finds the answer in the spool.

Shutdown: the first Ctrl-C (or SIGTERM) stops claiming, gives back jobs not yet started, and lets
running ones finish; a second one gives back everything at once and exits 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sqlite3
import sys
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from db_manager import (DEFAULT_LEASE_SECONDS, FAILED, PARKED, TRANSCRIPTION, TRANSLATION, DatabaseManager, Job,
                        LeaseLostError, Outcome, make_owner)
from pipeline import errors, outputs, publish
from pipeline.clock import SYSTEM, Clock
from pipeline.config import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, EXIT_WORK_LEFT, positive_argument
from pipeline.faults import crash_point
from pipeline.limiter import Stopping
from pipeline.spool import Spool

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 0.5
RECLAIM_EVERY_SECONDS = 30.0
# A completion that cannot be committed is retried this long (jittered backoff up to the cap)
# before the run gives up on recording it; its answer stays in the spool meanwhile.
COMMIT_PATIENCE_SECONDS = 600.0
COMMIT_RETRY_CAP_SECONDS = 15.0
# A translation run started beside a transcription run (the same second) looks this long for it
# to register before it concludes that no transcript is coming.
TRANSCRIPTION_GRACE_SECONDS = 5.0


@dataclass
class RunOptions:
    stage: str
    language: str = ""
    workers: int = 5             # parallel API calls (the scripts' RunRequests holds them to this)
    threads: int = 0             # worker threads; 0: as many as workers (see thread_count)
    batch_size: int = 20
    limit: int | None = None
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    label: str = ""
    quiet: bool = False
    position: int = 0            # progress bar line, when several runners share a terminal
    file_ids: list[str] | None = None   # only these files' jobs (a retry of failed ones), else all
    output_root: str | None = None      # where attempts stage and the spool lives; None: no files
    commit_patience: float = COMMIT_PATIENCE_SECONDS
    # A translation run: while this says True, transcripts it waits for are still to come from a
    # transcription running beside it (tools/process.py), so it follows instead of leaving.
    follow: Callable[[], bool] | None = None
    # Backoff of a retryable failure (``errors.retry_delay``): Settings' VERBATIM_RETRY_BASE_SECONDS
    # and VERBATIM_RETRY_CAP_SECONDS, set by the stage that plans the run; None: errors' defaults.
    retry_base_seconds: float | None = None
    retry_cap_seconds: float | None = None


@dataclass
class RunSummary:
    stage: str
    language: str
    completed: int = 0
    failed: int = 0
    retried: int = 0
    requeued: int = 0
    released: int = 0
    lease_lost: int = 0
    failed_total: int = 0        # failed jobs of this stage/language in the database afterwards
    remaining: int = 0           # not_started jobs left afterwards
    waiting_for_transcripts: int = 0   # translations whose transcript is still to be made: work left
    account_error: str | None = None
    interrupted: bool = False
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "errors"}
        data["errors"] = dict(self.errors)
        return data


class JobCalls:
    """How one job makes its provider requests through the run's ``call`` (its limiter and request
    slots): a request whose answer is in the spool is not sent again, every new answer is spooled
    before it is used, and once the job's lease is lost nothing more is sent.

    ``call(fn, key=...)``: ``key`` is the request's identity (a dict of everything the answer
    depends on); ``encode(answer)`` gives what to spool (None: do not spool this answer) and
    ``decode`` turns it back. Without a key the request is simply made.
    """

    def __init__(self, call, spool: Spool | None, job: Job, *, encode, decode):
        self.call, self.spool, self.job = call, spool, job
        self.encode, self.decode = encode, decode
        self.folder = spool.folder(job.file_id, job.stage, job.language) if spool else None

    def __call__(self, fn, key: dict | None = None):
        self._check()
        if key is None or self.spool is None:
            return self.call(fn)
        spooled = self.spool.get(self.folder, key)
        if spooled is not None:
            return self.decode(spooled)
        answer = self.call(fn)
        encoded = self.encode(answer)
        if encoded is not None:
            self.spool.put(self.folder, key, encoded)
        self._check()
        return answer

    def _check(self) -> None:
        if self.job.cancel.is_set():
            raise LeaseLostError(f"job {self.job.id}: the lease was lost; nothing more is sent")


class StopSignal:
    """Shared by the runners of one process: graceful stop, hard abort, account error."""

    def __init__(self):
        self.stop = threading.Event()       # stop claiming; waits on the limiter end at once
        self.abort = threading.Event()      # give everything back now
        self.account_error: str | None = None
        self.unrecorded: str | None = None  # answers the job database could not take
        self.interrupted = False
        self._lock = threading.Lock()

    def request(self, interrupted: bool = True) -> None:
        with self._lock:
            if self.stop.is_set() and interrupted:
                self.abort.set()
            self.interrupted = self.interrupted or interrupted
            self.stop.set()

    def account(self, message: str) -> None:
        with self._lock:
            if self.account_error is None:
                self.account_error = message
            self.stop.set()

    def not_recorded(self, message: str) -> None:
        with self._lock:
            if self.unrecorded is None:
                self.unrecorded = message
            self.stop.set()

    def install(self) -> None:
        """Route SIGINT/SIGTERM here (main thread only): first stops, second aborts."""
        def handler(signum, frame):
            first = not self.stop.is_set() or not self.interrupted
            self.request()
            print("\nstopping: finishing running jobs, press Ctrl-C again to abort" if first
                  else "\naborting: giving back every held job", file=sys.stderr)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


class Runner:
    def __init__(self, db: DatabaseManager, options: RunOptions, work, *, stop: StopSignal | None = None,
                 owner: str | None = None, progress=None, limiter=None, clock: Clock = SYSTEM):
        self.db = db
        # Every reading of the time and every timed wait (idle polls, commit retries, the heartbeat)
        # goes through the clock; waiting for a job to finish does not (it ends when the job does).
        self.clock = clock
        self.options = options
        self.work = work            # callable(Job) -> Outcome, raising ProviderError kinds
        self.stop = stop or StopSignal()
        self.owner = owner or make_owner()
        self.summary = RunSummary(options.stage, options.language)
        self._held: dict[int, Job] = {}
        self._held_lock = threading.Lock()
        self._progress = progress
        self._last_reclaim = 0.0
        self._done = threading.Event()
        self._count_lock = threading.Lock()
        self.limiter = limiter
        self._threads = options.threads or options.workers
        # Finished futures arrive here (a done-callback), so the main loop sleeps on one queue
        # instead of installing a waiter on every pending future each time one finishes.
        self._finished: queue.SimpleQueue = queue.SimpleQueue()

    # -- the main loop --------------------------------------------------------------------
    def run(self) -> RunSummary:
        started = self._started = self.clock.monotonic()
        self._reclaim(force=True)
        self._roll_forward()
        self._release_parked()
        heartbeat = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.options.label}",
                                     daemon=True)
        heartbeat.start()
        pool = ThreadPoolExecutor(self._threads, thread_name_prefix=f"worker-{self.options.label}")
        pending: dict = {}
        claimed = 0
        try:
            while True:
                if self.stop.abort.is_set():
                    break
                if not self.stop.stop.is_set():
                    claimed += self._fill(pool, pending, claimed)
                else:
                    self._cancel_queued(pending)
                if pending:
                    self._reap(pending)
                    continue
                if self.stop.stop.is_set() or not self._wait_for_more(claimed):
                    break
        finally:
            self._shutdown(pool, pending)
            self._done.set()
        self._finish(started)
        return self.summary

    def _reap(self, pending: dict) -> None:
        """Wait (at most one poll interval) for a job to finish; forget every finished one."""
        try:
            future = self._finished.get(timeout=IDLE_POLL_SECONDS)
        except queue.Empty:
            return
        while True:
            pending.pop(future, None)
            try:
                future = self._finished.get_nowait()
            except queue.Empty:
                return

    def _fill(self, pool, pending, claimed) -> int:
        """Claim batches until the pool has a batch queued beyond its running jobs."""
        total = 0
        limit = self.options.limit
        while len(pending) <= self._threads:
            room = self.options.batch_size if limit is None else min(self.options.batch_size, limit - claimed - total)
            if room <= 0:
                break
            try:
                jobs = self.db.claim(self.owner, self.options.stage, self.options.language, limit=room,
                                     lease_seconds=self.options.lease_seconds, file_ids=self.options.file_ids)
            except sqlite3.OperationalError as exc:
                log.warning("claim failed, will retry: %s", exc)
                break
            if not jobs:
                break
            with self._held_lock:
                self._held.update((job.id, job) for job in jobs)
            crash_point("after_claim")
            for job in jobs:
                future = pool.submit(self._run_job, job)
                pending[future] = job
                future.add_done_callback(self._finished.put)
            total += len(jobs)
        return total

    def _wait_for_more(self, claimed: int) -> bool:
        """Nothing is running: sleep until a backed-off job is due; False when all is done."""
        if self.options.limit is not None and claimed >= self.options.limit:
            return False
        self._reclaim()
        ahead = self._with_database(self._work_ahead, "looking for work")
        if ahead is None:  # the database stayed unavailable: the run stops (exit 2)
            return False
        count, earliest, following = ahead
        if count and earliest is not None and earliest >= PARKED:
            # A transcript was completed without releasing its translations (it should not
            # happen; completing one releases them): release them rather than wait for ever.
            self._release_parked()
            return True
        if following:
            # A transcription run is producing transcripts, or is about to: follow it instead of leaving
            # (PostgreSQL wakes this at once when one is completed; SQLite waits out the interval).
            if self.db.wait_for_transcripts(IDLE_POLL_SECONDS * 2, interrupt=self.stop.stop):
                log.debug("a completed transcript woke this run")
            return True
        if not count:
            return False
        delay = min(max(0.0, (earliest or 0) - self.clock.time()), IDLE_POLL_SECONDS * 4)
        self.clock.wait(self.stop.stop, delay)
        return True

    def _work_ahead(self) -> tuple[int, float | None, bool]:
        """(not_started jobs, the earliest one's run_after, whether this translation run follows
        transcripts still to come while it has nothing to claim)."""
        count, earliest = self.db.pending(self.options.stage, self.options.language,
                                          file_ids=self.options.file_ids)
        following = not count and self.options.stage == TRANSLATION and (
            self._transcripts_coming() or bool(self.options.follow and self.options.follow()))
        return count, earliest, following

    def _with_database(self, action, what: str, *, retry_on=sqlite3.OperationalError):
        """``action()``, retried while the job database cannot be used (``retry_on``: by default
        what the stores classify as "retry later": a lock, a busy file, a PostgreSQL server that
        is down or unreachable; see ``_patiently``). Past the patience, or once the run was
        stopped for this already, the run stops with exit 2 (``StopSignal.not_recorded``) and
        this returns None; on an abort it returns None at once."""
        try:
            return self._patiently(action, what, retry_on, give_up=lambda: bool(self.stop.unrecorded))
        except retry_on as exc:
            if not self.stop.abort.is_set():
                self.stop.not_recorded(f"the job database was unavailable for {self.options.commit_patience:.0f} s"
                                       f" while {what} ({exc})")
                log.error("%s: the job database stayed unavailable: %s", what, exc)
            return None

    def _patiently(self, action, what: str, retry_on, *, give_up=lambda: False):
        """``action()``, retried with jittered backoff on ``retry_on`` for ``commit_patience``
        seconds; the last error is raised once that is spent, the run aborts, or ``give_up()``."""
        deadline = self.clock.monotonic() + self.options.commit_patience
        tries = 0
        while True:
            try:
                return action()
            except retry_on as exc:
                tries += 1
                left = deadline - self.clock.monotonic()
                if left <= 0 or self.stop.abort.is_set() or give_up():
                    raise
                delay = min(left, errors.retry_delay(tries, None, base=0.2, cap=COMMIT_RETRY_CAP_SECONDS))
                log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
                self.clock.wait(self.stop.abort, delay)

    def _transcripts_coming(self) -> bool:
        """Transcripts this translation run waits for are being made (a transcription job runs), or
        will be: a transcription run is live, or may be starting beside this one (the grace)."""
        language, ids = self.options.language, self.options.file_ids
        if self.db.awaiting_transcripts(language, file_ids=ids):
            return True
        if not self.db.untranscribed_translations(language, file_ids=ids):
            return False
        return (self.db.live_runs(TRANSCRIPTION) > 0
                or self.clock.monotonic() - self._started < TRANSCRIPTION_GRACE_SECONDS)

    def _release_parked(self) -> None:
        if self.options.stage != TRANSLATION:
            return
        try:
            released = self.db.release_parked(self.options.language)
        except sqlite3.OperationalError as exc:
            log.warning("releasing waiting translations failed, will retry: %s", exc)
            return
        if released:
            log.info("%d %s translation(s) whose transcript is done were still parked", released,
                     self.options.language)

    def _roll_forward(self) -> None:
        if self.options.output_root is None:
            return
        try:
            publish.roll_forward(self.db, self.options.output_root)
        except (OSError, sqlite3.Error) as exc:
            log.warning("could not settle the staged outputs of earlier runs: %s", exc)

    def _reclaim(self, force: bool = False) -> None:
        now = self.clock.monotonic()
        if not force and now - self._last_reclaim < RECLAIM_EVERY_SECONDS:
            return
        self._last_reclaim = now
        try:
            lost = self.db.reclaim()
        except sqlite3.OperationalError as exc:
            log.warning("reclaim failed, will retry: %s", exc)
            return
        if lost:
            log.info("took over %d job(s) of dead or expired runs", len(lost))

    # -- one job --------------------------------------------------------------------------
    def _run_job(self, job: Job) -> None:
        try:
            if self.stop.stop.is_set():
                raise Stopping("run is stopping")
            outcome = self.work(job)
            if job.cancel.is_set():
                raise LeaseLostError(f"job {job.id}: the lease was lost while it ran")
        except LeaseLostError as exc:
            self._lost(job, exc)
        except Stopping:
            self._release(job, "run stopped before this job finished")
        except (errors.AccountError, errors.MachineError) as exc:  # not the file's fault: stop, give back
            self.stop.account(str(exc))
            self._release(job, f"run stopped: {exc}")
        except errors.RateLimitError as exc:
            self._record_failure(job, exc, retryable=True, spend_attempt=False)
        except errors.RetryableError as exc:
            self._record_failure(job, exc, retryable=True)
        except errors.PermanentError as exc:
            self._record_failure(job, exc, retryable=False)
        except sqlite3.OperationalError as exc:  # the job database (locked, its server away), not the file
            # Retried as any transient error, an attempt spent: a database error that is not
            # transient after all cannot requeue the job for ever.
            wrapped = errors.RetryableError(f"job database unavailable: {exc}", error_class="database_unavailable")
            self._record_failure(job, wrapped, retryable=True)
        except OSError as exc:  # our own disk: ENOSPC, EIO on fsync ... the file is not at fault
            wrapped = errors.RetryableError(f"writing outputs failed: {type(exc).__name__}: {exc}",
                                            error_class="disk")
            self._record_failure(job, wrapped, retryable=True)
        except Exception as exc:  # a bug: logged in full, retried a bounded number of times
            log.exception("unexpected error on job %s", job.id)
            wrapped = errors.RetryableError(f"internal error: {type(exc).__name__}: {exc}",
                                            error_class="internal_error")
            self._record_failure(job, wrapped, retryable=True)
        else:
            crash_point("before_commit")
            self._record_success(job, outcome)
        finally:
            with self._held_lock:
                self._held.pop(job.id, None)

    def _record_success(self, job: Job, outcome: Outcome) -> None:
        try:
            self._commit(job, outcome)
        except LeaseLostError as exc:
            self._lost(job, exc)
            return
        except sqlite3.Error as exc:
            where = f" under {os.path.join(self.options.output_root, outputs.STATE_DIR)}" if self.options.output_root else ""
            self.stop.not_recorded(
                f"the job database did not take a completion for {self.options.commit_patience:.0f} s ({exc});"
                f" the paid answers are kept in the spool{where} and the next run uses them without paying again")
            log.error("could not record completion of job %s: %s", job.id, exc)
            return
        crash_point("after_commit")
        self._publish(job, outcome)
        self._count("completed")
        self._tick(1)

    def _commit(self, job: Job, outcome: Outcome) -> None:
        """Record the completion; a database error (a lock another program holds, a full disk) is
        retried with backoff for ``commit_patience`` seconds, never dropped."""
        self._patiently(lambda: self.db.complete(job, outcome), f"recording job {job.id} (the answer is kept)",
                        sqlite3.Error)

    def _publish(self, job: Job, outcome: Outcome) -> None:
        """Move the winner's staged files to their final names; drop the job's spooled answers."""
        try:
            if outcome.staged:
                outputs.publish(outcome.staged, outcome.outputs, self.options.output_root)
            self._clear_spool(job)
        except OSError as exc:  # committed: the next run, status or check tool finishes the move
            log.error("job %s is recorded but publishing its outputs failed (it will be finished later): %s",
                      job.id, exc)

    def _lost(self, job: Job, exc: Exception) -> None:
        """This attempt lost its lease: its files go, nothing is recorded, the spool stays for the winner."""
        self._discard(job)
        self._count("lease_lost")
        log.warning("%s; this attempt was cancelled", exc)

    def _discard(self, job: Job) -> None:
        if self.options.output_root is not None:
            outputs.discard(outputs.staging_folder(self.options.output_root, job.id, job.claim))

    def _clear_spool(self, job: Job) -> None:
        if self.options.output_root is not None:
            spool = Spool(self.options.output_root)
            spool.clear(spool.folder(job.file_id, job.stage, job.language))

    def _record_failure(self, job: Job, exc: errors.ProviderError, *, retryable: bool,
                        spend_attempt: bool = True) -> None:
        delay = errors.retry_delay(job.attempts, exc.retry_after, base=self.options.retry_base_seconds,
                                    cap=self.options.retry_cap_seconds)
        self._discard(job)
        try:
            # Waited for like a completion: a failure left unrecorded would hold the job in progress
            # until its lease expired, while the run ended as if all were done.
            status = self._with_database(
                lambda: self.db.fail(job, exc.error_class, str(exc), retryable=retryable, delay=delay,
                                     spend_attempt=spend_attempt), f"recording the failure of job {job.id}")
        except LeaseLostError as lost:
            self._count("lease_lost")
            log.warning("%s", lost)
            return
        except sqlite3.Error as db_exc:
            log.error("could not record failure of job %s: %s", job.id, db_exc)
            return
        if status is None:  # the database stayed unavailable: the run stops (exit 2)
            return
        with self._count_lock:
            self.summary.errors[exc.error_class] += 1
        if status == FAILED:
            self._clear_spool(job)
            self._count("failed")
            log.warning("job %s (%s) failed: %s", job.id, job.file_id, exc)
            self._tick(1)
        elif spend_attempt:
            self._count("retried")
            log.info("job %s (%s) will be retried in %.1f s: %s", job.id, job.file_id, delay, exc)
        else:
            self._count("requeued")
        self._postfix()

    def _release(self, job: Job, reason: str) -> None:
        self._discard(job)
        try:
            self._count("released", self.db.release([job], reason))
        except sqlite3.Error as exc:
            log.error("could not release job %s (its lease will expire): %s", job.id, exc)

    # -- leases and shutdown ---------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        interval = max(0.1, self.options.lease_seconds / 3)
        while not self.clock.wait(self._done, interval):
            with self._held_lock:
                ids = list(self._held)
            if not ids:
                continue
            try:
                kept = self.db.heartbeat(self.owner, ids, self.options.lease_seconds)
            except sqlite3.Error as exc:
                log.warning("heartbeat failed, will retry: %s", exc)
                continue
            lost = set(ids) - kept
            with self._held_lock:
                lost_jobs = [self._held[i] for i in lost if i in self._held]  # finished ones are not lost
            for job in lost_jobs:
                job.cancel.set()
            if lost_jobs:
                log.warning("lost the lease of %d job(s); their attempts are cancelled", len(lost_jobs))

    def _cancel_queued(self, pending: dict) -> None:
        cancelled = [pending[f] for f in list(pending) if f.cancel()]
        for future in [f for f in pending if f.cancelled()]:
            pending.pop(future)
        if cancelled:
            with self._held_lock:
                for job in cancelled:
                    self._held.pop(job.id, None)
            self._give_back(cancelled, "run stopped before this job started")

    def _give_back(self, jobs: list, reason: str) -> None:
        """Release ``jobs`` this run will not do. Once: a stopping run does not wait out a database
        outage for this, since nothing is lost without it (the jobs are this run's, so the next
        run on this machine reclaims them at once, and any other once their lease expires)."""
        try:
            self._count("released", self.db.release(jobs, reason))
        except sqlite3.OperationalError as exc:
            log.warning("could not give back %d job(s) (%s): the job database is unavailable (%s); "
                        "they return to the queue when their lease expires", len(jobs), reason, exc)

    def _shutdown(self, pool: ThreadPoolExecutor, pending: dict) -> None:
        self._cancel_queued(pending)
        if self.stop.abort.is_set():
            with self._held_lock:
                running = list(self._held.values())
                self._held.clear()
            if running:
                self._give_back(running, "run aborted")
            pool.shutdown(wait=False, cancel_futures=True)
            return
        pool.shutdown(wait=True)

    def _finish(self, started: float) -> None:
        self._roll_forward()  # a late attempt of this run may have spooled an answer its winner no longer needs
        counts = self._with_database(self._final_counts, "counting what is left")
        if counts is not None:  # else the run says that the database was unavailable (exit 2)
            self.summary.failed_total, self.summary.remaining, self.summary.waiting_for_transcripts = counts
        self.summary.account_error = self.stop.account_error
        self.summary.interrupted = self.stop.interrupted
        self.summary.seconds = round(self.clock.monotonic() - started, 3)

    def _final_counts(self) -> tuple[int, int, int]:
        """(failed jobs, not_started jobs, translations waiting for transcripts) of this run's kind."""
        counts = self.db.counts(file_ids=self.options.file_ids).get((self.options.stage, self.options.language), {})
        waiting = 0
        if self.options.stage == TRANSLATION:
            waiting = self.db.untranscribed_translations(self.options.language, file_ids=self.options.file_ids)
        return counts.get(FAILED, 0), counts.get("not_started", 0), waiting

    # -- progress -------------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            setattr(self.summary, name, getattr(self.summary, name) + n)

    def _tick(self, n: int) -> None:
        if self._progress is not None:
            self._progress.update(n)
            self._postfix()

    def _postfix(self) -> None:
        if self._progress is not None:
            s = self.summary
            waits = self.limiter.stats.waits if self.limiter else 0
            self._progress.set_postfix_str(
                f"failed {s.failed} · retries {s.retried} · rate-limit waits {waits + s.requeued}", refresh=False)


def exit_code(summaries: list[RunSummary], stop: StopSignal) -> int:
    if stop.account_error or stop.unrecorded:
        return EXIT_USAGE
    if stop.interrupted:
        return EXIT_INTERRUPTED
    if any(s.failed_total for s in summaries):
        return EXIT_FAILED
    if any(s.waiting_for_transcripts for s in summaries):
        return EXIT_WORK_LEFT
    return EXIT_OK


# -- what both parallel scripts share around the runner -----------------------------------------

def add_run_arguments(parser, *, workers: int, batch_size: int) -> None:
    parser.add_argument("--workers", type=_positive, default=workers, metavar="N",
                        help=f"parallel API calls (default {workers})")
    parser.add_argument("--batch-size", type=_positive, default=batch_size, metavar="N",
                        help=f"jobs claimed per batch (default {batch_size})")
    parser.add_argument("--limit", type=_positive, metavar="N", help="process at most N jobs")
    parser.add_argument("--provider", help="provider to use (default: from .env, else the first configured)")
    parser.add_argument("--model", help="provider model (default: the provider's default)")
    parser.add_argument("--retry-failed", action="store_true", help="also retry jobs that failed before")
    parser.add_argument("--dry-run", action="store_true", help="show what would run and its cost; no API call")
    parser.add_argument("--adopt-output-dir", action="store_true",
                        help="take over an output folder another job database wrote (it is refused otherwise)")
    parser.add_argument("--lease-seconds", type=float, default=DEFAULT_LEASE_SECONDS, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")


def thread_count(workers: int) -> int:
    """Worker threads for ``workers`` parallel API calls: a quarter more, so that writing one
    answer's outputs and preparing the next file do not hold a request slot idle when many
    answers arrive at once. A kill loses the answers not yet committed: at most this many."""
    return workers + workers // 4


def connections_needed(runner_threads: list[int]) -> int:
    """Job-store connections one process may use at once, for runners with these worker thread
    counts: each worker thread, each runner's loop and its heartbeat, and one for the process
    (its main thread, the live-run registration). The PostgreSQL pool is opened this size, so a
    thread never waits for a connection another thread holds (``--workers 32``: 43)."""
    return sum(threads + 2 for threads in runner_threads) + 1


_positive = positive_argument  # the scripts' --workers, --batch-size, --limit


@dataclass
class Plan:
    """One runner to start: its options, its work function and its provider's limiter."""

    options: RunOptions
    work: object
    limiter: object = None


def run_plans(db: DatabaseManager, plans: list[Plan], stop: StopSignal) -> list[RunSummary]:
    """Run every plan at once (one thread each, one progress bar each); return their summaries."""
    from tqdm import tqdm

    owner = make_owner()
    runners, bars = [], []
    for position, plan in enumerate(plans):
        total, _ = db.pending(plan.options.stage, plan.options.language, file_ids=plan.options.file_ids)
        if plan.options.limit is not None:
            total = min(total, plan.options.limit)
        bar = tqdm(total=total, desc=plan.options.label, unit="job", file=sys.stderr, position=position,
                   disable=plan.options.quiet, dynamic_ncols=True, leave=True)
        bars.append(bar)
        runners.append(Runner(db, plan.options, plan.work, stop=stop, owner=owner, progress=bar,
                              limiter=plan.limiter))
    try:
        if len(runners) == 1:
            return [runners[0].run()]
        threads = [threading.Thread(target=r.run, name=f"runner-{r.options.label}") for r in runners]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():  # join with a timeout so Ctrl-C reaches the main thread
                thread.join(0.5)
        return [r.summary for r in runners]
    finally:
        for bar in bars:
            bar.close()


def report(summaries: list[RunSummary], stop: StopSignal, *, as_json: bool) -> int:
    """Print the end-of-run summary (JSON on stdout, or lines on stderr); return the exit code."""
    code = exit_code(summaries, stop)
    if as_json:
        print(errors.redact(json.dumps({"exit_code": code, "account_error": stop.account_error,
                                        "unrecorded": stop.unrecorded, "interrupted": stop.interrupted,
                                        "runs": [s.as_dict() for s in summaries]}, ensure_ascii=True)))
    else:
        for s in summaries:
            what = s.stage + (f" {s.language}" if s.language else "")
            print(f"{what}: completed {s.completed} · failed {s.failed} · retried {s.retried} · released "
                  f"{s.released} · still failed {s.failed_total} · left {s.remaining} · {s.seconds:.1f} s",
                  file=sys.stderr)
    for s in summaries:
        if s.waiting_for_transcripts:
            print(f"{s.stage} {s.language}: {s.waiting_for_transcripts} job(s) wait for transcripts that are not"
                  " done (exit 3): run parallel_transcription.py, then this again", file=sys.stderr)
    if stop.account_error:
        print(f"error: {stop.account_error}. The run stopped; no job was marked failed. Fix the account,"
              " key or disk and run again.", file=sys.stderr)
    if stop.unrecorded:
        print(f"error: {stop.unrecorded}. The run stopped; fix the database and run again.", file=sys.stderr)
    if stop.abort.is_set():
        # Worker threads may still sit in an HTTP call: their jobs were given back, so leave now
        # rather than wait for them (the interpreter would join them at exit).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
