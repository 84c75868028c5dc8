"""What the service keeps in Postgres: events, their rollups, and every read.

Every function takes a :class:`mlops.db.Database` and runs its SQL through
``Database.run``, so it inherits the pool, the retry-once-on-broken-connection
rule and the error kinds. Most are one SQL string (one round trip).

Rollups (migrations/0002_rollups.sql, 0004_rollup_intents.sql) summarise
events per business x UTC day (x model, x response-time bucket, x
intent_detected), plus each conversation's first and last day of activity.
``insert_events`` updates them in the same statement that inserts the
events, for exactly the rows that statement inserted, so replays never
count twice. Reads use only rollups, so their cost does not
grow with the number of events stored.
Windows are whole UTC days: ``days=N`` means today (UTC) and the N-1 days
before it.

Each row also holds the service's price of the call (``price_usd``,
``price_status``; mlops/prices.py), computed where a record becomes a row
(:attr:`Record.price`), and the daily rollup holds its sums beside the
client's ``api_cost_usd``. The maintenance job prices rows stored before
prices existed, and :func:`reprice` prices a window again; both move the
rollups by the difference, so they stay equal to the raw sums.
"""

from __future__ import annotations

import collections
import io
import json
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TypeVar

import psycopg2
from psycopg2.extras import Json

from . import latency_histogram, prices
from .db import Database, copy_from
from .schemas import MetricsEvent

T = TypeVar("T")

# The contract's fields, in column order (see migrations/0001_events.sql).
CONTRACT_COLUMNS = (
    "business_id", "conversation_id", "session_id", "response_time_ms", "success_rate",
    "user_satisfaction", "tokens_used", "prompt_tokens", "completion_tokens", "api_cost_usd",
    "model_name", "intent_detected", "appointment_requested", "human_handoff_requested",
    "appointment_booked", "user_message_length", "ai_response_length", "response_type",
)
_INSERT_COLUMNS = ("event_id", "received_at", *CONTRACT_COLUMNS, "extra")
# The service's price of the call (mlops/prices.py, migrations/0014_insert_function_prices.sql).
PRICE_COLUMNS = ("price_usd", "price_status")
# What insert_events stores: the event and its price.
_STORED_COLUMNS = (*_INSERT_COLUMNS, *PRICE_COLUMNS)
# An event's values of CONTRACT_COLUMNS, as a tuple.
_contract_values = operator.attrgetter(*CONTRACT_COLUMNS)


@dataclass(frozen=True)
class Record:
    """An event ready to store: its idempotency key, server receive time and body."""

    event_id: str
    received_at: datetime
    event: MetricsEvent

    @property
    def price(self) -> prices.Price:
        """The call's price by this process's table (``prices.current()``), at ``received_at``;
        computed once (``functools.cached_property`` would take a lock per call)."""
        try:
            return self.__dict__["_price"]
        except KeyError:
            price = self.__dict__["_price"] = prices.current().price_event(
                self.event, self.received_at)
            return price

    def row(self) -> tuple:
        """The values for ``_INSERT_COLUMNS``, in order."""
        data = self.event
        return (
            self.event_id,
            self.received_at,
            *_contract_values(data),
            Json(data.model_extra or {}),
        )

    def stored_row(self) -> tuple:
        """The values for ``_STORED_COLUMNS``: :meth:`row` and the price."""
        return (*self.row(), *self.price)

    def copy_line(self) -> str:
        """The stored row as one line of COPY text format (tab-separated, ``\\N`` for NULL)."""
        data = self.event
        values = [self.event_id, self.received_at.isoformat(), *_contract_values(data),
                  json.dumps(data.model_extra) if data.model_extra else "{}", *self.price]
        return "\t".join(map(_copy_text, values)) + "\n"


def _copy_text(value) -> str:
    if isinstance(value, str):
        return (value.replace("\\", "\\\\").replace("\t", "\\t")
                .replace("\n", "\\n").replace("\r", "\\r"))
    if value is None:
        return "\\N"
    if value is True or value is False:
        return "t" if value else "f"
    return str(value)  # a number: nothing to escape


# --- writes -----------------------------------------------------------------

# Concurrent writers for one business spread their rollup updates over this
# many rows per (business, day, model), so they do not queue on one row lock
# until each other's commit. Readers sum the shards; maintenance folds past
# days into shard 0.
SHARDS = 8
# Batches at least this large go through COPY into a staging table.
COPY_THRESHOLD = 64
# pg_advisory_xact_lock key of the maintenance job and of erasure ("rollup").
MAINTENANCE_LOCK_KEY = 0x726F6C6C7570

