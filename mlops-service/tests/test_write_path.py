"""The write path's parts, each built with the real parts it needs (Postgres, the spool).

Fast tests of the subtle pieces: the outbox's (de)serialisation and its
crash window, the request's fallback to the outbox, who flushes, and the
per-label caps of the telemetry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
import pytest
from conftest import empty_tables, metric_sum, metric_values, query
from payloads import SUCCESS, varied
from prometheus_client import REGISTRY, generate_latest
from psycopg2.extensions import parse_dsn
from support import wait_until
from tcpproxy import StallingProxy

from mlops import store
from mlops.config import Settings
from mlops.db import Database, DatabaseUnavailable
from mlops.deliver import Delivery, GroupCommit
from mlops.ingest import Ingestor
from mlops.outbox import Outbox, from_row, to_row
from mlops.schemas import Record, parse_event
from mlops.spool import Spool, SpoolFull
from mlops.telemetry import OVERFLOW_LABEL, Telemetry


class Parts:
    """A database, spool, telemetry, delivery step, outbox and ingestor, wired like the app."""

    def __init__(self, url: str, spool_dir, *, max_series: int = 100,
                 spool_max_bytes: int = 1 << 20,
                 backoff_seconds: tuple[float, float] = (0.5, 10.0),
                 breaker_seconds: float = 0.2) -> None:
        settings = Settings.from_env({"DATABASE_URL": url, "DB_CONNECT_TIMEOUT_SECONDS": "1"})
        self.db = Database(settings, breaker_seconds=breaker_seconds)
        self.spool = Spool(spool_dir, spool_max_bytes)
        self.telemetry = Telemetry(max_series=max_series)
        self.deliver = Delivery(self.db, self.telemetry)
        self.outbox = Outbox(self.spool, self.deliver, timeout_ms=2000,
                             backoff_seconds=backoff_seconds)
        self.commit = GroupCommit(self.deliver)
        self.ingestor = Ingestor(self.commit, self.outbox, timeout_ms=500)

    def close(self) -> None:
        self.ingestor.stop()
        self.outbox.stop(0)
        self.db.close()
        self.spool.close()


@pytest.fixture
def parts(database_url, tmp_path):
    made = []

    def make(url: str = database_url, **kwargs) -> Parts:
        p = Parts(url, tmp_path / f"spool-{len(made)}", **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
    empty_tables(database_url)


def events(n: int, business: str | None = None) -> list:
    business = business or str(uuid.uuid4())
    return [parse_event({**e, "event_id": str(uuid.uuid4())}) for e in varied(n, [business])]


def scrape() -> dict:
    return metric_values(generate_latest(REGISTRY).decode())


def records_of(batch) -> list[Record]:
    return [Record(e.event_id, datetime.now(UTC), e) for e in batch]


def stored(pg, ids) -> list[str]:
    with pg.cursor() as cur:
        cur.execute("SELECT event_id FROM mlops_events WHERE event_id = ANY(%s)", (list(ids),))
        return [row[0] for row in cur.fetchall()]


def test_a_spool_row_gives_back_the_record_it_was_made_from(tmp_path):
    event = parse_event({**SUCCESS, "event_id": "e-1", "locale": "de-DE", "nested": {"a": [1]}})
    record = Record("e-1", datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), event)
    spool = Spool(tmp_path, 1 << 20)
    spool.put([to_row(record)])
    (item,) = spool.peek(10)
    assert from_row(item) == record
    assert from_row(item).event.model_extra == {"locale": "de-DE", "nested": {"a": [1]}}


def test_a_request_stores_directly_while_the_database_answers(parts, pg):
    p = parts()
    batch = events(3)
    before = scrape()
    storage, records, _ = p.ingestor.submit(batch)
    assert storage == "stored" and [r.event for r in records] == batch
    assert sorted(stored(pg, [r.event_id for r in records])) == sorted(
        r.event_id for r in records)
    assert metric_sum(scrape(), "mlops_events_stored_total") - metric_sum(
        before, "mlops_events_stored_total") == 3
    assert p.spool.depth() == 0


def test_events_without_an_id_get_one_and_a_utc_receive_time(parts):
    p = parts()
    event = parse_event(SUCCESS)
    _, (record,), _ = p.ingestor.submit([event])
    assert uuid.UUID(record.event_id)
    assert record.received_at.utcoffset() == timedelta(0)


def test_while_the_database_is_silent_only_the_first_request_waits(parts, database_url):
    proxy = StallingProxy(int(parse_dsn(database_url).get("port", 5432)))
    try:
        p = parts(proxy.url(parse_dsn(database_url)["dbname"]))
        assert p.ingestor.submit(events(1))[0] == "stored"  # a warm connection
        proxy.stall()
        started = time.monotonic()
        assert p.ingestor.submit(events(1))[0] == "queued"
        first = time.monotonic() - started
        started = time.monotonic()
        assert p.ingestor.submit(events(1))[0] == "queued"
        second = time.monotonic() - started
        assert 0.4 <= first < 1.0 and second < 0.05, (first, second)
        started = time.monotonic()  # a batch too large to join a group skips it too
        assert p.ingestor.submit(events(store.COPY_THRESHOLD))[0] == "queued"
        assert time.monotonic() - started < 0.3
    finally:
        proxy.close()


def test_failed_connects_give_their_pool_slot_back(parts):
    away = parts("postgresql://postgres@127.0.0.1:1/postgres")
    for _ in range(3):
        with pytest.raises(DatabaseUnavailable):
            away.db.ping()
    assert away.db.pool_in_use() == 0


def test_a_request_spools_when_the_database_is_away_then_the_flusher_delivers(parts, pg):
    away = parts("postgresql://postgres@127.0.0.1:1/postgres")
    batch = events(5)
    before = scrape()
    storage, records, _ = away.ingestor.submit(batch)
    assert storage == "queued" and away.spool.depth() == 5
    assert metric_sum(scrape(), "mlops_events_queued_total") - metric_sum(
        before, "mlops_events_queued_total") == 5
    # While the breaker is open the next request does not even try.
    assert away.ingestor.submit(events(1))[0] == "queued"
    assert stored(pg, [r.event_id for r in records]) == []


def test_the_flusher_delivers_through_the_same_step_and_counts_once(parts, pg, tmp_path,
                                                                    database_url):
    p = parts()
    batch = events(20)
    records = [Record(e.event_id, datetime.now(UTC), e) for e in batch]
    p.outbox.put(records)
    # The crash window: Postgres committed half of them, the spool delete never happened.
    assert len(store.insert_events(p.db, records[:10], 1000)) == 10
    before = scrape()
    assert p.outbox.flush_once() == 20
    assert p.spool.depth() == 0 and p.outbox.flush_once() == 0
    assert len(stored(pg, [r.event_id for r in records])) == 20
    after = scrape()
    assert metric_sum(after, "mlops_events_replayed_total") - metric_sum(
        before, "mlops_events_replayed_total") == 10
    business = batch[0].business_id
    assert metric_sum(after, "ai_requests_total", business_id=business) - metric_sum(
        before, "ai_requests_total", business_id=business) == 10


def test_a_failed_flush_leaves_the_batch_in_the_spool(parts):
    away = parts("postgresql://postgres@127.0.0.1:1/postgres")
    batch = events(3)
    away.outbox.put([Record(e.event_id, datetime.now(UTC), e) for e in batch])
    with pytest.raises(DatabaseUnavailable):
        away.outbox.flush_once()
    assert away.spool.depth() == 3


def test_only_one_process_leads_the_flush_and_stop_drains(parts, pg):
    first, second = parts(), parts()
    second.spool.close()
    second.spool = second.outbox.spool = first.spool  # one spool file, two outboxes
    assert first.outbox.try_lead() and not second.outbox.try_lead()
    batch = events(4)
    first.outbox.put([Record(e.event_id, datetime.now(UTC), e) for e in batch])
    assert first.outbox.stop(drain_seconds=5) == 0
    assert len(stored(pg, [e.event_id for e in batch])) == 4
    assert second.outbox.try_lead()  # the lock is free once the leader stops


def test_the_flusher_backs_off_exponentially_while_the_database_is_away(parts):
    away = parts("postgresql://postgres@127.0.0.1:1/postgres", backoff_seconds=(0.01, 0.04))
    away.outbox.put([Record(e.event_id, datetime.now(UTC), e) for e in events(1)])
    waits: list[float] = []

    class Waits(logging.Handler):
        def emit(self, record):
            waits.append(record.retry_in_seconds)

    handler = Waits()
    logger = logging.getLogger("mlops.outbox")
    logger.addHandler(handler)
    try:
        away.outbox.start()
        deadline = time.monotonic() + 10
        while len(waits) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        away.outbox.stop(0)
        logger.removeHandler(handler)
    assert waits[:5] == [0.01, 0.02, 0.04, 0.04, 0.04]
    assert away.spool.depth() == 1


def test_the_background_flusher_empties_the_spool(parts, pg):
    p = parts()
    batch = events(7)
    p.outbox.put([Record(e.event_id, datetime.now(UTC), e) for e in batch])
    p.outbox.start()
    p.outbox.start()  # idempotent
    deadline = time.monotonic() + 10
    while p.spool.depth() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.spool.depth() == 0 and len(stored(pg, [e.event_id for e in batch])) == 7


def test_a_full_spool_refuses_and_keeps_nothing_of_the_refused_batch(parts):
    away = parts("postgresql://postgres@127.0.0.1:1/postgres", spool_max_bytes=1 << 20)
    with pytest.raises(SpoolFull):
        for _ in range(200):
            away.ingestor.submit(events(100))
    depth = away.spool.depth()
    with pytest.raises(SpoolFull, match=r"^spool holds \d+ bytes, cap 1048576$"):
        away.ingestor.submit(events(1))
    assert away.spool.depth() == depth


def test_a_family_holds_at_most_its_series_budget(parts):
    """Label sets pass while the family's budget has room; the rest count under ``other``."""
    p = parts(max_series=3)  # ai_requests: two label sets, then "other"
    business = str(uuid.uuid4())

    def record(n: int, tag: str) -> None:
        p.telemetry.record_stored([Record(
            str(uuid.uuid4()), datetime.now(UTC),
            parse_event({**SUCCESS, "business_id": business, "model_name": f"{tag}{i}",
                         "intent_detected": f"{tag}{i}", "response_type": f"{tag}{i}"}))
            for i in range(n)])

    before = metric_sum(scrape(), "ai_requests_total", business_id=OVERFLOW_LABEL,
                        intent=OVERFLOW_LABEL, response_type=OVERFLOW_LABEL)
    record(2, "first")
    record(50, "flood")
    values = scrape()
    for i in range(2):
        assert metric_sum(values, "ai_requests_total", business_id=business,
                          intent=f"first{i}", response_type=f"first{i}") == 1
        assert metric_sum(values, "ai_tokens_used_total", business_id=business,
                          model_name=f"first{i}") == SUCCESS["tokens_used"]
    assert metric_sum(values, "ai_requests_total", business_id=business) == 2
    assert metric_sum(values, "ai_requests_total", business_id=OVERFLOW_LABEL,
                      intent=OVERFLOW_LABEL, response_type=OVERFLOW_LABEL) == before + 50
    # A histogram's label set costs its buckets + 3 series: a budget of 3 holds only "other".
    assert metric_sum(values, "gen_ai_client_operation_duration_seconds_count",
                      gen_ai_request_model="first0") == 0


