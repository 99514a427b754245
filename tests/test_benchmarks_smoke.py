"""The benchmark scripts in tiny configurations, so they do not rot: each runs, prints its table and
writes its JSON with the expected keys. Timing is not asserted (that is what the benchmarks are for)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, script_env

COMMON = {"benchmark", "when", "command", "commit", "machine", "rows"}


def run_benchmark(name, tmp_path, *args, timeout=120) -> dict:
    out = tmp_path / f"{name}.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args, "--out", str(out)],
                            capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=script_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "no table printed"
    data = json.loads(out.read_text())
    assert COMMON <= set(data) and data["benchmark"] == name and data["rows"]
    assert {"cpu", "cores", "python", "sqlite"} <= set(data["machine"])
    return data


def test_throughput(tmp_path):
    data = run_benchmark("throughput", tmp_path, "--files", "4", "--w1-files", "2", "--workers", "1", "2",
                         "--latency", "0.05", "--seconds", "1")
    assert [(r["script"], r["workers"]) for r in data["rows"]] == [
        ("transcription", 1), ("transcription", 2), ("translation", 1), ("translation", 2)]
    for row in data["rows"]:
        assert {"bound_s", "makespan_s", "files_per_minute", "efficiency", "startup_s", "tail_s",
                "efficiency_after_start", "cpu_ms_per_file", "peak_in_flight"} <= set(row)
        assert row["completed"] == row["files"] and row["failed"] == 0


def test_ratelimit(tmp_path):
    data = run_benchmark("ratelimit", tmp_path, "--jobs", "6", "--workers", "3", "--rate", "20", "--cap", "2",
                         "--latency", "0.05")
    assert {(r["limit"], r["shape"], r["configured"]) for r in data["rows"]} == {
        ("rate", "bucket", "no"), ("rate", "bucket", "yes"), ("rate", "window", "no"), ("rate", "window", "yes"),
        ("concurrency", "-", "no"), ("concurrency", "-", "yes")}
    for row in data["rows"]:
        assert {"bound_per_s", "completed_per_s", "efficiency", "responses_429_per_job", "failed"} <= set(row)
        assert row["completed"] == 6 and row["failed"] == 0


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_args(request) -> list[str]:
    """``--backend`` for a store benchmark; PostgreSQL on the tests' server (scratch databases there)."""
    if request.param == "sqlite":
        return ["--backend", "sqlite"]
    return ["--backend", "postgresql", "--db", request.getfixturevalue("pg_server").url()]


def scratch_databases(server) -> list[str]:
    import psycopg

    with psycopg.connect(server.url(), autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'verbatim_bench_%'")]


def test_overhead(tmp_path, backend_args):
    data = run_benchmark("overhead", tmp_path, "--jobs", "200", "--threads", "4", "--processes", "1", "2",
                         "--raw", "50", *backend_args)
    backend = backend_args[1]
    runs = [r for r in data["rows"] if r["what"].startswith("claim")]
    assert [(r["backend"], r["processes"], r["threads"], r["count"]) for r in runs] == [
        (backend, 1, 4, 200), (backend, 2, 4, 200)]
    assert all(r["per_second"] > 0 for r in runs)
    # What the store was measured with, as the server reports it (the tests' server runs without fsync).
    assert runs[0]["durability"] == ("synchronous=FULL" if backend == "sqlite" else "fsync=off, synchronous_commit=off")
    assert {r["backend"] for r in data["rows"] if r["what"].startswith("raw commits")} == {backend}


def test_scale(tmp_path, backend_args):
    data = run_benchmark("scale", tmp_path, "--files", "400", "--claims", "5", *backend_args)
    backend = backend_args[1]
    assert list(data["backends"]) == [backend] and {r["backend"] for r in data["rows"]} == {backend}
    figures = data["backends"][backend]
    assert figures["registered_files"] == 400 and figures["jobs"] == 1600 and figures["rescan_unchanged"] == 400
    for key in ("register_seconds", "status_seconds", "claim_1_p50_ms", "claim_1_p99_ms", "claim_20_p50_ms",
                "claim_translation_p99_ms", "database_bytes_per_file"):
        assert figures[key] >= 0, key
    assert (data["postgresql"] is None) == (backend == "sqlite")


def test_store_benchmarks_leave_no_scratch_database(tmp_path, pg_server):
    run_benchmark("scale", tmp_path, "--files", "80", "--claims", "2", "--backend", "postgresql",
                  "--db", pg_server.url())
    assert scratch_databases(pg_server) == []


def test_scale_starts_a_throw_away_server_without_db(tmp_path, pg_server):
    # pg_server only says whether PostgreSQL's binaries are here (else skip); the benchmark starts its own.
    data = run_benchmark("scale", tmp_path, "--files", "80", "--claims", "2", "--backend", "both")
    assert list(data["backends"]) == ["sqlite", "postgresql"] and data["postgresql"]
    assert data["backends"]["postgresql"]["jobs"] == data["backends"]["sqlite"]["jobs"] == 320


def test_store_benchmark_refuses_a_sqlite_db(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--db", str(tmp_path / "x.db")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env=script_env())
    assert result.returncode == 2 and "postgresql://" in result.stderr


@pytest.mark.timeout(180)
def test_upload(tmp_path):
    data = run_benchmark("upload", tmp_path, "--seconds", "20")
    assert [r["sent_as"] for r in data["rows"]] == [".ogg", ".ogg"]
    assert all(r["sent_bytes"] > 0 and r["original_bytes"] > r["sent_bytes"] for r in data["rows"])


def test_run_all_summarizes_against_the_targets(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--only", "overhead", "scale",
                             "--smoke", "--backend", "sqlite", "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env=script_env())
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["benchmark"] for r in summary["rows"]} == {"overhead, sqlite", "scale, sqlite"}
    assert all({"what", "target", "measured", "met"} <= set(r) for r in summary["rows"])


def test_report(tmp_path):
    data = run_benchmark("report", tmp_path, "--interviews", "6", "--segments", "4")
    first, unchanged, one_more = data["rows"]
    assert first["written"] == 6 + 3  # six pages, the index, two assets
    assert unchanged["written"] == 0 and one_more["written"] == 2
