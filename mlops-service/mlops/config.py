"""Service settings, each declared once: read from the environment and `.env`.

Every tunable of the service is a field of :class:`Settings` (pydantic-settings):
its name is the environment variable's in lower case (a few say so with
``validation_alias``), its type, default, bounds and one-line meaning are the
declaration, and docs/configuration.md's table lists the same variables (a
test keeps the two in step). Nothing else in the package reads ``os.environ``
for a setting; gunicorn.conf.py takes its server settings from
:class:`ServerSettings`, the part of :class:`Settings` a server needs before
it has a database. The values read here are checked by their types
(mlops/setting_types.py: whole numbers, flags, sizes) and, for the keys and
secrets, by :func:`mlops.keys.auth_settings`; neither module reads the environment.

Rules every variable follows: a value in the environment wins over the same
line in `.env` (in the working directory); an empty value counts as unset; a
bad value raises :class:`ConfigError`, one line naming the variable.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import psycopg2
from annotated_types import Ge, Le
from limits import parse_many
from psycopg2.extensions import parse_dsn
from pydantic import (
    AliasGenerator,
    Field,
    SkipValidation,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from .keys import KeySpec, auth_settings
from .price_overrides import PricesFileError, load_overrides
from .setting_types import Bytes, Flag, Number, RateLimit, Whole, WholeSeconds


class ConfigError(Exception):
    """A setting is missing or malformed. ``str(error)`` is one line for the operator."""


# DATABASE_URL's value asking for the embedded PostgreSQL (mlops/embedded.py);
# an unset DATABASE_URL asks for it too.
EMBEDDED = "embedded"
RATE_LIMIT_SCHEMES = ("memory://", "redis://", "rediss://", "redis+unix://")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# The mapping Settings.from_env(environ) reads instead of the environment and `.env`.
_ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "mlops_settings_environ", default=None)


class _MappingSource(EnvSettingsSource):
    """The environment source of pydantic-settings, reading a given mapping instead."""

    def __init__(self, settings_cls, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self):
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty,
                              self.env_parse_none_str)


class ServerSettings(BaseSettings):
    """What a server needs before it has a database: where to listen, how many
    workers, how much to log, and where the database is.

    gunicorn.conf.py builds this (DATABASE_URL may still be unset there: the
    embedded PostgreSQL starts later); the app builds the whole :class:`Settings`.
    """

    model_config = SettingsConfigDict(
        alias_generator=AliasGenerator(validation_alias=str.upper),
        case_sensitive=True, env_file=".env", env_ignore_empty=True, extra="ignore",
        frozen=True)

    database_url: str | None = Field(
        None, description="PostgreSQL URL; unset or `embedded`: the embedded PostgreSQL")
    embedded_pgdata: Path = Field(
        Path("data/postgres"), description="data folder of the embedded PostgreSQL")
    host: str = Field("127.0.0.1", description="address gunicorn / Flask bind")
    service_port: Whole = Field(5001, ge=1, le=65535, description="port gunicorn / Flask bind")
    web_concurrency: Whole | None = Field(
        None, ge=1, le=1000, description="gunicorn workers (unset: 2); gunicorn sets it in "
        "each worker to the number running, which divides the memory:// rate limits")
    gunicorn_worker_connections: Whole = Field(
        1000, ge=1, le=100_000, description="connections a worker serves at once (greenlets)")
    shutdown_delay_seconds: Number = Field(
        0.0, ge=0, le=3600, description="after SIGTERM, serve this long with /health/ready "
        "at 503 before the graceful stop")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    prometheus_multiproc_dir: Path | None = Field(
        None, description="prometheus_client's multiprocess folder (gunicorn.conf.py makes "
        "a fresh one when unset)")

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value):
        if isinstance(value, str) and value.upper() in LOG_LEVELS:
            return value.upper()
        raise ValueError(f"must be DEBUG, INFO, WARNING or ERROR, got {value!r}")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        """The environment, then `.env`; or only the mapping given to :meth:`from_env`."""
        environ = _ENVIRON.get()
        if environ is not None:
            return init_settings, _MappingSource(settings_cls, environ)
        return init_settings, env_settings, dotenv_settings

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None):
        """Build settings from ``environ`` (default: ``os.environ``, then `.env`).

        A given ``environ`` is read alone (no `.env`). Raises
        :class:`ConfigError` naming the first bad variable.
        """
        token = _ENVIRON.set(environ)
        try:
            return cls()
        except ValidationError as exc:
            raise ConfigError(_one_line(cls, exc)) from None
        finally:
            _ENVIRON.reset(token)

    @property
    def rate_limit_processes(self) -> int:
        """Processes sharing the service's rate limits (``WEB_CONCURRENCY``; unset: 1)."""
        return self.web_concurrency or 1

    @property
    def workers(self) -> int:
        """gunicorn workers to start (``WEB_CONCURRENCY``; unset: 2)."""
        return self.web_concurrency or 2


