"""The ``mlops.store`` package through its public functions, on the test run's Postgres.

Inserts by both paths (one call of ``mlops_insert_events`` below
``COPY_THRESHOLD`` records, COPY into a staging table from it), replays,
ids held by another business, the analytics reads on a small known dataset
(exact figures), erasure's answer and audit row, and the housekeeping steps.
The module shares one connection pool; each test writes under business,
conversation and session ids of its own, so the tests do not disturb each
other. After every write the rollups are checked row by row against the
raw events (:func:`assert_rollups_equal_raw`).
"""

from __future__ import annotations

import collections
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg2
import pytest
from conftest import empty_tables, query
from payloads import SUCCESS, varied

from mlops import latency_histogram, prices, store
from mlops.config import Settings
from mlops.db import Database
from mlops.schemas import MetricsEvent, Record
from mlops.store.rollup_sql import DAILY_SUMS, DAY

TIMEOUT_MS = 5000
# The course's list price of gemini-1.5-flash, USD per million tokens (test_prices.py).
FLASH_INPUT, FLASH_OUTPUT = Decimal("0.075"), Decimal("0.30")
FLASH = "gemini-1.5-flash"
ROLLUPS = ("mlops_rollup_daily", "mlops_rollup_latency", "mlops_rollup_intents",
           "mlops_rollup_conversations")


@pytest.fixture(scope="module")
def db(database_url):
    """One store-level pool for the module; the events and rollups emptied after it."""
    prices.configure(prices.Table())  # the bundled table, whatever a test before configured
    database = Database(Settings.from_env({"DATABASE_URL": database_url}))
    yield database
    database.close()
    empty_tables(database_url)


@pytest.fixture(scope="module")
def pg(database_url):
    """An autocommit connection for the module, to check what was stored."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    yield conn
    conn.close()


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4()}"


def record(business: str, at: datetime | None = None, event_id: str | None = None,
           **fields) -> Record:
    """A record of the client's successful message for ``business``, with ``fields``
    changed; no conversation and a session of its own unless given."""
    event = {**SUCCESS, "business_id": business, "conversation_id": None,
             "session_id": new_id("s"), **fields}
    return Record(event_id or new_id("e"), at or datetime.now(UTC),
                  MetricsEvent.model_validate(event))


def ids(records) -> set[str]:
    return {r.event_id for r in records}


def days_ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def epoch(pg) -> int:
    return query(pg, "SELECT changes FROM mlops_rollup_epoch")[0][0]


def _approx_floats(row) -> tuple:
    return tuple(pytest.approx(v) if isinstance(v, float) else v for v in row)


def assert_rollups_equal_raw(pg, business: str) -> None:
    """Every rollup of ``business``, shards summed, equals the same figures over its raw
    events, key by key: every daily sum (prices included), the latency histogram, the
    intents, and each conversation's first and last day."""
    names = [name for name, _ in DAILY_SUMS]
    pairs = [
        (f"SELECT day, model_name, {', '.join(f'sum({n})' for n in names)} "
         "FROM mlops_rollup_daily WHERE business_id = %s GROUP BY 1, 2 ORDER BY 1, 2",
         f"SELECT {DAY}, model_name, {', '.join(expr for _, expr in DAILY_SUMS)} "
         "FROM mlops_events WHERE business_id = %s GROUP BY 1, 2 ORDER BY 1, 2"),
        ("SELECT day, bucket, sum(messages) FROM mlops_rollup_latency "
         "WHERE business_id = %s GROUP BY 1, 2 ORDER BY 1, 2",
         f"SELECT {DAY}, {latency_histogram.BUCKET_SQL}, count(*) FROM mlops_events "
         "WHERE business_id = %s GROUP BY 1, 2 ORDER BY 1, 2"),
        ("SELECT day, intent_detected, sum(messages) FROM mlops_rollup_intents "
         "WHERE business_id = %s GROUP BY 1, 2 ORDER BY 1, 2",
         f"SELECT {DAY}, intent_detected, count(*) FROM mlops_events "
         "WHERE business_id = %s GROUP BY 1, 2 ORDER BY 1, 2"),
        ("SELECT conversation_id, first_day, last_day FROM mlops_rollup_conversations "
         "WHERE business_id = %s ORDER BY 1",
         f"SELECT conversation_id, min({DAY}), max({DAY}) FROM mlops_events "
         "WHERE business_id = %s AND conversation_id IS NOT NULL GROUP BY 1 ORDER BY 1"),
    ]
    for rollup, raw in pairs:
        assert query(pg, rollup, business) == [_approx_floats(r) for r in query(pg, raw,
                                                                                  business)]


