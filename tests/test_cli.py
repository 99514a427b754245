"""Every script and tool answers --help with an example and exit 0; conventions hold."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT, script_env

SCRIPTS = ["parallel_transcription.py", "parallel_translation.py", "transcription.py", "translation.py"]
SCRIPTS += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tools").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_with_an_example(script):
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                            env=script_env(), cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "example" in result.stdout.lower()


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in ("transcription.py", "translation.py")])
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
