"""Deliver records to Postgres: the one step that stores events and counts them.

Both writers use it: a request (``mlops.ingest``), with a short deadline,
and the spool's flusher (``mlops.outbox``), with a long one. It inserts
(idempotent on ``event_id``; the store keeps the rollups in the same
transaction), then counts what was newly committed, so an event is counted
once whichever writer commits it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from . import store
from .db import Database, DatabaseUnavailable, TransactionRolledBack
from .schemas import Record
from .telemetry import EVENTS_REJECTED, Telemetry

log = logging.getLogger(__name__)


class Delivery:
    """Delivers records through ``db`` and counts them in ``telemetry``."""

    def __init__(self, db: Database, telemetry: Telemetry) -> None:
        self.db = db
        self.telemetry = telemetry

    def __call__(self, records: Sequence[Record], *, timeout_ms: int,
                 skip_if_down: bool = False, replayed: bool = False) -> store.Inserted:
        """Insert ``records`` within ``timeout_ms`` (in all); return the event ids newly stored.

        Records whose ``event_id`` another business holds are not stored: they
        are in the result's ``conflicts`` and counted in
        ``mlops_events_rejected_total{reason="event_id_conflict"}``; those
        ``replayed`` from the spool, whose request was answered long ago, are
        also logged (a warning naming event and business), since no one else
        learns of them.

        ``skip_if_down`` fails at once while the database's breaker is open
        (``Database.run``); ``replayed`` marks records coming from
        the spool. An insert Postgres rolls back to end a deadlock or a
        serialization conflict (``TransactionRolledBack``) runs again while
        ``timeout_ms`` lasts. Raises ``DatabaseUnavailable`` (``DatabaseFull``
        when Postgres has no space left) / ``DatabaseMisconfigured``;
        then nothing was counted, and the same records may be delivered
        again (an insert abandoned at its deadline may still commit: the
        retry then skips it).
        """
        inserted = self._insert(list(records), timeout_ms, skip_if_down)
        if inserted:  # rows were added: the database had room
            self.db.write_succeeded()
        new, counted = [], set()
        for r in records:  # an id given twice in one delivery is stored (and counted) once
            if r.event_id in inserted and (r.event_id, r.event.business_id) not in \
                    inserted.conflicts and r.event_id not in counted:
                counted.add(r.event_id)
                new.append(r)
        self.telemetry.record_stored(new, replayed=replayed)
        if inserted.conflicts:
            EVENTS_REJECTED.labels("event_id_conflict").inc(len(inserted.conflicts))
            if replayed:
                for event_id, business_id in sorted(inserted.conflicts):
                    log.warning("spooled event dropped: its event_id is stored for another "
                                "business", extra={"event_id": event_id,
                                                   "business_id": business_id})
        return inserted

    def _insert(self, records: list[Record], timeout_ms: int,
                skip_if_down: bool) -> store.Inserted:
        """``store.insert_events``, run again after each ``TransactionRolledBack``
        until ``timeout_ms`` (in all) has passed; then that error is raised."""
        ends = time.monotonic() + timeout_ms / 1000
        while True:
            try:
                return store.insert_events(self.db, records, timeout_ms,
                                           skip_if_down=skip_if_down)
            except TransactionRolledBack as exc:
                timeout_ms = int((ends - time.monotonic()) * 1000)
                if timeout_ms <= 0:
                    raise
                log.warning("insert rolled back by Postgres; running it again",
                            extra={"error": str(exc), "events": len(records)})


# What a caller's DatabaseUnavailable says when it was not delivered.
_STOPPING = "the service is stopping"
_TOO_LATE = "deadline passed waiting for the group commit"


class _Waiting:
    """One request's records waiting in :class:`GroupCommit`, and their outcome."""

    __slots__ = ("records", "deadline", "done", "inserted", "error")

    def __init__(self, records: Sequence[Record], deadline: float) -> None:
        self.records = records
        self.deadline = deadline  # time.monotonic()
        self.done = threading.Event()
        self.inserted: store.Inserted  # set by the committer before ``done``
        self.error: BaseException | None = None


