"""``GET /businesses``: every business seen in a window, busiest first (the dashboard's picker)."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, jsonify, request
from pydantic import BaseModel, ValidationError

from .. import store
from ..auth import get_auth, require_scope
from ..db import DatabaseMisconfigured, DatabaseUnavailable
from ..errors import error_response
from ..ratelimit import rate_limited
from ..schemas import InvalidRequest, WindowDays, field_errors
from ..services import get_services

bp = Blueprint("businesses", __name__)


class BusinessesQuery(BaseModel):
    """Query of ``/businesses``: a window of 1 to 366 days, as for ``/analytics``."""

    days: WindowDays = 30


@bp.get("/businesses")
@rate_limited("read")
@require_scope("read")
def businesses():
    """Each business with messages over the last ``days`` (query, default 30), busiest first.

    Body: ``{"days", "period": "<N>_days", "businesses": [{"business_id",
    "messages", "tokens", "cost_usd", "api_cost_usd", "success_rate"}],
    "timestamp"}``. Units: tokens, US dollars; ``cost_usd`` is the service's
    price (mlops/prices.py; unpriced calls left out), ``api_cost_usd`` the
    client's own figure; ``success_rate`` is the mean of the events'
    ``success_rate`` (0..1). Ties in ``messages`` are ordered by
    ``business_id`` so the list is stable between refreshes. A business with
    no message in the window is not listed, nor, for a key limited to some
    businesses, any other business. Errors: 401/403 (key), 422 (bad
    ``days``), 503 (database).
    """
    try:
        query = BusinessesQuery.model_validate({"days": request.args.get("days", "30")})
    except ValidationError as exc:
        raise InvalidRequest(field_errors(exc)) from None
    try:
        totals = store.business_totals(get_services().db, query.days)
    except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
        return error_response(503, "database_unavailable", f"database unavailable: {exc}")
    allowed = get_auth().businesses("read")  # None: every business
    rows = sorted((row for row in totals if allowed is None or row[0] in allowed),
                  key=lambda row: (-row[1], row[0]))
    return jsonify({
        "days": query.days,
        "period": f"{query.days}_days",
        "businesses": [
            {"business_id": row[0], "messages": row[1], "tokens": row[2],
             "cost_usd": row.cost_usd, "api_cost_usd": row[3], "success_rate": row[4]}
            for row in rows
        ],
        "timestamp": datetime.now(UTC).isoformat(),
    })
