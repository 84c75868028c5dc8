"""Rollups equal the aggregates over raw rows, however the rows arrive.

Real Postgres throughout: in process (Flask's client, the store) and under
real gunicorn; the outage test stops a private cluster.
"""

from __future__ import annotations

import math
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest
import requests
from conftest import empty_tables, query
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from payloads import SUCCESS, varied
from pgcluster import PgCluster
from rollup_checks import assert_matches_raw, assert_totals_match_raw
from support import wait_until

from mlops import latency_histogram, migrate, store
from mlops.config import Settings
from mlops.db import Database
from mlops.maintenance import Maintenance
from mlops.schemas import MetricsEvent, Record


@pytest.fixture
def db(database_url):
    """A store-level connection pool on the test database, emptied after the test."""
    database = Database(Settings.from_env({"DATABASE_URL": database_url}))
    yield database
    database.close()
    empty_tables(database_url)


def record(event: dict, received_at: datetime | None = None, event_id: str | None = None):
    return Record(event_id or str(uuid.uuid4()), received_at or datetime.now(UTC),
                  MetricsEvent.model_validate(event))


def test_single_and_batch_writes_match_raw(client, pg, db):
    businesses = [str(uuid.uuid4()) for _ in range(2)]
    events = varied(300, businesses, seed=11)
    for event in events[:40]:
        assert client.post("/track", json=event).status_code == 201
    assert client.post("/track/batch", json=events[40:50]).status_code == 207  # VALUES
    assert client.post("/track/batch", json=events[50:]).status_code == 207  # COPY
    for business in businesses:
        for days in (1, 7, 30):
            assert_matches_raw(pg, client.get(f"/analytics/{business}?days={days}").get_json(),
                               business, days)
    assert_totals_match_raw(pg, store.business_totals(db, 30), 30)
    assert query(pg, "SELECT count(*) FROM mlops_events") == [(300,)]


def test_replayed_event_ids_count_once(client, pg, db):
    business = str(uuid.uuid4())
    events = [{**e, "event_id": str(uuid.uuid4())} for e in varied(120, [business], seed=3)]
    for _ in range(2):
        for event in events[:10]:
            assert client.post("/track", json=event).status_code == 201
        client.post("/track/batch", json=events[10:20])
        client.post("/track/batch", json=events[20:])
    # Duplicates inside one batch, through both insert paths.
    client.post("/track/batch", json=events[:5] * 2)
    client.post("/track/batch", json=events[:70] * 2)
    assert_matches_raw(pg, store.analytics(db, business, 30), business, 30)
    assert store.analytics(db, business, 30)["metrics"]["total_messages"] == 120


def test_the_insert_function_migration_is_the_store_statement():
    """The newest insert-function migration holds insert_sql as a function.

    When the SQL changes, add a migration holding the new insert_function_sql()
    and point store.INSERT_FUNCTION_MIGRATION at it.
    """
    path = migrate.MIGRATIONS_DIR / store.INSERT_FUNCTION_MIGRATION
    assert path.read_text() == store.insert_function_sql()
    newest = max(p.name for p in migrate.MIGRATIONS_DIR.glob("*_insert_function*.sql"))
    assert newest == store.INSERT_FUNCTION_MIGRATION


def test_the_insert_function_reuses_one_plan(pg):
    """Left to choose, Postgres plans each one-event call anew (store.insert_function_sql)."""
    assert query(pg, "SELECT proconfig FROM pg_proc WHERE proname = 'mlops_insert_events'") == [
        (["plan_cache_mode=force_generic_plan"],)]


def test_an_unknown_business_reads_zeros(db):
    result = store.analytics(db, str(uuid.uuid4()), 30)
    assert result["by_model"] == [] and result["daily"] == []
    assert result["metrics"]["total_messages"] == 0
    assert result["metrics"]["p95_response_time_ms"] == 0


_events = st.lists(
    st.tuples(
        st.integers(0, 9),  # days ago
        st.sampled_from(["m-a", "m-b"]),
        st.one_of(st.none(), st.sampled_from(["c1", "c2", "c3", "c4"])),
        st.floats(0, 120_000, allow_nan=False, allow_subnormal=False),
        st.booleans(), st.booleans(), st.booleans(),
        st.integers(0, 5000), st.integers(0, 10**6),
        st.sampled_from(["booking", "pricing", "general"]),
    ),
    min_size=1, max_size=150)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_events, split=st.integers(1, 100), replay=st.integers(0, 150),
       days=st.integers(1, 12))