class GroupCommit:
    """Delivers the records of concurrent requests of one process in shared transactions.

    Callers hand their records to :meth:`__call__` and wait; one committer
    thread (a greenlet in gevent's worker, like the callers) takes
    everything waiting (up to ``max_records``) and delivers it as one
    ``Delivery`` call: one round trip, one commit, one rollup update
    per (business, day, model) for the whole group. The more requests
    arrive together, the more share a commit; a lone request waits for
    no one. (Postgres itself batches the WAL flushes of concurrent commits;
    this also shares the statement, its rollup upserts and the round trip.)

    Every call keeps its own deadline: the group's database call is bounded
    by the earliest deadline in it, and a caller whose deadline passes
    before its group committed gets ``DatabaseUnavailable`` (its request
    then goes to the outbox). An abandoned group may still commit; event ids
    make the outbox's replay skip it, and the committer counts what was
    newly stored either way, so nothing is stored or counted twice.
    """

    def __init__(self, deliver: Delivery, *, max_records: int = store.COPY_THRESHOLD - 1) -> None:
        self._deliver = deliver
        self._max_records = max_records
        self._lock = threading.Condition()
        self._waiting: deque[_Waiting] = deque()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def __call__(self, records: Sequence[Record], *, timeout_ms: int) -> store.Inserted:
        """Deliver ``records`` within ``timeout_ms`` (in all); return the event ids newly stored,
        with the conflicts among ``records`` (:class:`mlops.store.Inserted`).

        Fails at once while the database's breaker is open. Batches of more
        than ``max_records`` are delivered alone, in the caller's thread.
        Raises ``DatabaseUnavailable`` (also when the deadline passes first,
        or after :meth:`stop`) or ``DatabaseMisconfigured``.
        """
        if len(records) > self._max_records:
            return self._deliver(records, timeout_ms=timeout_ms, skip_if_down=True)
        me = _Waiting(records, time.monotonic() + timeout_ms / 1000)
        with self._lock:
            if self._stopped:
                raise DatabaseUnavailable(_STOPPING)
            if self._thread is None:  # started here, so each forked worker has its own
                self._thread = threading.Thread(target=self._commit_forever,
                                                name="group-commit", daemon=True)
                self._thread.start()
            self._waiting.append(me)
            self._lock.notify()
        if not me.done.wait(max(0.0, me.deadline - time.monotonic())):
            with self._lock:
                if me in self._waiting:  # not taken yet: it never reaches Postgres
                    self._waiting.remove(me)
            if not me.done.is_set():
                raise DatabaseUnavailable(_TOO_LATE)
        if me.error is not None:
            raise me.error
        return me.inserted

    @property
    def running(self) -> bool:
        """True while the committer thread runs: from the first call that joins a
        group until :meth:`stop` ends it."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def waiting(self) -> int:
        """Callers queued for the next group (the one in flight not counted)."""
        with self._lock:
            return len(self._waiting)

    def stop(self) -> None:
        """Fail whatever waits, and every later call (the callers spool instead)."""
        with self._lock:
            self._stopped = True
            self._lock.notify()

    def _take(self) -> list[_Waiting]:
        """Wait for callers; return the next group, oldest first (empty once stopped)."""
        with self._lock:
            while not self._waiting and not self._stopped:
                self._lock.wait()
            if self._stopped:
                group, self._waiting = list(self._waiting), deque()
                for waiting in group:
                    waiting.error = DatabaseUnavailable(_STOPPING)
                    waiting.done.set()
                return []
            group, n = [], 0
            while self._waiting and n + len(self._waiting[0].records) <= self._max_records:
                waiting = self._waiting.popleft()
                group.append(waiting)
                n += len(waiting.records)
            return group

    def _commit_forever(self) -> None:
        while group := self._take():
            records = [r for waiting in group for r in waiting.records]
            first_deadline = min(w.deadline for w in group)
            timeout_ms = (first_deadline - time.monotonic()) * 1000
            try:
                if timeout_ms <= 0:
                    raise DatabaseUnavailable(_TOO_LATE)
                timeout_ms = max(1, int(timeout_ms))
                inserted = self._deliver(records, timeout_ms=timeout_ms, skip_if_down=True)
            except BaseException as exc:  # each caller raises it in its own thread
                for waiting in group:
                    waiting.error = exc
                    waiting.done.set()
                continue
            for waiting in group:
                mine = {(r.event_id, r.event.business_id) for r in waiting.records}
                waiting.inserted = store.Inserted(
                    {event_id for event_id, _ in mine} & inserted, mine & inserted.conflicts)
                waiting.done.set()
