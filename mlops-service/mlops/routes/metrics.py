"""``GET /metrics``: Prometheus text exposition, merged across gunicorn workers."""

from __future__ import annotations

from flask import Blueprint, Response

from ..auth import require_metrics_credentials
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