def test_random_streams_match_raw(pg, db, rows, split, replay, days):
    business = str(uuid.uuid4())
    now = datetime.now(UTC)
    records = []
    for ago, model, conversation, rt, requested, booked, handoff, tokens, micro, intent in rows:
        records.append(record({
            **SUCCESS, "business_id": business, "model_name": model,
            "conversation_id": conversation, "response_time_ms": rt,
            "appointment_requested": requested, "appointment_booked": booked,
            "human_handoff_requested": handoff, "tokens_used": tokens,
            "api_cost_usd": micro / 1e6, "success_rate": (micro % 101) / 100,
            "intent_detected": intent,
        }, received_at=now - timedelta(days=ago, seconds=ago)))
    for start in range(0, len(records), split):
        store.insert_events(db, records[start:start + split], 5000)
    store.insert_events(db, records[:replay], 5000)  # an idempotent replay
    assert_matches_raw(pg, store.analytics(db, business, days), business, days)


@given(values=st.lists(st.floats(1, 1e10, allow_nan=False), min_size=1, max_size=300),
       q=st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99, 1.0]))
def test_histogram_percentiles_are_within_the_stated_error(values, q):
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    exact = ordered[low] + (rank - low) * (ordered[high] - ordered[low])
    histogram = {}
    for v in values:
        bucket = latency_histogram.bucket_of(v)
        histogram[bucket] = histogram.get(bucket, 0) + 1
    estimate = latency_histogram.percentile(histogram.items(), q)
    assert abs(estimate - exact) <= latency_histogram.RELATIVE_ERROR * exact * (1 + 1e-9)


def test_the_sql_bucket_agrees_with_the_documented_layout(pg):
    for value in (0, 0.999, 1, 1.0999, 1.1, 1432, 30012, 1e10):
        sql = latency_histogram.BUCKET_SQL.replace("response_time_ms", "%s::double precision")
        (bucket,), = query(pg, f"SELECT {sql}", value, value)
        assert bucket == latency_histogram.bucket_of(value)
        if bucket:
            assert latency_histogram.GROWTH ** (bucket - 1) <= value * (1 + 1e-12)
            assert value < latency_histogram.GROWTH ** bucket


def test_concurrent_writers_for_one_business_under_gunicorn(gunicorn, pg):
    server = gunicorn(workers=3)
    business = str(uuid.uuid4())
    events = varied(400, [business], seed=5)
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(
            lambda e: requests.post(server.url + "/track", json=e, timeout=10).status_code,
            events))
    assert statuses == [201] * len(events)
    assert_matches_raw(pg, requests.get(f"{server.url}/analytics/{business}", timeout=5).json(),
                       business, 30)
    # The writers spread over several rollup rows rather than queueing on one.
    (shards,), = query(pg, "SELECT count(DISTINCT shard) FROM mlops_rollup_daily "
                           "WHERE business_id = %s", business)
    assert shards > 1


def test_past_days_fold_into_one_row_without_changing_figures(pg, db):
    business = str(uuid.uuid4())
    yesterday = datetime.now(UTC) - timedelta(days=1)
    for event in varied(60, [business], seed=9):
        store.insert_events(db, [record(event, received_at=yesterday)], 1000)
    before = store.analytics(db, business, 7)
    tables = ("mlops_rollup_daily", "mlops_rollup_latency", "mlops_rollup_intents")
    for table in tables:
        assert query(pg, f"SELECT count(DISTINCT shard) > 1 FROM {table} "
                         "WHERE business_id = %s", business) == [(True,)]
    Maintenance(db, retention_days=None, rollup_retention_days=None, batch_rows=7,
                interval_seconds=0).run_once()
    for table in tables:
        assert query(pg, f"SELECT DISTINCT shard FROM {table} WHERE business_id = %s",
                     business) == [(0,)]
    after = store.analytics(db, business, 7)
    assert after["metrics"] == pytest.approx(before["metrics"])
    assert after["by_intent"] == before["by_intent"]
    assert [(d["p50_response_time_ms"], d["p95_response_time_ms"]) for d in after["daily"]] == \
        [(d["p50_response_time_ms"], d["p95_response_time_ms"]) for d in before["daily"]]
    assert_matches_raw(pg, after, business, 7)


