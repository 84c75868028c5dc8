"""Prometheus telemetry: every metric is declared here, once, with its help text.

Under gunicorn, prometheus_client runs in multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set by gunicorn.conf.py before any import):
each worker writes its counters to mmap files, and ``/metrics`` merges them,
so totals are right whichever worker answers. Values that come from
Postgres or the spool (shared state, not per-process counts) are read at
scrape time by a collector the app factory hands to :meth:`Telemetry.add_state`
(``mlops.state_metrics``), since multiprocess mode does not aggregate custom
collectors. This module only counts and exposes: it reads no database or spool.

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
from prometheus_client.multiprocess import MultiProcessCollector

from . import prices
from .erased_series import ErasedSeries
from .schemas import MetricsEvent, Record

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

# --- access control (mlops/auth.py, mlops/ratelimit.py) ---
AUTH_FAILURES = Counter(
    "mlops_auth_failures", "Requests without a valid credential for their scope, by scope "
    "(write, read, erase, metrics) and reason (missing_key, wrong_key, insufficient_scope, "
    "expired_key, business_not_allowed: one per refused item, missing_token, wrong_token). "
    "In MLOPS_AUTH_MODE=warn writes without a valid key are stored anyway.",
    ["scope", "reason"])
RATE_LIMITED = Counter(
    "mlops_rate_limited_requests", "Requests refused with 429 by a rate limit, by route rule.",
    ["endpoint"])

# --- OTLP ingestion (mlops/routes/otlp.py) ---
OTLP_SPANS = Counter(
    "mlops_otlp_spans", "Spans received on POST /v1/traces, by outcome: accepted (an LLM "
    "call, stored or spooled as one event), rejected (reported in partial_success), "
    "not_llm (not an LLM call: not stored, not rejected).", ["outcome"])
OTLP_DISCARDED = Counter(
    "mlops_otlp_discarded_items", "Metric data points (POST /v1/metrics) and log records "
    "(POST /v1/logs) received and not stored, by signal (metrics, logs); answered as "
    "rejected in partial_success.", ["signal"])


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
    """Per-app telemetry state: series budgets, erased series, the scrape-time state.

    ``max_series`` is each labelled family's :class:`SeriesBudget`;
    ``multiproc_dir`` is ``PROMETHEUS_MULTIPROC_DIR`` when gunicorn.conf.py set
    it (prometheus_client's multiprocess mode), else None. ``state`` is the
    collector given to :meth:`add_state` (None until then).
    """

    def __init__(self, *, max_series: int, multiproc_dir: Path | None = None) -> None:
        self._budgets = {family: SeriesBudget(family, max_series) for family in (
            AI_REQUESTS, AI_TOKENS, AI_COST, APPOINTMENTS_REQUESTED, APPOINTMENTS_BOOKED,
            HUMAN_HANDOFFS, GEN_AI_TOKEN_USAGE, GEN_AI_DURATION, AI_PRICED_COST,
            UNPRICED_EVENTS)}
        self._multiprocess = multiproc_dir is not None
        self.state = None
        self._state_registry = CollectorRegistry(auto_describe=False)
        self.erased = ErasedSeries(
            (AI_REQUESTS, AI_TOKENS, AI_COST, APPOINTMENTS_REQUESTED, APPOINTMENTS_BOOKED,
             HUMAN_HANDOFFS, AI_PRICED_COST),
            multiproc_dir)

    def add_collector(self, collector) -> None:
        """Serve ``collector``'s families on ``/metrics`` beside the state gauges
        (read at scrape time, whichever worker answers)."""
        self._state_registry.register(collector)

    def add_state(self, collector) -> None:
        """Expose ``collector`` (a prometheus_client collector of values read at
        scrape time, e.g. ``mlops.state_metrics.StateCollector``) on ``/metrics``,
        after the counters, and keep it as :attr:`state`. Call once per app."""
        self.state = collector
        self._state_registry.register(collector)

    def forget_business(self, business_id: str) -> None:
        """Drop an erased business's labelled series from ``/metrics`` in every worker
        of this server (``mlops.erased_series``); it counts from 0 if it comes back."""
        self.erased.forget(business_id)

    def record_stored(self, records: Iterable[Record], *, replayed: bool = False) -> None:
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
            picodollars, status = record.price
            if picodollars is not None:
                increments[AI_PRICED_COST, (business, model)] += picodollars / 1e12
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
