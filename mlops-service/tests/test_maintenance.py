"""Retention: raw events expire, rollups outlive them, one runner at a time, /track never waits."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest
import requests
from conftest import empty_tables, metric_values, query
from payloads import varied
from rollup_checks import assert_matches_raw
from support import wait_until

from mlops import store
from mlops.config import Settings
from mlops.db import Database
from mlops.maintenance import Maintenance
from mlops.schemas import MetricsEvent, Record


@pytest.fixture
def db(database_url):
    database = Database(Settings.from_env({"DATABASE_URL": database_url}))
    yield database
    database.close()
    empty_tables(database_url)


def seed(db, business: str, ages_days: list[int]) -> None:
    """One event per entry of ``ages_days``, received that many days ago."""
    now = datetime.now(UTC)
    records = [Record(str(uuid.uuid4()), now - timedelta(days=age, minutes=1),
                      MetricsEvent.model_validate(event))
               for age, event in zip(ages_days, varied(len(ages_days), [business], seed=4),
                                     strict=True)]
    store.insert_events(db, records, 5000)


def job(db, **kwargs) -> Maintenance:
    options = {"retention_days": None, "rollup_retention_days": None, "batch_rows": 3,
               "interval_seconds": 0, **kwargs}
    return Maintenance(db, **options)


def test_old_raw_events_go_and_rollups_still_answer(db, pg):
    business = str(uuid.uuid4())
    seed(db, business, [400, 40, 40, 40, 40, 31, 20, 20, 1, 0])
    year = store.analytics(db, business, 3650)
    done = job(db, retention_days=30).run_once()
    assert done["events_deleted"] == 6  # in batches of 3
    (oldest,), = query(pg, "SELECT min(received_at) FROM mlops_events WHERE business_id = %s",
                       business)
    assert datetime.now(UTC) - oldest < timedelta(days=30)
    assert query(pg, "SELECT count(*) FROM mlops_events WHERE business_id = %s",
                 business) == [(4,)]
    # Rollups outlive raw rows: the long window is unchanged.
    assert store.analytics(db, business, 3650) == year
    assert year["metrics"]["total_messages"] == 10
    # And the last 30 days still equal the raw rows that are left.
    assert_matches_raw(pg, store.analytics(db, business, 21), business, 21)


def test_rollup_retention_drops_old_days(db, pg):
    business = str(uuid.uuid4())
    seed(db, business, [400, 200, 20, 0])
    done = job(db, rollup_retention_days=100).run_once()
    assert done["rollups_deleted"] > 0
    after = store.analytics(db, business, 3650)
    assert after["metrics"]["total_messages"] == 2
    assert sum(i["messages"] for i in after["by_intent"]) == 2
    assert query(pg, "SELECT count(*) FROM mlops_rollup_intents WHERE business_id = %s "
                     "AND day < (now() AT TIME ZONE 'UTC')::date - 100", business) == [(0,)]
    assert query(pg, "SELECT count(*) FROM mlops_events WHERE business_id = %s",
                 business) == [(4,)]  # raw rows are RETENTION_DAYS's business


def test_one_runner_at_a_time(db, database_url, pg):
    business = str(uuid.uuid4())
    seed(db, business, [90, 90, 0])
    other = psycopg2.connect(database_url)
    with other.cursor() as cur:  # another replica in the middle of a round
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (store.MAINTENANCE_LOCK_KEY,))
        assert job(db, retention_days=30).run_once() is None
        assert query(pg, "SELECT count(*) FROM mlops_events WHERE business_id = %s",
                     business) == [(3,)]
    other.rollback()
    other.close()
    assert job(db, retention_days=30).run_once()["events_deleted"] == 2


@pytest.mark.parametrize("state", ["mlops_rollup_backfill", "mlops_rollup_intents_backfill"])
def test_retention_waits_for_the_backfill(db, pg, state):
    business = str(uuid.uuid4())
    seed(db, business, [90, 90, 0])
    with pg.cursor() as cur:  # pretend these rows predate the rollups (or the intents one)
        cur.execute(f"SELECT done_through, high_water FROM {state}")
        saved = cur.fetchone()
        cur.execute(f"UPDATE {state} SET done_through = 0, "
                    "high_water = (SELECT max(id) FROM mlops_events)")
    try:
        maintenance = job(db, retention_days=30)
        maintenance.budget_seconds = 0  # the round ends before the backfill does
        assert maintenance.run_once()["events_deleted"] == 0
        assert query(pg, "SELECT count(*) FROM mlops_events WHERE business_id = %s",
                     business) == [(3,)]
    finally:
        with pg.cursor() as cur:
            cur.execute(f"UPDATE {state} SET done_through = %s, high_water = %s", saved)


def test_track_never_waits_for_a_retention_batch(make_app, db, database_url):
    business = str(uuid.uuid4())
    seed(db, business, [90] * 50)
    client = make_app().test_client()
    other = psycopg2.connect(database_url)
    with other.cursor() as cur:  # a retention batch, deleted but not yet committed
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (store.MAINTENANCE_LOCK_KEY,))
        cur.execute(store.housekeeping.EXPIRE_EVENTS_SQL, {"days": 30, "limit": 1000})
        assert cur.rowcount == 50
        started = time.monotonic()
        event = varied(1, [business], seed=8)[0]
        assert client.post("/track", json=event).status_code == 201
        assert time.monotonic() - started < 1.0  # the insert timeout is 1 s
    other.commit()
    other.close()


def test_workers_expire_events_and_show_the_oldest_age(gunicorn, db, pg):
    business = str(uuid.uuid4())
    seed(db, business, [60, 45, 10])
    server = gunicorn(workers=3, RETENTION_DAYS=30, MAINTENANCE_INTERVAL_SECONDS=1)
    wait_until(lambda: query(pg, "SELECT count(*) FROM mlops_events WHERE business_id = %s",
                             business) == [(1,)],
               "the workers to expire the two events past 30 days", timeout=30, interval=0.2)
    requests.post(server.url + "/refresh-metrics", json={}, timeout=5)

    def oldest_age() -> float | None:
        """The gauge, once it shows the 10-day-old event (every worker reads it from Postgres)."""
        values = metric_values(requests.get(server.url + "/metrics", timeout=5).text)
        age = values[("mlops_events_oldest_age_seconds", ())]
        return age if age < 11 * 86400 else None

    age = wait_until(oldest_age, "the oldest age to drop under 11 days", timeout=15, interval=0.2)
    assert 10 * 86400 <= age < 11 * 86400


def test_an_empty_table_reports_no_age(make_app):
    client = make_app().test_client()
    client.post("/refresh-metrics", json={})
    values = metric_values(client.get("/metrics").get_data(as_text=True))
    assert values[("mlops_events_oldest_age_seconds", ())] == 0.0
