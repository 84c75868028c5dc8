"""``POST /v1/traces``, ``/v1/metrics``, ``/v1/logs``: OTLP/HTTP from OpenTelemetry SDKs.

An app sets ``OTEL_EXPORTER_OTLP_ENDPOINT=http://<host>:5001`` and
``OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer <key>``; docs/otlp.md has
the mapping and the set-up. Each LLM call in the traces becomes one event on
the write path of ``/track`` (mlops.otlp_genai, mlops.ingest). Metrics and
logs are answered but not stored (see :func:`export_metrics`).
"""

from __future__ import annotations

from flask import Blueprint, Response, request
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from .. import otlp, otlp_genai
from ..auth import FORBIDDEN_MESSAGE, get_auth, require_scope
from ..bodies import read_body
from ..ratelimit import rate_limited
from ..services import get_services
from ..telemetry import OTLP_DISCARDED, OTLP_SPANS

bp = Blueprint("otlp", __name__)

_CONFLICT = "event_id is already stored for another business"


def _read(message):
    """This request's body, bounded, inflated and parsed into ``message``; and its encoding.

    Errors: 415 (media type or content coding), 413 (over ``OTLP_MAX_BODY_BYTES``
    as sent or inflated), 408 (body slower than ``BODY_READ_TIMEOUT_SECONDS``),
    400 (undecodable).
    """
    limit = get_services().settings.otlp_max_body_bytes
    encoding = otlp.media_type(request.content_type)
    body = otlp.inflate(read_body(limit, json=False),
                        request.headers.get("Content-Encoding"), limit)
    return otlp.parse(body, encoding, message), encoding


def _answer(message, encoding: str) -> Response:
    """200 with ``message`` (an ``Export*ServiceResponse``) in the request's encoding."""
    return Response(otlp.serialize(message, encoding), 200, content_type=encoding)


@bp.post("/v1/traces")
@rate_limited("batch")
@require_scope("write")
def export_traces():
    """Store the LLM calls among an OTLP ``ExportTraceServiceRequest``'s spans.

    Body: protobuf (``application/x-protobuf``) or OTLP/JSON
    (``application/json``), optionally gzip, at most ``OTLP_MAX_BODY_BYTES``
    as sent and inflated. Each span that is an LLM call becomes one event
    (docs/otlp.md), id ``otlp-<trace id>-<span id>`` (a re-sent span is
    stored once), time its end time. Answers 200 with an
    ``ExportTraceServiceResponse`` in the request's encoding once every
    accepted call is in Postgres or the fsynced spool; spans that cannot be
    stored are counted in ``partial_success.rejected_spans`` with the first
    reason in ``error_message``. Spans that are not LLM calls are neither
    stored nor rejected (``mlops_otlp_spans_total{outcome="not_llm"}``).
    Errors, each a ``google.rpc.Status`` in the request's encoding: 400
    (undecodable, not retryable), 401/403 (``write`` scope), 408, 413, 415
    (another media type or content coding), 429 with ``Retry-After``
    (``RATE_LIMIT_BATCH``), 503 with ``Retry-After`` (database away and
    spool full).
    """
    services = get_services()
    settings = services.settings
    export, encoding = _read(ExportTraceServiceRequest())
    found = otlp_genai.calls(export, business_keys=settings.otlp_business_attributes,
                             max_spans=settings.otlp_max_spans)
    rejections = found.rejections
    _drop_businesses_not_allowed(found)
    conflicts: set[int] = set()
    if found.events:
        # An export is a batch: it may take the statement timeout, as /track/batch.
        _, records, conflicts = services.ingestor.submit(
            found.events, timeout_ms=settings.db_statement_timeout_ms, times=found.times)
        for position in sorted(conflicts):
            rejections.reject(f"span {records[position].event_id}: {_CONFLICT}")
    accepted = len(found.events) - len(conflicts)
    OTLP_SPANS.labels("accepted").inc(accepted)
    OTLP_SPANS.labels("rejected").inc(rejections.count)
    OTLP_SPANS.labels("not_llm").inc(found.not_llm)
    response = ExportTraceServiceResponse()
    if rejections.count:
        response.partial_success.rejected_spans = rejections.count
        response.partial_success.error_message = rejections.error_message()
    return _answer(response, encoding)


