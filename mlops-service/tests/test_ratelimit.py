"""Rate limits: a burst gets 429 + Retry-After and recovers; counted per key or address;
in memory per worker, or in Redis shared by every worker.

Redis: ``TEST_REDIS_URL`` if set, else the local server at 127.0.0.1:6379;
each test uses a key prefix of its own.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest
import redis
import requests
from conftest import metric_sum, metric_values, query
from payloads import SUCCESS

from mlops.config import ConfigError, Settings

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY = "rate-key-full-01a9"
OTHER_KEY = "rate-key-full-02b7"


@pytest.fixture
def redis_prefix():
    """A key prefix of this test's own in the test Redis; its keys are deleted after."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        reason = f"no Redis at {REDIS_URL} ({exc}): start one or set TEST_REDIS_URL"
        if os.environ.get("REQUIRE_REDIS") == "1":  # .ci/run: the machine has one
            pytest.fail(reason)
        pytest.skip(reason)
    prefix = f"mlops-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    for key in client.scan_iter(match=f"*{prefix}*"):
        client.delete(key)
    client.close()


def limited_app(make_app, **env):
    return make_app(RATE_LIMIT_ENABLED="true", **env)


def burst(send, n: int) -> list:
    return [send() for _ in range(n)]


def test_a_burst_gets_429_with_retry_after_then_recovers(make_app, pg):
    client = limited_app(make_app, RATE_LIMIT_TRACK="5/3 seconds").test_client()
    before = metric_sum(metric_values(client.get("/metrics").text),
                        "mlops_rate_limited_requests_total", endpoint="/track")
    replies = burst(lambda: client.post("/track", json=SUCCESS), 8)
    assert [r.status_code for r in replies] == [201] * 5 + [429] * 3
    refused = replies[-1]
    assert refused.get_json()["status"] == "error"
    assert refused.get_json()["error"] == "rate_limited"
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 4
    assert query(pg, "SELECT count(*) FROM mlops_events")[0][0] == 5  # refused: not stored
    after = metric_sum(metric_values(client.get("/metrics").text),
                       "mlops_rate_limited_requests_total", endpoint="/track")
    assert after - before == 3

    time.sleep(retry_after)  # what the client is told to wait
    assert client.post("/track", json=SUCCESS).status_code == 201


@pytest.mark.parametrize(("setting", "method", "path", "body", "ok"), [
    ("RATE_LIMIT_BATCH", "post", "/track/batch", [SUCCESS], 207),
    ("RATE_LIMIT_REFRESH", "post", "/refresh-metrics", {"trigger": "new_metrics"}, 200),
    ("RATE_LIMIT_READ", "get", "/analytics/acme", None, 200),
])
def test_each_route_group_has_its_own_limit(make_app, setting, method, path, body, ok):
    client = limited_app(make_app, **{setting: "3/minute"}).test_client()
    send = getattr(client, method)
    kwargs = {"json": body} if body is not None else {}
    assert [send(path, **kwargs).status_code for _ in range(4)] == [ok] * 3 + [429]
    # other routes keep their own counts; health and metrics are never limited
    assert client.post("/track", json=SUCCESS).status_code == 201
    assert all(client.get("/health").status_code == 200 for _ in range(5))
    assert all(client.get("/metrics").status_code == 200 for _ in range(5))


def test_each_key_has_its_own_count_and_unknown_keys_share_the_address(make_app):
    client = limited_app(make_app, MLOPS_API_KEY=f"{KEY},{OTHER_KEY}", MLOPS_AUTH_MODE="warn",
                         RATE_LIMIT_TRACK="2/minute").test_client()

    def send(key=None):
        return client.post("/track", json=SUCCESS, headers={"X-API-Key": key} if key else {})

    assert [send(KEY).status_code for _ in range(3)] == [201, 201, 429]
    assert [send(OTHER_KEY).status_code for _ in range(3)] == [201, 201, 429]
    # Keyless and invented keys are counted by address: new keys buy nothing.
    assert [send(f"made-up-{i}").status_code for i in range(3)] == [201, 201, 429]
    assert send().status_code == 429


def test_x_forwarded_for_counts_only_behind_trusted_proxies(make_app):
    def statuses(client, addresses):
        return [client.post("/track", json=SUCCESS,
                            headers={"X-Forwarded-For": a}).status_code for a in addresses]

    direct = limited_app(make_app, RATE_LIMIT_TRACK="2/minute").test_client()
    # Not behind a proxy: a forged header does not make a new client.
    assert statuses(direct, ["203.0.113.1", "203.0.113.2", "203.0.113.3"]) == [201, 201, 429]

    proxied = limited_app(make_app, RATE_LIMIT_TRACK="2/minute",
                          TRUSTED_PROXIES="1").test_client()
    assert statuses(proxied, ["203.0.113.1"] * 3) == [201, 201, 429]
    assert statuses(proxied, ["203.0.113.2"] * 2) == [201, 201]
    # With one proxy, only the address it appended counts, not what the client wrote.
    assert statuses(proxied, ["198.51.100.9, 203.0.113.1"]) == [429]