def rollup_rows(pg, business: str) -> dict[str, list[tuple]]:
    """Every rollup row of ``business``, shard included, in key order."""
    return {table: query(pg, f"SELECT * FROM {table} WHERE business_id = %s ORDER BY 1, 2, 3, 4",
                         business) for table in ROLLUPS}


def rollup_totals(pg, business: str) -> dict[str, list]:
    """Every rollup of ``business`` without its id: per key, the sums over the shards
    (``[((day, model | bucket | intent), sums)]``); per conversation, its first and
    last day (conversation ids left out)."""
    totals = {}
    for table, rows in rollup_rows(pg, business).items():
        if table == "mlops_rollup_conversations":
            totals[table] = sorted(row[2:] for row in rows)
            continue
        merged: dict[tuple, tuple] = {}
        for row in rows:  # (business_id, day, key, shard, *sums)
            key, sums = row[1:3], row[4:]
            old = merged.get(key)
            merged[key] = sums if old is None else tuple(
                a + b for a, b in zip(old, sums, strict=True))
        totals[table] = sorted(merged.items())
    return totals


def messages(pg, business: str) -> int:
    return query(pg, "SELECT count(*) FROM mlops_events WHERE business_id = %s", business)[0][0]


# --- inserts --------------------------------------------------------------------------

STORED = ("received_at, business_id, conversation_id, session_id, response_time_ms, "
          "success_rate, user_satisfaction, tokens_used, prompt_tokens, completion_tokens, "
          "api_cost_usd, model_name, intent_detected, appointment_requested, "
          "human_handoff_requested, appointment_booked, user_message_length, "
          "ai_response_length, response_type, extra, price_usd, price_status")


def expected_row(r: Record) -> tuple:
    """What ``r`` should be stored as (the columns of ``STORED``)."""
    e = r.event
    return (r.received_at, e.business_id, e.conversation_id, e.session_id, e.response_time_ms,
            e.success_rate, e.user_satisfaction, e.tokens_used, e.prompt_tokens,
            e.completion_tokens, Decimal(str(e.api_cost_usd)), e.model_name, e.intent_detected,
            e.appointment_requested, e.human_handoff_requested, e.appointment_booked,
            e.user_message_length, e.ai_response_length, e.response_type, e.model_extra or {},
            r.price.cost_usd, r.price.status)


def test_nothing_to_insert_is_an_empty_answer(db):
    inserted = store.insert_events(db, [], TIMEOUT_MS)
    assert inserted == set() and inserted.conflicts == frozenset()


