"""mlops/schemas.py's contract, by plain calls: what an event may hold, and what a Record is.

Every bound of every field (the value at the bound accepted, the next one
refused naming the field), strictness (a JSON string is not a number, a
number is not a boolean), the fields beyond the contract and their limits,
the Next.js client's sample payloads accepted exactly
(shared/contract/nextjs-client.md, mirrored by tests/payloads.py), batches,
``/refresh-metrics``'s body, and :class:`mlops.schemas.Record`'s price. The
HTTP answers built on these (status codes, nothing stored) are test_track.py's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from payloads import FAILURE, REQUIRED, SUCCESS
from pydantic import ValidationError

from mlops import prices
from mlops.schemas import (
    INT32_MAX,
    INT64_MAX,
    MAX_EXTRA_FIELDS,
    InvalidRequest,
    MetricsEvent,
    Record,
    RefreshRequest,
    field_errors,
    parse_batch,
    parse_event,
)

# Every text field and its longest accepted length (in characters).
TEXT_BOUNDS = {
    "event_id": 128, "business_id": 255, "conversation_id": 255, "session_id": 255,
    "model_name": 128, "intent_detected": 128, "response_type": 128,
}
# Every numeric field: (type, lowest, highest accepted).
NUMBER_BOUNDS = {
    "response_time_ms": (float, 0.0, 1e10),
    "success_rate": (float, 0.0, 1.0),
    "user_satisfaction": (float, -1e9, 1e9),
    "api_cost_usd": (float, 0.0, 1e9),
    "tokens_used": (int, 0, INT64_MAX),
    "prompt_tokens": (int, 0, INT64_MAX),
    "completion_tokens": (int, 0, INT64_MAX),
    "user_message_length": (int, 0, INT32_MAX),
    "ai_response_length": (int, 0, INT32_MAX),
}
BOOLEANS = ("appointment_requested", "human_handoff_requested", "appointment_booked")
OPTIONAL = ("event_id", "conversation_id", "user_satisfaction", "prompt_tokens",
            "completion_tokens", "appointment_booked")
# The course's list price of gemini-1.5-flash, USD per million tokens (test_prices.py).
FLASH_INPUT, FLASH_OUTPUT = Decimal("0.075"), Decimal("0.30")


def problems(data, prefix=()) -> list[dict]:
    """The problems ``parse_event`` names for ``data``; fails the test if it accepts it."""
    with pytest.raises(InvalidRequest) as caught:
        parse_event(data, prefix)
    return caught.value.problems


def fields(data, prefix=()) -> list[str]:
    return [p["field"] for p in problems(data, prefix)]


@pytest.fixture
def bundled_prices():
    """The process prices with the bundled table during the test, and after it."""
    prices.configure(prices.Table())
    yield
    prices.configure(prices.Table())


# --- the client's payloads ----------------------------------------------------------

@pytest.mark.parametrize("payload", [SUCCESS, FAILURE], ids=["success", "failure"])
def test_the_clients_samples_are_accepted_value_for_value(payload):
    for data in (payload, json.dumps(payload).encode()):
        event = parse_event(data)
        assert {k: getattr(event, k) for k in payload} == payload
        assert {k: getattr(event, k) for k in OPTIONAL if k not in payload} == dict.fromkeys(
            (k for k in OPTIONAL if k not in payload), None)
        assert event.model_extra == {}


def test_the_json_schema_requires_the_contracts_fields_and_states_each_bound():
    """/openapi.json is generated from MetricsEvent: it states the bounds enforced here."""
    schema = MetricsEvent.model_json_schema()
    assert sorted(schema["required"]) == sorted(REQUIRED)
    assert schema["additionalProperties"] is True
    properties = schema["properties"]
    for name, longest in TEXT_BOUNDS.items():
        options = properties[name].get("anyOf", [properties[name]])
        (text,) = [o for o in options if o.get("type") == "string"]
        assert (text["minLength"], text["maxLength"]) == (1, longest), name
    for name, (_, lowest, highest) in NUMBER_BOUNDS.items():
        options = properties[name].get("anyOf", [properties[name]])
        (number,) = [o for o in options if o.get("type") in ("number", "integer")]
        assert (number["minimum"], number["maximum"]) == (lowest, highest), name


# --- bounds ----------------------------------------------------------------------

@pytest.mark.parametrize("field", TEXT_BOUNDS)
def test_text_is_accepted_up_to_its_bound_and_refused_past_it(field):
    longest = TEXT_BOUNDS[field]
    # Characters, not bytes: a 2-byte character counts once.
    assert getattr(parse_event({**SUCCESS, field: "é" * longest}), field) == "é" * longest
    assert problems({**SUCCESS, field: "é" * (longest + 1)}) == [
        {"field": field, "problem": f"String should have at most {longest} characters"}]
    assert problems({**SUCCESS, field: ""}) == [
        {"field": field, "problem": "String should have at least 1 character"}]
    assert problems({**SUCCESS, field: "a\x00b"}) == [
        {"field": field, "problem": "Value error, must not contain the NUL character (U+0000)"}]


@pytest.mark.parametrize("field", NUMBER_BOUNDS)
def test_numbers_are_accepted_at_their_bounds_and_refused_past_them(field):
    kind, lowest, highest = NUMBER_BOUNDS[field]
    for value in (lowest, highest):
        assert getattr(parse_event({**SUCCESS, field: value}), field) == value
    if kind is float:
        below, above = math.nextafter(lowest, -math.inf), math.nextafter(highest, math.inf)
    else:
        below, above = lowest - 1, highest + 1
    assert fields({**SUCCESS, field: below}) == [field]
    assert fields({**SUCCESS, field: above}) == [field]
    for value in (math.nan, math.inf, -math.inf):
        assert problems({**SUCCESS, field: value}) == [
            {"field": field, "problem": "Input should be a finite number" if kind is float
             else "Input should be a valid integer"}]


@pytest.mark.parametrize("field", NUMBER_BOUNDS)
def test_numbers_are_strict(field):
    """A string, a boolean or a list is never a number; a fraction is never a count."""
    kind = NUMBER_BOUNDS[field][0]
    for value in ("1", True, False, [1], {"n": 1}):
        assert fields({**SUCCESS, field: value}) == [field], value
    if kind is int:
        assert fields({**SUCCESS, field: 1.0}) == [field]
        assert fields({**SUCCESS, field: 0.5}) == [field]
    else:  # a JSON integer is a number (the client sends response_time_ms as one)
        event = parse_event({**SUCCESS, field: 1})
        assert getattr(event, field) == 1.0 and type(getattr(event, field)) is float


def test_json_text_that_is_not_a_finite_number_is_refused():
    body = json.dumps(SUCCESS).replace('"response_time_ms": 1432', '"response_time_ms": NaN')
    assert fields(body.encode()) == ["response_time_ms"]
    body = json.dumps(SUCCESS).replace('"success_rate": 1.0', '"success_rate": Infinity')
    assert fields(body.encode()) == ["success_rate"]


@pytest.mark.parametrize("field", BOOLEANS)
def test_booleans_are_json_booleans_only(field):
    for value in (True, False):
        assert getattr(parse_event({**SUCCESS, field: value}), field) is value
    for value in (0, 1, "true", "false", "yes", 1.0, [True]):
        assert problems({**SUCCESS, field: value}) == [
            {"field": field, "problem": "Input should be a valid boolean"}], value


@pytest.mark.parametrize("field", OPTIONAL)
def test_optional_fields_may_be_null_or_absent(field):
    assert getattr(parse_event({**SUCCESS, field: None}), field) is None
    assert getattr(parse_event({k: v for k, v in SUCCESS.items() if k != field}), field) is None


@pytest.mark.parametrize("field", REQUIRED)
def test_required_fields_may_not_be_null(field):
    assert fields({**SUCCESS, field: None}) == [field]


def test_an_empty_object_names_every_required_field_in_contract_order():
    assert problems({}) == [{"field": f, "problem": "is required"} for f in REQUIRED]


def test_every_bad_field_is_named_once_and_the_prefix_leads_each_name():
    bad = {**SUCCESS, "tokens_used": -1, "model_name": "", "success_rate": 2,
           "appointment_requested": "yes", "locale": "de\x00"}
    del bad["session_id"]
    # pydantic reports the contract's fields first (in declaration order); the
    # fields beyond it are checked only once the contract's fields are valid.
    assert fields(bad, prefix=(7,)) == ["7.session_id", "7.success_rate", "7.tokens_used",
                                        "7.model_name", "7.appointment_requested"]
    assert fields({**SUCCESS, "locale": "de\x00"}, prefix=(7,)) == ["7.locale"]


def test_a_body_that_is_not_an_object_is_named_body():
    assert problems(b"[]") == [{"field": "body", "problem": "Input should be an object"}]
    assert problems(b"42") == [{"field": "body", "problem": "Input should be an object"}]
    (problem,) = problems(b'{"business_id": ')
    assert problem["field"] == "body" and problem["problem"].startswith("Invalid JSON")
    assert fields(["not", "an", "object"]) == ["body"]


def test_the_refused_input_is_never_echoed_back():
    hostile = "<script>" + "x" * 100_000
    found = problems({**SUCCESS, "business_id": hostile, "tokens_used": hostile,
                      "model_name": {"nested": hostile}})
    assert [p["field"] for p in found] == ["business_id", "tokens_used", "model_name"]
    assert all(len(p["problem"]) < 100 and "<script>" not in p["problem"] for p in found)


# --- fields beyond the contract ---------------------------------------------------------

def test_fields_beyond_the_contract_are_kept_as_sent():
    extra = {"locale": "de-DE", "ab": {"arm": "b", "weights": [1, 2.5, None, True]},
             "n": -(2**63), "m": INT64_MAX, "empty": {}}
    for data in ({**SUCCESS, **extra}, json.dumps({**SUCCESS, **extra}).encode()):
        event = parse_event(data)
        assert event.model_extra == extra
        assert {k: getattr(event, k) for k in SUCCESS} == SUCCESS


def test_up_to_64_fields_beyond_the_contract_are_accepted():
    assert MAX_EXTRA_FIELDS == 64
    extra = {f"k{i}": i for i in range(MAX_EXTRA_FIELDS)}
    assert parse_event({**SUCCESS, **extra}).model_extra == extra
    assert problems({**SUCCESS, **extra, "one_more": 1}) == [
        {"field": "body", "problem": "at most 64 fields beyond the contract's"}]
    assert fields({**SUCCESS, **extra, "one_more": 1}, prefix=(3,)) == ["3"]


@pytest.mark.parametrize(("value", "problem"), [
    ("a\x00b", "contains the NUL character (U+0000)"),
    (["ok", {"deep": ["\x00"]}], "contains the NUL character (U+0000)"),
    ({"\x00key": 1}, "contains the NUL character (U+0000)"),
    (2**63, "integer out of 64-bit range"),
    (-(2**63) - 1, "integer out of 64-bit range"),
    ([1, [2, [10**30]]], "integer out of 64-bit range"),
    (math.inf, "number is not finite"),
    ({"x": math.nan}, "number is not finite"),
])
def test_a_field_beyond_the_contract_that_jsonb_cannot_hold_is_named(value, problem):
    assert problems({**SUCCESS, "custom": value}, prefix=(2,)) == [
        {"field": "2.custom", "problem": problem}]


def test_the_name_of_an_unstorable_field_is_cut_to_64_characters():
    name = "k" * 100 + "\x00"
    assert problems({**SUCCESS, name: 1}) == [
        {"field": "k" * 64, "problem": "contains the NUL character (U+0000)"}]


def test_json_text_beyond_the_contract_that_jsonb_cannot_hold_is_named():
    body = json.dumps({**SUCCESS, "ok": 1, "score": 0}).replace('"score": 0', '"score": NaN')
    assert problems(body.encode()) == [{"field": "score", "problem": "number is not finite"}]


# --- properties ----------------------------------------------------------------------

# Characters Postgres text can hold (no NUL) and UTF-8 can encode (no lone surrogates).
_storable = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
_text = st.text(_storable, min_size=1, max_size=20)


def _number(kind, lowest, highest):
    if kind is int:
        return st.integers(lowest, highest)
    return st.floats(lowest, highest, allow_nan=False, allow_infinity=False)


_json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), INT64_MAX) | _text
                 | st.floats(allow_nan=False, allow_infinity=False))
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(_text, inner, max_size=3), max_leaves=10)


@st.composite
def valid_events(draw) -> dict:
    """Any event the contract allows: each field anywhere in its range, optionals
    present or not, up to 5 fields beyond the contract."""
    event = {}
    for name, longest in TEXT_BOUNDS.items():
        event[name] = draw(st.text(_storable, min_size=1, max_size=longest))
    for name, bounds in NUMBER_BOUNDS.items():
        event[name] = draw(_number(*bounds))
    for name in BOOLEANS:
        event[name] = draw(st.booleans())
    for name in OPTIONAL:
        if draw(st.booleans()):
            del event[name]
    extra = draw(st.dictionaries(_text.filter(lambda k: k not in MetricsEvent.model_fields),
                                 _json_values, max_size=5))
    return {**extra, **event}


@settings(max_examples=60, deadline=None)
@given(event=valid_events())
def test_any_valid_event_round_trips_as_json_and_as_a_dict(event):
    from_json = parse_event(json.dumps(event).encode())
    assert parse_event(event) == from_json
    contract = {k: v for k, v in event.items() if k in MetricsEvent.model_fields}
    assert {k: getattr(from_json, k) for k in contract} == contract
    assert from_json.model_extra == {k: v for k, v in event.items() if k not in contract}
    # What the outbox spools (model_dump_json) reads back as the same event.
    assert parse_event(from_json.model_dump_json().encode()) == from_json


@settings(max_examples=100, deadline=None)
@given(field=st.sampled_from(sorted(TEXT_BOUNDS)), data=st.data())
def test_any_text_past_its_bound_is_refused_naming_only_that_field(field, data):
    longest = TEXT_BOUNDS[field]
    value = data.draw(st.text(st.characters(blacklist_categories=("Cs",)),
                              min_size=longest + 1, max_size=longest + 300))
    assert fields({**SUCCESS, field: value}) == [field]
    assert fields(json.dumps({**SUCCESS, field: value}).encode(), prefix=(0,)) == [f"0.{field}"]


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(sorted(NUMBER_BOUNDS)), data=st.data())
def test_any_number_out_of_its_range_is_refused_naming_only_that_field(field, data):
    kind, lowest, highest = NUMBER_BOUNDS[field]
    if kind is int:
        value = data.draw(st.integers(max_value=lowest - 1) | st.integers(min_value=highest + 1))
    else:
        value = data.draw(st.floats(max_value=lowest, exclude_max=True)
                          | st.floats(min_value=highest, exclude_min=True, allow_nan=False))
    assert fields({**SUCCESS, field: value}) == [field]


# --- batches and /refresh-metrics' body ----------------------------------------------------

def test_a_batch_is_one_to_limit_events_else_one_problem_for_the_body():
    def body_problem(items, limit: int = 3):
        with pytest.raises(InvalidRequest) as caught:
            parse_batch(json.dumps(items).encode() if not isinstance(items, bytes) else items,
                        limit)
        (problem,) = caught.value.problems
        assert problem["field"] == "body"
        return problem["problem"]

    assert [e.session_id for e in parse_batch(json.dumps([SUCCESS, FAILURE] * 2).encode(),
                                              4)] == [SUCCESS["session_id"],
                                                      FAILURE["session_id"]] * 2
    assert body_problem([SUCCESS] * 4) == "must hold 1 to 3 events, got 4"
    assert body_problem([{}] * 10_000) == "must hold 1 to 3 events, got 10000"
    assert body_problem([]) == "must hold 1 to 3 events, got 0"
    assert body_problem(SUCCESS) == "must be a JSON array of events"
    assert body_problem(b"[{").startswith("Invalid JSON")


def test_a_batch_names_each_bad_item_by_its_index_and_keeps_the_good_ones():
    items = [SUCCESS, {**SUCCESS, "x": "\x00"}, FAILURE, {**SUCCESS, "tokens_used": -1}, 5]
    results = parse_batch(json.dumps(items).encode(), 10)
    assert [type(r) for r in results] == [MetricsEvent, InvalidRequest, MetricsEvent,
                                          InvalidRequest, InvalidRequest]
    assert results[0] == parse_event(SUCCESS) and results[2] == parse_event(FAILURE)
    assert [[p["field"] for p in r.problems] for r in results[1::2]] == [
        ["1.x"], ["3.tokens_used"]]
    assert [p["field"] for p in results[4].problems] == ["4"]


def test_refresh_metrics_takes_the_apps_trigger_and_nothing_else():
    assert RefreshRequest.model_validate_json(b'{"trigger": "new_metrics"}').trigger == \
        "new_metrics"
    assert RefreshRequest.model_validate_json(b"{}").trigger is None
    assert RefreshRequest.model_validate_json(b'{"trigger": null}').trigger is None
    assert RefreshRequest.model_validate_json(json.dumps({"trigger": "t" * 64})).trigger == \
        "t" * 64
    for body, field in [({"trigger": "t" * 65}, "trigger"), ({"trigger": ""}, "trigger"),
                        ({"trigger": 5}, "trigger"), ({"trigger": "a\x00"}, "trigger"),
                        ({"trigger": "new_metrics", "other": 1}, "other")]:
        with pytest.raises(ValidationError) as caught:
            RefreshRequest.model_validate_json(json.dumps(body))
        assert [p["field"] for p in field_errors(caught.value)] == [field], body


# --- Record --------------------------------------------------------------------------

def test_a_record_holds_its_id_receive_time_and_event_and_cannot_change():
    event = parse_event(SUCCESS)
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    record = Record("e-1", at, event)
    assert (record.event_id, record.received_at, record.event) == ("e-1", at, event)
    assert record == Record("e-1", at, parse_event(SUCCESS))
    assert record != Record("e-2", at, event)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.event_id = "e-2"


def test_a_records_price_is_the_tables_price_of_its_event_at_its_receive_time(bundled_prices):
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    priced = Record("e-1", at, parse_event(SUCCESS))
    assert priced.price.cost_usd == (350 * FLASH_INPUT + 62 * FLASH_OUTPUT) / 1_000_000
    assert priced.price.status == prices.PRICED
    assert priced.price == prices.current().price_event(priced.event, at)
    total_only = {k: v for k, v in SUCCESS.items()
                  if k not in ("prompt_tokens", "completion_tokens")}
    estimated = Record("e-2", at, parse_event(total_only)).price
    assert (estimated.cost_usd, estimated.status) == (412 * FLASH_INPUT / 1_000_000,
                                                      prices.ESTIMATED)
    unknown = {**SUCCESS, "model_name": "house-model-7"}
    assert Record("e-3", at, parse_event(unknown)).price == prices.Price(None, prices.UNPRICED)
    free = {**FAILURE, "tokens_used": 0}
    assert Record("e-4", at, parse_event(free)).price == prices.Price(0, prices.ESTIMATED)


def test_a_records_price_is_computed_once_by_the_table_of_that_moment(bundled_prices):
    at = datetime(2026, 1, 2, tzinfo=UTC)
    early = Record("e-1", at, parse_event(SUCCESS))
    first = early.price
    prices.configure(prices.Table(enabled=False))
    assert early.price is first and first.status == prices.PRICED
    assert Record("e-2", at, parse_event(SUCCESS)).price == prices.Price(None, None)
