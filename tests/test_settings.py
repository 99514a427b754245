"""Configuration validated once, then passed (style item 16): pipeline.settings builds one frozen
Settings from the command line, the environment and the .env file; nothing below the entry points
reads the process environment; the stages (pipeline.stages) own each job kind's wiring."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from benchmarks import mediagen
from tests.conftest import ROOT, script_env

# Library modules: none of them may read the process environment. The entry points (scripts,
# tools, the standalone CLIs' main()) build a Settings instead and pass what is needed down.
LIBRARY = ["db_manager.py", "transcription.py", "translation.py", "local_whisper.py",
           *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").rglob("*.py"))]
# pipeline/settings.py is where the environment is read; pipeline/config.py loads .env into it;
# pipeline/faults.py's VERBATIM_CRASH_AT is a test hook armed at import (see its comment).
ALLOWED = {"pipeline/settings.py", "pipeline/config.py", "pipeline/faults.py"}


def test_nothing_below_the_entry_points_reads_the_environment():
    found = []
    for name in LIBRARY:
        if name in ALLOWED:
            continue
        for number, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"os\.environ|os\.getenv|getenv\(", line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_config_reads_the_environment_only_to_load_the_env_file():
    source = (ROOT / "pipeline" / "config.py").read_text(encoding="utf-8")
    functions = re.split(r"\ndef ", source)
    readers = [f.split("(")[0] for f in functions[1:] if "os.environ" in f]
    assert readers == ["load_env"]


@pytest.mark.parametrize("script, args, env", [
    ("transcription.py", ["{media}", "--provider", "openai"], 
     {"OPENAI_API_KEY": "sk-test-a1b2c3", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}),
    ("translation.py", ["{transcript}", "--to", "en", "--provider", "deepl"],
     {"DEEPL_API_KEY": "abcdef:fx", "DEEPL_BASE_URL": "http://127.0.0.1:9"}),
])
@pytest.mark.parametrize("name, value", [("VERBATIM_REQUEST_TIMEOUT", "soon"), ("VERBATIM_REQUEST_TIMEOUT", "-3"),
                                         ("VERBATIM_RETRY_BASE_SECONDS", "fast")])
def test_a_setting_that_is_not_a_positive_number_is_a_configuration_error(script, args, env, name, value, tmp_path):
    media = tmp_path / "tone.wav"
    mediagen.make_tone(media, seconds=1.0)
    transcript = tmp_path / "transcript.txt"
    transcript.write_text("Ich wohnte in der Stadt.\n", encoding="utf-8")
    argv = [a.format(media=media, transcript=transcript) for a in args]
    result = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True,
                            timeout=60, env=script_env(**env, **{name: value}))
    assert result.returncode == 2, result.stderr
    assert name in result.stderr and "Traceback" not in result.stderr


# -- the settings object ------------------------------------------------------------------------------
def _args(**values):
    base = dict(db=None, output_dir=None, env_file=None, verbose=False)
    return argparse.Namespace(**{**base, **values})


def test_precedence_command_line_then_environment_then_env_file_then_defaults(tmp_path):
    from pipeline.settings import Settings

    env_file = tmp_path / "s.env"
    env_file.write_text("VERBATIM_DB=from-file.db\nVERBATIM_OUTPUT_DIR=file-out\nVERBATIM_REQUEST_TIMEOUT=7\n")
    environ = {"VERBATIM_OUTPUT_DIR": "env-out"}
    settings = Settings.load(_args(env_file=str(env_file)), environ=environ)
    assert (settings.db, settings.output_dir, settings.request_timeout) == ("from-file.db", "env-out", 7.0)
    settings = Settings.load(_args(env_file=str(env_file), db="cli.db", output_dir="cli-out"), environ=environ)
    assert (settings.db, settings.output_dir) == ("cli.db", "cli-out")
    settings = Settings.load(_args(), environ={"VERBATIM_ENV_FILE": str(tmp_path / "none.env")})
    assert (settings.db, settings.output_dir, settings.request_timeout) == ("verbatim.db", "output", None)
    assert settings.target_languages == ("en", "de", "he") and settings.expected_languages is None
    assert environ == {"VERBATIM_OUTPUT_DIR": "env-out"}  # a given environment is read, never written


def test_settings_are_frozen_and_their_environment_a_read_only_snapshot():
    from pipeline.settings import Settings

    environ = {"OPENAI_API_KEY": "sk-test-a1b2c3"}
    settings = Settings.load(_args(), environ=environ)
    environ["OPENAI_API_KEY"] = "changed"
    assert settings.env["OPENAI_API_KEY"] == "sk-test-a1b2c3"
    with pytest.raises(TypeError):
        settings.env["OPENAI_API_KEY"] = "x"
    with pytest.raises(AttributeError):
        settings.db = "other.db"


def test_languages_are_normalised_once():
    from pipeline.settings import Settings

    settings = Settings.load(_args(), environ={"VERBATIM_TARGET_LANGUAGES": "EN, He", "VERBATIM_LANGUAGES": "DE en"})
    assert settings.target_languages == ("en", "he") and settings.expected_languages == ("de", "en")
    assert Settings.load(_args(), environ={}, target_languages=["DE", "de", "HE"]).target_languages == ("de", "he")


def test_one_language_table_reads_every_spelling():
    """Codes in any case, regional tags, English names and the providers' ISO 639-2 codes all
    become one ISO 639-1 code, whether a user typed them or a provider answered them."""
    from pipeline.config import parse_languages
    from pipeline.languages import language_code, reported_language
    from pipeline.settings import Settings

    assert parse_languages(["DE", "de-AT", "German", "he_IL", "Hebrew"]) == ["de", "he"]
    assert Settings.load(_args(), environ={"VERBATIM_TARGET_LANGUAGES": "English"}).target_languages == ("en",)
    assert [language_code(v) for v in ("deu", "ger", "heb", "fre", "Yiddish", "xx", "", None)] == \
        ["de", "de", "he", "fr", "yi", None, None, None]
    # What a provider heard in a language we do not handle is kept as it said it, not dropped.
    assert [reported_language(v) for v in ("german", "DEU", "Swedish", "", None)] == ["de", "de", "swedish", None, None]


@pytest.mark.parametrize("name, value, message", [
    ("VERBATIM_REQUEST_TIMEOUT", "0", "VERBATIM_REQUEST_TIMEOUT must be a positive number"),
    ("VERBATIM_RETRY_CAP_SECONDS", "x", "VERBATIM_RETRY_CAP_SECONDS must be a positive number"),
    ("VERBATIM_OPENAI_RPM", "lots", "VERBATIM_OPENAI_RPM must be a positive number"),
    ("VERBATIM_DEEPL_MAX_CONCURRENCY", "2.5", "VERBATIM_DEEPL_MAX_CONCURRENCY must be a positive number (a whole number of at least 1)"),
    ("VERBATIM_LOCAL_MAX_CONCURRENCY", "0", "VERBATIM_LOCAL_MAX_CONCURRENCY must be a positive number (a whole number of at least 1)"),
    ("VERBATIM_MAX_RESPONSE_BYTES", "big", "VERBATIM_MAX_RESPONSE_BYTES must be a positive number (a whole number of at least 1)"),
    ("VERBATIM_TARGET_LANGUAGES", "en xx", "unsupported language code 'xx'"),
    ("DEEPL_API_KEY", "\u201cabc\u201d", "DEEPL_API_KEY contains a typographic quote"),
])
def test_a_bad_setting_is_refused_naming_it(name, value, message):
    from pipeline.config import ConfigError
    from pipeline.settings import Settings

    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.load(_args(), environ={name: value})


def test_limiter_settings_per_provider():
    from pipeline.settings import Settings

    settings = Settings.load(_args(), environ={"VERBATIM_OPENAI_MAX_CONCURRENCY": "3", "VERBATIM_OPENAI_RPM": "50",
                                               "VERBATIM_RATE_LIMIT_PATIENCE": "9"})
    openai = settings.limits("openai")
    assert (openai.max_concurrency, openai.rpm, openai.patience) == (3, 50.0, 9.0)
    assert settings.limits("deepl").max_concurrency is None
    assert settings.limits("local", cap=2).max_concurrency == 2  # an engine's own parallelism is the cap


# -- the stages ---------------------------------------------------------------------------------------
def test_stages_import_no_script():
    source = (ROOT / "pipeline" / "stages.py").read_text(encoding="utf-8")
    assert not re.search(r"^\s*(from|import) (parallel_|tools)", source, re.M)


def test_the_translation_stage_gives_translators_the_request_timeout(monkeypatch):
    from pipeline import limiter as limiter_module
    from pipeline.settings import Settings
    from pipeline.stages import TranslationStage

    monkeypatch.setattr(limiter_module, "_registry", {})
    settings = Settings.load(_args(), environ={"DEEPL_API_KEY": "abcdef:fx", "VERBATIM_REQUEST_TIMEOUT": "4",
                                               "VERBATIM_DEEPL_MAX_CONCURRENCY": "3"})
    stage = TranslationStage(settings, ["HE"])
    translator = stage.translators()["he"]
    assert stage.languages == ["he"] and translator.name == "deepl" and translator.timeout == 4.0
    assert stage.limiter(translator).max_concurrency == 3