_DAY = "(received_at AT TIME ZONE 'UTC')::date"
# Days before this one are "settled": writes to them bump mlops_rollup_epoch
# (migrations/0006_rollup_epoch.sql). Yesterday is not, so a transaction in
# flight across midnight never changes a settled day unannounced.
_SETTLED_BEFORE = "(now() AT TIME ZONE 'UTC')::date - 1"
_BUMP_EPOCH_SQL = "UPDATE mlops_rollup_epoch SET changes = changes + 1"
_WINDOW_START = "(now() AT TIME ZONE 'UTC')::date - (%(days)s - 1)"
_ROLLED_COLUMNS = (
    "id, received_at, business_id, conversation_id, model_name, response_time_ms, "
    "success_rate, tokens_used, api_cost_usd, appointment_requested, appointment_booked, "
    "human_handoff_requested, intent_detected, price_usd, price_status"
)
# The events whose client figure is compared with the service's price: priced
# ones for which the client gave a cost (OTLP spans usually carry none).
_COMPARED = "price_usd IS NOT NULL AND api_cost_usd > 0"
_DAILY_SUMS = (
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
# The sums of _DAILY_SUMS that depend on the price (what repricing changes).
PRICE_SUMS = _DAILY_SUMS[-6:]
_DAILY_NAMES = ", ".join(name for name, _ in _DAILY_SUMS)


def _intents_cte(source: str, shard: int | str) -> str:
    """The CTE adding the rows of relation ``source`` to ``mlops_rollup_intents``."""
    shard = str(int(shard)) if isinstance(shard, int) else shard
    return f"""rollup_intents AS (
    INSERT INTO mlops_rollup_intents AS r (business_id, day, intent_detected, shard, messages)
    SELECT business_id, {_DAY}, intent_detected, {shard}, count(*)
    FROM {source} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (business_id, day, intent_detected, shard)
    DO UPDATE SET messages = r.messages + EXCLUDED.messages
)"""


def _rollup_ctes(source: str, shard: int | str, *, intents: bool = True) -> str:
    """CTEs adding the rows of relation ``source`` (events columns) to every rollup.

    ``shard`` is a number, or the name of a SQL parameter holding one.
    ``intents=False`` leaves out ``mlops_rollup_intents``, which has its own
    backfill (see ``_BACKFILLS``). Every INSERT takes its keys in key order
    (``ORDER BY``), as every concurrent writer does: two transactions sharing
    new keys then queue on the first they share, where in any other order
    each could hold a key the other waits for (a deadlock, SQLSTATE 40P01).
    """
    shard = str(int(shard)) if isinstance(shard, int) else shard
    sums = ", ".join(expr for _, expr in _DAILY_SUMS)
    adds = ", ".join(f"{name} = r.{name} + EXCLUDED.{name}" for name, _ in _DAILY_SUMS)
    return f"""
rollup_daily AS (
    INSERT INTO mlops_rollup_daily AS r (business_id, day, model_name, shard, {_DAILY_NAMES})
    SELECT business_id, {_DAY}, model_name, {shard}, {sums}
    FROM {source} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (business_id, day, model_name, shard) DO UPDATE SET {adds}
),
rollup_latency AS (
    INSERT INTO mlops_rollup_latency AS r (business_id, day, bucket, shard, messages)
    SELECT business_id, {_DAY}, {latency_histogram.BUCKET_SQL}, {shard}, count(*)
    FROM {source} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (business_id, day, bucket, shard)
    DO UPDATE SET messages = r.messages + EXCLUDED.messages
),
{_intents_cte(source, shard) + ',' if intents else ''}
rollup_epoch AS (
    UPDATE mlops_rollup_epoch SET changes = changes + 1
    WHERE EXISTS (SELECT FROM {source} WHERE {_DAY} < {_SETTLED_BEFORE})
),
rollup_conversations AS (
    SELECT business_id, conversation_id, min({_DAY}) AS first_day, max({_DAY}) AS last_day
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


def insert_sql(source: str, shard: int | str) -> str:
    """One statement inserting the rows of ``source`` and rolling up those inserted.

    ``source`` is a query yielding ``_STORED_COLUMNS`` in order, each typed
    (``unnest`` of typed arrays, a staging table, or a generator in the
    benchmark's loader). Returns the inserted ``event_id``s. Rows whose
    ``event_id`` is already stored are skipped and left out of the rollups
    (``RETURNING`` yields only new rows); so are rows received before an
    erasure of their conversation, session or business (``mlops_erasures``),
    such as a copy of an erased event still in some replica's spool.
    Events go in ``event_id`` order and each rollup in key order, so
    concurrent inserts sharing ids or keys do not deadlock.
    """
    columns = ", ".join(_STORED_COLUMNS)
    return f"""
WITH ins AS (
    INSERT INTO mlops_events ({columns})
    SELECT * FROM ({source}) AS s ({columns})
    WHERE NOT EXISTS (
        SELECT FROM mlops_erasures x WHERE x.erased = 'conversation_id'
          AND x.id = s.conversation_id AND s.received_at <= x.erased_at)
      AND NOT EXISTS (
        SELECT FROM mlops_erasures x WHERE x.erased = 'business_id'
          AND x.id = s.business_id AND s.received_at <= x.erased_at)
      AND NOT EXISTS (
        SELECT FROM mlops_erasures x WHERE x.erased = 'session_id'
          AND x.id = s.session_id AND s.received_at <= x.erased_at)
    ORDER BY s.event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING {_ROLLED_COLUMNS}, event_id
), {_rollup_ctes('ins', shard)}
SELECT event_id FROM ins"""


# Parameter types of mlops_insert_events: one array per column of _STORED_COLUMNS.
_ARRAY_TYPES = (
    "text", "timestamptz", "text", "text", "text", "double precision", "double precision",
    "double precision", "bigint", "bigint", "bigint", "numeric", "text", "text", "boolean",
    "boolean", "boolean", "integer", "integer", "text", "jsonb", "numeric", "text",
)


# The migration holding the current insert_function_sql(); 0003 held the
# first version, 0005 the one before mlops_rollup_epoch, 0007 the one before
# mlops_erasures, 0009 the one that let Postgres re-plan every call, 0010
# the one before erasure by session, 0012 the one taking keys in no set order,
# 0013 the one before prices.
INSERT_FUNCTION_MIGRATION = "0014_insert_function_prices.sql"

# The schema the current function needs, created by the same migration before
# it: the call's price beside the client's figure, the price sums of the daily
# rollup, and the progress of pricing the events stored before (the
# maintenance job). ADD COLUMN with a constant default or none rewrites
# nothing, and the checks are NOT VALID (new rows only), so the table is not
# scanned under its lock. The previous function (one array fewer per price
# column) is dropped: during a rolling upgrade, a server of the previous
# version spools the small batches it cannot insert until it is replaced,
# and stores its COPY batches with price_status NULL (priced by `make reprice`).
_INSERT_FUNCTION_SCHEMA = f"""\
DROP FUNCTION IF EXISTS mlops_insert_events(
    {", ".join(t + "[]" for t in _ARRAY_TYPES[:-len(PRICE_COLUMNS)])}, smallint);
ALTER TABLE mlops_events
    ADD COLUMN price_usd numeric(24, 12),
    ADD COLUMN price_status text;
ALTER TABLE mlops_events
    ADD CONSTRAINT mlops_events_price_usd_check CHECK (price_usd >= 0) NOT VALID,
    ADD CONSTRAINT mlops_events_price_status_check
        CHECK (price_status IN ('priced', 'estimated', 'unpriced')) NOT VALID;
COMMENT ON COLUMN mlops_events.price_usd IS
    'USD by the service''s price table (mlops/prices.py); NULL when unpriced or not priced yet';
COMMENT ON COLUMN mlops_events.price_status IS
    'priced, estimated (total tokens only), unpriced (no table knows the model); NULL: not yet';
ALTER TABLE mlops_rollup_daily
    ADD COLUMN cost_usd numeric NOT NULL DEFAULT 0,
    ADD COLUMN priced_messages bigint NOT NULL DEFAULT 0,
    ADD COLUMN estimated_messages bigint NOT NULL DEFAULT 0,
    ADD COLUMN unpriced_messages bigint NOT NULL DEFAULT 0,
    ADD COLUMN compared_cost_usd numeric NOT NULL DEFAULT 0,
    ADD COLUMN compared_api_cost_usd numeric NOT NULL DEFAULT 0;
-- Events with id <= high_water were stored unpriced; the maintenance job prices
-- them in batches by primary-key range (mlops/retention.py).
CREATE TABLE mlops_price_backfill (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    high_water   bigint NOT NULL,
    done_through bigint NOT NULL
);
INSERT INTO mlops_price_backfill (high_water, done_through)
SELECT coalesce(max(id), 0), 0 FROM mlops_events;
"""


def insert_function_sql() -> str:
    """The text of ``migrations/INSERT_FUNCTION_MIGRATION`` (a test keeps the two equal).

    ``_INSERT_FUNCTION_SCHEMA`` first (the schema this version needs), then
    ``mlops_insert_events`` running :func:`insert_sql` over one array per
    column; each version of the statement is a new migration replacing the
    function (``CREATE OR REPLACE``; a new signature adds an overload). Being PL/pgSQL, its
    statement is prepared once per server connection, which plain statements
    cannot be through PgBouncer (no prepared statements in transaction mode).
    ``plan_cache_mode = force_generic_plan`` makes Postgres reuse one plan
    too: left to choose (PostgreSQL manual, PREPARE, "Notes"), it compares
    the generic plan's estimate (``unnest`` of parameters: 10 rows) with
    custom plans for the actual arrays, finds one or two rows cheaper and
    plans every call again, which was more than half of a
    one-event call's Postgres CPU. From about eight rows on it picks the
    generic plan by itself.
    """
    params = ", ".join(f"p_{c} {t}[]" for c, t in zip(_STORED_COLUMNS, _ARRAY_TYPES, strict=True))
    arrays = ", ".join(f"p_{c}" for c in _STORED_COLUMNS)
    body = insert_sql(f"SELECT * FROM unnest({arrays})", "p_shard")
    return (
        "-- Generated by mlops.store.insert_function_sql(): the insert of insert_events\n"
        "-- (events plus rollups) as a PL/pgSQL function, so its plan is cached.\n"
        f"{_INSERT_FUNCTION_SCHEMA}"
        f"CREATE OR REPLACE FUNCTION mlops_insert_events({params}, p_shard smallint)\n"
        "RETURNS SETOF text LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan\n"
        "AS $fn$\nBEGIN\nRETURN QUERY"
        f"{body};\nEND\n$fn$;\n"
    )


_CALL_SQL = (
    "SELECT mlops_insert_events("
    + ", ".join(f"%s::{t}[]" for t in _ARRAY_TYPES) + ", %s::smallint)"
)


class Inserted(set):
    """The ``event_id``s an insert stored anew (a set of str), plus its ``conflicts``.

    ``conflicts``: ``(event_id, business_id)`` of the records refused because
    their ``event_id`` is stored for another business (an id is unique over
    every business, migrations/0001_events.sql). Records whose id is stored
    for their own business are replays: neither new nor conflicts.
    """

    def __init__(self, ids=(), conflicts=frozenset()) -> None:
        super().__init__(ids)
        self.conflicts: frozenset[tuple[str, str]] = frozenset(conflicts)


_OWNERS_SQL = "SELECT event_id, business_id FROM mlops_events WHERE event_id = ANY(%s)"


def _find_conflicts(cur, records: list[Record], inserted: set[str]) -> Inserted:
    """``inserted`` with the records whose id another business holds (one more
    query, only when some record was not new or an id came twice)."""
    ids = collections.Counter(r.event_id for r in records)
    doubtful = [i for i, n in ids.items() if i not in inserted or n > 1]
    if not doubtful:
        return Inserted(inserted)
    cur.execute(_OWNERS_SQL, (doubtful,))
    owner = dict(cur.fetchall())
    # An id absent from the table was refused by an erasure (mlops_erasures): no conflict.
    return Inserted(inserted, {
        (r.event_id, r.event.business_id) for r in records
        if owner.get(r.event_id, r.event.business_id) != r.event.business_id})


def _first_of_each_id(records: list[Record]) -> list[Record]:
    """``records`` without those whose ``event_id`` came earlier in the list.

    An id given twice in one insert is stored from its first record: which of
    two rows one statement inserts first is the plan's choice, not the list's.
    """
    first: dict[str, Record] = {}
    for record in records:
        first.setdefault(record.event_id, record)
    return list(first.values())


def insert_events(db: Database, records: list[Record], timeout_ms: int, *,
                  skip_if_down: bool = False) -> Inserted:
    """Insert ``records`` and update the rollups in one transaction; return the ids stored.

    Idempotent: an ``event_id`` already present is skipped (``ON CONFLICT DO
    NOTHING``), left out of the returned set and out of the rollups; when
    it is present for another business, the record is listed in the
    result's ``conflicts`` (:class:`Inserted`). An id given twice in
    ``records`` is stored from its first record.
    ``timeout_ms`` and ``skip_if_down`` are ``Database.run``'s. Up to
    ``COPY_THRESHOLD - 1`` records go as one call of ``mlops_insert_events``
    (one round trip, a cached plan); larger batches are COPYed into a
    temporary table dropped at commit (no session state, so safe through
    PgBouncer), then inserted from it.
    Raises the errors of ``Database.run``.
    """
    if not records:
        return Inserted()
    shard = random.randrange(SHARDS)
    rows = _first_of_each_id(records)
    if len(rows) < COPY_THRESHOLD:
        columns = [list(values) for values in zip(*(r.stored_row() for r in rows), strict=True)]

        def work(cur) -> Inserted:
            cur.execute(_CALL_SQL, (*columns, shard))
            return _find_conflicts(cur, records, {row[0] for row in cur.fetchall()})

        return db.run(work, timeout_ms=timeout_ms, skip_if_down=skip_if_down)

    data = "".join(r.copy_line() for r in rows)

    def copy_work(cur) -> Inserted:
        cur.execute(
            "CREATE TEMP TABLE mlops_staging ON COMMIT DROP AS "
            f"SELECT {', '.join(_STORED_COLUMNS)} FROM mlops_events WITH NO DATA")
        copy_from(cur, f"COPY mlops_staging ({', '.join(_STORED_COLUMNS)}) FROM STDIN",
                  io.StringIO(data))
        cur.execute(insert_sql(f"SELECT {', '.join(_STORED_COLUMNS)} FROM mlops_staging", shard))
        return _find_conflicts(cur, records, {row[0] for row in cur.fetchall()})

    return db.run(copy_work, timeout_ms=timeout_ms, transaction=True, skip_if_down=skip_if_down)



# --- reads (rollups only) ----------------------------------------------------

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
    ``appointment_conversion_rate`` is booked / requested (the course
    service's definition), 0 when nothing was requested. An unknown
    business yields zeros and empty lists.
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
        day = per_day.get(row["date"], ())
        row["p50_response_time_ms"] = latency_histogram.percentile(day, 0.5)
        row["p95_response_time_ms"] = latency_histogram.percentile(day, 0.95)
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
        {_business_sums(f"day >= {_SETTLED_BEFORE} AND day >= {_WINDOW_START}")}) r),
    (SELECT array_agg(ARRAY[business_id, n::text, t::text, c::text, s::text, p::text]) FROM (
        {_business_sums(f"(SELECT settled_stale FROM k) AND day >= {_WINDOW_START}"
                        f" AND day < {_SETTLED_BEFORE}")}) p)
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


# --- maintenance: backfill, folding shards, retention ------------------------
#
# Each step is one short transaction under a transaction-level advisory lock
# (safe through PgBouncer, which keeps no session state). The job's steps
# try the lock and skip when another process holds it, so one runs at a time
# across every worker and replica; erasure waits for it, so it never races
# a backfill batch.

def _locked(db: Database, work: Callable[[psycopg2.extensions.cursor], T], *, wait: bool,
            timeout_ms: int | None = None) -> T | None:
    """Run ``work`` in a transaction holding the maintenance lock.

    ``wait=False`` returns None at once when another session holds it.
    """
    def locked(cur):
        if wait:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MAINTENANCE_LOCK_KEY,))
        else:
            cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (MAINTENANCE_LOCK_KEY,))
            if not cur.fetchone()[0]:
                return None
        return work(cur)

    return db.run(locked, timeout_ms=timeout_ms, transaction=True)


def _backfill_sql(state: str, ctes: str) -> str:
    """One batch of the backfill whose progress is the row of table ``state``."""
    return f"""
WITH state AS (SELECT high_water, done_through FROM {state}),
batch AS (
    SELECT {_ROLLED_COLUMNS} FROM mlops_events
    WHERE id > (SELECT done_through FROM state) AND id <= (SELECT high_water FROM state)
    ORDER BY id LIMIT %(limit)s
), {ctes},
moved AS (
    UPDATE {state}
    SET done_through = CASE WHEN (SELECT count(*) FROM batch) < %(limit)s THEN high_water
                            ELSE (SELECT max(id) FROM batch) END
    RETURNING done_through, high_water
)
SELECT (SELECT count(*) FROM batch), done_through >= high_water FROM moved
"""


# Each backfill: its progress table and the SQL of one batch. Events stored
# before 0002 lack every rollup but the intents one, which has its own
# backfill: events stored before 0004 (a superset) lack it.
_BACKFILLS = (
    ("mlops_rollup_backfill", _backfill_sql("mlops_rollup_backfill",
                                            _rollup_ctes("batch", 0, intents=False))),
    ("mlops_rollup_intents_backfill", _backfill_sql("mlops_rollup_intents_backfill",
                                                    _intents_cte("batch", 0))),
)


def backfill_batch(db: Database, limit: int) -> tuple[int, bool] | None:
    """Roll up the next ``limit`` events stored before each rollup existed.

    Returns ``(events rolled up, summed over the backfills, finished)``, or
    None when another process holds the maintenance lock. Reads
    ``mlops_events`` by primary key range only; takes no lock on it beyond
    the rows it reads.
    """
    def work(cur):
        total, all_finished = 0, True
        for _, sql in _BACKFILLS:
            cur.execute(sql, {"limit": limit})
            n, finished = cur.fetchone()
            total += int(n)
            all_finished = all_finished and bool(finished)
        return total, all_finished

    return _locked(db, work, wait=False)


def backfill_finished(db: Database) -> bool:
    """Whether every event stored before the rollups existed has been rolled up."""
    def work(cur):
        cur.execute("SELECT bool_and(done_through >= high_water) FROM ("
                    + " UNION ALL ".join(f"SELECT done_through, high_water FROM {state}"
                                         for state, _ in _BACKFILLS) + ") s")
        return bool(cur.fetchone()[0])

    return db.run(work)


def _fold_sql(table: str, key: tuple[str, ...], sums: tuple[str, ...]) -> str:
    keys = ", ".join(key)
    adds = ", ".join(f"{c} = r.{c} + EXCLUDED.{c}" for c in sums)
    return f"""
WITH moved AS (
    DELETE FROM {table} WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {table}
        WHERE shard <> 0 AND day < (now() AT TIME ZONE 'UTC')::date LIMIT %(limit)s))
    RETURNING *
), folded AS (
    INSERT INTO {table} AS r ({keys}, shard, {', '.join(sums)})
    SELECT {keys}, 0, {', '.join(f'sum({c})' for c in sums)} FROM moved GROUP BY {keys}
    ON CONFLICT ({keys}, shard) DO UPDATE SET {adds}
)
SELECT count(*) FROM moved"""


_FOLD_DAILY_SQL = _fold_sql("mlops_rollup_daily", ("business_id", "day", "model_name"),
                            tuple(name for name, _ in _DAILY_SUMS))
_FOLD_LATENCY_SQL = _fold_sql("mlops_rollup_latency", ("business_id", "day", "bucket"),
                              ("messages",))
_FOLD_INTENTS_SQL = _fold_sql("mlops_rollup_intents", ("business_id", "day", "intent_detected"),
                              ("messages",))


def fold_shards(db: Database, limit: int) -> int | None:
    """Merge up to ``limit`` shard rows of past UTC days (per table) into shard 0.

    Today's shards stay, since writers still use them. Returns the rows
    merged, or None when another process holds the maintenance lock.
    """
    def work(cur):
        n = 0
        for sql in (_FOLD_DAILY_SQL, _FOLD_LATENCY_SQL, _FOLD_INTENTS_SQL):
            cur.execute(sql, {"limit": limit})
            n += cur.fetchone()[0]
        return n

    return _locked(db, work, wait=False)


_EXPIRE_EVENTS_SQL = """
DELETE FROM mlops_events WHERE id = ANY(ARRAY(
    SELECT id FROM mlops_events
    WHERE received_at < now() - make_interval(days => %(days)s)
    ORDER BY received_at LIMIT %(limit)s))
