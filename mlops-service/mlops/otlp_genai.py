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
from pydantic import TypeAdapter, ValidationError

from .otlp import Rejections
from .schemas import INT64_MAX, MetricsEvent, field_errors

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
# Roles whose value is text: only a non-empty string counts (else the next name is tried).
_TEXT_ROLES = frozenset({"operation", "provider", "model", "conversation", "error", "kind",
                         "business", "service"})
# Each attribute read, and the role it plays: (role, rank, is text); of the
# names a span has for one role, the lowest rank wins.
_ROLES: dict[str, tuple[str, int, bool]] = {
    name: (role, rank, role in _TEXT_ROLES)
    for role, names in (("operation", (OPERATION,)), ("provider", PROVIDER), ("model", MODEL),
                        ("input", INPUT_TOKENS), ("output", OUTPUT_TOKENS),
                        ("total", TOTAL_TOKENS), ("cache_read", CACHE_READ_TOKENS),
                        ("conversation", CONVERSATION), ("cost", COST),
                        ("error", (ERROR_TYPE,)), ("kind", (SPAN_KIND,)))
    for rank, name in enumerate(names)}
_USAGE_ROLES = ("input", "output", "total")
_GEN_AI_ROLES = ("operation", "provider", "model")
_SCALARS = frozenset({"string_value", "int_value", "double_value", "bool_value"})
_ABSENT = (0, None, None)  # (rank, attribute name, value) of a role the span lacks
# Characters: the longest text kept in an extra field (as the contract's labels).
MAX_EXTRA_TEXT = 128
# What a contract field holds when a span has nothing for it.
UNKNOWN = "unknown"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EVENTS = TypeAdapter(list[MetricsEvent])


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
    The events are validated together by the schema (:class:`MetricsEvent`);
    a span whose event fails is rejected naming the field.
    """
    now = now or datetime.now(UTC)
    found = Calls()
    business = {key: ("business", rank, True) for rank, key in enumerate(business_keys)}
    roles = {**_ROLES, **business}
    resource_roles = {**business, SERVICE_NAME: ("service", 0, True)}
    bodies: list[dict] = []
    seen = 0
    for resource_spans in request.resource_spans:
        resource = _read(resource_spans.resource.attributes, resource_roles)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                seen += 1
                if seen > max_spans:
                    continue
                try:
                    body = _call(span, _read(span.attributes, roles), resource, business_keys)
                except SpanRejected as exc:
                    found.rejections.reject(f"span {span.span_id.hex() or '?'}: {exc}")
                    continue
                if body is None:
                    found.not_llm += 1
                    continue
                bodies.append(body)
                ended = _EPOCH + timedelta(microseconds=span.end_time_unix_nano // 1000)
                found.times.append(min(ended, now))
    found.rejections.reject(f"at most {max_spans} spans per request (OTLP_MAX_SPANS); send "
                            "smaller batches (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)",
                            seen - max_spans)
    found.events, found.times = _validated(bodies, found.times, found.rejections)
    return found


def _validated(bodies: list[dict], times: list[datetime],
               rejections: Rejections) -> tuple[list[MetricsEvent], list[datetime]]:
    """The events of ``bodies`` that the schema accepts, and their times; the others rejected.

    One validation of the whole list; when some fail, pydantic's errors
    locate them (their ``loc`` starts with the index) and the rest are
    validated again. The extra fields need no check beyond :func:`_call`'s:
    they are whole numbers in bigint range and texts of at most
    ``MAX_EXTRA_TEXT`` characters without NUL.
    """
    try:
        return _EVENTS.validate_python(bodies), times
    except ValidationError as exc:
        failed: dict[int, list[dict]] = {}
        for problem in field_errors(exc):
            index, _, name = problem["field"].partition(".")
            failed.setdefault(int(index), []).append({**problem, "field": name})
    for index, problems in failed.items():
        rejections.reject(f"span {bodies[index]['event_id'][-16:]}: " + "; ".join(
            f"{p['field']} {p['problem']}" for p in problems[:3]))
    kept = [i for i in range(len(bodies)) if i not in failed]
    return _EVENTS.validate_python([bodies[i] for i in kept]), [times[i] for i in kept]


def _read(attributes, roles: dict[str, tuple[str, int, bool]]) -> dict[str, tuple]:
    """The attributes (a repeated KeyValue) that play a role in ``roles``, in one pass.

    Returns ``{role: (rank, attribute name, value)}``, the lowest-ranked
    usable value of each role: a non-empty string for a text role, a scalar
    (string, int, double, bool) for the others. Other keys are not read.
    """
    found: dict[str, tuple] = {}
    for kv in attributes:
        role = roles.get(kv.key)
        if role is None:
            continue
        name, rank, text = role
        held = found.get(name)
        if held is not None and held[0] <= rank:
            continue
        value = kv.value
        if text:
            scalar = value.string_value  # "" unless a (non-empty) string
            if not scalar:
                continue
        else:
            kind = value.WhichOneof("value")
            if kind not in _SCALARS:
                continue
            scalar = getattr(value, kind)
        found[name] = (rank, kv.key, scalar)
    return found


def _bounded(held: tuple) -> str | None:
    """A held text kept as an extra field (which the schema does not bound), or None.

    A value longer than ``MAX_EXTRA_TEXT`` or holding NUL rejects the span.
    """
    _, name, value = held
    if value is not None and (len(value) > MAX_EXTRA_TEXT or "\x00" in value):
        raise SpanRejected(f"{name} must be at most {MAX_EXTRA_TEXT} characters, without NUL")
    return value


def _count(held: tuple) -> int | None:
    """A held token count: an integer 0 to 2**63 - 1 (given as an int, a whole double or
    digits), or None when absent."""
    _, name, value = held
    if name is None:
        return None
    digits = isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 20
    if digits or (isinstance(value, float) and value.is_integer()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
        raise SpanRejected(f"{name} must be a whole number >= 0")
    return value


def _is_call(attrs: dict) -> bool:
    """Whether a span's attributes describe one call to a model (see docs/otlp.md)."""
    operation = attrs.get("operation", _ABSENT)[2]
    kind = attrs.get("kind", _ABSENT)[2]
    if operation in NOT_A_CALL_OPERATIONS or (kind is not None
                                              and kind not in OPENINFERENCE_CALL_KINDS):
        return False
    if operation in LLM_OPERATIONS or kind in OPENINFERENCE_CALL_KINDS:
        return True
    return operation is None and any(role in attrs for role in (*_USAGE_ROLES, *_GEN_AI_ROLES))


