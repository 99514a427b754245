#!/usr/bin/env python3
"""Throughput against the theoretical bound: the real scripts against a fixed-latency fake API.

For each worker count W, the real ``parallel_transcription.py`` (M short speech-like files, a mix
of WAV, MP3 and Ogg/Opus, 3 s each) and the real ``parallel_translation.py`` (M completed German
transcripts into English through DeepL's wire format) run as subprocesses against
``benchmarks/fakeapi.py``, which answers every request after exactly L seconds. One request per
file, so no schedule can beat

    bound = ceil(M / W) * L

and efficiency = bound / makespan (1.0: the scripts add nothing). The makespan is the script's
wall time from process start to exit (interpreter start, imports, database, every file, summary);
registration of the media happens before, outside the timing, as ``tools/add_media.py`` does it.
``startup`` is process start to the first request at the fake, ``tail`` the last answer to exit;
``eff. after start`` leaves out the startup. CPU is the script's and its ffmpeg children's.

W = 1 at M = 400 and L = 1 s alone takes 400 s: by default it runs with ``--w1-files`` (40).

Example:
    .venv/bin/python benchmarks/throughput.py                       # the full run, about 8 minutes
    .venv/bin/python benchmarks/throughput.py --files 40 --workers 5 20 --latency 0.5 --scripts transcription
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    ROOT,
    ScriptRun,
    log,
    make_tone_files,
    make_transcribed_archive,
    script_env,
    table,
    write_results,
)
from benchmarks.fakeapi import FakeAPI

SCRIPT_ARGS: list[str] = []  # passed on to both scripts (--batch-size)
PROFILE_DIR: list[Path] = []  # --profile: where py-spy writes each run's folded stacks
COLUMNS = [("script", "script", ""), ("workers", "W", "d"), ("files", "M", "d"), ("bound_s", "bound s", ".1f"),
           ("makespan_s", "makespan s", ".2f"), ("files_per_minute", "files/min", ",.0f"),
           ("efficiency", "efficiency", ".2f"), ("startup_s", "startup s", ".2f"), ("tail_s", "tail s", ".2f"),
           ("efficiency_after_start", "eff. after start", ".2f"), ("cpu_ms_per_file", "CPU ms/file", ".0f"),
           ("peak_in_flight", "peak in flight", "d"), ("completed", "completed", "d")]


def _row(script: str, workers: int, files: int, latency: float, run: ScriptRun, api: FakeAPI) -> dict:
    summary = run.json()
    stats = api.stats
    bound = math.ceil(files / workers) * latency
    first = stats.first_request or run.started
    last = stats.last_response or run.ended
    completed = sum(r["completed"] for r in summary["runs"])
    return {"script": script, "workers": workers, "files": files, "latency_s": latency, "bound_s": round(bound, 3),
            "makespan_s": round(run.wall, 3), "files_per_minute": round(files / run.wall * 60, 1),
            "efficiency": round(bound / run.wall, 3), "startup_s": round(first - run.started, 3),
            "api_span_s": round(last - first, 3), "tail_s": round(run.ended - last, 3),
            "efficiency_after_start": round(bound / (run.ended - first), 3),
            "cpu_s": round(run.cpu, 2), "cpu_ms_per_file": round(run.cpu / files * 1000, 1),
            "peak_in_flight": stats.peak_in_flight, "requests": stats.requests, "completed": completed,
            "failed": sum(r["failed_total"] for r in summary["runs"]), "exit_code": run.returncode}


def _profile_path(script: str, workers: int) -> str | None:
    return str(PROFILE_DIR[0] / f"{script}-w{workers}.folded") if PROFILE_DIR else None


def transcription(api: FakeAPI, work: Path, media: list[Path], workers: int, files: int, latency: float) -> dict:
    import db_manager as dbm
    from pipeline.media import register_inputs

    folder = work / f"transcription-w{workers}"
    folder.mkdir(parents=True)
    db = dbm.DatabaseManager(str(folder / "jobs.db"))
    register_inputs(db, [str(p) for p in media[:files]], [])
    db.close_all()
    api.reset(latency=latency)
    run = ScriptRun([str(ROOT / "parallel_transcription.py"), "--db", str(folder / "jobs.db"),
                     "--output-dir", str(folder / "out"), "--workers", str(workers), "--quiet", "--json",
                     *SCRIPT_ARGS],
                    script_env(**api.openai_env()), profile=_profile_path("transcription", workers)).run()
    return _row("transcription", workers, files, latency, run, api)


def translation(api: FakeAPI, work: Path, workers: int, files: int, latency: float) -> dict:
    folder = work / f"translation-w{workers}"
    folder.mkdir(parents=True)
    make_transcribed_archive(folder / "jobs.db", folder / "out", files, languages=("en",))
    api.reset(latency=latency)
    run = ScriptRun([str(ROOT / "parallel_translation.py"), "--db", str(folder / "jobs.db"),
                     "--output-dir", str(folder / "out"), "--language", "en", "--workers", str(workers),
                     "--quiet", "--json", *SCRIPT_ARGS], script_env(**api.deepl_env()),
                    profile=_profile_path("translation", workers)).run()
    return _row("translation", workers, files, latency, run, api)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=400, help="M, files (or transcripts) per run (default 400)")
    parser.add_argument("--w1-files", type=int, default=40, help="M for W = 1 (default 40; 0: same as --files)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 5, 20, 50, 100])
    parser.add_argument("--latency", type=float, default=1.0, help="L, seconds per request (default 1.0)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each media file (default 3)")
    parser.add_argument("--scripts", nargs="+", choices=("transcription", "translation"),
                        default=["transcription", "translation"])
    parser.add_argument("--batch-size", type=int, help="passed on to the scripts (default: theirs)")
    parser.add_argument("--profile", metavar="DIR", help="run each script under py-spy (pip install py-spy); "
                        "folded stacks of what holds the GIL go to DIR (timings are then not comparable)")
    parser.add_argument("--out", help="JSON result path (default: benchmarks/results/throughput-<time>.json)")
    args = parser.parse_args(argv)
    if args.profile:
        PROFILE_DIR[:] = [Path(args.profile)]
        PROFILE_DIR[0].mkdir(parents=True, exist_ok=True)
    if args.batch_size:
        SCRIPT_ARGS[:] = ["--batch-size", str(args.batch_size)]

    rows = []
    with tempfile.TemporaryDirectory(prefix="verbatim-throughput-") as tmp, FakeAPI() as api:
        work = Path(tmp)
        media = []
        if "transcription" in args.scripts:
            made = make_tone_files(work / "media", max(args.files, args.w1_files), seconds=args.seconds)
            media = sorted(made, key=lambda p: (p.stem.split("-")[1], p.suffix))  # formats in turn
        for script in args.scripts:
            for workers in args.workers:
                files = args.w1_files if workers == 1 and args.w1_files else args.files
                log(f"{script}: W={workers} M={files} L={args.latency} ...")
                row = (transcription(api, work, media, workers, files, args.latency) if script == "transcription"
                       else translation(api, work, workers, files, args.latency))
                log(f"  makespan {row['makespan_s']:.2f} s (bound {row['bound_s']:.1f} s), efficiency "
                    f"{row['efficiency']:.2f}, completed {row['completed']}")
                rows.append(row)
    print(table(rows, COLUMNS))
    write_results("throughput", {"latency_s": args.latency, "files": args.files, "w1_files": args.w1_files,
                                 "media_seconds": args.seconds, "target": {"efficiency_at_w50": 0.9},
                                 "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
