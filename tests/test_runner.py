"""The shared runner and limiter, driven by in-process work functions (no HTTP here)."""

import hashlib
import threading
import time
from collections import Counter

import pytest

import db_manager as dbm
from db_manager import COMPLETED, FAILED, NOT_STARTED, TRANSCRIPTION, MediaRecord, Outcome
from pipeline import errors
from pipeline import limiter as limiter_module
from pipeline.limiter import ProviderLimiter
from pipeline.runner import RunOptions, Runner, StopSignal, exit_code
from tests.fakeclock import FakeClock


def register(db, n):
    db.register_files([MediaRecord(f"/a/{i}.wav", hashlib.sha256(str(i).encode()).hexdigest(), 1, 1, "audio")
                       for i in range(n)], [])


def options(**kw):
    base = dict(stage=TRANSCRIPTION, workers=4, batch_size=3, quiet=True)
    base.update(kw)
    return RunOptions(**base)


def test_every_job_is_done_once_and_workers_stay_busy(db):
    register(db, 40)
    seen, lock = Counter(), threading.Lock()
    running, peak, all_busy = [0], [0], threading.Event()

    def work(job):
        with lock:
            seen[job.id] += 1
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            if running[0] == 8:
                all_busy.set()
        all_busy.wait(10)  # the first jobs hold their workers until all eight run at once
        with lock:
            running[0] -= 1
        return Outcome({})

    summary = Runner(db, options(workers=8, batch_size=2), work).run()
    assert summary.completed == 40 and set(seen.values()) == {1}
    assert peak[0] == 8  # batches of 2 never left workers idle
    assert db.counts()[(TRANSCRIPTION, "")][COMPLETED] == 40


def test_errors_are_acted_on_by_kind(db):
    register(db, 6)
    calls = Counter()

    def work(job):
        calls[job.id] += 1
        kind = job.id % 3
        if kind == 0:
            raise errors.PermanentError("not audio", error_class="unsupported_media")
        if kind == 1 and calls[job.id] < 3:
            raise errors.RetryableError("HTTP 503", status=503)
        return Outcome({})

    summary = Runner(db, options(), work).run()
    assert summary.completed == 4 and summary.failed == 2 and summary.retried == 4
    failed = db.jobs(status=FAILED)
    assert {r["error_class"] for r in failed} == {"unsupported_media"}
    assert all(calls[r["id"]] == 1 for r in failed)  # permanent: never retried
    assert exit_code([summary], StopSignal()) == 1


def test_disk_errors_are_retryable(db):
    register(db, 1)
    attempts = []

    def work(job):
        attempts.append(job.attempts)
        if len(attempts) == 1:
            raise OSError(28, "No space left on device")
        return Outcome({})

    summary = Runner(db, options(), work).run()
    assert summary.completed == 1 and attempts == [1, 2]
    assert "disk" in [e["error_class"] for e in db.events(1)]


def test_account_error_stops_the_run_and_releases_everything(db):
    register(db, 30)
    started, lock = [], threading.Lock()
    stop = StopSignal()

    def work(job):
        with lock:
            started.append(job.id)
            n = len(started)
        if n == 3:
            raise errors.AccountError("the API key was rejected", status=401, error_class="auth")
        if n > 3:
            stop.stop.wait(10)  # started beside the failing one: still running when the run stops
        return Outcome({})

    summary = Runner(db, options(workers=2, batch_size=5), work, stop=stop).run()
    counts = db.counts()[(TRANSCRIPTION, "")]
    assert counts[FAILED] == 0 and counts["in_progress"] == 0
    assert counts[COMPLETED] == summary.completed <= 3
    assert counts[NOT_STARTED] == 30 - summary.completed
    assert all(r["attempts"] == 0 for r in db.jobs(status=NOT_STARTED))  # nobody's attempt spent
    assert exit_code([summary], stop) == 2 and "rejected" in stop.account_error


