"""The outbox: what its flusher delivers, when it waits, and what ``stop`` leaves behind.

Each outbox here is wired like the app's (a real spool file, the delivery
step on a real Postgres). Several outboxes on one spool folder stand for
the gunicorn workers of one machine.
"""

from __future__ import annotations

import fcntl
import logging
import time
import uuid
from datetime import UTC, datetime

import pytest
from conftest import empty_tables, query
from payloads import varied
from psycopg2.extensions import parse_dsn
from support import holds_for, wait_until

from mlops.config import Settings
from mlops.db import Database
from mlops.deliver import Delivery
from mlops.outbox import FLUSH_BATCH, Outbox, from_row
from mlops.schemas import Record, parse_event
from mlops.spool import Spool
from mlops.telemetry import Telemetry

AWAY = "postgresql://postgres@127.0.0.1:1/postgres"


@pytest.fixture
def outbox(database_url, tmp_path):
    """Factory: ``outbox(url=..., backoff=(min, max))``, all on the spool in ``tmp_path``."""
    made = []

    def make(url: str = database_url, backoff: tuple[float, float] = (0.5, 10.0)) -> Outbox:
        settings = Settings.from_env({"DATABASE_URL": url, "DB_CONNECT_TIMEOUT_SECONDS": "1"})
        db = Database(settings, breaker_seconds=60)
        spool = Spool(tmp_path / "spool", 1 << 24)
        box = Outbox(spool, Delivery(db, Telemetry(max_series=100)), timeout_ms=2000,
                     backoff_seconds=backoff)
        made.append((box, db))
        return box

    yield make
    for box, db in made:
        box.stop(0)
        db.close()
        box.spool.close()
    empty_tables(database_url)


def records(n: int, business: str | None = None) -> list[Record]:
    business = business or str(uuid.uuid4())
    return [Record(str(uuid.uuid4()), datetime.now(UTC),
                   parse_event(e))
            for e in varied(n, [business])]


def stored(pg, batch) -> int:
    ids = [r.event_id for r in batch]
    return query(pg, "SELECT count(*) FROM mlops_events WHERE event_id = ANY(%s)", ids)[0][0]


def leads(box: Outbox) -> bool:
    """Whether some outbox on ``box``'s spool folder holds the flusher lock (is the leader)."""
    with open(box.spool.path.with_name("flusher.lock"), "a") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False


def test_a_flush_moves_one_batch_oldest_first_and_stop_drains_the_rest(outbox, pg):
    box = outbox()
    batch = records(FLUSH_BATCH + 1)
    box.put(batch)
    assert box.flush_once() == FLUSH_BATCH
    assert [e.event_id for e in box.spool.peek(10)] == [batch[-1].event_id]
    box.put(records(FLUSH_BATCH))
    assert box.stop(drain_seconds=10) == 0
    assert stored(pg, batch) == len(batch)


def test_stop_with_no_time_to_drain_leaves_the_events_for_the_next_start(outbox):
    box = outbox()
    box.put(records(3))
    assert box.stop(drain_seconds=0) == 3
    assert box.spool.depth() == 3


def test_stop_while_the_database_is_away_keeps_the_events_and_gives_up_the_lead(outbox):
    away = outbox(AWAY)
    away.put(records(2))
    away.start()
    wait_until(lambda: leads(away), "the flusher to take the lead", interval=0.02)
    assert away.stop(drain_seconds=5) == 2
    assert not leads(away)


def test_the_leader_delivers_what_another_worker_spooled(outbox, pg):
    leader, other = outbox(), outbox()
    leader.start()
    wait_until(lambda: leads(leader), "the flusher to take the lead", interval=0.02)
    time.sleep(0.1)  # on purpose: the leader finds the spool empty and waits (no signal shows it)
    batch = records(3)
    other.put(batch)  # wakes only its own (following) flusher
    wait_until(lambda: stored(pg, batch) == 3, "the leader to look again and deliver",
               interval=0.02)
    # The spool rows go once the commit has returned: a moment after the rows show.
    wait_until(lambda: leader.spool.depth() == 0, "the delivered rows to leave the spool",
               interval=0.02)


def test_an_idle_flusher_does_not_spin(outbox):
    box = outbox()
    box.start()
    wait_until(lambda: leads(box), "the flusher to take the lead", interval=0.02)
    time.sleep(0.1)  # on purpose: it finds the spool empty and waits (no signal shows it)
    cpu = time.process_time()
    holds_for(lambda: time.process_time() - cpu < 0.2, "the idle flusher using under 0.2 s of CPU",
              seconds=0.5)


def test_the_backoff_starts_again_from_its_minimum_after_a_delivery(outbox, database_url, proxy):
    waits: list[float] = []

    class Waits(logging.Handler):
        def emit(self, record):
            waits.append(record.retry_in_seconds)

    handler = Waits()
    logger = logging.getLogger("mlops.outbox")
    logger.addHandler(handler)
    try:
        box = outbox(proxy.url(parse_dsn(database_url)["dbname"]), backoff=(0.01, 0.04))
        proxy.refuse()
        box.put(records(1))
        box.start()
        wait_until(lambda: len(waits) >= 4, "four failed flushes", interval=0.02)
        proxy.resume()
        wait_until(lambda: box.spool.depth() == 0, "the delivery", interval=0.02)
        proxy.refuse()
        waits.clear()
        box.put(records(1))
        wait_until(lambda: len(waits) >= 2, "two failed flushes", interval=0.02)
        assert waits[:2] == [0.01, 0.02]
    finally:
        logger.removeHandler(handler)


def test_erasure_takes_only_that_business_out_of_the_outbox(outbox):
    box = outbox(AWAY)
    box.put(records(2, "erased") + records(1, "kept"))
    assert box.discard("business_id", "erased") == 2
    assert [from_row(item).event.business_id for item in box.spool.peek(10)] == ["kept"]
