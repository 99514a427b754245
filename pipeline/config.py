"""Settings, ``.env`` loading, logging and the command-line conventions every script shares.

Configuration comes from the process environment and an explicit ``.env`` file (``--env-file``,
default ``./.env``), loaded with python-dotenv *without* overriding variables already set and
without searching parent folders. Every value that looks like a key is registered with
``pipeline.errors.register_secret`` so logs, stored errors and JSON output never contain it.

Logging is configured here, for scripts only; library modules just call ``logging.getLogger``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sqlite3
import sys

from dotenv import dotenv_values

from pipeline.errors import ConfigError, redact, register_secret, register_url_credentials  # noqa: F401 (ConfigError: re-exported for the scripts)
from pipeline.languages import SUPPORTED_LANGUAGES, language_code

EXIT_OK = 0
EXIT_FAILED = 1            # the run finished but some jobs failed
EXIT_USAGE = 2             # usage or configuration error, or an account-level provider error
EXIT_WORK_LEFT = 3         # nothing failed, but translations wait for transcripts not done yet
EXIT_INTERRUPTED = 130     # Ctrl-C / SIGTERM
EXIT_CLOSED_PIPE = 141     # stdout's reader left (``| head``): 128 + SIGPIPE, what a shell reports for it

DEFAULT_DB = "verbatim.db"
DEFAULT_OUTPUT_DIR = "output"
DEFAULT_TARGET_LANGUAGES = ("en", "de", "he")

_SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


# Which settings file load_env looked for, and whether it was read: an error about a missing
# setting says so (``env_note``), since a key "set in .env" is often set in another .env.
_env_file: dict = {"path": None, "read": False}


def env_note() -> str:
    """`` (settings read from PATH)`` or `` (no .env was read (PATH does not exist))``; empty
    before ``load_env``."""
    path = _env_file["path"]
    if path is None:
        return ""
    if _env_file["read"]:
        return f" (settings read from {path})"
    return f" (no .env was read ({path} does not exist))"


def with_env_note(message: str) -> str:
    """``message`` plus which .env was read, when it is about a setting (a key, a provider, a
    VERBATIM_ variable, .env): the usual cause is a key set in a file that was not the one read."""
    if re.search(r"\bset\b|\.env|VERBATIM_|API key", message):
        return message + env_note()
    return message


def env_file_path(env_file: str | None, environ) -> str:
    """The settings file to read: ``--env-file``, else ``$VERBATIM_ENV_FILE``, else ``./.env``."""
    return env_file or environ.get("VERBATIM_ENV_FILE") or ".env"


def merged_env(env_file: str | None, environ) -> dict:
    """``environ`` with the settings file's values added where a variable is not set (the file
    never overrides the environment), every key-like value registered for redaction."""
    path = env_file_path(env_file, environ)
    if env_file and not os.path.isfile(env_file):
        raise ConfigError(f"--env-file {env_file}: no such file")
    _env_file.update(path=os.path.abspath(path), read=os.path.isfile(path))
    merged = dict(environ)
    if os.path.isfile(path):
        for key, value in dotenv_values(path, interpolate=False).items():
            if value is not None and key not in merged:
                merged[key] = value
    for key, value in merged.items():
        name = key.upper()
        if name.endswith(tuple("_" + marker for marker in _SECRET_MARKERS)):
            register_secret(value)  # a key is a key whatever its length
        elif any(marker in name for marker in _SECRET_MARKERS) and len(value) >= 6:
            register_secret(value)  # KEYTIMEOUT=1 must not redact every "1"
        register_url_credentials(value)  # a proxy password in a base URL
    return merged


def load_env(env_file: str | None = None) -> os._Environ:
    """Load ``env_file`` (or ``./.env``) into ``os.environ`` without overriding what is set: the
    one place the process environment is written. ``pipeline.settings.Settings.load`` calls it
    and takes its snapshot; nothing else reads the environment."""
    for key, value in merged_env(env_file, os.environ).items():
        if key not in os.environ:
            os.environ[key] = value
    return os.environ


_CHARACTER_NAMES = {" ": "a space", "\t": "a tab", "\n": "a line break", "\r": "a carriage return",
                    "\u201c": "a typographic quote", "\u201d": "a typographic quote", "\u2018": "a typographic quote",
                    "\u2019": "a typographic quote", "\u00a0": "a non-breaking space", "\ufeff": "a byte-order mark"}


def check_header_value(name: str, value: str) -> None:
    """Refuse a key that cannot travel in an HTTP header (printable ASCII, no spaces), naming the
    variable and never the key: pasted with quotes, a space or a line break, it would fail every
    request of the run instead of the run's start."""
    for position, char in enumerate(value, 1):
        if not "!" <= char <= "~":
            what = _CHARACTER_NAMES.get(char, f"the character U+{ord(char):04X}")
            raise ConfigError(f"{name} contains {what} at position {position} of {len(value)}: an API key is"
                              " printable ASCII without spaces; set it again as the provider shows it")


