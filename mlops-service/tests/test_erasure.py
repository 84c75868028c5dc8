"""Erasure: a conversation's or a business's rows leave the events, the spool and every rollup."""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
import pytest
import requests
from conftest import metric_sum, metric_values, query
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from payloads import SUCCESS, varied
from rollup_checks import assert_matches_raw, assert_totals_match_raw
from support import wait_until

from mlops import store
from mlops.auth import key_id
from mlops.maintenance import Maintenance
from mlops.schemas import MetricsEvent, Record
from mlops.services import get_services

KEY = "erasure-test-key-0123456789"


def seed(db, events: list[dict], days_ago: int = 0) -> None:
    at = datetime.now(UTC) - timedelta(days=days_ago)
    store.insert_events(db, [Record(str(uuid.uuid4()), at, MetricsEvent.model_validate(e))
                             for e in events], 5000)


def audit_lines(app) -> list[dict]:
    log = get_services(app).settings.log_dir / "mlops-service.log"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return [line for line in lines if line.get("logger") == "mlops.audit"]


def test_a_conversation_leaves_events_rollups_and_gauges(make_app, db, pg):
    app = make_app()
    client = app.test_client()
    business, other = str(uuid.uuid4()), str(uuid.uuid4())
    events = varied(200, [business, other], seed=13)
    seed(db, events[:120], days_ago=1)
    seed(db, events[120:])
    target = events[0]["conversation_id"]
    mine = [e for e in events if e["conversation_id"] == target]
    client.post("/refresh-metrics", json={})
    before = metric_values(client.get("/metrics").get_data(as_text=True))

    response = client.delete(f"/conversations/{target}")

    assert response.status_code == 200
    removed = response.get_json()["removed"]
    assert removed["mlops_events"] == len(mine)
    assert removed["mlops_rollup_conversations"] == 1
    assert removed["spooled_events"] == 0
    assert query(pg, "SELECT count(*) FROM mlops_events WHERE conversation_id = %s",
                 target) == [(0,)]
    assert query(pg, "SELECT count(*) FROM mlops_rollup_conversations "
                     "WHERE conversation_id = %s", target) == [(0,)]
    for b in (business, other):
        assert_matches_raw(pg, client.get(f"/analytics/{b}?days=7").get_json(), b, 7)
    assert_totals_match_raw(pg, store.business_totals(db, 30), 30)
    client.post("/refresh-metrics", json={})
    after = metric_values(client.get("/metrics").get_data(as_text=True))
    assert metric_sum(after, "mlops_business_messages_30d", business_id=business) == \
        metric_sum(before, "mlops_business_messages_30d", business_id=business) - len(mine)
    (line,) = audit_lines(app)
    assert line["erased"] == {"conversation_id": target}
    assert line["removed"] == removed
    assert line["key_id"] is None
    assert "erased_at" in line


def records(events: list[dict], days_ago: float = 0) -> list[Record]:
    at = datetime.now(UTC) - timedelta(days=days_ago)
    return [Record(str(uuid.uuid4()), at, MetricsEvent.model_validate(e)) for e in events]


@pytest.mark.parametrize("erased", ["conversation_id", "business_id"])
def test_copies_of_erased_events_held_elsewhere_are_refused(db, pg, erased):
    """Another replica's spool, or a request in flight, may hold events the erasure
    removed: delivered afterwards, through either insert path, they stay out."""
    business, other = str(uuid.uuid4()), str(uuid.uuid4())
    events = varied(300, [business, other], seed=17)
    value = events[0][erased]
    held = records([e for e in events if e[erased] == value], days_ago=1)
    kept = [e for e in events if e[erased] != value]
    store.insert_events(db, held + records(kept, days_ago=1), 5000)

    (store.erase_conversation if erased == "conversation_id" else store.erase_business)(
        db, value, 5000)
    assert store.insert_events(db, held[:3], 5000) == set()  # the function's path
    unrelated = records(kept[:store.COPY_THRESHOLD], days_ago=1)
    assert store.insert_events(db, held + unrelated, 5000) == {  # COPY's path
        r.event_id for r in unrelated}
    assert query(pg, f"SELECT count(*) FROM mlops_events WHERE {erased} = %s", value) == [(0,)]
    for b in (business, other):
        assert_matches_raw(pg, store.analytics(db, b, 7), b, 7)

    # What arrives after the erasure is a new message, and is kept.
    (later,) = records([next(e for e in events if e[erased] == value)])
    assert store.insert_events(db, [later], 5000) == {later.event_id}
    assert_totals_match_raw(pg, store.business_totals(db, 30), 30)


