#!/usr/bin/env python3
"""Rate-limit efficiency: the real ``parallel_transcription.py`` against a fake API that enforces limits.

Two limits, each measured on its own, each with verbatim's pacing configured and not configured:

- rate: the fake accepts R requests per second, shaped as a token bucket (one second of burst,
  refilled continuously) or as a fixed one-second window, and answers the rest with 429 and
  ``Retry-After`` (whole seconds, as HTTP has it); every answer carries OpenAI's
  ``x-ratelimit-*-requests`` headers. Configured: ``VERBATIM_OPENAI_RPM = 60 R``. Bound: R per second.
- concurrency: the fake serves at most C requests at once and answers 429
  ``too_many_concurrent_requests`` (no Retry-After) to the rest. Configured:
  ``VERBATIM_OPENAI_MAX_CONCURRENCY = C``. Bound: C / L per second.

Every request takes L seconds. For runs of 40 and 200 files and W = 5, 20, 100 workers it reports completed jobs per second
(over the span from the first request to the last answer) divided by the bound (target >= 0.9),
429s per completed job (target <= 0.1) and failed jobs (target 0). The files are short MP3s, sent as
they are, so the scripts' own cost stays far below the limits.

Example:
    .venv/bin/python benchmarks/ratelimit.py                          # about 10 minutes
    .venv/bin/python benchmarks/ratelimit.py --jobs 60 --workers 20 --limits rate --shapes window
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    ROOT,
    ScriptRun,
    log,
    make_tone_files,
    script_env,
    table,
    write_results,
)
from benchmarks.fakeapi import FakeAPI

COLUMNS = [("limit", "limit", ""), ("shape", "shape", ""), ("configured", "configured", ""), ("workers", "W", "d"), ("jobs", "jobs", "d"),
           ("bound_per_s", "bound/s", ".1f"), ("completed_per_s", "done/s", ".2f"), ("efficiency", "done/s ÷ bound", ".2f"),
           ("responses_429_per_job", "429s/job", ".3f"), ("responses_429_first_second", "429s in 1st s", "d"),
           ("failed", "failed", "d"), ("peak_in_flight", "peak in flight", "d"),
           ("wall_s", "wall s", ".1f")]


def run_one(api: FakeAPI, work: Path, media: list[Path], *, limit: str, configured: bool, workers: int,
            latency: float, rate: float, cap: int, shape: str = "bucket") -> dict:
    import db_manager as dbm
    from pipeline.media import register_inputs

    folder = work / f"{limit}-{shape}-{'configured' if configured else 'learned'}-w{workers}-n{len(media)}"
    folder.mkdir(parents=True)
    db = dbm.DatabaseManager(str(folder / "jobs.db"))
    register_inputs(db, [str(p) for p in media], [])
    db.close_all()
    pacing = {}
    if limit == "rate":
        api.reset(latency=latency, rate=rate, concurrency=None, shape=shape)
        bound = rate
        if configured:
            pacing["VERBATIM_OPENAI_RPM"] = rate * 60
    else:
        api.reset(latency=latency, rate=None, concurrency=cap)
        bound = cap / latency
        if configured:
            pacing["VERBATIM_OPENAI_MAX_CONCURRENCY"] = cap
    run = ScriptRun([str(ROOT / "parallel_transcription.py"), "--db", str(folder / "jobs.db"),
                     "--output-dir", str(folder / "out"), "--workers", str(workers), "--quiet", "--json"],
                    script_env(**api.openai_env(), **pacing)).run()
    summary = run.json()["runs"][0]
    stats = api.stats
    span = (stats.last_response or run.ended) - (stats.first_request or run.started)
    completed = summary["completed"]
    refused = stats.rate_limited + stats.concurrency_limited
    return {"limit": limit, "shape": shape if limit == "rate" else "-", "configured": "yes" if configured else "no", "workers": workers, "jobs": len(media),
            "latency_s": latency, "bound_per_s": round(bound, 3), "span_s": round(span, 3),
            "completed": completed, "completed_per_s": round(completed / span, 3),
            "efficiency": round(completed / span / bound, 3), "responses_429": refused,
            "responses_429_per_job": round(refused / max(1, completed), 4),
            "responses_429_first_second": sum(1 for t in stats.refusals
                                              if t - (stats.first_request or run.started) < 1.0),
            "failed": summary["failed_total"],
            "requeued": summary["requeued"], "requests": stats.requests, "peak_in_flight": stats.peak_in_flight,
            "wall_s": round(run.wall, 2), "exit_code": run.returncode}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[40, 200], help="files per run (default 40 200)")
    parser.add_argument("--shapes", nargs="+", choices=("bucket", "window"), default=["bucket", "window"],
                        help="shapes of the rate limit (default both)")
    parser.add_argument("--workers", type=int, nargs="+", default=[5, 20, 100])
    parser.add_argument("--rate", type=float, default=10.0, help="R, requests per second (default 10)")
    parser.add_argument("--cap", type=int, default=5, help="C, requests at once (default 5)")
    parser.add_argument("--latency", type=float, default=0.2, help="L, seconds per request (default 0.2)")
    parser.add_argument("--limits", nargs="+", choices=("rate", "concurrency"), default=["rate", "concurrency"])
    parser.add_argument("--configured", nargs="+", choices=("no", "yes"), default=["no", "yes"],
                        help="runs without and/or with verbatim's pacing set to the limit")
    parser.add_argument("--out", help="JSON result path (default: benchmarks/results/ratelimit-<time>.json)")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="verbatim-ratelimit-") as tmp, FakeAPI() as api:
        work = Path(tmp)
        every = make_tone_files(work / "media", max(args.jobs), formats=("mp3",), seconds=2.0)
        for jobs in args.jobs:
            for limit in args.limits:
                for shape in (args.shapes if limit == "rate" else ["bucket"]):
                    for configured in args.configured:
                        for workers in args.workers:
                            log(f"{jobs} files, {limit} limit ({shape}), pacing configured: {configured}, "
                                f"W={workers} ...")
                            row = run_one(api, work, every[:jobs], limit=limit, configured=configured == "yes",
                                          workers=workers, latency=args.latency, rate=args.rate, cap=args.cap,
                                          shape=shape)
                            log(f"  {row['completed_per_s']:.2f}/s of {row['bound_per_s']:.1f}/s, "
                                f"{row['responses_429']} 429s, failed {row['failed']}")
                            rows.append(row)
    print(table(rows, COLUMNS))
    write_results("ratelimit", {"rate_per_s": args.rate, "cap": args.cap, "latency_s": args.latency,
                                "jobs": args.jobs, "shapes": args.shapes,
                                "target": {"efficiency": 0.9, "responses_429_per_job": 0.05,
                                                              "failed": 0}, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
