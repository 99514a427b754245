#!/usr/bin/env python3
"""Scale: 100,000 media files in one job database, SQLite and PostgreSQL side by side.

- registration: N small synthetic media files on disk (distinct content, a few hundred bytes
  each) scanned, hashed and registered the way ``tools/add_media.py`` does it, with the default
  three target languages, so each file gets four jobs (target <= 30 s for 100,000);
- a rescan of the same tree (nothing new: one ``stat`` per file);
- ``tools/status.py`` over them, as a subprocess from start to exit (target <= 1 s);
- claim latency, p50 / p99 over many claims of one job and of a batch (the scripts claim 20),
  each a ``BEGIN IMMEDIATE`` transaction with ``synchronous=FULL`` (targets <= 5 ms / 50 ms);
  also for translation jobs while the transcripts of the first 10% of files are not done (in
  progress or failed): their translations are parked, so a claim must not have to look past them;
- database bytes per file (SQLite: after a checkpoint; PostgreSQL: tables, indexes and TOAST).

Each backend gets its own empty store over the same files (``--backend``): a SQLite file, and a
PostgreSQL database on a throw-away local server (``benchmarks/pgserver.py``, fsync on) or on
``--db``'s server. On PostgreSQL each claim is a transaction of the server (``SKIP LOCKED``), over
a local TCP connection.

Example:
    .venv/bin/python benchmarks/scale.py                 # about 4 minutes for both backends
    .venv/bin/python benchmarks/scale.py --files 2000 --claims 50 --backend sqlite
    .venv/bin/python benchmarks/scale.py --backend postgresql --db postgresql://me@db-host/postgres
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (ROOT, JobStores, ScriptRun, add_backend_arguments, chosen_backends, log, script_env,
                               table, write_results)

COLUMNS = [("backend", "backend", ""), ("what", "what", ""), ("measured", "measured", ""),
           ("target", "target", "")]


def make_files(folder: Path, count: int) -> None:
    """``count`` distinct small files in folders of 1,000 (a header-like prefix and a number)."""
    for index in range(count):
        sub = folder / f"box-{index // 1000:03d}"
        if index % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        with open(sub / f"interview-{index:06d}.{('wav', 'mp3', 'mp4')[index % 3]}", "wb") as handle:
            handle.write(b"RIFF" + index.to_bytes(8, "little") + b"\0" * 200)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return (statistics.median(ordered) * 1000, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000)


def claim_latency(db, owner: str, stage: str, language: str, claims: int, limit: int) -> tuple[float, float]:
    samples = []
    for _ in range(claims):
        started = time.perf_counter()
        jobs = db.claim(owner, stage, language, limit=limit)
        samples.append(time.perf_counter() - started)
        if not jobs:
            raise RuntimeError(f"nothing left to claim for {stage} {language}")
    return percentiles(samples)


def measure(stores: JobStores, backend: str, archive: Path, args) -> dict:
    """Every figure for one backend, on a new store over the files in ``archive``."""
    import db_manager as dbm
    from pipeline.media import register_inputs

    target = stores.new(backend, "scale")
    result: dict = {}
    log(f"[{backend}] registering ...")
    started = time.perf_counter()
    db = dbm.open_job_store(target)
    scan = register_inputs(db, [str(archive)], args.languages)
    result["register_seconds"] = round(time.perf_counter() - started, 2)
    result["registered_files"] = scan.new_files
    started = time.perf_counter()
    rescan = register_inputs(db, [str(archive)], args.languages)
    result["rescan_seconds"] = round(time.perf_counter() - started, 2)
    result["rescan_unchanged"] = rescan.unchanged
    result["jobs"] = db.query("SELECT COUNT(*) FROM jobs")[0][0]

    log(f"[{backend}] status ...")
    env = script_env(VERBATIM_TARGET_LANGUAGES=",".join(args.languages))
    status_runs = [ScriptRun([str(ROOT / "tools" / "status.py"), "--db", target], env, timeout=600).run()
                   for _ in range(3)]
    if any(run.returncode != 0 for run in status_runs):
        raise RuntimeError(status_runs[0].stderr[-2000:])
    result["status_seconds"] = round(statistics.median(run.wall for run in status_runs), 3)
    imports = "import db_manager, pipeline.config" + (", pipeline.pgstore" if backend == "postgresql" else "")
    bare = [ScriptRun(["-c", imports], env).run() for _ in range(3)]
    result["status_interpreter_seconds"] = round(statistics.median(run.wall for run in bare), 3)

    log(f"[{backend}] claims ...")
    owner = dbm.make_owner("bench")
    claims = min(args.claims, args.files // 40 or 1)
    result["claims_timed"] = claims
    result["claim_1_p50_ms"], result["claim_1_p99_ms"] = claim_latency(db, owner, dbm.TRANSCRIPTION, "", claims, 1)
    result["claim_20_p50_ms"], result["claim_20_p99_ms"] = claim_latency(db, owner, dbm.TRANSCRIPTION, "", claims, 20)
    # Translation claims while the transcripts of the first 10% of files are not done (in
    # progress above, or failed for good, as bad files leave them): each claim has to look
    # past those translation jobs to the ones whose transcript is ready.
    translation_claims = max(1, claims // 10)
    result["translation_claims_timed"] = translation_claims
    blocked = db.query("SELECT COUNT(*) FROM jobs WHERE stage = 'transcription' AND status != 'not_started'")[0][0]
    while blocked < args.files // 10:
        batch = db.claim(owner, dbm.TRANSCRIPTION, limit=min(500, args.files // 10 - blocked))
        for job in batch:
            db.fail(job, "unsupported_media", "not audio", retryable=False)
        blocked += len(batch)
    for job in db.claim(owner, dbm.TRANSCRIPTION, limit=translation_claims * 2):
        db.complete(job, dbm.Outcome({}))
    result["translation_jobs_ahead"] = blocked
    result["claim_translation_p50_ms"], result["claim_translation_p99_ms"] = claim_latency(
        db, owner, dbm.TRANSLATION, args.languages[0], translation_claims, 1)

    if backend == "sqlite":
        db.query("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close_all()
    result["database_bytes"] = stores.size(target)
    result["database_bytes_per_file"] = round(result["database_bytes"] / args.files)
    for key in [k for k in result if k.endswith("_ms")]:
        result[key] = round(result[key], 3)
    return result


def rows_of(backend: str, r: dict, files: int) -> list[dict]:
    rows = [
        {"what": f"register {files:,} files ({r['jobs']:,} jobs)", "measured": f"{r['register_seconds']:.1f} s",
         "target": "<= 30 s"},
        {"what": "rescan, nothing new", "measured": f"{r['rescan_seconds']:.1f} s", "target": ""},
        {"what": "tools/status.py (process start to exit)", "measured": f"{r['status_seconds']:.2f} s",
         "target": "<= 1 s"},
        {"what": "  of which interpreter start and imports", "measured": f"{r['status_interpreter_seconds']:.2f} s",
         "target": ""},
        {"what": "claim 1 job, p50 / p99", "measured": f"{r['claim_1_p50_ms']:.2f} / {r['claim_1_p99_ms']:.2f} ms",
         "target": "<= 5 / 50 ms"},
        {"what": "claim 20 jobs, p50 / p99", "measured": f"{r['claim_20_p50_ms']:.2f} / {r['claim_20_p99_ms']:.2f} ms",
         "target": "<= 5 / 50 ms"},
        {"what": f"claim 1 translation past {r['translation_jobs_ahead']:,} not ready, p50 / p99",
         "measured": f"{r['claim_translation_p50_ms']:.2f} / {r['claim_translation_p99_ms']:.2f} ms",
         "target": "<= 5 / 50 ms"},
        {"what": "database bytes per file", "measured": f"{r['database_bytes_per_file']:,}", "target": ""},
    ]
    return [{"backend": backend, **row} for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--claims", type=int, default=1000, help="claims timed per kind (default 1000)")
    parser.add_argument("--languages", nargs="+", default=["en", "de", "he"])
    add_backend_arguments(parser)
    parser.add_argument("--out", help="JSON result path (default: benchmarks/results/scale-<time>.json)")
    args = parser.parse_args(argv)
    backends = chosen_backends(parser, args)

    results: dict = {}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="verbatim-scale-") as tmp, JobStores(Path(tmp), args.db) as stores:
        work = Path(tmp)
        log(f"making {args.files:,} files ...")
        make_files(work / "archive", args.files)
        for backend in backends:
            results[backend] = measure(stores, backend, work / "archive", args)
            rows += rows_of(backend, results[backend], args.files)
        postgresql = stores.server_version()

    print(table(rows, COLUMNS))
    write_results("scale", {"files": args.files, "languages": args.languages, "postgresql": postgresql,
                            "target": {"register_seconds": 30, "status_seconds": 1, "claim_p50_ms": 5,
                                       "claim_p99_ms": 50},
                            "backends": results, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
