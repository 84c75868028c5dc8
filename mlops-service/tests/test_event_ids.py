"""An event_id names one event of one business: a replay is stored once, and the
same id sent for another business is refused (409), never claimed as stored."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from conftest import metric_sum, metric_values, query
from payloads import SUCCESS
from support import wait_until

from mlops import store
from mlops.outbox import to_row
from mlops.schemas import MetricsEvent, Record
from mlops.services import get_services


def event(business: str, event_id: str, **fields) -> dict:
    return {**SUCCESS, "business_id": business, "event_id": event_id, **fields}


def owners(pg, event_id: str) -> list[tuple[str]]:
    return query(pg, "SELECT business_id FROM mlops_events WHERE event_id = %s", event_id)


def rejected(client) -> float:
    return metric_sum(metric_values(client.get("/metrics").get_data(as_text=True)),
                      "mlops_events_rejected_total", reason="event_id_conflict")


def test_track_answers_409_naming_event_id_for_another_businesss_id(client, pg):
    a, b, event_id = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    before = rejected(client)
    first = client.post("/track", json=event(a, event_id))
    replay = client.post("/track", json=event(a, event_id))
    other = client.post("/track", json=event(b, event_id))

    assert first.status_code == replay.status_code == 201
    assert replay.get_json()["storage"] == "stored"
    assert other.status_code == 409
    body = other.get_json()
    assert body["error"] == "event_id_conflict"
    assert [e["field"] for e in body["errors"]] == ["event_id"]
    assert owners(pg, event_id) == [(a,)]  # stored once, for its first business
    assert rejected(client) == before + 1


def test_a_batch_reports_each_conflict_and_stores_the_rest(client, pg):
    for size in (7, store.COPY_THRESHOLD):  # the function's path, then COPY's
        a, b = str(uuid.uuid4()), str(uuid.uuid4())
        taken = [str(uuid.uuid4()) for _ in range(2)]
        for event_id in taken:
            assert client.post("/track", json=event(a, event_id)).status_code == 201
        twice = str(uuid.uuid4())  # sent twice in the batch, for two businesses
        fresh = [str(uuid.uuid4()) for _ in range(3)]
        items = [event(b, taken[0]), event(b, fresh[0]), event(a, taken[1]),  # a replay
                 event(b, fresh[1]), event(a, twice), event(b, twice), event(b, fresh[2])]
        padding = [event(b, str(uuid.uuid4())) for _ in range(size - len(items))]

        response = client.post("/track/batch", json=items + padding)

        assert response.status_code == 207
        body = response.get_json()
        assert (body["status"], body["accepted"], body["rejected"]) == (
            "partial", size - 2, 2)
        results = body["results"]
        assert [r["status"] for r in results[:len(items)]] == [
            409, 201, 201, 201, 201, 409, 201]
        assert {r["status"] for r in results[len(items):]} <= {201}
        for index in (0, 5):
            assert results[index]["event_id"] == items[index]["event_id"]
            assert [e["field"] for e in results[index]["error"]] == ["event_id"]
        assert owners(pg, taken[0]) == owners(pg, taken[1]) == owners(pg, twice) == [(a,)]
        assert [owners(pg, i) for i in fresh] == [[(b,)]] * 3
        assert query(pg, "SELECT count(*) FROM mlops_events WHERE business_id = %s",
                     b) == [(3 + len(padding),)]


def test_a_spooled_conflict_is_counted_and_logged_not_lost_silently(client, app, pg, caplog):
    a, b, event_id = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    assert client.post("/track", json=event(a, event_id)).status_code == 201
    outbox = get_services(app).outbox
    before = rejected(client)
    # As if received while Postgres was away: answered 202 "queued" long ago.
    record = Record(event_id, datetime.now(UTC),
                    MetricsEvent.model_validate(event(b, event_id)))
    kept = Record(str(uuid.uuid4()), record.received_at,
                  MetricsEvent.model_validate(event(b, "x")))
    outbox.spool.put([to_row(record), to_row(kept)])

    with caplog.at_level(logging.WARNING, logger="mlops.deliver"):
        def flushed() -> bool:
            if outbox.spool.depth():
                outbox.flush_once()
            return outbox.spool.depth() == 0

        wait_until(flushed, "the flushes to empty the spool", timeout=10, interval=0)
    assert owners(pg, event_id) == [(a,)]
    assert owners(pg, kept.event_id) == [(b,)]
    assert rejected(client) == before + 1
    (line,) = [r for r in caplog.records if r.name == "mlops.deliver"]
    assert (line.event_id, line.business_id) == (event_id, b)
