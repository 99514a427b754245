#!/usr/bin/env python3
"""Orchestration overhead: jobs per second through verbatim's runner when the provider costs nothing.

An in-process provider answers at once, so all that is left is what verbatim does per job: claim
(in batches, ``UPDATE ... RETURNING``), hand the job to a worker thread, write one output file
atomically (temporary name, fsync, rename, fsync of the folder), and record the completion fenced
by owner and claim number. 20,000 jobs on 32 threads by default; target >= 1,000 jobs per second
on 2 cores. ``--processes 1 4`` runs the same jobs from 1 and from 4 runner processes of 32
threads each against one store (the way several machines share one), timed from a common start
to the last process's end.

The store is SQLite (WAL, ``synchronous=FULL``) and PostgreSQL (``--backend``; a throw-away local
server with fsync and synchronous_commit on, or ``--db``'s server), each in a new empty store.

For scale it also measures this machine's raw limits: commits per second of one connection
(SQLite with FULL; PostgreSQL over local TCP), and atomic file writes per second (on the same
disk, one thread and 32 threads).

Example:
    .venv/bin/python benchmarks/overhead.py
    .venv/bin/python benchmarks/overhead.py --processes 1 4 --backend postgresql
    .venv/bin/python benchmarks/overhead.py --jobs 2000 --threads 8 --profile   # with pyinstrument, if installed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import ROOT, JobStores, add_backend_arguments, chosen_backends, log, table, write_results

COLUMNS = [("backend", "backend", ""), ("what", "what", ""), ("count", "count", ",d"), ("processes", "processes", "d"),
           ("threads", "threads", "d"), ("seconds", "seconds", ".2f"), ("per_second", "per second", ",.0f"),
           ("target", "target", "")]


def register(db, jobs: int) -> None:
    from db_manager import MediaRecord
    db.register_files([MediaRecord(f"/archive/{n:06d}.wav", hashlib.sha256(str(n).encode()).hexdigest(), 1, 1, "audio")
                       for n in range(jobs)], [])


def run_pipeline(stores: JobStores, backend: str, work: Path, args, processes: int) -> dict:
    """``args.jobs`` jobs registered in a new store, then run by ``processes`` runner processes of
    ``args.threads`` threads each (started together); jobs per second from the first start to the
    last end."""
    import db_manager as dbm

    target = stores.new(backend, f"overhead{processes}")
    db = dbm.open_job_store(target)
    register(db, args.jobs)
    if backend == "sqlite":
        durability = f"synchronous={('OFF', 'NORMAL', 'FULL', 'EXTRA')[db.query('PRAGMA synchronous')[0][0]]}"
    else:
        durability = ", ".join(f"{name}={db.query(f'SHOW {name}')[0][0]}" for name in ("fsync", "synchronous_commit"))
    db.close_all()
    out = work / f"out-{backend}-{processes}"
    command = [sys.executable, __file__, "--child", target, str(out), "--threads", str(args.threads),
               "--batch-size", str(args.batch_size), *(["--profile"] if args.profile else [])]
    children = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)}) for _ in range(processes)]
    try:
        for child in children:  # each has imported and opened the store: start them together
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a runner process did not start (exit {child.wait()})")
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        reports = [json.loads(child.communicate(timeout=3600)[0].strip().splitlines()[-1]) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    seconds = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    completed = sum(r["completed"] for r in reports)
    db = dbm.open_job_store(target)
    counts = db.counts()[(dbm.TRANSCRIPTION, "")]
    db.close_all()
    if counts["completed"] != args.jobs or completed != args.jobs:
        raise RuntimeError(f"{completed} completions reported, {counts['completed']} of {args.jobs} jobs completed:"
                           f" {counts}")
    return {"backend": backend, "what": "claim → work → atomic write → fenced completion", "count": completed,
            "processes": processes, "threads": args.threads, "batch_size": args.batch_size,
            "seconds": round(seconds, 3), "per_second": round(completed / seconds, 1), "durability": durability,
            "target": ">= 1,000"}


def child(target: str, out: Path, threads: int, batch_size: int, profile: bool) -> int:
    """One runner process of ``run_pipeline``: says ``ready``, waits for ``go``, runs until no job
    is left to claim, prints its completions and its start and end (epoch seconds) as JSON."""
    import db_manager as dbm
    from pipeline.outputs import as_recorded, atomic_write, safe_join
    from pipeline.runner import Runner, RunOptions

    db = dbm.open_job_store(target)

    def work_fn(job):  # the provider answered at once; write its answer like a real job does
        written = atomic_write(safe_join(out, job.folder, "transcript.txt"), f"{job.file_id}\n", root=out)
        return dbm.Outcome(as_recorded({"txt": written}), provider="instant")

    print("ready", flush=True)
    sys.stdin.readline()
    if profile:
        from pyinstrument import Profiler
        profiler = Profiler()
        profiler.start()
    started = time.time()
    summary = Runner(db, RunOptions(dbm.TRANSCRIPTION, workers=threads, batch_size=batch_size, quiet=True),
                     work_fn).run()
    ended = time.time()
    if profile:
        profiler.stop()
        print(profiler.output_text(unicode=True, color=False), file=sys.stderr)
    db.close_all()
    print(json.dumps({"completed": summary.completed, "started": started, "ended": ended}), flush=True)
    return 0


def _timed_commits(conn, begin: str, insert: str, count: int) -> float:
    """Seconds for ``count`` transactions of one insert each: the database's own commit rate."""
    started = time.perf_counter()
    for n in range(count):
        conn.execute(begin)
        conn.execute(insert, (n,))
        conn.execute("COMMIT")
    return time.perf_counter() - started