"""


def delete_expired_events(db: Database, days: int, limit: int) -> int | None:
    """Delete up to ``limit`` raw events received more than ``days`` days ago, oldest first.

    Rollups keep summarising them. Returns the rows deleted, or None when
    another process holds the maintenance lock. Call only once the backfill
    has finished (otherwise rows not yet rolled up would be lost).
    """
    def work(cur):
        cur.execute(_EXPIRE_EVENTS_SQL, {"days": days, "limit": limit})
        return cur.rowcount

    return _locked(db, work, wait=False)


_ROLLUP_TABLES = ("mlops_rollup_daily", "mlops_rollup_latency", "mlops_rollup_intents",
                  "mlops_rollup_conversations")
# The day column retention looks at, per rollup table.
_ROLLUP_DAY = {"mlops_rollup_daily": "day", "mlops_rollup_latency": "day",
               "mlops_rollup_intents": "day", "mlops_rollup_conversations": "last_day"}


def delete_expired_rollups(db: Database, days: int, limit: int) -> int | None:
    """Delete up to ``limit`` rows per rollup table for UTC days more than ``days`` ago.

    Returns the rows deleted, or None when another process holds the lock.
    """
    def work(cur):
        deleted = 0
        for table in _ROLLUP_TABLES:
            cur.execute(
                f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} "
                f"WHERE {_ROLLUP_DAY[table]} < (now() AT TIME ZONE 'UTC')::date - %(days)s "
                "LIMIT %(limit)s))",
                {"days": days, "limit": limit})
            deleted += cur.rowcount
        if deleted:
            cur.execute(_BUMP_EPOCH_SQL)
        return deleted

    return _locked(db, work, wait=False)


# --- prices of stored events: the backfill and reprice ----------------------
#
# Both price rows in Python (the table is mlops/prices.py) and write the
# prices back with the rollups' price sums moved by the difference, in one
# transaction under the maintenance lock, so the rollups stay equal to the
# raw sums. Only rows already rolled up are priced (the rollup backfill has
# finished; see price_backfill_batch and reprice).

# What pricing a stored row reads.
_PRICE_INPUT = ("id, received_at, model_name, prompt_tokens, completion_tokens, tokens_used, "
                f"extra -> '{prices.PROVIDER_KEY}', extra -> '{prices.CACHE_READ_KEY}'")


def _price_sums(source: str) -> str:
    return (f"SELECT business_id, {_DAY} AS day, model_name, "
            + ", ".join(f"{expr} AS {name}" for name, expr in PRICE_SUMS)
            + f" FROM {source} GROUP BY 1, 2, 3")


_NAMES = [name for name, _ in PRICE_SUMS]
# Writes the new prices of rows (ids, costs, statuses) and adds, per rollup
# key, (sums over the rows as priced now) - (sums as priced before) to one
# shard row of that key. Rows whose price does not change are left alone.
_REPRICE_SQL = f"""
WITH new AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(costs)s::numeric[], %(statuses)s::text[])
        AS n (id, price_usd, price_status)
),
changed AS MATERIALIZED (
    SELECT e.id, e.business_id, e.received_at, e.model_name, e.api_cost_usd,
           e.price_usd AS old_price_usd, e.price_status AS old_price_status,
           n.price_usd, n.price_status
    FROM mlops_events e JOIN new n USING (id)
    WHERE e.price_usd IS DISTINCT FROM n.price_usd::numeric(24, 12)
       OR e.price_status IS DISTINCT FROM n.price_status
    FOR UPDATE OF e
),
updated AS (
    UPDATE mlops_events e SET price_usd = c.price_usd, price_status = c.price_status
    FROM changed c WHERE e.id = c.id
    RETURNING e.id, e.business_id, e.received_at, e.model_name, e.api_cost_usd,
              e.price_usd, e.price_status
),
before AS (
    SELECT business_id, received_at, model_name, api_cost_usd,
           old_price_usd AS price_usd, old_price_status AS price_status FROM changed
),
delta AS (
    SELECT a.business_id, a.day, a.model_name,
           {", ".join(f"a.{n} - b.{n} AS {n}" for n in _NAMES)}
    FROM ({_price_sums("updated")}) a JOIN ({_price_sums("before")}) b
      USING (business_id, day, model_name)
),
-- One shard row per key takes the difference (the lowest: shard 0 once folded).
target AS (
    SELECT DISTINCT ON (r.business_id, r.day, r.model_name) r.shard, d.*
    FROM mlops_rollup_daily r JOIN delta d USING (business_id, day, model_name)
    ORDER BY r.business_id, r.day, r.model_name, r.shard
),
-- Locked in key order, the order writers lock rollup rows in, so a reprice
-- and concurrent inserts do not deadlock. Rows are matched by key, not ctid:
-- an insert may update a row (a new version) meanwhile.
locked AS MATERIALIZED (
    SELECT r.business_id, r.day, r.model_name, r.shard FROM mlops_rollup_daily r
    JOIN target t USING (business_id, day, model_name, shard)
    ORDER BY r.business_id, r.day, r.model_name, r.shard
    FOR UPDATE OF r
),
rolled AS (
    UPDATE mlops_rollup_daily r SET {", ".join(f"{n} = r.{n} + t.{n}" for n in _NAMES)}
    FROM target t JOIN locked l USING (business_id, day, model_name, shard)
    WHERE (r.business_id, r.day, r.model_name, r.shard)
        = (t.business_id, t.day, t.model_name, t.shard)
),
epoch AS (
    {_BUMP_EPOCH_SQL} WHERE EXISTS (SELECT FROM delta WHERE day < {_SETTLED_BEFORE})
)
SELECT count(*) FROM updated"""


def _reprice_rows(cur, rows: list[tuple], table: prices.Table) -> int:
    """Price ``rows`` (``_PRICE_INPUT`` values) by ``table`` and store what changed;
    returns the rows whose price changed."""
    if not rows:
        return 0
    ids, costs, statuses = [], [], []
    for row_id, at, model, prompt, completion, total, provider, cached in rows:
        cost, status = table.price_stored(model, at, prompt, completion, total, provider,
                                          cached)
        ids.append(row_id)
        costs.append(cost)
        statuses.append(status)
    cur.execute(_REPRICE_SQL, {"ids": ids, "costs": costs, "statuses": statuses})
    return cur.fetchone()[0]


_PRICE_BACKFILL_BATCH_SQL = f"""
SELECT {_PRICE_INPUT} FROM mlops_events
WHERE id > (SELECT done_through FROM mlops_price_backfill)
  AND id <= (SELECT high_water FROM mlops_price_backfill)
  AND price_status IS NULL
