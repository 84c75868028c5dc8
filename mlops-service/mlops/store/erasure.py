"""Erasure of a conversation, a session or a business, and its audit trail.

Each erasure deletes the raw rows and their share of every rollup in one
transaction under the maintenance lock, tombstones the erased id
(``mlops_erasures``, so copies still in a spool do not bring it back) and
appends its audit row (``mlops_erasure_audit``) in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg2.extras import Json

from .. import latency_histogram
from ..db import Database
from .maintenance_lock import locked
from .rollup_sql import BUMP_EPOCH_SQL, DAILY_SUMS, DAY, ROLLUP_TABLES


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
    f"SELECT business_id, {DAY} AS day, model_name, "
    + ", ".join(f"{expr} AS {name}" for name, expr in DAILY_SUMS)
    + f" FROM mlops_erased WHERE {_ROLLED_UP} GROUP BY 1, 2, 3",
    tuple(name for name, _ in DAILY_SUMS))
_SUBTRACT_LATENCY_SQL = _subtract_sql(
    "mlops_rollup_latency", ("business_id", "day", "bucket"),
    f"SELECT business_id, {DAY} AS day, ({latency_histogram.BUCKET_SQL})::smallint AS bucket, "
    f"count(*) AS messages FROM mlops_erased WHERE {_ROLLED_UP} GROUP BY 1, 2, 3",
    ("messages",))
_SUBTRACT_INTENTS_SQL = _subtract_sql(
    "mlops_rollup_intents", ("business_id", "day", "intent_detected"),
    f"SELECT business_id, {DAY} AS day, intent_detected, count(*) AS messages "
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
    cur.execute(BUMP_EPOCH_SQL)
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

    return locked(db, audited, wait=True, timeout_ms=timeout_ms)


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
        for table in ("mlops_events", *ROLLUP_TABLES):
            cur.execute(f"DELETE FROM {table} WHERE business_id = %s", (business_id,))
            counts[table] = cur.rowcount
        cur.execute(BUMP_EPOCH_SQL)
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
