"""Hostile clients cannot exhaust a worker: bodies, methods, labels and slow sockets.

Each test runs the real server (gunicorn, gevent workers) and measures what
a worker can be made to hold: its peak resident memory (``VmHWM`` in
``/proc/<pid>/status``), the series on ``/metrics``, its connection time.
"""

from __future__ import annotations

import json
import socket
import time
import uuid

import pytest
import requests
from conftest import metric_values
from payloads import SUCCESS
from support import wait_until

from mlops.telemetry import HTTP_METHODS, OVERFLOW_LABEL

# Bytes. A worker's peak memory may not pass this, whatever it was sent.
WORKER_PEAK_BYTES = 150 * 1024 * 1024


def peak_rss(pids: list[int]) -> int:
    """The largest peak resident set (``VmHWM``) among ``pids``, in bytes."""
    peaks = []
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        peaks.append(int(line.split()[1]) * 1024)
    return max(peaks)


def post(url: str, body: bytes | object, timeout: float = 10.0, **headers) -> requests.Response:
    """POST ``body`` (bytes, or a generator: sent chunked) as JSON; time it in ``.elapsed``."""
    return requests.post(url, data=body, timeout=timeout,
                         headers={"Content-Type": "application/json", **headers})


@pytest.fixture
def server(gunicorn):
    """Two gevent workers with the default limits; each test starts from their boot peak."""
    return gunicorn(workers=2)


def test_a_batch_of_empty_objects_leaves_a_worker_small_and_is_refused_within_a_second(server):
    # 4 MB of [{},{},...]: once 6.8 GB and 23 s, validated item by item.
    four_mb = b"[" + b",".join([b"{}"] * 1_333_333) + b"]"
    response = post(server.url + "/track/batch", four_mb)
    assert response.status_code == 413, response.text[:200]
    assert response.elapsed.total_seconds() < 1.0
    # Just under MAX_BATCH_BODY_BYTES (1 MiB): read and parsed, refused on its length.
    under_cap = b"[" + b",".join([b"{}"] * 349_000) + b"]"
    assert len(under_cap) < 1024 * 1024
    response = post(server.url + "/track/batch", under_cap)
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"field": "body", "problem": "must hold 1 to 1000 events, got 349000"}]
    assert response.elapsed.total_seconds() < 1.0
    # A full batch of items that each fail every field: 13 errors each, all reported.
    response = post(server.url + "/track/batch", b"[" + b",".join([b"{}"] * 1000) + b"]")
    assert response.status_code == 207 and response.json()["rejected"] == 1000
    assert peak_rss(server.worker_pids()) < WORKER_PEAK_BYTES


def test_a_chunked_body_past_the_cap_is_413_not_cut_short(server):
    event = json.dumps({**SUCCESS, "padding": "x" * 70_000}).encode()  # > MAX_BODY_BYTES
    chunks = (event[i:i + 8192] for i in range(0, len(event), 8192))
    response = post(server.url + "/track", chunks)
    assert response.status_code == 413, response.text[:200]
    assert response.json()["error"] == "request_entity_too_large"
    # A chunked body under the cap is read whole and stored.
    small = json.dumps(SUCCESS).encode()
    response = post(server.url + "/track", (small[i:i + 100] for i in range(0, len(small), 100)))
    assert response.status_code == 201