ORDER BY id LIMIT %(limit)s"""
_PRICE_BACKFILL_MOVE_SQL = """
UPDATE mlops_price_backfill
SET done_through = CASE WHEN %(last)s::bigint IS NULL THEN high_water ELSE %(last)s END
WHERE done_through < high_water"""


def price_backfill_batch(db: Database, limit: int, table: prices.Table) -> int | None:
    """Price the next ``limit`` events stored before prices existed, by ``table``.

    Call once :func:`backfill_finished` (their rollup rows must exist).
    Returns the events read (fewer than ``limit``: finished), or None when
    another process holds the maintenance lock. Idempotent: progress is kept
    in ``mlops_price_backfill``, and rows already priced are skipped.
    Reads ``mlops_events`` by primary-key range.
    """
    def work(cur):
        cur.execute(_PRICE_BACKFILL_BATCH_SQL, {"limit": limit})
        rows = cur.fetchall()
        _reprice_rows(cur, rows, table)
        last = rows[-1][0] if len(rows) == limit else None
        cur.execute(_PRICE_BACKFILL_MOVE_SQL, {"last": last})
        return len(rows)

    return _locked(db, work, wait=False)


_REPRICE_BATCH_SQL = f"""
SELECT {_PRICE_INPUT} FROM mlops_events
WHERE received_at >= %(since)s AND received_at < %(until)s
  AND id > %(after)s AND id <= %(through)s