def test_both_insert_paths_store_the_same_rows_and_rollups(db, pg):
    """COPY_THRESHOLD records in one COPY, and the same events as one function call of
    COPY_THRESHOLD - 1 records then one of 1, store equal rows and equal rollups."""
    by_copy, by_function = new_id("b"), new_id("b")
    events = varied(store.COPY_THRESHOLD, ["any"], seed=21)
    for i, event in enumerate(events):
        if i % 3 == 0:
            event["locale"] = "de-DE\t\\N"  # a field beyond the contract, COPY's escapes
        if i % 4 == 0:  # only a total: an estimated price
            del event["prompt_tokens"], event["completion_tokens"]
        if i % 9 == 0:
            event["model_name"] = "house-model"  # no table knows it: unpriced
    ats = [days_ago(3 if i % 5 == 0 else 0) for i in range(len(events))]

    def made(business):
        return [Record(new_id("e"), at, MetricsEvent.model_validate(
            {**e, "business_id": business,
             "conversation_id": e["conversation_id"] + business[-4:]}))
            for e, at in zip(events, ats, strict=True)]

    copied, called = made(by_copy), made(by_function)
    inserted = store.insert_events(db, copied, TIMEOUT_MS)
    assert inserted == ids(copied) and inserted.conflicts == frozenset()
    first = store.insert_events(db, called[:-1], TIMEOUT_MS)
    last = store.insert_events(db, called[-1:], TIMEOUT_MS)
    assert (first, last) == (ids(called[:-1]), ids(called[-1:]))

    def stored(business):
        return query(pg, f"SELECT event_id, {STORED} FROM mlops_events "
                         "WHERE business_id = %s", business)

    for business, records in ((by_copy, copied), (by_function, called)):
        rows = {row[0]: row[1:] for row in stored(business)}
        assert rows == {r.event_id: expected_row(r) for r in records}
        assert_rollups_equal_raw(pg, business)
    statuses = collections.Counter(r.price.status for r in copied)
    assert statuses == {"priced": 42, "estimated": 14, "unpriced": 8}

    assert rollup_totals(pg, by_copy) == rollup_totals(pg, by_function)
    (n, tokens), = query(pg, "SELECT sum(messages), sum(tokens) FROM mlops_rollup_daily "
                             "WHERE business_id = %s", by_copy)
    assert (n, tokens) == (store.COPY_THRESHOLD, sum(e["tokens_used"] for e in events))


@pytest.mark.parametrize("size", [3, store.COPY_THRESHOLD], ids=["function", "copy"])
def test_a_replay_stores_nothing_and_leaves_the_rollups_as_they_were(db, pg, size):
    business = new_id("b")
    old = [record(business, days_ago(3), conversation_id=new_id("c"), tokens_used=i)
           for i in range(size)]
    assert store.insert_events(db, old, TIMEOUT_MS) == ids(old)
    before, changes = rollup_rows(pg, business), epoch(pg)

    replay = store.insert_events(db, list(reversed(old)), TIMEOUT_MS)

    assert replay == set() and replay.conflicts == frozenset()
    assert rollup_rows(pg, business) == before
    assert epoch(pg) == changes  # a replay of a settled day announces no change
    assert messages(pg, business) == size
    # Half old, half new: only the new ones are stored and counted.
    new = [record(business, days_ago(3), tokens_used=1000 + i) for i in range(size)]
    mixed = store.insert_events(db, old[::2] + new, TIMEOUT_MS)
    assert mixed == ids(new) and mixed.conflicts == frozenset()
    assert messages(pg, business) == 2 * size
    (tokens,), = query(pg, "SELECT sum(tokens) FROM mlops_rollup_daily WHERE business_id = %s",
                       business)
    assert tokens == sum(range(size)) + sum(1000 + i for i in range(size))
    assert_rollups_equal_raw(pg, business)


@pytest.mark.parametrize("size", [1, store.COPY_THRESHOLD], ids=["function", "copy"])
def test_only_an_insert_into_a_settled_day_announces_a_change(db, pg, size):
    """Days before yesterday (UTC) are settled: BusinessTotals re-reads them only when
    mlops_rollup_epoch moves, which an insert into today or yesterday does not do."""
    business = new_id("b")
    changes = epoch(pg)
    for age in (0, 1):
        store.insert_events(db, [record(business, days_ago(age)) for _ in range(size)],
                            TIMEOUT_MS)
        assert epoch(pg) == changes, age
    store.insert_events(db, [record(business, days_ago(2)) for _ in range(size)], TIMEOUT_MS)
    assert epoch(pg) == changes + 1
    assert_rollups_equal_raw(pg, business)


