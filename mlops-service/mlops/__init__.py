"""mlops-service: records how a chat app's AI model behaves.

``create_app`` wires the parts; each module names its concern (config, db,
migrate, schemas, ingest -> deliver | outbox -> store, telemetry, state_metrics,
routes/*).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from flask import Flask, g

from .version import __version__

log = logging.getLogger("mlops")


def create_app(settings=None) -> Flask:
    """Build the Flask app. ``settings`` defaults to ``Settings.from_env()``.

    Touches no database: the pool fills lazily, so this is safe in every
    gunicorn worker and when Postgres is down (events spool until it is back).
    Migrations run before, once per server (``mlops.migrate.check_at_start``).
    Raises ``ConfigError`` for a missing or malformed setting.
    """
    from flask_cors import CORS
    from werkzeug.middleware.proxy_fix import ProxyFix

    from . import auth, bodies, errors, logs, price_overrides, prices, ratelimit, telemetry
    from .config import ConfigError, Settings
    from .db import Database
    from .deliver import Delivery, GroupCommit
    from .ingest import Ingestor
    from .maintenance import Maintenance
    from .outbox import Outbox
    from .routes import (
        analytics,
        businesses,
        dashboard,
        erasure,
        health,
        metrics,
        openapi,
        otlp,
        track,
    )
    from .services import Services
    from .spool import Spool
    from .state_metrics import StateCollector
    from .storage_budget import StorageBudget

    settings = settings or Settings.from_env()
    logs.configure(settings.log_dir, settings.log_level, settings.spool_dir)

    app = Flask(__name__)
    app.json.sort_keys = False
    # The largest body any route takes; each route caps its own (mlops/bodies.py).
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_body_bytes,
                                           settings.max_batch_body_bytes,
                                           settings.otlp_max_body_bytes)
    app.wsgi_app = bodies.ReadDeadline(app.wsgi_app, settings.body_read_timeout_seconds)
    if settings.trusted_proxies:  # client address and scheme from the proxies' X-Forwarded-*
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies,
                                x_proto=settings.trusted_proxies)
    if settings.allowed_origins:
        CORS(app, origins=list(settings.allowed_origins))

    try:
        prices.configure(prices.Table.from_file(settings.prices_file,
                                                enabled=settings.prices_enabled))
    except price_overrides.PricesFileError as exc:  # the file changed since the settings were read
        raise ConfigError(str(exc)) from None
    db = Database(settings)
    spool = Spool(settings.spool_dir, settings.spool_max_bytes)
    telem = telemetry.Telemetry(max_series=settings.metrics_max_series,
                                multiproc_dir=settings.prometheus_multiproc_dir)
    telem.add_state(StateCollector(db, spool, max_businesses=settings.metrics_max_businesses,
                                   cache_seconds=settings.metrics_cache_seconds,
                                   version=__version__,
                                   price_table=prices.current().version))
    deliver = Delivery(db, telem)
    outbox = Outbox(spool, deliver, timeout_ms=db.default_timeout_ms)
    ingestor = Ingestor(GroupCommit(deliver), outbox, timeout_ms=settings.db_insert_timeout_ms)
    maintenance = Maintenance.from_settings(db, settings)
    Services(settings, db, outbox, telem, ingestor, maintenance,
             auth.Auth(settings)).install(app)
    budget = StorageBudget(db, settings.database_size_limit_bytes)
    budget.install(app)
    telem.add_collector(budget)

    @app.before_request
    def _start_timer() -> None:  # read by the request log and the HTTP metrics
        g.request_started = time.perf_counter()

    for module in (track, otlp, health, metrics, analytics, businesses, erasure, openapi,
                   dashboard):
        app.register_blueprint(module.bp)
    errors.init_app(app)
    auth.init_app(app)
    ratelimit.init_app(app, settings)
    logs.init_app(app)
    telemetry.init_app(app)
    outbox.start()
    maintenance.start()

    log.debug("worker ready", extra={"version": __version__})
    return app


def start_server(exit_now: Callable[[int], object] = sys.exit):
    """The start-up of a server, once, before it serves: run by ``python app.py`` and by
    gunicorn's master (``on_starting``, before it forks the workers).

    Starts the embedded PostgreSQL when ``DATABASE_URL`` asks for it
    (mlops/embedded.py), reads the settings, migrates
    (:func:`mlops.migrate.check_at_start`), configures logging for this process,
    creates the spool file (and its WAL mode) before workers race to, and
    writes the start-up line (:func:`announce`). Returns the settings. A
    missing or malformed setting, a database refusing these credentials or
    a migration file that fails gives one line on stderr, stops the embedded
    server and calls ``exit_now(1)`` (gunicorn's master passes ``os._exit``).
    """
    from . import embedded, logs
    from .config import ConfigError, Settings
    from .db import DatabaseMisconfigured
    from .migrate import MigrationError, check_at_start
    from .spool import Spool

    try:
        pgdata = embedded.start_if_asked()  # DATABASE_URL unset or `embedded`
        settings = Settings.from_env()
        database = check_at_start(settings)
    except (ConfigError, DatabaseMisconfigured, MigrationError) as exc:
        embedded.stop()
        print(f"mlops-service: cannot start: {exc}", file=sys.stderr, flush=True)
        exit_now(1)
        raise  # only if exit_now returned
    logs.configure(settings.log_dir, settings.log_level, settings.spool_dir)
    Spool(settings.spool_dir, settings.spool_max_bytes).close()
    announce(settings, database, embedded_pgdata=pgdata)
    return settings


def announce(settings, database: str, embedded_pgdata=None) -> None:
    """The one start-up log line of a server (gunicorn master or ``python app.py``).

    ``embedded_pgdata``: the data folder when the server runs an embedded
    PostgreSQL (mlops/embedded.py); the line then says so. Then one WARNING
    per exposure, naming the risk and the setting that ends it: no key on a
    non-loopback address (everything open to the network), keys but no
    /metrics token on one (the scraper needs an API key), warn mode. A
    warning, not a refusal: in a container the service binds 0.0.0.0 and
    what reaches it is decided outside (compose publishes on 127.0.0.1).
    """
    extra = {
        "version": __version__,
        "host": settings.host,
        "port": settings.service_port,
        "database": database,
        "auth": settings.auth_mode,
        "metrics_token": settings.metrics_token is not None,
        "rate_limits": (settings.rate_limit_storage_uri.split(":", 1)[0]
                        if settings.rate_limit_enabled else "off"),
        "trusted_proxies": settings.trusted_proxies,
        "cors_origins": list(settings.allowed_origins),
    }
    if embedded_pgdata is not None:
        extra["database_server"] = (f"embedded PostgreSQL, data in {embedded_pgdata}, "
                                    "stopped on exit (for trying and developing only)")
    log.info("mlops-service starting", extra=extra)
    import ipaddress

    try:  # a name other than localhost may resolve to any interface
        exposed = not (settings.host == "localhost"
                       or ipaddress.ip_address(settings.host.strip("[]")).is_loopback)
    except ValueError:
        exposed = True
    where = f"HOST={settings.host} (not loopback)"
    if settings.auth_mode == "off" and exposed:
        metrics = " and /metrics (every business's costs)" if settings.metrics_token is None \
            else ""
        log.warning(f"MLOPS_API_KEY is not set and {where}: /track, the read endpoints, "
                    f"erasure (DELETE){metrics} are open to anyone who can reach port "
                    f"{settings.service_port}; set MLOPS_API_KEY (16+ characters), or "
                    "HOST=127.0.0.1 to serve this machine only")
    elif settings.auth_mode == "off":
        log.info(f"MLOPS_API_KEY is not set: every endpoint is open to programs on this "
                 f"machine (HOST={settings.host}); set MLOPS_API_KEY before serving others")
    elif settings.metrics_token is None and exposed:
        log.warning(f"MLOPS_METRICS_TOKEN is not set and {where}: /metrics takes only "
                    "API keys, so a Prometheus scraping it holds a key that also reads every "
                    "business's analytics; set MLOPS_METRICS_TOKEN and give Prometheus that "
                    "token instead")
    if settings.auth_mode == "warn":
        log.warning("MLOPS_AUTH_MODE=warn: writes without a valid X-API-Key are stored and "
                    "counted in mlops_auth_failures_total; set MLOPS_AUTH_MODE=enforce once "
                    "that counter stays at zero")
