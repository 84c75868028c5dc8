"""The reference the rollups are checked against: the same figures computed over raw rows.

Same window as the store (``days=N``: today, UTC, and the N-1 days before
it); percentiles exact (``percentile_cont``), which the rollups estimate
within ``latency_histogram.RELATIVE_ERROR``.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from mlops import latency_histogram

_START = "((now() AT TIME ZONE 'UTC')::date - (%(days)s - 1))::timestamp AT TIME ZONE 'UTC'"

RAW_TOTALS = f"""
SELECT count(*), count(DISTINCT conversation_id), coalesce(sum(tokens_used), 0),
       coalesce(sum(api_cost_usd), 0), avg(response_time_ms), avg(success_rate),
       count(*) FILTER (WHERE appointment_requested), count(*) FILTER (WHERE appointment_booked),
       count(*) FILTER (WHERE human_handoff_requested),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY response_time_ms),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY response_time_ms),
       min(response_time_ms)
FROM mlops_events WHERE business_id = %(business)s AND received_at >= {_START}
"""
RAW_BY_MODEL = f"""
SELECT model_name, count(*), sum(tokens_used), sum(api_cost_usd), avg(response_time_ms)
FROM mlops_events WHERE business_id = %(business)s AND received_at >= {_START}
GROUP BY 1 ORDER BY 1
"""
RAW_DAILY = f"""
SELECT to_char((received_at AT TIME ZONE 'UTC')::date, 'YYYY-MM-DD'), count(*),
       sum(tokens_used), sum(api_cost_usd), avg(response_time_ms),
       count(*) FILTER (WHERE appointment_booked),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY response_time_ms),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY response_time_ms),
       min(response_time_ms)
FROM mlops_events WHERE business_id = %(business)s AND received_at >= {_START}
GROUP BY 1 ORDER BY 1
"""
RAW_BY_INTENT = f"""
SELECT intent_detected, count(*)
FROM mlops_events WHERE business_id = %(business)s AND received_at >= {_START}
GROUP BY 1 ORDER BY 2 DESC, 1
"""
RAW_BUSINESS_TOTALS = f"""
SELECT business_id, count(*), sum(tokens_used), sum(api_cost_usd), avg(success_rate)
FROM mlops_events WHERE received_at >= {_START}
GROUP BY 1 ORDER BY 2 DESC, 1
"""


def _rows(pg, sql: str, **params):
    with pg.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def _cost(value) -> Decimal:
    return Decimal(str(value)).quantize(Decimal("1e-9"))


def assert_matches_raw(pg, result: dict, business: str, days: int) -> None:
    """``result`` (``store.analytics`` or ``/analytics``) equals the raw aggregates."""
    (n, conversations, tokens, cost, rt, sr, requested, booked, handoffs, p50, p95, low), = _rows(
        pg, RAW_TOTALS, business=business, days=days)
    tokens = int(tokens)
    m = result["metrics"]
    assert m["total_messages"] == n
    assert m["total_conversations"] == conversations
    assert m["total_tokens"] == tokens
    assert _cost(m["total_api_cost_usd"]) == _cost(cost)
    assert m["appointment_requests"] == requested
    assert m["appointments_booked"] == booked
    assert m["human_handoffs"] == handoffs
    assert m["avg_response_time_ms"] == pytest.approx(rt or 0)
    assert m["avg_tokens_used"] == pytest.approx(tokens / n if n else 0)
    assert m["success_rate"] == pytest.approx(sr or 0)
    assert m["appointment_conversion_rate"] == pytest.approx(booked / requested if requested else 0)
    _assert_percentiles(m, p50, p95, low)
    by_model = [(x["model_name"], x["messages"], x["tokens"], _cost(x["api_cost_usd"]),
                 pytest.approx(x["avg_response_time_ms"])) for x in result["by_model"]]
    assert by_model == [(a, b, c, _cost(d), e) for a, b, c, d, e in
                        _rows(pg, RAW_BY_MODEL, business=business, days=days)]
    assert all(isinstance(x["tokens"], int) for x in result["by_model"])
    raw_daily = _rows(pg, RAW_DAILY, business=business, days=days)
    daily = [(x["date"], x["messages"], x["tokens"], _cost(x["api_cost_usd"]),
              pytest.approx(x["avg_response_time_ms"]), x["appointments_booked"])
             for x in result["daily"]]
    assert daily == [(a, b, c, _cost(d), e, f) for a, b, c, d, e, f, *_ in raw_daily]
    for row, (*_, p50, p95, low) in zip(result["daily"], raw_daily, strict=True):
        _assert_percentiles(row, p50, p95, low)
    assert [(x["intent_detected"], x["messages"]) for x in result["by_intent"]] == \
        _rows(pg, RAW_BY_INTENT, business=business, days=days)


def _assert_percentiles(row: dict, p50, p95, low) -> None:
    """``row``'s p50/p95 are within the histogram's bound of the exact ``percentile_cont``."""
    # Relative error bound, plus 0.5 ms if a value under 1 ms took part.
    slack = 0.5 if low is not None and low < 1 else 0.0
    for estimate, exact in ((row["p50_response_time_ms"], p50),
                            (row["p95_response_time_ms"], p95)):
        if exact is None:
            assert estimate == 0
        else:
            error = latency_histogram.RELATIVE_ERROR
            assert abs(estimate - exact) <= error * exact * (1 + 1e-9) + slack


def assert_totals_match_raw(pg, totals: list[tuple], days: int) -> None:
    """``store.business_totals(db, days)`` equals the raw per-business aggregates."""
    raw = _rows(pg, RAW_BUSINESS_TOTALS, days=days)
    assert [(b, n, t, pytest.approx(float(c)), pytest.approx(s)) for b, n, t, c, s in totals] \
        == [(b, n, t, float(c), s) for b, n, t, c, s in raw]