@pytest.mark.parametrize("size", [2, store.COPY_THRESHOLD], ids=["function", "copy"])
def test_an_id_held_by_another_business_is_a_conflict_and_not_stored(db, pg, size):
    owner, other = new_id("b"), new_id("b")
    taken = record(owner, tokens_used=7)
    assert store.insert_events(db, [taken], TIMEOUT_MS) == {taken.event_id}

    claim = record(other, event_id=taken.event_id, tokens_used=999)
    fresh = [record(other, tokens_used=1) for _ in range(size - 1)]
    inserted = store.insert_events(db, [*fresh[:1], claim, *fresh[1:]], TIMEOUT_MS)

    assert inserted == ids(fresh)
    assert inserted.conflicts == {(taken.event_id, other)}
    assert query(pg, "SELECT business_id, tokens_used FROM mlops_events WHERE event_id = %s",
                 taken.event_id) == [(owner, 7)]
    assert messages(pg, other) == size - 1
    assert_rollups_equal_raw(pg, owner)
    assert_rollups_equal_raw(pg, other)
    # The owner sending it again is a replay, not a conflict.
    again = store.insert_events(db, [taken], TIMEOUT_MS)
    assert again == set() and again.conflicts == frozenset()


@pytest.mark.parametrize("size", [3, store.COPY_THRESHOLD], ids=["function", "copy"])
def test_an_id_twice_in_one_batch_is_stored_from_its_first_record(db, pg, size):
    business, other = new_id("b"), new_id("b")
    twice = new_id("e")
    first = record(business, event_id=twice, tokens_used=111, model_name=FLASH)
    second = record(business, event_id=twice, tokens_used=222, model_name="second-model")
    elsewhere = record(other, event_id=twice, tokens_used=333)
    fillers = [record(business, tokens_used=1) for _ in range(size - 3)]

    inserted = store.insert_events(db, [first, *fillers, second, elsewhere], TIMEOUT_MS)

    assert inserted == {twice, *ids(fillers)}
    assert inserted.conflicts == {(twice, other)}
    assert query(pg, "SELECT business_id, tokens_used, model_name FROM mlops_events "
                     "WHERE event_id = %s", twice) == [(business, 111, FLASH)]
    assert query(pg, "SELECT model_name, sum(messages), sum(tokens) FROM mlops_rollup_daily "
                     "WHERE business_id = %s GROUP BY 1", business) == [
        (FLASH, size - 2, 111 + size - 3)]
    assert messages(pg, other) == 0
    assert_rollups_equal_raw(pg, business)


# --- reads ----------------------------------------------------------------------------

# The same response times go in the same histogram buckets in Postgres and here.
def estimate(values: list[float], q: float) -> float:
    counts = collections.Counter(latency_histogram.bucket_of(v) for v in values)
    return latency_histogram.percentile(counts.items(), q)


COURSE_PRICE = (350 * FLASH_INPUT + 62 * FLASH_OUTPUT) / 1_000_000  # 0.00004485


