"""``GET /metrics`` (Prometheus text exposition, merged across gunicorn workers) and
``POST /refresh-metrics`` (the chat app's "re-read the gauges now")."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import UnsupportedMediaType

from ..auth import require_metrics_credentials
from ..bodies import REFRESH_BODY_BYTES, read_body
from ..errors import error_response
from ..ratelimit import rate_limited
from ..schemas import InvalidRequest, RefreshRequest, field_errors
from ..services import get_services

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
@require_metrics_credentials
def metrics():
    """All metrics in Prometheus text format 0.0.4 (see ``mlops/telemetry.py``).

    Counters are summed over every worker (multiprocess mode); gauges derived
    from Postgres and the spool are read at scrape time. The body names every
    business and its costs, so with ``MLOPS_METRICS_TOKEN`` or API keys set it
    answers 401 unless given ``Authorization: Bearer <token>`` or a key with
    the ``read`` scope (``Bearer`` or ``X-API-Key``); see ``mlops/auth.py``.
    """
    body, content_type = get_services().telemetry.render()
    return Response(body, content_type=content_type)


@bp.post("/refresh-metrics")
@rate_limited("refresh")
def refresh_metrics():
    """Recompute the Postgres-derived gauges of ``/metrics`` (per-business 30-day totals).

    Body (optional): ``{"trigger": "new_metrics"}``, at most
    ``REFRESH_BODY_BYTES`` (1 KiB; 413 past it); another field is a 422.
    Cheap to call after every
    message: the gauges are marked stale for every worker and re-read here at
    most once a second (else by the next scrape). Answers 200
    ``{"status": "success", "refreshed", "businesses", "database_up"}``, 503
    when Postgres could not be read, 422 for a malformed body, 429
    (``RATE_LIMIT_REFRESH``). Takes no API key: the chat app calls it without
    one even once it sends a key to ``/track``, and it changes no data.
    """
    body = read_body(REFRESH_BODY_BYTES, json=False)
    if body.strip():
        if not request.is_json:
            raise UnsupportedMediaType("Content-Type must be application/json")
        try:
            RefreshRequest.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidRequest(field_errors(exc)) from None
    outcome = get_services().telemetry.state.request_refresh()
    if not outcome["database_up"]:
        return error_response(503, "database_unavailable",
                              "metrics not refreshed: database unavailable")
    return jsonify({"status": "success", **outcome,
                    "timestamp": datetime.now(UTC).isoformat()})