def test_the_migration_backfills_existing_rows_in_batches(tmp_path, monkeypatch, database_url):
    """Rows stored before 0002 existed get rolled up by the maintenance job."""
    name = f"mlops_backfill_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(database_url)
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    url = database_url.rsplit("/", 1)[0] + "/" + name
    try:
        only_first = tmp_path / "migrations"
        only_first.mkdir()
        shutil.copy(migrate.MIGRATIONS_DIR / "0001_events.sql", only_first)
        conn = psycopg2.connect(url)
        conn.autocommit = True
        migrate.apply(conn, only_first)
        business = str(uuid.uuid4())
        old = [record(e, received_at=datetime.now(UTC) - timedelta(days=i % 3))
               for i, e in enumerate(varied(250, [business, "other"], seed=21))]
        with conn.cursor() as cur:  # the version-1 insert: events only
            cur.executemany(
                f"INSERT INTO mlops_events ({', '.join(store.events.INSERT_COLUMNS)}) "
                f"VALUES ({', '.join(['%s'] * len(store.events.INSERT_COLUMNS))})",
                [store.events.insert_row(r) for r in old])
        assert migrate.apply(conn) == sorted(
            int(path.name[:4]) for path in migrate.MIGRATIONS_DIR.glob("*.sql"))[1:]
        database = Database(Settings.from_env({"DATABASE_URL": url}))
        fresh = [record(e) for e in varied(30, [business], seed=22)]
        store.insert_events(database, fresh, 1000)  # new writes roll up at once
        assert store.analytics(database, business, 7)["metrics"]["total_messages"] == 30
        job = Maintenance(database, retention_days=None, rollup_retention_days=None,
                          batch_rows=40, interval_seconds=0)
        rounds = 0
        while not store.backfill_finished(database):
            job.run_once()
            rounds += 1
        assert rounds == 1  # one round runs batches until done (within its budget)
        for state in ("mlops_rollup_backfill", "mlops_rollup_intents_backfill"):
            assert query(conn, f"SELECT done_through, high_water FROM {state}") == \
                query(conn, "SELECT max(id), max(id) FROM mlops_events WHERE id <= 250")
        for b in (business, "other"):
            assert_matches_raw(conn, store.analytics(database, b, 7), b, 7)
        assert job.run_once()["backfilled"] == 0  # idempotent once finished
        assert_matches_raw(conn, store.analytics(database, business, 7), business, 7)
        database.close()
        conn.close()
    finally:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_spooled_events_replayed_after_an_outage_roll_up_once(tmp_path):
    cluster = PgCluster()
    cluster.start()
    try:
        from servers import Gunicorn

        url = cluster.url()
        server = Gunicorn({"DATABASE_URL": url, "LOG_DIR": str(tmp_path / "logs"),
                           "SPOOL_DIR": str(tmp_path / "spool"), "LOG_LEVEL": "WARNING",
                           "MAINTENANCE_INTERVAL_SECONDS": "0"}, workers=2).start()
        business = str(uuid.uuid4())
        events = varied(120, [business], seed=31)
        for event in events[:20]:
            assert requests.post(server.url + "/track", json=event, timeout=5).status_code == 201
        cluster.stop()
        statuses = [requests.post(server.url + "/track", json=e, timeout=5).status_code
                    for e in events[20:]]
        assert set(statuses) == {202}
        cluster.start()
        conn = wait_until(lambda: psycopg2.connect(url), "the cluster to accept connections",
                          interval=0.2, retry_on=psycopg2.OperationalError)
        conn.autocommit = True
        wait_until(lambda: query(conn, "SELECT count(*) FROM mlops_events") == [(120,)],
                   "all 120 events, the 100 spooled ones too, to be stored", timeout=30,
                   interval=0.2)
        result = requests.get(f"{server.url}/analytics/{business}", timeout=5).json()
        assert_matches_raw(conn, result, business, 30)
        assert result["metrics"]["total_messages"] == 120
        server.stop()
        conn.close()
    finally:
        cluster.destroy()


