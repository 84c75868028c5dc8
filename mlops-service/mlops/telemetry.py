"""Prometheus telemetry: every metric is declared here, once, with its help text.

Under gunicorn, prometheus_client runs in multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set by gunicorn.conf.py before any import):
each worker writes its counters to mmap files, and ``/metrics`` merges them,
so totals are right whichever worker answers. Values that come from
Postgres or the spool (shared state, not per-process counts) are produced by
:class:`StateCollector` at scrape time, since multiprocess mode does not
aggregate custom collectors.

Metric names keep the course service's (``ai_requests_total`` ...) so
existing dashboards and queries keep working.
"""

from __future__ import annotations

import bisect
import collections
import functools
import logging
import math
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from . import prices, store
from .db import Database, DatabaseMisconfigured, DatabaseUnavailable
from .erased_series import ErasedSeries
from .schemas import MetricsEvent
from .spool import Spool

log = logging.getLogger(__name__)


def _geometric_bounds(low: float, high: float, ratio: float) -> tuple[float, ...]:
    """Bucket bounds from ``low`` up to the first one past ``high``, each the largest
    3-significant-digit number at most ``ratio`` times the one before (readable ``le``)."""
    bounds = [low]
    while bounds[-1] < high:
        step = bounds[-1] * ratio
        scale = 10.0 ** (math.floor(math.log10(step)) - 2)
        bounds.append(round(math.floor(step / scale + 1e-9) * scale, 6))
    return tuple(bounds)


# Seconds. The course's bounds, plus bounds no more than 4.9 % apart from
# 0.25 s to 31.2 s: for a reply-time p95 q in that range, histogram_quantile's
# estimate and q lie in the same bucket (a, b] with b <= 1.049 a, so the
# estimate is within 4.9 % of q (q taken by nearest rank), whatever the shape
# of the distribution. Cost: 114 finite buckets, 117 series (was 12); the
# histogram has no labels, so that is the whole cost.
COURSE_RESPONSE_TIME_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
RESPONSE_TIME_BUCKETS = tuple(sorted(
    set(COURSE_RESPONSE_TIME_BUCKETS) | set(_geometric_bounds(0.25, 30.0, 1.049))))
# Seconds. Latency of this service's own HTTP handlers.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
OVERFLOW_LABEL = "other"
WINDOW_DAYS = 30

# --- the chat app's traffic (counted when a row is committed to Postgres) ---
AI_REQUESTS = Counter(
    "ai_requests", "Chat messages tracked, by business, response type and detected intent.",
    ["business_id", "response_type", "intent"])
AI_RESPONSE_TIME = Histogram(
    "ai_response_time_seconds", "End-to-end AI reply time reported by the chat app.",
    buckets=RESPONSE_TIME_BUCKETS)
AI_TOKENS = Counter(
    "ai_tokens_used", "Tokens consumed (prompt + completion).", ["business_id", "model_name"])
AI_COST = Counter(
    "ai_api_cost_usd", "Estimated model API cost in US dollars.", ["business_id", "model_name"])
# --- the service's own price of each call (mlops/prices.py) ---
AI_PRICED_COST = Counter(
    "ai_cost_usd", "Model API cost in US dollars by the service's price table (genai-prices "
    "and PRICES_FILE); calls no table knows add nothing here and count in "
    "mlops_unpriced_events_total.", ["business_id", "model_name"])
UNPRICED_EVENTS = Counter(
    "mlops_unpriced_events", "Events stored whose model no price table knows, by model_name: "
    "add the model to PRICES_FILE.", ["model_name"])
APPOINTMENTS_REQUESTED = Counter(
    "appointments_requested", "Messages in which the user asked for an appointment.",
    ["business_id"])
APPOINTMENTS_BOOKED = Counter(
    "appointments_booked", "Messages that ended with an appointment booked.", ["business_id"])
HUMAN_HANDOFFS = Counter(
    "human_handoffs", "Messages that asked for a human; reason is 'error' when the reply "
    "was an error, else 'complex_query' (the course service's rule).",
    ["business_id", "reason"])

