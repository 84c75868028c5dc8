"""The maintenance job: rollup and price backfills, shard folding, retention, size sampling.

Every worker of every replica runs a :class:`Maintenance` thread, but each
step is a short transaction that first tries a transaction-level advisory
lock (``store.MAINTENANCE_LOCK_KEY``), so one process works at a time and
the others skip the round. Transaction-level locks need no session state,
so this holds through Neon's PgBouncer pooler too. Steps, in order:

1. **Backfill**: roll up the events stored before the rollups existed, in
   batches of ``MAINTENANCE_BATCH_ROWS`` read by primary-key range (two
   backfills: migration 0002's rollups, and 0004's intent rollup).
2. **Prices**: once the rollup backfill has finished, price the events
   stored before prices existed (migration 0014), in batches by primary-key
   range, by this process's price table (``mlops.prices.current()``); the
   rollups' price sums move with them. Skipped when pricing is off.
3. **Fold**: merge the write shards of past UTC days into one row each.
4. **Retention**: with ``RETENTION_DAYS`` set (and both backfills finished),
   delete raw events older than that, oldest first, in batches; with
   ``ROLLUP_RETENTION_DAYS`` set, delete rollup rows of older days.

Each round first samples the database's size (``storage_budget.sample``,
at most once a minute across all processes).

None of these lock what ``/track`` writes (new rows of today), so writes
never wait for them. Each round stops after ``budget_seconds`` and resumes
at the next one.
"""

from __future__ import annotations

import logging
import random
import time

from . import prices, storage_budget, store
from .background import Loop
from .db import Database, DatabaseMisconfigured, DatabaseUnavailable

log = logging.getLogger(__name__)


class Maintenance:
    """One process's maintenance thread; :meth:`run_once` does one round."""

    def __init__(self, db: Database, *, retention_days: int | None,
                 rollup_retention_days: int | None, batch_rows: int,
                 interval_seconds: float, budget_seconds: float = 10.0) -> None:
        self._db = db
        self.retention_days = retention_days
        self.rollup_retention_days = rollup_retention_days
        self.batch_rows = batch_rows
        self.interval_seconds = interval_seconds
        self.budget_seconds = budget_seconds
        self._loop = Loop("maintenance", self._round)
        self._first = True  # the thread's first pass waits a random delay first

    @classmethod
    def from_settings(cls, db: Database, settings) -> Maintenance:
        """Built from ``RETENTION_DAYS``, ``ROLLUP_RETENTION_DAYS``, ``MAINTENANCE_*``."""
        return cls(db, retention_days=settings.retention_days,
                   rollup_retention_days=settings.rollup_retention_days,
                   batch_rows=settings.maintenance_batch_rows,
                   interval_seconds=settings.maintenance_interval_seconds)

    def run_once(self) -> dict[str, int] | None:
        """One round of every step; returns rows handled per step.

        ``{"backfilled", "priced", "folded", "events_deleted", "rollups_deleted"}``, or
        None when another process held the lock (this round is skipped).
        Raises the errors of ``Database.run``.
        """
        deadline = time.monotonic() + self.budget_seconds
        storage_budget.sample(self._db)  # skips itself when a sample is under a minute old
        done = {"backfilled": 0, "priced": 0, "folded": 0, "events_deleted": 0,
                "rollups_deleted": 0}

        def repeat(key: str, step) -> bool:
            """Run ``step`` until it handles less than a batch; False if locked out."""
            while time.monotonic() < deadline and not self._loop.stopping:
                n = step()
                if n is None:
                    return False
                done[key] += n
                if n < self.batch_rows:
                    return True
            return True

        finished = store.backfill_finished(self._db)
        while not finished and time.monotonic() < deadline and not self._loop.stopping:
            result = store.backfill_batch(self._db, self.batch_rows)
            if result is None:
                return None
            n, finished = result
            done["backfilled"] += n
        table = prices.current()
        priced = not table.enabled  # with pricing off, nothing is left to price

        def price_batch() -> int | None:
            nonlocal priced
            n = store.price_backfill_batch(self._db, self.batch_rows, table)
            priced = n is not None and n < self.batch_rows
            return n

        if finished and table.enabled and not repeat("priced", price_batch):
            return None
        if not repeat("folded", lambda: store.fold_shards(self._db, self.batch_rows)):
            return None
        # Raw rows go only once rolled up and priced (a deleted row cannot be priced).
        if finished and priced and self.retention_days and not repeat(
                "events_deleted", lambda: store.delete_expired_events(
                    self._db, self.retention_days, self.batch_rows)):
            return None
        if self.rollup_retention_days and not repeat(
                "rollups_deleted", lambda: store.delete_expired_rollups(
                    self._db, self.rollup_retention_days, self.batch_rows)):
            return None
        return done

    def start(self) -> None:
        """Start the thread (idempotent; not when ``interval_seconds`` is 0)."""
        if self.interval_seconds > 0:
            self._loop.start()

    def stop(self) -> None:
        """Ask the thread to stop after its current batch."""
        self._loop.stop()

    def _round(self) -> None:
        """One pass of the thread: a round, then ``interval_seconds`` of rest."""
        if self._first:
            self._first = False
            # A random first delay, drawn in each process, spreads the workers' rounds apart.
            if self._loop.wait(random.uniform(1.0, 5.0)):
                return
        try:
            done = self.run_once()
        except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
            log.warning("maintenance round failed; retrying next round",
                        extra={"error": str(exc)})
        except Exception:  # keep the thread alive whatever happens
            log.exception("maintenance round crashed; retrying next round")
        else:
            if done and any(done.values()):
                log.info("maintenance round", extra=done)
        self._loop.wait(self.interval_seconds)