def test_analytics_and_totals_of_a_known_dataset_are_exact(db, pg):
    business = new_id("b")
    c1, c2, c3 = new_id("c"), new_id("c"), new_id("c")
    total_only = {"prompt_tokens": None, "completion_tokens": None}
    records = [
        record(business, days_ago(0), conversation_id=c1, response_time_ms=100,
               api_cost_usd=0.0001, success_rate=1.0, appointment_requested=True,
               appointment_booked=True, human_handoff_requested=False,
               intent_detected="appointment"),
        record(business, days_ago(0), conversation_id=c1, response_time_ms=300,
               api_cost_usd=0.0003, success_rate=1.0, appointment_requested=True,
               appointment_booked=False, human_handoff_requested=False,
               intent_detected="pricing"),
        record(business, days_ago(0), conversation_id=c2, response_time_ms=200,
               api_cost_usd=0, success_rate=0.0, appointment_requested=False,
               human_handoff_requested=True, intent_detected="general",
               model_name="house-model", tokens_used=20, **total_only),
        record(business, days_ago(2), conversation_id=c3, response_time_ms=1000,
               api_cost_usd=0.001, success_rate=1.0, appointment_requested=False,
               human_handoff_requested=False, intent_detected="appointment",
               tokens_used=100, **total_only),
        record(business, days_ago(10), response_time_ms=50, api_cost_usd=0.000005,
               success_rate=0.5, appointment_requested=True, appointment_booked=True,
               human_handoff_requested=False, intent_detected="general",
               model_name="house-model", tokens_used=5, **total_only),
    ]
    assert store.insert_events(db, records, TIMEOUT_MS) == ids(records)
    assert_rollups_equal_raw(pg, business)
    priced_today = float(2 * COURSE_PRICE)  # 0.0000897

    day = store.analytics(db, business, 1)

    assert day["metrics"] == {
        "total_messages": 3, "total_conversations": 2, "avg_response_time_ms": 200.0,
        "avg_tokens_used": 844 / 3, "total_tokens": 844, "total_api_cost_usd": 0.0004,
        "total_cost_usd": priced_today, "appointment_requests": 2, "appointments_booked": 1,
        "human_handoffs": 1, "p50_response_time_ms": estimate([100, 200, 300], 0.5),
        "p95_response_time_ms": estimate([100, 200, 300], 0.95), "success_rate": 2 / 3,
        "appointment_conversion_rate": 0.5,
    }
    assert day["cost"] == {
        "cost_usd": priced_today, "client_estimate_usd": 0.0004,
        "client_estimate_difference": (0.0004 - priced_today) / priced_today,
        "compared_cost_usd": priced_today, "compared_client_estimate_usd": 0.0004,
        "priced_messages": 2, "estimated_messages": 0, "unpriced_messages": 1,
        "pending_messages": 0,
        "unpriced_models": [{"model_name": "house-model", "messages": 1}],
        "unpriced": "1 calls of models no price table knows, left out of cost_usd: "
                    "house-model (1); add them to PRICES_FILE",
    }
    assert day["by_model"] == [
        {"model_name": FLASH, "messages": 2, "tokens": 824, "api_cost_usd": 0.0004,
         "cost_usd": priced_today, "unpriced_messages": 0, "estimated_messages": 0,
         "avg_response_time_ms": 200},
        {"model_name": "house-model", "messages": 1, "tokens": 20, "api_cost_usd": 0,
         "cost_usd": 0, "unpriced_messages": 1, "estimated_messages": 0,
         "avg_response_time_ms": 200},
    ]
    assert day["daily"] == [
        {"date": today(), "messages": 3, "tokens": 844, "api_cost_usd": 0.0004,
         "cost_usd": priced_today, "avg_response_time_ms": 200, "appointments_booked": 1,
         "p50_response_time_ms": estimate([100, 200, 300], 0.5),
         "p95_response_time_ms": estimate([100, 200, 300], 0.95)}]
    assert day["by_intent"] == [{"intent_detected": i, "messages": 1}
                                for i in ("appointment", "general", "pricing")]

    three = store.analytics(db, business, 3)
    estimated = float(2 * COURSE_PRICE + 100 * FLASH_INPUT / 1_000_000)  # 0.0000972
    m = three["metrics"]
    assert (m["total_messages"], m["total_conversations"], m["total_tokens"],
            m["total_api_cost_usd"], m["total_cost_usd"], m["avg_response_time_ms"],
            m["success_rate"]) == (4, 3, 944, 0.0014, estimated, 400.0, 0.75)
    assert m["p95_response_time_ms"] == estimate([100, 200, 300, 1000], 0.95)
    assert (three["cost"]["priced_messages"], three["cost"]["estimated_messages"]) == (3, 1)
    assert [(d["date"], d["messages"]) for d in three["daily"]] == [
        (days_ago(2).date().isoformat(), 1), (today(), 3)]
    assert [(i["intent_detected"], i["messages"]) for i in three["by_intent"]] == [
        ("appointment", 2), ("general", 1), ("pricing", 1)]

    month = store.analytics(db, business, 30)["metrics"]
    assert (month["total_messages"], month["total_conversations"], month["total_tokens"],
            month["total_api_cost_usd"], month["appointment_requests"],
            month["appointments_booked"], month["success_rate"]) == (
        5, 3, 949, 0.001405, 3, 2, 0.7)

    for days, row in ((1, (business, 3, 844, 0.0004, 2 / 3)),
                      (30, (business, 5, 949, 0.001405, 0.7))):
        (mine,) = [r for r in store.business_totals(db, days) if r[0] == business]
        assert mine == row
        assert mine.cost_usd == (priced_today if days == 1 else estimated)
        (cached,) = [r for r in store.BusinessTotals(days).read(db) if r[0] == business]
        assert (cached, cached.cost_usd) == (mine, mine.cost_usd)


