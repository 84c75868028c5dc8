"""GenAI spans to events: one LLM call, exported as an OTLP span, becomes one MetricsEvent.

Attribute names, and where each comes from (docs/otlp.md has the table):

* OpenTelemetry GenAI semantic conventions (``docs/gen-ai/`` of
  open-telemetry/semantic-conventions): ``gen_ai.operation.name``,
  ``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.response.model``,
  ``gen_ai.usage.input_tokens``/``output_tokens``,
  ``gen_ai.usage.cache_read.input_tokens``, ``gen_ai.conversation.id``,
  ``error.type``; and the older names instrumentations still emit:
  ``gen_ai.system``, ``gen_ai.usage.prompt_tokens``/``completion_tokens``.
* OpenInference (Arize-ai/openinference ``spec/semantic_conventions.md``):
  ``openinference.span.kind``, ``llm.model_name``, ``llm.provider``,
  ``llm.system``, ``llm.token_count.prompt``/``completion``/``total``,
  ``llm.token_count.prompt_details.cache_read``, ``session.id``.
* OpenLIT: ``gen_ai.usage.cost`` (US dollars).

Only the attributes named here are read: prompt and completion content
(``gen_ai.prompt.*``, ``gen_ai.input.messages``, ``llm.input_messages``,
span events ...) is never copied, so none of it reaches the database, the
spool or the logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from .otlp import Rejections
from .schemas import InvalidRequest, MetricsEvent, parse_event

# gen_ai.operation.name values that are one call to a model.
LLM_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "embeddings"})
# Operations that are not one call to a model: an agent's or a tool's span
# (any usage on it sums calls that are spans of their own).
NOT_A_CALL_OPERATIONS = frozenset({"invoke_agent", "create_agent", "execute_tool"})
# openinference.span.kind values that are one call to a model.
OPENINFERENCE_CALL_KINDS = frozenset({"LLM", "EMBEDDING"})

OPERATION = "gen_ai.operation.name"
PROVIDER = ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system")
MODEL = ("gen_ai.response.model", "gen_ai.request.model", "llm.model_name")
INPUT_TOKENS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens",
                "llm.token_count.prompt")
OUTPUT_TOKENS = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens",
                 "llm.token_count.completion")
TOTAL_TOKENS = ("llm.token_count.total",)
CACHE_READ_TOKENS = ("gen_ai.usage.cache_read.input_tokens",
                     "llm.token_count.prompt_details.cache_read")
CONVERSATION = ("gen_ai.conversation.id", "session.id")
COST = ("gen_ai.usage.cost",)
ERROR_TYPE = "error.type"
SPAN_KIND = "openinference.span.kind"
SERVICE_NAME = "service.name"
_READ = frozenset({OPERATION, *PROVIDER, *MODEL, *INPUT_TOKENS, *OUTPUT_TOKENS, *TOTAL_TOKENS,
                   *CACHE_READ_TOKENS, *CONVERSATION, *COST, ERROR_TYPE, SPAN_KIND})
_USAGE = frozenset({*INPUT_TOKENS, *OUTPUT_TOKENS, *TOTAL_TOKENS})
_GEN_AI_MARKERS = frozenset({OPERATION, *PROVIDER, *MODEL})
# What a contract field holds when a span has nothing for it.
UNKNOWN = "unknown"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SpanRejected(Exception):
    """This span cannot be stored; ``str(error)`` says why (for ``partial_success``)."""


@dataclass
class Calls:
    """The LLM calls found in one export request, and what became of the other spans."""

    events: list[MetricsEvent] = field(default_factory=list)
    times: list[datetime] = field(default_factory=list)  # each event's time: its span's end
    not_llm: int = 0
    rejections: Rejections = field(default_factory=Rejections)


def calls(request: ExportTraceServiceRequest, *, business_keys: tuple[str, ...],
          max_spans: int, now: datetime | None = None) -> Calls:
    """Map every span of ``request``: one event per LLM call, in order.

    ``business_keys``: the attribute keys naming the business, looked up on
    the span, then on its resource; the resource's ``service.name`` last.
    Spans past the first ``max_spans`` are rejected unread. A span's time
    is its end time, or ``now`` (default: the current time) if it ends later.
    """
    now = now or datetime.now(UTC)
    found = Calls()
    wanted = _READ | set(business_keys)
    seen = 0
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes,
                               {*business_keys, SERVICE_NAME})
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                seen += 1
                if seen > max_spans:
                    continue
                try:
                    mapped = _call(span, _attributes(span.attributes, wanted), resource,
                                   business_keys, now)
                except SpanRejected as exc:
                    found.rejections.reject(f"span {span.span_id.hex() or '?'}: {exc}")
                    continue
                if mapped is None:
                    found.not_llm += 1
                else:
                    found.events.append(mapped[0])
                    found.times.append(mapped[1])
    found.rejections.reject(f"at most {max_spans} spans per request (OTLP_MAX_SPANS); send "
                            "smaller batches (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)",
                            seen - max_spans)
    return found


def _attributes(attributes, keys) -> dict:
    """The scalar values of ``attributes`` (a repeated KeyValue) whose key is in ``keys``."""
    values = {}
    for kv in attributes:
        if kv.key in keys:
            kind = kv.value.WhichOneof("value")
            if kind in ("string_value", "int_value", "double_value", "bool_value"):
                values[kv.key] = getattr(kv.value, kind)
    return values


def _first(attrs: dict, names: tuple[str, ...]):
    """``(name, value)`` of the first of ``names`` present in ``attrs``, else ``(None, None)``."""
    for name in names:
        if name in attrs:
            return name, attrs[name]
    return None, None


def _text(attrs: dict, names: tuple[str, ...]) -> str | None:
    value = _first(attrs, names)[1]
    return value if isinstance(value, str) and value else None


def _count(attrs: dict, names: tuple[str, ...]) -> int | None:
    """A token count: an integer >= 0 (given as an int, a whole double or digits)."""
    name, value = _first(attrs, names)
    if name is None:
        return None
    digits = isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 20
    if digits or (isinstance(value, float) and value.is_integer()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpanRejected(f"{name} must be a whole number >= 0")
    return value


def _is_call(attrs: dict) -> bool:
    """Whether a span's attributes describe one call to a model (see docs/otlp.md)."""
    operation = attrs.get(OPERATION)
    kind = attrs.get(SPAN_KIND)
    if operation in NOT_A_CALL_OPERATIONS or (kind is not None
                                              and kind not in OPENINFERENCE_CALL_KINDS):
        return False
    if operation in LLM_OPERATIONS or kind in OPENINFERENCE_CALL_KINDS:
        return True
    return operation is None and (not _USAGE.isdisjoint(attrs)
                                  or not _GEN_AI_MARKERS.isdisjoint(attrs))


