"""Structured logs: one JSON object per line, to stdout and to ``LOG_DIR``.

Uses python-json-logger for the format and concurrent-log-handler for the
file, which several gunicorn workers may rotate safely at once. If
``LOG_DIR`` cannot be written, one warning says so and logging carries on
to stdout only.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from concurrent_log_handler import ConcurrentRotatingFileHandler
from flask import Flask, g, request
from pythonjsonlogger.json import JsonFormatter

LOG_FILE = "mlops-service.log"
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5

access = logging.getLogger("mlops.access")


# (process id, arguments) of the last configure(): a process configures its logs once.
_configured: tuple | None = None


def configure(log_dir: Path, level: str, lock_dir: Path | None = None) -> None:
    """Route the ``mlops`` logger tree to stdout and ``log_dir/mlops-service.log``.

    The rotation lock file the workers share goes in ``lock_dir`` (the
    service's ``SPOOL_DIR``), not among the user's logs; default: ``log_dir``.
    Once per process: called again with the same arguments (``python app.py``
    starts, then builds its app) it does nothing; in a forked worker, or
    with other arguments (tests build many apps), it replaces the handlers.
    """
    global _configured
    key = (os.getpid(), Path(log_dir), level, Path(lock_dir) if lock_dir else None)
    if key == _configured:
        return
    _configured = key
    formatter = JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",  # ISO 8601, UTC
    )
    root = logging.getLogger("mlops")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    root.propagate = False

    stdout = logging.StreamHandler(sys.stdout)
    stdout.setFormatter(formatter)
    root.addHandler(stdout)

    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        handler = ConcurrentRotatingFileHandler(
            str(log_dir / LOG_FILE), maxBytes=MAX_BYTES, backupCount=BACKUPS,
            encoding="utf-8", lock_file_directory=str(lock_dir) if lock_dir else None)
    except OSError as exc:
        root.warning("LOG_DIR is not writable; logging to stdout only",
                     extra={"log_dir": str(log_dir), "error": exc.strerror})
        return
    handler.setFormatter(formatter)
    root.addHandler(handler)


def init_app(app: Flask) -> None:
    """Log one line per request: method, path, route, status, duration, client.

    The duration runs from ``g.request_started``, set by the app factory.
    """

    @app.after_request
    def _log_request(response):
        started = g.get("request_started")
        duration_ms = (time.perf_counter() - started) * 1000 if started else None
        access.info("request", extra={
            "method": request.method,
            "path": request.path,
            "endpoint": request.url_rule.rule if request.url_rule else None,
            "status": response.status_code,
            "duration_ms": round(duration_ms, 3) if duration_ms is not None else None,
            "remote_addr": request.remote_addr,
        })
        return response
