"""The outbox: events Postgres could not take yet, kept in the spool and delivered later.

:meth:`Outbox.put` writes records durably (fsynced) to the spool, and owns
their conversion to and from spool rows. One flusher thread per process
runs in the background; the one holding an exclusive ``flock`` on
``<spool>/flusher.lock`` is the leader and hands spooled events, oldest
first, in batches, to the same delivery step a request uses, backing off
exponentially while the database is away. Delivery is idempotent on
``event_id``, so a crash between the Postgres commit and the spool delete
replays the batch without storing anything twice.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from .background import Loop
from .db import DatabaseMisconfigured, DatabaseUnavailable
from .schemas import MetricsEvent, Record
from .spool import Spool, SpooledEvent

log = logging.getLogger(__name__)

FLUSH_BATCH = 500
BACKOFF_MIN_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0
# How often a follower checks whether it may lead, and the leader looks at an
# empty spool without being woken: latency choices, not correctness.
LEADER_POLL_SECONDS = 1.0
IDLE_POLL_SECONDS = 0.5

Deliver = Callable[..., set[str]]  # mlops.deliver.Delivery


def to_row(record: Record) -> tuple[str, float, str]:
    """A record as a spool row: ``(event_id, received_at as Unix seconds, event JSON)``."""
    return record.event_id, record.received_at.timestamp(), record.event.model_dump_json()


def from_row(item: SpooledEvent) -> Record:
    """The record a spool row was made from (:func:`to_row`)."""
    return Record(item.event_id, datetime.fromtimestamp(item.received_at, UTC),
                  MetricsEvent.model_validate_json(item.payload))


class Outbox:
    """The spool plus its flusher thread, delivering through ``deliver``."""

    def __init__(self, spool: Spool, deliver: Deliver, *, timeout_ms: int,
                 backoff_seconds: tuple[float, float] = (BACKOFF_MIN_SECONDS,
                                                         BACKOFF_MAX_SECONDS)) -> None:
        self.spool = spool
        self._deliver = deliver
        self._timeout_ms = timeout_ms
        self._backoff_min, self._backoff_max = backoff_seconds
        self._backoff = self._backoff_min  # the flusher's wait after its next failure
        self._lock_file = None
        self._flusher = Loop("spool-flusher", self._flush_pass)
        self._flush_lock = threading.Lock()

    def put(self, records: Sequence[Record]) -> None:
        """Append ``records`` durably and wake the flusher.

        Raises :class:`mlops.spool.SpoolFull` (nothing written) at the cap.
        """
        self.spool.put(to_row(r) for r in records)
        self._flusher.wake()

    def discard(self, field: str, value: str) -> int:
        """Erase waiting events whose ``field`` (``business_id``, ``conversation_id``) is ``value``.

        Returns how many left the spool. Holds the flush lock, so no batch of
        this process is on its way to Postgres meanwhile: a batch taken
        before has been delivered, and the caller's erasure in Postgres,
        which comes after, removes it there.
        """
        with self._flush_lock:
            return self.spool.discard(field, value)

    def flush_once(self) -> int:
        """Deliver one batch (oldest first); return how many left the spool.

        Raises the errors of the delivery step; then nothing left the spool.
        """
        with self._flush_lock:
            batch = self.spool.peek(FLUSH_BATCH)
            if not batch:
                return 0
            self._deliver([from_row(item) for item in batch], timeout_ms=self._timeout_ms,
                          replayed=True)
            self.spool.remove(item.seq for item in batch)
        return len(batch)

    def start(self) -> None:
        """Start the flusher thread (idempotent). Call in the serving process, after fork."""
        self._flusher.start()

    @property
    def leads(self) -> bool:
        """True while this outbox holds the flusher lock (the one flusher of its spool)."""
        return self._lock_file is not None

    def try_lead(self) -> bool:
        """Take the flusher lock (``flusher.lock`` beside the spool, ``flock``) unless another
        process holds it; True if this outbox holds it now. Held until :meth:`stop`."""
        if self._lock_file is not None:
            return True
        lock = self.spool.path.with_name("flusher.lock")
        handle = open(lock, "a")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock_file = handle
        return True

    def _flush_pass(self) -> None:
        """One pass of the flusher thread: lead or wait, flush a batch, back off or idle."""
        if not self.try_lead():
            self._flusher.wait(LEADER_POLL_SECONDS)
            return
        try:
            moved = self.flush_once()
        except Exception as exc:  # keep the flusher alive whatever happens
            if isinstance(exc, DatabaseUnavailable | DatabaseMisconfigured):
                log.warning("spool flush failed; retrying", extra={
                    "error": str(exc), "retry_in_seconds": self._backoff,
                })
            else:
                log.exception("spool flush crashed; retrying")
            self._flusher.wait(self._backoff)
            self._backoff = min(self._backoff * 2, self._backoff_max)
            return
        self._backoff = self._backoff_min
        if not moved:
            self._flusher.idle(IDLE_POLL_SECONDS)

    def stop(self, drain_seconds: float) -> int:
        """Stop the thread, then flush for up to ``drain_seconds``; return events left.

        Whatever is left stays in the spool for the next start.
        """
        self._flusher.stop(join_seconds=drain_seconds)
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline and self.try_lead():
            try:
                if not self.flush_once():
                    break
            except (DatabaseUnavailable, DatabaseMisconfigured):
                break
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        return self.spool.depth()
