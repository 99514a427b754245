"""What the benchmark scripts share: the machine, result files, tables, clean script environments,
generated media and synthetic transcripts.

Benchmarks are plain scripts (``.venv/bin/python benchmarks/NAME.py``), not part of the test run;
``tests/test_benchmarks_smoke.py`` runs each one in a tiny configuration so they do not rot. Each
prints a table on stdout and writes its figures as JSON to ``benchmarks/results/`` (ignored by git)
or to ``--out``. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SPEECH_FIXTURES = ROOT / "tests" / "fixtures" / "speech"

FAKE_OPENAI_KEY = "sk-bench-openai-0000"
FAKE_DEEPL_KEY = "bench-deepl-0000"


# -- the machine and the result file ---------------------------------------------------------
def machine() -> dict:
    """What the figures were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    memory = 0
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    import sqlite3
    return {"cpu": model or platform.processor(), "cores": len(os.sched_getaffinity(0)),
            "memory_gib": round(memory / 2**30, 1), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_results(name: str, data: dict, out: str | None = None) -> Path:
    """Write ``data`` plus where and how it was measured; return the path."""
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "command": " ".join([".venv/bin/python", f"benchmarks/{name}.py", *sys.argv[1:]]),
               "commit": git_commit(), "machine": machine(), **data}
    path = Path(out) if out else RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"results: {path}", file=sys.stderr)
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain text table; ``columns`` are (key, heading, format spec)."""
    cells = [[heading for _key, heading, _spec in columns]]
    for row in rows:
        line = []
        for key, _heading, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- running the real scripts ----------------------------------------------------------------
def script_env(**extra) -> dict:
    """A clean environment for a script under test: no inherited keys, no .env, fast retries off."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI_", "ELEVENLABS_", "DEEPL_", "MS_TRANSLATOR_", "VERBATIM_"))}
    env.update(VERBATIM_ENV_FILE=os.devnull, PYTHONPATH=str(ROOT))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class ScriptRun:
    """One run of a script as a subprocess: wall time, CPU (with its ffmpeg children), JSON result."""

    def __init__(self, args: list[str], env: dict, timeout: float = 1800.0, profile: str | None = None):
        self.args = [sys.executable, *args]
        if profile:  # sample the script with py-spy (what holds the GIL), folded stacks to ``profile``
            self.args = [shutil.which("py-spy") or "py-spy", "record", "--gil", "--rate", "250", "--format", "raw",
                         "--output", profile, "--", *self.args]
        self.env = env
        self.timeout = timeout
        self.started = self.ended = 0.0
        self.cpu = 0.0
        self.returncode = None
        self.stdout = self.stderr = ""

    def run(self) -> "ScriptRun":
        cpu = children_cpu()
        self.started = time.monotonic()
        result = subprocess.run(self.args, capture_output=True, text=True, env=self.env, cwd=ROOT,
                                timeout=self.timeout)
        self.ended = time.monotonic()
        self.cpu = children_cpu() - cpu
        self.returncode, self.stdout, self.stderr = result.returncode, result.stdout, result.stderr
        return self

    @property
    def wall(self) -> float:
        return self.ended - self.started

    def json(self) -> dict:
        try:
            return json.loads(self.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"no JSON from {' '.join(self.args[1:3])} (exit {self.returncode}):\n"
                               f"{self.stderr[-3000:]}") from None


# -- job store backends: SQLite and PostgreSQL side by side ------------------------------------
BACKENDS = ("sqlite", "postgresql")


def add_backend_arguments(parser) -> None:
    """``--backend`` and ``--db``, the same in every benchmark that measures the job store."""
    parser.add_argument("--backend", choices=(*BACKENDS, "both"),
                        help="job store(s) to measure (default: both when PostgreSQL can be reached: --db, or"
                             " its server binaries and psycopg here; else sqlite)")
    parser.add_argument("--db", metavar="URL",
                        help="an existing PostgreSQL server to measure on (postgresql://user@host/db); its user must"
                             " be allowed to CREATE DATABASE: each measurement gets a scratch database, dropped"
                             " afterwards. Without it a throw-away server is started (benchmarks/pgserver.py)")


def postgres_missing() -> str | None:
    """Why no throw-away PostgreSQL server can be started here, or None when one can."""
    import importlib.util
    if not all(importlib.util.find_spec(name) for name in ("psycopg", "psycopg_pool")):
        return "psycopg / psycopg-pool are not installed"
    from benchmarks.pgserver import find_binaries
    if find_binaries() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl, postgres; or set VERBATIM_PG_BIN)"
    return None


