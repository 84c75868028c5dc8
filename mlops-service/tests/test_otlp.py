"""OTLP/HTTP ingestion (/v1/traces, /v1/metrics, /v1/logs) with real OpenTelemetry clients.

The official Python SDK's OTLP/HTTP exporter and the ``openai`` SDK,
instrumented by ``opentelemetry-instrumentation-openai-v2`` and calling a
local OpenAI-compatible server (tests/openai_stub.py), send to real gunicorn
on the test Postgres; the wire cases (gzip, 400, 413, 415, partial success,
429) go through Flask's test client on the same database.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from conftest import metric_sum, metric_values, query
from google.rpc.status_pb2 import Status
from openai_stub import OpenAIStub
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
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
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from support import wait_drained

from mlops.auth import FORBIDDEN_MESSAGE
from mlops.config import ConfigError, Settings

KEY = "otlp-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROTOBUF = "application/x-protobuf"
# Prompt and reply text put in every place instrumentations put it; it must
# never be found in the database, the spool or the logs.
MARKER = "PROMPT-MARKER-7f3a9c"
CONTENT_ATTRIBUTES = {
    "gen_ai.prompt.0.content": MARKER, "gen_ai.completion.0.content": MARKER,
    "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"content": MARKER}]}]),
    "gen_ai.output.messages": json.dumps([{"role": "assistant", "content": MARKER}]),
    "gen_ai.system_instructions": MARKER,
    "llm.input_messages.0.message.content": MARKER, "input.value": MARKER,
    "output.value": MARKER,
}
SECOND = 1_000_000_000  # nanoseconds


def provider(business: str | None = "biz-otlp", service: str = "chat-app"):
    """A TracerProvider whose finished spans are kept in memory."""
    attributes = {"service.name": service}
    if business:
        attributes["mlops.business_id"] = business
    tracer_provider = TracerProvider(resource=Resource.create(attributes))
    memory = InMemorySpanExporter()
    tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
    return tracer_provider, memory


def llm_span(tracer, start: int, duration_ms: int, input_tokens: int, output_tokens: int,
             model: str = "gpt-4o-mini", **attributes):
    """One chat call span, ending ``duration_ms`` after ``start`` (ns)."""
    span = tracer.start_span(f"chat {model}", kind=SpanKind.CLIENT, start_time=start, attributes={
        "gen_ai.operation.name": "chat", "gen_ai.system": "openai",
        "gen_ai.request.model": model, "gen_ai.response.model": model,
        "gen_ai.usage.input_tokens": input_tokens, "gen_ai.usage.output_tokens": output_tokens,
        **attributes})
    span.add_event("gen_ai.content.prompt", {"gen_ai.prompt": MARKER})
    span.end(end_time=start + duration_ms * 1_000_000)
    return span


def exporter(url: str, **kwargs) -> OTLPSpanExporter:
    return OTLPSpanExporter(endpoint=f"{url}/v1/traces", headers=AUTH, timeout=10, **kwargs)


def events(pg) -> dict[str, dict]:
    """Every stored event by event_id, as a dict of its columns."""
    rows = query(pg, "SELECT row_to_json(e) FROM mlops_events e ORDER BY event_id")
    return {row[0]["event_id"]: row[0] for row in rows}


def event_id(span) -> str:
    context = span.get_span_context()
    return f"otlp-{context.trace_id:032x}-{context.span_id:016x}"


def server_metrics(url: str) -> dict:
    return metric_values(requests.get(f"{url}/metrics", headers=AUTH, timeout=5).text)


def test_the_sdk_exporter_stores_each_llm_call_once(gunicorn, pg):
    server = gunicorn(workers=2, MLOPS_API_KEY=KEY)
    tracer_provider, memory = provider()
    tracer = tracer_provider.get_tracer("test")
    start = time.time_ns() - 60 * SECOND
    calls = [llm_span(tracer, start, 1234, 120, 30),
             llm_span(tracer, start + SECOND, 250, 7, 0, model="gpt-4o",
                      **{"gen_ai.usage.cache_read.input_tokens": 4}),
             llm_span(tracer, start + 2 * SECOND, 3000, 50, 0, **{"error.type": "timeout"})]
    http = tracer.start_span("GET /chat", kind=SpanKind.SERVER, start_time=start)
    http.end(end_time=start + 5 * SECOND)
    agent = tracer.start_span("invoke_agent helper", start_time=start, attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.usage.input_tokens": 177})
    agent.end(end_time=start + 5 * SECOND)
    spans = memory.get_finished_spans()
    assert len(spans) == 5

    assert exporter(server.url).export(spans) == SpanExportResult.SUCCESS
    assert exporter(server.url).export(spans) == SpanExportResult.SUCCESS  # a retry: stored once

    stored = events(pg)
    assert sorted(stored) == sorted(event_id(s) for s in calls)
    first, second, failed = (stored[event_id(s)] for s in calls)
    assert first["business_id"] == "biz-otlp"
    assert first["model_name"] == "gpt-4o-mini"
    assert first["response_time_ms"] == 1234.0
    assert (first["tokens_used"], first["prompt_tokens"], first["completion_tokens"]) == \
        (150, 120, 30)
    assert datetime.fromisoformat(first["received_at"]) == datetime(1970, 1, 1, tzinfo=UTC) \
        + timedelta(microseconds=(start + 1234 * 1_000_000) // 1000)
    assert first["session_id"] == f"{calls[0].get_span_context().trace_id:032x}"
    assert (first["success_rate"], first["response_type"], first["intent_detected"]) == \
        (1.0, "chat", "chat")
    assert first["extra"] == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                              "service.name": "chat-app"}
    assert second["extra"]["gen_ai.usage.cache_read.input_tokens"] == 4
    assert (failed["success_rate"], failed["response_type"]) == (0.0, "error")
    assert failed["extra"]["error.type"] == "timeout"

    values = server_metrics(server.url)
    assert metric_sum(values, "mlops_otlp_spans_total", outcome="accepted") == 6
    assert metric_sum(values, "mlops_otlp_spans_total", outcome="not_llm") == 4
    assert metric_sum(values, "mlops_otlp_spans_total", outcome="rejected") == 0
    assert metric_sum(values, "ai_requests_total", business_id="biz-otlp") == 3
    assert metric_sum(values, "ai_tokens_used_total", business_id="biz-otlp") == 150 + 7 + 50


def test_a_gzip_export_is_stored(gunicorn, pg):
    server = gunicorn(workers=1, MLOPS_API_KEY=KEY)
    tracer_provider, memory = provider(business="biz-gzip")
    llm_span(tracer_provider.get_tracer("test"), time.time_ns() - SECOND, 80, 3, 4)
    spans = memory.get_finished_spans()
    result = exporter(server.url, compression=Compression.Gzip).export(spans)
    assert result == SpanExportResult.SUCCESS
    assert [e["business_id"] for e in events(pg).values()] == ["biz-gzip"]


def json_span(trace_id: str, span_id: str, end_ns: int, **attributes) -> dict:
    """An OTLP/JSON span: hex ids, int64 as strings, the status code as an integer."""
    def value(v):
        return {"intValue": str(v)} if isinstance(v, int) else {"stringValue": v}

    return {"traceId": trace_id, "spanId": span_id, "name": "chat", "kind": 3,
            "startTimeUnixNano": str(end_ns - 420_000_000), "endTimeUnixNano": str(end_ns),
            "attributes": [{"key": k, "value": value(v)} for k, v in attributes.items()],
            "status": {"code": 1}}


def test_an_otlp_json_export_is_stored_and_answered_in_json(gunicorn, pg):
    server = gunicorn(workers=1, MLOPS_API_KEY=KEY)
    end = time.time_ns() - SECOND
    body = {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "js-app"}},
                                    {"key": "tenant.id", "value": {"stringValue": "biz-json"}}]},
        "scopeSpans": [{"scope": {"name": "x"}, "spans": [
            json_span("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174", end,
                      **{"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                         "gen_ai.request.model": "claude-sonnet-4", "gen_ai.usage.input_tokens": 9,
                         "gen_ai.usage.output_tokens": 11, "gen_ai.conversation.id": "conv-7"}
                      ) | {"aFieldOfALaterOtlp": {"x": 1}},  # unknown fields are ignored
            json_span("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b175", end,
                      **{"openinference.span.kind": "LLM", "llm.model_name": "llama-3",
                         "llm.token_count.prompt": 5, "llm.token_count.completion": 6,
                         "session.id": "sess-2", "mlops.business_id": "biz-json-2"}),
        ]}]}]}
    response = requests.post(f"{server.url}/v1/traces", json=body, headers={"X-API-Key": KEY},
                             timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {}
    stored = events(pg)
    claude = stored["otlp-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174"]
    assert (claude["business_id"], claude["model_name"], claude["tokens_used"]) == \
        ("biz-json", "claude-sonnet-4", 20)
    assert (claude["conversation_id"], claude["session_id"]) == ("conv-7", "conv-7")
    assert claude["response_time_ms"] == 420.0
    assert claude["extra"]["gen_ai.provider.name"] == "anthropic"
    llama = stored["otlp-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b175"]
    assert (llama["business_id"], llama["model_name"], llama["prompt_tokens"],
            llama["completion_tokens"], llama["session_id"]) == \
        ("biz-json-2", "llama-3", 5, 6, "sess-2")


@pytest.fixture
def instrumented_openai():
    """The openai SDK instrumented by opentelemetry-instrumentation-openai-v2, and the stub."""
    from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

    stub = OpenAIStub(delay_seconds=0.05)
    instrumentor = OpenAIInstrumentor()
    yield stub, instrumentor
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    stub.close()


def test_openai_calls_land_in_analytics_and_metrics_exactly(gunicorn, instrumented_openai):
    import openai

    stub, instrumentor = instrumented_openai
    server = gunicorn(workers=2, MLOPS_API_KEY=KEY)
    tracer_provider, memory = provider(business="biz-openai", service="support-bot")
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter(server.url)))
    instrumentor.instrument(tracer_provider=tracer_provider)
    client = openai.OpenAI(base_url=stub.url, api_key="sk-local-stub", max_retries=0)
    asks = [("Hello", 3), ("What are your opening hours?", 12), ("Book me in", 7),
            ("Thanks", 1)]
    for text, max_tokens in asks:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=max_tokens,
            messages=[{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": text}])
        assert reply.usage.completion_tokens == max_tokens
    assert tracer_provider.force_flush(10_000)
    instrumentor.uninstrument()
    tracer_provider.shutdown()  # as an app stopping does: the exporter closes its session

    spans = memory.get_finished_spans()
    assert len(spans) == len(asks)
    prompt = sum(len("Be brief.") + len(text) for text, _ in asks)
    completion = sum(n for _, n in asks)
    assert sum(s.attributes["gen_ai.usage.input_tokens"] for s in spans) == prompt
    durations_ms = [(s.end_time - s.start_time) / 1e6 for s in spans]
    assert min(durations_ms) >= 50

    analytics = requests.get(f"{server.url}/analytics/biz-openai", headers=AUTH,
                             timeout=5).json()
    totals = analytics["metrics"]
    assert totals["total_messages"] == len(asks)
    assert totals["total_tokens"] == prompt + completion
    assert totals["success_rate"] == 1.0
    assert totals["avg_response_time_ms"] == pytest.approx(sum(durations_ms) / len(asks),
                                                           rel=1e-9)
    ordered, rank = sorted(durations_ms), 0.95 * (len(asks) - 1)  # percentile_cont(0.95)
    low = int(rank)
    p95 = ordered[low] + (rank - low) * (ordered[min(low + 1, len(asks) - 1)] - ordered[low])
    assert totals["p95_response_time_ms"] == pytest.approx(p95, rel=0.049)
    assert [m["model_name"] for m in analytics["by_model"]] == ["gpt-4o-mini"]
    assert analytics["by_intent"] == [{"intent_detected": "chat", "messages": len(asks)}]

    values = server_metrics(server.url)
    assert metric_sum(values, "ai_requests_total", business_id="biz-openai",
                      response_type="chat") == len(asks)
    assert metric_sum(values, "ai_tokens_used_total", business_id="biz-openai",
                      model_name="gpt-4o-mini") == prompt + completion
    model = {"gen_ai_request_model": "gpt-4o-mini"}
    assert metric_sum(values, "gen_ai_client_token_usage_sum", gen_ai_token_type="input",
                      **model) == prompt
    assert metric_sum(values, "gen_ai_client_token_usage_sum", gen_ai_token_type="output",
                      **model) == completion
    assert metric_sum(values, "gen_ai_client_operation_duration_seconds_count",
                      **model) == len(asks)
    assert metric_sum(values, "gen_ai_client_operation_duration_seconds_sum", **model) == \
        pytest.approx(sum(durations_ms) / 1000, rel=1e-9)


def files_holding(folder: Path, text: str) -> list[str]:
    """The files under ``folder`` whose bytes contain ``text``."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_an_outage_spools_spans_delivers_them_once_and_keeps_no_content(
        gunicorn, pg, database_url, tmp_path, proxy):
    address = urlsplit(database_url)
    server = gunicorn(workers=2, MLOPS_API_KEY=KEY, LOG_LEVEL="DEBUG",
                      DATABASE_URL=proxy.url(address.path.lstrip("/")),
                      wait_for="/health/ready")
    tracer_provider, memory = provider(business="biz-outage")
    tracer = tracer_provider.get_tracer("test")
    start = time.time_ns() - 10 * SECOND
    for i in range(20):
        llm_span(tracer, start + i * 1000, 100 + i, 10, i, **CONTENT_ATTRIBUTES)
    spans = memory.get_finished_spans()

    proxy.refuse()
    assert exporter(server.url).export(spans) == SpanExportResult.SUCCESS
    detailed = requests.get(f"{server.url}/health/detailed", headers=AUTH, timeout=5).json()
    assert detailed["spool"]["depth"] == 20
    assert files_holding(tmp_path / "spool", "biz-outage")  # the spool does hold the calls
    assert files_holding(tmp_path / "spool", MARKER) == []
    assert exporter(server.url).export(spans) == SpanExportResult.SUCCESS  # spooled again

    proxy.resume()
    wait_drained(server.url, headers=AUTH)
    assert sorted(events(pg)) == sorted(event_id(s) for s in spans)
    assert query(pg, "SELECT count(*) FROM mlops_events") == [(20,)]
    assert query(pg, "SELECT count(*) FROM mlops_events WHERE row_to_json(mlops_events)::text"
                 " LIKE %s", f"%{MARKER}%") == [(0,)]
    assert files_holding(tmp_path / "logs", "/v1/traces")  # the requests were logged
    assert files_holding(tmp_path / "logs", MARKER) == []