def _drop_businesses_not_allowed(found: otlp_genai.Calls) -> None:
    """Reject the calls of ``found`` for a business this request's key may not write.

    A key limited to some businesses (``MLOPS_KEYS_FILE``) has each other
    business's span refused in ``partial_success`` with the one refusal
    wording, whether that business exists or not, and counted in
    ``mlops_auth_failures_total{reason="business_not_allowed"}``; its other
    spans are stored, as items of ``/track/batch`` are.
    """
    auth = get_auth()
    allowed = auth.businesses("write")  # None: every business
    if allowed is None:
        return
    kept = [i for i, event in enumerate(found.events) if event.business_id in allowed]
    refused = len(found.events) - len(kept)
    for event in found.events:
        if event.business_id not in allowed:
            found.rejections.reject(f"span {event.event_id[-16:]}: {FORBIDDEN_MESSAGE}")
    found.events = [found.events[i] for i in kept]
    found.times = [found.times[i] for i in kept]
    auth.count_refusals("write", refused)


@bp.post("/v1/metrics")
@rate_limited("batch")
@require_scope("write")
def export_metrics():
    """Answer an OTLP ``ExportMetricsServiceRequest`` without storing it.

    This service derives its metrics from the LLM calls in traces; an app's
    own OTel metrics are not stored. Answering 200 with every data point in
    ``partial_success.rejected_data_points`` and an ``error_message`` saying
    so is the answer the specification forbids clients to retry (a 404 is
    not retried either, but SDKs log it as an export error every interval).
    Counted in ``mlops_otlp_discarded_items_total{signal="metrics"}``. The
    body is read and checked as on ``/v1/traces`` (same errors).
    """
    export, encoding = _read(ExportMetricsServiceRequest())
    points = sum(len(getattr(metric, metric.WhichOneof("data")).data_points)
                 for resource in export.resource_metrics
                 for scope in resource.scope_metrics
                 for metric in scope.metrics if metric.WhichOneof("data"))
    OTLP_DISCARDED.labels("metrics").inc(points)
    response = ExportMetricsServiceResponse()
    if points:
        response.partial_success.rejected_data_points = points
        response.partial_success.error_message = (
            "metrics are not stored: this service keeps the LLM calls of /v1/traces only; "
            "set OTEL_METRICS_EXPORTER=none to stop sending them")
    return _answer(response, encoding)


@bp.post("/v1/logs")
@rate_limited("batch")
@require_scope("write")
def export_logs():
    """Answer an OTLP ``ExportLogsServiceRequest`` without storing it.

    As :func:`export_metrics`, for log records: all counted in
    ``partial_success.rejected_log_records`` and in
    ``mlops_otlp_discarded_items_total{signal="logs"}``. Log records often
    carry prompts and replies; none of it is kept.
    """
    export, encoding = _read(ExportLogsServiceRequest())
    records = sum(len(scope.log_records) for resource in export.resource_logs
                  for scope in resource.scope_logs)
    OTLP_DISCARDED.labels("logs").inc(records)
    response = ExportLogsServiceResponse()
    if records:
        response.partial_success.rejected_log_records = records
        response.partial_success.error_message = (
            "logs are not stored: this service keeps the LLM calls of /v1/traces only; "
            "set OTEL_LOGS_EXPORTER=none to stop sending them")
    return _answer(response, encoding)


@bp.after_request
def _failure_as_status(response: Response) -> Response:
    """A 4xx/5xx of these routes as a ``google.rpc.Status`` in the request's encoding.

    The service's handlers (auth, rate limits, body limits, a full spool)
    answer JSON errors; OTLP asks for a Status body, in protobuf when the
    request was protobuf. Status codes and headers (``Retry-After``) stay.
    """
    if response.status_code < 400 or response.mimetype != "application/json":
        return response
    error = response.get_json(silent=True) or {}
    encoding = otlp.PROTOBUF if request.mimetype == otlp.PROTOBUF else otlp.JSON
    response.set_data(otlp.status_body(response.status_code,
                                       str(error.get("message", response.status)), encoding))
    response.mimetype = encoding
    return response
