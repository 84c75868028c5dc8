"""Hostile input is harmless: property tests of the validator, and schemathesis.

Every malformed body must get a clean 4xx JSON error, store nothing, and
never show a stack trace; schemathesis drives the real server from its own
OpenAPI document and checks for 5xx and responses outside the document.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from xml.etree import ElementTree

import pytest
import requests
from conftest import query
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from payloads import REQUIRED, SUCCESS

from mlops import store
from mlops.schemas import InvalidRequest, parse_batch, parse_event

json_scalars = (st.none() | st.booleans() | st.integers() | st.text()
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=20)
PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def count(pg) -> int:
    return query(pg, "SELECT count(*) FROM mlops_events")[0][0]


def assert_clean(response, pg, before: int) -> None:
    """2xx and one more row, or a 4xx JSON error and no new row; never a trace."""
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text
    if response.status_code in (201, 202):
        assert count(pg) == before + 1
        return
    assert 400 <= response.status_code < 500, (response.status_code, text[:300])
    body = response.get_json()
    assert body["status"] == "error" and body["message"]
    assert count(pg) == before


@PROPERTY
@given(field=st.sampled_from(REQUIRED + ["prompt_tokens", "appointment_booked", "event_id"]),
       value=json_values)
def test_any_value_in_any_field_is_stored_or_refused_cleanly(client, pg, field, value):
    before = count(pg)
    response = client.post("/track", json={**SUCCESS, field: value})
    assert_clean(response, pg, before)
    if response.status_code == 422:
        assert field in [e["field"] for e in response.get_json()["errors"]]


@PROPERTY
@given(extra=st.dictionaries(st.text(max_size=20), json_values, min_size=1, max_size=5))
def test_unknown_fields_of_any_shape_are_kept_or_refused_cleanly(client, pg, extra):
    before = count(pg)
    assert_clean(client.post("/track", json={**extra, **SUCCESS}), pg, before)


@PROPERTY
@given(body=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_are_refused_cleanly(client, pg, body):
    before = count(pg)
    response = client.post("/track", data=body, content_type="application/json")
    assert_clean(response, pg, before)


@pytest.mark.parametrize("body", [
    b'{"a":' * 5000 + b"1" + b"}" * 5000,                       # deep JSON
    b"[" * 100_000 + b"]" * 100_000,                            # deeper, over the size cap
    json.dumps({**SUCCESS, "tokens_used": 10**400}).encode(),   # huge integer
    json.dumps({**SUCCESS, "response_time_ms": 1e308}).encode(),
    json.dumps(SUCCESS).replace("1432", "NaN").encode(),        # NaN literal
    json.dumps(SUCCESS).replace("1432", "Infinity").encode(),
    json.dumps(SUCCESS).replace("1432", "-Infinity").encode(),
    json.dumps({**SUCCESS, "model_name": "x" * 1_000_000}).encode(),  # 1 MB string
    json.dumps({**SUCCESS, "note": "y" * 1_000_000}).encode(),
    json.dumps({**SUCCESS, "session_id": None}).encode(),
    json.dumps({**SUCCESS, "business_id": "\ud800"}).encode(),  # lone surrogate
    b'{"business_id": "\\ud800"}',
    json.dumps({**SUCCESS, "extra": {"k\u0000": 1}}).encode(),
    json.dumps({**SUCCESS, "extra": [1e308, -(2**64)]}).encode(),
    json.dumps({**SUCCESS, **{f"f{i}": i for i in range(100)}}).encode(),
    "{\"business_id\": \"\u00e9\U0001F600\"}".encode(),
])
def test_hostile_bodies_get_a_clean_4xx(client, pg, body):
    before = count(pg)
    response = client.post("/track", data=body, content_type="application/json")
    assert 400 <= response.status_code < 500
    assert_clean(response, pg, before)


def test_unicode_is_stored_intact(client, pg):
    payload = {**SUCCESS, "business_id": "café-😀-東京", "intent_detected": "ﾃｽﾄ"}
    body = client.post("/track", json=payload).get_json()
    assert query(pg, "SELECT business_id, intent_detected FROM mlops_events "
                     "WHERE event_id = %s", body["event_id"]) == [("café-😀-東京", "ﾃｽﾄ")]


SCHEMATHESIS_CHECKS = ("not_a_server_error,status_code_conformance,"
                       "content_type_conformance,response_schema_conformance")


def test_schemathesis_finds_no_5xx_and_no_undocumented_response(gunicorn, tmp_path):
    """``schemathesis run`` against the real server, driven by its own /openapi.json."""
    server = gunicorn(workers=2)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run",
         f"{server.url}/openapi.json", "--checks", SCHEMATHESIS_CHECKS,
         "--max-examples", "60", "--seed", "1", "--phases", "examples,coverage,fuzzing",
         "--report", "junit", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"})
    summary = result.stdout[-4000:]
    assert result.returncode == 0, summary
    # schemathesis exits 0 when it tested nothing, too: its report names each operation.
    (report,) = tmp_path.glob("*.xml")
    tested = {case.get("name") for case in ElementTree.parse(report).iter("testcase")}
    document = requests.get(f"{server.url}/openapi.json", timeout=5).json()
    assert tested == {f"{method.upper()} {path}" for path, item in document["paths"].items()
                      for method in item}, summary
    assert "Traceback" not in server.log()


@settings(max_examples=150, deadline=None)
@given(changes=st.lists(st.tuples(st.sampled_from(REQUIRED + ["prompt_tokens", "event_id",
                                                              "locale"]), json_values),
                        min_size=1, max_size=4))
def test_a_batch_judges_each_item_as_track_would(changes):
    """The batch's one-pass validation agrees, item by item, with /track's."""
    items = [{**SUCCESS, field: value} for field, value in changes]
    parsed = parse_batch(json.dumps(items).encode(), limit=1000)
    assert len(parsed) == len(items)
    for item, result in zip(items, parsed, strict=True):
        try:
            expected = parse_event(json.dumps(item).encode())
        except InvalidRequest:
            assert isinstance(result, InvalidRequest)
        else:
            assert result == expected


# Any text Postgres can hold (no NUL, no lone surrogates), weighted towards the
# characters COPY's text format escapes.
stored_text = st.text(st.sampled_from("\\\t\n\r\\N\u00e9") | st.characters(
    blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=20)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=stored_text)
def test_text_is_stored_exactly_by_both_insert_paths(client, pg, text):
    """A batch large enough for COPY (``store.COPY_THRESHOLD``) stores the same text as
    /track's function call: backslashes, tabs, newlines and ``\\N`` are not escapes."""
    def event(key: str) -> dict:
        return {**SUCCESS, "event_id": f"{key}-{uuid.uuid4()}", "session_id": text,
                "intent_detected": text, "note": text}

    single = client.post("/track", json=event("one"))
    assert single.status_code == 201, single.get_json()
    batch = client.post("/track/batch", json=[event("copy") for _ in range(store.COPY_THRESHOLD)])
    assert batch.get_json()["accepted"] == store.COPY_THRESHOLD, batch.get_json()
    ids = [single.get_json()["event_id"], *(r["event_id"] for r in batch.get_json()["results"])]
    rows = query(pg, "SELECT session_id, intent_detected, extra->>'note' FROM mlops_events "
                     "WHERE event_id = ANY(%s)", ids)
    assert rows == [(text, text, text)] * (1 + store.COPY_THRESHOLD)