def test_the_flusher_delivers_while_requests_skip_the_database(parts, database_url):
    """The breaker stops requests from waiting; it must not stop the flusher."""
    proxy = StallingProxy(int(parse_dsn(database_url).get("port", 5432)))
    try:
        # The probe (every 60 s) stays out of the way.
        p = parts(proxy.url(parse_dsn(database_url)["dbname"]), breaker_seconds=60)
        proxy.refuse()
        assert p.ingestor.submit(events(3))[0] == "queued"
        proxy.resume()
        assert p.ingestor.submit(events(1))[0] == "queued"  # the breaker is open
        assert p.outbox.flush_once() == 4
    finally:
        proxy.close()


def test_a_follower_takes_over_when_the_leader_stops(parts, pg):
    first, second = parts(), parts()
    second.spool.close()
    second.spool = second.outbox.spool = first.spool
    first.outbox.start()
    wait_until(lambda: first.outbox.leads, "the first flusher to take the lead", timeout=5,
               interval=0.01)
    second.outbox.start()
    time.sleep(0.2)  # the follower's first bid for the lock (nothing to observe) fails
    first.outbox.stop(0)
    batch = events(3)
    first.outbox.put([Record(e.event_id, datetime.now(UTC), e) for e in batch])
    deadline = time.monotonic() + 10
    while first.spool.depth() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.spool.depth() == 0 and len(stored(pg, [e.event_id for e in batch])) == 3


