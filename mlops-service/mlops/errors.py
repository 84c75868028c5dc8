"""JSON errors for every failure: a status, a machine-readable code, the bad fields.

Shape: ``{"status": "error", "error": "<code>", "message": "...",
"errors": [{"field": ..., "problem": ...}]}``. No stack trace ever reaches a
client; unexpected exceptions are logged and answered with a bare 500.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from .schemas import InvalidRequest
from .spool import SpoolFull
from .telemetry import EVENTS_REJECTED

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


def error_response(status: int, code: str, message: str, errors: list[dict] | None = None):
    """A Flask response tuple for an error."""
    body = {"status": "error", "error": code, "message": message}
    if errors is not None:
        body["errors"] = errors
    return jsonify(body), status


def init_app(app: Flask) -> None:
    """Register the handlers that turn exceptions into JSON error responses."""

    @app.errorhandler(InvalidRequest)
    def _invalid(exc: InvalidRequest):
        fields = ", ".join(p["field"] for p in exc.problems[:10])
        return error_response(422, "validation_failed", f"invalid fields: {fields}",
                              exc.problems)

    @app.errorhandler(SpoolFull)
    def _spool_full(exc: SpoolFull):
        EVENTS_REJECTED.labels("spool_full").inc()
        log.error("spool full; refusing events until the database drains it",
                  extra={"error": str(exc)})
        response, status = error_response(
            503, "spool_full", "database unavailable and local spool full; retry later")
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response, status

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; see the service log")
