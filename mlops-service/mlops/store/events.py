"""Events going in: the insert with its rollups, its generated function, COPY encoding.

``insert_events`` updates the rollups in the same statement that inserts
the events, for exactly the rows that statement inserted, so replays never
count twice. Small batches call ``mlops_insert_events``, the statement as a
PL/pgSQL function that a migration creates (``insert_function_sql``
generates its text); large ones go through COPY into a staging table.
"""

from __future__ import annotations

import collections
import io
import json
import operator
import random

from psycopg2.extras import Json

from ..db import Database, copy_from
from ..schemas import Record, price_all
from .rollup_sql import ROLLED_COLUMNS, SHARDS, rollup_ctes

# The contract's fields, in column order (see migrations/0001_events.sql).
CONTRACT_COLUMNS = (
    "business_id", "conversation_id", "session_id", "response_time_ms", "success_rate",
    "user_satisfaction", "tokens_used", "prompt_tokens", "completion_tokens", "api_cost_usd",
    "model_name", "intent_detected", "appointment_requested", "human_handoff_requested",
    "appointment_booked", "user_message_length", "ai_response_length", "response_type",
)
INSERT_COLUMNS = ("event_id", "received_at", *CONTRACT_COLUMNS, "extra")
# The service's price of the call (mlops/prices.py, migrations/0014_insert_function_prices.sql).
PRICE_COLUMNS = ("price_usd", "price_status")
# What insert_events stores: the event and its price.
STORED_COLUMNS = (*INSERT_COLUMNS, *PRICE_COLUMNS)
# An event's values of CONTRACT_COLUMNS, as a tuple.
_contract_values = operator.attrgetter(*CONTRACT_COLUMNS)


def insert_row(record: Record) -> tuple:
    """The values of ``record`` for ``INSERT_COLUMNS``, in order."""
    data = record.event
    return (
        record.event_id,
        record.received_at,
        *_contract_values(data),
        Json(data.model_extra or {}),
    )


def stored_row(record: Record) -> tuple:
    """The values of ``record`` for ``STORED_COLUMNS``: :func:`insert_row` and the price."""
    price = record.price
    return (*insert_row(record), price.cost_usd, price.status)


# The COPY text of each price status (none needs escaping).
_STATUS_TEXT = {None: "\\N", "priced": "priced", "estimated": "estimated",
                "unpriced": "unpriced"}


def copy_line(record: Record) -> str:
    """The stored row of ``record`` as one line of COPY text format
    (tab-separated, ``\\N`` for NULL)."""
    data = record.event
    values = [record.event_id, record.received_at.isoformat(), *_contract_values(data),
              json.dumps(data.model_extra) if data.model_extra else "{}"]
    picodollars, status = record.price
    # price_usd as whole picodollars in exponent notation, which numeric's input reads.
    price = "\\N" if picodollars is None else f"{picodollars}e-12"
    return "\t".join(map(_copy_text, values)) + f"\t{price}\t{_STATUS_TEXT[status]}\n"


def _copy_text(value) -> str:
    """One value in COPY's text format (PostgreSQL manual, COPY, "Text Format"): ``\\N``
    for NULL, ``t``/``f``, a number as ``str``, a string with the four characters
    the format gives a meaning (backslash, tab, newline, carriage return) escaped."""
    if type(value) is str:
        if value.isprintable() and "\\" not in value:  # the common case: nothing to escape
            return value
        return (value.replace("\\", "\\\\").replace("\t", "\\t")
                .replace("\n", "\\n").replace("\r", "\\r"))
    if value is None:
        return "\\N"
    if value is True or value is False:
        return "t" if value else "f"
    return str(value)  # a number: nothing to escape


# Batches at least this large go through COPY into a staging table.
COPY_THRESHOLD = 64


def insert_sql(source: str, shard: int | str) -> str:
    """One statement inserting the rows of ``source`` and rolling up those inserted.

    ``source`` is a query yielding ``STORED_COLUMNS`` in order, each typed
    (``unnest`` of typed arrays, a staging table, or a generator in the
    benchmark's loader). Returns the inserted ``event_id``s. Rows whose
    ``event_id`` is already stored are skipped and left out of the rollups
    (``RETURNING`` yields only new rows); so are rows received before an
    erasure of their conversation, session or business (``mlops_erasures``),
    such as a copy of an erased event still in some replica's spool.
    Events go in ``event_id`` order and each rollup in key order, so
    concurrent inserts sharing ids or keys do not deadlock.
    """
    columns = ", ".join(STORED_COLUMNS)
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
    RETURNING {ROLLED_COLUMNS}, event_id
), {rollup_ctes('ins', shard)}
SELECT event_id FROM ins"""


# Parameter types of mlops_insert_events: one array per column of STORED_COLUMNS.
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
    params = ", ".join(f"p_{c} {t}[]" for c, t in zip(STORED_COLUMNS, _ARRAY_TYPES, strict=True))
    arrays = ", ".join(f"p_{c}" for c in STORED_COLUMNS)
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
    price_all(rows)
    if len(rows) < COPY_THRESHOLD:
        columns = [list(values) for values in zip(*(stored_row(r) for r in rows), strict=True)]

        def work(cur) -> Inserted:
            cur.execute(_CALL_SQL, (*columns, shard))
            return _find_conflicts(cur, records, {row[0] for row in cur.fetchall()})

        return db.run(work, timeout_ms=timeout_ms, skip_if_down=skip_if_down)

    data = "".join(map(copy_line, rows))

    def copy_work(cur) -> Inserted:
        cur.execute(
            "CREATE TEMP TABLE mlops_staging ON COMMIT DROP AS "
            f"SELECT {', '.join(STORED_COLUMNS)} FROM mlops_events WITH NO DATA")
        copy_from(cur, f"COPY mlops_staging ({', '.join(STORED_COLUMNS)}) FROM STDIN",
                  io.StringIO(data))
        cur.execute(insert_sql(f"SELECT {', '.join(STORED_COLUMNS)} FROM mlops_staging", shard))
        return _find_conflicts(cur, records, {row[0] for row in cur.fetchall()})

    return db.run(copy_work, timeout_ms=timeout_ms, transaction=True, skip_if_down=skip_if_down)