def chosen_backends(parser, args) -> list[str]:
    """The backends ``--backend`` asks for (its default: both when PostgreSQL can be reached);
    a usage error (exit 2) when PostgreSQL is asked for and cannot be."""
    if args.db and not args.db.startswith(("postgresql://", "postgres://")):
        parser.error("--db takes a postgresql:// URL (SQLite needs none: a scratch file is used)")
    missing = None if args.db else postgres_missing()
    if args.backend is None:
        if missing:
            log(f"PostgreSQL left out ({missing}): measuring SQLite only")
            return ["sqlite"]
        return list(BACKENDS)
    wanted = list(BACKENDS) if args.backend == "both" else [args.backend]
    if "postgresql" in wanted and missing:
        parser.error(f"--backend {args.backend}: {missing}; pass --db URL for an existing server")
    return wanted


class JobStores:
    """Empty job stores for one benchmark: a file in ``folder`` for SQLite; for PostgreSQL a scratch
    database on ``--db``'s server or on a throw-away one started at first need (durable settings:
    fsync and synchronous_commit on, as SQLite's ``synchronous=FULL``). ``close()`` drops them."""

    def __init__(self, folder: Path, db_url: str | None = None):
        self.folder, self.db_url = Path(folder), db_url
        self.server = None
        self._scratch: list[str] = []

    def __enter__(self) -> "JobStores":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def new(self, backend: str, name: str) -> str:
        """The target (path or URL) of a new, empty job store."""
        if backend == "sqlite":
            path = self.folder / f"{name}.db"
            for leftover in self.folder.glob(f"{name}.db*"):
                leftover.unlink()
            return str(path)
        database = f"verbatim_bench_{os.getpid()}_{len(self._scratch)}_{name}"
        self._admin(f'CREATE DATABASE "{database}"')
        self._scratch.append(database)
        return self._url(database)

    def server_version(self) -> str | None:
        if self.db_url is None and self.server is None:
            return None
        import psycopg
        with psycopg.connect(self._url(None), autocommit=True, connect_timeout=10) as conn:
            return conn.execute("SHOW server_version").fetchone()[0]

    def size(self, target: str) -> int:
        """Bytes the store takes: the SQLite file with its WAL; PostgreSQL's tables with their
        indexes and TOAST (not the empty database's catalogue)."""
        if not target.startswith(("postgresql://", "postgres://")):
            return sum(os.path.getsize(p) for p in Path(target).parent.glob(Path(target).name + "*"))
        import psycopg
        with psycopg.connect(target, autocommit=True, connect_timeout=10) as conn:
            return int(conn.execute(
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'"
            ).fetchone()[0])

    def close(self) -> None:
        for database in self._scratch:
            try:
                try:
                    self._admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                except Exception:  # noqa: BLE001 - a server before 13 has no FORCE; our stores are closed
                    self._admin(f'DROP DATABASE IF EXISTS "{database}"')
            except Exception as exc:  # noqa: BLE001 - tell, and go on dropping the others
                log(f"could not drop the scratch database {database}: {exc}")
        self._scratch = []
        if self.server is not None:
            self.server.close()
            self.server = None

    def _url(self, database: str | None) -> str:
        import urllib.parse
        if self.db_url is None:
            if self.server is None:
                from benchmarks import pgserver
                log("starting a throw-away PostgreSQL server ...")
                self.server = pgserver.start_server()
            base = self.server.url()
        else:
            base = self.db_url
        if database is None:
            return base
        return urllib.parse.urlunsplit(urllib.parse.urlsplit(base)._replace(path="/" + database))

    def _admin(self, sql: str) -> None:
        import psycopg
        with psycopg.connect(self._url(None), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)


# -- media -------------------------------------------------------------------------------------
_CODECS = {"wav": ["-c:a", "pcm_s16le"], "mp3": ["-c:a", "libmp3lame", "-b:a", "32k"],
           "ogg": ["-c:a", "libopus", "-b:a", "24k"], "m4a": ["-c:a", "aac", "-b:a", "32k"]}


