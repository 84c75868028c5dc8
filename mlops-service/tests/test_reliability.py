"""Lose nothing: database outages, stalls, slowness, crashes and shutdowns under load.

Each test runs real gunicorn against a private PostgreSQL cluster (initdb +
pg_ctl on a free port), shared by the module, that a test can stop and start
without touching the machine's own server; each test leaves it running and
its events table empty. A TCP proxy in front of it plays a silent server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
import requests
from conftest import EMPTY_TABLES_SQL
from payloads import SUCCESS, varied
from pgcluster import PgCluster
from support import spool_depth, wait_drained, wait_until
from tcpproxy import StallingProxy

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def shared_cluster():
    c = PgCluster()
    c.start()
    yield c
    c.destroy()


@pytest.fixture
def cluster(shared_cluster):
    """The module's cluster, running; emptied of events after the test."""
    yield shared_cluster
    shared_cluster.start_if_stopped()
    shared_cluster.psql(EMPTY_TABLES_SQL)


def stored_ids(cluster: PgCluster) -> list[str]:
    conn = psycopg2.connect(cluster.url(), connect_timeout=5)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('mlops_events') IS NOT NULL")
        if not cur.fetchone()[0]:
            return []
        cur.execute("SELECT event_id FROM mlops_events")
        ids = [row[0] for row in cur.fetchall()]
    conn.close()
    return ids


@dataclass
class Reply:
    event_id: str
    status: int | None  # None: no HTTP answer
    error: str | None
    sent_at: float
    latency: float


def paced_load(url: str, events: list[dict], rate: float, path: str = "/track") -> list[Reply]:
    """POST each event at ``rate`` per second on a fresh connection, as the app does.

    The client gives each call 5 s, like the Next.js app. Returns one Reply each.
    """
    start = time.monotonic()

    def one(index_event):
        index, event = index_event
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the pace: event ``index`` goes at ``index / rate`` s
        sent = time.monotonic()
        try:
            status = requests.post(url + path, json=event, timeout=5).status_code
            error = None
        except requests.RequestException as exc:
            status, error = None, f"{type(exc).__name__}: {exc}"
        return Reply(event["event_id"], status, error, sent - start, time.monotonic() - sent)

    with ThreadPoolExecutor(max_workers=48) as pool:
        return list(pool.map(one, enumerate(events)))


def with_ids(events: list[dict]) -> list[dict]:
    return [{**e, "event_id": str(uuid.uuid4())} for e in events]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_an_outage_under_load_loses_and_doubles_nothing(cluster, gunicorn):
    server = gunicorn(workers=3, DATABASE_URL=cluster.url())
    events = with_ids(varied(1200, ["biz-a", "biz-b", "biz-c"], seed=3))

    def outage():
        wait_until(lambda: len(stored_ids(cluster)) >= 200, "rows before the outage")
        cluster.stop("fast")
        down_at = time.monotonic()
        wait_until(lambda: spool_depth(server.url) >= 400, "events spooled")
        cluster.start()
        outage_window.extend([down_at, time.monotonic()])

    outage_window: list[float] = []
    chaos = threading.Thread(target=outage)
    started = time.monotonic()
    chaos.start()
    replies = paced_load(server.url, events, rate=200)
    chaos.join()
    wait_drained(server.url)

    ok = [r for r in replies if r.status is not None and 200 <= r.status < 300]
    ids = stored_ids(cluster)
    down, up = (t - started for t in outage_window)
    during = [r.latency for r in replies if down <= r.sent_at <= up]
    queued = sum(r.status == 202 for r in replies)
    print(f"\noutage: sent {len(replies)}, 2xx {len(ok)} ({queued} queued), "
          f"max latency {max(r.latency for r in replies) * 1000:.0f} ms "
          f"(during outage: max {max(during) * 1000:.0f} ms, "
          f"p99 {percentile(during, 0.99) * 1000:.0f} ms), rows {len(ids)}, "
          f"duplicates {len(ids) - len(set(ids))}")
    assert [r for r in replies if r not in ok] == []
    assert max(r.latency for r in replies) < 5.0
    assert queued > 0, "the outage never reached the service"
    assert len(ids) == len(set(ids)) == len(ok)
    assert set(ids) == {r.event_id for r in ok}


def test_a_worker_killed_mid_flush_loses_and_doubles_nothing(cluster, gunicorn):
    server = gunicorn(workers=2, DATABASE_URL=cluster.url())
    cluster.stop("fast")
    events = with_ids(varied(1500, ["biz-k"], seed=5))
    replies = paced_load(server.url, events, rate=1000)
    assert {r.status for r in replies} == {202}

    cluster.start()
    # Kill every worker as soon as the flusher has committed its first batch.
    wait_until(lambda: stored_ids(cluster), "the flusher's first batch", interval=0.01)
    for pid in server.worker_pids():
        os.kill(pid, signal.SIGKILL)
    first = len(stored_ids(cluster))
    assert 0 < first < len(events), "the kill did not land mid-flush"

    # The master starts new workers; they take over the spool.
    wait_drained(server.url)
    ids = stored_ids(cluster)
    assert len(ids) == len(set(ids)) == len(events)