def embedded_pgdata(environ: Mapping[str, str] | None = None) -> Path | None:
    """Data folder of the embedded PostgreSQL, if ``DATABASE_URL`` asks for one; else None.

    It asks when it is unset, empty or ``embedded`` (read as
    :meth:`Settings.from_env` reads it). The folder is ``EMBEDDED_PGDATA``,
    default ``data/postgres`` (relative to the working directory).
    """
    server = ServerSettings.from_env(environ)
    return server.embedded_pgdata if server.database_url in (None, EMBEDDED) else None


class Settings(ServerSettings):
    """The service's configuration; see the settings table in docs/configuration.md.

    Units are in the field names: ``*_bytes``, ``*_seconds``, ``*_ms``.
    """

    database_url: str = Field(
        None, validate_default=True,
        description="PostgreSQL URL (postgresql://...); `embedded` asks for the embedded one")
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (), validation_alias="MLOPS_API_KEY", repr=False,
        description="full-access keys, comma-separated, 16+ characters each")
    mlops_api_key_file: Path | None = Field(
        None, description="a file holding MLOPS_API_KEY (one key per line)")
    read_api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (), validation_alias="MLOPS_READ_API_KEY", repr=False,
        description="read-only keys, comma-separated, 16+ characters each")
    mlops_read_api_key_file: Path | None = Field(
        None, description="a file holding MLOPS_READ_API_KEY")
    scoped_keys: Annotated[tuple[KeySpec, ...], SkipValidation, NoDecode] = Field(
        (), validation_alias="MLOPS_KEYS_FILE", repr=False,
        description="a TOML file of keys with scopes, businesses and expiry (mlops/keys.py)")
    auth_mode: str = Field(
        "off", validation_alias="MLOPS_AUTH_MODE",
        description="enforce (default with a key) or warn; off without keys")
    metrics_token: str | None = Field(
        None, validation_alias="MLOPS_METRICS_TOKEN", repr=False,
        description="bearer token for /metrics, 16+ characters")
    mlops_metrics_token_file: Path | None = Field(
        None, description="a file holding MLOPS_METRICS_TOKEN")
    trusted_proxies: Whole = Field(
        0, ge=0, le=10, description="reverse proxies in front (X-Forwarded-For)")
    rate_limit_enabled: Flag = Field(True, description="false turns rate limiting off")
    rate_limit_storage_uri: str = Field(
        "memory://", repr=False, description="memory:// (per worker) or redis://...")
    rate_limit_key_prefix: str = Field("mlops", description="prefix of the Redis keys")
    # Per client, for the whole service: /track and /refresh-metrics twice the
    # 500 messages/s peak of one busy chat app (each message calls each once).
    rate_limit_track: RateLimit = Field("1000/second", description="limit of /track")
    rate_limit_batch: RateLimit = Field("10/second", description="limit of /track/batch")
    rate_limit_refresh: RateLimit = Field("1000/second", description="limit of /refresh-metrics")
    rate_limit_read: RateLimit = Field("20/second", description="limit of the read endpoints")
    rate_limit_erase: RateLimit = Field("10/minute", description="limit of erasure")
    log_dir: Path = Field(Path("logs"), description="folder of the JSON log file")
    spool_dir: Path = Field(Path("data"), description="folder of the local spool")
    spool_max_bytes: Whole = Field(256 * 1024 * 1024, ge=1 << 20, description="spool cap")
    allowed_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="CORS origins, comma-separated")
    max_body_bytes: Whole = Field(
        64 * 1024, ge=1024, le=16 * 1024 * 1024, description="largest /track body")
    max_batch_events: Whole = Field(1000, ge=1, le=100_000, description="items per batch")
    max_batch_body_bytes: Whole = Field(
        1024 * 1024, ge=1024, le=64 * 1024 * 1024, description="largest /track/batch body")
    body_read_timeout_seconds: Whole = Field(
        10, ge=1, le=300, description="a body must arrive in full within this time")
    metrics_max_businesses: Whole = Field(
        1000, ge=1, description="businesses in the per-business gauges")
    metrics_max_series: Whole = Field(
        1000, ge=10, le=1_000_000, description="series budget per labelled metric family")
    metrics_cache_seconds: WholeSeconds = Field(
        10.0, ge=0, le=3600, description="reuse of the Postgres-derived gauges (whole seconds)")
    db_pool_size: Whole = Field(10, ge=1, le=1000, description="connections per worker")
    db_connect_timeout_seconds: Whole = Field(3, ge=1, description="connect timeout")
    db_statement_timeout_ms: Whole = Field(3000, ge=1, description="statement timeout")
    db_insert_timeout_ms: Whole = Field(
        200, ge=1, description="deadline of a request's insert; past it the event is spooled")
    migrations_dir: Path = Field(
        Path(__file__).with_name("migrations"), description="folder of versioned SQL files")
    readiness_checks_database: Flag = Field(
        True, description="false: /health/ready does not ask Postgres")
    retention_days: Whole | None = Field(
        None, ge=1, le=36500, description="raw events older than this are deleted")
    rollup_retention_days: Whole | None = Field(
        None, ge=1, le=36500, description="rollup rows older than this are deleted")
    maintenance_interval_seconds: Whole = Field(
        60, ge=0, le=86400, description="pause between maintenance rounds; 0: off")
    maintenance_batch_rows: Whole = Field(
        5000, ge=1, le=1_000_000, description="rows per maintenance transaction")
    erasure_timeout_ms: Whole = Field(
        20000, ge=1, description="statement timeout of an erasure transaction")
    otlp_max_body_bytes: Whole = Field(
        1024 * 1024, ge=1024, le=64 * 1024 * 1024,
        description="largest /v1/* body, as sent and once inflated")
    otlp_max_spans: Whole = Field(
        8192, ge=1, le=100_000, description="spans read per /v1/traces request")
    otlp_business_attributes: Annotated[tuple[str, ...], NoDecode] = Field(
        ("mlops.business_id", "tenant.id"),
        description="span/resource attribute keys naming a call's business, in order")
    database_size_limit_bytes: Bytes = Field(
        None, validation_alias="DATABASE_SIZE_LIMIT",
        description="the database's size budget (0.5GB, 512MiB); unset: none")
    prices_file: Path | None = Field(
        None, description="JSON price overrides for custom and local models (mlops/prices.py)")
    prices_enabled: Flag = Field(True, description="false stores calls with no price")

    @property
    def api_key(self) -> str | None:
        """The first full-access key, or None: for callers asking only "is a key set?"."""
        return self.api_keys[0] if self.api_keys else None

    @model_validator(mode="before")
    @classmethod
    def _auth(cls, data: dict) -> dict:
        """API keys (full and read-only, each from its variable or its ``_FILE``), the
        keys file, the auth mode and the /metrics token: :func:`mlops.keys.auth_settings`."""
        return {**data, **auth_settings(data)}

    @field_validator("database_url", mode="before")
    @classmethod
    def _database_url(cls, url: str | None) -> str:
        if not url:
            raise ValueError(
                "is not set: give a PostgreSQL URL, e.g. "
                "postgresql://postgres@127.0.0.1:5432/postgres (see .env.example), "
                f"or {EMBEDDED!r} where the embedded PostgreSQL is installed")
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql:// (got another scheme)")
        try:
            options = parse_dsn(url)
        except psycopg2.ProgrammingError as exc:
            reason = str(exc).strip().splitlines()[0]
            raise ValueError(f"is malformed: {reason}") from None
        ports = options.get("port", "5432").split(",")
        if not all(p.isdigit() and 0 < int(p) < 65536 for p in ports):
            raise ValueError(f"is malformed: port {options['port']!r} is not a number")
        return url

    @field_validator("rate_limit_enabled", mode="before")
    @classmethod
    def _true_or_false(cls, value):
        if isinstance(value, str) and value.lower() not in {"true", "false"}:
            raise ValueError(f"must be true or false, got {value.lower()!r}")
        return value

    @field_validator("rate_limit_storage_uri")
    @classmethod
    def _storage_uri(cls, uri: str) -> str:
        if not uri.startswith(RATE_LIMIT_SCHEMES):
            raise ValueError("must start with memory:// or redis:// (or rediss://, "
                             "redis+unix://)")
        return uri

    @field_validator("rate_limit_track", "rate_limit_batch", "rate_limit_refresh",
                     "rate_limit_read", "rate_limit_erase")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError:
            raise ValueError(f"must look like 100/second or 1000 per minute, "
                             f"got {value!r}") from None
        return value

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return tuple(o.strip() for o in value.split(",") if o.strip())
        return value

    @field_validator("prices_file")
    @classmethod
    def _prices_file(cls, path: Path | None) -> Path | None:
        """Checked now: a malformed file stops the start, one line naming the entry
        (from ``mlops.price_overrides.load_overrides``)."""
        if path is not None:
            try:
                load_overrides(path)
            except PricesFileError as exc:
                raise ValueError(str(exc).removeprefix("PRICES_FILE ")) from None
        return path

    @field_validator("otlp_business_attributes", mode="before")
    @classmethod
    def _attribute_keys(cls, value):
        """OpenTelemetry attribute keys separated by commas, trimmed, in order."""
        if isinstance(value, str):
            keys = tuple(k.strip() for k in value.split(","))
            if not all(keys):
                raise ValueError("holds an empty attribute key (check the commas)")
            return keys
        return value


def _one_line(settings_cls: type[BaseSettings], error: ValidationError) -> str:
    """The first problem of ``error``, as one line naming the variable."""
    problem = error.errors(include_url=False)[0]
    if not problem["loc"]:  # a rule over several variables: its message names them
        return str(problem["ctx"]["error"])
    name = str(problem["loc"][0])
    field = settings_cls.model_fields.get(name)  # a default's error is located by field name
    if field is not None:
        name = field.validation_alias
    if problem["type"] == "value_error":
        return f"{name} {problem['ctx']['error']}"
    if problem["type"] in ("greater_than_equal", "less_than_equal"):
        field = next(f for f in settings_cls.model_fields.values() if f.validation_alias == name)
        low = next(m.ge for m in field.metadata if isinstance(m, Ge))
        high = next((m.le for m in field.metadata if isinstance(m, Le)), None)
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        value = problem["input"]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return f"{name} must be {bounds}, got {value}"
    return f"{name}: {problem['msg']} (got {problem['input']!r})"