def test_graceful_stop_releases_queued_jobs(db):
    register(db, 20)
    stop = StopSignal()
    both_running, requested = threading.Barrier(2), threading.Event()

    def work(job):
        if both_running.wait(timeout=5) == 0:
            stop.request()  # one Ctrl-C arrives while the first two jobs run (a second would abort)
            requested.set()
        requested.wait(5)
        return Outcome({})

    summary = Runner(db, options(workers=2, batch_size=10), work, stop=stop).run()
    counts = db.counts()[(TRANSCRIPTION, "")]
    assert counts["in_progress"] == 0
    assert counts[COMPLETED] == summary.completed == 2  # the running ones finished
    assert counts[NOT_STARTED] == 18 and exit_code([summary], stop) == 130


def test_a_late_result_after_the_lease_moved_on_is_discarded(db):
    register(db, 1)
    working, taken_over = threading.Event(), threading.Event()

    def slow(job):
        working.set()
        assert taken_over.wait(10)  # paused past its lease while another run finishes the job
        return Outcome({"txt": {"path": "/late", "sha256": "0" * 64, "size": 1}})

    # The runner's clock never moves: its heartbeat never beats, so the lease really expires.
    runner = Runner(db, options(lease_seconds=10, limit=1), slow, owner=dbm.make_owner(host="paused-laptop"),
                    clock=FakeClock())
    thread = threading.Thread(target=runner.run)
    thread.start()
    assert working.wait(10)
    assert db.reclaim(now=time.time() + 11)  # another run takes the job over ...
    (job,) = db.claim(dbm.make_owner("other"), TRANSCRIPTION)
    db.complete(job, Outcome({"txt": {"path": "/winner", "sha256": "1" * 64, "size": 1}}))
    taken_over.set()
    thread.join(10)
    assert runner.summary.lease_lost == 1 and runner.summary.completed == 0
    rows = db.jobs(stage=TRANSCRIPTION)
    assert len(rows) == 1 and rows[0]["status"] == COMPLETED and "/winner" in rows[0]["outputs"]


def test_heartbeat_keeps_long_jobs_alive(db, monkeypatch):
    """A job that runs for several leases: the heartbeat renews its lease every third of one."""
    register(db, 1)
    clock, beat, renewed = FakeClock(), threading.Event(), []
    heartbeat = db.heartbeat

    def recorded(owner, ids, lease_seconds):
        kept = heartbeat(owner, ids, lease_seconds)
        renewed.append((set(kept), db.jobs(stage=TRANSCRIPTION)[0]["lease_expires_at"]))
        beat.set()
        return kept

    monkeypatch.setattr(db, "heartbeat", recorded)

    def slow(job):  # three leases long on the runner's clock
        for _ in range(9):
            beat.clear()
            while not beat.wait(0.01):
                clock.advance(0.1)
        return Outcome({})

    summary = Runner(db, options(lease_seconds=0.3), slow, clock=clock).run()
    assert summary.completed == 1 and summary.lease_lost == 0
    assert len(renewed) >= 9 and all(kept == {1} for kept, _ in renewed[:9])
    expiries = [expires for _, expires in renewed[:9]]
    assert expiries == sorted(expiries) and expiries[0] < expiries[-1]
    assert set(clock.waits) == {0.1}  # a beat every third of the lease


