"""``GET /metrics``: Prometheus text exposition, merged across gunicorn workers."""

from __future__ import annotations

from flask import Blueprint, Response

from ..auth import require_metrics_token
from ..services import get_services

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
@require_metrics_token
def metrics():
    """All metrics in Prometheus text format 0.0.4 (see ``mlops/telemetry.py``).

    Counters are summed over every worker (multiprocess mode); gauges derived
    from Postgres and the spool are read at scrape time. With
    ``MLOPS_METRICS_TOKEN`` set: 401 unless ``Authorization: Bearer <token>``.
    """
    body, content_type = get_services().telemetry.render()
    return Response(body, content_type=content_type)
