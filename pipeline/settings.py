"""One frozen ``Settings`` per run, built in one place and validated once, then passed down.

Every entry point (the parallel scripts, the tools, the one-file CLIs' ``main``) calls
``Settings.load(args)`` and hands the result (or what it holds) to the stages, the providers and
the runner; nothing below the entry points reads ``os.environ``.

Precedence, highest first: the command line (``--db``, ``--output-dir``, ``--language``, ...), the
process environment, the ``.env`` file (``--env-file``, else ``$VERBATIM_ENV_FILE``, else
``./.env``; it never overrides a variable that is set), the defaults. ``pipeline.config.load_env``
reads the file and registers every key-like value for redaction; the environment is then taken
as a read-only snapshot (``Settings.env``), which provider constructors receive for their keys,
base URLs and models.

Validated here, once, with a ``ConfigError`` (exit 2) naming the variable: language codes
(``"DE"`` -> ``"de"``), numbers (positive), API keys (header-safe).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from pipeline import config, errors
from pipeline.config import positive_float, positive_int
from pipeline.limiter import DEFAULT_PATIENCE as DEFAULT_RATE_LIMIT_PATIENCE

DEFAULT_REQUEST_TIMEOUT = None          # None: each provider's own (scaled by the audio for transcription)
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# The keys verbatim's providers send in a header: checked once here, whatever provider a run picks.
KEY_VARIABLES = ("OPENAI_API_KEY", "ELEVENLABS_API_KEY", "DEEPL_API_KEY", "MS_TRANSLATOR_KEY")
_PER_PROVIDER = re.compile(r"^VERBATIM_([A-Z0-9]+)_(MAX_CONCURRENCY|RPM|MAX_UPLOAD_BYTES)$")


@dataclass(frozen=True)
class LimiterSettings:
    """What ``pipeline.limiter.limiter_for`` needs for one provider."""

    max_concurrency: int | None = None
    rpm: float | None = None
    patience: float = DEFAULT_RATE_LIMIT_PATIENCE


@dataclass(frozen=True)
class Settings:
    env: Mapping[str, str]                       # read-only snapshot: keys, base URLs, models
    db: str = config.DEFAULT_DB
    output_dir: str = config.DEFAULT_OUTPUT_DIR
    target_languages: tuple[str, ...] = config.DEFAULT_TARGET_LANGUAGES
    expected_languages: tuple[str, ...] | None = None   # VERBATIM_LANGUAGES; None: detect freely
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT   # VERBATIM_REQUEST_TIMEOUT, seconds
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    retry_base_seconds: float = errors.RETRY_BASE_SECONDS
    retry_cap_seconds: float = errors.RETRY_CAP_SECONDS
    rate_limit_patience: float = DEFAULT_RATE_LIMIT_PATIENCE
    debug: bool = False                          # -v/--verbose or VERBATIM_DEBUG
    env_file: str | None = None                  # the settings file looked for

    @classmethod
    def load(cls, args=None, *, environ: Mapping[str, str] | None = None,
             target_languages=None) -> "Settings":
        """The run's settings from ``args`` (an argparse namespace: ``db``, ``output_dir``,
        ``env_file``, ``verbose`` where the script has them), the environment and .env.
        ``environ`` (tests) is read instead of the process environment, and is never written;
        ``target_languages`` are the script's ``--language`` codes where it has them."""
        env_file = getattr(args, "env_file", None)
        if environ is None:  # the process: .env goes into os.environ too (libraries read it there)
            env = dict(config.load_env(env_file))
        else:
            env = config.merged_env(env_file, environ)
        return cls.from_env(env, args, target_languages=target_languages,
                            env_file=config.env_file_path(env_file, env))

    @classmethod
    def from_env(cls, env: Mapping[str, str], args=None, *, target_languages=None,
                 env_file: str | None = None) -> "Settings":
        """Validate ``env`` (already merged with .env) and ``args`` into Settings."""
        for name in KEY_VARIABLES:
            if env.get(name):
                config.check_header_value(name, env[name])
        for name, value in env.items():
            match = _PER_PROVIDER.match(name)
            if match and value:
                (positive_float if match.group(2) == "RPM" else positive_int)(name, value)
        timeout = env.get("VERBATIM_REQUEST_TIMEOUT")
        max_bytes = env.get("VERBATIM_MAX_RESPONSE_BYTES")
        local_cap = env.get("VERBATIM_LOCAL_MAX_CONCURRENCY")
        if local_cap:
            positive_int("VERBATIM_LOCAL_MAX_CONCURRENCY", local_cap)
        patience = env.get("VERBATIM_RATE_LIMIT_PATIENCE")
        base, cap = env.get("VERBATIM_RETRY_BASE_SECONDS"), env.get("VERBATIM_RETRY_CAP_SECONDS")
        targets = target_languages or (env.get("VERBATIM_TARGET_LANGUAGES") or "").replace(",", " ").split()
        expected = (env.get("VERBATIM_LANGUAGES") or "").replace(",", " ").split()
        return cls(
            env=MappingProxyType(dict(env)),
            db=getattr(args, "db", None) or env.get("VERBATIM_DB") or config.DEFAULT_DB,
            output_dir=getattr(args, "output_dir", None) or env.get("VERBATIM_OUTPUT_DIR") or config.DEFAULT_OUTPUT_DIR,
            target_languages=tuple(config.parse_languages(targets) or config.DEFAULT_TARGET_LANGUAGES),
            expected_languages=tuple(config.parse_languages(expected)) or None,
            request_timeout=positive_float("VERBATIM_REQUEST_TIMEOUT", timeout) if timeout else None,
            max_response_bytes=(positive_int("VERBATIM_MAX_RESPONSE_BYTES", max_bytes) if max_bytes
                                else DEFAULT_MAX_RESPONSE_BYTES),
            retry_base_seconds=positive_float("VERBATIM_RETRY_BASE_SECONDS", base) if base else errors.RETRY_BASE_SECONDS,
            retry_cap_seconds=positive_float("VERBATIM_RETRY_CAP_SECONDS", cap) if cap else errors.RETRY_CAP_SECONDS,
            rate_limit_patience=(positive_float("VERBATIM_RATE_LIMIT_PATIENCE", patience) if patience
                                 else DEFAULT_RATE_LIMIT_PATIENCE),
            debug=bool(getattr(args, "verbose", False) or env.get("VERBATIM_DEBUG")),
            env_file=env_file,
        )

    def limits(self, provider: str, *, cap: int | None = None) -> LimiterSettings:
        """``provider``'s limiter settings: ``VERBATIM_<PROVIDER>_MAX_CONCURRENCY`` and ``_RPM``;
        ``cap`` (an engine's own parallelism, as the local one's workers) replaces the concurrency."""
        prefix = f"VERBATIM_{provider.upper()}_"
        concurrency = self.env.get(prefix + "MAX_CONCURRENCY")
        rpm = self.env.get(prefix + "RPM")
        return LimiterSettings(max_concurrency=cap or (int(concurrency) if concurrency else None),
                               rpm=float(rpm) if rpm else None, patience=self.rate_limit_patience)

    def languages(self, codes) -> list[str]:
        """Command-line language codes as the codes they are (``DE`` -> ``de``), else the targets."""
        return config.parse_languages(codes) if codes else list(self.target_languages)

    @staticmethod
    def language(code: str | None) -> str | None:
        """One command-line language code, validated and normalised; None stays None."""
        return config.parse_languages([code])[0] if code else None
