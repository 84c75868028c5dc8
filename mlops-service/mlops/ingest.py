"""Acknowledged means stored: a request's events go to Postgres, or durably to the outbox.

:meth:`Ingestor.submit` stamps each event (its ``event_id`` and the server
receive time), then tries the delivery step within the request's deadline
(``DB_INSERT_TIMEOUT_MS``, enforced on the client side), sharing one
transaction with the concurrent requests of its process
(:class:`mlops.deliver.GroupCommit`). If Postgres is
unavailable, silent or slow, the records go to the fsynced outbox instead
and the answer is ``"queued"``; while the database's breaker is open the
request goes straight to the outbox. Nothing here calls back: the outbox
delivers through the same step on its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from .db import DatabaseMisconfigured, DatabaseUnavailable
from .deliver import GroupCommit
from .outbox import Outbox
from .schemas import MetricsEvent, Record
from .telemetry import EVENTS_QUEUED


class Ingestor:
    """The write path shared by ``/track``, ``/track/batch`` and ``/v1/traces``."""

    def __init__(self, commit: GroupCommit, outbox: Outbox, *, timeout_ms: int) -> None:
        self._commit = commit
        self._outbox = outbox
        self._timeout_ms = timeout_ms

    def submit(self, events: Sequence[MetricsEvent], *, timeout_ms: int | None = None,
               times: Sequence[datetime] | None = None) -> tuple[str, list[Record], set[int]]:
        """Store ``events`` (already validated); return ``("stored"|"queued", records,
        conflicts)``.

        Each event gets its ``event_id`` (the client's, or a new UUID) and its
        time: ``times[i]`` when given (timezone-aware; OTLP spans give their end
        time), else the server receive time. ``conflicts``: positions in ``events`` of those not
        stored because their ``event_id`` is stored for another business
        (known only when stored; a queued event's conflict shows when the
        outbox delivers it, see ``mlops.deliver.Delivery``). ``timeout_ms``
        (default ``DB_INSERT_TIMEOUT_MS``) bounds the wait for Postgres.
        Raises :class:`mlops.spool.SpoolFull` when the database is away and
        the spool is at its cap (nothing was stored).
        """
        if times is None:
            times = [datetime.now(UTC)] * len(events)
        records = [Record(e.event_id or str(uuid.uuid4()), t, e)
                   for e, t in zip(events, times, strict=True)]
        try:
            inserted = self._commit(records, timeout_ms=timeout_ms or self._timeout_ms)
        except (DatabaseUnavailable, DatabaseMisconfigured):
            self._outbox.put(records)
            EVENTS_QUEUED.inc(len(records))
            return "queued", records, set()
        return "stored", records, {i for i, r in enumerate(records)
                                   if (r.event_id, r.event.business_id) in inserted.conflicts}

    def stop(self) -> None:
        """From now on, every request goes to the outbox (at shutdown)."""
        self._commit.stop()