ORDER BY id LIMIT %(limit)s"""


def reprice(db: Database, since: datetime, until: datetime, table: prices.Table, *,
            limit: int = 5000, timeout_ms: int = 60_000) -> tuple[int, int]:
    """Price again, by ``table``, every event received in ``[since, until)`` and stored
    before the call (later ones were priced as they were stored).

    Runs batches of ``limit`` rows, each one transaction waiting for the
    maintenance lock (bounded by ``timeout_ms``); the rollups' price sums move
    with the prices. Returns ``(events read, events whose price changed)``.
    Raises ``RuntimeError`` while the rollup backfill has not finished (rows
    it has not reached have no rollup to correct yet), and the errors of
    ``Database.run``.
    """
    if not backfill_finished(db):
        raise RuntimeError("the rollup backfill has not finished; reprice after it has")
    def newest(cur):
        cur.execute("SELECT coalesce(max(id), 0) FROM mlops_events")
        return cur.fetchone()[0]

    through = db.run(newest)
    after, read, changed = 0, 0, 0
    while True:
        def work(cur, after=after):
            cur.execute(_REPRICE_BATCH_SQL, {"since": since, "until": until, "after": after,
                                             "through": through, "limit": limit})
            rows = cur.fetchall()
            return rows, _reprice_rows(cur, rows, table)

        rows, n = _locked(db, work, wait=True, timeout_ms=timeout_ms)
        read, changed = read + len(rows), changed + n
        if len(rows) < limit:
            return read, changed
        after = rows[-1][0]


# --- erasure -----------------------------------------------------------------

def _rolled_up(state: str) -> str:
    """Rows of mlops_erased already counted in the rollups of the backfill
    ``state``: all but those it has not reached yet."""
    return f"""NOT (id > (SELECT done_through FROM {state})
               AND id <= (SELECT high_water FROM {state}))"""


_ROLLED_UP = _rolled_up("mlops_rollup_backfill")


def _subtract_sql(table: str, key: tuple[str, ...], contribution: str,
                  sums: tuple[str, ...]) -> str:
    """Replace the rows of ``table`` under each key of ``contribution`` by their
    shard total minus ``contribution``'s (dropping those left empty)."""
    keys = ", ".join(key)
    match = " AND ".join(f"r.{k} = c.{k}" for k in key)
    new_keys = ", ".join(f"total.{k}" for k in key)
    new_sums = ", ".join(f"total.{s} - c.{s}" for s in sums)
    return f"""
WITH c AS ({contribution}),
old AS (DELETE FROM {table} r USING c WHERE {match} RETURNING r.*),
total AS (SELECT {keys}, {', '.join(f'sum({s}) AS {s}' for s in sums)} FROM old GROUP BY {keys}),
put AS (
    INSERT INTO {table} ({keys}, shard, {', '.join(sums)})
    SELECT {new_keys}, 0, {new_sums}
    FROM total JOIN c USING ({keys})
    WHERE total.messages > c.messages
    RETURNING 1
)
SELECT (SELECT count(*) FROM old), (SELECT count(*) FROM put)"""