def _raw_row(backend: str, what: str, count: int, seconds: float) -> dict:
    return {"backend": backend, "what": what, "count": count, "processes": 1, "threads": 1,
            "seconds": round(seconds, 3), "per_second": round(count / seconds, 1), "target": ""}


def raw_commits(work: Path, count: int) -> dict:
    conn = sqlite3.connect(str(work / "raw.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t (n INTEGER)")
    seconds = _timed_commits(conn, "BEGIN IMMEDIATE", "INSERT INTO t VALUES (?)", count)
    conn.close()
    return _raw_row("sqlite", "raw commits, one connection (WAL, FULL)", count, seconds)


def raw_pg_commits(stores: JobStores, count: int) -> dict:
    import psycopg

    with psycopg.connect(stores.new("postgresql", "raw"), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n BIGINT)")
        seconds = _timed_commits(conn, "BEGIN", "INSERT INTO t VALUES (%s)", count)
    return _raw_row("postgresql", "raw commits, one connection (local TCP)", count, seconds)


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
    return {"backend": "-", "what": "raw atomic file writes", "count": per_thread * threads, "processes": 1,
            "threads": threads,
            "seconds": round(seconds, 3), "per_second": round(per_thread * threads / seconds, 1), "target": ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=32, help="threads per runner process (default 32)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 4],
                        help="runner processes against one store, one measurement each (default: 1 4)")
    parser.add_argument("--batch-size", type=int, default=20, help="jobs claimed per batch (the scripts' default: 20)")
    add_backend_arguments(parser)
    parser.add_argument("--raw", type=int, default=3000, help="operations for the raw measurements (0: skip)")
    parser.add_argument("--profile", action="store_true", help="profile each runner process with pyinstrument")
    parser.add_argument("--out", help="JSON result path (default: benchmarks/results/overhead-<time>.json)")
    parser.add_argument("--child", nargs=2, metavar=("STORE", "OUTPUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], Path(args.child[1]), args.threads, args.batch_size, args.profile)
    if min(args.processes) < 1:
        parser.error("--processes: at least 1")
    backends = chosen_backends(parser, args)

    rows = []
    with tempfile.TemporaryDirectory(prefix="verbatim-overhead-", dir=os.environ.get("VERBATIM_BENCH_TMP")) as tmp, \
            JobStores(Path(tmp), args.db) as stores:
        work = Path(tmp)
        for backend in backends:
            for processes in args.processes:
                log(f"[{backend}] {args.jobs:,} jobs, {processes} process(es) x {args.threads} threads ...")
                rows.append(run_pipeline(stores, backend, work, args, processes))
        if args.raw:
            if "sqlite" in backends:
                rows.append(raw_commits(work, args.raw))
            if "postgresql" in backends:
                rows.append(raw_pg_commits(stores, args.raw))
            rows.append(raw_writes(work, args.raw, 1))
            rows.append(raw_writes(work, args.raw, args.threads))
        postgresql = stores.server_version()
    print(table(rows, COLUMNS))
    write_results("overhead", {"jobs": args.jobs, "threads": args.threads, "processes": args.processes,
                               "postgresql": postgresql, "target": {"jobs_per_second": 1000}, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