def test_the_oldest_event_is_reported_in_unix_seconds(db):
    business = new_id("b")
    ancient = datetime(2001, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
    store.insert_events(db, [record(business, ancient)], TIMEOUT_MS)
    assert store.oldest_event_received_at(db) == pytest.approx(ancient.timestamp(), abs=1e-6)
    store.erase_business(db, business, TIMEOUT_MS)
    oldest = store.oldest_event_received_at(db)
    assert oldest is None or oldest > ancient.timestamp() + 86400


# --- erasure --------------------------------------------------------------------------

def latest_audit(db) -> dict:
    (row,) = store.erasure_audit(db, 1)
    return row


def test_erasing_a_conversation_answers_what_left_and_audits_it(db, pg):
    business = new_id("b")
    gone, stays = new_id("c"), new_id("c")
    e1 = record(business, conversation_id=gone, model_name="m-x", response_time_ms=100,
                intent_detected="gone-only")
    e2 = record(business, conversation_id=gone, model_name="m-x", response_time_ms=100,
                intent_detected="shared")
    e3 = record(business, conversation_id=stays, model_name="m-y", response_time_ms=5000,
                intent_detected="shared")
    store.insert_events(db, [e1, e2, e3], TIMEOUT_MS)  # one call: one shard per key
    assert store.businesses_holding(db, "conversation_id", gone) == {business}

    removed = store.erase_conversation(db, gone, TIMEOUT_MS,
                                       requester=store.Requester("k-123"), spooled_events=3)

    # m-x's daily row, bucket(100)'s row and "gone-only"'s row are emptied;
    # "shared"'s row is rewritten with e3 alone.
    assert removed == {"mlops_events": 2, "mlops_rollup_daily": 1, "mlops_rollup_latency": 1,
                       "mlops_rollup_intents": 1, "mlops_rollup_conversations": 1,
                       "rollup_rows_recomputed": 1, "spooled_events": 3}
    audit = latest_audit(db)
    assert {k: v for k, v in audit.items() if k not in ("id", "at")} == {
        "outcome": "erased", "key_id": "k-123", "target": "conversation_id",
        "target_id": gone, "events": 2, "spooled_events": 3, "rollup_changes": 5,
        "detail": {"removed": removed}}
    assert datetime.fromisoformat(audit["at"]) <= datetime.now(UTC)
    assert store.businesses_holding(db, "conversation_id", gone) == frozenset()
    assert query(pg, "SELECT event_id FROM mlops_events WHERE business_id = %s",
                 business) == [(e3.event_id,)]
    assert_rollups_equal_raw(pg, business)
    after = store.analytics(db, business, 1)
    assert (after["metrics"]["total_messages"], after["metrics"]["total_conversations"],
            after["by_intent"]) == (1, 1, [{"intent_detected": "shared", "messages": 1}])

    # A copy received before the erasure stays out; a message after it is new, and kept.
    copy = record(business, e1.received_at, conversation_id=gone)
    refused = store.insert_events(db, [copy], TIMEOUT_MS)
    assert refused == set() and refused.conflicts == frozenset()
    later = record(business, conversation_id=gone)
    assert store.insert_events(db, [later], TIMEOUT_MS) == {later.event_id}
    assert_rollups_equal_raw(pg, business)


def test_erasing_a_session_spans_businesses_and_drops_only_emptied_conversations(db, pg):
    one, two = new_id("b"), new_id("b")
    session, alone, shared = new_id("s"), new_id("c"), new_id("c")
    same = {"model_name": "m", "intent_detected": "i", "response_time_ms": 100}
    records = [record(one, session_id=session, conversation_id=alone, **same),
               record(one, conversation_id=new_id("c"), **same),
               record(two, session_id=session, conversation_id=shared, **same),
               record(two, conversation_id=shared, **same)]
    store.insert_events(db, records, TIMEOUT_MS)
    assert store.businesses_holding(db, "session_id", session) == {one, two}

    removed = store.erase_session(db, session, TIMEOUT_MS)

    # Each business keeps one event under every key: its rows are rewritten, not emptied.
    assert removed == {"mlops_events": 2, "mlops_rollup_daily": 0, "mlops_rollup_latency": 0,
                       "mlops_rollup_intents": 0, "mlops_rollup_conversations": 1,
                       "rollup_rows_recomputed": 6, "spooled_events": 0}
    assert store.businesses_holding(db, "session_id", session) == frozenset()
    assert query(pg, "SELECT business_id FROM mlops_rollup_conversations "
                     "WHERE conversation_id = ANY(%s)", [alone, shared]) == [(two,)]
    for business in (one, two):
        assert messages(pg, business) == 1
        assert_rollups_equal_raw(pg, business)
    assert latest_audit(db)["target"] == "session_id"


def test_erasing_a_business_removes_its_rows_from_every_table_once(db, pg):
    gone, stays = new_id("b"), new_id("b")
    z1, z2 = new_id("c"), new_id("c")
    records = [record(gone, conversation_id=z1, model_name="m1", response_time_ms=100),
               record(gone, conversation_id=z1, model_name="m1", response_time_ms=100),
               record(gone, conversation_id=z2, model_name="m2", response_time_ms=5000),
               record(gone, days_ago(3), conversation_id=z1, model_name="m1",
                      response_time_ms=100),
               record(stays, conversation_id=new_id("c"))]
    store.insert_events(db, records, TIMEOUT_MS)
    changes = epoch(pg)

    removed = store.erase_business(db, gone, TIMEOUT_MS, requester=store.Requester("k-9"))

    assert removed == {"mlops_events": 4, "mlops_rollup_daily": 3, "mlops_rollup_latency": 3,
                       "mlops_rollup_intents": 2, "mlops_rollup_conversations": 2,
                       "spooled_events": 0}
    assert epoch(pg) == changes + 1  # settled days changed: cached totals re-read them
    assert (latest_audit(db)["events"], latest_audit(db)["rollup_changes"]) == (4, 10)
    assert rollup_rows(pg, gone) == dict.fromkeys(ROLLUPS, [])
    assert messages(pg, gone) == 0 and messages(pg, stays) == 1
    assert_rollups_equal_raw(pg, stays)
    assert store.erase_business(db, gone, TIMEOUT_MS) == {
        "mlops_events": 0, "mlops_rollup_daily": 0, "mlops_rollup_latency": 0,
        "mlops_rollup_intents": 0, "mlops_rollup_conversations": 0, "spooled_events": 0}
    assert store.insert_events(db, records[:1], TIMEOUT_MS) == set()  # a held copy: refused


def test_a_refusal_is_audited_and_the_trail_pages_newest_first(db, pg):
    business = new_id("b")
    store.insert_events(db, [record(business)], TIMEOUT_MS)
    store.record_erasure_refusal(db, store.Requester("none"), "business_id", business, 401,
                                 "no_key")
    store.record_erasure_refusal(db, store.Requester("k-7"), "business_id", business, 403,
                                 "wrong_key")
    newest, before = store.erasure_audit(db, 2)
    assert (before["key_id"], before["detail"]) == ("none", {"status": 401, "reason": "no_key"})
    assert {k: v for k, v in newest.items() if k not in ("id", "at")} == {
        "outcome": "refused", "key_id": "k-7", "target": "business_id",
        "target_id": business, "events": 0, "spooled_events": 0, "rollup_changes": 0,
        "detail": {"status": 403, "reason": "wrong_key"}}
    assert messages(pg, business) == 1  # a refusal erases nothing
    assert newest["id"] > before["id"]
    assert store.erasure_audit(db, 1, before=newest["id"]) == [before]
    assert store.erasure_audit(db, 5, before=1) == []


# --- housekeeping ---------------------------------------------------------------------

def test_no_backfill_is_pending_in_a_database_migrated_empty(db):
    assert store.backfill_finished(db) is True
    assert store.backfill_batch(db, 100) == (0, True)


def test_housekeeping_steps_give_way_to_a_round_in_progress(db, database_url):
    other = psycopg2.connect(database_url)
    try:
        with other.cursor() as cur:  # another replica in the middle of a round
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (store.MAINTENANCE_LOCK_KEY,))
            assert store.fold_shards(db, 100) is None
            assert store.delete_expired_events(db, 1, 100) is None
            assert store.delete_expired_rollups(db, 1, 100) is None
            assert store.backfill_batch(db, 100) is None
    finally:
        other.rollback()
        other.close()
    assert store.fold_shards(db, 100) is not None