_SUBTRACT_DAILY_SQL = _subtract_sql(
    "mlops_rollup_daily", ("business_id", "day", "model_name"),
    f"SELECT business_id, {_DAY} AS day, model_name, "
    + ", ".join(f"{expr} AS {name}" for name, expr in _DAILY_SUMS)
    + f" FROM mlops_erased WHERE {_ROLLED_UP} GROUP BY 1, 2, 3",
    tuple(name for name, _ in _DAILY_SUMS))
_SUBTRACT_LATENCY_SQL = _subtract_sql(
    "mlops_rollup_latency", ("business_id", "day", "bucket"),
    f"SELECT business_id, {_DAY} AS day, ({latency_histogram.BUCKET_SQL})::smallint AS bucket, "
    f"count(*) AS messages FROM mlops_erased WHERE {_ROLLED_UP} GROUP BY 1, 2, 3",
    ("messages",))
_SUBTRACT_INTENTS_SQL = _subtract_sql(
    "mlops_rollup_intents", ("business_id", "day", "intent_detected"),
    f"SELECT business_id, {_DAY} AS day, intent_detected, count(*) AS messages "
    f"FROM mlops_erased WHERE {_rolled_up('mlops_rollup_intents_backfill')} GROUP BY 1, 2, 3",
    ("messages",))