# --- the same replies under the OpenTelemetry GenAI semantic conventions ---
# Semantic conventions v1.37.0, GenAI client metrics (status: Development):
# https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-metrics/ . Names and
# attributes as an OTel-to-Prometheus exporter writes them (dots become
# underscores, the unit "s" becomes "_seconds", "{token}" is dropped), so GenAI
# dashboards built on those names work unchanged. Bucket bounds: the spec's advice.
GEN_AI_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576,
                        4194304, 16777216, 67108864)
GEN_AI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12,
                           10.24, 20.48, 40.96, 81.92)
GEN_AI_LABELS = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
GEN_AI_TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage", "Tokens per chat reply (OTel gen_ai.client.token.usage): "
    "gen_ai_token_type input = prompt_tokens, output = completion_tokens.",
    [*GEN_AI_LABELS, "gen_ai_token_type"], buckets=GEN_AI_TOKEN_BUCKETS)
GEN_AI_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds", "Chat reply time reported by the app "
    "(OTel gen_ai.client.operation.duration); error_type is _OTHER on failed replies.",
    [*GEN_AI_LABELS, "error_type"], buckets=GEN_AI_DURATION_BUCKETS)
# gen_ai.provider.name well-known values, by model-name prefix; "_OTHER" otherwise.
GEN_AI_PROVIDERS = (
    ("gemini", "gcp.gemini"), ("gemma", "gcp.gemini"), ("gpt", "openai"), ("chatgpt", "openai"),
    ("o1", "openai"), ("o3", "openai"), ("o4", "openai"), ("claude", "anthropic"),
    ("mistral", "mistral_ai"), ("mixtral", "mistral_ai"), ("codestral", "mistral_ai"),
    ("command", "cohere"), ("deepseek", "deepseek"), ("grok", "x_ai"), ("sonar", "perplexity"),
)


@functools.lru_cache(maxsize=1024)
def gen_ai_provider(model_name: str) -> str:
    """``gen_ai.provider.name`` for a model name (``"gemini-1.5-flash"`` -> ``"gcp.gemini"``).

    A routing prefix (``"models/"``, ``"openai/"``) is ignored; unknown names give ``"_OTHER"``.
    """
    name = model_name.lower().rsplit("/", 1)[-1]
    return next((provider for prefix, provider in GEN_AI_PROVIDERS if name.startswith(prefix)),
                "_OTHER")


# --- the service itself ---
HTTP_REQUESTS = Counter(
    "http_requests", "HTTP requests handled, by route rule, method and status code.",
    ["endpoint", "method", "status"])
HTTP_DURATION = Histogram(
    "http_request_duration_seconds", "HTTP request handling time, by route rule and method.",
    ["endpoint", "method"], buckets=HTTP_BUCKETS)
EVENTS_STORED = Counter(
    "mlops_events_stored", "Events committed to Postgres while the request waited.")
EVENTS_QUEUED = Counter(
    "mlops_events_queued", "Events written to the local spool because Postgres was unavailable.")
EVENTS_REPLAYED = Counter(
    "mlops_events_replayed", "Spooled events moved into Postgres by the flusher.")
EVENTS_REJECTED = Counter(
    "mlops_events_rejected", "Events refused, by reason (invalid, spool_full, "
    "event_id_conflict: the id is stored for another business).",
    ["reason"])

# --- access control (mlops/auth.py, mlops/limits.py) ---
AUTH_FAILURES = Counter(
    "mlops_auth_failures", "Requests without a valid credential for their scope, by scope "
    "(write, read, erase, metrics) and reason (missing_key, wrong_key, insufficient_scope, "
    "missing_token, wrong_token). In MLOPS_AUTH_MODE=warn such writes are stored anyway.",
    ["scope", "reason"])
RATE_LIMITED = Counter(
    "mlops_rate_limited_requests", "Requests refused with 429 by a rate limit, by route rule.",
    ["endpoint"])


# HTTP methods counted by name (RFC 9110's, and PATCH); any other becomes
# "other", so made-up methods cannot add series.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                          "TRACE", "PATCH"})


