"""Reads, from the rollups only, so their cost does not grow with the events stored.

Windows are whole UTC days: ``days=N`` means today (UTC) and the N-1 days
before it.
"""

from __future__ import annotations

from decimal import Decimal

from .. import latency_histogram
from ..db import Database
from .rollup_sql import SETTLED_BEFORE

# The first UTC day of a window of %(days)s days, today included.
_WINDOW_START = "(now() AT TIME ZONE 'UTC')::date - (%(days)s - 1)"

_ANALYTICS_SQL = f"""
WITH d AS (
    SELECT * FROM mlops_rollup_daily
    WHERE business_id = %(business_id)s AND day >= {_WINDOW_START}
)
SELECT
    (SELECT json_build_array(
        coalesce(sum(messages), 0), coalesce(sum(tokens), 0), coalesce(sum(api_cost_usd), 0),
        coalesce(sum(response_time_ms_sum), 0), coalesce(sum(success_rate_sum), 0),
        coalesce(sum(appointment_requests), 0), coalesce(sum(appointments_booked), 0),
        coalesce(sum(human_handoffs), 0), coalesce(sum(cost_usd), 0),
        coalesce(sum(priced_messages), 0), coalesce(sum(estimated_messages), 0),
        coalesce(sum(unpriced_messages), 0), coalesce(sum(compared_cost_usd), 0),
        coalesce(sum(compared_api_cost_usd), 0)) FROM d),
    (SELECT count(*) FROM mlops_rollup_conversations
     WHERE business_id = %(business_id)s AND last_day >= {_WINDOW_START}),
    (SELECT coalesce(json_agg(json_build_array(bucket, n)), '[]'::json) FROM (
        SELECT bucket, sum(messages) AS n FROM mlops_rollup_latency
        WHERE business_id = %(business_id)s AND day >= {_WINDOW_START}
        GROUP BY bucket) h),
    (SELECT coalesce(json_agg(m ORDER BY m.model_name), '[]'::json) FROM (
        SELECT model_name, sum(messages) AS messages, sum(tokens) AS tokens,
               sum(api_cost_usd) AS api_cost_usd, sum(cost_usd) AS cost_usd,
               sum(unpriced_messages) AS unpriced_messages,
               sum(estimated_messages) AS estimated_messages,
               sum(response_time_ms_sum)::numeric / sum(messages) AS avg_response_time_ms
        FROM d GROUP BY model_name) m),
    (SELECT coalesce(json_agg(x ORDER BY x.date), '[]'::json) FROM (
        SELECT to_char(day, 'YYYY-MM-DD') AS date, sum(messages) AS messages,
               sum(tokens) AS tokens, sum(api_cost_usd) AS api_cost_usd,
               sum(cost_usd) AS cost_usd,
               sum(response_time_ms_sum)::numeric / sum(messages) AS avg_response_time_ms,
               sum(appointments_booked) AS appointments_booked
        FROM d GROUP BY day) x),
    (SELECT coalesce(json_agg(json_build_array(to_char(day, 'YYYY-MM-DD'), bucket, n)), '[]'::json)
     FROM (SELECT day, bucket, sum(messages) AS n FROM mlops_rollup_latency
           WHERE business_id = %(business_id)s AND day >= {_WINDOW_START}
           GROUP BY day, bucket) dh),
    (SELECT coalesce(json_agg(i ORDER BY i.messages DESC, i.intent_detected), '[]'::json) FROM (
        SELECT intent_detected, sum(messages) AS messages FROM mlops_rollup_intents
        WHERE business_id = %(business_id)s AND day >= {_WINDOW_START}
        GROUP BY intent_detected) i)
"""