def test_a_killed_server_resumes_from_its_spool_on_restart(cluster, gunicorn):
    server = gunicorn(workers=2, DATABASE_URL=cluster.url())
    cluster.stop("fast")
    events = with_ids(varied(300, ["biz-r"], seed=8))
    assert {r.status for r in paced_load(server.url, events, rate=500)} == {202}
    for pid in server.worker_pids():
        os.kill(pid, signal.SIGKILL)
    server.stop(signal.SIGKILL)

    cluster.start()
    restarted = gunicorn(workers=2, DATABASE_URL=cluster.url())
    wait_drained(restarted.url)
    ids = stored_ids(cluster)
    assert sorted(ids) == sorted(e["event_id"] for e in events)


def test_sigterm_under_load_resets_no_connection_and_loses_no_event(cluster, gunicorn):
    server = gunicorn(workers=2, DATABASE_URL=cluster.url())
    events = with_ids(varied(600, ["biz-t"], seed=9))

    def terminate():
        wait_until(lambda: len(stored_ids(cluster)) >= 150, "rows before SIGTERM")
        server.proc.send_signal(signal.SIGTERM)

    killer = threading.Thread(target=terminate)
    killer.start()
    replies = paced_load(server.url, events, rate=300)
    killer.join()
    assert server.proc.wait(timeout=15) == 0

    ok = [r for r in replies if r.status is not None and 200 <= r.status < 300]
    failed = [r for r in replies if r not in ok]
    # After the listener closes, new connections are refused: never reset,
    # never a half-answered request.
    assert all("Connection refused" in r.error and "reset" not in r.error for r in failed), \
        {r.error for r in failed}
    assert ok and failed, "SIGTERM must land in the middle of the load"

    restarted = gunicorn(workers=2, DATABASE_URL=cluster.url())
    wait_drained(restarted.url)
    assert set(stored_ids(cluster)) == {r.event_id for r in ok}


