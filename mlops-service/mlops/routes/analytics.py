"""``GET /analytics/<business_id>``: per-business aggregates read from the rollups."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, jsonify, request
from pydantic import BaseModel, ValidationError

from .. import store
from ..auth import get_auth, require_scope
from ..db import DatabaseMisconfigured, DatabaseUnavailable
from ..errors import error_response
from ..ratelimit import rate_limited
from ..schemas import Id, InvalidRequest, WindowDays, field_errors
from ..services import get_services

bp = Blueprint("analytics", __name__)


class AnalyticsQuery(BaseModel):
    """Path and query of ``/analytics``: the business and a window of 1 to 366 days."""

    business_id: Id
    days: WindowDays = 30


@bp.get("/analytics/<path:business_id>")
@rate_limited("read")
@require_scope("read")
def analytics(business_id: str):
    """Aggregates for ``business_id`` over the last ``days`` UTC days, today included.

    ``days`` is a query parameter (default 30). Read from the rollups (see
    ``store.analytics``): counts, sums and means exact, p50/p95 within 4.9%.
    ``cost_usd`` is the service's price of the calls (docs/prices.md),
    ``api_cost_usd`` the client's own figure.

    Body: ``{"business_id", "period": "<N>_days", "days", "metrics": {the
    course's keys + total_messages, total_tokens, total_cost_usd,
    p50/p95_response_time_ms, success_rate}, "cost": {cost_usd,
    client_estimate_usd, client_estimate_difference, priced/estimated/
    unpriced/pending_messages, unpriced_models, unpriced (a line naming the
    models no price table knows, when some are)}, "by_model": [...],
    "daily": [{date, messages, tokens, api_cost_usd, cost_usd,
    avg/p50/p95_response_time_ms, appointments_booked}],
    "by_intent": [{"intent_detected", "messages"}] (busiest first, ties by
    name), "timestamp"}``. An unknown business gets zeros and empty lists.
    Errors: 401/403 (API key, ``read`` scope; 403 too for a business the key
    is not limited to, the same answer whether it exists or not), 422 (bad ``days``), 429
    (``RATE_LIMIT_READ``), 503 (database).
    """
    try:
        query = AnalyticsQuery.model_validate(
            {"business_id": business_id, "days": request.args.get("days", "30")})
    except ValidationError as exc:
        raise InvalidRequest(field_errors(exc)) from None
    if (refusal := get_auth().check_business("read", query.business_id)) is not None:
        return refusal
    services = get_services()
    try:
        result = store.analytics(services.db, query.business_id, query.days)
    except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
        return error_response(503, "database_unavailable", f"database unavailable: {exc}")
    return jsonify({
        "business_id": query.business_id,
        "period": f"{query.days}_days",
        "days": query.days,
        **result,
        "monitoring": "prometheus",
        "prometheus_metrics_url": "/metrics",
        "timestamp": datetime.now(UTC).isoformat(),
    })