_ERASE_CONVERSATION_STEPS = (
    # The raw rows, found through its business and the days it was active ...
    """WITH gone AS (
        DELETE FROM mlops_events e USING mlops_rollup_conversations k
        WHERE k.conversation_id = %(id)s AND e.business_id = k.business_id
          AND e.received_at >= (k.first_day::timestamp AT TIME ZONE 'UTC')
          AND e.received_at < ((k.last_day + 1)::timestamp AT TIME ZONE 'UTC')
          AND e.conversation_id = %(id)s
        RETURNING e.*)
    INSERT INTO mlops_erased SELECT * FROM gone""",
    # ... and among the rows the backfill has not reached yet.
    """WITH gone AS (
        DELETE FROM mlops_events e USING mlops_rollup_backfill b
        WHERE e.id > b.done_through AND e.id <= b.high_water AND e.conversation_id = %(id)s
        RETURNING e.*)
    INSERT INTO mlops_erased SELECT * FROM gone""",
)


_ERASE_SESSION_STEPS = (
    # Every raw row of the session, through mlops_events_session_idx.
    """WITH gone AS (DELETE FROM mlops_events WHERE session_id = %(id)s RETURNING *)
    INSERT INTO mlops_erased SELECT * FROM gone""",
)

# The conversations a session erasure emptied: those with no raw event left
# over the days of their span. (A conversation whose other events retention
# already deleted goes too: its span was all the rollup knew of it.)
_DROP_EMPTIED_CONVERSATIONS_SQL = """
DELETE FROM mlops_rollup_conversations r
USING (SELECT DISTINCT business_id, conversation_id FROM mlops_erased
       WHERE conversation_id IS NOT NULL) c
WHERE r.business_id = c.business_id AND r.conversation_id = c.conversation_id
  AND NOT EXISTS (
    SELECT FROM mlops_events e
    WHERE e.business_id = r.business_id AND e.conversation_id = r.conversation_id
      AND e.received_at >= (r.first_day::timestamp AT TIME ZONE 'UTC')
      AND e.received_at < ((r.last_day + 1)::timestamp AT TIME ZONE 'UTC'))"""

# Events received up to now for the erased id are refused from now on (insert_sql).
_TOMBSTONE_SQL = """
INSERT INTO mlops_erasures (erased, id, erased_at) VALUES (%s, %s, now())
ON CONFLICT (erased, id) DO UPDATE SET erased_at = EXCLUDED.erased_at"""

# One row of the append-only audit trail (migrations/0011_erasure_audit.sql).
_AUDIT_SQL = """
INSERT INTO mlops_erasure_audit (outcome, key_id, target, target_id, events, spooled_events,
                                 rollup_changes, detail)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
RETURNING id, at"""
# Whatever each erasure reports beyond these keys is a count of rollup rows changed.
_NOT_ROLLUP_COUNTS = ("mlops_events", "spooled_events")


@dataclass(frozen=True)
class Requester:
    """Who asked for an erasure: ``mlops.auth.key_id`` of their key, or ``"none"``."""

    key_id: str = "none"


def _audit(cur, outcome: str, key: str, target: str, target_id: str,
           counts: dict[str, int], detail: dict) -> tuple[int, datetime]:
    rollup = sum(v for k, v in counts.items() if k not in _NOT_ROLLUP_COUNTS)
    cur.execute(_AUDIT_SQL, (outcome, key, target, target_id, counts.get("mlops_events", 0),
                             counts.get("spooled_events", 0), rollup, Json(detail)))
    return cur.fetchone()


def _erase_rows(cur, field: str, value: str, steps: tuple[str, ...]) -> dict[str, int]:
    """Move the rows ``steps`` delete into temp table ``mlops_erased``, subtract
    them from the counting rollups and tombstone ``value``; return the counts."""
    cur.execute("CREATE TEMP TABLE mlops_erased ON COMMIT DROP AS "
                "SELECT * FROM mlops_events WITH NO DATA")
    for step in steps:
        cur.execute(step, {"id": value})
    cur.execute("SELECT count(*) FROM mlops_erased")
    counts = {"mlops_events": cur.fetchone()[0]}
    recomputed = 0
    for table, sql in (("mlops_rollup_daily", _SUBTRACT_DAILY_SQL),
                       ("mlops_rollup_latency", _SUBTRACT_LATENCY_SQL),
                       ("mlops_rollup_intents", _SUBTRACT_INTENTS_SQL)):
        cur.execute(sql)
        old, put = cur.fetchone()
        counts[table] = old - put
        recomputed += put
    if field == "conversation_id":
        cur.execute("DELETE FROM mlops_rollup_conversations WHERE conversation_id = %s",
                    (value,))
    else:
        cur.execute(_DROP_EMPTIED_CONVERSATIONS_SQL)
    counts["mlops_rollup_conversations"] = cur.rowcount
    counts["rollup_rows_recomputed"] = recomputed
    cur.execute(_BUMP_EPOCH_SQL)
    cur.execute(_TOMBSTONE_SQL, (field, value))
    return counts