def test_a_dead_redis_falls_back_to_memory_and_refuses_no_event(make_app, pg):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    client = limited_app(make_app, RATE_LIMIT_STORAGE_URI=dead,
                         RATE_LIMIT_TRACK="3/minute").test_client()
    assert [client.post("/track", json=SUCCESS).status_code for _ in range(4)] == \
        [201, 201, 201, 429]
    assert query(pg, "SELECT count(*) FROM mlops_events")[0][0] == 3


@pytest.mark.parametrize(("env", "message"), [
    ({"RATE_LIMIT_TRACK": "lots"}, "RATE_LIMIT_TRACK must look like"),
    ({"RATE_LIMIT_ERASE": "5/fortnight"}, "RATE_LIMIT_ERASE must look like"),
    ({"RATE_LIMIT_STORAGE_URI": "memcached://x"}, "RATE_LIMIT_STORAGE_URI must start"),
    ({"RATE_LIMIT_ENABLED": "sometimes"}, "RATE_LIMIT_ENABLED must be"),
    ({"TRUSTED_PROXIES": "-1"}, "TRUSTED_PROXIES must be"),
])
def test_bad_rate_limit_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"DATABASE_URL": "postgresql://u@h/db", **env})


def test_the_defaults_leave_room_for_a_busy_chat_app():
    settings = Settings.from_env({"DATABASE_URL": "postgresql://u@h/db"})
    assert settings.rate_limit_enabled
    assert settings.rate_limit_track == settings.rate_limit_refresh == "100/second"
    assert settings.rate_limit_storage_uri == "memory://"


# --- two real gunicorn workers ---------------------------------------------------------------

def pinned_sessions(url: str, timeout: float = 30.0) -> list[requests.Session]:
    """Two keep-alive sessions whose connections were accepted by different workers.

    Waits (up to ``timeout``) for the second worker, which may still be booting;
    each round asks every held session again, which keeps its connection alive.
    """
    held: list[requests.Session] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held.append(requests.Session())
        by_pid: dict[int, requests.Session] = {}
        for session in held:
            pid = session.get(f"{url}/health/detailed", timeout=5).json()["pid"]
            by_pid.setdefault(pid, session)
        for session in held:
            if session not in by_pid.values():
                session.close()
        held = list(by_pid.values())
        if len(held) == 2:
            return held
        time.sleep(0.05)
    raise AssertionError(f"every connection went to one worker ({len(held)} held)")


def worker_burst(url: str, sessions: list[requests.Session], n: int) -> list[requests.Response]:
    """``n`` /track calls alternating between the sessions, so both workers take half."""
    pids = [s.get(f"{url}/health/detailed", timeout=5).json()["pid"] for s in sessions]
    replies = [sessions[i % 2].post(f"{url}/track", json=SUCCESS, timeout=5) for i in range(n)]
    again = [s.get(f"{url}/health/detailed", timeout=5).json()["pid"] for s in sessions]
    assert pids == again and len(set(pids)) == 2, "a session changed worker mid-burst"
    return replies


LIMIT = 6


def test_in_memory_counts_are_per_worker(gunicorn):
    server = gunicorn(workers=2, RATE_LIMIT_ENABLED="true", RATE_LIMIT_TRACK=f"{LIMIT}/minute")
    replies = worker_burst(server.url, pinned_sessions(server.url), 4 * LIMIT)
    # Each worker lets LIMIT through: the documented reason to use Redis with several.
    assert sum(r.status_code == 201 for r in replies) == 2 * LIMIT


def test_with_redis_the_limit_holds_across_workers_and_recovers(gunicorn, redis_prefix):
    server = gunicorn(workers=2, RATE_LIMIT_ENABLED="true",
                      RATE_LIMIT_TRACK=f"{LIMIT}/8 seconds", RATE_LIMIT_STORAGE_URI=REDIS_URL,
                      RATE_LIMIT_KEY_PREFIX=redis_prefix, LOG_LEVEL="INFO")
    sessions = pinned_sessions(server.url)
    replies = worker_burst(server.url, sessions, 4 * LIMIT)
    statuses = [r.status_code for r in replies]
    assert statuses.count(201) == LIMIT and statuses.count(429) == 3 * LIMIT, statuses
    refused = replies[-1]
    assert refused.json()["error"] == "rate_limited"
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 9

    time.sleep(retry_after)  # what the client is told to wait
    assert requests.post(f"{server.url}/track", json=SUCCESS, timeout=5).status_code == 201

    values = metric_values(requests.get(f"{server.url}/metrics", timeout=5).text)
    assert metric_sum(values, "mlops_rate_limited_requests_total", endpoint="/track") == 3 * LIMIT
    assert '"rate_limits": "redis"' in server.log()
    assert REDIS_URL not in server.log()
