"""The spool: a durable queue of events, in one file shared by every worker."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time

import pytest

from mlops.spool import Spool, SpoolFull

PROCESSES = 16
ROUNDS = 3  # the race showed in about one round of three before the fix


def _open_and_write(directory: str, barrier, index: int) -> None:
    from pathlib import Path

    barrier.wait()  # every process opens the brand-new file at the same moment
    spool = Spool(Path(directory), 1 << 20)
    spool.put([(f"evt-{index}", 0.0, "{}")])
    spool.close()


def test_workers_opening_a_new_spool_at_once_all_succeed(tmp_path):
    context = multiprocessing.get_context("fork")
    for round_ in range(ROUNDS):
        directory = tmp_path / str(round_)
        barrier = context.Barrier(PROCESSES)
        procs = [context.Process(target=_open_and_write, args=(str(directory), barrier, i))
                 for i in range(PROCESSES)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=30)
        assert [p.exitcode for p in procs] == [0] * PROCESSES, f"round {round_}"
        spool = Spool(directory, 1 << 20)
        assert sorted(e.event_id for e in spool.peek(100)) == sorted(
            f"evt-{i}" for i in range(PROCESSES))


def rows(*ids: str, business: str = "b-1", received_at: float = 0.0) -> list:
    return [(i, received_at, json.dumps({"business_id": business, "event_id": i})) for i in ids]


def test_events_leave_oldest_first_and_a_peek_takes_at_most_its_limit(tmp_path):
    spool = Spool(tmp_path, 1 << 20)
    spool.put(rows("a", "b"))
    spool.put(rows("c", "d", "e"))
    first = spool.peek(3)
    assert [e.event_id for e in first] == ["a", "b", "c"]
    assert first[0].payload == rows("a")[0][2] and first[0].received_at == 0.0
    spool.remove(e.seq for e in first)
    assert [e.event_id for e in spool.peek(10)] == ["d", "e"] and spool.depth() == 2


def test_erasure_discards_only_the_matching_waiting_events(tmp_path):
    spool = Spool(tmp_path, 1 << 20)
    spool.put(rows("a1", "a2", business="a") + rows("b1", business="b"))
    assert spool.discard("business_id", "a") == 2
    assert spool.discard("business_id", "a") == 0
    assert [e.event_id for e in spool.peek(10)] == ["b1"]


def test_the_oldest_waiting_event_gives_the_spool_its_age(tmp_path):
    spool = Spool(tmp_path, 1 << 20)
    assert spool.oldest_age_seconds() == 0.0
    spool.put(rows("now", received_at=time.time()))
    assert spool.oldest_age_seconds() < 0.5
    spool.remove(e.seq for e in spool.peek(1))
    spool.put(rows("old", received_at=time.time() - 60))
    spool.put(rows("new", received_at=time.time()))
    assert 59 < spool.oldest_age_seconds() < 61


def test_the_cap_refuses_a_put_once_the_file_holds_max_bytes(tmp_path):
    spool = Spool(tmp_path, 1 << 20)
    spool.max_bytes = spool.size_bytes() + 1
    spool.put(rows("fits"))  # below the cap: accepted, and the file grows past it
    spool.max_bytes = spool.size_bytes()
    with pytest.raises(SpoolFull):
        spool.put(rows("refused"))
    assert [e.event_id for e in spool.peek(10)] == ["fits"]


def test_a_thread_that_never_used_the_spool_may_close_it(tmp_path):
    spool = Spool(tmp_path, 1 << 20)
    errors = []

    def close():
        try:
            spool.close()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion
            errors.append(exc)

    thread = threading.Thread(target=close)
    thread.start()
    thread.join(5)
    assert errors == [] and spool.depth() == 0  # this thread's connection is still open


def _on_disk(spool: Spool, needle: bytes) -> list[str]:
    """The spool's files (database, WAL) whose bytes contain ``needle``."""
    return [path.name for path in spool.path.parent.glob("spool.sqlite3*")
            if needle in path.read_bytes()]


def test_discarded_events_leave_no_bytes_in_the_database_or_its_wal(tmp_path):
    spool = Spool(tmp_path, 1 << 20)
    reader = Spool(tmp_path, 1 << 20)  # another worker's connection, as under gunicorn
    erased = b"erase-me-0f3c9a"
    kept = b"keep-me-7d21b4"
    rows = [(f"evt-{i}", 0.0, json.dumps({"business_id": business, "i": i, "pad": "x" * 500}))
            for i, business in enumerate([erased.decode(), kept.decode()] * 20)]
    spool.put(rows)
    assert reader.depth() == 40
    assert _on_disk(spool, erased)  # the check below can see the bytes when they are there

    assert spool.discard("business_id", erased.decode()) == 20

    assert _on_disk(spool, erased) == []
    assert _on_disk(spool, kept)  # what stays is still on disk
    assert reader.depth() == 20
    assert {json.loads(e.payload)["business_id"] for e in reader.peek(100)} == {kept.decode()}
