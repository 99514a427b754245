#!/usr/bin/env python3
"""Every benchmark in its default configuration, one after the other, then one table: target
against measured. About 13 minutes on 2 cores, and about 6 more with PostgreSQL beside SQLite.
Results go to benchmarks/results/<time>/.

The job store benchmarks (overhead, scale) measure SQLite and PostgreSQL side by side when
PostgreSQL can be reached (``--backend``, ``--db``: passed on to them), one row per backend.

Example:
    .venv/bin/python benchmarks/run_all.py
    .venv/bin/python benchmarks/run_all.py --only upload scale
    .venv/bin/python benchmarks/run_all.py --only overhead scale --backend sqlite
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, add_backend_arguments, chosen_backends, log, table, write_results

BENCHMARKS = ("throughput", "ratelimit", "overhead", "scale", "upload")
STORE_BENCHMARKS = ("overhead", "scale")  # the ones that take --backend and --db
# Tiny configurations (the smoke test's), for checking this script itself.
SMOKE = {"throughput": ["--files", "4", "--w1-files", "2", "--workers", "1", "50", "--latency", "0.05", "--seconds", "1"],
         "ratelimit": ["--jobs", "6", "--workers", "3", "--rate", "20", "--cap", "2", "--latency", "0.05"],
         "overhead": ["--jobs", "200", "--threads", "4", "--processes", "1", "2", "--raw", "50"],
         "scale": ["--files", "400", "--claims", "5"],
         "upload": ["--seconds", "20"]}
COLUMNS = [("benchmark", "benchmark", ""), ("what", "what", ""), ("target", "target", ""),
           ("measured", "measured", ""), ("met", "met", "")]


def _row(benchmark, what, target, measured, met) -> dict:
    return {"benchmark": benchmark, "what": what, "target": target, "measured": measured,
            "met": "yes" if met else "NO"}


def summarize(results: dict[str, dict]) -> list[dict]:
    rows = []
    if "throughput" in results:
        for r in results["throughput"]["rows"]:
            if r["workers"] == 50:
                rows.append(_row("throughput", f"{r['script']}, W=50, M={r['files']}, L={r['latency_s']} s",
                                 "efficiency >= 0.9",
                                 f"{r['efficiency']:.2f} ({r['efficiency_after_start']:.2f} after start)",
                                 r["efficiency"] >= 0.9))
    if "ratelimit" in results:
        for r in results["ratelimit"]["rows"]:
            what = f"{r['limit']}, pacing configured: {r['configured']}, W={r['workers']}"
            rows.append(_row("ratelimit", what, ">= 0.9, <= 0.1 429s/job, 0 failed",
                             f"{r['efficiency']:.2f}, {r['responses_429_per_job']:.3f}, {r['failed']}",
                             r["efficiency"] >= 0.9 and r["responses_429_per_job"] <= 0.1 and r["failed"] == 0))
    if "overhead" in results:
        for r in results["overhead"]["rows"]:
            if "durability" not in r:  # the raw measurements
                continue
            rows.append(_row(f"overhead, {r['backend']}",
                             f"{r['count']:,} jobs, {r['processes']} x {r['threads']} threads, {r['durability']}",
                             ">= 1,000 jobs/s", f"{r['per_second']:,.0f} jobs/s", r["per_second"] >= 1000))
    if "scale" in results:
        files = results["scale"]["files"]
        for backend, s in results["scale"]["backends"].items():
            name = f"scale, {backend}"
            rows.append(_row(name, f"register {files:,} files", "<= 30 s", f"{s['register_seconds']:.1f} s",
                             s["register_seconds"] <= 30))
            rows.append(_row(name, "tools/status.py", "<= 1 s", f"{s['status_seconds']:.2f} s",
                             s["status_seconds"] <= 1))
            for kind, label in (("claim_1", "claim 1 job"), ("claim_20", "claim 20 jobs"),
                                ("claim_translation",
                                 f"claim 1 translation past {s['translation_jobs_ahead']:,} not ready")):
                p50, p99 = s[f"{kind}_p50_ms"], s[f"{kind}_p99_ms"]
                rows.append(_row(name, f"{label}, p50 / p99", "<= 5 / 50 ms", f"{p50:.2f} / {p99:.2f} ms",
                                 p50 <= 5 and p99 <= 50))
            rows.append(_row(name, "database bytes per file", "-", f"{s['database_bytes_per_file']:,}", True))
    if "upload" in results:
        for r in results["upload"]["rows"]:
            rows.append(_row("upload", r["source"], "<= 15 MB per hour of speech",
                             f"{r['sent_mb_per_hour']:.1f} MB/h (original {r['original_mb_per_hour']:,.0f})",
                             r["sent_mb_per_hour"] <= 15))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--smoke", action="store_true", help="tiny configurations (a check of the scripts, not figures)")
    add_backend_arguments(parser)
    parser.add_argument("--out", help="folder for the results (default: benchmarks/results/<time>/)")
    args = parser.parse_args(argv)
    backends = chosen_backends(parser, args)
    store_args = ["--backend", "both" if len(backends) == 2 else backends[0], *(["--db", args.db] if args.db else [])]

    folder = Path(args.out) if args.out else RESULTS / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    results, seconds = {}, {}
    for name in args.only:
        log(f"== {name}")
        started = time.monotonic()
        out = folder / f"{name}.json"
        extra = (SMOKE[name] if args.smoke else []) + (store_args if name in STORE_BENCHMARKS else [])
        completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *extra, "--out", str(out)],
                                   cwd=ROOT, timeout=3600)
        seconds[name] = round(time.monotonic() - started, 1)
        if completed.returncode != 0:
            log(f"{name} failed with exit code {completed.returncode}")
            continue
        results[name] = json.loads(out.read_text())
    rows = summarize(results)
    print()
    print(table(rows, COLUMNS))
    write_results("run_all", {"seconds": seconds, "rows": rows}, str(folder / "summary.json"))
    return 0 if len(results) == len(args.only) else 1


if __name__ == "__main__":
    sys.exit(main())