def test_a_business_leaves_everything_and_a_repeat_answers_zeros(client, db, pg):
    business = str(uuid.uuid4())
    seed(db, varied(50, [business, "stays"], seed=2), days_ago=3)
    seed(db, varied(10, [business], seed=3))

    first = client.delete(f"/businesses/{business}")
    again = client.delete(f"/businesses/{business}")

    assert first.status_code == again.status_code == 200
    assert first.get_json()["removed"]["mlops_events"] == 35
    assert first.get_json()["removed"]["mlops_rollup_daily"] > 0
    assert set(again.get_json()["removed"].values()) == {0}
    for table in ("mlops_events", "mlops_rollup_daily", "mlops_rollup_latency",
                  "mlops_rollup_intents", "mlops_rollup_conversations"):
        assert query(pg, f"SELECT count(*) FROM {table} WHERE business_id = %s",
                     business) == [(0,)]
    assert client.get(f"/analytics/{business}").get_json()["metrics"]["total_messages"] == 0
    assert_matches_raw(pg, store.analytics(db, "stays", 7), "stays", 7)


def test_spooled_events_are_erased_too(client, app, db):
    business = str(uuid.uuid4())
    outbox = get_services(app).outbox
    # Stop the flusher first: it would otherwise deliver the events to Postgres
    # before the erasure, and this test is about the ones still waiting.
    outbox.stop(drain_seconds=5)
    spool = outbox.spool
    waiting = [{**SUCCESS, "business_id": business, "conversation_id": c}
               for c in ("keep", "erase-me", "erase-me")]
    spool.put((str(uuid.uuid4()), time.time(), MetricsEvent.model_validate(e).model_dump_json())
              for e in waiting)
    response = client.delete("/conversations/erase-me")
    assert response.get_json()["removed"]["spooled_events"] == 2
    assert [json.loads(e.payload)["conversation_id"] for e in spool.peek(10)] == ["keep"]
    assert client.delete(f"/businesses/{business}").get_json()["removed"][
        "spooled_events"] == 1
    assert spool.depth() == 0


@pytest.mark.parametrize("path", ["/conversations/c-1", "/businesses/b-1"])
def test_erasure_needs_the_key_and_the_audit_names_it_by_hash(make_app, path):
    app = make_app(MLOPS_API_KEY=KEY)
    client = app.test_client()
    assert client.delete(path).status_code == 401
    assert client.delete(path, headers={"X-API-Key": "wrong"}).status_code == 403
    assert client.delete(path, headers={"X-API-Key": KEY}).status_code == 200
    (line,) = audit_lines(app)
    assert line["key_id"] == key_id(KEY, app)
    log = (get_services(app).settings.log_dir / "mlops-service.log").read_text()
    assert KEY not in log


def test_an_over_long_id_is_refused_by_name(client):
    response = client.delete("/conversations/" + "x" * 300)
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "conversation_id"


# The backfills' progress tables (migrations 0002 and 0004), and the rollups each fills.
STATES = {"mlops_rollup_backfill": ("mlops_rollup_daily", "mlops_rollup_latency",
                                    "mlops_rollup_conversations"),
          "mlops_rollup_intents_backfill": ("mlops_rollup_intents",)}


@pytest.mark.parametrize("pending", [tuple(STATES), ("mlops_rollup_intents_backfill",)],
                         ids=["every-rollup", "intents-only"])
