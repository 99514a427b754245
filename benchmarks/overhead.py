#!/usr/bin/env python3
"""Orchestration overhead: jobs per second through verbatim's runner when the provider costs nothing.

An in-process provider answers at once, so all that is left is what verbatim does per job: claim
(in batches, ``BEGIN IMMEDIATE`` + ``UPDATE ... RETURNING``), hand the job to a worker thread,
write one output file atomically (temporary name, fsync, rename, fsync of the folder), and record
the completion fenced by owner and claim number, in SQLite with WAL and ``synchronous=FULL``.
20,000 jobs on 32 threads by default; target >= 1,000 jobs per second on 2 cores.

For scale it also measures this machine's raw limits: SQLite commits per second with FULL, and
atomic file writes per second (both on the same disk, one thread and 32 threads).

Example:
    .venv/bin/python benchmarks/overhead.py
    .venv/bin/python benchmarks/overhead.py --jobs 2000 --threads 8 --profile   # with pyinstrument, if installed
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import log, table, write_results

COLUMNS = [("what", "what", ""), ("count", "count", ",d"), ("threads", "threads", "d"), ("seconds", "seconds", ".2f"),
           ("per_second", "per second", ",.0f"), ("target", "target", "")]


def register(db, jobs: int) -> None:
    from db_manager import MediaRecord
    db.register_files([MediaRecord(f"/archive/{n:06d}.wav", hashlib.sha256(str(n).encode()).hexdigest(), 1, 1, "audio")
                       for n in range(jobs)], [])


def run_pipeline(work: Path, jobs: int, threads: int, batch_size: int) -> dict:
    import db_manager as dbm
    from pipeline.outputs import as_recorded, atomic_write, safe_join
    from pipeline.runner import Runner, RunOptions

    db = dbm.DatabaseManager(str(work / "jobs.db"))
    register(db, jobs)
    out = work / "out"

    def work_fn(job):  # the provider answered at once; write its answer like a real job does
        written = atomic_write(safe_join(out, job.folder, "transcript.txt"), f"{job.file_id}\n", root=out)
        return dbm.Outcome(as_recorded({"txt": written}), provider="instant")

    started = time.perf_counter()
    summary = Runner(db, RunOptions(dbm.TRANSCRIPTION, workers=threads, batch_size=batch_size, quiet=True),
                     work_fn).run()
    seconds = time.perf_counter() - started
    counts = db.counts()[(dbm.TRANSCRIPTION, "")]
    synchronous = db.query("PRAGMA synchronous")[0][0]
    db.close_all()
    if counts["completed"] != jobs:
        raise RuntimeError(f"only {counts['completed']} of {jobs} jobs completed: {counts}")
    return {"what": "claim → work → atomic write → fenced completion", "count": summary.completed,
            "threads": threads, "batch_size": batch_size, "seconds": round(seconds, 3),
            "per_second": round(summary.completed / seconds, 1), "synchronous": synchronous, "target": ">= 1,000"}


def raw_commits(work: Path, count: int) -> dict:
    conn = sqlite3.connect(str(work / "raw.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t (n INTEGER)")
    started = time.perf_counter()
    for n in range(count):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?)", (n,))
        conn.execute("COMMIT")
    seconds = time.perf_counter() - started
    conn.close()
    return {"what": "raw SQLite commits (WAL, FULL)", "count": count, "threads": 1, "seconds": round(seconds, 3),
            "per_second": round(count / seconds, 1), "target": ""}


def raw_writes(work: Path, count: int, threads: int) -> dict:
    from pipeline.outputs import atomic_write

    root = work / f"raw-writes-{threads}"
    per_thread = count // threads

    def writer(index: int) -> None:
        for n in range(per_thread):
            atomic_write(root / f"{index:03d}-{n:05d}" / "transcript.txt", "x\n", root=root)

    started = time.perf_counter()
    pool = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    seconds = time.perf_counter() - started
    return {"what": "raw atomic file writes", "count": per_thread * threads, "threads": threads,
            "seconds": round(seconds, 3), "per_second": round(per_thread * threads / seconds, 1), "target": ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=20, help="jobs claimed per batch (the scripts' default: 20)")
    parser.add_argument("--raw", type=int, default=3000, help="operations for the raw measurements (0: skip)")
    parser.add_argument("--profile", action="store_true", help="profile the pipeline run with pyinstrument")
    parser.add_argument("--out", help="JSON result path (default: benchmarks/results/overhead-<time>.json)")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="verbatim-overhead-", dir=os.environ.get("VERBATIM_BENCH_TMP")) as tmp:
        work = Path(tmp)
        log(f"{args.jobs:,} jobs on {args.threads} threads ...")
        if args.profile:
            from pyinstrument import Profiler
            profiler = Profiler()
            profiler.start()
        rows.append(run_pipeline(work, args.jobs, args.threads, args.batch_size))
        if args.profile:
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False), file=sys.stderr)
        if args.raw:
            rows.append(raw_commits(work, args.raw))
            rows.append(raw_writes(work, args.raw, 1))
            rows.append(raw_writes(work, args.raw, args.threads))
    print(table(rows, COLUMNS))
    write_results("overhead", {"jobs": args.jobs, "threads": args.threads, "target": {"jobs_per_second": 1000},
                               "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
