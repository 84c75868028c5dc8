"""mlops-service: records how a chat app's AI model behaves.

``create_app`` wires the parts; each module names its concern (config, db,
migrate, schemas, ingest -> deliver | outbox -> store, telemetry, routes/*).
"""

from __future__ import annotations

import logging
import time

from flask import Flask, g

from .version import __version__

log = logging.getLogger("mlops")


def create_app(settings=None) -> Flask:
    """Build the Flask app. ``settings`` defaults to ``Settings.from_env()``.

    Touches no database: the pool fills lazily, so this is safe in every
    gunicorn worker and when Postgres is down (events spool until it is back).
    Migrations run before, once per server (``mlops.db.check_at_start``).
    Raises ``ConfigError`` for a missing or malformed setting.
    """
    from flask_cors import CORS

    from . import errors, logs, telemetry
    from .config import Settings
    from .db import Database
    from .deliver import Delivery
    from .ingest import Ingestor
    from .outbox import Outbox
    from .routes import analytics, health, metrics, openapi, track
    from .services import Services
    from .spool import Spool

    settings = settings or Settings.from_env()
    logs.configure(settings.log_dir, settings.log_level, settings.spool_dir)

    app = Flask(__name__)
    app.json.sort_keys = False
    if settings.allowed_origins:
        CORS(app, origins=list(settings.allowed_origins))

    db = Database(settings)
    spool = Spool(settings.spool_dir, settings.spool_max_bytes)
    telem = telemetry.Telemetry(
        db, spool, max_businesses=settings.metrics_max_businesses,
        max_label_values=settings.metrics_max_label_values,
        cache_seconds=settings.metrics_cache_seconds, version=__version__,
        multiprocess=settings.prometheus_multiproc_dir is not None)
    deliver = Delivery(db, telem)
    outbox = Outbox(spool, deliver, timeout_ms=db.default_timeout_ms)
    ingestor = Ingestor(deliver, outbox, timeout_ms=settings.db_insert_timeout_ms)
    Services(settings, db, outbox, telem, ingestor).install(app)

    @app.before_request
    def _start_timer() -> None:  # read by the request log and the HTTP metrics
        g.request_started = time.perf_counter()

    for module in (track, health, metrics, analytics, openapi):
        app.register_blueprint(module.bp)
    errors.init_app(app)
    logs.init_app(app)
    telemetry.init_app(app)
    outbox.start()

    log.debug("worker ready", extra={"version": __version__})
    return app


def announce(settings, database: str) -> None:
    """The one start-up log line of a server (gunicorn master or ``python app.py``)."""
    log.info("mlops-service starting", extra={
        "version": __version__,
        "host": settings.host,
        "port": settings.service_port,
        "database": database,
        "auth": "api_key" if settings.api_key else "open",
        "cors_origins": list(settings.allowed_origins),
    })
    if not settings.api_key:
        log.warning("MLOPS_API_KEY is not set: /track, /track/batch, /refresh-metrics and "
                    "/analytics are open to anyone who can reach this port")