def analytics(db: Database, business_id: str, days: int) -> dict:
    """Aggregates for one business over the last ``days`` UTC days (today included).

    Returns ``{"metrics": {...}, "cost": {...}, "by_model": [...], "daily":
    [...], "by_intent": [...]}``, read from the rollups only. Units:
    milliseconds, tokens, USD. Costs: ``api_cost_usd`` (and
    ``total_api_cost_usd``) is the client's own figure; ``cost_usd`` (and
    ``total_cost_usd``) the service's price (mlops/prices.py), summed over
    priced and estimated calls. ``cost`` holds ``cost_usd``,
    ``client_estimate_usd``, ``client_estimate_difference`` ((client -
    price) / price over ``compared_*``: the priced calls whose client cost
    is above 0; None when there are none), ``priced_messages``,
    ``estimated_messages``, ``unpriced_messages``, ``pending_messages``
    (stored before pricing, not priced yet), ``unpriced_models``
    (``[{"model_name", "messages"}]``, most first) and, when some are,
    ``unpriced``: one line naming them. ``by_model`` rows carry
    ``cost_usd``, ``unpriced_messages`` and ``estimated_messages`` too.
    ``daily`` rows (oldest first) carry ``date``, ``messages``,
    ``tokens``, ``api_cost_usd``, ``cost_usd``, ``avg_response_time_ms``,
    ``appointments_booked``, ``p50_response_time_ms`` and
    ``p95_response_time_ms``; ``by_intent`` is ``[{"intent_detected",
    "messages"}]``, busiest first (ties by name). Counts, sums and means are
    exact (``total_conversations`` counts distinct conversations over the
    whole window); ``p50/p95_response_time_ms`` (window and per day) come
    from the response-time histogram, within 4.9% of the exact
    ``percentile_cont`` (see :mod:`mlops.latency_histogram`).
    ``appointment_conversion_rate`` is booked /
    requested (the course service's definition), 0 when nothing was
    requested. An unknown business yields zeros and empty lists.
    """
    def work(cur):
        cur.execute(_ANALYTICS_SQL,
                    {"business_id": business_id, "days": days})
        return cur.fetchone()

    totals, conversations, histogram, by_model, daily, day_histograms, by_intent = db.run(work)
    n, tokens, cost, rt_sum, sr_sum, requested, booked, handoffs, *priced = totals
    histogram = [(int(b), int(c)) for b, c in histogram]
    metrics = {
        "total_messages": n,
        "total_conversations": conversations,
        "avg_response_time_ms": rt_sum / n if n else 0,
        "avg_tokens_used": tokens / n if n else 0,
        "total_tokens": tokens,
        "total_api_cost_usd": cost,
        "total_cost_usd": priced[0],
        "appointment_requests": requested,
        "appointments_booked": booked,
        "human_handoffs": handoffs,
        "p50_response_time_ms": latency_histogram.percentile(histogram, 0.5),
        "p95_response_time_ms": latency_histogram.percentile(histogram, 0.95),
        "success_rate": sr_sum / n if n else 0,
        "appointment_conversion_rate": booked / requested if requested else 0.0,
    }
    per_day: dict[str, list[tuple[int, int]]] = {}
    for date, bucket, count in day_histograms:
        per_day.setdefault(date, []).append((int(bucket), int(count)))
    for row in daily:
        buckets = per_day.get(row["date"], ())
        row["p50_response_time_ms"] = latency_histogram.percentile(buckets, 0.5)
        row["p95_response_time_ms"] = latency_histogram.percentile(buckets, 0.95)
    return {"metrics": metrics, "cost": _cost_summary(n, cost, priced, by_model),
            "by_model": by_model, "daily": daily, "by_intent": by_intent}


def _cost_summary(messages: int, client_cost, priced: list, by_model: list[dict]) -> dict:
    """``analytics``'s ``cost`` block from the window's price sums (see its docstring)."""
    cost, priced_n, estimated_n, unpriced_n, compared_cost, compared_client = priced
    unpriced = [{"model_name": m["model_name"], "messages": m["unpriced_messages"]}
                for m in by_model if m["unpriced_messages"]]
    unpriced.sort(key=lambda m: (-m["messages"], m["model_name"]))
    pending = messages - priced_n - unpriced_n
    summary = {
        "cost_usd": cost,
        "client_estimate_usd": client_cost,
        "client_estimate_difference": (compared_client - compared_cost) / compared_cost
        if compared_cost else None,
        "compared_cost_usd": compared_cost,
        "compared_client_estimate_usd": compared_client,
        "priced_messages": priced_n,
        "estimated_messages": estimated_n,
        "unpriced_messages": unpriced_n,
        "pending_messages": pending,
        "unpriced_models": unpriced,
    }
    if unpriced:
        names = ", ".join(f"{m['model_name']} ({m['messages']})" for m in unpriced[:20])
        more = f" and {len(unpriced) - 20} more" if len(unpriced) > 20 else ""
        summary["unpriced"] = (f"{unpriced_n} calls of models no price table knows, left out "
                               f"of cost_usd: {names}{more}; add them to PRICES_FILE")
    return summary


def _business_sums(where: str) -> str:
    """Per business: messages, tokens, client cost, sum of success_rate, priced cost over
    the daily rollup rows matching ``where``."""
    return ("SELECT business_id, sum(messages) n, sum(tokens) t, sum(api_cost_usd) c, "
            "sum(success_rate_sum) s, sum(cost_usd) p "
            f"FROM mlops_rollup_daily WHERE {where} GROUP BY 1")


class BusinessRow(tuple):
    """One business's totals over a window: ``(business_id, messages, tokens,
    api_cost_usd, success_rate)`` (the client's cost in USD, mean success_rate
    0..1), plus the attribute ``cost_usd``: the service's price in USD."""

    cost_usd: float

    def __new__(cls, business_id: str, messages: int, tokens: int, api_cost_usd: float,
                success_rate: float, cost_usd: float) -> BusinessRow:
        row = super().__new__(cls, (business_id, messages, tokens, api_cost_usd, success_rate))
        row.cost_usd = cost_usd
        return row


