"""``DELETE /conversations/<id>`` and ``DELETE /businesses/<id>``: erasure on request.

Each removes the raw events, the events still waiting in this replica's
spool, and their share of every rollup (in one Postgres transaction; see
``store.erase_conversation`` / ``store.erase_business``), and from then on
refuses copies received before it (other replicas' spools, requests in
flight), then writes one JSON audit line to the ``mlops.audit`` logger. The gauges on ``/metrics``
drop the erased data at their next refresh.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from flask import Blueprint, jsonify, request
from pydantic import BaseModel, ValidationError

from .. import store
from ..auth import HEADER, key_id, require_scope
from ..db import DatabaseMisconfigured, DatabaseUnavailable
from ..errors import error_response
from ..limits import rate_limited
from ..schemas import Id, InvalidRequest, field_errors
from ..services import get_services

bp = Blueprint("erasure", __name__)

audit = logging.getLogger("mlops.audit")
audit.setLevel(logging.INFO)  # audit lines are written whatever LOG_LEVEL says


class _ConversationPath(BaseModel):
    conversation_id: Id


class _BusinessPath(BaseModel):
    business_id: Id


@bp.delete("/conversations/<path:conversation_id>")
@rate_limited("erase")
@require_scope("erase")
def erase_conversation(conversation_id: str):
    """Erase one conversation (every business's events carrying this id).

    Answers 200 ``{"status": "success", "erased": {"conversation_id"},
    "removed": {"mlops_events", "mlops_rollup_daily", "mlops_rollup_latency",
    "mlops_rollup_conversations", "rollup_rows_recomputed", "spooled_events"},
    "timestamp"}``, with zeros when nothing matched. Errors: 401/403 (API
    key; erasure needs a full key), 422 (id too long), 429, 503 (database).
    """
    _validate(_ConversationPath, conversation_id=conversation_id)
    return _erase("conversation_id", conversation_id, store.erase_conversation)


@bp.delete("/businesses/<path:business_id>")
@rate_limited("erase")
@require_scope("erase")
def erase_business(business_id: str):
    """Erase every event and rollup row of one business.

    Answers 200 ``{"status": "success", "erased": {"business_id"},
    "removed": {"mlops_events", "mlops_rollup_daily", "mlops_rollup_latency",
    "mlops_rollup_conversations", "spooled_events"}, "timestamp"}``, with
    zeros when nothing matched. Errors: 401/403, 422, 429, 503.
    """
    _validate(_BusinessPath, business_id=business_id)
    return _erase("business_id", business_id, store.erase_business)


def _validate(model: type[BaseModel], **path) -> None:
    try:
        model.model_validate(path)
    except ValidationError as exc:
        raise InvalidRequest(field_errors(exc)) from None


def _erase(field: str, value: str, erase):
    services = get_services()
    # The spool first: an event flushed from it after this point would carry
    # data back into Postgres after its erasure.
    spooled = services.outbox.discard(field, value)
    try:
        removed = erase(services.db, value, services.settings.erasure_timeout_ms)
    except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
        return error_response(503, "database_unavailable", f"database unavailable: {exc}")
    removed["spooled_events"] = spooled
    now = datetime.now(UTC).isoformat()
    key = request.headers.get(HEADER)
    audit.info("erasure", extra={
        "erased_at": now,
        "erased": {field: value},
        "removed": removed,
        "key_id": key_id(key) if key else None,
        "remote_addr": request.remote_addr,
    })
    return jsonify({"status": "success", "erased": {field: value}, "removed": removed,
                    "timestamp": now})