def test_the_spool_is_a_wal_file_whose_size_counts_live_pages_only(tmp_path):
    import sqlite3

    spool = Spool(tmp_path, 1 << 20)
    other = sqlite3.connect(spool.path)  # WAL mode is a property of the file
    assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    other.close()
    empty = spool.size_bytes()
    spool.put([(str(i), 0.0, "x" * 1000) for i in range(200)])
    full = spool.size_bytes()
    assert full > empty + 200 * 1000
    spool.remove(item.seq for item in spool.peek(200))
    assert spool.size_bytes() < full / 4 and spool.depth() == 0
    wal = spool.path.with_name(spool.path.name + "-wal")
    assert wal.exists()
    spool.close()
    assert not wal.exists()  # the last connection to the file closed: SQLite removes its WAL
    spool.close()  # idempotent


def test_the_spool_file_keeps_its_name_and_one_connection_per_thread(tmp_path):
    folder = tmp_path / "a" / "b"
    spool = Spool(folder, 1 << 20)
    assert spool.path == folder / "spool.sqlite3" and spool.path.exists()  # across upgrades

    def connections() -> int:  # this process's open descriptors of the spool file
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir()
                   if os.path.realpath(fd) == str(spool.path.resolve()))

    for _ in range(3):
        spool.depth()
    assert connections() == 1
    with ThreadPoolExecutor(1) as pool:
        pool.submit(spool.depth).result()
        assert connections() == 2  # the other thread's own
        pool.submit(spool.close).result()
    spool.close()


