"""Prices of stored events: the price backfill and ``reprice``.

Both price rows in Python (the table is mlops/prices.py) and write the
prices back with the rollups' price sums moved by the difference, in one
transaction under the maintenance lock, so the rollups stay equal to the
raw sums. Only rows already rolled up are priced (the rollup backfill has
finished; see price_backfill_batch and reprice).
"""

from __future__ import annotations

from datetime import datetime

from .. import prices
from ..db import Database
from .housekeeping import backfill_finished
from .maintenance_lock import locked
from .rollup_sql import BUMP_EPOCH_SQL, DAY, PRICE_SUMS, SETTLED_BEFORE

# What pricing a stored row reads.
_PRICE_INPUT = ("id, received_at, model_name, prompt_tokens, completion_tokens, tokens_used, "
                f"extra -> '{prices.PROVIDER_KEY}', extra -> '{prices.CACHE_READ_KEY}'")


def _price_sums(source: str) -> str:
    return (f"SELECT business_id, {DAY} AS day, model_name, "
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
    {BUMP_EPOCH_SQL} WHERE EXISTS (SELECT FROM delta WHERE day < {SETTLED_BEFORE})
)
SELECT count(*) FROM updated"""


def _reprice_rows(cur, rows: list[tuple], table: prices.Table) -> int:
    """Price ``rows`` (``_PRICE_INPUT`` values) by ``table`` and store what changed;
    returns the rows whose price changed."""
    if not rows:
        return 0
    ids, costs, statuses = [], [], []
    for row_id, at, model, prompt, completion, total, provider, cached in rows:
        price = table.price_stored(model, at, prompt, completion, total, provider, cached)
        ids.append(row_id)
        costs.append(price.cost_usd)
        statuses.append(price.status)
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

    return locked(db, work, wait=False)


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

        rows, n = locked(db, work, wait=True, timeout_ms=timeout_ms)
        read, changed = read + len(rows), changed + n
        if len(rows) < limit:
            return read, changed
        after = rows[-1][0]