# --- the wire, through Flask's test client ---


def kv(key: str, value) -> KeyValue:
    if isinstance(value, str):
        return KeyValue(key=key, value=AnyValue(string_value=value))
    return KeyValue(key=key, value=AnyValue(int_value=value))


def export_request(*spans_attributes: dict, resource: dict | None = None):
    """An ExportTraceServiceRequest of one span per attributes dict, 1.5 s each."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    for key, value in (resource if resource is not None else {"service.name": "svc-wire"}).items():
        resource_spans.resource.attributes.append(kv(key, value))
    scope = resource_spans.scope_spans.add()
    end = time.time_ns() - SECOND
    for attributes in spans_attributes:
        span = scope.spans.add(trace_id=os.urandom(16), span_id=os.urandom(8), name="chat",
                               start_time_unix_nano=end - 3 * SECOND // 2,
                               end_time_unix_nano=end)
        span.attributes.extend(kv(k, v) for k, v in attributes.items())
    return request


CHAT = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m",
        "gen_ai.usage.input_tokens": 2, "gen_ai.usage.output_tokens": 3}


def post(client, body: bytes, content_type: str = PROTOBUF, **headers):
    return client.post("/v1/traces", data=body, content_type=content_type, headers=headers)


def status_of(response) -> Status:
    assert response.content_type == PROTOBUF
    status = Status()
    status.ParseFromString(response.data)
    return status


def test_spans_that_cannot_be_stored_are_reported_in_partial_success(make_app, pg):
    client = make_app(OTLP_MAX_SPANS=4).test_client()
    request = export_request(CHAT, {**CHAT, "gen_ai.usage.input_tokens": "many"},
                             {"http.route": "/x"}, CHAT, CHAT, CHAT)
    response = post(client, request.SerializeToString())
    assert response.status_code == 200
    answer = ExportTraceServiceResponse.FromString(response.data)
    assert answer.partial_success.rejected_spans == 3  # a bad count, two past OTLP_MAX_SPANS
    assert "gen_ai.usage.input_tokens must be a whole number" in \
        answer.partial_success.error_message
    assert query(pg, "SELECT count(*) FROM mlops_events") == [(2,)]

    too_long = export_request(CHAT, {**CHAT, "gen_ai.request.model": "m" * 129})
    answer = ExportTraceServiceResponse.FromString(post(client, too_long.SerializeToString()).data)
    assert answer.partial_success.rejected_spans == 1  # by the schema, the other one kept
    assert "model_name String should have at most 128 characters" in \
        answer.partial_success.error_message
    nul = export_request(CHAT, {**CHAT, "gen_ai.provider.name": "open\x00ai"})
    answer = ExportTraceServiceResponse.FromString(post(client, nul.SerializeToString()).data)
    assert answer.partial_success.rejected_spans == 1
    assert "gen_ai.provider.name must be at most 128 characters, without NUL" in \
        answer.partial_success.error_message
    assert query(pg, "SELECT count(*) FROM mlops_events") == [(4,)]

    unowned = export_request(CHAT, resource={})
    answer = ExportTraceServiceResponse.FromString(post(client, unowned.SerializeToString()).data)
    assert answer.partial_success.rejected_spans == 1
    assert "no business: set one of mlops.business_id, tenant.id or service.name" in \
        answer.partial_success.error_message
    values = metric_values(client.get("/metrics").get_data(as_text=True))
    assert metric_sum(values, "mlops_otlp_spans_total", outcome="rejected") >= 6


def test_an_event_id_held_by_another_business_rejects_the_span(make_app, pg):
    client = make_app().test_client()
    request = export_request(CHAT)
    assert post(client, request.SerializeToString()).data == b""
    request.resource_spans[0].resource.attributes[0].value.string_value = "another"
    answer = ExportTraceServiceResponse.FromString(post(client,
                                                        request.SerializeToString()).data)
    assert answer.partial_success.rejected_spans == 1
    assert "already stored for another business" in answer.partial_success.error_message
    assert query(pg, "SELECT business_id FROM mlops_events") == [("svc-wire",)]


def test_an_undecodable_body_is_a_400_status_in_the_request_encoding(make_app):
    client = make_app().test_client()
    response = post(client, b"\x0a\xff\xff\xff\x0f")
    assert response.status_code == 400
    assert "not a valid protobuf ExportTraceServiceRequest" in status_of(response).message
    for body in (b"{", b'{"resourceSpans": 3}',
                 b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}'):
        response = post(client, body, "application/json")
        assert response.status_code == 400, body
        assert response.content_type == "application/json"
        assert "not a valid OTLP/JSON" in response.get_json()["message"]
    response = post(client, b"\x1f\x8b\x08\x00garbage", **{"Content-Encoding": "gzip"})
    assert response.status_code == 400
    truncated = gzip.compress(export_request(CHAT).SerializeToString())[:-9]
    assert post(client, truncated, **{"Content-Encoding": "gzip"}).status_code == 400


def test_a_body_past_the_limit_sent_or_inflated_is_a_413(make_app, pg):
    client = make_app(OTLP_MAX_BODY_BYTES=1024).test_client()
    big = export_request(*[CHAT] * 20).SerializeToString()
    assert len(big) > 1024
    response = post(client, big)  # refused on its Content-Length, before a byte is read
    assert response.status_code == 413
    assert "exceeds the capacity limit" in status_of(response).message
    bomb = gzip.compress(big)
    assert len(bomb) < 1024
    response = post(client, bomb, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert "inflate to at most 1024 bytes" in status_of(response).message
    small = gzip.compress(export_request(CHAT).SerializeToString())
    assert post(client, small, **{"Content-Encoding": "gzip"}).status_code == 200
    assert query(pg, "SELECT count(*) FROM mlops_events") == [(1,)]


def test_another_media_type_or_coding_is_a_415(make_app):
    client = make_app().test_client()
    body = export_request(CHAT).SerializeToString()
    response = post(client, body, "application/octet-stream")
    assert response.status_code == 415
    assert "application/x-protobuf or application/json" in response.get_json()["message"]
    response = post(client, body, **{"Content-Encoding": "br"})
    assert response.status_code == 415
    assert "Content-Encoding must be gzip" in status_of(response).message


def test_keys_as_bearer_and_refusals_as_status(make_app, pg):
    client = make_app(MLOPS_API_KEY=KEY).test_client()
    body = export_request(CHAT).SerializeToString()
    response = post(client, body)
    assert response.status_code == 401
    assert status_of(response).message.startswith("missing")
    assert post(client, body, Authorization="Bearer not-the-key-0123456789").status_code == 403
    assert post(client, body, **AUTH).status_code == 200
    assert query(pg, "SELECT count(*) FROM mlops_events") == [(1,)]


def test_the_rate_limit_answers_429_with_retry_after(make_app):
    client = make_app(RATE_LIMIT_ENABLED="true", RATE_LIMIT_BATCH="1/minute").test_client()
    body = export_request(CHAT).SerializeToString()
    assert post(client, body).status_code == 200
    response = post(client, body)
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert "rate limit" in status_of(response).message


def test_metrics_and_logs_are_answered_as_not_stored(make_app, pg):
    client = make_app().test_client()
    metrics = ExportMetricsServiceRequest()
    scope = metrics.resource_metrics.add().scope_metrics.add()
    total = scope.metrics.add(name="gen_ai.client.token.usage")
    total.sum.data_points.add(as_int=3)
    total.sum.data_points.add(as_int=4)
    scope.metrics.add(name="queue").gauge.data_points.add(as_double=1.5)
    response = client.post("/v1/metrics", data=metrics.SerializeToString(),
                           content_type=PROTOBUF)
    assert response.status_code == 200
    answer = ExportMetricsServiceResponse.FromString(response.data)
    assert answer.partial_success.rejected_data_points == 3
    assert "metrics are not stored" in answer.partial_success.error_message

    logs = ExportLogsServiceRequest()
    records = logs.resource_logs.add().scope_logs.add().log_records
    records.add(body=AnyValue(string_value=MARKER))
    records.add(body=AnyValue(string_value=MARKER))
    response = client.post("/v1/logs", data=logs.SerializeToString(), content_type=PROTOBUF)
    answer = ExportLogsServiceResponse.FromString(response.data)
    assert answer.partial_success.rejected_log_records == 2
    response = client.post("/v1/logs", json={"resourceLogs": []})
    assert (response.status_code, response.get_json()) == (200, {})
    assert query(pg, "SELECT count(*) FROM mlops_events") == [(0,)]
    values = metric_values(client.get("/metrics").get_data(as_text=True))
    assert metric_sum(values, "mlops_otlp_discarded_items_total", signal="metrics") >= 3
    assert metric_sum(values, "mlops_otlp_discarded_items_total", signal="logs") >= 2


def test_the_business_attributes_are_configurable_and_checked(make_app, pg, database_url):
    client = make_app(OTLP_BUSINESS_ATTRIBUTES="app.customer, tenant.id").test_client()
    request = export_request({**CHAT, "app.customer": "cust-9", "tenant.id": "not-first"},
                             {**CHAT, "tenant.id": "tenant-2"},
                             resource={"service.name": "svc", "app.customer": "cust-r"})
    assert post(client, request.SerializeToString()).data == b""
    assert sorted(query(pg, "SELECT business_id FROM mlops_events")) == [("cust-9",),
                                                                         ("tenant-2",)]
    with pytest.raises(ConfigError, match="OTLP_BUSINESS_ATTRIBUTES holds an empty"):
        Settings.from_env({"DATABASE_URL": database_url, "OTLP_BUSINESS_ATTRIBUTES": "a,,b"})


def test_a_span_ending_in_the_future_takes_the_arrival_time(make_app, pg):
    client = make_app().test_client()
    request = export_request(CHAT)
    span = request.resource_spans[0].scope_spans[0].spans[0]
    span.end_time_unix_nano = time.time_ns() + 3600 * SECOND
    span.start_time_unix_nano = span.end_time_unix_nano - 2 * SECOND
    before = datetime.now(UTC)
    assert post(client, request.SerializeToString()).data == b""
    ((received, elapsed),) = query(pg, "SELECT received_at, response_time_ms FROM mlops_events")
    assert before <= received <= datetime.now(UTC) and elapsed == 2000.0


def test_a_key_limited_to_businesses_has_other_businesses_spans_rejected(make_app, pg,
                                                                          tmp_path):
    """A keys-file key limited to one business: its spans are stored, the others'
    rejected in partial_success with the one refusal wording, and counted."""
    limited = "otlp-limited-key-5e6f7a8b9c"
    (tmp_path / "keys.toml").write_text(
        f'[[key]]\nkey = "{limited}"\nscopes = ["write"]\nbusinesses = ["biz-a"]\n')
    client = make_app(MLOPS_API_KEY=KEY, MLOPS_KEYS_FILE=tmp_path / "keys.toml").test_client()

    def refusals() -> float:  # counters are per process: compare before and after
        values = metric_values(client.get("/metrics", headers=AUTH).get_data(as_text=True))
        return metric_sum(values, "mlops_auth_failures_total", scope="write",
                          reason="business_not_allowed")

    before = refusals()
    request = export_request({**CHAT, "mlops.business_id": "biz-a"},
                             {**CHAT, "mlops.business_id": "biz-b"},
                             {**CHAT, "mlops.business_id": "biz-nowhere"})
    response = post(client, request.SerializeToString(), Authorization=f"Bearer {limited}")
    assert response.status_code == 200
    answer = ExportTraceServiceResponse.FromString(response.data)
    assert answer.partial_success.rejected_spans == 2
    assert FORBIDDEN_MESSAGE in answer.partial_success.error_message
    assert "biz-b" not in answer.partial_success.error_message
    assert query(pg, "SELECT business_id FROM mlops_events") == [("biz-a",)]
    assert refusals() - before == 2

    full = post(client, request.SerializeToString(), **AUTH)  # an unlimited key: all stored
    assert ExportTraceServiceResponse.FromString(full.data).partial_success.rejected_spans == 0
    assert query(pg, "SELECT count(*) FROM mlops_events") == [(3,)]