def test_wal_mode_waits_for_a_spool_another_process_is_creating(tmp_path):
    import sqlite3
    import threading

    from mlops.spool import _enable_wal

    path = tmp_path / "spool.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    waiter = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    errors: list[BaseException] = []

    def enable():
        try:
            _enable_wal(waiter, timeout_seconds=5.0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=enable)
    thread.start()
    time.sleep(0.1)  # the waiter retries while the lock is held
    assert thread.is_alive()
    holder.execute("COMMIT")
    thread.join(5)
    assert not thread.is_alive() and errors == []
    assert waiter.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    other = sqlite3.connect(tmp_path / "other.sqlite3", isolation_level=None)
    other_holder = sqlite3.connect(tmp_path / "other.sqlite3", isolation_level=None)
    other_holder.execute("BEGIN EXCLUSIVE")
    started = time.monotonic()
    other.execute("PRAGMA busy_timeout = 0")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _enable_wal(other, timeout_seconds=0.2)
    assert 0.2 <= time.monotonic() - started < 1.0
    for conn in (holder, waiter, other, other_holder):
        conn.close()


# --- group commit --------------------------------------------------------------

@contextlib.contextmanager
def rollups_locked(database_url):
    """Hold a lock that makes every insert wait (its rollup upsert), until the block ends."""
    conn = psycopg2.connect(database_url)
    with conn.cursor() as cur:
        cur.execute("LOCK TABLE mlops_rollup_daily IN EXCLUSIVE MODE")
    try:
        yield
    finally:
        conn.rollback()
        conn.close()