def _erase(db: Database, field: str, value: str, timeout_ms: int, work,
           requester: Requester, spooled_events: int) -> dict[str, int]:
    """Run ``work(cur) -> counts`` under the maintenance lock, and write its audit
    row in the same transaction: the trail holds an erasure if and only if it happened."""
    def audited(cur):
        counts = work(cur)
        counts["spooled_events"] = spooled_events
        _audit(cur, "erased", requester.key_id, field, value, counts, {"removed": counts})
        return counts

    return _locked(db, audited, wait=True, timeout_ms=timeout_ms)


def erase_conversation(db: Database, conversation_id: str, timeout_ms: int, *,
                       requester: Requester = Requester(),
                       spooled_events: int = 0) -> dict[str, int]:
    """Delete one conversation's events and its share of every rollup, in one transaction.

    Returns rows removed per table (``mlops_events``,
    ``mlops_rollup_conversations``, and for ``mlops_rollup_daily``,
    ``mlops_rollup_latency`` and ``mlops_rollup_intents`` the rows left empty) plus
    ``rollup_rows_recomputed``: the rows rewritten as (shard total - the
    conversation's share), and ``spooled_events`` as given (the caller's
    count of spooled copies it discarded). Rollups of days whose raw rows
    retention already deleted keep their anonymous counts; the conversation
    id goes from every table. Zeros when nothing matches. Events of the
    conversation received before now are refused from now on, so copies
    still in a spool or in flight elsewhere do not bring it back
    (``mlops_erasures``). The same transaction appends the audit row
    (``mlops_erasure_audit``) naming ``requester``.
    """
    return _erase(db, "conversation_id", conversation_id, timeout_ms,
                  lambda cur: _erase_rows(cur, "conversation_id", conversation_id,
                                          _ERASE_CONVERSATION_STEPS),
                  requester, spooled_events)


def erase_session(db: Database, session_id: str, timeout_ms: int, *,
                  requester: Requester = Requester(), spooled_events: int = 0) -> dict[str, int]:
    """Delete one session's events (of every business) and their share of every rollup.

    As :func:`erase_conversation`, with the same keys; a conversation's
    rollup row goes once none of its events is left.
    """
    return _erase(db, "session_id", session_id, timeout_ms,
                  lambda cur: _erase_rows(cur, "session_id", session_id, _ERASE_SESSION_STEPS),
                  requester, spooled_events)


def erase_business(db: Database, business_id: str, timeout_ms: int, *,
                   requester: Requester = Requester(), spooled_events: int = 0) -> dict[str, int]:
    """Delete every event and rollup row of one business, in one transaction.

    Returns rows removed per table and ``spooled_events`` as given; zeros
    when nothing matches. Events of the business received before now are
    refused from now on, and the audit row is appended, as for
    :func:`erase_conversation`.
    """
    def work(cur):
        counts = {}
        for table in ("mlops_events", *_ROLLUP_TABLES):
            cur.execute(f"DELETE FROM {table} WHERE business_id = %s", (business_id,))
            counts[table] = cur.rowcount
        cur.execute(_BUMP_EPOCH_SQL)
        cur.execute(_TOMBSTONE_SQL, ("business_id", business_id))
        return counts

    return _erase(db, "business_id", business_id, timeout_ms, work, requester, spooled_events)


def record_erasure_refusal(db: Database, requester: Requester, target: str, target_id: str,
                           status: int, reason: str) -> None:
    """Append a refused erasure (HTTP ``status``, ``reason`` such as ``wrong_key``) to
    the audit trail. Raises the errors of ``Database.run``."""
    def work(cur):
        _audit(cur, "refused", requester.key_id, target, target_id, {},
               {"status": status, "reason": reason})

    db.run(work, transaction=True)


_AUDIT_PAGE_SQL = """
SELECT id, at, outcome, key_id, target, target_id, events, spooled_events, rollup_changes,
       detail
FROM mlops_erasure_audit WHERE id < %(before)s ORDER BY id DESC LIMIT %(limit)s"""
_AUDIT_FIELDS = ("id", "at", "outcome", "key_id", "target", "target_id", "events",
                 "spooled_events", "rollup_changes", "detail")


def erasure_audit(db: Database, limit: int, before: int | None = None) -> list[dict]:
    """Up to ``limit`` audit rows, newest first, with ``id`` below ``before`` (all when None).

    Each row: ``id``, ``at`` (ISO 8601), ``outcome`` (``erased``/``refused``),
    ``key_id``, ``target``, ``target_id``, ``events``, ``spooled_events``,
    ``rollup_changes``, ``detail``. One index range scan on the primary key.
    """
    def work(cur):
        cur.execute(_AUDIT_PAGE_SQL,
                    {"before": before if before is not None else 2**63 - 1, "limit": limit})
        return cur.fetchall()

    rows = [dict(zip(_AUDIT_FIELDS, row, strict=True)) for row in db.run(work)]
    for row in rows:
        row["at"] = row["at"].isoformat()
    return rows


# Each business holding events of a conversation or a session: a conversation
# through its rollup row (indexed on conversation_id) and the raw rows the
# backfill has not reached; a session through mlops_events_session_idx.
_HOLDERS_SQL = {
    "conversation_id": """
        SELECT business_id FROM mlops_rollup_conversations WHERE conversation_id = %(id)s
        UNION
        SELECT e.business_id FROM mlops_events e JOIN mlops_rollup_backfill b
          ON e.id > b.done_through AND e.id <= b.high_water
        WHERE e.conversation_id = %(id)s""",
    "session_id": "SELECT DISTINCT business_id FROM mlops_events WHERE session_id = %(id)s",
}


def businesses_holding(db: Database, field: str, value: str) -> frozenset[str]:
    """The business ids with stored events whose ``field`` (``conversation_id`` or
    ``session_id``) is ``value``; empty when none. Raises the errors of ``Database.run``."""
    def work(cur):
        cur.execute(_HOLDERS_SQL[field], {"id": value})
        return frozenset(row[0] for row in cur.fetchall())

    return db.run(work)
