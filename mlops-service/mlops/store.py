"""What the service keeps in Postgres: writing events, and the analytics read back.

Every function takes a :class:`mlops.db.Database` and issues one SQL string
(one round trip) through ``Database.run``, so it inherits the pool, the
retry-once-on-broken-connection rule and the error kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg2.extras import Json, execute_values

from .db import Database
from .schemas import MetricsEvent

# The contract's fields, in column order (see migrations/0001_events.sql).
CONTRACT_COLUMNS = (
    "business_id", "conversation_id", "session_id", "response_time_ms", "success_rate",
    "user_satisfaction", "tokens_used", "prompt_tokens", "completion_tokens", "api_cost_usd",
    "model_name", "intent_detected", "appointment_requested", "human_handoff_requested",
    "appointment_booked", "user_message_length", "ai_response_length", "response_type",
)
_INSERT_COLUMNS = ("event_id", "received_at", *CONTRACT_COLUMNS, "extra")


@dataclass(frozen=True)
class Record:
    """An event ready to store: its idempotency key, server receive time and body."""

    event_id: str
    received_at: datetime
    event: MetricsEvent

    def row(self) -> tuple:
        """The values for ``_INSERT_COLUMNS``, in order."""
        data = self.event
        return (
            self.event_id,
            self.received_at,
            *(getattr(data, column) for column in CONTRACT_COLUMNS),
            Json(data.model_extra or {}),
        )


def insert_events(db: Database, records: list[Record], timeout_ms: int) -> set[str]:
    """Insert ``records`` in one statement (one transaction); return the event ids stored.

    Idempotent: an ``event_id`` already present is skipped (``ON CONFLICT DO
    NOTHING``) and left out of the returned set. ``timeout_ms`` bounds the
    statement. Raises the errors of ``Database.run``.
    """
    if not records:
        return set()
    sql = (
        f"SET LOCAL statement_timeout = {int(timeout_ms)};"
        f"INSERT INTO mlops_events ({', '.join(_INSERT_COLUMNS)}) VALUES %s "
        "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
    )
    rows = [r.row() for r in records]

    def work(cur) -> set[str]:
        returned = execute_values(cur, sql, rows, page_size=len(rows), fetch=True)
        return {row[0] for row in returned}

    return db.run(work)


_ANALYTICS_SQL = """
WITH w AS (
    SELECT * FROM mlops_events
    WHERE business_id = %(business_id)s
      AND received_at >= now() - make_interval(days => %(days)s)
)
SELECT
    (SELECT row_to_json(t) FROM (
        SELECT count(*)                                        AS total_messages,
               count(DISTINCT conversation_id)                 AS total_conversations,
               coalesce(avg(response_time_ms), 0)              AS avg_response_time_ms,
               coalesce(avg(tokens_used), 0)                   AS avg_tokens_used,
               coalesce(sum(tokens_used), 0)                   AS total_tokens,
               coalesce(sum(api_cost_usd), 0)                  AS total_api_cost_usd,
               count(*) FILTER (WHERE appointment_requested)   AS appointment_requests,
               count(*) FILTER (WHERE appointment_booked)      AS appointments_booked,
               count(*) FILTER (WHERE human_handoff_requested) AS human_handoffs,
               coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY response_time_ms), 0)
                                                               AS p50_response_time_ms,
               coalesce(percentile_cont(0.95) WITHIN GROUP (ORDER BY response_time_ms), 0)
                                                               AS p95_response_time_ms,
               coalesce(avg(success_rate), 0)                  AS success_rate
        FROM w) t),
    (SELECT coalesce(json_agg(m ORDER BY m.model_name), '[]'::json) FROM (
        SELECT model_name, count(*) AS messages, sum(tokens_used) AS tokens,
               sum(api_cost_usd) AS api_cost_usd, avg(response_time_ms) AS avg_response_time_ms
        FROM w GROUP BY model_name) m),
    (SELECT coalesce(json_agg(d ORDER BY d.date), '[]'::json) FROM (
        SELECT to_char(date_trunc('day', received_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD') AS date,
               count(*) AS messages, sum(tokens_used) AS tokens,
               sum(api_cost_usd) AS api_cost_usd, avg(response_time_ms) AS avg_response_time_ms,
               count(*) FILTER (WHERE appointment_booked) AS appointments_booked
        FROM w GROUP BY 1) d)
"""


def analytics(db: Database, business_id: str, days: int) -> dict:
    """Aggregates for one business over the last ``days`` days (by server receive time).

    Returns ``{"metrics": {...}, "by_model": [...], "daily": [...]}``; every
    figure is computed by Postgres over the stored rows. Units: milliseconds,
    tokens, USD. ``appointment_conversion_rate`` is booked / requested
    (the course service's definition), 0 when nothing was requested. An
    unknown business yields zeros and empty lists.
    """
    def work(cur):
        cur.execute(db.timeout_prefix() + _ANALYTICS_SQL,
                    {"business_id": business_id, "days": days})
        return cur.fetchone()

    totals, by_model, daily = db.run(work)
    requests = totals["appointment_requests"]
    totals["appointment_conversion_rate"] = (
        totals["appointments_booked"] / requests if requests else 0.0
    )
    return {"metrics": totals, "by_model": by_model, "daily": daily}


_BUSINESS_TOTALS_SQL = """
SELECT business_id, count(*), coalesce(sum(tokens_used), 0), coalesce(sum(api_cost_usd), 0),
       coalesce(avg(success_rate), 0)
FROM mlops_events
WHERE received_at >= now() - make_interval(days => %(days)s)
GROUP BY business_id
ORDER BY count(*) DESC
"""


def business_totals(db: Database, days: int = 30) -> list[tuple[str, int, int, float, float]]:
    """Per business over ``days``: ``(business_id, messages, tokens, cost_usd, success_rate)``.

    Busiest first. Feeds the per-business gauges on ``/metrics``.
    """
    def work(cur):
        cur.execute(db.timeout_prefix() + _BUSINESS_TOTALS_SQL, {"days": days})
        return [(b, int(n), int(t), float(c), float(s)) for b, n, t, c, s in cur.fetchall()]

    return db.run(work)
