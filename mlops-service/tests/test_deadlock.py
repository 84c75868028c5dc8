"""Concurrent inserts sharing rollup keys do not deadlock; one that does is run again.

Real Postgres throughout. Two batches share new conversation keys, listed in
opposite orders and in batches of different sizes (Postgres's hash
aggregation then yields the shared keys in different orders). A third
session holds the last event of each batch uncommitted, so both inserts wait
at the same point and start their rollups together when it rolls back: that
is when keys taken in no set order cross, and Postgres ends the deadlock by
rolling one insert back (SQLSTATE 40P01), after its ``deadlock_timeout``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from datetime import UTC, datetime

import psycopg2
import pytest
from conftest import empty_tables, query
from payloads import SUCCESS

from mlops import store
from mlops.config import Settings
from mlops.db import Database, TransactionRolledBack
from mlops.deliver import Delivery, GroupCommit
from mlops.schemas import MetricsEvent, Record
from mlops.telemetry import Telemetry

# A row of mlops_events with only what its constraints require.
_RAW_EVENT_SQL = """
INSERT INTO mlops_events (event_id, received_at, business_id, session_id, response_time_ms,
    success_rate, tokens_used, api_cost_usd, model_name, intent_detected,
    appointment_requested, human_handoff_requested, user_message_length, ai_response_length,
    response_type)
VALUES (%s, now(), %s, 's', 0, 1, 0, 0, 'm', 'general', false, false, 0, 0, 'text')"""


@pytest.fixture
def db(database_url):
    database = Database(Settings.from_env({"DATABASE_URL": database_url}))
    yield database
    database.close()
    empty_tables(database_url)


def record(business: str, conversation: str | None, event_id: str | None = None):
    return Record(event_id or str(uuid.uuid4()), datetime.now(UTC),
                  MetricsEvent.model_validate({**SUCCESS, "business_id": business,
                                               "conversation_id": conversation}))


def waiting_on_locks(pg) -> int:
    """Sessions of the test database waiting for a lock."""
    return query(pg, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                     "AND wait_event_type = 'Lock'")[0][0]


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.002)


def one_round(db, pg, database_url, shared: int, extra: int) -> list[BaseException]:
    """Insert two batches sharing ``shared`` new conversations, released together;
    return what the two inserts raised."""
    business, round_id = str(uuid.uuid4()), uuid.uuid4().hex
    conversations = [f"c-{round_id}-{i}" for i in range(shared)]
    # "~" sorts after every hex digit: the gate event is the last one either way.
    gates = [f"~gate-{round_id}-{side}" for side in "ab"]
    first = [record(business, c) for c in conversations] + [record(business, None, gates[0])]
    second = ([record(business, c) for c in reversed(conversations)]
              + [record(business, f"x-{round_id}-{i}") for i in range(extra)]
              + [record(business, None, gates[1])])
    gate = psycopg2.connect(database_url)
    errors: list[BaseException] = []

    def insert(records):
        try:
            store.insert_events(db, records, 30_000)
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    try:
        with gate.cursor() as cur:
            for event_id in gates:
                cur.execute(_RAW_EVENT_SQL, (event_id, "gate"))
        threads = [threading.Thread(target=insert, args=(batch,)) for batch in (first, second)]
        for thread in threads:
            thread.start()
        wait_until(lambda: waiting_on_locks(pg) >= 2, "both inserts waiting on the gate")
    finally:
        gate.rollback()
        gate.close()
    for thread in threads:
        thread.join()
    return errors


def test_concurrent_batches_sharing_keys_in_opposite_orders_never_deadlock(db, pg, database_url):
    for shared, extra, rounds in ((50, 10, 60), (300, 100, 8)):  # a function call; COPY
        for _ in range(rounds):
            assert one_round(db, pg, database_url, shared, extra) == []
    stored = query(pg, "SELECT count(*) FROM mlops_rollup_conversations")[0][0]
    assert stored == 60 * 60 + 8 * 400


def current_function() -> str:
    """The CREATE FUNCTION of the current insert function, without its migration's schema."""
    sql = store.insert_function_sql()
    return sql[sql.index("CREATE OR REPLACE FUNCTION"):]


def unordered_function() -> str:
    """The current insert function with its ORDER BY clauses taken out: events and
    rollup keys in whatever order Postgres produces them."""
    function = current_function()
    assert function.count(" ORDER BY ") == 5
    return re.sub(r"\n\s*ORDER BY s\.event_id|ORDER BY 1, 2, 3|"
                  r" ORDER BY business_id, conversation_id", "", function)


def test_the_same_batches_deadlock_when_keys_are_taken_in_no_set_order(db, pg, database_url):
    """The check above can fail: with the previous insert function it does."""
    with pg.cursor() as cur:
        cur.execute(unordered_function())
    try:
        for _ in range(100):
            errors = one_round(db, pg, database_url, 50, 10)
            if errors:
                break
        assert errors, "no deadlock in 100 rounds"
        assert isinstance(errors[0], TransactionRolledBack)
        assert "deadlock detected" in str(errors[0])
    finally:
        with pg.cursor() as cur:
            cur.execute(current_function())


def test_a_deadlocked_group_commit_runs_again_within_its_deadline(db, pg, database_url, caplog):
    """A real deadlock: the delivery waits for a conversation row another session
    inserted, which then waits for one of the delivery's events. Only the
    delivery's session runs the deadlock check in time, so Postgres rolls the
    delivery back; it runs again once the other session is gone."""
    commit = GroupCommit(Delivery(db, Telemetry(max_series=100)))
    business, event_id = str(uuid.uuid4()), str(uuid.uuid4())
    other = psycopg2.connect(database_url)
    outcome: dict = {}

    def deliver():
        try:
            outcome["stored"] = commit([record(business, "k1", event_id)], timeout_ms=20_000)
        except Exception as exc:  # noqa: BLE001 - asserted below
            outcome["error"] = exc

    other_done = threading.Event()

    def insert_the_same_event():
        with other.cursor() as cur:
            cur.execute(_RAW_EVENT_SQL, (event_id, business))
        other_done.set()

    caplog.set_level(logging.WARNING, logger="mlops.deliver")
    try:
        with other.cursor() as cur:
            # This session never runs the deadlock check (superuser setting).
            cur.execute("SET deadlock_timeout = '1min'")
            cur.execute("INSERT INTO mlops_rollup_conversations VALUES "
                        "(%s, 'k1', current_date, current_date)", (business,))
        delivering = threading.Thread(target=deliver)
        delivering.start()
        wait_until(lambda: waiting_on_locks(pg) == 1, "the delivery waiting on k1")
        threading.Thread(target=insert_the_same_event, daemon=True).start()
        # Postgres rolls the delivery back; its next run waits on the other's event.
        assert other_done.wait(10), "the other session's insert never went through"
    finally:
        other.rollback()
        other.close()
    delivering.join(20)
    commit.stop()
    assert outcome == {"stored": {event_id}}
    retried = [r for r in caplog.records if r.getMessage().startswith("insert rolled back")]
    # Its next run may take the event back before the other session wakes: a second deadlock.
    assert retried and all("deadlock detected" in r.error for r in retried)
    assert query(pg, "SELECT conversation_id FROM mlops_events WHERE event_id = %s",
                 event_id) == [("k1",)]
    # The breaker stayed closed: a call that skips the database while it is down stores.
    second = record(business, "k2")
    assert store.insert_events(db, [second], 5000, skip_if_down=True) == {second.event_id}
