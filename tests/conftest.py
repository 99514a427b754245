import os
from pathlib import Path

import pytest

# The repository root: pytest puts it on sys.path (``pythonpath`` in pyproject.toml); a script run
# as a subprocess gets it first in PYTHONPATH (``script_env``), so this checkout's code is what runs
# even where another checkout is installed.
ROOT = Path(__file__).resolve().parent.parent

# Tests never read the developer's .env or real keys, and retry backoff is shrunk to ~0.
for _name in list(os.environ):
    if _name.startswith(("OPENAI_", "ELEVENLABS_", "DEEPL_", "MS_TRANSLATOR_", "VERBATIM_")):
        del os.environ[_name]
os.environ["VERBATIM_ENV_FILE"] = os.devnull
os.environ["HF_HUB_OFFLINE"] = "1"  # the local engine never reaches for a model hub in tests
os.environ["VERBATIM_RETRY_BASE_SECONDS"] = "0.01"
os.environ["VERBATIM_RETRY_CAP_SECONDS"] = "0.05"
# In-process runs: a runner built without Settings uses the defaults, shrunk the same way.
from pipeline import errors as _errors  # noqa: E402

_errors.RETRY_BASE_SECONDS, _errors.RETRY_CAP_SECONDS = 0.01, 0.05

from tests.pg import pg_server, pg_url  # noqa: E402,F401 (fixtures: a real PostgreSQL server, a database per test)


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "jobs.db")


@pytest.fixture
def db(db_path):
    from db_manager import DatabaseManager

    manager = DatabaseManager(db_path)
    yield manager
    manager.close_all()


def script_env(**extra) -> dict:
    """Environment for running a script as a subprocess: no inherited keys, fast retries, and this
    checkout first on the import path."""
    env = {k: v for k, v in os.environ.items()}
    env.update({k: str(v) for k, v in extra.items()})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def recorded_file(root, info: dict):
    """The file a recorded output (``{"path", ...}``, relative to the output root) names under ``root``."""
    from pipeline.outputs import resolve_recorded

    return resolve_recorded(root, info["path"])