def test_erasing_rows_the_backfill_has_not_reached(db, pg, pending):
    business = str(uuid.uuid4())
    events = varied(60, [business], seed=17)
    seed(db, events[:40])
    with pg.cursor() as cur:  # pretend the first 40 rows predate the (pending) rollups
        cur.execute("SELECT min(id), max(id) FROM mlops_events WHERE business_id = %s",
                    (business,))
        first, last = cur.fetchone()
        assert last == first + 39
        saved = {}
        for state in STATES:
            cur.execute(f"SELECT done_through, high_water FROM {state}")
            saved[state] = cur.fetchone()
        for state in pending:
            for table in STATES[state]:
                cur.execute(f"DELETE FROM {table} WHERE business_id = %s", (business,))
            cur.execute(f"UPDATE {state} SET done_through = %s, high_water = %s",
                        (first - 1, first + 39))
    try:
        seed(db, events[40:])  # the last 20, rolled up as they are written
        target = events[1]["conversation_id"]
        removed = store.erase_conversation(db, target, 5000)
        assert removed["mlops_events"] == sum(e["conversation_id"] == target for e in events)
        Maintenance(db, retention_days=None, rollup_retention_days=None, batch_rows=7,
                    interval_seconds=0).run_once()
        assert store.backfill_finished(db)
        assert_matches_raw(pg, store.analytics(db, business, 7), business, 7)
    finally:
        with pg.cursor() as cur:
            for state in STATES:
                cur.execute(f"UPDATE {state} SET done_through = %s, high_water = %s",
                            saved[state])


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed_=st.integers(0, 10**6), erase=st.lists(st.integers(0, 9), max_size=4),
       days=st.sampled_from([1, 2, 7]))
def test_random_erasures_leave_rollups_equal_to_raw(db, pg, seed_, erase, days):
    business = f"b-{uuid.uuid4()}"
    events = varied(60, [business], seed=seed_)
    conversations = sorted({e["conversation_id"] for e in events})
    for i, event in enumerate(events):
        event["conversation_id"] = f"{business}-{conversations.index(event['conversation_id'])}"
        event["response_time_ms"] = 1 + (seed_ + i) % 5000
    seed(db, events[:30], days_ago=1)
    seed(db, events[30:])
    for index in erase:
        store.erase_conversation(db, f"{business}-{index}", 5000)
    assert_matches_raw(pg, store.analytics(db, business, days), business, days)


# --- the audit trail (migrations/0011_erasure_audit.sql) ---------------------

READ_KEY = "erasure-test-read-key-0123456789"


def audit_rows(client, target_id: str, key: str = KEY) -> list[dict]:
    """The rows of GET /erasures about ``target_id``, newest first, every page."""
    rows, before = [], None
    while True:
        page = client.get("/erasures", query_string={"limit": 50, **(
            {"before": before} if before else {})}, headers={"X-API-Key": key})
        assert page.status_code == 200, page.get_json()
        body = page.get_json()
        rows += [r for r in body["erasures"] if r["target_id"] == target_id]
        if body["next_before"] is None:
            return rows
        before = body["next_before"]


def test_the_audit_row_outlives_200k_later_messages_and_names_the_key(make_app, db, pg):
    app = make_app(MLOPS_API_KEY=KEY)
    client = app.test_client()
    business = str(uuid.uuid4())
    seed(db, varied(30, [business], seed=5))
    erased = client.delete(f"/businesses/{business}", headers={"X-API-Key": KEY})
    assert erased.status_code == 200

    # 200k later messages through the store's COPY path (10k per transaction).
    event = MetricsEvent.model_validate({**SUCCESS, "business_id": f"load-{uuid.uuid4()}"})
    for _ in range(20):
        at = datetime.now(UTC)
        stored = store.insert_events(
            db, [Record(str(uuid.uuid4()), at, event) for _ in range(10_000)], 60_000)
        assert len(stored) == 10_000
    assert query(pg, "SELECT count(*) FROM mlops_events") == [(200_000,)]

    (row,) = audit_rows(client, business)
    assert row["outcome"] == "erased" and row["target"] == "business_id"
    assert row["key_id"] == key_id(KEY, app)
    assert row["events"] == 30 and row["spooled_events"] == 0 and row["rollup_changes"] > 0
    assert row["detail"]["removed"] == erased.get_json()["removed"]