def accept_queue(port: int) -> int:
    """Connections waiting in the listen queue of 127.0.0.1:``port`` (/proc/net/tcp, proc(5):
    a listening socket's rx_queue is its accept queue's length)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "0A" and int(local.split(":")[1], 16) == port:  # 0A: LISTEN
            return int(queues.split(":")[1], 16)
    return 0


def test_connections_queued_when_the_workers_stop_are_answered_not_reset(gunicorn,
                                                                        database_url):
    """Connections waiting in the listen queue at SIGTERM are accepted and answered.

    Both workers are frozen (SIGSTOP) while 20 connections queue up and the
    master is told to stop; once they run again, each finds its SIGTERM
    pending and stops accepting at once. gunicorn's own gevent worker then
    closes the listener with the queued connections still in it (the
    kernel resets them); the service's worker accepts them first.
    """
    server = gunicorn(workers=2)
    workers = server.worker_pids()
    events = with_ids([SUCCESS] * 20)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(max_workers=len(events)) as pool:
            def post(event):
                try:
                    return requests.post(f"{server.url}/track", json=event, timeout=10).status_code
                except requests.RequestException as exc:
                    return f"{type(exc).__name__}: {exc}"

            replies = [pool.submit(post, e) for e in events]
            wait_until(lambda: accept_queue(server.port) == len(events),
                       "connections in the listen queue", timeout=5)
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(1.5)  # past the workers' one-second check of "still alive?"
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
            answers = [r.result() for r in replies]
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert server.proc.wait(timeout=15) == 0
    assert answers == [201] * len(events), answers
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM mlops_events WHERE event_id = ANY(%s)",
                    ([e["event_id"] for e in events],))
        assert cur.fetchone()[0] == len(events)


def test_starting_with_the_database_down_spools_then_delivers(cluster, gunicorn):
    cluster.stop("fast")
    server = gunicorn(workers=2, DATABASE_URL=cluster.url())
    assert requests.get(f"{server.url}/health/ready", timeout=5).status_code == 503
    events = with_ids(varied(50, ["biz-s"], seed=2))
    replies = [requests.post(f"{server.url}/track", json=e, timeout=5) for e in events]
    assert {r.status_code for r in replies} == {202}
    assert {r.json()["storage"] for r in replies} == {"queued"}
    detailed = requests.get(f"{server.url}/health/detailed", timeout=5).json()
    assert detailed["spool"]["depth"] == 50 and detailed["spool"]["oldest_age_seconds"] > 0
    metrics = requests.get(f"{server.url}/metrics", timeout=5).text
    assert "mlops_spool_events 50.0" in metrics
    assert "mlops_events_queued_total 50.0" in metrics

    cluster.start()
    wait_drained(server.url)
    assert requests.get(f"{server.url}/health/ready", timeout=5).status_code == 200
    assert sorted(stored_ids(cluster)) == sorted(e["event_id"] for e in events)
    metrics = requests.get(f"{server.url}/metrics", timeout=5).text
    assert "mlops_events_replayed_total 50.0" in metrics
    assert "mlops_spool_events 0.0" in metrics


def test_a_full_spool_answers_503_with_retry_after_and_keeps_what_it_took(cluster, gunicorn):
    server = gunicorn(workers=2, DATABASE_URL=cluster.url(), SPOOL_MAX_BYTES=1 << 20,
                      LOG_LEVEL="INFO")
    cluster.stop("fast")
    taken, refused = [], None
    for _ in range(40):
        batch = with_ids([SUCCESS] * 200)
        response = requests.post(f"{server.url}/track/batch", json=batch, timeout=10)
        if response.status_code == 503:
            refused = response
            break
        assert response.status_code == 207
        taken += [e["event_id"] for e in batch]
    assert refused is not None, "the spool never filled"
    assert refused.headers["Retry-After"] == "5"
    assert refused.json()["error"] == "spool_full"
    assert 'mlops_events_rejected_total{reason="spool_full"} 1.0' in requests.get(
        f"{server.url}/metrics", timeout=5).text
    assert '"message": "spool full' in server.log()

    cluster.start()
    wait_drained(server.url)
    assert sorted(stored_ids(cluster)) == sorted(taken)




def ready_latency(url: str) -> tuple[int, float]:
    started = time.monotonic()
    status = requests.get(f"{url}/health/ready", timeout=5).status_code
    return status, time.monotonic() - started


def test_a_silent_database_holds_no_request_and_loses_nothing(cluster, gunicorn):
    """30 s with the database silent (a partition): every /track answers fast, 2xx."""
    proxy = StallingProxy(cluster.port)
    try:
        server = gunicorn(workers=3, DATABASE_URL=proxy.url(), wait_for="/health/ready")
        # Warm every worker's pool, as in steady traffic.
        warm = with_ids(varied(150, ["biz-w"], seed=4))
        warmed = paced_load(server.url, warm, rate=150)
        assert {r.status for r in warmed} <= {201, 202}
        assert sum(r.status == 201 for r in warmed) > 100
        wait_drained(server.url)

        events = with_ids(varied(1000, ["biz-p"], seed=6))
        readiness: list[tuple[int, float]] = []

        def probe_readiness():
            while not done.is_set():
                readiness.append(ready_latency(server.url))
                done.wait(0.5)

        done = threading.Event()
        proxy.stall()
        prober = threading.Thread(target=probe_readiness)
        prober.start()
        replies = paced_load(server.url, events, rate=33.4)  # 30 s
        done.set()
        prober.join()
        proxy.resume()
        wait_drained(server.url)

        latencies = [r.latency for r in replies]
        print(f"\nstall: sent {len(replies)}, statuses {sorted({r.status for r in replies})}, "
              f"p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
              f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms, "
              f"max {max(latencies) * 1000:.0f} ms; readiness "
              f"{sorted({s for s, _ in readiness})}, max {max(t for _, t in readiness):.2f} s")
        assert [r for r in replies if r.status not in (201, 202)] == []
        assert sum(r.status == 202 for r in replies) > 900
        assert percentile(latencies, 0.99) <= 0.25
        assert max(latencies) < 1.0
        assert len(readiness) >= 25 and {s for s, _ in readiness} == {503}
        assert max(t for _, t in readiness) < 1.0
        ids = stored_ids(cluster)
        assert len(ids) == len(set(ids))
        assert set(ids) == {e["event_id"] for e in warm + events}
    finally:
        proxy.close()


def test_a_slow_database_spools_within_the_deadline_and_loses_nothing(cluster, gunicorn):
    """Every insert takes 2 s (a trigger sleeps): requests answer 202 fast, then all land."""
    server = gunicorn(workers=2, DATABASE_URL=cluster.url(), wait_for="/health/ready")
    cluster.psql("CREATE OR REPLACE FUNCTION mlops_test_slow() RETURNS trigger "
                 "LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$;"
                 "CREATE TRIGGER mlops_test_slow BEFORE INSERT ON mlops_events "
                 "FOR EACH STATEMENT EXECUTE FUNCTION mlops_test_slow()")
    try:
        events = with_ids(varied(100, ["biz-slow"], seed=12))
        replies = paced_load(server.url, events, rate=50)
        assert {r.status for r in replies} == {202}
        assert max(r.latency for r in replies) < 1.0
    finally:
        cluster.psql("DROP TRIGGER mlops_test_slow ON mlops_events")
    wait_drained(server.url)
    ids = stored_ids(cluster)
    assert sorted(ids) == sorted(e["event_id"] for e in events)