def _call(span: Span, attrs: dict, resource: dict,
          business_keys: tuple[str, ...]) -> dict | None:
    """The event body (for :class:`MetricsEvent`) of ``span``, or None when it is not an
    LLM call.

    ``attrs`` and ``resource``: the span's and its resource's attributes by
    role (:func:`_read`); ``business_keys`` are named when no business is
    found. Raises :class:`SpanRejected` when it is a call but cannot be stored.
    """
    if not _is_call(attrs):
        return None
    trace_id, span_id = span.trace_id, span.span_id
    if len(trace_id) != 16 or len(span_id) != 8 or not any(trace_id) or not any(span_id):
        raise SpanRejected("trace_id must be 16 bytes and span_id 8, not all zero")
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    if not start or end < start:
        raise SpanRejected("start_time_unix_nano must be set and end_time_unix_nano not "
                           "before it")
    get = attrs.get
    business = get("business", _ABSENT)[2] or resource.get("business", _ABSENT)[2] \
        or resource.get("service", _ABSENT)[2]
    if business is None:
        raise SpanRejected(f"no business: set one of {', '.join(business_keys)} "
                           f"or {SERVICE_NAME} on the span or its resource")
    prompt = _count(get("input", _ABSENT))
    completion = _count(get("output", _ABSENT))
    total = _count(get("total", _ABSENT))
    if prompt is not None or completion is not None:
        total = (prompt or 0) + (completion or 0)
    _, cost_name, cost = get("cost", _ABSENT)
    if cost_name is not None and (isinstance(cost, bool) or not isinstance(cost, int | float)
                                  or not math.isfinite(cost) or cost < 0):
        raise SpanRejected(f"{cost_name} must be a number >= 0 (US dollars)")
    operation = _bounded(get("operation", _ABSENT))
    error_type = _bounded(get("error", _ABSENT))
    failed = span.status.code == Status.STATUS_CODE_ERROR or error_type is not None
    conversation = get("conversation", _ABSENT)[2]
    trace_hex = trace_id.hex()
    body = {
        "event_id": f"otlp-{trace_hex}-{span_id.hex()}",
        "business_id": business,
        "conversation_id": conversation,
        "session_id": conversation or trace_hex,
        "response_time_ms": (end - start) / 1e6,
        "success_rate": 0.0 if failed else 1.0,
        "tokens_used": total or 0,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "api_cost_usd": float(cost or 0.0),
        "model_name": get("model", _ABSENT)[2] or UNKNOWN,
        "intent_detected": operation or UNKNOWN,
        "appointment_requested": False,
        "human_handoff_requested": False,
        "user_message_length": 0,
        "ai_response_length": 0,
        "response_type": "error" if failed else operation or UNKNOWN,
        OPERATION: operation or UNKNOWN,
    }
    provider = _bounded(get("provider", _ABSENT))
    if provider is not None:
        body["gen_ai.provider.name"] = provider
    cache_read = _count(get("cache_read", _ABSENT))
    if cache_read is not None:
        body["gen_ai.usage.cache_read.input_tokens"] = cache_read
    if error_type is not None:
        body[ERROR_TYPE] = error_type
    # The resource's service.name is kept for reference when it fits an extra field;
    # a longer one is left out, not a reason to reject the call (the business, when
    # it is the service.name, is bounded by the schema's own business_id limit).
    _, _, service = resource.get("service", _ABSENT)
    if service is not None and len(service) <= MAX_EXTRA_TEXT and "\x00" not in service:
        body[SERVICE_NAME] = service
    return body
