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
from limits import parse_many
from psycopg2.extensions import parse_dsn


class ConfigError(Exception):
    """A setting is missing or malformed. ``str(error)`` is one line for the operator."""


# DATABASE_URL's value asking for the embedded PostgreSQL (mlops/embedded.py);
# an unset DATABASE_URL asks for it too.
EMBEDDED = "embedded"


def embedded_pgdata(environ: Mapping[str, str] | None = None) -> Path | None:
    """Data folder of the embedded PostgreSQL, if ``DATABASE_URL`` asks for one; else None.

    It asks when it is unset, empty or ``embedded`` (after loading `.env`, as
    :meth:`Settings.from_env` does). The folder is ``EMBEDDED_PGDATA``,
    default ``data/postgres`` (relative to the working directory).
    """
    if environ is None:
        load_dotenv(override=False)
        environ = os.environ
    if environ.get("DATABASE_URL", "") not in ("", EMBEDDED):
        return None
    return Path(environ.get("EMBEDDED_PGDATA") or "data/postgres")


@dataclass(frozen=True)
class Settings:
    """The service's configuration; see the settings table in docs/configuration.md.

    Units are in the field names: ``*_bytes``, ``*_seconds``, ``*_ms``.
    """

    database_url: str
    host: str = "127.0.0.1"
    service_port: int = 5001
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    read_api_keys: tuple[str, ...] = field(default=(), repr=False)
    auth_mode: str = "off"
    metrics_token: str | None = field(default=None, repr=False)
    trusted_proxies: int = 0
    rate_limit_enabled: bool = True
    rate_limit_storage_uri: str = field(default="memory://", repr=False)
    rate_limit_key_prefix: str = "mlops"
    rate_limit_track: str = "1000/second"
    rate_limit_batch: str = "10/second"
    rate_limit_refresh: str = "1000/second"
    rate_limit_read: str = "20/second"
    rate_limit_erase: str = "10/minute"
    rate_limit_processes: int = 1
    log_dir: Path = Path("logs")
    log_level: str = "INFO"
    spool_dir: Path = Path("data")
    spool_max_bytes: int = 256 * 1024 * 1024
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = 64 * 1024
    max_batch_events: int = 1000
    max_batch_body_bytes: int = 1024 * 1024
    body_read_timeout_seconds: int = 10
    metrics_max_businesses: int = 1000
    metrics_max_series: int = 1000
    metrics_cache_seconds: float = 10.0
    db_pool_size: int = 10
    db_connect_timeout_seconds: int = 3
    db_statement_timeout_ms: int = 3000
    db_insert_timeout_ms: int = 200
    migrations_dir: Path = Path(__file__).with_name("migrations")
    prometheus_multiproc_dir: Path | None = None
    readiness_checks_database: bool = True
    retention_days: int | None = None
    rollup_retention_days: int | None = None
    maintenance_interval_seconds: int = 60
    maintenance_batch_rows: int = 5000
    erasure_timeout_ms: int = 20000
    prices_file: Path | None = None
    prices_enabled: bool = True

    @property
    def api_key(self) -> str | None:
        """The first full-access key, or None: for callers asking only "is a key set?"."""
        return self.api_keys[0] if self.api_keys else None

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
            host=env.get("HOST", "127.0.0.1"),
            service_port=_integer(env, "SERVICE_PORT", 5001, low=1, high=65535),
            **_auth(env),
            trusted_proxies=_integer(env, "TRUSTED_PROXIES", 0, low=0, high=10),
            **_rate_limits(env),
            log_dir=Path(env.get("LOG_DIR", "logs")),
            log_level=_log_level(env.get("LOG_LEVEL", "INFO")),
            spool_dir=Path(env.get("SPOOL_DIR", "data")),
            spool_max_bytes=_integer(env, "SPOOL_MAX_BYTES", 256 * 1024 * 1024, low=1 << 20),
            allowed_origins=tuple(
                o.strip() for o in env.get("ALLOWED_ORIGINS", "").split(",") if o.strip()
            ),
            max_body_bytes=_integer(env, "MAX_BODY_BYTES", 64 * 1024, low=1024,
                                    high=16 * 1024 * 1024),
            max_batch_events=_integer(env, "MAX_BATCH_EVENTS", 1000, low=1, high=100_000),
            max_batch_body_bytes=_integer(env, "MAX_BATCH_BODY_BYTES", 1024 * 1024,
                                          low=1024, high=64 * 1024 * 1024),
            body_read_timeout_seconds=_integer(env, "BODY_READ_TIMEOUT_SECONDS", 10,
                                               low=1, high=300),
            metrics_max_businesses=_integer(env, "METRICS_MAX_BUSINESSES", 1000, low=1),
            metrics_max_series=_integer(env, "METRICS_MAX_SERIES", 1000, low=10,
                                        high=1_000_000),
            metrics_cache_seconds=float(
                _integer(env, "METRICS_CACHE_SECONDS", 10, low=0, high=3600)
            ),
            db_pool_size=_integer(env, "DB_POOL_SIZE", 10, low=1, high=1000),
            db_connect_timeout_seconds=_integer(env, "DB_CONNECT_TIMEOUT_SECONDS", 3, low=1),
            db_statement_timeout_ms=_integer(env, "DB_STATEMENT_TIMEOUT_MS", 3000, low=1),
            db_insert_timeout_ms=_integer(env, "DB_INSERT_TIMEOUT_MS", 200, low=1),
            migrations_dir=Path(env.get("MIGRATIONS_DIR", Path(__file__).with_name("migrations"))),
            prometheus_multiproc_dir=(Path(env["PROMETHEUS_MULTIPROC_DIR"])
                                      if "PROMETHEUS_MULTIPROC_DIR" in env else None),
            readiness_checks_database=_boolean(env, "READINESS_CHECKS_DATABASE", True),
            retention_days=_optional_days(env, "RETENTION_DAYS"),
            rollup_retention_days=_optional_days(env, "ROLLUP_RETENTION_DAYS"),
            maintenance_interval_seconds=_integer(env, "MAINTENANCE_INTERVAL_SECONDS", 60,
                                                  low=0, high=86400),
            maintenance_batch_rows=_integer(env, "MAINTENANCE_BATCH_ROWS", 5000,
                                            low=1, high=1_000_000),
            erasure_timeout_ms=_integer(env, "ERASURE_TIMEOUT_MS", 20000, low=1),
            prices_file=_prices_file(env.get("PRICES_FILE")),
            prices_enabled=_boolean(env, "PRICES_ENABLED", True),
        )