SHARDED = ("mlops_rollup_daily", "mlops_rollup_latency", "mlops_rollup_intents")


def test_shards_of_past_days_fold_into_shard_0_without_changing_a_figure(db, pg):
    business = new_id("b")
    yesterday = [record(business, days_ago(1), tokens_used=10 + i) for i in range(20)]
    for r in yesterday:  # one call each: each takes a shard at random
        store.insert_events(db, [r], TIMEOUT_MS)
    for _ in range(3):
        store.insert_events(db, [record(business)], TIMEOUT_MS)
    (shards,), = query(pg, "SELECT count(DISTINCT shard) FROM mlops_rollup_daily "
                           "WHERE business_id = %s AND day < %s::date", business, today())
    assert shards > 1  # 20 draws of 1 in 8 shards: one shard only has odds of 8^-19
    pending = sum(query(pg, f"SELECT count(*) FROM {t} WHERE shard <> 0 AND "
                            "day < (now() AT TIME ZONE 'UTC')::date")[0][0] for t in SHARDED)
    todays = {t: query(pg, f"SELECT * FROM {t} WHERE business_id = %s AND day = %s::date "
                           "ORDER BY 1, 2, 3, 4", business, today()) for t in SHARDED}
    figures = store.analytics(db, business, 7)

    assert store.fold_shards(db, 1) == 3  # at most 1 row per table per call
    assert store.fold_shards(db, 100_000) == pending - 3
    assert store.fold_shards(db, 100_000) == 0

    day = days_ago(1).date().isoformat()
    assert query(pg, "SELECT shard, messages, tokens FROM mlops_rollup_daily "
                     "WHERE business_id = %s AND day = %s::date", business, day) == [
        (0, 20, sum(10 + i for i in range(20)))]
    for table in ("mlops_rollup_latency", "mlops_rollup_intents"):
        assert query(pg, f"SELECT shard, messages FROM {table} "
                         "WHERE business_id = %s AND day = %s::date", business, day) == [(0, 20)]
    assert {t: query(pg, f"SELECT * FROM {t} WHERE business_id = %s AND day = %s::date "
                         "ORDER BY 1, 2, 3, 4", business, today()) for t in SHARDED} == todays
    assert store.analytics(db, business, 7) == figures
    assert_rollups_equal_raw(pg, business)


