"""The maintenance job's steps: the rollup backfill, folding shards, expiry.

Each is one short transaction under the maintenance lock
(:mod:`mlops.store.maintenance_lock`), skipped when another process holds it.
"""

from __future__ import annotations

from ..db import Database
from .maintenance_lock import locked
from .rollup_sql import (
    BUMP_EPOCH_SQL,
    DAILY_SUMS,
    ROLLED_COLUMNS,
    ROLLUP_TABLES,
    intents_cte,
    rollup_ctes,
)


def _backfill_sql(state: str, ctes: str) -> str:
    """One batch of the backfill whose progress is the row of table ``state``."""
    return f"""
WITH state AS (SELECT high_water, done_through FROM {state}),
batch AS (
    SELECT {ROLLED_COLUMNS} FROM mlops_events
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
                                            rollup_ctes("batch", 0, intents=False))),
    ("mlops_rollup_intents_backfill", _backfill_sql("mlops_rollup_intents_backfill",
                                                    intents_cte("batch", 0))),
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

    return locked(db, work, wait=False)


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
                            tuple(name for name, _ in DAILY_SUMS))
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

    return locked(db, work, wait=False)


EXPIRE_EVENTS_SQL = """
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
        cur.execute(EXPIRE_EVENTS_SQL, {"days": days, "limit": limit})
        return cur.rowcount

    return locked(db, work, wait=False)


# The day column retention looks at, per rollup table.
_ROLLUP_DAY = {"mlops_rollup_daily": "day", "mlops_rollup_latency": "day",
               "mlops_rollup_intents": "day", "mlops_rollup_conversations": "last_day"}


def delete_expired_rollups(db: Database, days: int, limit: int) -> int | None:
    """Delete up to ``limit`` rows per rollup table for UTC days more than ``days`` ago.

    Returns the rows deleted, or None when another process holds the lock.
    """
    def work(cur):
        deleted = 0
        for table in ROLLUP_TABLES:
            cur.execute(
                f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} "
                f"WHERE {_ROLLUP_DAY[table]} < (now() AT TIME ZONE 'UTC')::date - %(days)s "
                "LIMIT %(limit)s))",
                {"days": days, "limit": limit})
            deleted += cur.rowcount
        if deleted:
            cur.execute(BUMP_EPOCH_SQL)
        return deleted

    return locked(db, work, wait=False)
