"""Service settings: read once, from the environment and an optional `.env`.

Every tunable of the service is a field of :class:`Settings`; nothing else
in the package reads ``os.environ`` (gunicorn.conf.py reads its own
server settings, as gunicorn expects).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
from dotenv import load_dotenv
from psycopg2.extensions import parse_dsn


class ConfigError(Exception):
    """A setting is missing or malformed. ``str(error)`` is one line for the operator."""


@dataclass(frozen=True)
class Settings:
    """The service's configuration; see README.md's configuration table.

    Units are in the field names: ``*_bytes``, ``*_seconds``, ``*_ms``.
    """

    database_url: str
    service_port: int = 5001
    api_key: str | None = field(default=None, repr=False)
    log_dir: Path = Path("logs")
    log_level: str = "INFO"
    spool_dir: Path = Path("data")
    spool_max_bytes: int = 256 * 1024 * 1024
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = 64 * 1024
    max_batch_events: int = 1000
    metrics_max_businesses: int = 1000
    metrics_max_label_values: int = 100
    metrics_cache_seconds: float = 10.0
    db_pool_size: int = 10
    db_connect_timeout_seconds: int = 3
    db_statement_timeout_ms: int = 3000
    db_insert_timeout_ms: int = 1000
    retention_days: int | None = None
    rollup_retention_days: int | None = None
    maintenance_interval_seconds: int = 60
    maintenance_batch_rows: int = 5000
    erasure_timeout_ms: int = 20000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default: ``os.environ`` after loading `.env`).

        `.env` is loaded by python-dotenv without overriding variables that are
        already set. Raises :class:`ConfigError` naming the bad variable.
        """
        if environ is None:
            load_dotenv(override=False)
            environ = os.environ
        env = {k: v for k, v in environ.items() if v != ""}

        return cls(
            database_url=_database_url(env.get("DATABASE_URL")),
            service_port=_integer(env, "SERVICE_PORT", 5001, low=1, high=65535),
            api_key=_api_key(env),
            log_dir=Path(env.get("LOG_DIR", "logs")),
            log_level=_log_level(env.get("LOG_LEVEL", "INFO")),
            spool_dir=Path(env.get("SPOOL_DIR", "data")),
            spool_max_bytes=_integer(env, "SPOOL_MAX_BYTES", 256 * 1024 * 1024, low=1 << 20),
            allowed_origins=tuple(
                o.strip() for o in env.get("ALLOWED_ORIGINS", "").split(",") if o.strip()
            ),
            max_body_bytes=_integer(env, "MAX_BODY_BYTES", 64 * 1024, low=1024),
            max_batch_events=_integer(env, "MAX_BATCH_EVENTS", 1000, low=1),
            metrics_max_businesses=_integer(env, "METRICS_MAX_BUSINESSES", 1000, low=1),
            metrics_max_label_values=_integer(env, "METRICS_MAX_LABEL_VALUES", 100, low=1),
            metrics_cache_seconds=float(
                _integer(env, "METRICS_CACHE_SECONDS", 10, low=0, high=3600)
            ),
            db_pool_size=_integer(env, "DB_POOL_SIZE", 10, low=1, high=1000),
            db_connect_timeout_seconds=_integer(env, "DB_CONNECT_TIMEOUT_SECONDS", 3, low=1),
            db_statement_timeout_ms=_integer(env, "DB_STATEMENT_TIMEOUT_MS", 3000, low=1),
            db_insert_timeout_ms=_integer(env, "DB_INSERT_TIMEOUT_MS", 1000, low=1),
            retention_days=_optional_days(env, "RETENTION_DAYS"),
            rollup_retention_days=_optional_days(env, "ROLLUP_RETENTION_DAYS"),
            maintenance_interval_seconds=_integer(env, "MAINTENANCE_INTERVAL_SECONDS", 60,
                                                  low=0, high=86400),
            maintenance_batch_rows=_integer(env, "MAINTENANCE_BATCH_ROWS", 5000,
                                            low=1, high=1_000_000),
            erasure_timeout_ms=_integer(env, "ERASURE_TIMEOUT_MS", 20000, low=1),
        )


def _database_url(url: str | None) -> str:
    if not url:
        raise ConfigError(
            "DATABASE_URL is not set: give a PostgreSQL URL, e.g. "
            "postgresql://postgres@127.0.0.1:5432/postgres (see .env.example)"
        )
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("DATABASE_URL must start with postgresql:// (got another scheme)")
    try:
        options = parse_dsn(url)
    except psycopg2.ProgrammingError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ConfigError(f"DATABASE_URL is malformed: {reason}") from None
    ports = options.get("port", "5432").split(",")
    if not all(p.isdigit() and 0 < int(p) < 65536 for p in ports):
        raise ConfigError(f"DATABASE_URL is malformed: port {options['port']!r} is not a number")
    return url


def _integer(env: Mapping[str, str], name: str, default: int, low: int = 0,
             high: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name} must be {bounds}, got {value}")
    return value


def _optional_days(env: Mapping[str, str], name: str) -> int | None:
    """A number of days, or None (keep forever) when unset."""
    if name not in env:
        return None
    return _integer(env, name, 0, low=1, high=36500)


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {raw!r}")
    return level


def _api_key(env: Mapping[str, str]) -> str | None:
    """``MLOPS_API_KEY``, or the contents of the file named by ``MLOPS_API_KEY_FILE``."""
    key_file = env.get("MLOPS_API_KEY_FILE")
    if key_file:
        if "MLOPS_API_KEY" in env:
            raise ConfigError("set MLOPS_API_KEY or MLOPS_API_KEY_FILE, not both")
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"MLOPS_API_KEY_FILE cannot be read: {exc.strerror}") from None
        if not key:
            raise ConfigError("MLOPS_API_KEY_FILE names an empty file")
        return key
    return env.get("MLOPS_API_KEY")
