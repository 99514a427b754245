"""PostgreSQL for the tests: one real server for the session (``benchmarks.pgserver``), a fresh
database per test (``pg_url``). Without the server binaries the PostgreSQL tests are skipped,
saying why, unless ``VERBATIM_REQUIRE_POSTGRES`` is set (CI sets it): then they fail."""

import itertools
import os

import pytest

_names = itertools.count(1)


def _unavailable(reason: str):
    if os.environ.get("VERBATIM_REQUIRE_POSTGRES"):
        pytest.fail(f"PostgreSQL tests required (VERBATIM_REQUIRE_POSTGRES) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_server():
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        _unavailable("psycopg / psycopg-pool are not installed (pip install -r requirements.txt)")
    from benchmarks import pgserver

    try:
        # fsync off: the tests restart the server cleanly but never crash the machine under it.
        server = pgserver.start_server(settings={"fsync": "off", "synchronous_commit": "off",
                                                 "full_page_writes": "off"})
    except pgserver.ServerUnavailable as exc:
        _unavailable(str(exc))
    yield server
    server.close()


@pytest.fixture
def pg_url(pg_server):
    """A new, empty database on the session's server; dropped afterwards."""
    name = f"test_{os.getpid()}_{next(_names)}"
    url = pg_server.create_database(name)
    yield url
    try:
        pg_server.drop_database(name)
    except Exception:  # noqa: BLE001 - a test that stopped the server must not fail the next one here
        pass