def init_app(app) -> None:
    """Count and time every request by route rule (never the raw path), method, status.

    The method label is one of :data:`HTTP_METHODS` or ``other``. The
    duration runs from ``g.request_started``, set by the app factory.
    """
    from flask import g, request

    @app.after_request
    def _observe(response):
        started = g.get("request_started")
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        method = request.method if request.method in HTTP_METHODS else OVERFLOW_LABEL
        HTTP_REQUESTS.labels(endpoint, method, str(response.status_code)).inc()
        if started is not None:
            HTTP_DURATION.labels(endpoint, method).observe(time.perf_counter() - started)
        return response


class SeriesBudget:
    """Caps the series one labelled metric family may hold in this process.

    A series is one sample line of ``/metrics``: a counter's label set is one,
    a histogram's is its buckets + 1 (``+Inf``) + ``_count`` + ``_sum``. The
    first label sets seen pass through while they fit in ``max_series``; a
    later new one is counted under ``other`` in every label (one more label
    set, kept inside the budget). So a client sending made-up names adds at
    most ``max_series`` series to a family, however many labels it has.
    The budget is per worker process: with N workers, a family holds at most
    N x ``max_series`` series.
    """

    def __init__(self, family: Counter | Histogram, max_series: int) -> None:
        per_label_set = len(getattr(family, "_upper_bounds", ())) + 2 if isinstance(
            family, Histogram) else 1
        self._limit = max(1, max_series // per_label_set) - 1  # room kept for "other"
        self._overflow = (OVERFLOW_LABEL,) * len(family._labelnames)
        self._seen: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()

    def __call__(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        """``labels`` if this family has room for them (or has them already), else ``other``s."""
        if labels in self._seen:
            return labels
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(labels)
                return labels
        return self._overflow


class Telemetry:
    """Per-app telemetry state: series budgets and the scrape-time collector.

    ``max_series`` is each labelled family's :class:`SeriesBudget`;
    ``max_businesses`` caps the per-business gauges read from Postgres;
    ``multiproc_dir`` is ``PROMETHEUS_MULTIPROC_DIR`` when gunicorn.conf.py set
    it (prometheus_client's multiprocess mode), else None.
    """

    def __init__(self, db: Database, spool: Spool, *, max_businesses: int,
                 max_series: int, cache_seconds: float, version: str,
                 multiproc_dir: Path | None = None, price_table: str = "") -> None:
        self._budgets = {family: SeriesBudget(family, max_series) for family in (
            AI_REQUESTS, AI_TOKENS, AI_COST, APPOINTMENTS_REQUESTED, APPOINTMENTS_BOOKED,
            HUMAN_HANDOFFS, GEN_AI_TOKEN_USAGE, GEN_AI_DURATION, AI_PRICED_COST,
            UNPRICED_EVENTS)}
        self._multiprocess = multiproc_dir is not None
        self.state = StateCollector(db, spool, max_businesses=max_businesses,
                                    cache_seconds=cache_seconds, version=version,
                                    price_table=price_table)
        self._state_registry = CollectorRegistry(auto_describe=False)
        self._state_registry.register(self.state)
        self.erased = ErasedSeries(
            (AI_REQUESTS, AI_TOKENS, AI_COST, APPOINTMENTS_REQUESTED, APPOINTMENTS_BOOKED,
             HUMAN_HANDOFFS, AI_PRICED_COST),
            multiproc_dir)

    def forget_business(self, business_id: str) -> None:
        """Drop an erased business's labelled series from ``/metrics`` in every worker
        of this server (``mlops.erased_series``); it counts from 0 if it comes back."""
        self.erased.forget(business_id)

    def record_stored(self, records: Iterable[store.Record], *, replayed: bool = False) -> None:
        """Count events whose rows were just committed (call after the commit).

        ``replayed``: they came from the spool (``mlops_events_replayed_total``),
        else from a request (``mlops_events_stored_total``).
        """
        records = list(records)
        (EVENTS_REPLAYED if replayed else EVENTS_STORED).inc(len(records))
        # Counter increments summed per series, and histogram values gathered
        # per series, first: one update per series (or bucket) and group, not
        # per event (each update costs a lock and an mmap write).
        increments: collections.Counter = collections.Counter()
        observations: collections.defaultdict = collections.defaultdict(list)
        for record in records:
            e = record.event
            business, model = e.business_id, e.model_name
            increments[AI_REQUESTS, (business, e.response_type, e.intent_detected)] += 1
            increments[AI_TOKENS, (business, model)] += e.tokens_used
            increments[AI_COST, (business, model)] += e.api_cost_usd
            cost, status = record.price
            if cost is not None:
                increments[AI_PRICED_COST, (business, model)] += float(cost)
            elif status == prices.UNPRICED:
                increments[UNPRICED_EVENTS, (model,)] += 1
            if e.appointment_requested:
                increments[APPOINTMENTS_REQUESTED, (business,)] += 1
            if e.appointment_booked:
                increments[APPOINTMENTS_BOOKED, (business,)] += 1
            if e.human_handoff_requested:
                reason = "error" if e.response_type == "error" else "complex_query"
                increments[HUMAN_HANDOFFS, (business, reason)] += 1
            observations[AI_RESPONSE_TIME, ()].append(e.response_time_ms / 1000.0)
            _gen_ai_observations(e, observations)
        budgets = self._budgets
        with self.erased.counting():
            for (counter, labels), amount in increments.items():
                counter.labels(*budgets[counter](labels)).inc(amount)
        for (histogram, labels), values in observations.items():
            observe_all(histogram.labels(*budgets[histogram](labels)) if labels else histogram,
                        values)

    def render(self) -> tuple[bytes, str]:
        """The ``/metrics`` body and content type (Prometheus text format 0.0.4)."""
        if self._multiprocess:
            registry = CollectorRegistry()
            registry.register(_Filtered(MultiProcessCollector(None), self.erased.visible))
        else:
            registry = REGISTRY
        return generate_latest(registry) + generate_latest(self._state_registry), \
            CONTENT_TYPE_LATEST


class _Filtered:
    """A collector yielding ``collector``'s families through ``keep``."""

    def __init__(self, collector, keep) -> None:
        self._collector, self._keep = collector, keep

    def collect(self):
        return self._keep(self._collector.collect())


def _gen_ai_observations(event: MetricsEvent, observations: dict) -> None:
    """Add one stored reply's values for the OTel GenAI histograms to ``observations``.

    ``observations`` maps ``(histogram, label values)`` to a list of values.
    A reply failed when its
    ``success_rate`` is 0 (the contract's failure). Token usage is observed
    only for the counts the app sent.
    """
    base = ("chat", gen_ai_provider(event.model_name), event.model_name)
    observations[GEN_AI_DURATION, (*base, "_OTHER" if event.success_rate == 0 else "")].append(
        event.response_time_ms / 1000.0)
    if event.prompt_tokens is not None:
        observations[GEN_AI_TOKEN_USAGE, (*base, "input")].append(event.prompt_tokens)
    if event.completion_tokens is not None:
        observations[GEN_AI_TOKEN_USAGE, (*base, "output")].append(event.completion_tokens)


def observe_all(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe(v)`` for each of ``values``, with one update per bucket touched.

    ``histogram`` is an unlabelled histogram or one labelled child. Gives the
    same counts as observing one by one: prometheus_client's
    ``Histogram.observe`` adds a value to the first bucket whose upper bound
    is at least the value (``bisect_left`` over the sorted bounds), and to
    the sum; a NaN goes to the sum only. It reads the histogram's
    ``_upper_bounds``, ``_buckets`` and ``_sum`` (prometheus_client has no
    bulk observe); ``tests/test_telemetry.py`` checks the result against
    ``observe``.
    """
    histogram._raise_if_not_observable()
    bounds = histogram._upper_bounds
    in_buckets = (bisect.bisect_left(bounds, v) for v in values if not math.isnan(v))
    for index, count in collections.Counter(in_buckets).items():
        histogram._buckets[index].inc(count)
    histogram._sum.inc(sum(values))


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
        self._price_table = price_table
        self._spool = spool
        self._marker = spool.path.with_name("metrics-refresh-requested")
        self._max_businesses = max_businesses
        self._cache_seconds = cache_seconds
        self._version = version
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
        thread = threading.Thread(target=self._read, daemon=True)  # pragma: no mutate
        thread.name = "metrics-prime"  # pragma: no mutate
        thread.start()

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
