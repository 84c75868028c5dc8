"""Gauges read at scrape time from Postgres and the spool, for ``/metrics``.

Shared state rather than per-process counts, so prometheus_client's
multiprocess mode cannot merge them: each worker's :class:`StateCollector`
reads them itself when scraped (cached), and the app factory hands it to
``Telemetry.add_state``. Reads go through the store (rollups only) and the
spool; nothing here counts.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client.core import GaugeMetricFamily

from . import store
from .background import start_thread
from .db import Database, DatabaseMisconfigured, DatabaseUnavailable
from .spool import Spool
from .telemetry import OVERFLOW_LABEL

log = logging.getLogger(__name__)

WINDOW_DAYS = 30


class StateCollector:
    """Gauges read at scrape time from Postgres and the spool.

    Per-business 30-day totals come from ``store.BusinessTotals``, cached for
    ``cache_seconds`` so frequent scrapes stay cheap. ``request_refresh()``
    (``POST /refresh-metrics``) marks them stale for every worker, through the
    modification time of a marker file beside the spool, and re-reads them
    here unless this worker did so in the last second; whichever worker
    answers the next scrape re-reads them if they are older than the mark.
    Being read from Postgres, they are right after a restart too.
    """

    MIN_INTERVAL_SECONDS = 1.0

    def __init__(self, db: Database, spool: Spool, *, max_businesses: int,
                 cache_seconds: float, version: str, price_table: str = "") -> None:
        self._db = db
        self._spool = spool
        self._marker = spool.path.with_name("metrics-refresh-requested")
        self._max_businesses = max_businesses
        self._cache_seconds = cache_seconds
        self._version = version
        self._price_table = price_table
        self._lock = threading.Lock()
        self._window = store.BusinessTotals(WINDOW_DAYS)  # used under _lock
        self._totals: list[store.BusinessRow] = []
        self._read_at = float("-inf")  # time.time() when the last read began
        self._db_up = False
        self._oldest_event_at: float | None = None  # Unix seconds

    def request_refresh(self) -> dict:
        """Mark the Postgres-derived gauges stale and re-read them if this worker may.

        Returns ``{"refreshed": bool, "businesses": int, "database_up": bool}``.
        """
        self._marker.touch()
        if time.time() - self._read_at >= self.MIN_INTERVAL_SECONDS:
            self._read()
            refreshed = True
        else:
            refreshed = False
        return {"refreshed": refreshed, "businesses": len(self._totals),
                "database_up": self._db_up}

    def prime(self) -> None:
        """Read the gauges once now, in a background thread (gunicorn.conf.py calls it
        as a worker starts). Database trouble is reported as database_up 0, as ever."""
        start_thread("metrics-prime", self._read)

    def _stale(self) -> bool:
        if time.time() - self._read_at >= self._cache_seconds:
            return True
        try:
            return self._marker.stat().st_mtime >= self._read_at
        except FileNotFoundError:
            return False

    def _read(self) -> None:
        """Re-read the per-business totals. Database trouble is reported as database_up 0."""
        with self._lock:
            started = time.time()
            try:
                self._totals = self._window.read(self._db)
                self._oldest_event_at = store.oldest_event_received_at(self._db)
                self._db_up = True
            except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
                log.warning("metrics refresh failed", extra={"error": str(exc)})
                self._db_up = False
            self._read_at = started

    def collect(self):
        """Yield the gauge families (called by prometheus_client on each scrape)."""
        if self._stale():
            self._read()

        up = GaugeMetricFamily("mlops_database_up",
                               "1 if the last Postgres query from this worker succeeded, else 0.")
        up.add_metric([], 1.0 if self._db_up else 0.0)
        yield up

        info = GaugeMetricFamily(
            "mlops_build_info", "Service version and price table (genai-prices version, "
            "+overrides-<sha256 prefix> of PRICES_FILE); the value is always 1.",
            labels=["version", "price_table"])
        info.add_metric([self._version, self._price_table], 1.0)
        yield info

        depth = GaugeMetricFamily("mlops_spool_events", "Events waiting in the local spool.")
        age = GaugeMetricFamily("mlops_spool_oldest_age_seconds",
                                "Age of the oldest event waiting in the spool; 0 when empty.")
        depth.add_metric([], float(self._spool.depth()))
        age.add_metric([], self._spool.oldest_age_seconds())
        yield depth
        yield age

        oldest = GaugeMetricFamily(
            "mlops_events_oldest_age_seconds",
            "Age of the oldest raw event stored in Postgres (RETENTION_DAYS bounds it); "
            "0 when none.")
        oldest.add_metric([], max(0.0, time.time() - self._oldest_event_at)
                          if self._oldest_event_at is not None else 0.0)
        yield oldest

        labels = ["business_id"]
        messages = GaugeMetricFamily(
            "mlops_business_messages_30d", "Messages stored in the last 30 days.", labels=labels)
        tokens = GaugeMetricFamily(
            "mlops_business_tokens_30d", "Tokens used in the last 30 days.", labels=labels)
        cost = GaugeMetricFamily(
            "mlops_business_api_cost_usd_30d", "API cost in US dollars over the last 30 days.",
            labels=labels)
        priced = GaugeMetricFamily(
            "mlops_business_cost_usd_30d", "API cost in US dollars over the last 30 days by "
            "the service's price table (unpriced calls left out).", labels=labels)
        success = GaugeMetricFamily(
            "ai_success_rate", "Mean success_rate of messages in the last 30 days (0..1).",
            labels=labels)
        for row in self._capped_totals():
            business, n, t, c, s = row
            messages.add_metric([business], n)
            tokens.add_metric([business], t)
            cost.add_metric([business], c)
            priced.add_metric([business], row.cost_usd)
            success.add_metric([business], s)
        yield from (messages, tokens, cost, priced, success)

    def _capped_totals(self):
        """The busiest ``max_businesses`` businesses, the rest summed under ``other``."""
        head = self._totals[: self._max_businesses]
        tail = self._totals[self._max_businesses:]
        if not tail:
            return head
        n = sum(r[1] for r in tail)
        rate = sum(r[1] * r[4] for r in tail) / n if n else 0.0
        return [*head, store.BusinessRow(OVERFLOW_LABEL, n, sum(r[2] for r in tail),
                                         sum(r[3] for r in tail), rate,
                                         sum(r.cost_usd for r in tail))]
