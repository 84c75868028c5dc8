"""The service as deployed: real gunicorn, three workers, real Postgres."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest
import requests
from conftest import metric_sum, metric_values
from payloads import FAILURE, SUCCESS, money, varied
from servers import SERVICE_DIR, Gunicorn
from support import wait_until

pytestmark = pytest.mark.system


def send(url: str, event: dict) -> tuple[int, int]:
    """What the Next.js app does per message: /track, then /refresh-metrics."""
    with requests.Session() as http:
        tracked = http.post(f"{url}/track", json=event, timeout=5).status_code
        refreshed = http.post(f"{url}/refresh-metrics", json={"trigger": "new_metrics"},
                              timeout=3).status_code
    return tracked, refreshed


def test_metrics_from_three_workers_add_up_and_analytics_survive_a_restart(gunicorn):
    server = gunicorn(workers=3)
    businesses = [str(uuid.uuid4()) for _ in range(3)]
    events = varied(300, businesses, seed=11) + [SUCCESS, FAILURE]
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda e: send(server.url, e), events))
    assert statuses == [(201, 200)] * len(events)
    assert len(server.worker_pids()) == 3

    # Several scrapes land on different workers; each must show the full totals.
    for _ in range(6):
        values = metric_values(requests.get(f"{server.url}/metrics", timeout=5).text)
        for business in businesses + [SUCCESS["business_id"], FAILURE["business_id"]]:
            sent = [e for e in events if e["business_id"] == business]
            assert metric_sum(values, "ai_tokens_used_total", business_id=business) == sum(
                e["tokens_used"] for e in sent)
            assert money(metric_sum(values, "ai_api_cost_usd_total", business_id=business)) == \
                sum(money(e["api_cost_usd"]) for e in sent)
            assert metric_sum(values, "ai_requests_total", business_id=business) == len(sent)
            assert metric_sum(values, "mlops_business_messages_30d",
                              business_id=business) == len(sent)
        assert metric_sum(values, "ai_response_time_seconds_count") == len(events)
        assert metric_sum(values, "mlops_events_stored_total") == len(events)
        assert metric_sum(values, "http_requests_total", endpoint="/track") == len(events)

    expected = {b: _expected(events, b) for b in businesses}
    assert {b: _analytics(server.url, b) for b in businesses} == expected

    assert server.stop() == 0
    restarted = gunicorn(workers=3)
    assert {b: _analytics(restarted.url, b) for b in businesses} == expected
    values = metric_values(requests.get(f"{restarted.url}/metrics", timeout=5).text)
    for business in businesses:
        assert metric_sum(values, "mlops_business_messages_30d", business_id=business) == \
            expected[business]["total_messages"]
        assert metric_sum(values, "ai_requests_total", business_id=business) == 0


def _expected(events: list[dict], business: str) -> dict:
    sent = [e for e in events if e["business_id"] == business]
    return {
        "total_messages": len(sent),
        "total_tokens": sum(e["tokens_used"] for e in sent),
        "total_api_cost_usd": sum(money(e["api_cost_usd"]) for e in sent),
        "appointment_requests": sum(e["appointment_requested"] for e in sent),
        "appointments_booked": sum(bool(e.get("appointment_booked")) for e in sent),
        "human_handoffs": sum(e["human_handoff_requested"] for e in sent),
    }


def _analytics(url: str, business: str) -> dict:
    response = requests.get(f"{url}/analytics/{business}", timeout=5)
    assert response.status_code == 200
    m = response.json()["metrics"]
    return {**{k: m[k] for k in ("total_messages", "total_tokens", "appointment_requests",
                                 "appointments_booked", "human_handoffs")},
            "total_api_cost_usd": money(m["total_api_cost_usd"])}


def _backends_waiting_on_a_lock(database_url: str) -> int:
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'")
        return cur.fetchone()[0]


def test_a_worker_answers_other_requests_while_one_waits_on_postgres(gunicorn, database_url):
    """One worker: a /track held in Postgres (a table lock) must not hold up /health.

    The worker serves requests as gevent greenlets and psycopg2 waits through
    gevent (psycogreen): without that, the worker's one thread would sit in
    libpq until the insert's deadline, and /health with it.
    """
    server = gunicorn(workers=1, DB_INSERT_TIMEOUT_MS=3000)
    assert requests.post(f"{server.url}/track", json=SUCCESS, timeout=5).status_code == 201
    locker = psycopg2.connect(database_url)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE mlops_events IN ACCESS EXCLUSIVE MODE")
        with ThreadPoolExecutor(max_workers=1) as pool:
            held = pool.submit(requests.post, f"{server.url}/track", json=FAILURE, timeout=10)
            wait_until(lambda: _backends_waiting_on_a_lock(database_url),
                       "the insert to reach the lock", timeout=2, interval=0.01)
            started = time.monotonic()
            health = requests.get(f"{server.url}/health", timeout=5)
            elapsed = time.monotonic() - started
            assert health.status_code == 200 and elapsed < 0.5, elapsed
            assert not held.done()
            locker.rollback()
            assert held.result().status_code == 201
    finally:
        locker.close()


def test_workers_told_to_stop_while_booting_exit_by_themselves(service_env):
    """SIGTERM as soon as the workers are forked, before gunicorn gives them their own
    handlers: each worker still exits by itself (logs "Worker exiting") instead of
    booting, serving, and being killed when graceful_timeout (8 s) runs out."""
    server = Gunicorn({**service_env, "LOG_LEVEL": "INFO"}, workers=3)  # gunicorn's lines
    server.output.parent.mkdir(parents=True, exist_ok=True)
    with open(server.output, "ab") as out:
        server.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
            cwd=SERVICE_DIR, env=server.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: server.log().count("Booting worker with pid") == 3,
                   "three workers forked", interval=0.005)
    finally:
        assert server.stop() == 0
    log = server.log()
    assert log.count("Worker exiting") == 3, log
    assert "SIGKILL" not in log and "graceful timeout" not in log.lower(), log