def await_(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def inserts_waiting_on_a_lock(pg) -> int:
    return query(pg, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                     "AND wait_event_type = 'Lock' AND query LIKE '%%mlops_insert_events%%'")[0][0]


def commits_holding(pg, ids) -> int:
    """How many transactions stored the events ``ids`` (rows of one share an xmin)."""
    return query(pg, "SELECT count(DISTINCT xmin::text) FROM mlops_events "
                     "WHERE event_id = ANY(%s)", list(ids))[0][0]


def test_concurrent_requests_share_commits_of_at_most_max_records(parts, pg, database_url):
    p = parts()
    commit = GroupCommit(p.deliver, max_records=4)
    calls = [[r] for r in records_of(events(11))]
    with ThreadPoolExecutor(len(calls)) as pool, rollups_locked(database_url):
        first = pool.submit(commit, calls[0], timeout_ms=10_000)
        await_(lambda: inserts_waiting_on_a_lock(pg) == 1)
        rest = [pool.submit(commit, call, timeout_ms=10_000) for call in calls[1:]]
        await_(lambda: commit.waiting() == 10)
    answers = [first.result(), *(f.result() for f in rest)]
    assert answers == [{call[0].event_id} for call in calls]  # each caller, its own ids
    ids = [call[0].event_id for call in calls]
    assert sorted(stored(pg, ids)) == sorted(ids)
    # One commit for the first call, then 4 + 4 + 2 for the ten queued behind it.
    assert commits_holding(pg, ids) == 4
    commit.stop()


def test_each_caller_is_told_only_its_own_new_events(parts, pg):
    p = parts()
    commit = GroupCommit(p.deliver)
    (old,), (new,) = records_of(events(1)), records_of(events(1))
    assert commit([old], timeout_ms=2000) == {old.event_id}
    assert commit([old, new], timeout_ms=2000) == {new.event_id}  # a replay is not new
    commit.stop()


def test_a_caller_past_its_deadline_while_queued_spools_and_is_stored_once(
        parts, pg, database_url):
    p = parts()
    blocked = records_of(events(1))
    with ThreadPoolExecutor(1) as pool, rollups_locked(database_url):
        first = pool.submit(p.ingestor.submit, [r.event for r in blocked], timeout_ms=10_000)
        await_(lambda: inserts_waiting_on_a_lock(pg) == 1)
        started = time.monotonic()
        storage, (late,), _ = p.ingestor.submit(events(1), timeout_ms=150)
        waited = time.monotonic() - started
        assert storage == "queued" and 0.14 <= waited < 1.0, (storage, waited)
        assert p.spool.depth() == 1
        # Never taken into a group: it is not in the transaction waiting on the lock.
        assert p.commit.waiting() == 0
    assert first.result()[0] == "stored"
    assert stored(pg, [late.event_id]) == []
    p.outbox.start()
    await_(lambda: p.spool.depth() == 0)
    assert stored(pg, [late.event_id]) == [late.event_id]


def test_after_stop_every_request_goes_to_the_outbox(parts):
    p = parts()
    assert p.ingestor.submit(events(1))[0] == "stored"
    p.ingestor.stop()
    assert p.ingestor.submit(events(1))[0] == "queued"
    assert p.spool.depth() == 1
    wait_until(lambda: not p.commit.running, "the committer thread to end too", timeout=2)


def test_stop_fails_the_callers_still_queued_at_once(parts, pg, database_url):
    p = parts()
    first, queued = records_of(events(1)), records_of(events(1))
    with ThreadPoolExecutor(2) as pool:
        with rollups_locked(database_url):
            running = pool.submit(p.commit, first, timeout_ms=10_000)
            await_(lambda: inserts_waiting_on_a_lock(pg) == 1)
            waiting = pool.submit(p.commit, queued, timeout_ms=10_000)
            await_(lambda: p.commit.waiting() == 1)
            p.commit.stop()
        assert running.result() == {first[0].event_id}  # the group in flight completes
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="stopping"):
            waiting.result()
        assert time.monotonic() - started < 1.0
    assert stored(pg, [queued[0].event_id]) == []


