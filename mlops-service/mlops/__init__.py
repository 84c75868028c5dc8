"""mlops-service: records how a chat app's AI model behaves.

Data flows one way: request -> schema (validate) -> store (Postgres, or the
spool while it is away) -> telemetry (Prometheus) -> response.
"""

from __future__ import annotations

import logging
import time

from flask import Flask, g

__version__ = "1.0.0"

log = logging.getLogger("mlops")


def create_app(settings=None) -> Flask:
    """Build the Flask app. ``settings`` defaults to ``Settings.from_env()``.

    Touches no database: the pool fills lazily, so this is safe in every
    gunicorn worker and when Postgres is down (events spool until it is back).
    Raises ``ConfigError`` for a missing or malformed setting.
    """
    from flask_cors import CORS

    from . import errors, logs, retention, telemetry
    from .config import Settings
    from .db import Database
    from .ingest import Ingestor
    from .routes import analytics, erasure, health, metrics, openapi, track
    from .services import Services
    from .spool import Spool

    settings = settings or Settings.from_env()
    logs.configure(settings.log_dir, settings.log_level)

    app = Flask(__name__)
    app.json.sort_keys = False
    if settings.allowed_origins:
        CORS(app, origins=list(settings.allowed_origins))

    db = Database(settings)
    spool = Spool(settings.spool_dir, settings.spool_max_bytes)
    telem = telemetry.Telemetry(
        db, spool, max_businesses=settings.metrics_max_businesses,
        max_label_values=settings.metrics_max_label_values,
        cache_seconds=settings.metrics_cache_seconds, version=__version__)
    ingestor = Ingestor(db, spool, telem, insert_timeout_ms=settings.db_insert_timeout_ms)
    Services(settings, db, spool, telem, ingestor).install(app)

    @app.before_request
    def _start_timer() -> None:  # read by the request log and the HTTP metrics
        g.request_started = time.perf_counter()

    for module in (track, health, metrics, analytics, openapi):
        app.register_blueprint(module.bp)
    app.register_blueprint(erasure.bp)
    errors.init_app(app)
    logs.init_app(app)
    telemetry.init_app(app)
    ingestor.flusher.start()
    maintenance = retention.Maintenance.from_settings(db, settings)
    app.extensions["mlops.maintenance"] = maintenance
    maintenance.start()

    log.debug("worker ready", extra={"version": __version__})
    return app


def announce(settings, database: str) -> None:
    """The one start-up log line of a server (gunicorn master or ``python app.py``)."""
    log.info("mlops-service starting", extra={
        "version": __version__,
        "port": settings.service_port,
        "database": database,
        "auth": "api_key" if settings.api_key else "open",
        "cors_origins": list(settings.allowed_origins),
    })
    if not settings.api_key:
        log.warning("MLOPS_API_KEY is not set: /track, /track/batch, /refresh-metrics and "
                    "/analytics are open to anyone who can reach this port")
