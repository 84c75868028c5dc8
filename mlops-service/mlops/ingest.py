"""Acknowledged means stored: write events to Postgres, or durably to the spool.

:meth:`Ingestor.submit` tries Postgres first (one statement, short timeout).
If Postgres is unavailable it appends the events to the fsynced local spool
instead and answers ``"queued"``; for the next ``breaker_seconds`` this
worker goes straight to the spool, so an outage costs one failed attempt per
second rather than one per request.

One :class:`Flusher` per process runs in the background; the one holding an
exclusive ``flock`` on ``<spool>/flusher.lock`` is the leader and moves
spooled events into Postgres in batches, oldest first, backing off
exponentially while the database is away. Inserts are idempotent on
``event_id``, so a crash between the Postgres commit and the spool delete
replays the batch without storing anything twice.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
import uuid
from datetime import UTC, datetime

from . import store
from .db import Database, DatabaseMisconfigured, DatabaseUnavailable
from .schemas import MetricsEvent
from .spool import Spool
from .telemetry import EVENTS_QUEUED, EVENTS_REPLAYED, EVENTS_STORED, Telemetry

log = logging.getLogger(__name__)

FLUSH_BATCH = 500
BACKOFF_MAX_SECONDS = 10.0


class Ingestor:
    """The write path shared by ``/track`` and ``/track/batch``."""

    def __init__(self, db: Database, spool: Spool, telemetry: Telemetry, *,
                 insert_timeout_ms: int, breaker_seconds: float = 1.0) -> None:
        self.db = db
        self.spool = spool
        self.telemetry = telemetry
        self.insert_timeout_ms = insert_timeout_ms
        self.breaker_seconds = breaker_seconds
        self._skip_db_until = 0.0  # time.monotonic()
        self.flusher = Flusher(self)

    def submit(self, events: list[MetricsEvent]) -> tuple[str, list[store.Record]]:
        """Store ``events`` (already validated); return ``("stored"|"queued", records)``.

        Each event gets its ``event_id`` (the client's, or a new UUID) and the
        server receive time. Raises :class:`mlops.spool.SpoolFull` when the
        database is away and the spool is at its cap (nothing was stored).
        """
        now = datetime.now(UTC)
        records = [store.Record(e.event_id or str(uuid.uuid4()), now, e) for e in events]
        if time.monotonic() >= self._skip_db_until:
            try:
                inserted = store.insert_events(self.db, records, self.insert_timeout_ms)
            except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
                self.trip(exc)
            else:
                fresh = [r for r in records if r.event_id in inserted]
                EVENTS_STORED.inc(len(fresh))
                self.telemetry.record_stored(fresh)
                return "stored", records
        self.spool.put(
            (r.event_id, r.received_at.timestamp(), r.event.model_dump_json()) for r in records
        )
        EVENTS_QUEUED.inc(len(records))
        self.flusher.wake()
        return "queued", records

    def trip(self, exc: Exception) -> None:
        """Send this worker's writes to the spool for ``breaker_seconds``."""
        if time.monotonic() >= self._skip_db_until:
            log.warning("database unavailable; spooling events", extra={"error": str(exc)})
        self._skip_db_until = time.monotonic() + self.breaker_seconds

    def reset(self) -> None:
        """Postgres answered again: write to it directly from now on."""
        self._skip_db_until = 0.0


class Flusher:
    """Background thread moving spooled events into Postgres (leader only)."""

    def __init__(self, ingestor: Ingestor) -> None:
        self._ingestor = ingestor
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock_file = None
        self._thread: threading.Thread | None = None
        self._flush_lock = threading.Lock()

    def start(self) -> None:
        """Start the thread (idempotent). Call in the serving process, after fork."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="spool-flusher", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """Ask the leader to look at the spool now rather than at its next tick."""
        self._wake.set()

    def _is_leader(self) -> bool:
        if self._lock_file is not None:
            return True
        path = self._ingestor.spool.path.with_name("flusher.lock")
        handle = open(path, "a")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock_file = handle
        return True

    def flush_once(self) -> int:
        """Move one batch (oldest first); return how many left the spool.

        Raises the database errors of ``store.insert_events``.
        """
        ingestor = self._ingestor
        with self._flush_lock:
            batch = ingestor.spool.peek(FLUSH_BATCH)
            if not batch:
                return 0
            records = [
                store.Record(item.event_id, datetime.fromtimestamp(item.received_at, UTC),
                             MetricsEvent.model_validate_json(item.payload))
                for item in batch
            ]
            inserted = store.insert_events(ingestor.db, records, ingestor.db.statement_timeout_ms)
            ingestor.spool.remove(item.seq for item in batch)
        fresh = [r for r in records if r.event_id in inserted]
        EVENTS_REPLAYED.inc(len(fresh))
        ingestor.telemetry.record_stored(fresh)
        return len(batch)

    def _loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            if not self._is_leader():
                self._stop.wait(1.0)
                continue
            try:
                moved = self.flush_once()
            except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
                log.warning("spool flush failed; retrying", extra={
                    "error": str(exc), "retry_in_seconds": backoff})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)
                continue
            except Exception:  # keep the flusher alive whatever happens
                log.exception("spool flush crashed; retrying")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)
                continue
            backoff = 0.5
            if moved:
                self._ingestor.reset()
                continue
            self._wake.wait(0.5)
            self._wake.clear()

    def stop(self, drain_seconds: float) -> int:
        """Stop the thread, then flush for up to ``drain_seconds``; return events left.

        Whatever is left stays in the spool for the next start.
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=drain_seconds)
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline and self._is_leader():
            try:
                if not self.flush_once():
                    break
            except (DatabaseUnavailable, DatabaseMisconfigured):
                break
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        return self._ingestor.spool.depth()
