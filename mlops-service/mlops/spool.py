"""A durable local queue for events Postgres could not take right now.

SQLite in WAL mode with ``synchronous=FULL``: a ``put`` returns only after
the event is fsynced, so an event acknowledged as ``queued`` survives a
crash of the process or the machine. One file is shared by every gunicorn
worker (SQLite serialises writers across processes); events leave it in
arrival order, oldest first.

Every connection sets ``secure_delete``, so the bytes of a deleted event
are overwritten with zeros in the page that held it (SQLite, "PRAGMA
secure_delete"); :meth:`Spool.discard` (erasure) also checkpoints the WAL
with ``TRUNCATE``, so the page images that still held the erased event in
the write-ahead log leave the disk too.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spooled_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL,
    received_at REAL NOT NULL,  -- Unix time, seconds
    payload     TEXT NOT NULL   -- the validated event as JSON
)"""
# The statements the spool runs.
_INSERT = "INSERT INTO spooled_events (event_id, received_at, payload) VALUES (?, ?, ?)"
_COLUMNS = "seq, event_id, received_at, payload"
_PEEK = f"SELECT {_COLUMNS} FROM spooled_events ORDER BY seq LIMIT ?"
_DELETE = "DELETE FROM spooled_events WHERE seq = ?"
_COUNT = "SELECT count(*) FROM spooled_events"
_OLDEST = "SELECT received_at FROM spooled_events ORDER BY seq LIMIT 1"
_DISCARD = "DELETE FROM spooled_events WHERE json_extract(payload, ?) = ?"


def _enable_wal(conn: sqlite3.Connection, timeout_seconds: float = 5.0) -> None:
    """Put the file in WAL mode (persistent: a no-op once done).

    While another process switches the same new file, SQLite answers
    "database is locked" at once rather than after its busy timeout, so
    workers starting together retry here for up to ``timeout_seconds``.
    """
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SpoolFull(Exception):
    """The spool reached its size cap; the caller answers 503 with Retry-After."""


class SpoolBusy(Exception):
    """Another connection kept the WAL from being checkpointed within the busy timeout."""


@dataclass(frozen=True)
class SpooledEvent:
    """One queued event: its position, idempotency key, receive time and JSON."""

    seq: int
    event_id: str
    received_at: float
    payload: str


class Spool:
    """The spool file at ``<directory>/spool.sqlite3``, capped at ``max_bytes``."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "spool.sqlite3"
        self.max_bytes = max_bytes
        self._local = threading.local()
        self._connect().execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # Every write opens its transaction itself (isolation_level=None).
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA secure_delete=ON")
            self._local.conn = conn
        return conn

    def put(self, events: Iterable[tuple[str, float, str]]) -> None:
        """Append ``(event_id, received_at, payload_json)`` rows durably, in order.

        Raises :class:`SpoolFull` (nothing written) past ``max_bytes``, and
        ``sqlite3.Error`` if the disk itself fails.
        """
        conn = self._connect()
        if self.size_bytes() >= self.max_bytes:
            raise SpoolFull(f"spool holds {self.size_bytes()} bytes, cap {self.max_bytes}")
        with conn:  # BEGIN ... COMMIT, fsynced (synchronous=FULL)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, list(events))

    def peek(self, limit: int) -> list[SpooledEvent]:
        """The oldest ``limit`` events, oldest first, without removing them."""
        rows = self._connect().execute(
            _PEEK,
            (limit,),
        ).fetchall()
        return [SpooledEvent(*row) for row in rows]

    def remove(self, seqs: Iterable[int]) -> None:
        """Delete the given events (after Postgres committed them)."""
        conn = self._connect()
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_DELETE, [(s,) for s in seqs])

    def discard(self, field: str, value: str) -> int:
        """Delete every waiting event whose JSON ``field`` equals ``value``; return how many.

        For erasure. ``field`` is a top-level key of the event (a fixed name
        from the caller, never user input). The deleted bytes are zeroed
        (``secure_delete``) and the WAL is checkpointed into the database
        file and truncated to 0 bytes, waiting up to the busy timeout for
        readers of other workers; raises ``SpoolBusy`` if one still holds
        an old snapshot (the erased bytes may then remain in the WAL).
        """
        conn = self._connect()
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            cursor = conn.execute(_DISCARD, (f"$.{field}", value))
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise SpoolBusy("the spool's WAL could not be truncated: a reader holds it")
        return cursor.rowcount

    def depth(self) -> int:
        """Number of events waiting."""
        return self._connect().execute(_COUNT).fetchone()[0]

    def oldest_age_seconds(self) -> float:
        """Seconds since the oldest waiting event was received; 0 when empty."""
        row = self._connect().execute(
            _OLDEST
        ).fetchone()
        return max(0.0, time.time() - row[0]) if row else 0.0

    def size_bytes(self) -> int:
        """Bytes in use by live pages of the database file (free pages excluded)."""
        conn = self._connect()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        return (pages - free) * page_size

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