def test_a_batch_larger_than_a_group_is_delivered_in_the_callers_thread(parts, pg):
    p = parts()
    commit = GroupCommit(p.deliver, max_records=4)
    records = records_of(events(5))
    assert commit(records, timeout_ms=2000) == {r.event_id for r in records}
    assert commits_holding(pg, [r.event_id for r in records]) == 1
    assert commit.waiting() == 0 and not commit.running  # no committer was needed
    records = records_of(events(4))  # as many as a group takes: through the committer
    assert commit(records, timeout_ms=2000) == {r.event_id for r in records}
    assert commit.running
    commit.stop()


def held_by_another_business(event):
    """An event of a new business that reuses ``event``'s ``event_id``."""
    (other,) = events(1)
    return parse_event({**other.model_dump(), "event_id": event.event_id})


def test_a_conflict_is_told_to_its_own_caller_and_counted_once(parts, pg):
    p = parts()
    (held,) = events(1)
    assert p.ingestor.submit([held])[0] == "stored"
    fresh, clash = events(1)[0], held_by_another_business(held)
    before = scrape()
    storage, records, conflicts = p.ingestor.submit([fresh, clash])
    assert storage == "stored" and conflicts == {1}  # positions in the request
    assert stored(pg, [fresh.event_id]) == [fresh.event_id]
    after = scrape()
    assert metric_sum(after, "mlops_events_rejected_total", reason="event_id_conflict") \
        - metric_sum(before, "mlops_events_rejected_total", reason="event_id_conflict") == 1
    assert metric_sum(after, "mlops_events_stored_total") - metric_sum(
        before, "mlops_events_stored_total") == 1


def test_an_id_given_twice_in_one_delivery_is_stored_and_counted_once(parts, pg):
    p = parts()
    (record,) = records_of(events(1))
    before = scrape()
    assert p.deliver([record, record], timeout_ms=2000) == {record.event_id}
    assert metric_sum(scrape(), "mlops_events_stored_total") - metric_sum(
        before, "mlops_events_stored_total") == 1
    assert stored(pg, [record.event_id]) == [record.event_id]


def test_a_request_whose_times_do_not_match_its_events_is_refused(parts):
    p = parts()
    with pytest.raises(ValueError, match="zip"):
        p.ingestor.submit(events(2), times=[datetime.now(UTC)])
    assert p.spool.depth() == 0


def test_a_group_commit_says_why_a_call_was_not_delivered(parts, pg, database_url):
    p = parts()
    commit = GroupCommit(p.deliver)
    with ThreadPoolExecutor(1) as pool, rollups_locked(database_url):
        running = pool.submit(commit, records_of(events(1)), timeout_ms=10_000)
        await_(lambda: inserts_waiting_on_a_lock(pg) == 1)
        late = records_of(events(1))
        with pytest.raises(DatabaseUnavailable,
                           match="^deadline passed waiting for the group commit$"):
            commit(late, timeout_ms=100)
    assert len(running.result()) == 1
    commit.stop()
    with pytest.raises(DatabaseUnavailable, match="^the service is stopping$"):
        commit(records_of(events(1)), timeout_ms=2000)
    assert stored(pg, [late[0].event_id]) == []


def test_a_spooled_event_whose_id_another_business_holds_is_dropped_and_logged(parts, pg,
                                                                              caplog):
    p = parts()
    (held,) = events(1)
    assert p.ingestor.submit([held])[0] == "stored"
    clash = held_by_another_business(held)
    p.outbox.put([Record(clash.event_id, datetime.now(UTC), clash)])
    before = scrape()
    with caplog.at_level(logging.WARNING, logger="mlops.deliver"):
        assert p.outbox.flush_once() == 1
    assert p.spool.depth() == 0
    assert metric_sum(scrape(), "mlops_events_rejected_total", reason="event_id_conflict") \
        - metric_sum(before, "mlops_events_rejected_total", reason="event_id_conflict") == 1
    (dropped,) = [r for r in caplog.records if r.getMessage().startswith("spooled event dropped")]
    assert (dropped.event_id, dropped.business_id) == (clash.event_id, clash.business_id)
