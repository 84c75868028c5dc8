"""The maintenance lock: one writer of past rollups at a time, across every process.

Each maintenance step (backfill, folding shards, retention, pricing stored
events) is one short transaction under a transaction-level advisory lock
(safe through PgBouncer, which keeps no session state). The job's steps
try the lock and skip when another process holds it, so one runs at a time
across every worker and replica; erasure and reprice wait for it, so they
never race a backfill batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import psycopg2

from ..db import Database

T = TypeVar("T")

# pg_advisory_xact_lock key of the maintenance job, erasure and reprice ("rollup").
MAINTENANCE_LOCK_KEY = 0x726F6C6C7570


def locked(db: Database, work: Callable[[psycopg2.extensions.cursor], T], *, wait: bool,
           timeout_ms: int | None = None) -> T | None:
    """Run ``work`` in a transaction holding the maintenance lock.

    ``wait=False`` returns None at once when another session holds it.
    """
    def under_lock(cur):
        if wait:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MAINTENANCE_LOCK_KEY,))
        else:
            cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (MAINTENANCE_LOCK_KEY,))
            if not cur.fetchone()[0]:
                return None
        return work(cur)

    return db.run(under_lock, timeout_ms=timeout_ms, transaction=True)
