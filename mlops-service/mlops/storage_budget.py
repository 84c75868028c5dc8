"""The database's size against its budget: sampled, kept, and reported.

Postgres refuses writes once its disk, or a managed plan's size limit, is
full (Neon's free plan: 512 MiB per project). This module measures the way
there:

* :func:`sample` — one row of ``pg_database_size(current_database())`` into
  ``mlops_database_size_samples`` (migrations/0015), at most once per
  ``SAMPLE_INTERVAL_SECONDS`` across every worker and replica (the insert
  skips itself when a newer row exists). The maintenance job calls it
  (mlops/maintenance.py), never a request.
* :class:`StorageBudget` — reads the newest sample and the last seven days'
  growth from that table (so every instance reports the same, across
  restarts), and turns them, with ``DATABASE_SIZE_LIMIT``, into the share of
  the budget used and the time left. It is a prometheus_client collector
  (``/metrics``) and gives ``/health/detailed`` its ``storage`` block.

Growth is the least-squares slope (Postgres' ``regr_slope``) of size over
time through the samples of the last seven days, once they span an hour.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from flask import Flask, current_app
from prometheus_client.core import GaugeMetricFamily

from .db import Database, DatabaseFull, DatabaseMisconfigured, DatabaseUnavailable

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_SECONDS = 60
# Seconds of samples the growth is fitted over (the last seven days), and the
# shortest span that gives a growth at all.
GROWTH_WINDOW_SECONDS = 7 * 86400
MIN_GROWTH_SPAN_SECONDS = 3600
# Samples older than this are pruned as new ones come.
KEEP_SECONDS = 8 * 86400
# Milliseconds a read of the samples may take when a scrape or health check
# finds the cache stale (a health check's budget, see mlops/routes/health.py).
READ_TIMEOUT_MS = 500

_SAMPLE_SQL = """
WITH added AS (
    INSERT INTO mlops_database_size_samples (sampled_at, size_bytes)
    SELECT now(), pg_database_size(current_database())
    WHERE NOT EXISTS (SELECT 1 FROM mlops_database_size_samples
                      WHERE sampled_at > now() - make_interval(secs => %(interval)s))
    ON CONFLICT (sampled_at) DO NOTHING
    RETURNING size_bytes
), pruned AS (
    DELETE FROM mlops_database_size_samples
    WHERE sampled_at < now() - make_interval(secs => %(keep)s)
)
SELECT size_bytes FROM added
"""

_READ_SQL = """
WITH newest AS (
    SELECT sampled_at, size_bytes FROM mlops_database_size_samples
    ORDER BY sampled_at DESC LIMIT 1
), fit AS (
    SELECT regr_slope(s.size_bytes, extract(epoch FROM s.sampled_at)) AS slope,
           extract(epoch FROM max(s.sampled_at) - min(s.sampled_at)) AS span
    FROM mlops_database_size_samples s, newest
    WHERE s.sampled_at >= newest.sampled_at - make_interval(secs => %(window)s)
)
SELECT extract(epoch FROM newest.sampled_at), newest.size_bytes, fit.slope, fit.span
FROM newest, fit
"""


def sample(db: Database) -> int | None:
    """Record the database's size now, unless a sample is under a minute old.

    Returns the size in bytes recorded, or None when skipped (a recent
    sample exists, or the database is full: the insert itself needs space,
    and the newest sample stays the last size known). Also prunes samples
    older than ``KEEP_SECONDS``. Raises ``DatabaseUnavailable`` /
    ``DatabaseMisconfigured`` (``Database.run``).
    """
    def work(cur):
        cur.execute(_SAMPLE_SQL,
                    {"interval": SAMPLE_INTERVAL_SECONDS, "keep": KEEP_SECONDS})
        row = cur.fetchone()
        return int(row[0]) if row else None

    try:
        return db.run(work)
    except DatabaseFull:
        return None


@dataclass(frozen=True)
class Reading:
    """The newest sample and what follows from it.

    ``sampled_at``: Unix seconds; ``size_bytes``; ``limit_bytes``
    (``DATABASE_SIZE_LIMIT``, None when unset); ``growth_bytes_per_second``
    (None until the last seven days' samples span an hour).
    """

    sampled_at: float
    size_bytes: int
    limit_bytes: int | None
    growth_bytes_per_second: float | None

    @property
    def used_ratio(self) -> float | None:
        """``size_bytes / limit_bytes`` (0..1, above 1 when over), None without a limit."""
        return self.size_bytes / self.limit_bytes if self.limit_bytes else None

    @property
    def seconds_left(self) -> float | None:
        """Seconds until ``limit_bytes`` at the current growth: 0 when reached, ``inf``
        when not growing, None without a limit or a growth."""
        if self.limit_bytes is None or self.growth_bytes_per_second is None:
            return None
        if self.size_bytes >= self.limit_bytes:
            return 0.0
        if self.growth_bytes_per_second <= 0:
            return math.inf
        return (self.limit_bytes - self.size_bytes) / self.growth_bytes_per_second

    def as_json(self) -> dict:
        """``/health/detailed``'s ``storage`` block (sizes in bytes, growth per day)."""
        left = self.seconds_left
        growth = self.growth_bytes_per_second
        return {
            "size_bytes": self.size_bytes,
            "sampled_at": datetime.fromtimestamp(self.sampled_at, UTC).isoformat(),
            "limit_bytes": self.limit_bytes,
            "used_ratio": round(self.used_ratio, 4) if self.used_ratio is not None else None,
            "growth_bytes_per_day": round(growth * 86400) if growth is not None else None,
            "days_left": (None if left is None or math.isinf(left)
                          else round(left / 86400, 1)),
        }


class StorageBudget:
    """The database's size, its budget and time left, read from the samples table.

    Reads at most once per ``cache_seconds`` (samples change once a minute),
    within ``READ_TIMEOUT_MS``, and not at all while the database's breaker
    is open; meanwhile the last reading stands. Registered as a collector
    of ``/metrics`` (see :meth:`collect`).
    """

    def __init__(self, db: Database, limit_bytes: int | None, *,
                 cache_seconds: float = 30.0) -> None:
        self._db = db
        self.limit_bytes = limit_bytes
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._reading: Reading | None = None
        self._read_at = float("-inf")  # time.monotonic() of the last read

    def install(self, app: Flask) -> None:
        """Attach to ``app``, where :func:`get_storage_budget` finds it."""
        app.extensions[_EXTENSION] = self

    def reading(self) -> Reading | None:
        """The newest sample and its budget figures; None before the first sample."""
        if time.monotonic() - self._read_at >= self._cache_seconds and \
                self._lock.acquire(blocking=False):
            try:
                self._reading = self._read()
                if self._reading is not None:  # none yet: look again at the next call
                    self._read_at = time.monotonic()
            except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
                log.debug("database size not read", extra={"error": str(exc)})
            finally:
                self._lock.release()
        return self._reading

    def _read(self) -> Reading | None:
        def work(cur):
            cur.execute(_READ_SQL,
                        {"window": GROWTH_WINDOW_SECONDS})
            return cur.fetchone()

        row = self._db.run(work, timeout_ms=READ_TIMEOUT_MS, skip_if_down=True)
        if row is None:
            return None
        sampled_at, size, slope, span = row
        growth = float(slope) if slope is not None and span >= MIN_GROWTH_SPAN_SECONDS else None
        return Reading(float(sampled_at), int(size), self.limit_bytes, growth)

    def collect(self):
        """Yield the gauges (prometheus_client calls this on each scrape).

        ``mlops_database_size_bytes`` and ``..._sampled_timestamp_seconds``
        once a sample exists; ``mlops_database_size_limit_bytes`` with a
        budget; ``mlops_database_size_growth_bytes_per_second`` once the
        samples span an hour; ``mlops_database_size_time_left_seconds``
        with both (``+Inf`` when not growing).
        """
        reading = self.reading()
        if self.limit_bytes is not None:
            limit = GaugeMetricFamily(
                "mlops_database_size_limit_bytes",
                "The database's size budget (DATABASE_SIZE_LIMIT), in bytes.")
            limit.add_metric([], float(self.limit_bytes))
            yield limit
        if reading is None:
            return
        size = GaugeMetricFamily(
            "mlops_database_size_bytes",
            "Size of the service's database (pg_database_size), sampled at most once a minute.")
        size.add_metric([], float(reading.size_bytes))
        yield size
        at = GaugeMetricFamily(
            "mlops_database_size_sampled_timestamp_seconds",
            "Unix time of the newest database size sample (no new ones while the database "
            "is full or the maintenance job is off).")
        at.add_metric([], reading.sampled_at)
        yield at
        if reading.growth_bytes_per_second is not None:
            growth = GaugeMetricFamily(
                "mlops_database_size_growth_bytes_per_second",
                "Growth of the database's size: least-squares slope over the last 7 days.")
            growth.add_metric([], reading.growth_bytes_per_second)
            yield growth
        if (left := reading.seconds_left) is not None:
            eta = GaugeMetricFamily(
                "mlops_database_size_time_left_seconds",
                "Seconds until the database reaches DATABASE_SIZE_LIMIT at the last 7 days' "
                "growth; 0 when reached, +Inf when not growing.")
            eta.add_metric([], left)
            yield eta


_EXTENSION = "mlops.storage_budget"


def get_storage_budget(app: Flask | None = None) -> StorageBudget:
    """The :class:`StorageBudget` of ``app`` (default: the app handling this request)."""
    return (app or current_app).extensions[_EXTENSION]
