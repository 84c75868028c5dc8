"""Deliver records to Postgres: the one step that stores events and counts them.

Both writers use it: a request (``mlops.ingest``), with a short deadline,
and the spool's flusher (``mlops.outbox``), with a long one. It inserts
(idempotent on ``event_id``; the store keeps the rollups in the same
transaction), then counts what was newly committed, so an event is counted
once whichever writer commits it.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import store
from .db import Database
from .telemetry import Telemetry


class Delivery:
    """Delivers records through ``db`` and counts them in ``telemetry``."""

    def __init__(self, db: Database, telemetry: Telemetry) -> None:
        self.db = db
        self.telemetry = telemetry

    def __call__(self, records: Sequence[store.Record], *, timeout_ms: int,
                 skip_if_down: bool = False, replayed: bool = False) -> set[str]:
        """Insert ``records`` within ``timeout_ms`` (in all); return the event ids newly stored.

        ``skip_if_down`` fails at once while the database's breaker is open
        (see ``Database.deadline``); ``replayed`` marks records coming from
        the spool. Raises ``DatabaseUnavailable`` / ``DatabaseMisconfigured``;
        then nothing was counted, and the same records may be delivered
        again (an insert abandoned at its deadline may still commit: the
        retry then skips it).
        """
        with self.db.deadline(timeout_ms, skip_if_down=skip_if_down):
            inserted = store.insert_events(self.db, list(records), timeout_ms)
        self.telemetry.record_stored([r for r in records if r.event_id in inserted],
                                     replayed=replayed)
        return inserted