def _ffmpeg(*args) -> None:
    from pipeline.audio import ffmpeg_path
    subprocess.run([ffmpeg_path(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                   check=True, stdin=subprocess.DEVNULL, timeout=1800)


def make_tone_files(folder: Path, count: int, formats=("wav", "mp3", "ogg"), seconds: float = 3.0) -> list[Path]:
    """``count`` distinct short speech-like files (a tone with a 4 Hz syllable rhythm and a pause),
    cycling through ``formats``; one ffmpeg call per format (the segment muxer cuts them)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, fmt in enumerate(formats):
        n = len(range(index, count, len(formats)))
        if not n:
            continue
        # Each piece has its own pitch (220 Hz + 7 Hz per piece) and the last 0.5 s is quiet.
        piece = f"(220+7*(floor(t/{seconds})*{len(formats)}+{index}))"
        expr = (f"0.4*sin(2*PI*{piece}*t)*(0.6+0.4*sin(2*PI*4*t))*lt(mod(t,{seconds}),{seconds - 0.5})")
        pattern = folder / f"{fmt}-%05d.{fmt}"
        _ffmpeg("-f", "lavfi", "-i", f"aevalsrc='{expr}':s=16000:d={n * seconds}", "-ac", "1",
                *_CODECS[fmt], "-f", "segment", "-segment_time", str(seconds), "-reset_timestamps", "1",
                str(pattern))
        made = sorted(folder.glob(f"{fmt}-*.{fmt}"))
        for extra in made[n:]:  # a rounding remnant of the segment muxer
            extra.unlink()
        paths += made[:n]
    return paths


def speech_pcm(seconds: float, rate: int = 16000) -> bytes:
    """About ``seconds`` of real speech as 16-bit mono PCM at ``rate``: the test suite's espeak-ng
    fixtures in turn with short pauses, else espeak-ng itself, else a speech-like synthetic signal."""
    import wave
    pieces = []
    for path in sorted(SPEECH_FIXTURES.glob("*.wav")) if SPEECH_FIXTURES.is_dir() else []:
        with wave.open(str(path), "rb") as source:
            if source.getnchannels() == 1 and source.getsampwidth() == 2 and source.getframerate() == rate:
                pieces.append(source.readframes(source.getnframes()))
    if not pieces:
        pieces = [_espeak_or_synthetic(rate)]
    pause = b"\0\0" * int(0.7 * rate)
    out, size, turn = [], 0, 0
    while size < seconds * rate * 2:
        piece = pieces[turn % len(pieces)] + pause
        out.append(piece)
        size += len(piece)
        turn += 1
    return b"".join(out)[: int(seconds * rate) * 2]


def _espeak_or_synthetic(rate: int) -> bytes:
    import shutil
    import tempfile
    import wave
    text = ("Wir wohnten in einem kleinen Dorf, und mein Vater war Lehrer. Im Winter gingen wir zusammen"
            " zur Schule, und die Geschichte meiner Großmutter habe ich nie vergessen.")
    with tempfile.TemporaryDirectory() as work:
        target = Path(work) / "speech.wav"
        if shutil.which("espeak-ng"):
            raw = Path(work) / "raw.wav"
            subprocess.run(["espeak-ng", "-v", "de", "-w", str(raw), text], check=True, timeout=60,
                           capture_output=True)
            _ffmpeg("-i", str(raw), "-ac", "1", "-ar", str(rate), "-c:a", "pcm_s16le", str(target))
        else:  # voiced "syllables": a pitch-varying tone with noise, at a speaking rhythm
            expr = ("(0.3*sin(2*PI*(140+30*sin(2*PI*0.7*t))*t)+0.05*(random(0)-0.5))"
                    "*gt(sin(2*PI*3.5*t),-0.3)")
            _ffmpeg("-f", "lavfi", "-i", f"aevalsrc='{expr}':s={rate}:d=20", "-ac", "1", "-c:a", "pcm_s16le",
                    str(target))
        with wave.open(str(target), "rb") as source:
            return source.readframes(source.getnframes())


def write_wav(path: Path, pcm: bytes, rate: int = 16000, channels: int = 1) -> Path:
    import wave
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)
    return path


# -- a database of completed transcripts (translation benchmarks) ------------------------------
def make_transcribed_archive(db_path: Path, output_dir: Path, count: int, *, languages=("en",),
                             segments: int = 6) -> int:
    """``count`` German transcripts written as the transcription side writes them, their
    transcription jobs completed; translation jobs for ``languages`` not started."""
    import hashlib

    import db_manager as dbm
    from pipeline.outputs import as_recorded, safe_join
    from benchmarks.fake_translate import make_transcript
    from transcription import Transcript, write_transcript_outputs

    db = dbm.DatabaseManager(str(db_path))
    try:
        records = [dbm.MediaRecord(f"/archive/interview-{n:05d}.mp3", hashlib.sha256(f"bench {n}".encode()).hexdigest(),
                                   1, 1, "audio") for n in range(count)]
        db.register_files(records, list(languages))
        owner = dbm.make_owner("bench")
        done = 0
        while True:
            jobs = db.claim(owner, dbm.TRANSCRIPTION, limit=500)
            if not jobs:
                break
            for job in jobs:
                seed = int(Path(job.media_path).stem.split("-")[1])
                doc = Transcript.from_dict(make_transcript(seed, "de", n_segments=segments))
                written = write_transcript_outputs(doc, safe_join(output_dir, job.folder), root=output_dir)
                db.complete(job, dbm.Outcome(as_recorded(written), provider="fake"))
                done += 1
        return done
    finally:
        db.close_all()