def test_expiry_deletes_old_raw_events_oldest_first_then_old_rollup_rows(db, pg):
    business = new_id("b")
    ages = [50, 40, 40, 10, 0]
    store.insert_events(db, [record(business, days_ago(age), tokens_used=age)
                             for age in ages], TIMEOUT_MS)
    assert query(pg, "SELECT count(*) FROM mlops_events WHERE business_id <> %s "
                     "AND received_at < now() - interval '35 days'", business) == [(0,)]
    everything = store.analytics(db, business, 3650)

    assert store.delete_expired_events(db, 35, 2) == 2
    assert query(pg, "SELECT tokens_used FROM mlops_events WHERE business_id = %s "
                     "ORDER BY 1", business) == [(0,), (10,), (40,)]
    assert store.delete_expired_events(db, 35, 2) == 1
    assert store.delete_expired_events(db, 35, 2) == 0
    assert store.analytics(db, business, 3650) == everything  # the rollups outlive them

    changes = epoch(pg)
    # Days 50 and 40: one row each in the daily, latency and intents rollups.
    assert store.delete_expired_rollups(db, 35, 1000) == 6
    assert epoch(pg) == changes + 1
    assert store.delete_expired_rollups(db, 35, 1000) == 0
    assert epoch(pg) == changes + 1
    left = store.analytics(db, business, 3650)["metrics"]
    assert (left["total_messages"], left["total_tokens"]) == (2, 10)
    assert_rollups_equal_raw(pg, business)
