#!/usr/bin/env python3
"""Report: how long ``tools/report.py`` takes for an archive of N interviews (default 700).

A demo archive is generated without any network: N media files registered with the default target
languages (en, de, he); transcripts of ``--segments`` cues written for most of them, translations
(the offline dictionary of ``benchmarks/fake_translate.py``, Hebrew in Hebrew letters) for most of
those; a few jobs failed with realistic error classes, some in progress, the rest not started.
The event log is then given the times of a run over 40 hours so the progress chart looks real
(the one place this script writes the database directly: events are history, no API moves them).

Measured, each as ``tools/report.py`` from process start to exit:
- the first build (every page rendered and written);
- a rebuild with nothing changed (target: writes nothing);
- a rebuild after one more transcription completed (target: its page and the index only).

``--screenshots DIR`` also writes ``report-dashboard.png`` and ``report-interview.png`` of this
archive with headless Chromium (Playwright), as in docs/.

Example:
    .venv/bin/python benchmarks/report.py                     # about half a minute
    .venv/bin/python benchmarks/report.py --interviews 50 --segments 40 --screenshots docs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, log, script_env, table, write_results

COLUMNS = [("what", "what", ""), ("seconds", "seconds", ".2f"), ("written", "files written", ""),
           ("target", "target", "")]
LANGUAGES = ("en", "de", "he")
DEMO_SECONDS = 90.0  # the one interview with real audio (the screenshot's player)
TRANSCRIPT_ERRORS = ("unsupported_media", "server_error", "file_too_large")
TRANSLATION_ERRORS = ("wrong_language", "unit_mismatch")


def _write_json(folder: Path, name: str, payload: dict) -> dict:
    """One output file, recorded as the pipeline records it (plain writes: this is set-up, not measured)."""
    data = (json.dumps(payload, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    path = folder / name
    path.write_bytes(data)
    return {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def make_archive(base: Path, count: int, segments: int, seed: int = 7) -> dict:
    """The demo archive under ``base``; returns the paths and the file id of the demo interview."""
    import db_manager as dbm
    from pipeline.outputs import safe_join
    from benchmarks.fake_translate import fake_translate, make_transcript
    from benchmarks.mediagen import make_tone

    rng = random.Random(seed)
    db_path, out, media = base / "jobs.db", base / "out", base / "media"
    media.mkdir(parents=True)
    demo_media = make_tone(media / "Interview Rosa Weiss 1994-03-12.wav", freq=330, seconds=DEMO_SECONDS)
    docs, records = {}, []
    for n in range(count):
        language = "de" if rng.random() < 0.85 else "en"
        docs[n] = make_transcript(n, language, n_segments=20 if n == 0 else segments, speakers=rng.choice((1, 2, 2, 3)))
        path = demo_media if n == 0 else media / f"interview-{n:04d}.mp3"
        content = path.read_bytes() if n == 0 else f"demo interview {n}".encode()
        duration = DEMO_SECONDS if n == 0 else docs[n]["duration"]
        records.append(dbm.MediaRecord(str(path), hashlib.sha256(content).hexdigest(), len(content), 1, "audio",
                                       duration))
    db = dbm.DatabaseManager(str(db_path))
    owner = dbm.make_owner("demo")
    by_path = {r.path: n for n, r in enumerate(records)}
    demo_id = records[0].sha256[:16]
    try:
        db.register_files(records, LANGUAGES)
        with db.transaction():  # one commit for the whole set-up (complete/fail join it)
            for job in db.claim(owner, dbm.TRANSCRIPTION, limit=count):
                n = by_path[job.media_path]
                # the demo interview is done; the last file is left not started for complete_one_more
                roll = 0.0 if n == 0 else 0.99 if n == count - 1 else rng.random()
                if roll < 0.92:
                    doc = docs[n]
                    folder = safe_join(out, job.folder)
                    folder.mkdir(parents=True, exist_ok=True)
                    outputs = {"json": _write_json(folder, "transcript.json", doc)}
                    hours = doc["duration"] / 3600
                    db.complete(job, dbm.Outcome(outputs, provider="openai", audio_seconds=doc["duration"],
                                                 cost=round(0.36 * hours, 4), source_language=doc["language"]))
                elif roll < 0.95:
                    error = rng.choice(TRANSCRIPT_ERRORS)
                    db.fail(job, error, f"{error}: HTTP 4xx from the provider", retryable=False)
                elif roll < 0.97:
                    continue  # stays in progress, as under a live run
                else:
                    db.release([job], "demo: not started yet")
            for language in LANGUAGES:
                for job in db.claim(owner, dbm.TRANSLATION, language, limit=count):
                    n = by_path[job.media_path]
                    roll = rng.random() if n else 0.0
                    if roll < 0.9:
                        doc = docs[n]
                        units = [dict(s, text=s["text"] if doc["language"] == language
                                      else fake_translate(s["text"], language)) for s in doc["segments"]]
                        payload = {"text": "\n".join(u["text"] for u in units), "language": language,
                                   "source_language": doc["language"], "provider": "deepl", "model": None,
                                   "has_timestamps": True, "kept_units": 0, "usage": {}, "cost": 0.0,
                                   "segments": units}
                        folder = safe_join(out, job.folder)
                        outputs = {"json": _write_json(folder, f"translation.{language}.json", payload)}
                        chars = sum(len(s["text"]) for s in doc["segments"])
                        db.complete(job, dbm.Outcome(outputs, provider="deepl", characters=chars,
                                                     cost=round(chars * 25e-6, 4)))
                    elif roll < 0.94:
                        error = rng.choice(TRANSLATION_ERRORS)
                        db.fail(job, error, f"{error}: the answer failed validation", retryable=False)
                    else:
                        db.release([job], "demo: not started yet")
    finally:
        db.close_all()
    spread_events(db_path, rng)
    return {"db": str(db_path), "out": str(out), "demo_id": demo_id}


def spread_events(db_path: Path, rng: random.Random, hours: float = 40.0) -> None:
    """Give the event log the times of a real run over ``hours`` ending now: each transcription
    finishes at a random time (more by day), each translation some time after its transcript, and
    a job's own events keep their order (registered, claimed a minute before it ends, ended)."""
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute("SELECT e.id, e.job_id, e.from_status, j.file_id, j.stage FROM events e"
                            " JOIN jobs j ON j.id = e.job_id ORDER BY e.id").fetchall()
        end = time.time()
        start = end - hours * 3600
        finished: dict[int, float] = {}
        transcribed: dict[str, float] = {}
        for _id, job_id, _from, file_id, stage in rows:
            if stage == "transcription" and job_id not in finished:
                at = start + 60 + rng.betavariate(1.3, 2.2) * (hours * 3600 * 0.7)
                finished[job_id] = transcribed[file_id] = at
        for _id, job_id, _from, file_id, stage in rows:
            if stage == "translation" and job_id not in finished:
                finished[job_id] = min(end, transcribed.get(file_id, start) + rng.expovariate(1 / 7200))
        stamps = [(start if from_status is None else finished[job_id] - (60 if from_status == "not_started" else 0),
                   event_id) for event_id, job_id, from_status, _file_id, _stage in rows]
        with conn:
            conn.executemany("UPDATE events SET at = ? WHERE id = ?", stamps)
    finally:
        conn.close()


