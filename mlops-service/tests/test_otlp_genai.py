"""GenAI spans to events (mlops/otlp_genai.py): the mapping of docs/otlp.md, row by row.

``calls`` is called directly on ExportTraceServiceRequest objects built here
(opentelemetry-proto): no server, no database. tests/test_otlp.py sends real
SDK exports over HTTP and checks what is stored; here each rule of the
mapping is pinned on its own: which spans are calls, which attribute wins
for each field, the business, the event id, the time, failures, the
rejections, and that no other attribute is copied.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from mlops.otlp_genai import Calls, calls

TRACE = bytes.fromhex("5b8efff798038103d269b633813fc60c")
SPAN = bytes.fromhex("eee19b7ec3c1b174")
START = 1_764_000_000_000_000_000  # ns: 2025-11-24T16:00:00Z
END = START + 1_250_000_000 + 999  # 1250.000999 ms later
END_TIME = datetime(2025, 11, 24, 16, 0, 1, 250000, tzinfo=UTC)  # to the microsecond below
NOW = datetime(2026, 1, 1, tzinfo=UTC)
KEYS = ("mlops.business_id", "tenant.id")  # OTLP_BUSINESS_ATTRIBUTES's default
RESOURCE = {"service.name": "svc"}
CHAT = {"gen_ai.operation.name": "chat"}
MARKER = "PROMPT-MARKER-1c9e"
SECOND = 1_000_000_000


def any_value(value) -> AnyValue:
    if isinstance(value, AnyValue):
        return value
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    if isinstance(value, dict):
        return AnyValue(kvlist_value=KeyValueList(values=attributes(value)))
    return AnyValue(string_value=value)


def attributes(values: dict | list) -> list[KeyValue]:
    """KeyValues in the order given (a list of pairs may repeat a key)."""
    pairs = values.items() if isinstance(values, dict) else values
    return [KeyValue(key=k, value=any_value(v)) for k, v in pairs]


def span(attrs: dict | list = (), **fields) -> Span:
    made = Span(trace_id=fields.pop("trace_id", TRACE), span_id=fields.pop("span_id", SPAN),
                name=fields.pop("name", "chat gpt-4o-mini"), kind=Span.SPAN_KIND_CLIENT,
                start_time_unix_nano=fields.pop("start", START),
                end_time_unix_nano=fields.pop("end", END), **fields)
    made.attributes.extend(attributes(attrs))
    return made


def request(*spans: Span, resource: dict | None = None) -> ExportTraceServiceRequest:
    built = ExportTraceServiceRequest()
    resource_spans = built.resource_spans.add()
    resource_spans.resource.attributes.extend(attributes(RESOURCE if resource is None
                                                         else resource))
    resource_spans.scope_spans.add().spans.extend(spans)
    return built


def found(*spans: Span, resource: dict | None = None, keys: tuple[str, ...] = KEYS,
          max_spans: int = 8192, now: datetime = NOW) -> Calls:
    return calls(request(*spans, resource=resource), business_keys=keys, max_spans=max_spans,
                 now=now)


def event(attrs: dict | list, resource: dict | None = None, **fields) -> dict:
    """The one event of a span with ``attrs``, as a dict (extra fields included)."""
    result = found(span(attrs, **fields), resource=resource)
    assert (result.rejections.count, result.rejections.first_error, result.not_llm) == (0, "", 0)
    (one,) = result.events
    return one.model_dump()


def rejected(*spans: Span, resource: dict | None = None, **kwargs) -> str:
    """The reason the one span is rejected."""
    result = found(*spans, resource=resource, **kwargs)
    assert (result.events, result.not_llm, result.rejections.count) == ([], 0, 1)
    return result.rejections.first_error


# --- which spans are LLM calls ---

@pytest.mark.parametrize("attrs", [
    *({"gen_ai.operation.name": op} for op in ("chat", "text_completion", "generate_content",
                                                "embeddings")),
    {"openinference.span.kind": "LLM"},
    {"openinference.span.kind": "EMBEDDING"},
    {"openinference.span.kind": "LLM", "gen_ai.operation.name": "rerank"},
    # Neither: an older instrumentation's model, provider or usage.
    {"gen_ai.system": "openai"},
    {"gen_ai.provider.name": "openai"},
    {"llm.provider": "openai"},
    {"llm.system": "openai"},
    {"gen_ai.request.model": "m"},
    {"gen_ai.response.model": "m"},
    {"llm.model_name": "m"},
    {"gen_ai.usage.input_tokens": 3},
    {"gen_ai.usage.prompt_tokens": 3},
    {"gen_ai.usage.completion_tokens": 0},
    {"llm.token_count.prompt": 3},
    {"llm.token_count.total": 9},
    {"gen_ai.operation.name": "", "gen_ai.system": "openai"},  # an empty text is no operation
    {"gen_ai.operation.name": 5, "gen_ai.system": "openai"},  # nor a number
])
def test_a_call(attrs):
    result = found(span(attrs))
    assert (len(result.events), result.not_llm, result.rejections.count) == (1, 0, 0)


@pytest.mark.parametrize("attrs", [
    {},
    {"http.route": "/chat", "http.request.method": "GET"},
    *({"gen_ai.operation.name": op, "gen_ai.usage.input_tokens": 177, "gen_ai.system": "openai",
       "gen_ai.request.model": "m"} for op in ("invoke_agent", "create_agent", "execute_tool")),
    *({"openinference.span.kind": kind, "llm.token_count.prompt": 50, "llm.model_name": "m"}
      for kind in ("CHAIN", "AGENT", "TOOL", "RETRIEVER", "RERANKER", "GUARDRAIL", "llm")),
    {"openinference.span.kind": "AGENT", "gen_ai.operation.name": "chat"},  # the kind rules
    # An agent's or a tool's operation rules over a call's kind.
    *({"gen_ai.operation.name": op, "openinference.span.kind": "LLM",
       "llm.token_count.prompt": 50} for op in ("invoke_agent", "create_agent", "execute_tool")),
    {"gen_ai.operation.name": "rerank", "gen_ai.usage.input_tokens": 3},  # another operation
    # Attributes that alone say nothing of a model call.
    {"gen_ai.usage.cost": 0.5},
    {"gen_ai.conversation.id": "c-1", "session.id": "s-1"},
    {"gen_ai.usage.cache_read.input_tokens": 3},
    {"error.type": "timeout"},
    {"mlops.business_id": "acme"},
    {"gen_ai.system": ""},  # empty texts count for nothing
    {"gen_ai.usage.input_tokens": [1, 2]},  # nor do arrays
])
def test_not_a_call(attrs):
    result = found(span(attrs, trace_id=b"", span_id=b""))  # not checked: not a call
    assert (result.events, result.not_llm, result.rejections.count) == ([], 1, 0)


def test_a_request_mixes_calls_and_other_spans_in_order():
    spans = [span(CHAT, span_id=bytes([0, 0, 0, 0, 0, 0, 0, i + 1]),
                  end=END + i * SECOND) for i in range(3)]
    http = span({"http.route": "/x"})
    result = found(spans[0], http, spans[1], http, spans[2])
    assert [e.event_id[-2:] for e in result.events] == ["01", "02", "03"]
    assert result.times == [END_TIME + timedelta(seconds=i) for i in range(3)]
    assert (result.not_llm, result.rejections.count) == (2, 0)


# --- the mapping, field by field ---

@pytest.mark.parametrize(("attrs", "field", "expected"), [
    # model_name: gen_ai.response.model, gen_ai.request.model, llm.model_name; else unknown.
    ([("llm.model_name", "c"), ("gen_ai.request.model", "b"), ("gen_ai.response.model", "a")],
     "model_name", "a"),
    ([("llm.model_name", "c"), ("gen_ai.request.model", "b")], "model_name", "b"),
    ({"llm.model_name": "c"}, "model_name", "c"),
    ({"gen_ai.response.model": "", "gen_ai.request.model": "b"}, "model_name", "b"),
    ({}, "model_name", "unknown"),
    # prompt_tokens: input_tokens, prompt_tokens (older), llm.token_count.prompt.
    ([("llm.token_count.prompt", 3), ("gen_ai.usage.prompt_tokens", 2),
      ("gen_ai.usage.input_tokens", 1)], "prompt_tokens", 1),
    ([("llm.token_count.prompt", 3), ("gen_ai.usage.prompt_tokens", 2)], "prompt_tokens", 2),
    ({"llm.token_count.prompt": 3}, "prompt_tokens", 3),
    ({}, "prompt_tokens", None),
    # completion_tokens: output_tokens, completion_tokens (older), llm.token_count.completion.
    ([("llm.token_count.completion", 6), ("gen_ai.usage.completion_tokens", 5),
      ("gen_ai.usage.output_tokens", 4)], "completion_tokens", 4),
    ([("llm.token_count.completion", 6), ("gen_ai.usage.completion_tokens", 5)],
     "completion_tokens", 5),
    ({"llm.token_count.completion": 6}, "completion_tokens", 6),
    ({}, "completion_tokens", None),
    # tokens_used: prompt + completion when either is there, else llm.token_count.total, else 0.
    ({"gen_ai.usage.input_tokens": 120, "gen_ai.usage.output_tokens": 30}, "tokens_used", 150),
    ({"gen_ai.usage.input_tokens": 120}, "tokens_used", 120),
    ({"gen_ai.usage.output_tokens": 30}, "tokens_used", 30),
    ({"gen_ai.usage.input_tokens": 1, "llm.token_count.total": 99}, "tokens_used", 1),
    ({"llm.token_count.total": 99}, "tokens_used", 99),
    ({}, "tokens_used", 0),
    # Token counts as an int, a whole double or decimal digits.
    ({"gen_ai.usage.input_tokens": 7.0}, "prompt_tokens", 7),
    ({"gen_ai.usage.input_tokens": "42"}, "prompt_tokens", 42),
    ({"gen_ai.usage.input_tokens": 2**63 - 1}, "prompt_tokens", 2**63 - 1),
    ({"gen_ai.usage.input_tokens": 0}, "prompt_tokens", 0),
    ({"gen_ai.usage.input_tokens": "0" * 18 + "5"}, "prompt_tokens", 5),  # 19 digits
    ({"gen_ai.usage.input_tokens": "9223372036854775807"}, "prompt_tokens", 2**63 - 1),
    # conversation_id: gen_ai.conversation.id, session.id; session_id as it, else the trace.
    ([("session.id", "s-1"), ("gen_ai.conversation.id", "c-1")], "conversation_id", "c-1"),
    ([("session.id", "s-1"), ("gen_ai.conversation.id", "c-1")], "session_id", "c-1"),
    ({"session.id": "s-1"}, "conversation_id", "s-1"),
    ({"session.id": "s-1"}, "session_id", "s-1"),
    ({}, "conversation_id", None),
    ({}, "session_id", TRACE.hex()),
    # api_cost_usd: gen_ai.usage.cost (US dollars), else 0.
    ({"gen_ai.usage.cost": 0.0123}, "api_cost_usd", 0.0123),
    ({"gen_ai.usage.cost": 2}, "api_cost_usd", 2.0),
    ({}, "api_cost_usd", 0.0),
    # intent_detected and response_type: the operation, else unknown.
    (CHAT, "intent_detected", "chat"),
    (CHAT, "response_type", "chat"),
    ({"openinference.span.kind": "LLM"}, "intent_detected", "unknown"),
    ({"openinference.span.kind": "EMBEDDING"}, "response_type", "unknown"),
    # What a span cannot know.
    (CHAT, "appointment_requested", False),
    (CHAT, "human_handoff_requested", False),
    (CHAT, "appointment_booked", None),
    (CHAT, "user_satisfaction", None),
    (CHAT, "user_message_length", 0),
    (CHAT, "ai_response_length", 0),
    (CHAT, "success_rate", 1.0),
    (CHAT, "response_time_ms", 1250.000999),
    # Extras under the conventions' names.
    (CHAT, "gen_ai.operation.name", "chat"),
    ({"llm.model_name": "m"}, "gen_ai.operation.name", "unknown"),
    ([("llm.system", "d"), ("llm.provider", "c"), ("gen_ai.system", "b"),
      ("gen_ai.provider.name", "a")], "gen_ai.provider.name", "a"),
    ([("llm.system", "d"), ("llm.provider", "c"), ("gen_ai.system", "b")],
     "gen_ai.provider.name", "b"),
    ([("llm.system", "d"), ("llm.provider", "c")], "gen_ai.provider.name", "c"),
    ({"llm.system": "d"}, "gen_ai.provider.name", "d"),
    ([("llm.token_count.prompt_details.cache_read", 8),
      ("gen_ai.usage.cache_read.input_tokens", 4)], "gen_ai.usage.cache_read.input_tokens", 4),
    ({"llm.token_count.prompt_details.cache_read": 8}, "gen_ai.usage.cache_read.input_tokens",
     8),
    ({"gen_ai.usage.cache_read.input_tokens": "0"}, "gen_ai.usage.cache_read.input_tokens", 0),
])
def test_the_mapping(attrs, field, expected):
    pairs = list(attrs.items()) if isinstance(attrs, dict) else list(attrs)
    if not any(k in ("gen_ai.operation.name", "openinference.span.kind") for k, _ in pairs):
        pairs.insert(0, ("openinference.span.kind", "LLM"))  # a call whatever else it has
    mapped = event(pairs)
    assert mapped[field] == expected
    assert type(mapped[field]) is type(expected)


def test_a_whole_event_as_the_example_of_the_docs():
    mapped = event({"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 120,
                    "gen_ai.usage.output_tokens": 30}, resource={"service.name": "docs-app"},
                   end=START + 1_250_000_000)
    assert mapped == {
        "event_id": "otlp-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174",
        "business_id": "docs-app", "conversation_id": None,
        "session_id": "5b8efff798038103d269b633813fc60c",
        "response_time_ms": 1250.0, "success_rate": 1.0, "user_satisfaction": None,
        "tokens_used": 150, "prompt_tokens": 120, "completion_tokens": 30,
        "api_cost_usd": 0.0, "model_name": "gpt-4o-mini", "intent_detected": "chat",
        "appointment_requested": False, "human_handoff_requested": False,
        "appointment_booked": None, "user_message_length": 0, "ai_response_length": 0,
        "response_type": "chat",
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "service.name": "docs-app"}


def test_absent_extras_are_left_out():
    mapped = event(CHAT, resource={"tenant.id": "t-1"})
    assert {k for k in mapped if "." in k} == {"gen_ai.operation.name"}


# --- the business: the span's, its resource's, then the resource's service.name ---

@pytest.mark.parametrize(("span_attrs", "resource", "keys", "business"), [
    ({"mlops.business_id": "s-m", "tenant.id": "s-t"},
     {"mlops.business_id": "r-m", "tenant.id": "r-t", "service.name": "svc"}, KEYS, "s-m"),
    ([("tenant.id", "s-t"), ("mlops.business_id", "s-m")], {}, KEYS, "s-m"),  # not by order
    ({"tenant.id": "s-t"}, {"mlops.business_id": "r-m", "service.name": "svc"}, KEYS, "s-t"),
    ({}, {"tenant.id": "r-t", "mlops.business_id": "r-m", "service.name": "svc"}, KEYS, "r-m"),
    ({}, {"tenant.id": "r-t", "service.name": "svc"}, KEYS, "r-t"),
    ({}, {"service.name": "svc"}, KEYS, "svc"),
    ({"mlops.business_id": ""}, {"service.name": "svc"}, KEYS, "svc"),  # empty: not one
    ({"mlops.business_id": 42}, {"tenant.id": "r-t"}, KEYS, "r-t"),  # a number: not one
    # OTLP_BUSINESS_ATTRIBUTES set: only the keys named, in their order.
    ({"mlops.business_id": "s-m", "app.customer": "s-c"}, {}, ("app.customer",), "s-c"),
    ({"mlops.business_id": "s-m"}, {"service.name": "svc"}, ("app.customer",), "svc"),
    ({"tenant.id": "s-t", "app.customer": "s-c"}, {}, ("tenant.id", "app.customer"), "s-t"),
    ({"app.customer": "s-c"}, {"tenant.id": "r-t"}, ("tenant.id", "app.customer"), "s-c"),
])
def test_the_business(span_attrs, resource, keys, business):
    result = found(span([("gen_ai.operation.name", "chat"), *dict(span_attrs).items()]
                        if isinstance(span_attrs, dict) else [*CHAT.items(), *span_attrs]),
                   resource=resource, keys=keys)
    assert result.rejections.count == 0
    assert [e.business_id for e in result.events] == [business]


@pytest.mark.parametrize(("span_attrs", "resource", "keys", "named"), [
    ({}, {}, KEYS, "mlops.business_id, tenant.id"),
    ({"service.name": "on-the-span"}, {"host.name": "h"}, KEYS, "mlops.business_id, tenant.id"),
    ({"mlops.business_id": "s-m"}, {"mlops.business_id": "r-m"}, ("app.customer",),
     "app.customer"),
    ({}, {"service.name": ""}, ("a", "b", "c"), "a, b, c"),
])
def test_no_business_rejects_the_span_naming_the_keys(span_attrs, resource, keys, named):
    reason = rejected(span({**CHAT, **span_attrs}), resource=resource, keys=keys)
    assert reason == (f"span eee19b7ec3c1b174: no business: set one of {named} or service.name "
                      "on the span or its resource")


def test_the_service_name_is_an_extra_only_from_the_resource():
    assert event({**CHAT, "service.name": "span-svc"},
                 resource={"service.name": "res-svc"})["service.name"] == "res-svc"
    assert "service.name" not in event({**CHAT, "service.name": "span-svc"},
                                       resource={"tenant.id": "t"})


# --- the event id and the time ---

def test_the_event_id_is_the_trace_and_span_ids_in_hex():
    mapped = event(CHAT, trace_id=bytes(range(1, 17)), span_id=bytes(range(0xf8, 0x100)))
    assert mapped["event_id"] == "otlp-0102030405060708090a0b0c0d0e0f10-f8f9fafbfcfdfeff"
    assert mapped["session_id"] == "0102030405060708090a0b0c0d0e0f10"


@pytest.mark.parametrize(("end", "now", "time"), [
    (END, NOW, END_TIME),  # ended: its end, to the microsecond below
    (START, NOW, datetime(2025, 11, 24, 16, tzinfo=UTC)),
    (END, END_TIME, END_TIME),  # ending at the arrival
    (END, END_TIME - timedelta(microseconds=1), END_TIME - timedelta(microseconds=1)),
    (END + 3600 * SECOND, END_TIME + timedelta(seconds=5),
     END_TIME + timedelta(seconds=5)),  # ending in the future: the arrival time
])
def test_the_time_is_the_end_or_the_arrival_if_earlier(end, now, time):
    result = found(span(CHAT, end=end), now=now)
    assert result.times == [time]
    assert result.events[0].response_time_ms == (end - START) / 1e6


def test_the_time_defaults_to_the_current_time_for_a_future_end():
    before = datetime.now(UTC)
    far = int((before + timedelta(days=1) - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())
    result = calls(request(span(CHAT, start=(far - 2) * SECOND, end=far * SECOND)),
                   business_keys=KEYS,
                   max_spans=10)
    (time,) = result.times
    assert before <= time <= datetime.now(UTC)


@pytest.mark.parametrize(("fields", "reason"), [
    ({"trace_id": TRACE[:15]}, "trace_id must be 16 bytes and span_id 8, not all zero"),
    ({"span_id": SPAN + b"\0"}, "trace_id must be 16 bytes and span_id 8, not all zero"),
    ({"trace_id": bytes(16)}, "trace_id must be 16 bytes and span_id 8, not all zero"),
    ({"start": 0}, "start_time_unix_nano must be set and end_time_unix_nano not before it"),
    ({"end": START - 1}, "start_time_unix_nano must be set and end_time_unix_nano not before it"),
])
def test_ids_and_times_that_cannot_be_stored(fields, reason):
    assert rejected(span(CHAT, **fields)) == f"span {fields.get('span_id', SPAN).hex()}: {reason}"


def test_a_span_without_a_span_id_is_named_by_a_question_mark():
    assert rejected(span(CHAT, span_id=b"")) == \
        "span ?: trace_id must be 16 bytes and span_id 8, not all zero"
    assert rejected(span(CHAT, span_id=bytes(8))) == \
        "span 0000000000000000: trace_id must be 16 bytes and span_id 8, not all zero"


# --- failures ---

@pytest.mark.parametrize(("status", "attrs", "success", "response_type"), [
    (Status.STATUS_CODE_UNSET, {}, 1.0, "chat"),
    (Status.STATUS_CODE_OK, {}, 1.0, "chat"),
    (Status.STATUS_CODE_ERROR, {}, 0.0, "error"),
    (Status.STATUS_CODE_OK, {"error.type": "timeout"}, 0.0, "error"),
    (Status.STATUS_CODE_UNSET, {"error.type": "429"}, 0.0, "error"),
    (Status.STATUS_CODE_UNSET, {"error.type": ""}, 1.0, "chat"),  # an empty text is none
    (Status.STATUS_CODE_UNSET, {"error.type": 500}, 1.0, "chat"),  # as is a number
])
def test_a_failed_call(status, attrs, success, response_type):
    mapped = event({**CHAT, **attrs}, status=Status(code=status, message=MARKER))
    assert (mapped["success_rate"], mapped["response_type"], mapped["intent_detected"]) == \
        (success, response_type, "chat")
    error = attrs.get("error.type")
    assert mapped.get("error.type") == (error if isinstance(error, str) and error else None)
    assert MARKER not in json.dumps(mapped)  # the status message is not kept


# --- rejections ---

@pytest.mark.parametrize(("attrs", "reason"), [
    ({"gen_ai.usage.input_tokens": -1}, "gen_ai.usage.input_tokens must be a whole number >= 0"),
    ({"gen_ai.usage.input_tokens": 2.5}, "gen_ai.usage.input_tokens must be a whole number >= 0"),
    ({"gen_ai.usage.input_tokens": math.inf},
     "gen_ai.usage.input_tokens must be a whole number >= 0"),
    ({"gen_ai.usage.input_tokens": True}, "gen_ai.usage.input_tokens must be a whole number >= 0"),
    ({"gen_ai.usage.input_tokens": " 5"}, "gen_ai.usage.input_tokens must be a whole number >= 0"),
    ({"gen_ai.usage.input_tokens": "-5"}, "gen_ai.usage.input_tokens must be a whole number >= 0"),
    ({"gen_ai.usage.input_tokens": "9223372036854775808"},
     "gen_ai.usage.input_tokens must be a whole number >= 0"),
    ({"gen_ai.usage.input_tokens": "0" * 19 + "5"},  # 20 digits: more than any int64 needs
     "gen_ai.usage.input_tokens must be a whole number >= 0"),
    ({"gen_ai.usage.input_tokens": "٣"}, "gen_ai.usage.input_tokens must be a whole number >= 0"),
    ({"gen_ai.usage.input_tokens": 2.0**63},
     "gen_ai.usage.input_tokens must be a whole number >= 0"),
    ({"gen_ai.usage.prompt_tokens": -1},
     "gen_ai.usage.prompt_tokens must be a whole number >= 0"),
    ({"gen_ai.usage.output_tokens": "x"}, "gen_ai.usage.output_tokens must be a whole number >= 0"),
    ({"llm.token_count.total": -3}, "llm.token_count.total must be a whole number >= 0"),
    ({"llm.token_count.prompt_details.cache_read": -1},
     "llm.token_count.prompt_details.cache_read must be a whole number >= 0"),
    # The winner of a role is checked, whatever the others hold.
    ({"gen_ai.usage.input_tokens": "x", "llm.token_count.prompt": 3},
     "gen_ai.usage.input_tokens must be a whole number >= 0"),
    ({"gen_ai.usage.cost": -0.01}, "gen_ai.usage.cost must be a number >= 0 (US dollars)"),
    ({"gen_ai.usage.cost": math.nan}, "gen_ai.usage.cost must be a number >= 0 (US dollars)"),
    ({"gen_ai.usage.cost": math.inf}, "gen_ai.usage.cost must be a number >= 0 (US dollars)"),
    ({"gen_ai.usage.cost": "0.5"}, "gen_ai.usage.cost must be a number >= 0 (US dollars)"),
    ({"gen_ai.usage.cost": False}, "gen_ai.usage.cost must be a number >= 0 (US dollars)"),
    ({"gen_ai.operation.name": "c" * 129},
     "gen_ai.operation.name must be at most 128 characters, without NUL"),
    ({"gen_ai.system": "open\x00ai"}, "gen_ai.system must be at most 128 characters, without NUL"),
    ({"error.type": "e" * 129}, "error.type must be at most 128 characters, without NUL"),
    # By the schema (MetricsEvent), naming the field.
    ({"gen_ai.response.model": "m" * 129},
     "model_name String should have at most 128 characters"),
    ({"gen_ai.usage.cost": 1e10}, "api_cost_usd Input should be less than or equal to 1000000000"),
    ({"session.id": "s" * 256}, "conversation_id String should have at most 255 characters; "
                                "session_id String should have at most 255 characters"),
])
def test_a_call_that_cannot_be_stored_is_rejected_with_the_reason(attrs, reason):
    pairs = {"openinference.span.kind": "LLM", **attrs}
    assert rejected(span(pairs)) == f"span eee19b7ec3c1b174: {reason}"


def test_extra_texts_may_be_128_characters():
    mapped = event({"openinference.span.kind": "LLM", "gen_ai.operation.name": "c" * 128,
                    "gen_ai.system": "p" * 128,
                    "error.type": "e" * 128}, resource={"service.name": "s" * 128})
    assert (mapped["gen_ai.operation.name"], mapped["gen_ai.provider.name"],
            mapped["error.type"], mapped["service.name"]) == \
        ("c" * 128, "p" * 128, "e" * 128, "s" * 128)
    assert mapped["intent_detected"] == "c" * 128


def test_a_service_name_too_long_for_an_extra_is_left_out_not_a_rejection():
    mapped = event({**CHAT, "tenant.id": "t"}, resource={"service.name": "s" * 129})
    assert mapped["business_id"] == "t" and "service.name" not in mapped
    # As the business itself, service.name is bounded by business_id's own limit.
    assert event(CHAT, resource={"service.name": "s" * 200})["business_id"] == "s" * 200


def test_one_rejected_span_leaves_the_others_and_their_times():
    good = [span(CHAT, span_id=bytes([1] * 8), end=END),
            span(CHAT, span_id=bytes([3] * 8), end=END + SECOND)]
    bad_schema = span({**CHAT, "gen_ai.request.model": "m" * 129}, span_id=bytes([2] * 8))
    bad_count = span({**CHAT, "gen_ai.usage.input_tokens": -1}, span_id=bytes([4] * 8))
    result = found(good[0], bad_schema, bad_count, good[1])
    assert [e.event_id[-2:] for e in result.events] == ["01", "03"]
    assert result.times == [END_TIME, END_TIME + timedelta(seconds=1)]
    assert result.rejections.count == 2
    assert result.rejections.first_error == \
        "span 0404040404040404: gen_ai.usage.input_tokens must be a whole number >= 0"
    assert result.rejections.error_message() == (
        "span 0404040404040404: gen_ai.usage.input_tokens must be a whole number >= 0 "
        "(and 1 more refused; this is the first)")


def test_spans_past_max_spans_are_rejected_unread_counting_every_span():
    spans = [span(CHAT, span_id=bytes([i + 1] * 8)) for i in range(3)]
    http = span({"http.route": "/x"})
    bad = span({**CHAT, "gen_ai.usage.input_tokens": -1}, span_id=bytes([9] * 8))
    built = request(http, spans[0], spans[1])
    built.resource_spans.add().scope_spans.add().spans.extend([spans[2], bad])
    built.resource_spans[1].resource.attributes.extend(attributes({"service.name": "svc"}))
    result = calls(built, business_keys=KEYS, max_spans=2, now=NOW)
    assert [e.event_id[-2:] for e in result.events] == ["01"]
    assert (result.not_llm, result.rejections.count) == (1, 3)  # bad is never read
    assert result.rejections.first_error == (
        "at most 2 spans per request (OTLP_MAX_SPANS); send smaller batches "
        "(OTEL_BSP_MAX_EXPORT_BATCH_SIZE)")
    everything = calls(built, business_keys=KEYS, max_spans=5, now=NOW)
    assert (len(everything.events), everything.not_llm, everything.rejections.count) == (3, 1, 1)


def test_resources_each_name_their_own_spans_business():
    built = request(span(CHAT, span_id=bytes([1] * 8)), resource={"service.name": "one"})
    second = built.resource_spans.add()
    second.resource.attributes.extend(attributes({"tenant.id": "two"}))
    second.scope_spans.add().spans.append(span(CHAT, span_id=bytes([2] * 8)))
    second.scope_spans.add().spans.append(span(CHAT, span_id=bytes([3] * 8)))
    result = calls(built, business_keys=KEYS, max_spans=10, now=NOW)
    assert [(e.business_id, e.event_id[-2:]) for e in result.events] == \
        [("one", "01"), ("two", "02"), ("two", "03")]


def test_an_empty_request_has_no_calls():
    result = calls(ExportTraceServiceRequest(), business_keys=KEYS, max_spans=1, now=NOW)
    assert (result.events, result.times, result.not_llm, result.rejections.count) == \
        ([], [], 0, 0)


# --- content is never copied ---

CONTENT = {
    "gen_ai.prompt.0.content": MARKER, "gen_ai.completion.0.content": MARKER,
    "gen_ai.input.messages": json.dumps([{"role": "user", "content": MARKER}]),
    "gen_ai.output.messages": [MARKER], "gen_ai.system_instructions": MARKER,
    "llm.input_messages.0.message.content": MARKER, "input.value": MARKER,
    "output.value": MARKER, "gen_ai.request.temperature": 0.2, "user.email": MARKER,
    "gen_ai.tool.definitions": {"name": MARKER}, "gen_ai.usage.raw": MARKER.encode(),
}


def test_only_the_mapped_attributes_are_copied():
    made = span({**CHAT, "gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 1,
                 **CONTENT}, name=f"chat {MARKER}")
    made.events.add(name="gen_ai.content.prompt", time_unix_nano=END).attributes.extend(
        attributes({"gen_ai.prompt": MARKER}))
    made.links.add(trace_id=TRACE, span_id=SPAN).attributes.extend(
        attributes({"note": MARKER}))
    result = found(made, resource={"service.name": "svc", "process.command_line": MARKER,
                                   "host.name": MARKER})
    (one,) = result.events
    dumped = one.model_dump()
    assert MARKER not in json.dumps(dumped)
    assert {k for k in dumped if "." in k} == {"gen_ai.operation.name", "service.name"}
    assert one.model_extra == {"gen_ai.operation.name": "chat", "service.name": "svc"}