_BUSINESS_TOTALS_SQL = (_business_sums(f"day >= {_WINDOW_START}")
                        + " ORDER BY n DESC, business_id")


def business_totals(db: Database, days: int = 30) -> list[BusinessRow]:
    """Per business over the last ``days`` UTC days (today included), from the rollups.

    Rows of :class:`BusinessRow` (``api_cost_usd`` the client's figure, ``.cost_usd``
    the service's price), busiest first (ties by id). Feeds the
    per-business gauges on ``/metrics``.
    """
    def work(cur):
        cur.execute(_BUSINESS_TOTALS_SQL, {"days": days})
        # Means divided here: Postgres raises "underflow" dividing a subnormal double.
        return [BusinessRow(b, int(n), int(t), float(c), s / int(n), float(p))
                for b, n, t, c, s, p in cur.fetchall()]

    return db.run(work)


_RECENT_AND_SETTLED_SQL = f"""
WITH k AS MATERIALIZED (
    SELECT (now() AT TIME ZONE 'UTC')::date AS today, changes,
           (now() AT TIME ZONE 'UTC')::date IS DISTINCT FROM %(today)s::date
           OR changes IS DISTINCT FROM %(changes)s AS settled_stale
    FROM mlops_rollup_epoch
)
-- Only uncorrelated subqueries: each runs once (a correlated one over the
-- small epoch table is costed as if it ran thousands of times, enough to
-- start the JIT compiler, which takes longer than the query).
SELECT (SELECT today FROM k), (SELECT changes FROM k), (SELECT settled_stale FROM k),
    (SELECT array_agg(ARRAY[business_id, n::text, t::text, c::text, s::text, p::text]) FROM (
        {_business_sums(f"day >= {SETTLED_BEFORE} AND day >= {_WINDOW_START}")}) r),
    (SELECT array_agg(ARRAY[business_id, n::text, t::text, c::text, s::text, p::text]) FROM (
        {_business_sums(f"(SELECT settled_stale FROM k) AND day >= {_WINDOW_START}"
                        f" AND day < {SETTLED_BEFORE}")}) p)
"""

# business: (messages, tokens, client cost in USD, sum of success_rate, priced cost in USD)
_Sums = dict[str, tuple[int, int, Decimal, float, Decimal]]


def _sums(rows) -> _Sums:
    return {b: (int(n), int(t), Decimal(c), float(s), Decimal(p))
            for b, n, t, c, s, p in rows or ()}


class BusinessTotals:
    """:func:`business_totals` for a fixed window, re-reading only what may have changed.

    The settled days of the window (before yesterday, UTC) change only by
    the writes that bump ``mlops_rollup_epoch`` (late inserts, erasure,
    rollup retention, the backfill). This keeps their per-business sums and
    re-reads them when the date or that counter moved; yesterday and today
    are read every time. One statement, one snapshot, so the two parts
    always agree. Not thread-safe: its caller serialises :meth:`read`.
    """

    def __init__(self, days: int) -> None:
        self.days = days
        self._key: tuple[object, int] | None = None  # (UTC date, changes) of _settled
        self._settled: _Sums = {}

    def read(self, db: Database) -> list[BusinessRow]:
        """The rows of ``business_totals(db, days)``; raises what ``Database.run`` raises."""
        today, changes = self._key or (None, None)

        def work(cur):
            cur.execute(_RECENT_AND_SETTLED_SQL,
                        {"days": self.days, "today": today, "changes": changes})
            return cur.fetchone()

        today, changes, stale, recent, settled = db.run(work)
        if stale:
            self._settled, self._key = _sums(settled), (today, changes)
        totals = dict(self._settled)
        for business, sums in _sums(recent).items():
            old = totals.get(business, (0, 0, Decimal(0), 0.0, Decimal(0)))
            totals[business] = tuple(a + b for a, b in zip(old, sums, strict=True))
        return sorted((BusinessRow(b, n, t, float(c), s / n, float(p))
                       for b, (n, t, c, s, p) in totals.items() if n),
                      key=lambda row: (-row[1], row[0]))


def oldest_event_received_at(db: Database) -> float | None:
    """Receive time (Unix seconds) of the oldest raw event still stored; None when none.

    One index lookup on ``mlops_events (received_at)``.
    """
    def work(cur):
        cur.execute("SELECT extract(epoch FROM min(received_at)) FROM mlops_events")
        return cur.fetchone()[0]

    oldest = db.run(work)
    return float(oldest) if oldest is not None else None
