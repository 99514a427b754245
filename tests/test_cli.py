"""Every script and tool answers --help with an example and exit 0; conventions hold."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT, script_env

SCRIPTS = ["parallel_transcription.py", "parallel_translation.py", "transcription.py", "translation.py"]
SCRIPTS += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tools").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_with_an_example(script):
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                            env=script_env(), cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "example" in result.stdout.lower()


# migrate_db.py names both of its job stores (FROM TO) and writes no outputs: no --db, no --output-dir.
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in ("transcription.py", "translation.py",
                                                                     "tools/migrate_db.py")])
def test_common_options_everywhere(script):
    text = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                          env=script_env(), cwd=ROOT, timeout=60).stdout
    for option in ("--db", "--output-dir", "--json"):
        assert option in text, f"{script} lacks {option}"


def test_bad_usage_exits_two(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "parallel_transcription.py"), "--workers", "0"],
                            capture_output=True, text=True, env=script_env(), cwd=tmp_path, timeout=60)
    assert result.returncode == 2


def test_no_provider_configured_is_a_configuration_error(tmp_path):
    media = tmp_path / "a.wav"
    media.write_bytes(b"RIFF")
    result = subprocess.run([sys.executable, str(ROOT / "parallel_transcription.py"), "--input", str(media),
                             "--db", str(tmp_path / "x.db")],
                            capture_output=True, text=True, env=script_env(), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "OPENAI_API_KEY" in result.stderr


def test_status_reads_an_existing_database_only(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools/status.py"), "--db", str(tmp_path / "none.db")],
                            capture_output=True, text=True, env=script_env(), cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "no database" in result.stderr
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("tool", ["tools/status.py --files", "tools/check_missing_transcripts.py"])
def test_a_closed_pipe_ends_quietly(tmp_path, tool):
    """``tool | head -1``: the reader leaves after one line; the tool stops without a traceback."""
    import hashlib

    import db_manager as dbm

    db = dbm.DatabaseManager(str(tmp_path / "jobs.db"))
    db.register_files([dbm.MediaRecord(f"/archive/interview-{n:04d}.wav", hashlib.sha256(b"%d" % n).hexdigest(),
                                       1, 1, "audio") for n in range(3000)], ["en"])
    db.close_all()
    script, *options = tool.split()
    writer = subprocess.Popen([sys.executable, str(ROOT / script), *options, "--db", str(tmp_path / "jobs.db"),
                               "--output-dir", str(tmp_path / "out")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=script_env(), cwd=tmp_path)
    head = subprocess.Popen(["head", "-1"], stdin=writer.stdout, stdout=subprocess.PIPE)
    writer.stdout.close()  # only head holds the reading end now
    first_line = head.communicate(timeout=60)[0]
    stderr = writer.communicate(timeout=60)[1].decode()
    assert first_line.strip()
    assert writer.returncode == 141, stderr   # 128 + SIGPIPE, as a shell reports a tool the pipe closed on
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr


@pytest.mark.parametrize("args", [
    ["transcription.py", "{missing}"],
    ["translation.py", "{missing}", "--to", "he"],
    ["parallel_transcription.py", "--input", "{missing}", "--db", "{db}"],
    ["parallel_transcription.py", "--input", "{present}", "--input", "{missing}", "--db", "{db}"],
    ["tools/add_media.py", "{missing}", "--db", "{db}"],
    ["tools/add_media.py", "{present}", "{missing}", "--db", "{db}"],
])
def test_a_missing_input_is_a_usage_error_that_creates_nothing(tmp_path, args):
    (tmp_path / "present.wav").write_bytes(b"RIFF")
    values = {"missing": str(tmp_path / "missing.wav"), "present": str(tmp_path / "present.wav"),
              "db": str(tmp_path / "jobs.db")}
    script, *rest = [arg.format(**values) for arg in args]
    result = subprocess.run([sys.executable, str(ROOT / script), *rest], capture_output=True, text=True,
                            env=script_env(OPENAI_API_KEY="sk-test-a1b2c3"), cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "missing.wav" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "jobs.db").exists()


def test_a_missing_setting_says_which_env_file_was_read(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    settings = tmp_path / "archive.env"
    settings.write_text("VERBATIM_OUTPUT_DIR=out\n")
    cmd = [sys.executable, str(ROOT / "parallel_transcription.py"), "--input", str(tmp_path / "a.wav"),
           "--provider", "openai", "--db", str(tmp_path / "x.db")]
    read = subprocess.run(cmd + ["--env-file", str(settings)], capture_output=True, text=True, env=script_env(),
                          cwd=tmp_path, timeout=60)
    assert read.returncode == 2 and "OPENAI_API_KEY" in read.stderr
    assert f"settings read from {settings}" in read.stderr

    env = script_env()
    del env["VERBATIM_ENV_FILE"]
    none = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert none.returncode == 2 and "OPENAI_API_KEY" in none.stderr
    assert f"no .env was read ({tmp_path / '.env'} does not exist)" in none.stderr

    one_file = subprocess.run([sys.executable, str(ROOT / "transcription.py"), str(tmp_path / "a.wav"), "--provider",
                               "openai", "--env-file", str(settings)], capture_output=True, text=True,
                              env=script_env(), cwd=tmp_path, timeout=60)
    assert one_file.returncode == 2 and f"settings read from {settings}" in one_file.stderr


def test_the_product_imports_neither_tests_nor_benchmarks():
    """Fakes and test code stay out of verbatim's runtime: every module of the scripts, pipeline and
    tools imports with ``tests`` and ``benchmarks`` unimportable."""
    modules = ["db_manager", "transcription", "translation", "local_whisper", "parallel_transcription",
               "parallel_translation"]
    modules += [f"pipeline.{p.stem}" for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__"]
    modules += ["pipeline.report"]
    modules += [f"tools.{p.stem}" for p in (ROOT / "tools").glob("*.py") if p.stem != "__init__"]
    code = ("import importlib, sys; sys.modules['tests'] = sys.modules['benchmarks'] = None; "
            "[importlib.import_module(m) for m in sys.argv[1:]]")
    result = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True,
                            env=script_env(), cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_database_that_stays_unavailable_outside_a_run_is_exit_2_in_one_line(capsys):
    """Before or after the runs (registering, the status count) there is no patience to wait in:
    a store that says "unavailable" is a fault of the machine, not a traceback."""
    import db_manager as dbm
    from pipeline.config import run_main

    def main(argv):
        raise dbm.DatabaseUnavailable("database unavailable: connection to server at 127.0.0.1 refused")

    with pytest.raises(SystemExit) as ended:
        run_main(main)
    assert ended.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: the job database is unavailable: database unavailable: connection to server at 127.0.0.1 refused"]