def positive_int(name: str, value) -> int:
    """``value`` as a whole number of at least 1, else a ConfigError naming ``name`` (a setting
    or an option)."""
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{name} must be a positive number (a whole number of at least 1), not {value!r}")
    return int(text)


def positive_argument(text: str) -> int:
    """An argparse ``type`` for options such as ``--workers N``: a whole number of at least 1."""
    try:
        return positive_int("the value", text)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}") from None


def positive_float(name: str, value) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = -1.0
    if not number > 0 or number == float("inf"):
        raise ConfigError(f"{name} must be a positive number, not {value!r}")
    return number


def parse_languages(codes) -> list[str]:
    result = []
    for text in codes:
        if not text.strip():
            continue
        code = language_code(text)
        if code is None:
            raise ConfigError(f"unsupported language code {text.strip()!r}; "
                              f"choose from {', '.join(sorted(SUPPORTED_LANGUAGES))}")
        if code not in result:
            result.append(code)
    return result


class RedactingFilter(logging.Filter):
    """Replaces every registered secret in every log record, whatever logger emitted it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class _ProgressAwareHandler(logging.StreamHandler):
    """Writes log lines above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Logs go to stderr; results go to stdout. Call from scripts only, with ``Settings.debug``
    (``-v`` or ``VERBATIM_DEBUG``) as ``verbose``."""
    level = logging.DEBUG if verbose else (
        logging.WARNING if quiet else logging.INFO)
    handler = _ProgressAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if level > logging.DEBUG:  # third-party chatter only when asked for
        for name in ("httpx", "httpcore", "httpx2", "httpcore2", "urllib3", "openai", "faster_whisper"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # The pool warns at each failed reconnect (a dozen lines in a 10 s outage); the runner
        # already says once that it waits for the database, and -v shows the pool's own account.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", metavar="PATH|URL",
                        help=f"job database: a SQLite file, or postgresql://user@host/dbname shared by several"
                             f" machines (default: $VERBATIM_DB or ./{DEFAULT_DB})")
    parser.add_argument("--output-dir", metavar="PATH",
                        help=f"output root (default: $VERBATIM_OUTPUT_DIR or ./{DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--env-file", metavar="PATH", help="settings file to load (default: ./.env)")
    parser.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")


def make_parser(prog_doc: str, example: str) -> argparse.ArgumentParser:
    """A parser whose --help ends with an example, as every verbatim script's does."""
    return argparse.ArgumentParser(
        description=prog_doc, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter)


def open_db(path: str, *, must_exist: bool = False, read_only: bool = False,
            connections: int | None = None):
    """Open the job store (``db_manager.open_job_store``: a SQLite path, or a ``postgresql://`` URL
    shared by several machines); a read-only tool refuses to create an empty database by mistake,
    and opens it ``read_only`` (then a copied archive or a read-only mount works too). A run says
    how many ``connections`` its threads use at once (``runner.connections_needed``): PostgreSQL's
    pool is that size (SQLite needs no pool)."""
    from db_manager import DatabaseError, is_postgres_url, open_job_store, sqlite_path

    postgres = is_postgres_url(path)
    options = {"pool_size": connections} if postgres and connections else {}
    if postgres:
        register_url_credentials(path)  # the URL's password never reaches a message
    elif (must_exist or read_only) and not os.path.exists(sqlite_path(path)):
        raise ConfigError(f"no database at {path}: register media first "
                          "(tools/add_media.py PATH or parallel_transcription.py --input PATH), or pass --db")
    try:
        return open_job_store(path, read_only=read_only, **options)
    except DatabaseError as exc:
        raise ConfigError(str(exc)) from exc
    except ImportError as exc:  # psycopg is not installed
        raise ConfigError(f"--db {redact(path)} needs PostgreSQL support: pip install -r requirements.txt ({exc})") from exc
    except Exception as exc:  # sqlite3 errors: not a database, unreadable, locked folder; a server that does not answer
        raise ConfigError(f"cannot open database {redact(path)}: {redact(str(exc))}") from exc


def run_main(main) -> None:
    """Run a script's ``main(argv)`` with the shared exit-code conventions.

    A closed stdout (``tool | head``) ends the script quietly with ``EXIT_CLOSED_PIPE`` (141, as a
    shell reports a program the pipe closed on, so ``set -o pipefail`` still sees the output was cut
    short): no traceback. stdout is pointed at /dev/null so the interpreter's final flush cannot
    fail again. Whatever the script did before it wrote (a completed job) stays done."""
    try:
        try:
            code = main(sys.argv[1:])
        except SystemExit as exc:  # argparse (--help, usage errors) and scripts that exit early
            code = exc.code
        except ConfigError as exc:
            print(f"error: {redact(with_env_note(str(exc)))}", file=sys.stderr)
            code = EXIT_USAGE
        except sqlite3.OperationalError as exc:  # both stores' "unavailable, retry later", outside a run's patience
            print(f"error: the job database is unavailable: {redact(str(exc))}", file=sys.stderr)
            code = EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's shutdown
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_CLOSED_PIPE
    sys.exit(code)
