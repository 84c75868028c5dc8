"""``POST /track`` and ``POST /track/batch``: the chat app's writes."""

from __future__ import annotations

from flask import Blueprint, jsonify

from ..auth import FORBIDDEN_MESSAGE, get_auth, require_scope
from ..bodies import read_body
from ..errors import error_response
from ..ratelimit import rate_limited
from ..schemas import InvalidRequest, parse_batch, parse_event
from ..services import get_services
from ..telemetry import EVENTS_REJECTED

bp = Blueprint("track", __name__)

STATUS_FOR = {"stored": 201, "queued": 202}
_CONFLICT = "event_id is already stored for another business"


@bp.post("/track")
@rate_limited("track")
@require_scope("write")
def track():
    """Store one MetricsData event.

    Body: the contract's MetricsData (see ``/openapi.json``); ``event_id``
    optional. Answers 201 ``{"status": "success", "storage": "stored",
    "event_id", "timestamp"}`` once the row is committed in Postgres, or 202
    with ``"storage": "queued"`` once it is fsynced to the local spool while
    Postgres is away. Sending the same ``event_id`` again for the same
    business is a replay: 201 again, stored once. Errors: 401/403 (API key,
    ``write`` scope; 403 too for a ``business_id`` the key is not limited to,
    nothing stored), 408 (body slower than ``BODY_READ_TIMEOUT_SECONDS``),
    409 ``event_id_conflict`` naming ``event_id`` when that id is stored for
    another business (nothing stored), 413 (body over ``MAX_BODY_BYTES``),
    415 (not JSON), 422 (each bad field named), 429 with ``Retry-After``
    (``RATE_LIMIT_TRACK``), 503 with ``Retry-After`` when the database is
    away and the spool is full.
    """
    services = get_services()
    try:
        event = parse_event(read_body(services.settings.max_body_bytes))
    except InvalidRequest:
        EVENTS_REJECTED.labels("invalid").inc()
        raise
    if (refusal := get_auth().check_business("write", event.business_id)) is not None:
        return refusal
    storage, (record,), conflicts = services.ingestor.submit([event])
    if conflicts:
        return error_response(409, "event_id_conflict", _CONFLICT,
                              [{"field": "event_id", "problem": _CONFLICT}])
    return jsonify({
        "status": "success",
        "message": "Metrics tracked successfully",
        "storage": storage,
        "event_id": record.event_id,
        "timestamp": record.received_at.isoformat(),
    }), STATUS_FOR[storage]


@bp.post("/track/batch")
@rate_limited("batch")
@require_scope("write")
def track_batch():
    """Store up to ``MAX_BATCH_EVENTS`` events given as a JSON array.

    Valid items are inserted together in one statement and one transaction
    (or spooled together); invalid ones are reported and skipped. Answers 207
    with ``results``: one ``{"index", "status", "event_id"|"error"}`` per item,
    in input order, where ``status`` is what ``/track`` would have answered
    (201, 202, 403 with ``error`` naming ``business_id`` for a business the
    key is not limited to, nothing said of that business, 409 with ``error`` naming
    ``event_id``, or 422); ``accepted``
    counts the 201/202 items, ``rejected`` the others. Errors for the whole
    body: 413 (over ``MAX_BATCH_BODY_BYTES``), 415, 422 (not an array, too
    many items, not JSON; the length is checked before any item), 408 (body
    slower than ``BODY_READ_TIMEOUT_SECONDS``), 401/403 (``write`` scope),
    429 (``RATE_LIMIT_BATCH``), 503 (spool full).
    """
    services = get_services()
    limit = services.settings.max_batch_events
    parsed = parse_batch(read_body(services.settings.max_batch_body_bytes), limit)

    results: list[dict] = [{} for _ in parsed]
    valid, positions, invalid = [], [], 0
    allowed = get_auth().businesses("write")  # None: every business
    for index, item in enumerate(parsed):
        if isinstance(item, InvalidRequest):
            results[index] = {"index": index, "status": 422, "error": item.problems}
            invalid += 1
        elif allowed is not None and item.business_id not in allowed:
            results[index] = {"index": index, "status": 403, "error": [
                {"field": "business_id", "problem": FORBIDDEN_MESSAGE}]}
        else:
            valid.append(item)
            positions.append(index)
    EVENTS_REJECTED.labels("invalid").inc(invalid)
    get_auth().count_refusals("write", len(parsed) - len(valid) - invalid)

    storage, conflicts = None, set()
    if valid:
        # A batch is not the chat app's fire-and-forget call: it may take the
        # statement timeout, not /track's short deadline.
        storage, records, conflicts = services.ingestor.submit(
            valid, timeout_ms=services.settings.db_statement_timeout_ms)
        for position, (index, record) in enumerate(zip(positions, records, strict=True)):
            if position in conflicts:
                results[index] = {"index": index, "status": 409, "event_id": record.event_id,
                                  "error": [{"field": "event_id", "problem": _CONFLICT}]}
            else:
                results[index] = {"index": index, "status": STATUS_FOR[storage],
                                  "event_id": record.event_id}
    accepted = len(valid) - len(conflicts)
    return jsonify({
        "status": "success" if accepted == len(parsed) else "partial",
        "storage": storage,
        "accepted": accepted,
        "rejected": len(parsed) - accepted,
        "results": results,
    }), 207