def call_from_threads(limiter: ProviderLimiter, request, *, threads: int, each: int) -> None:
    """``threads`` workers, each making ``each`` requests through the shared limiter."""
    workers = [threading.Thread(target=lambda: [limiter.call(request) for _ in range(each)]) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def test_limiter_settles_at_a_concurrency_cap():
    cap, lock = 5, threading.Lock()
    state = {"now": 0, "peak_after_429": 0, "seen_429": False, "calls": 0}

    def request():
        with lock:
            state["calls"] += 1
            state["now"] += 1
            if state["now"] > cap:
                state["now"] -= 1
                state["seen_429"] = True
                raise errors.RateLimitError("too_many_concurrent_requests", retry_after=0.05, concurrency=True)
            if state["seen_429"]:
                state["peak_after_429"] = max(state["peak_after_429"], state["now"])
        time.sleep(0.02)
        with lock:
            state["now"] -= 1
        return True

    limiter = ProviderLimiter("fake")
    call_from_threads(limiter, request, threads=32, each=5)
    assert state["seen_429"] and state["peak_after_429"] <= cap
    assert limiter.limit <= cap


def test_limiter_gives_a_provider_time_to_free_a_slot_and_keeps_the_cap():
    """A provider frees a concurrency slot a moment after it answers (its handler finishes after
    the answer is written). Once the cap is learned, a freed slot must not be handed on so fast
    that the next request meets a full provider; and a refusal raced that way must not lower the
    learned cap below what the provider takes."""
    cap, duration, lock = 4, 0.2, threading.Lock()
    lag = duration * limiter_module.SLOT_GRACE_SHARE / 2  # within the grace the limiter allows
    state = {"busy": 0, "successes": 0, "late_refusals": 0, "peak_late": 0}

    def free():
        with lock:
            state["busy"] -= 1

    def request():
        with lock:
            if state["busy"] >= cap:
                state["late_refusals"] += bool(state["successes"])
                raise errors.RateLimitError("too_many_concurrent_requests", concurrency=True)
            state["busy"] += 1
            if state["successes"]:
                state["peak_late"] = max(state["peak_late"], state["busy"])
        time.sleep(duration)
        threading.Timer(lag, free).start()
        with lock:
            state["successes"] += 1
        return True

    limiter = ProviderLimiter("fake")
    call_from_threads(limiter, request, threads=16, each=2)
    assert state["successes"] == 16 * 2
    assert state["late_refusals"] == 0  # every refusal came in the first wave, before any answer
    assert limiter.ceiling == cap and state["peak_late"] == cap


def test_limiter_waits_out_a_storm_without_multiplying_requests():
    clock = FakeClock(autojump=True)
    storm_until = clock.monotonic() + 1.0
    calls, lock = Counter(), threading.Lock()

    def request():
        with lock:
            if clock.monotonic() < storm_until:
                calls["429"] += 1
                raise errors.RateLimitError("rate limited", retry_after=0.1)
            calls["ok"] += 1
        return True

    limiter = ProviderLimiter("fake", clock=clock)
    workers, per_worker = 16, 5
    call_from_threads(limiter, request, threads=workers, each=per_worker)
    assert calls["ok"] == workers * per_worker
    # one probe per cool-down, plus the first wave: nowhere near workers x retries
    assert calls["429"] <= workers + 1.0 / 0.1 + 2


def test_limiter_requeues_when_asked_to_wait_long():
    limiter = ProviderLimiter("fake", patience=7200)  # a wait beyond the patience stops the run instead

    def request():
        raise errors.RateLimitError("come back in an hour", retry_after=3600)

    with pytest.raises(errors.RateLimitError):
        limiter.call(request)
    with pytest.raises(errors.RateLimitError):  # others do not even try during the cool-down
        limiter.call(lambda: True)


def test_limiter_stops_the_run_when_asked_to_wait_beyond_its_patience():
    limiter = ProviderLimiter("fake", patience=900)

    def request():
        raise errors.RateLimitError("come back in an hour", retry_after=3600)

    with pytest.raises(errors.AccountError, match="patience"):
        limiter.call(request)


def test_limiter_rpm_spaces_requests():
    clock = FakeClock(autojump=True)
    limiter = ProviderLimiter("fake", rpm=600, clock=clock)  # 10 per second, burst of 10
    starts = []
    for _ in range(15):
        limiter.call(lambda: starts.append(clock.monotonic()))
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[:9] == [0.0] * 9  # the burst goes at once ...
    assert gaps[9:] == pytest.approx([0.1] * 5, abs=0.011)  # ... then one start every 0.1 s


def test_retry_policy_functions():
    assert errors.retry_delay(3, retry_after=7) == 7
    assert all(0 <= errors.retry_delay(n, base=1, cap=10) <= min(10, 2 ** (n - 1)) for n in range(1, 10))
    assert errors.parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert errors.parse_retry_after({"Retry-After": "3"}) == 3.0
    kinds = {429: errors.RateLimitError, 500: errors.RetryableError, 503: errors.RetryableError,
             408: errors.RetryableError, 401: errors.AccountError, 456: errors.AccountError,
             400: errors.PermanentError, 413: errors.PermanentError}
    for status, kind in kinds.items():
        assert type(errors.classify_http(status, "x")) is kind
    quota = errors.classify_http(429, {"error": {"code": "insufficient_quota"}})
    assert isinstance(quota, errors.AccountError)


def test_spare_threads_write_outputs_while_the_request_slots_stay_full(db):
    """--workers caps parallel requests; the run's extra threads do the work around them."""
    from pipeline.limiter import RunRequests
    from pipeline.runner import thread_count

    register(db, 30)
    stop = StopSignal()
    call = RunRequests(ProviderLimiter("test"), 4, stop.stop)
    lock = threading.Lock()
    state = {"requests": 0, "posts": 0, "peak_requests": 0, "peak_busy": 0}

    def bump(key, n):
        with lock:
            state[key] += n
            state["peak_requests"] = max(state["peak_requests"], state["requests"])
            state["peak_busy"] = max(state["peak_busy"], state["requests"] + state["posts"])

    def request():
        bump("requests", 1)
        time.sleep(0.02)
        bump("requests", -1)

    def work(job):
        call(request)
        bump("posts", 1)  # writing the outputs: no request slot held
        time.sleep(0.02)
        bump("posts", -1)
        return Outcome({})

    summary = Runner(db, options(workers=4, threads=thread_count(4), batch_size=4), work, stop=stop).run()
    assert summary.completed == 30
    assert state["peak_requests"] == 4       # never more requests than --workers ...
    assert state["peak_busy"] > 4            # ... while another thread finished an earlier job


def test_waiting_for_a_request_slot_ends_when_the_run_stops():
    from pipeline.limiter import RunRequests, Stopping

    stop = threading.Event()
    call = RunRequests(ProviderLimiter("test"), 1, stop)
    inside, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=call, args=(lambda: (inside.set(), release.wait(5)),))
    holder.start()
    inside.wait(5)
    outcome = []

    def second():
        try:
            call(lambda: outcome.append("ran"))
        except Stopping:
            outcome.append("stopped")

    waiter = threading.Thread(target=second)
    waiter.start()
    stop.set()
    waiter.join(5)
    release.set()
    holder.join(5)
    assert outcome == ["stopped"]