def status_before_the_body(server, path: str, content_length: int, first: bytes) -> bytes:
    """Send a POST's headers and the body's ``first`` bytes; the status line it gets in 1 s."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=1.0) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (path.encode(), content_length) + first)
        return sock.recv(4096).split(b"\r\n", 1)[0]


def test_refresh_metrics_reads_only_its_small_documented_body(server):
    # 50 MB of anything, and 5 MB of JSON objects: refused before they are read.
    assert status_before_the_body(server, "/refresh-metrics", 50_000_000,
                                  b"x" * 65536) == b"HTTP/1.1 413 REQUEST ENTITY TOO LARGE"
    assert status_before_the_body(server, "/refresh-metrics", 5_000_000,
                                  b'[{"a":1},' * 8000) == b"HTTP/1.1 413 REQUEST ENTITY TOO LARGE"
    for body in (b"x" * 50_000_000, b"[" + b",".join([b'{"a":1}'] * 650_000) + b"]"):
        assert post(server.url + "/refresh-metrics", body).status_code == 413
    chunked = post(server.url + "/refresh-metrics", (b"[" + b"{}," * 1000 for _ in range(10)))
    assert chunked.status_code == 413
    unknown = post(server.url + "/refresh-metrics", json.dumps({"trigger": "x", "a": 1}))
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "a"
    assert post(server.url + "/refresh-metrics",
                json.dumps({"trigger": "new_metrics"})).status_code == 200
    assert peak_rss(server.worker_pids()) < WORKER_PEAK_BYTES


def series(server, name: str) -> list[dict]:
    """The label sets of the samples named ``name`` on the server's ``/metrics``."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    return [dict(labels) for (sample, labels) in metric_values(text) if sample == name]


def test_made_up_methods_add_no_series(server):
    for i in range(300):
        requests.request(f"M{i}X", server.url + "/track", timeout=5)
        requests.request(f"Q{i}", server.url + f"/nowhere/{i}", timeout=5)
    methods = {s["method"] for s in series(server, "http_requests_total")}
    assert methods <= HTTP_METHODS | {OVERFLOW_LABEL}
    assert OVERFLOW_LABEL in methods
    assert len(series(server, "http_requests_total")) < 50


def test_a_label_flood_stays_inside_each_family_series_budget(gunicorn):
    server = gunicorn(workers=2, METRICS_MAX_SERIES=100)
    for batch in range(3):
        events = [{**SUCCESS, "business_id": str(uuid.uuid4()), "model_name": f"m{batch}-{i}",
                   "intent_detected": f"i{i}", "response_type": f"r{i}"} for i in range(550)]
        response = requests.post(server.url + "/track/batch", json=events, timeout=30)
        assert response.json()["accepted"] == 550
    # Per worker: at most 100 series a family, "other" included.
    for name in ("ai_requests_total", "ai_tokens_used_total", "ai_api_cost_usd_total"):
        found = series(server, name)
        assert len(found) <= 2 * 100, (name, len(found))
        assert any(s["business_id"] == OVERFLOW_LABEL for s in found)
    histogram = [s for s in series(server, "gen_ai_client_operation_duration_seconds_bucket")]
    assert len(histogram) <= 2 * 100


def slow_body_socket(server, content_length: int = 1000) -> socket.socket:
    """A connection that sends a POST's headers, then its body one byte at a time."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n{" % content_length)
    return sock


def test_a_body_sent_a_byte_at_a_time_is_cut_at_the_read_timeout(gunicorn):
    server = gunicorn(workers=1, BODY_READ_TIMEOUT_SECONDS=2)
    sockets = [slow_body_socket(server) for _ in range(20)]
    started = time.monotonic()
    answers = {}

    def one_more_byte_each() -> bool:
        """Send each unanswered body one more byte; whether every socket has its answer."""
        for index, sock in enumerate(sockets):
            if index in answers:
                continue
            sock.setblocking(False)
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                try:
                    sock.send(b" ")  # one more byte of the body
                except OSError:
                    answers[index] = (b"", time.monotonic() - started)
                continue
            answers[index] = (data, time.monotonic() - started)
        # The worker still serves others while the slow bodies hold their sockets.
        assert requests.get(server.url + "/health", timeout=1).status_code == 200
        return len(answers) == len(sockets)

    wait_until(one_more_byte_each, "an answer on every slow body", timeout=10, interval=0.2)
    for data, seconds in answers.values():
        assert data.startswith(b"HTTP/1.1 408"), data[:100]
        assert 1.8 < seconds < 3.5
    for sock in sockets:
        sock.close()


def test_read_windows_are_bounded(client):
    assert client.get("/analytics/some-business?days=366").status_code in (200, 404)
    response = client.get("/analytics/some-business?days=3650")
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "days"
    assert client.get("/businesses?days=367").status_code == 422
