#!/usr/bin/env python3
"""Upload volume: bytes sent to the speech-to-text API per hour of speech, against the original size.

Two sources of the same speech (the test suite's espeak-ng recordings in turn, with pauses; else
espeak-ng itself; else a speech-like synthetic signal), as archives hold them:

- WAV: 44.1 kHz stereo 16-bit PCM, what a recorder or a digitised tape gives;
- MP4: a small H.264 video with the speech as 128 kbit/s stereo AAC, what a camcorder gives.

The real ``parallel_transcription.py`` sends each to the lean fake API, which counts the request
bodies it receives (multipart framing included). Reported per hour of speech: original size,
bytes sent, and what was sent (file type, number of requests). Target <= 15 MB (10^6 bytes) per
hour of speech.

Example:
    .venv/bin/python benchmarks/upload.py                  # 10 minutes of speech, about 30 s
    .venv/bin/python benchmarks/upload.py --seconds 3600   # a whole hour
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    ROOT,
    ScriptRun,
    _ffmpeg,
    log,
    script_env,
    speech_pcm,
    table,
    write_results,
    write_wav,
)
from benchmarks.fakeapi import FakeAPI

COLUMNS = [("source", "source", ""), ("seconds", "speech s", ",.0f"), ("original_mb_per_hour", "original MB/h", ",.1f"),
           ("sent_mb_per_hour", "sent MB/h", ",.2f"), ("sent_share", "sent ÷ original", ".3f"),
           ("sent_as", "sent as", ""), ("requests", "requests", "d"), ("target", "target", "")]


def make_sources(folder: Path, seconds: float) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    mono = write_wav(folder / "speech-16k-mono.wav", speech_pcm(seconds))
    wav = folder / "interview.wav"
    _ffmpeg("-i", str(mono), "-ar", "44100", "-ac", "2", "-c:a", "pcm_s16le", str(wav))
    mp4 = folder / "interview.mp4"
    _ffmpeg("-f", "lavfi", "-i", f"testsrc=size=320x240:rate=10:duration={seconds}", "-i", str(mono),
            "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-b:a", "128k", "-ar", "44100", "-ac", "2",
            "-shortest", str(mp4))
    mono.unlink()
    return {"WAV (44.1 kHz stereo PCM)": wav, "MP4 (H.264 + 128 kbit/s AAC)": mp4}


def measure(api: FakeAPI, work: Path, name: str, path: Path, seconds: float) -> dict:
    folder = work / f"run-{path.suffix[1:]}"
    folder.mkdir()
    api.reset(latency=0.0)
    run = ScriptRun([str(ROOT / "parallel_transcription.py"), "--input", str(path), "--db", str(folder / "jobs.db"),
                     "--output-dir", str(folder / "out"), "--quiet", "--json"], script_env(**api.openai_env())).run()
    summary = run.json()["runs"][0]
    if summary["completed"] != 1:
        raise RuntimeError(f"{name}: not transcribed: {run.stderr[-2000:]}")
    sent = sum(size for size, _name in api.stats.uploads)
    kinds = sorted({os.path.splitext(upload_name)[1] for _size, upload_name in api.stats.uploads})
    per_hour = 3600.0 / seconds
    original = path.stat().st_size
    return {"source": name, "seconds": round(seconds, 1), "original_bytes": original,
            "original_mb_per_hour": round(original * per_hour / 1e6, 2), "sent_bytes": sent,
            "sent_mb_per_hour": round(sent * per_hour / 1e6, 3), "sent_share": round(sent / original, 4),
            "sent_as": ",".join(kinds), "requests": len(api.stats.uploads), "target": "<= 15 MB/h"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="speech per source (default 600)")
    parser.add_argument("--out", help="JSON result path (default: benchmarks/results/upload-<time>.json)")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="verbatim-upload-") as tmp, FakeAPI() as api:
        work = Path(tmp)
        log(f"making {args.seconds:.0f} s of speech as WAV and MP4 ...")
        for name, path in make_sources(work / "media", args.seconds).items():
            log(f"{name} ...")
            rows.append(measure(api, work, name, path, args.seconds))
    print(table(rows, COLUMNS))
    write_results("upload", {"seconds": args.seconds, "target": {"sent_mb_per_hour": 15}, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