def test_a_translation_left_parked_behind_a_done_transcript_still_runs(db, monkeypatch):
    """Completing a transcript releases its translations; if one was missed, the run releases it
    instead of waiting for ever."""
    from db_manager import PARKED, TRANSLATION

    db.register_files([MediaRecord("/a/x.wav", hashlib.sha256(b"x").hexdigest(), 1, 1, "audio")], ["en"])
    job = db.claim(dbm.make_owner(), TRANSCRIPTION)[0]
    db.complete(job, Outcome({}))
    with db.transaction() as conn:
        conn.execute("UPDATE jobs SET run_after = ? WHERE stage = 'translation'", (PARKED,))
    stop = StopSignal()
    runner = Runner(db, RunOptions(TRANSLATION, "en", workers=1, quiet=True), lambda job: Outcome({}), stop=stop)
    real, calls = db.release_parked, []

    def release_but_not_at_start(*args, **kwargs):  # so the idle loop has to notice it too
        calls.append(1)
        return real(*args, **kwargs) if len(calls) > 1 else 0

    monkeypatch.setattr(db, "release_parked", release_but_not_at_start)
    timer = threading.Timer(10, stop.request)  # a spinning run would be stopped here, and fail below
    timer.start()
    summary = runner.run()
    timer.cancel()
    assert summary.completed == 1 and not summary.interrupted and len(calls) == 2
