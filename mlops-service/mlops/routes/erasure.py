"""Erasure on request, and its audit trail.

``DELETE /conversations/<id>``, ``DELETE /sessions/<id>`` and
``DELETE /businesses/<id>`` each remove the raw events, the events still
waiting in this replica's spool, and their share of every rollup (in one
Postgres transaction; see ``store.erase_conversation`` /
``store.erase_session`` / ``store.erase_business``), and from then on
refuse copies received before it (other replicas' spools, requests in
flight). The same transaction appends one row to the append-only audit
table ``mlops_erasure_audit`` (who: the caller's key id; what; how much),
which ``GET /erasures`` reads; a request refused for want of an ``erase``
key (401/403) is appended too. A business's labelled series leave this
replica's ``/metrics`` at once (``Telemetry.forget_business``), and the
Postgres-derived gauges are marked stale for every worker (re-read by the
erasing worker at once, by the others at their next scrape).

A key limited to some businesses (``MLOPS_KEYS_FILE``) erases one of them,
or a conversation or session whose stored events all belong to them; any
other id gets the 403 of a refused key, whether it exists or not (one it
holds no stored event of included), and ``GET /erasures``, which names
every business's ids, is refused to it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from functools import wraps
from typing import Annotated

from flask import Blueprint, jsonify, make_response, request
from pydantic import BaseModel, Field, ValidationError

from .. import store
from ..auth import FORBIDDEN_MESSAGE, HEADER, bearer_token, get_auth, key_id, require_scope
from ..db import DatabaseMisconfigured, DatabaseUnavailable
from ..errors import error_response
from ..ratelimit import rate_limited
from ..schemas import Id, InvalidRequest, field_errors
from ..services import get_services
from ..spool import SpoolBusy

bp = Blueprint("erasure", __name__)

log = logging.getLogger(__name__)
# One JSON line per erasure, for log pipelines; the lasting record is the table.
audit = logging.getLogger("mlops.audit")
audit.setLevel(logging.INFO)  # audit lines are written whatever LOG_LEVEL says

# Longest target id a refusal records (ids are at most 255 characters, schemas.Id;
# a refused request's path was never validated).
_REFUSED_ID_CHARS = 255


class _ConversationPath(BaseModel):
    conversation_id: Id


class _SessionPath(BaseModel):
    session_id: Id


class _BusinessPath(BaseModel):
    business_id: Id


class ErasuresQuery(BaseModel):
    """Query of ``GET /erasures``: a page size, and the ``id`` to continue below."""

    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    before: Annotated[int | None, Field(ge=1, le=2**63 - 1)] = None


def _requester() -> store.Requester:
    """The caller as the audit names them: ``mlops.auth.key_id`` of the key they sent
    (a refused one included), or ``"none"`` without one or while auth is off."""
    key = request.headers.get(HEADER) or bearer_token()
    return store.Requester(key_id(key) if key and get_auth().mode != "off" else "none")


def _audit_refusals(view):
    """Decorator (inside ``rate_limited``, outside ``require_scope``): append each
    401/403 to the audit trail, naming the key sent (its id) and the target."""
    @wraps(view)
    def wrapper(**path):
        response = make_response(view(**path))
        if response.status_code in (401, 403):
            (field, value), = path.items()
            reason = (response.get_json(silent=True) or {}).get("error", "")
            try:
                store.record_erasure_refusal(get_services().db, _requester(), field,
                                             value[:_REFUSED_ID_CHARS], response.status_code,
                                             reason)
            except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
                log.warning("erasure refusal not recorded: database unavailable",
                            extra={"error": str(exc), "target": field})
        return response

    return wrapper


@bp.delete("/conversations/<path:conversation_id>")
@rate_limited("erase")
@_audit_refusals
@require_scope("erase")
def erase_conversation(conversation_id: str):
    """Erase one conversation (every business's events carrying this id).

    Answers 200 ``{"status": "success", "erased": {"conversation_id"},
    "removed": {"mlops_events", "mlops_rollup_daily", "mlops_rollup_latency",
    "mlops_rollup_intents", "mlops_rollup_conversations",
    "rollup_rows_recomputed", "spooled_events"}, "timestamp"}``,
    with zeros when nothing matched. Errors: 401/403 (API key; erasure needs
    a full key; recorded in the audit trail), 422 (id too long), 429, 503
    (database, or the spool's WAL held by a reader past the busy timeout).
    """
    _validate(_ConversationPath, conversation_id=conversation_id)
    if (refusal := _check_holders("conversation_id", conversation_id)) is not None:
        return refusal
    return _erase("conversation_id", conversation_id, store.erase_conversation)


@bp.delete("/sessions/<path:session_id>")
@rate_limited("erase")
@_audit_refusals
@require_scope("erase")
def erase_session(session_id: str):
    """Erase one session (every event carrying this ``session_id``, of any business).

    Answers as ``DELETE /conversations/<id>``, with ``"erased": {"session_id"}``;
    ``mlops_rollup_conversations`` counts the conversations left without any
    event. Errors: 401/403, 422, 429, 503.
    """
    _validate(_SessionPath, session_id=session_id)
    if (refusal := _check_holders("session_id", session_id)) is not None:
        return refusal
    return _erase("session_id", session_id, store.erase_session)


@bp.delete("/businesses/<path:business_id>")
@rate_limited("erase")
@_audit_refusals
@require_scope("erase")
def erase_business(business_id: str):
    """Erase every event and rollup row of one business.

    Answers 200 ``{"status": "success", "erased": {"business_id"},
    "removed": {"mlops_events", "mlops_rollup_daily", "mlops_rollup_latency",
    "mlops_rollup_intents", "mlops_rollup_conversations", "spooled_events"},
    "timestamp"}``, with zeros when nothing matched. Its labelled series
    (``ai_requests_total{business_id=...}`` and the like) leave ``/metrics``.
    Errors: 401/403, 422, 429, 503.
    """
    _validate(_BusinessPath, business_id=business_id)
    if (refusal := get_auth().check_business("erase", business_id)) is not None:
        return refusal
    return _erase("business_id", business_id, store.erase_business,
                  on_erased=get_services().telemetry.forget_business)


@bp.get("/erasures")
@rate_limited("read")
@require_scope("erase")
def erasures():
    """The erasure audit trail, newest first, one page at a time.

    Query: ``limit`` (1..1000, default 100), ``before`` (an ``id``: rows
    below it; the previous page's ``next_before``). Answers 200
    ``{"erasures": [{"id", "at", "outcome": "erased"|"refused", "key_id",
    "target": "business_id"|"conversation_id"|"session_id", "target_id",
    "events", "spooled_events", "rollup_changes", "detail"}], "next_before"}``
    where ``key_id`` is ``mlops.auth.key_id`` of the caller's key (``"none"``
    without one), ``events``/``spooled_events``/``rollup_changes`` count
    what left Postgres, the spool and the rollups, ``detail`` holds the
    erasure's ``removed`` or the refusal's ``status`` and ``reason``, and
    ``next_before`` is null on the last page. Needs an ``erase`` key (it names
    erased ids), limited to no business. Errors: 401/403, 422 (bad
    ``limit``/``before``), 429, 503.
    """
    if (refusal := get_auth().check_business("erase")) is not None:
        return refusal
    try:
        query = ErasuresQuery.model_validate(request.args.to_dict())
    except ValidationError as exc:
        raise InvalidRequest(field_errors(exc)) from None
    try:
        rows = store.erasure_audit(get_services().db, query.limit, query.before)
    except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
        return error_response(503, "database_unavailable", f"database unavailable: {exc}")
    return jsonify({"erasures": rows,
                    "next_before": rows[-1]["id"] if len(rows) == query.limit else None})


def _validate(model: type[BaseModel], **path) -> None:
    try:
        model.model_validate(path)
    except ValidationError as exc:
        raise InvalidRequest(field_errors(exc)) from None


def _check_holders(field: str, value: str):
    """``None`` if the key may erase every stored event whose ``field`` is ``value``,
    else the 403 (also when there is none: a limited key learns nothing of ids
    that are not its businesses'), or a 503 when Postgres cannot say."""
    auth = get_auth()
    allowed = auth.businesses("erase")
    if allowed is None:
        return None
    try:
        holders = store.businesses_holding(get_services().db, field, value)
    except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
        return error_response(503, "database_unavailable", f"database unavailable: {exc}")
    if holders and holders <= allowed:
        return None
    auth.count_refusals("erase")
    return error_response(403, "forbidden", FORBIDDEN_MESSAGE)


def _erase(field: str, value: str, erase, on_erased=None):
    """Erase ``value`` of ``field`` from the spool, then Postgres (``erase``); audit it.

    ``on_erased(value)`` runs once both are done, never after a refusal.
    """
    services = get_services()
    # The spool first: an event flushed from it after this point would carry
    # data back into Postgres after its erasure.
    try:
        spooled = services.outbox.discard(field, value)
    except SpoolBusy as exc:
        return error_response(503, "spool_busy", f"erasure not done, try again: {exc}")
    try:
        removed = erase(services.db, value, services.settings.erasure_timeout_ms,
                        requester=_requester(), spooled_events=spooled)
    except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
        # The spooled copies are gone already; the audit row could not be written.
        log.error("erasure failed: database unavailable",
                  extra={"error": str(exc), "target": field, "spooled_events": spooled})
        return error_response(503, "database_unavailable", f"database unavailable: {exc}")
    # The Postgres-derived gauges: stale for every worker, re-read here.
    services.telemetry.state.request_refresh()
    if on_erased is not None:
        on_erased(value)
    now = datetime.now(UTC).isoformat()
    key = request.headers.get(HEADER) or bearer_token()
    audit.info("erasure", extra={
        "erased_at": now,
        "erased": {field: value},
        "removed": removed,
        "key_id": key_id(key) if key else None,
        "remote_addr": request.remote_addr,
    })
    return jsonify({"status": "success", "erased": {field: value}, "removed": removed,
                    "timestamp": now})