def _database_url(url: str | None) -> str:
    if not url:
        raise ConfigError(
            "DATABASE_URL is not set: give a PostgreSQL URL, e.g. "
            "postgresql://postgres@127.0.0.1:5432/postgres (see .env.example), "
            f"or {EMBEDDED!r} where the embedded PostgreSQL is installed"
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


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    if raw.lower() in {"1", "true", "yes"}:
        return True
    if raw.lower() in {"0", "false", "no"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _optional_days(env: Mapping[str, str], name: str) -> int | None:
    """A number of days, or None (keep forever) when unset."""
    if name not in env:
        return None
    return _integer(env, name, 0, low=1, high=36500)


def _prices_file(raw: str | None) -> Path | None:
    """``PRICES_FILE``, checked now: a malformed file stops the start (one line naming the
    entry, from ``mlops.prices.load_overrides``)."""
    if raw is None:
        return None
    from .prices import PricesFileError, load_overrides

    try:
        load_overrides(Path(raw))
    except PricesFileError as exc:
        raise ConfigError(str(exc)) from None
    return Path(raw)


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {raw!r}")
    return level


# Characters: the shortest API key or /metrics token accepted. A
# key from ``secrets.token_urlsafe(32)`` has 43.
MIN_SECRET_CHARS = 16


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """``name``, or the contents of the file named by ``name_FILE`` (Docker/Kubernetes secrets).

    Surrounding whitespace is dropped, and a file's UTF-8 byte order mark
    (``utf-8-sig``), so a key saved by an editor that adds one still matches.
    """
    key_file = env.get(f"{name}_FILE")
    if key_file:
        if name in env:
            raise ConfigError(f"set {name} or {name}_FILE, not both")
        try:
            value = Path(key_file).read_text(encoding="utf-8-sig").strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{name}_FILE is not UTF-8 text") from None
        if not value:
            raise ConfigError(f"{name}_FILE names an empty file")
        return value
    value = env.get(name, "").strip()
    return value or None


def _long_enough(name: str, secrets: tuple[str, ...]) -> None:
    """ConfigError naming ``name`` and the rule if a secret is short (never the secret)."""
    for position, secret in enumerate(secrets, start=1):
        if len(secret) < MIN_SECRET_CHARS:
            which = f"key {position} of {len(secrets)}" if len(secrets) > 1 else "it"
            raise ConfigError(
                f"{name} must be at least {MIN_SECRET_CHARS} characters ({which} has "
                f"{len(secret)}); make one with: python3 -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'")


def _keys(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """The keys in ``name`` (or its ``_FILE``): separated by commas or newlines, trimmed,
    each at least ``MIN_SECRET_CHARS`` long."""
    raw = _secret(env, name) or ""
    keys = tuple(k.strip() for k in raw.replace("\n", ",").split(","))
    if raw and not all(keys):
        raise ConfigError(f"{name} holds an empty key (check the commas)")
    keys = tuple(k for k in keys if k)
    _long_enough(name, keys)
    return keys


def _auth(env: Mapping[str, str]) -> dict:
    """API keys (full and read-only), the auth mode and the /metrics token.

    The mode is ``off`` without keys, else ``MLOPS_AUTH_MODE`` (``enforce``
    by default, or ``warn``). Keys and the token are ``MIN_SECRET_CHARS``
    characters at least.
    """
    full = _keys(env, "MLOPS_API_KEY")
    read = _keys(env, "MLOPS_READ_API_KEY")
    if read and not full:
        raise ConfigError("MLOPS_READ_API_KEY needs MLOPS_API_KEY too (no key could write)")
    if set(full) & set(read):
        raise ConfigError("a key is in both MLOPS_API_KEY and MLOPS_READ_API_KEY")
    mode = env.get("MLOPS_AUTH_MODE", "enforce").lower()
    if mode not in {"enforce", "warn"}:
        raise ConfigError(f"MLOPS_AUTH_MODE must be enforce or warn, got {mode!r}")
    if not full:
        if "MLOPS_AUTH_MODE" in env:
            raise ConfigError("MLOPS_AUTH_MODE needs MLOPS_API_KEY (without a key nothing "
                              "is checked)")
        mode = "off"
    token = _secret(env, "MLOPS_METRICS_TOKEN")
    if token is not None:
        _long_enough("MLOPS_METRICS_TOKEN", (token,))
    return {"api_keys": full, "read_api_keys": read, "auth_mode": mode,
            "metrics_token": token}


RATE_LIMIT_SCHEMES = ("memory://", "redis://", "rediss://", "redis+unix://")


def _rate_limits(env: Mapping[str, str]) -> dict:
    """Flask-Limiter settings: on/off, storage, key prefix, one limit per route group, and
    how many processes share the service's limits (``WEB_CONCURRENCY``, default 1).

    Each limit is per client for the whole service (mlops/limits.py says how
    memory:// counts divide it among the ``WEB_CONCURRENCY`` gunicorn workers).
    Defaults: ``/track`` and ``/refresh-metrics`` 1000/second, twice the 500
    messages/s peak of one busy chat app (each message is one call to each);
    ``/track/batch`` 10/second (up to MAX_BATCH_EVENTS events each); the read
    endpoints 20/second; erasure 10/minute.
    """
    enabled = env.get("RATE_LIMIT_ENABLED", "true").lower()
    if enabled not in {"true", "false"}:
        raise ConfigError(f"RATE_LIMIT_ENABLED must be true or false, got {enabled!r}")
    uri = env.get("RATE_LIMIT_STORAGE_URI", "memory://")
    if not uri.startswith(RATE_LIMIT_SCHEMES):
        raise ConfigError("RATE_LIMIT_STORAGE_URI must start with memory:// or redis:// "
                          "(or rediss://, redis+unix://)")
    limits = {}
    for name, default in (("TRACK", "1000/second"), ("BATCH", "10/second"),
                          ("REFRESH", "1000/second"), ("READ", "20/second"),
                          ("ERASE", "10/minute")):
        value = env.get(f"RATE_LIMIT_{name}", default)
        try:
            parse_many(value)
        except ValueError:
            raise ConfigError(f"RATE_LIMIT_{name} must look like 100/second or "
                              f"1000 per minute, got {value!r}") from None
        limits[f"rate_limit_{name.lower()}"] = value
    return {"rate_limit_enabled": enabled == "true", "rate_limit_storage_uri": uri,
            "rate_limit_key_prefix": env.get("RATE_LIMIT_KEY_PREFIX", "mlops"), **limits,
            "rate_limit_processes": _integer(env, "WEB_CONCURRENCY", 1, low=1, high=1000)}