def test_messages_of_one_conversation_do_not_queue_on_its_row(client, database_url, pg):
    """Only a new day of a conversation touches its row; other messages pass a held lock."""
    business = str(uuid.uuid4())
    event = {**SUCCESS, "business_id": business, "conversation_id": "busy"}
    assert client.post("/track", json=event).status_code == 201
    other = psycopg2.connect(database_url)
    try:
        with other.cursor() as cur:  # a concurrent writer holding the conversation's row
            cur.execute("SELECT 1 FROM mlops_rollup_conversations WHERE business_id = %s "
                        "FOR UPDATE", (business,))
            # Stored (201), not spooled after the 1 s insert timeout (202).
            assert client.post("/track", json=event).status_code == 201
    finally:
        other.rollback()
        other.close()
    assert store_totals(pg, business) == (2, 1)


def store_totals(pg, business: str) -> tuple[int, int]:
    (n,), = query(pg, "SELECT sum(messages) FROM mlops_rollup_daily WHERE business_id = %s",
                  business)
    (c,), = query(pg, "SELECT count(*) FROM mlops_rollup_conversations WHERE business_id = %s",
                  business)
    return int(n), c


def test_sums_past_the_bigint_range_still_store(db):
    """The schema allows tokens_used up to 2^63-1; their sum must not overflow."""
    business = str(uuid.uuid4())
    huge = {**SUCCESS, "business_id": business, "tokens_used": 2**63 - 1}
    store.insert_events(db, [record(huge)], 1000)
    store.insert_events(db, [record(huge), record(huge)], 1000)
    assert store.analytics(db, business, 1)["metrics"]["total_tokens"] == 3 * (2**63 - 1)
    tokens = {b: t for b, _, t, _, _ in store.business_totals(db, 1)}
    assert tokens[business] == 3 * (2**63 - 1)


def test_subnormal_values_do_not_break_the_reads(client, db):
    """The schema accepts 5e-324; dividing it in Postgres raises "underflow"."""
    business = str(uuid.uuid4())
    tiny = {**SUCCESS, "business_id": business, "response_time_ms": 5e-324,
            "success_rate": 5e-324}
    zero = {**tiny, "response_time_ms": 0, "success_rate": 0}
    assert client.post("/track/batch", json=[tiny, zero]).status_code == 207  # mean 2.5e-324
    response = client.get(f"/analytics/{business}")
    assert response.status_code == 200
    assert response.get_json()["by_model"][0]["avg_response_time_ms"] <= 5e-324
    assert client.post("/refresh-metrics", json={}).get_json()["database_up"] is True


def test_window_totals_reread_settled_days_only_when_they_change(db, pg):
    """store.BusinessTotals (the /metrics gauges) keeps the days before yesterday
    until a late insert, an erasure or rollup retention changes them."""
    window = store.BusinessTotals(30)
    business, leaving = str(uuid.uuid4()), str(uuid.uuid4())
    now = datetime.now(UTC)

    def put(days_ago: int, biz: str = business) -> list[Record]:
        records = [record(e, now - timedelta(days=days_ago))
                   for e in varied(4, [biz], seed=days_ago)]
        store.insert_events(db, records, 5000)
        return records

    def agrees() -> list[tuple]:
        totals = window.read(db)
        assert_totals_match_raw(pg, totals, 30)
        return totals

    put(0), put(5), put(40), put(5, leaving)
    agrees()
    put(1)  # yesterday and today are read every time
    agrees()
    (late, *_) = put(3)  # a settled day: the insert bumps the epoch
    agrees()
    store.erase_conversation(db, late.event.conversation_id, 5000)
    agrees()
    store.erase_business(db, leaving, 5000)
    assert [b for b, *_ in agrees()] == [business]

    # The settled part really is kept: a change nothing announced stays unseen ...
    (before,) = window.read(db)
    query(pg, "UPDATE mlops_rollup_daily SET messages = messages + 100 "
              "WHERE day = (now() AT TIME ZONE 'UTC')::date - 5 RETURNING 1")
    assert window.read(db) == [before]
    assert store.business_totals(db, 30)[0][1] > before[1]
    # ... until the epoch moves, as rollup retention moves it.
    assert store.delete_expired_rollups(db, 4, 1000) > 0
    (reread,) = window.read(db)
    assert reread[:4] == store.business_totals(db, 30)[0][:4] and reread[1] < before[1]
