"""``GET /health`` (liveness), ``/health/ready`` (readiness) and ``/health/detailed``.

All three answer without a key (probes carry none). The database's own
error text (host, port, user, server message) is in the service log (the
pool logs it when the database goes down), and goes to a caller only with a
key granting ``read``; others see ``unavailable`` or
``misconfigured``. With keys set, ``/health/detailed``'s details need the
``read`` scope too.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

from flask import Blueprint, jsonify

from .. import prices
from ..auth import HEADER, get_auth
from ..db import DatabaseMisconfigured, DatabaseUnavailable
from ..draining import is_draining
from ..services import get_services
from ..storage_budget import get_storage_budget
from ..version import __version__

bp = Blueprint("health", __name__)


# Milliseconds a health check waits for Postgres: inside Kubernetes' default
# probe timeoutSeconds of 1, so a silent database reads as 503, not a timeout.
PING_TIMEOUT_MS = 500


def _database_status(services, reveal: bool) -> dict:
    """One real round trip: ``{"status": "up"|"down"|"full", "latency_ms", "error"?}``.

    Bounded by ``PING_TIMEOUT_MS`` whatever state the database is in.
    ``full``: it answers, but refused this process's last write for lack of
    space (SQLSTATE 53100, see ``Database.full_reason``).
    ``error`` is the database's message when ``reveal``, else only its kind
    (``unavailable`` or ``misconfigured``); ``mlops.db`` logs the message
    when the database goes down.
    """
    started = time.perf_counter()
    try:
        services.db.ping(PING_TIMEOUT_MS)
    except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
        kind = "misconfigured" if isinstance(exc, DatabaseMisconfigured) else "unavailable"
        return {"status": "down", "error": str(exc) if reveal else kind,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3)}
    latency_ms = round((time.perf_counter() - started) * 1000, 3)
    if (full := services.db.full_reason()) is not None:
        return {"status": "full", "error": full if reveal else "full", "latency_ms": latency_ms}
    return {"status": "up", "latency_ms": latency_ms}


def _reveal() -> bool:
    """Whether this caller may read details: keys are set and its key grants ``read``."""
    return get_auth().allows("read")


def _spool_status(services) -> dict:
    spool = services.outbox.spool
    return {"depth": spool.depth(), "oldest_age_seconds": round(spool.oldest_age_seconds(), 3),
            "size_bytes": spool.size_bytes(), "max_bytes": spool.max_bytes}


@bp.get("/health")
def health():
    """Liveness: 200 while the process serves requests; touches no dependency.

    Body: ``{"status": "healthy", "service": "mlops-service", "timestamp"
    (UTC ISO 8601), "monitoring": "prometheus"}`` (the course's shape).
    """
    return jsonify({
        "status": "healthy",
        "service": "mlops-service",
        "timestamp": datetime.now(UTC).isoformat(),
        "monitoring": "prometheus",
    })


@bp.get("/health/ready")
def ready():
    """Readiness: 503 while draining (after SIGTERM), else 200 if Postgres answers ``SELECT 1``
    and has room for writes (503 ``"database full: ..."`` after a write refused with
    SQLSTATE 53100).

    With ``READINESS_CHECKS_DATABASE=false`` (the Kubernetes manifests) the
    database is not asked: an instance whose Postgres is away still takes
    events into its spool, so it stays in the load balancer's pool.
    Body: ``{"status": "ready"|"unavailable"|"draining", "database": {...},
    "spool": {depth, oldest_age_seconds, ...}}``; on 503, ``reason`` says why
    (the database's own message only to a key with the ``read`` scope).
    """
    services = get_services()
    if is_draining():
        return jsonify({"status": "draining", "reason": "shutting down",
                        "spool": _spool_status(services)}), 503
    if not services.settings.readiness_checks_database:
        return jsonify({"status": "ready", "database": {"status": "not_checked"},
                        "spool": _spool_status(services)})
    database = _database_status(services, _reveal())
    body = {"status": "ready" if database["status"] == "up" else "unavailable",
            "database": database, "spool": _spool_status(services)}
    if database["status"] == "full":
        detail = "" if database["error"] == "full" else f": {database['error']}"
        body["reason"] = "database full: writes are spooled until space is freed" + detail
        return jsonify(body), 503
    if database["status"] != "up":
        body["reason"] = f"database unavailable: {database['error']}"
        return jsonify(body), 503
    return jsonify(body)


@bp.get("/health/detailed")
def detailed():
    """Everything an operator asks first: uptime (s), version, database, pool, spool,
    the database's size against its budget (``storage``, see :func:`_storage_status`),
    and ``price_table`` (genai-prices version, ``+overrides-<sha256 prefix>`` of PRICES_FILE).

    Always 200 (it reports, it does not judge); ``status`` is ``"healthy"`` or
    ``"degraded"`` (database down or full). With API keys set and no key granting
    ``read``, only what the open ``/health/ready`` tells: ``{"status",
    "service", "database": {"status"}, "auth", "timestamp", "details"}``, where
    ``details`` says what to send for the rest. The version, pool, spool and
    the database's error text need the key (they help an attacker more than
    a prober).

    With a read key, ``keys`` lists the configured keys: ``[{"key_id",
    "source" (the variable naming it), "name", "scopes", "businesses" (per
    scope a list, or null for every business), "expires_at", "expired"}]``,
    never a key itself; a key limited to some businesses sees only its own
    entry (the others name other businesses).
    """
    services = get_services()
    auth = "api_key" if services.auth.mode != "off" else "open"
    reveal = _reveal()
    database = _database_status(services, reveal)
    status = "healthy" if database["status"] == "up" else "degraded"
    if auth == "api_key" and not reveal:
        return jsonify({
            "status": status,
            "service": "mlops-service",
            "database": {"status": database["status"]},
            "auth": auth,
            "timestamp": datetime.now(UTC).isoformat(),
            "details": f"send an {HEADER} with the read scope for version, database, "
                       "pool and spool",
        })
    return jsonify({
        "status": status,
        "service": "mlops-service",
        "version": __version__,
        "pid": os.getpid(),
        "uptime_seconds": round(time.monotonic() - services.started_at, 3),
        "database": database,
        "pool": {"max_connections": services.db.pool_size, "in_use": services.db.pool_in_use()},
        "spool": _spool_status(services),
        "storage": _storage_status(),
        "auth": auth,
        "price_table": prices.current().version,
        **({"keys": _keys(services.auth)} if reveal else {}),
        "timestamp": datetime.now(UTC).isoformat(),
    })


def _keys(auth) -> list[dict]:
    """Each configured key as ``/health/detailed`` lists it; only the caller's own
    when its ``read`` scope is limited to some businesses."""
    own = auth.identify().key_id if auth.businesses("read") is not None else None
    now = datetime.now(UTC)
    return [{"key_id": key_id, "source": source, **grant.describe(),
             "expired": grant.expired(now)}
            for key_id, source, grant in auth.keyring.listing
            if own is None or key_id == own]


def _storage_status() -> dict:
    """The database's size against ``DATABASE_SIZE_LIMIT`` (``mlops.storage_budget``).

    ``{"size_bytes", "sampled_at", "limit_bytes", "used_ratio",
    "growth_bytes_per_day", "days_left"}``; before the first sample only
    ``{"size_bytes": null, "limit_bytes"}``.
    """
    budget = get_storage_budget()
    reading = budget.reading()
    if reading is None:
        return {"size_bytes": None, "limit_bytes": budget.limit_bytes}
    return reading.as_json()
