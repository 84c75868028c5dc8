"""/track, /track/batch, /refresh-metrics and /analytics against a real Postgres, in process."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from decimal import Decimal

import pytest
from conftest import metric_sum, metric_values, query
from payloads import FAILURE, REQUIRED, SUCCESS, money, varied


def metrics(client) -> dict:
    return metric_values(client.get("/metrics").get_data(as_text=True))


def test_contract_samples_are_stored_field_for_field(client, pg):
    for payload in (SUCCESS, FAILURE):
        response = client.post("/track", json=payload)
        assert response.status_code == 201, response.get_json()
        body = response.get_json()
        assert body["status"] == "success" and body["storage"] == "stored"
        columns = list(payload)
        (row,) = query(pg, f"SELECT {', '.join(columns)} FROM mlops_events WHERE event_id = %s",
                       body["event_id"])
        stored = dict(zip(columns, row, strict=True))
        assert stored["api_cost_usd"] == money(payload["api_cost_usd"])
        for column in columns:
            if column != "api_cost_usd":
                assert stored[column] == payload[column], column
    assert query(pg, "SELECT count(*) FROM mlops_events") == [(2,)]
    (received,) = query(pg, "SELECT bool_and(received_at <= now()) FROM mlops_events")
    assert received == (True,)


def test_a_stream_agrees_in_postgres_analytics_and_metrics(client, pg):
    businesses = [str(uuid.uuid4()) for _ in range(3)]
    events = varied(150, businesses)
    before = metrics(client)
    for event in events:
        assert client.post("/track", json=event).status_code == 201
        assert client.post("/refresh-metrics", json={"trigger": "new_metrics"}).status_code == 200
    after = metrics(client)

    def delta(name, **labels):
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    for business in businesses:
        sent = [e for e in events if e["business_id"] == business]
        tokens = sum(e["tokens_used"] for e in sent)
        cost = sum(money(e["api_cost_usd"]) for e in sent)
        requested = sum(e["appointment_requested"] for e in sent)
        booked = sum(bool(e.get("appointment_booked")) for e in sent)
        handoffs = sum(e["human_handoff_requested"] for e in sent)

        (db_tokens, db_cost, db_count), = query(
            pg, "SELECT sum(tokens_used), sum(api_cost_usd), count(*) FROM mlops_events "
                "WHERE business_id = %s", business)
        assert (db_tokens, db_cost, db_count) == (tokens, cost, len(sent))

        m = client.get(f"/analytics/{business}").get_json()["metrics"]
        assert m["total_messages"] == len(sent)
        assert m["total_conversations"] == len({e["conversation_id"] for e in sent})
        assert m["total_tokens"] == tokens
        assert money(m["total_api_cost_usd"]) == cost
        assert m["appointment_requests"] == requested
        assert m["appointments_booked"] == booked
        assert m["human_handoffs"] == handoffs
        assert m["avg_response_time_ms"] == pytest.approx(
            sum(e["response_time_ms"] for e in sent) / len(sent))
        assert m["avg_tokens_used"] == pytest.approx(tokens / len(sent))
        assert m["appointment_conversion_rate"] == pytest.approx(booked / requested)
        assert m["success_rate"] == pytest.approx(
            sum(e["success_rate"] for e in sent) / len(sent))

        assert delta("ai_tokens_used_total", business_id=business) == tokens
        assert money(delta("ai_api_cost_usd_total", business_id=business)) == cost
        assert delta("ai_requests_total", business_id=business) == len(sent)
        assert delta("appointments_requested_total", business_id=business) == requested
        assert delta("appointments_booked_total", business_id=business) == booked
        assert delta("human_handoffs_total", business_id=business) == handoffs
        # Gauges read back from Postgres by /refresh-metrics.
        assert metric_sum(after, "mlops_business_messages_30d", business_id=business) == len(sent)
        assert metric_sum(after, "mlops_business_tokens_30d", business_id=business) == tokens

    by_model = defaultdict(int)
    for e in events:
        if e["business_id"] == businesses[0]:
            by_model[e["model_name"]] += e["tokens_used"]
    analytics = client.get(f"/analytics/{businesses[0]}?days=7").get_json()
    assert {m["model_name"]: m["tokens"] for m in analytics["by_model"]} == by_model
    assert sum(d["messages"] for d in analytics["daily"]) == analytics["metrics"]["total_messages"]
    assert analytics["period"] == "7_days"


def test_an_unknown_business_gets_zeros(client):
    response = client.get(f"/analytics/{uuid.uuid4()}")
    assert response.status_code == 200
    m = response.get_json()["metrics"]
    assert m["total_messages"] == 0 and m["total_api_cost_usd"] == 0
    assert m["appointment_conversion_rate"] == 0 and response.get_json()["daily"] == []


def test_unknown_fields_are_kept_not_rejected(client, pg):
    payload = {**SUCCESS, "locale": "de-DE", "ab_test": {"arm": "b", "weights": [1, 2]}}
    body = client.post("/track", json=payload).get_json()
    assert query(pg, "SELECT extra FROM mlops_events WHERE event_id = %s", body["event_id"]) == [
        ({"locale": "de-DE", "ab_test": {"arm": "b", "weights": [1, 2]}},)]


def test_a_repeated_event_id_is_stored_once(client, pg):
    payload = {**SUCCESS, "event_id": "evt-42", "business_id": str(uuid.uuid4())}
    before = metrics(client)
    assert client.post("/track", json=payload).status_code == 201
    assert client.post("/track", json=payload).status_code == 201
    assert query(pg, "SELECT count(*) FROM mlops_events WHERE event_id = 'evt-42'") == [(1,)]
    after = metrics(client)
    business = payload["business_id"]
    assert metric_sum(after, "ai_tokens_used_total", business_id=business) - metric_sum(
        before, "ai_tokens_used_total", business_id=business) == SUCCESS["tokens_used"]


@pytest.mark.parametrize("field", REQUIRED)
def test_each_required_field_is_required(client, pg, field):
    payload = {k: v for k, v in SUCCESS.items() if k != field}
    response = client.post("/track", json=payload)
    assert response.status_code == 422
    assert {"field": field, "problem": "is required"} in response.get_json()["errors"]
    assert query(pg, "SELECT count(*) FROM mlops_events") == [(0,)]


@pytest.mark.parametrize(("field", "value"), [
    ("tokens_used", "412"), ("tokens_used", 412.5), ("tokens_used", -1), ("tokens_used", True),
    ("tokens_used", 2**70),
    ("response_time_ms", "fast"), ("response_time_ms", -3), ("response_time_ms", None),
    ("success_rate", 1.5), ("success_rate", -0.1), ("success_rate", "1"),
    ("api_cost_usd", -0.01), ("api_cost_usd", "0.01"),
    ("appointment_requested", "yes"), ("appointment_requested", 1),
    ("business_id", 123), ("business_id", ""), ("business_id", "x" * 256),
    ("session_id", "a\u0000b"), ("model_name", ["gemini"]),
    ("user_message_length", -5), ("ai_response_length", 2**31),
    ("prompt_tokens", -2), ("appointment_booked", "no"), ("user_satisfaction", "great"),
])
def test_bad_values_are_refused_naming_the_field(client, pg, field, value):
    response = client.post("/track", json={**SUCCESS, field: value})
    assert response.status_code == 422, response.get_json()
    body = response.get_json()
    assert body["status"] == "error" and body["error"] == "validation_failed"
    assert [e["field"] for e in body["errors"]] == [field]
    assert query(pg, "SELECT count(*) FROM mlops_events") == [(0,)]


@pytest.mark.parametrize(("data", "content_type", "status", "field"), [
    (b"{not json", "application/json", 422, "body"),
    (b"", "application/json", 422, "body"),
    (b"[1, 2]", "application/json", 422, "body"),
    (b'{"business_id": NaN}', "application/json", 422, "business_id"),
    (json.dumps(SUCCESS).encode(), "text/plain", 415, None),
    (json.dumps(SUCCESS).encode(), None, 415, None),
    (json.dumps({**SUCCESS, "pad": "x" * 70_000}).encode(), "application/json", 413, None),
    (json.dumps({**SUCCESS, "bad": "\u0000"}).encode(), "application/json", 422, "bad"),
    (json.dumps({**SUCCESS, "big": 10**30}).encode(), "application/json", 422, "big"),
])
def test_malformed_requests_get_a_json_4xx_and_store_nothing(client, pg, data, content_type,
                                                              status, field):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/track", data=data, headers=headers)
    assert response.status_code == status
    body = response.get_json()
    assert body["status"] == "error" and body["message"]
    if field:
        assert field in [e["field"] for e in body["errors"]]
    assert "Traceback" not in response.get_data(as_text=True)
    assert query(pg, "SELECT count(*) FROM mlops_events") == [(0,)]


@pytest.mark.parametrize("days", ["0", "-1", "abc", "1.5", "99999"])
def test_analytics_refuses_a_bad_window(client, days):
    response = client.get(f"/analytics/acme?days={days}")
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "days"


def test_batch_stores_the_valid_items_and_reports_each(client, pg):
    good = [{**SUCCESS, "event_id": f"b-{i}"} for i in range(3)]
    items = [good[0], {**SUCCESS, "tokens_used": -1}, good[1], "junk", good[2]]
    response = client.post("/track/batch", json=items)
    assert response.status_code == 207
    body = response.get_json()
    assert [r["status"] for r in body["results"]] == [201, 422, 201, 422, 201]
    assert body["results"][1]["error"][0]["field"] == "1.tokens_used"
    assert (body["accepted"], body["rejected"], body["status"]) == (3, 2, "partial")
    assert query(pg, "SELECT event_id FROM mlops_events ORDER BY event_id") == [
        ("b-0",), ("b-1",), ("b-2",)]


@pytest.mark.parametrize("body", [b"{}", b"[]", b"not json"])
def test_batch_refuses_a_body_that_is_not_a_list_of_events(client, body):
    response = client.post("/track/batch", data=body, content_type="application/json")
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "body"


def test_refresh_metrics_accepts_the_apps_trigger_and_rejects_junk(client):
    assert client.post("/refresh-metrics", json={"trigger": "new_metrics"}).status_code == 200
    assert client.post("/refresh-metrics").status_code == 200
    response = client.post("/refresh-metrics", json={"trigger": 5})
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "trigger"


PROTECTED = [("post", "/track", SUCCESS), ("get", "/analytics/acme", None),
             ("post", "/track/batch", [SUCCESS])]


@pytest.mark.parametrize(("method", "path", "payload"), PROTECTED)
def test_an_api_key_guards_writes_and_analytics(make_app, method, path, payload):
    client = make_app(MLOPS_API_KEY="s3cret-key-of-16-chars").test_client()
    call = getattr(client, method)
    kwargs = {"json": payload} if payload is not None else {}
    assert call(path, **kwargs).status_code == 401
    assert call(path, headers={"X-API-Key": "wrong"}, **kwargs).status_code == 403
    assert call(path, headers={"X-API-Key": "s3cret-key-of-16-chars"},
                **kwargs).status_code in (200, 201, 207)
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 401  # keys set: /metrics needs one too
    assert client.get("/metrics", headers={"X-API-Key": "s3cret-key-of-16-chars"}
                      ).status_code == 200


def test_without_a_key_everything_is_open(client):
    assert client.post("/track", json=SUCCESS).status_code == 201
    assert client.get("/analytics/acme").status_code == 200


def test_the_key_can_come_from_a_file(make_app, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file-key-0000042\n")
    client = make_app(MLOPS_API_KEY_FILE=key_file).test_client()
    assert client.post("/track", json=SUCCESS).status_code == 401
    assert client.post("/track", json=SUCCESS,
                       headers={"X-API-Key": "from-file-key-0000042"}).status_code == 201


def test_costs_add_up_to_the_cent(client, pg):
    business = str(uuid.uuid4())
    costs = ["0.000077", "0.001234", "0.5", "0.000001", "12.345678"]
    for cost in costs:
        client.post("/track", json={**SUCCESS, "business_id": business,
                                    "api_cost_usd": float(cost)})
    total = sum(Decimal(c) for c in costs)
    assert query(pg, "SELECT sum(api_cost_usd) FROM mlops_events WHERE business_id = %s",
                 business) == [(total,)]
    assert money(client.get(f"/analytics/{business}").get_json()["metrics"][
        "total_api_cost_usd"]) == total