def test_the_audit_trail_is_append_only(client, pg):
    assert client.delete("/conversations/audit-append-only").status_code == 200
    (audit_id,) = query(pg, "SELECT max(id) FROM mlops_erasure_audit")[0]
    for sql in ("UPDATE mlops_erasure_audit SET key_id = 'someone-else' WHERE id = %s",
                "DELETE FROM mlops_erasure_audit WHERE id = %s",
                "TRUNCATE mlops_erasure_audit"):
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="append-only"):
            query(pg, sql, audit_id) if "%s" in sql else query(pg, sql)
    assert query(pg, "SELECT key_id, target_id FROM mlops_erasure_audit WHERE id = %s",
                 audit_id) == [("none", "audit-append-only")]


def test_refusals_are_audited_and_the_trail_needs_an_erase_key(make_app):
    app = make_app(MLOPS_API_KEY=KEY, MLOPS_READ_API_KEY=READ_KEY)
    client = app.test_client()
    target = f"b-{uuid.uuid4()}"
    assert client.delete(f"/businesses/{target}").status_code == 401
    assert client.delete(f"/businesses/{target}",
                         headers={"X-API-Key": READ_KEY}).status_code == 403
    assert client.delete(f"/sessions/{target}",
                         headers={"X-API-Key": "wrong"}).status_code == 403
    assert client.get("/erasures", headers={"X-API-Key": READ_KEY}).status_code == 403
    assert client.get("/erasures").status_code == 401

    rows = audit_rows(client, target)
    assert [(r["outcome"], r["target"], r["key_id"], r["detail"]) for r in rows] == [
        ("refused", "session_id", key_id("wrong", app),
         {"status": 403, "reason": "forbidden"}),
        ("refused", "business_id", key_id(READ_KEY, app),
         {"status": 403, "reason": "forbidden"}),
        ("refused", "business_id", "none", {"status": 401, "reason": "unauthorized"}),
    ]
    assert {r["events"] for r in rows} == {0}


def test_the_trail_pages_newest_first(client):
    targets = [f"c-{uuid.uuid4()}" for _ in range(5)]
    for target in targets:
        assert client.delete(f"/conversations/{target}").status_code == 200
    seen, before = [], None
    while len(seen) < 5:
        body = client.get("/erasures", query_string={"limit": 2, **(
            {"before": before} if before else {})}).get_json()
        assert len(body["erasures"]) == 2 and body["next_before"] == body["erasures"][-1]["id"]
        seen += [r["target_id"] for r in body["erasures"]]
        before = body["next_before"]
    assert seen[:5] == targets[::-1]
    bad = client.get("/erasures?limit=0")
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "limit"


# --- erasure by session_id --------------------------------------------------

