"""The rollups' SQL, shared by the insert, the backfill, repricing and erasure.

Rollups (migrations/0002_rollups.sql, 0004_rollup_intents.sql) summarise
events per business x UTC day (x model, x response-time bucket, x
intent_detected), plus each conversation's first and last day of activity.
:func:`rollup_ctes` adds a relation of event rows to every rollup; the
other names here are the pieces of SQL every writer of a rollup spells the
same way (the UTC day, the settled days, the daily sums).
"""

from __future__ import annotations

from .. import latency_histogram

# Concurrent writers for one business spread their rollup updates over this
# many rows per (business, day, model), so they do not queue on one row lock
# until each other's commit. Readers sum the shards; maintenance folds past
# days into shard 0.
SHARDS = 8

# An event's UTC day: the day of every rollup row it counts in.
DAY = "(received_at AT TIME ZONE 'UTC')::date"
# Days before this one are "settled": writes to them bump mlops_rollup_epoch
# (migrations/0006_rollup_epoch.sql). Yesterday is not, so a transaction in
# flight across midnight never changes a settled day unannounced.
SETTLED_BEFORE = "(now() AT TIME ZONE 'UTC')::date - 1"
BUMP_EPOCH_SQL = "UPDATE mlops_rollup_epoch SET changes = changes + 1"
# The events columns the rollups read (and the row id, for the backfill).
ROLLED_COLUMNS = (
    "id, received_at, business_id, conversation_id, model_name, response_time_ms, "
    "success_rate, tokens_used, api_cost_usd, appointment_requested, appointment_booked, "
    "human_handoff_requested, intent_detected, price_usd, price_status"
)
# The events whose client figure is compared with the service's price: priced
# ones for which the client gave a cost (OTLP spans usually carry none).
_COMPARED = "price_usd IS NOT NULL AND api_cost_usd > 0"
DAILY_SUMS = (
    ("messages", "count(*)"),
    ("tokens", "sum(tokens_used)"),
    ("api_cost_usd", "sum(api_cost_usd)"),
    ("response_time_ms_sum", "sum(response_time_ms)"),
    ("success_rate_sum", "sum(success_rate)"),
    ("appointment_requests", "count(*) FILTER (WHERE appointment_requested)"),
    ("appointments_booked", "count(*) FILTER (WHERE appointment_booked)"),
    ("human_handoffs", "count(*) FILTER (WHERE human_handoff_requested)"),
    ("cost_usd", "coalesce(sum(price_usd), 0)"),
    ("priced_messages", "count(price_usd)"),
    ("estimated_messages", "count(*) FILTER (WHERE price_status = 'estimated')"),
    ("unpriced_messages", "count(*) FILTER (WHERE price_status = 'unpriced')"),
    ("compared_cost_usd", f"coalesce(sum(price_usd) FILTER (WHERE {_COMPARED}), 0)"),
    ("compared_api_cost_usd", f"coalesce(sum(api_cost_usd) FILTER (WHERE {_COMPARED}), 0)"),
)
# The sums of DAILY_SUMS that depend on the price (what repricing changes).
PRICE_SUMS = DAILY_SUMS[-6:]
_DAILY_NAMES = ", ".join(name for name, _ in DAILY_SUMS)

# Every rollup table, each keyed by business_id.
ROLLUP_TABLES = ("mlops_rollup_daily", "mlops_rollup_latency", "mlops_rollup_intents",
                 "mlops_rollup_conversations")


def intents_cte(source: str, shard: int | str) -> str:
    """The CTE adding the rows of relation ``source`` to ``mlops_rollup_intents``."""
    shard = str(int(shard)) if isinstance(shard, int) else shard
    return f"""rollup_intents AS (
    INSERT INTO mlops_rollup_intents AS r (business_id, day, intent_detected, shard, messages)
    SELECT business_id, {DAY}, intent_detected, {shard}, count(*)
    FROM {source} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (business_id, day, intent_detected, shard)
    DO UPDATE SET messages = r.messages + EXCLUDED.messages
)"""


def rollup_ctes(source: str, shard: int | str, *, intents: bool = True) -> str:
    """CTEs adding the rows of relation ``source`` (events columns) to every rollup.

    ``shard`` is a number, or the name of a SQL parameter holding one.
    ``intents=False`` leaves out ``mlops_rollup_intents``, which has its own
    backfill (:mod:`mlops.store.housekeeping`). Every INSERT takes its keys in key order
    (``ORDER BY``), as every concurrent writer does: two transactions sharing
    new keys then queue on the first they share, where in any other order
    each could hold a key the other waits for (a deadlock, SQLSTATE 40P01).
    """
    shard = str(int(shard)) if isinstance(shard, int) else shard
    sums = ", ".join(expr for _, expr in DAILY_SUMS)
    adds = ", ".join(f"{name} = r.{name} + EXCLUDED.{name}" for name, _ in DAILY_SUMS)
    return f"""
rollup_daily AS (
    INSERT INTO mlops_rollup_daily AS r (business_id, day, model_name, shard, {_DAILY_NAMES})
    SELECT business_id, {DAY}, model_name, {shard}, {sums}
    FROM {source} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (business_id, day, model_name, shard) DO UPDATE SET {adds}
),
rollup_latency AS (
    INSERT INTO mlops_rollup_latency AS r (business_id, day, bucket, shard, messages)
    SELECT business_id, {DAY}, {latency_histogram.BUCKET_SQL}, {shard}, count(*)
    FROM {source} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (business_id, day, bucket, shard)
    DO UPDATE SET messages = r.messages + EXCLUDED.messages
),
{intents_cte(source, shard) + ',' if intents else ''}
rollup_epoch AS (
    UPDATE mlops_rollup_epoch SET changes = changes + 1
    WHERE EXISTS (SELECT FROM {source} WHERE {DAY} < {SETTLED_BEFORE})
),
rollup_conversations AS (
    SELECT business_id, conversation_id, min({DAY}) AS first_day, max({DAY}) AS last_day
    FROM {source} WHERE conversation_id IS NOT NULL GROUP BY 1, 2
),
-- A new conversation gets its row; a known one is touched only when its
-- span grows (a new day, or a late replay of an earlier one). DO NOTHING and
-- a filtered UPDATE leave the row unlocked otherwise, so concurrent messages
-- of one conversation do not queue on it. (A conversation first stored by a
-- concurrent, still uncommitted transaction is invisible to this UPDATE: if
-- both span different days, the span may miss a day until its next message.)
rollup_conversations_new AS (
    INSERT INTO mlops_rollup_conversations (business_id, conversation_id, first_day, last_day)
    SELECT * FROM rollup_conversations ORDER BY business_id, conversation_id
    ON CONFLICT (business_id, conversation_id) DO NOTHING
),
rollup_conversations_span AS (
    UPDATE mlops_rollup_conversations r
    SET first_day = least(r.first_day, c.first_day), last_day = greatest(r.last_day, c.last_day)
    FROM rollup_conversations c
    WHERE r.business_id = c.business_id AND r.conversation_id = c.conversation_id
      AND (c.first_day < r.first_day OR c.last_day > r.last_day)
)"""