def _call(span: Span, attrs: dict, resource: dict, business_keys: tuple[str, ...],
          now: datetime) -> tuple[MetricsEvent, datetime] | None:
    """The event for ``span`` and its time, or None when it is not an LLM call.

    Raises :class:`SpanRejected` when it is one but cannot be stored.
    """
    if not _is_call(attrs):
        return None
    if len(span.trace_id) != 16 or len(span.span_id) != 8 or not any(span.trace_id) \
            or not any(span.span_id):
        raise SpanRejected("trace_id must be 16 bytes and span_id 8, not all zero")
    if not span.start_time_unix_nano or span.end_time_unix_nano < span.start_time_unix_nano:
        raise SpanRejected("start_time_unix_nano must be set and end_time_unix_nano not "
                           "before it")
    business = next((v for v in (_text(attrs, (k,)) or _text(resource, (k,))
                                 for k in business_keys) if v), None) \
        or _text(resource, (SERVICE_NAME,))
    if business is None:
        raise SpanRejected(f"no business: set one of {', '.join(business_keys)} "
                           f"or {SERVICE_NAME} on the span or its resource")
    prompt = _count(attrs, INPUT_TOKENS)
    completion = _count(attrs, OUTPUT_TOKENS)
    total = _count(attrs, TOTAL_TOKENS)
    if prompt is not None or completion is not None:
        total = (prompt or 0) + (completion or 0)
    cost_name, cost = _first(attrs, COST)
    if cost_name is not None and (isinstance(cost, bool) or not isinstance(cost, int | float)
                                  or not math.isfinite(cost) or cost < 0):
        raise SpanRejected(f"{cost_name} must be a number >= 0 (US dollars)")
    operation = _text(attrs, (OPERATION,))
    error_type = _text(attrs, (ERROR_TYPE,))
    failed = span.status.code == Status.STATUS_CODE_ERROR or error_type is not None
    conversation = _text(attrs, CONVERSATION)
    trace_hex = span.trace_id.hex()
    body = {
        "event_id": f"otlp-{trace_hex}-{span.span_id.hex()}",
        "business_id": business,
        "conversation_id": conversation,
        "session_id": conversation or trace_hex,
        "response_time_ms": (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
        "success_rate": 0.0 if failed else 1.0,
        "tokens_used": total or 0,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "api_cost_usd": float(cost or 0.0),
        "model_name": _text(attrs, MODEL) or UNKNOWN,
        "intent_detected": operation or UNKNOWN,
        "appointment_requested": False,
        "human_handoff_requested": False,
        "user_message_length": 0,
        "ai_response_length": 0,
        "response_type": "error" if failed else operation or UNKNOWN,
        "gen_ai.operation.name": operation or UNKNOWN,
    }
    provider = _text(attrs, PROVIDER)
    if provider is not None:
        body["gen_ai.provider.name"] = provider
    cache_read = _count(attrs, CACHE_READ_TOKENS)
    if cache_read is not None:
        body["gen_ai.usage.cache_read.input_tokens"] = cache_read
    if error_type is not None:
        body[ERROR_TYPE] = error_type
    service = _text(resource, (SERVICE_NAME,))
    if service is not None:
        body[SERVICE_NAME] = service
    try:
        event = parse_event(body)
    except InvalidRequest as exc:
        raise SpanRejected("; ".join(f"{p['field']} {p['problem']}"
                                     for p in exc.problems[:3])) from None
    ended = _EPOCH + timedelta(microseconds=span.end_time_unix_nano // 1000)  # exact, no float
    return event, min(ended, now)