def test_a_session_leaves_events_rollups_spool_and_cannot_come_back(client, app, db, pg):
    business, other = str(uuid.uuid4()), str(uuid.uuid4())
    session = f"sess-{uuid.uuid4()}"
    events = varied(120, [business, other], seed=31)
    lone = f"conv-{uuid.uuid4()}"  # a conversation held only by this session
    for i, event in enumerate(events):
        if i % 3 == 0:
            event["session_id"] = session
        if i in (0, 6):
            event["conversation_id"] = lone
    mine = [e for e in events if e["session_id"] == session]
    held = records(mine[:4], days_ago=1)  # copies still in flight somewhere
    rest = [e for e in events if not any(e is m for m in mine[:4])]
    store.insert_events(db, held + records(rest[:60], days_ago=1) + records(rest[60:]), 5000)
    outbox = get_services(app).outbox
    outbox.stop(drain_seconds=5)
    outbox.spool.put([(str(uuid.uuid4()), time.time(), MetricsEvent.model_validate(
        {**SUCCESS, "session_id": s}).model_dump_json()) for s in (session, "stays")])

    response = client.delete(f"/sessions/{session}")

    assert response.status_code == 200
    removed = response.get_json()["removed"]
    assert response.get_json()["erased"] == {"session_id": session}
    assert removed["mlops_events"] == len(mine) and removed["spooled_events"] == 1
    assert removed["mlops_rollup_conversations"] == 1  # the lone one; the others keep events
    assert query(pg, "SELECT count(*) FROM mlops_events WHERE session_id = %s",
                 session) == [(0,)]
    assert query(pg, "SELECT count(*) FROM mlops_rollup_conversations "
                     "WHERE conversation_id = %s", lone) == [(0,)]
    assert [json.loads(e.payload)["session_id"] for e in outbox.spool.peek(10)] == ["stays"]
    for b in (business, other):
        assert_matches_raw(pg, store.analytics(db, b, 7), b, 7)
    assert_totals_match_raw(pg, store.business_totals(db, 30), 30)
    assert store.insert_events(db, held[:2], 5000) == set()  # the function's path
    unrelated = records([e for e in rest if e["session_id"] != session][:70])
    assert store.insert_events(db, held + unrelated, 5000) == {  # COPY's path
        r.event_id for r in unrelated}
    assert query(pg, "SELECT count(*) FROM mlops_events WHERE session_id = %s",
                 session) == [(0,)]
    (row,) = audit_rows(client, session)
    assert (row["target"], row["events"], row["spooled_events"]) == (
        "session_id", len(mine), 1)


# --- /metrics (mlops/erased_series.py) --------------------------------------

def business_series(text: str, business: str) -> dict:
    return {k: v for k, v in metric_values(text).items() if ("business_id", business) in k[1]}


def test_an_erased_business_leaves_metrics_in_one_process(client):
    business = str(uuid.uuid4())
    for _ in range(3):
        assert client.post("/track", json={**SUCCESS, "business_id": business}).status_code \
            == 201
    assert business_series(client.get("/metrics").get_data(as_text=True), business)
    assert client.delete(f"/businesses/{business}").status_code == 200
    assert business_series(client.get("/metrics").get_data(as_text=True), business) == {}


def _multiproc_dir(server) -> Path:
    """The server's PROMETHEUS_MULTIPROC_DIR (gunicorn.conf.py makes it with mkdtemp)."""
    pid = server.worker_pids()[0]
    (directory,) = [path.parent for path in Path(tempfile.gettempdir()).glob(
        f"mlops-prometheus-*/counter_{pid}.db")]
    return directory


def test_an_erased_business_leaves_metrics_of_every_gunicorn_worker(gunicorn):
    server = gunicorn(workers=2)
    directory = _multiproc_dir(server)
    business, other = str(uuid.uuid4()), str(uuid.uuid4())

    def post(business_id: str) -> int:
        return requests.post(f"{server.url}/track", json={**SUCCESS, "business_id": business_id},
                             timeout=10).status_code

    def counted_by() -> set[int]:
        """Workers whose metric files hold a series of ``business``."""
        files = {pid: directory / f"counter_{pid}.db" for pid in server.worker_pids()}
        # A worker's file appears with its first count.
        return {pid for pid, path in files.items()
                if path.exists() and business.encode() in path.read_bytes()}

    assert post(other) == 201
    with ThreadPoolExecutor(8) as pool:
        def counted_by_both() -> bool:
            if len(counted_by()) >= 2:
                return True
            assert set(pool.map(post, [business] * 16)) == {201}
            return False

        # Both workers count it: a remove() in one is not enough.
        wait_until(counted_by_both, "both workers to count the business", interval=0)

    def scrape() -> str:
        response = requests.get(f"{server.url}/metrics", timeout=10)
        assert response.status_code == 200
        return response.text

    assert business_series(scrape(), business)
    assert requests.delete(f"{server.url}/businesses/{business}", timeout=30).status_code == 200

    for _ in range(10):  # whichever worker answers
        text = scrape()
        assert business_series(text, business) == {}
        assert business_series(text, other)
    # Coming back, it counts from zero.
    assert [post(business) for _ in range(3)] == [201] * 3
    assert metric_sum(metric_values(scrape()), "ai_requests_total", business_id=business) == 3
    assert "Traceback" not in server.log()