def run_report(archive: dict, report: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), "--db", archive["db"],
                             "--output-dir", archive["out"], "--out", str(report), "--json"],
                            capture_output=True, text=True, env=script_env(), timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"tools/report.py failed: {result.stderr[-2000:]}")
    data = json.loads(result.stdout)
    data["wall"] = time.perf_counter() - started
    return data


def complete_one_more(archive: dict) -> None:
    """One more transcription completes, as a run would (a not-started file)."""
    import db_manager as dbm

    db = dbm.DatabaseManager(archive["db"])
    try:
        job = db.claim(dbm.make_owner("demo"), dbm.TRANSCRIPTION)[0]
        db.complete(job, dbm.Outcome({}, provider="openai"))
    finally:
        db.close_all()


def screenshots(report: Path, demo_id: str, folder: Path) -> list[str]:
    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
        page = browser.new_page(viewport={"width": 1280, "height": 1180})
        page.goto((report / "index.html").as_uri())
        page.screenshot(path=str(folder / "report-dashboard.png"))
        page.goto((report / "interviews" / f"{demo_id}.html").as_uri())
        page.wait_for_function("document.getElementById('player').readyState >= 1")
        page.locator("tr.cue").nth(3).click()
        page.evaluate("document.getElementById('player').pause()")
        page.wait_for_timeout(300)  # the highlight follows the seek
        page.screenshot(path=str(folder / "report-interview.png"))
        browser.close()
        shots = [str(folder / "report-dashboard.png"), str(folder / "report-interview.png")]
    return shots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interviews", type=int, default=700)
    parser.add_argument("--segments", type=int, default=300, help="cues per transcript (a 20-minute interview)")
    parser.add_argument("--screenshots", metavar="DIR", help="also write the two screenshots into DIR")
    parser.add_argument("--out", help="results JSON (default: benchmarks/results/report-<time>.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="verbatim-report-") as tmp:
        base = Path(tmp)
        log(f"generating {args.interviews} interviews of {args.segments} cues ...")
        started = time.perf_counter()
        archive = make_archive(base, args.interviews, args.segments)
        log(f"archive ready in {time.perf_counter() - started:.1f} s")
        report = base / "report"
        first = run_report(archive, report)
        again = run_report(archive, report)
        complete_one_more(archive)
        changed = run_report(archive, report)
        rows = [
            {"what": f"first build, {first['interviews']} interviews", "seconds": first["wall"],
             "build_s": first["seconds"], "written": len(first["written"]), "target": "seconds"},
            {"what": "rebuild, nothing changed", "seconds": again["wall"], "build_s": again["seconds"],
             "written": len(again["written"]), "target": "0 files"},
            {"what": "rebuild, one job completed", "seconds": changed["wall"], "build_s": changed["seconds"],
             "written": len(changed["written"]), "target": "2 files (its page, index)"},
        ]
        print(table(rows, COLUMNS))
        shots = screenshots(report, archive["demo_id"], Path(args.screenshots)) if args.screenshots else []
        write_results("report", {"interviews": args.interviews, "segments": args.segments, "rows": rows,
                                 "screenshots": shots}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
