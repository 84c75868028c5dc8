"""Scoped keys, rotation, warn mode, the /metrics token, and the chat app as it really calls.

The scope table under test (mlops/auth.py): write = /track, /track/batch
(full keys); read = /analytics, /businesses (full or read keys); erase = the DELETE
routes (full keys); /refresh-metrics and /health take no key; /metrics takes
the bearer token when one is set and, when keys are set, any key with read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
from conftest import metric_sum, metric_values, query
from payloads import FAILURE, SUCCESS, varied

from mlops.auth import get_auth, key_id
from mlops.config import ConfigError, Settings

FULL_A = "full-key-a-5f1c0d2e7b"
FULL_B = "full-key-b-93ab7710c4"
READ = "read-key-2c4e6a80f1"
WRONG = "wrong-key-000000000"
TOKEN = "metrics-token-77aa01"
SECRETS = (FULL_A, FULL_B, READ, WRONG, TOKEN)
KEYS = {"MLOPS_API_KEY": f"{FULL_A},{FULL_B}", "MLOPS_READ_API_KEY": READ}
CREDENTIALS = {"none": None, "wrong": WRONG, "read": READ, "full_a": FULL_A, "full_b": FULL_B}

# name: (method, path, body, scope, success status)
ENDPOINTS = {
    "track": ("post", "/track", SUCCESS, "write", 201),
    "batch": ("post", "/track/batch", [SUCCESS], "write", 207),
    "analytics": ("get", "/analytics/acme", None, "read", 200),
    "businesses": ("get", "/businesses", None, "read", 200),
    "erase_conversation": ("delete", "/conversations/conv-1", None, "erase", 200),
    "erase_business": ("delete", "/businesses/acme", None, "erase", 200),
    "refresh": ("post", "/refresh-metrics", {"trigger": "new_metrics"}, None, 200),
    "metrics": ("get", "/metrics", None, "metrics", 200),
    "health": ("get", "/health", None, None, 200),
}
# scope: credential -> status in enforce mode (None: the endpoint's success status)
REFUSALS = {
    "write": {"none": 401, "wrong": 403, "read": 403},
    "read": {"none": 401, "wrong": 403},
    "erase": {"none": 401, "wrong": 403, "read": 403},
    "metrics": {"none": 401, "wrong": 401},  # Bearer semantics: 401 for every refusal
    None: {},
}


def call(client, name: str, key: str | None = None, **headers):
    method, path, body, _, _ = ENDPOINTS[name]
    if key:
        headers["X-API-Key"] = key
    kwargs = {"json": body} if body is not None else {}
    return getattr(client, method)(path, headers=headers, **kwargs)


def stored(pg) -> int:
    return query(pg, "SELECT count(*) FROM mlops_events")[0][0]


def failures(client, **labels) -> float:
    text = client.get("/metrics", headers={"X-API-Key": READ}).text
    return metric_sum(metric_values(text), "mlops_auth_failures_total", **labels)


def auth_log(service_env) -> list[dict]:
    path = Path(service_env["LOG_DIR"]) / "mlops-service.log"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r["logger"] == "mlops.auth"]


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_scope_on_every_endpoint(make_app, pg, endpoint, credential):
    client = make_app(**KEYS).test_client()
    _, _, _, scope, success = ENDPOINTS[endpoint]
    response = call(client, endpoint, CREDENTIALS[credential])
    expected = REFUSALS[scope].get(credential, success)
    assert response.status_code == expected, response.get_data(as_text=True)
    if expected in (401, 403):
        assert response.get_json()["status"] == "error"
        assert response.get_json()["error"] == {401: "unauthorized", 403: "forbidden"}[expected]
    if scope == "write":
        assert stored(pg) == (1 if expected == success else 0)
    assert not any(s in response.get_data(as_text=True) for s in SECRETS)


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("scope", ["write", "read", "erase"])
def test_the_scope_table_including_erase(make_app, scope, credential):
    """The guard itself, for every scope (the routes are covered above)."""
    app = make_app(**KEYS)
    key = CREDENTIALS[credential]
    with app.test_request_context("/", headers={"X-API-Key": key} if key else {}):
        refusal = get_auth(app).check(scope)
    status = refusal[1] if refusal is not None else 200
    assert status == REFUSALS[scope].get(credential, 200)


def test_rotation_both_keys_are_valid_at_once_and_the_old_one_can_go(make_app, pg):
    client = make_app(MLOPS_API_KEY=f"{FULL_A},{FULL_B}").test_client()
    assert call(client, "track", FULL_A).status_code == 201
    assert call(client, "track", FULL_B).status_code == 201
    rotated = make_app(MLOPS_API_KEY=FULL_B).test_client()
    assert call(rotated, "track", FULL_A).status_code == 403
    assert call(rotated, "track", FULL_B).status_code == 201
    assert stored(pg) == 3


def test_keys_and_token_from_files(make_app, pg, tmp_path):
    (tmp_path / "full").write_text(f"{FULL_A}\n{FULL_B}\n")
    (tmp_path / "read").write_text(f"{READ}\n")
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    client = make_app(MLOPS_API_KEY_FILE=tmp_path / "full",
                      MLOPS_READ_API_KEY_FILE=tmp_path / "read",
                      MLOPS_METRICS_TOKEN_FILE=tmp_path / "token").test_client()
    assert call(client, "track").status_code == 401
    assert call(client, "track", FULL_A).status_code == 201
    assert call(client, "track", FULL_B).status_code == 201
    assert call(client, "track", READ).status_code == 403
    assert call(client, "analytics", READ).status_code == 200
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert stored(pg) == 2


@pytest.mark.parametrize(("env", "message"), [
    ({"MLOPS_API_KEY": FULL_A, "MLOPS_API_KEY_FILE": "/x"}, "not both"),
    ({"MLOPS_READ_API_KEY_FILE": "/nonexistent"}, "MLOPS_READ_API_KEY_FILE cannot be read"),
    ({"MLOPS_METRICS_TOKEN_FILE": "/nonexistent"}, "MLOPS_METRICS_TOKEN_FILE cannot be read"),
    ({"MLOPS_READ_API_KEY": READ}, "needs MLOPS_API_KEY"),
    ({"MLOPS_API_KEY": FULL_A, "MLOPS_READ_API_KEY": FULL_A}, "in both"),
    ({"MLOPS_API_KEY": f"{FULL_A},,{FULL_B}"}, "empty key"),
    ({"MLOPS_API_KEY": FULL_A, "MLOPS_AUTH_MODE": "loose"}, "enforce or warn"),
    ({"MLOPS_AUTH_MODE": "warn"}, "needs MLOPS_API_KEY"),
    ({"MLOPS_API_KEY": "a"}, r"MLOPS_API_KEY must be at least 16 characters \(it has 1\)"),
    ({"MLOPS_API_KEY": f"{FULL_A},short-key-15chr"},
     r"MLOPS_API_KEY must be at least 16 characters \(key 2 of 2 has 15\)"),
    ({"MLOPS_API_KEY": FULL_A, "MLOPS_READ_API_KEY": "r-8chars"},
     "MLOPS_READ_API_KEY must be at least 16"),
    ({"MLOPS_METRICS_TOKEN": "tok"}, "MLOPS_METRICS_TOKEN must be at least 16"),
])
def test_bad_auth_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"DATABASE_URL": "postgresql://u@h/db", **env})


def test_modes_follow_the_settings():
    base = {"DATABASE_URL": "postgresql://u@h/db"}
    assert Settings.from_env(base).auth_mode == "off"
    assert Settings.from_env({**base, "MLOPS_API_KEY": FULL_A}).auth_mode == "enforce"
    warn = Settings.from_env({**base, "MLOPS_API_KEY": FULL_A, "MLOPS_AUTH_MODE": "WARN"})
    assert warn.auth_mode == "warn"
    assert FULL_A not in repr(warn)


def test_warn_mode_stores_counts_and_logs_once_a_minute(make_app, pg, service_env):
    app = make_app(**KEYS, MLOPS_AUTH_MODE="warn")
    now = [1000.0]
    get_auth(app).failures.clock = lambda: now[0]
    client = app.test_client()
    before = {r: failures(client, scope="write", reason=r)
              for r in ("missing_key", "wrong_key", "insufficient_scope")}

    assert call(client, "track").status_code == 201
    assert call(client, "track", WRONG).status_code == 201
    assert call(client, "batch", READ).status_code == 207
    now[0] = 1059.9
    assert call(client, "track").status_code == 201
    now[0] = 1060.0
    assert call(client, "track").status_code == 201
    assert call(client, "track", FULL_A).status_code == 201

    assert stored(pg) == 6
    assert {r: failures(client, scope="write", reason=r) - before[r] for r in before} == {
        "missing_key": 3, "wrong_key": 1, "insufficient_scope": 1}
    lines = auth_log(service_env)
    assert len(lines) == 2
    assert [line["failures_not_logged_since_last_line"] for line in lines] == [0, 3]
    assert all(line["auth_mode"] == "warn" and line["scope"] == "write" for line in lines)
    # Warn mode relaxes writes only: reads and erasure stay enforced.
    assert call(client, "analytics").status_code == 401
    assert call(client, "analytics", WRONG).status_code == 403


def test_enforce_mode_counts_refusals_and_logs_them_sparingly(make_app, pg, service_env):
    app = make_app(**KEYS)
    get_auth(app).failures.clock = lambda: 5.0
    client = app.test_client()
    before = failures(client, scope="write", reason="missing_key")
    for _ in range(5):
        assert call(client, "track").status_code == 401
    assert failures(client, scope="write", reason="missing_key") - before == 5
    assert stored(pg) == 0
    assert len(auth_log(service_env)) == 1


def test_metrics_token_guards_metrics_only(make_app):
    client = make_app(MLOPS_METRICS_TOKEN=TOKEN).test_client()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}, {"X-API-Key": TOKEN}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.get_json()["error"] == "unauthorized"
        assert TOKEN not in response.get_data(as_text=True)
    ok = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    assert metric_sum(metric_values(ok.text), "mlops_auth_failures_total", scope="metrics") >= 5
    for path in ("/health", "/health/ready", "/health/detailed", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert call(client, "track").status_code == 201  # no API key configured: writes open


def test_data_responses_are_not_stored_by_caches(make_app):
    client = make_app().test_client()
    for name in ("track", "batch", "analytics", "refresh", "metrics", "health"):
        assert call(client, name).headers["Cache-Control"] == "no-store", name
    assert client.get("/nope").headers["Cache-Control"] == "no-store"


def test_a_short_key_is_refused_without_echoing_it():
    for env in ({"MLOPS_API_KEY": "sixteen-minus-1"}, {"MLOPS_API_KEY": "   sixteen-minus-1  "}):
        with pytest.raises(ConfigError) as refused:
            Settings.from_env({"DATABASE_URL": "postgresql://u@h/db", **env})
        assert "sixteen" not in str(refused.value) and "MLOPS_API_KEY" in str(refused.value)
    exactly = Settings.from_env({"DATABASE_URL": "postgresql://u@h/db",
                                 "MLOPS_API_KEY": "sixteen-chars-16"})
    assert exactly.api_keys == ("sixteen-chars-16",)


def test_key_files_lose_a_utf8_bom_and_surrounding_whitespace(make_app, pg, tmp_path):
    (tmp_path / "full").write_bytes(b"\xef\xbb\xbf" + f"  {FULL_A}\r\n{FULL_B}\r\n".encode())
    (tmp_path / "token").write_bytes(b"\xef\xbb\xbf" + f"{TOKEN}\r\n".encode())
    settings = Settings.from_env({"DATABASE_URL": "postgresql://u@h/db",
                                  "MLOPS_API_KEY_FILE": str(tmp_path / "full"),
                                  "MLOPS_METRICS_TOKEN_FILE": str(tmp_path / "token")})
    assert settings.api_keys == (FULL_A, FULL_B)
    assert settings.metrics_token == TOKEN
    client = make_app(MLOPS_API_KEY_FILE=tmp_path / "full",
                      MLOPS_METRICS_TOKEN_FILE=tmp_path / "token").test_client()
    assert call(client, "track", FULL_A).status_code == 201
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_key_id_is_keyed_by_the_deployments_keys_and_hides_the_key(make_app):
    app = make_app(**KEYS)
    with app.app_context():
        ids = {key: key_id(key) for key in (FULL_A, FULL_B, READ)}
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in ids.values())
    assert len(set(ids.values())) == 3
    # Not the unsalted SHA-256 a log reader could check guesses against.
    assert ids[FULL_A] != hashlib.sha256(FULL_A.encode()).hexdigest()[:12]
    # Stable: another process (app) with the same keys, in another order, agrees ...
    same = make_app(MLOPS_API_KEY=f"{FULL_B},{FULL_A}", MLOPS_READ_API_KEY=READ)
    assert key_id(FULL_A, same) == ids[FULL_A]
    # ... and another deployment (other keys) names the same key otherwise.
    other = make_app(MLOPS_API_KEY=f"{FULL_A},{WRONG}")
    assert key_id(FULL_A, other) != ids[FULL_A]
    # The id is what the rate limiter and the identity use.
    with app.test_request_context("/", headers={"X-API-Key": READ}):
        assert get_auth(app).identify().key_id == ids[READ]


def test_a_valid_key_without_the_scope_and_an_unknown_key_get_the_same_403(make_app):
    client = make_app(**KEYS).test_client()
    for name in ("track", "batch", "erase_conversation", "erase_business"):
        read, unknown = call(client, name, READ), call(client, name, WRONG)
        assert read.status_code == unknown.status_code == 403, name
        assert read.get_data() == unknown.get_data(), name
        assert sorted(read.headers.items()) == sorted(unknown.headers.items()), name
    assert call(client, "analytics", WRONG).get_data() == read.get_data()
    missing = call(client, "track")
    assert missing.status_code == 401 and missing.get_json()["message"] == \
        "missing X-API-Key header"


def test_metrics_with_keys_set_takes_a_read_key_or_the_token(make_app):
    client = make_app(**KEYS, MLOPS_METRICS_TOKEN=TOKEN).test_client()
    accepted = [{"Authorization": f"Bearer {TOKEN}"}, {"Authorization": f"Bearer {READ}"},
                {"X-API-Key": READ}, {"X-API-Key": FULL_B}, {"Authorization": f"bearer {FULL_A}"}]
    for headers in accepted:
        assert client.get("/metrics", headers=headers).status_code == 200, headers
    refused = [{}, {"Authorization": f"Bearer {WRONG}"}, {"X-API-Key": WRONG},
               {"X-API-Key": TOKEN}, {"Authorization": f"Basic {READ}"}]
    bodies = set()
    for headers in refused:
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
        bodies.add(response.get_data())
    assert len(bodies) == 1
    warn = make_app(**KEYS, MLOPS_AUTH_MODE="warn").test_client()  # no token: keys only
    assert warn.get("/metrics").status_code == 401
    assert warn.get("/metrics", headers={"X-API-Key": READ}).status_code == 200


def test_no_key_or_token_reaches_a_log_line_or_a_response(make_app, service_env):
    app = make_app(**KEYS, MLOPS_METRICS_TOKEN=TOKEN, LOG_LEVEL="DEBUG")
    client = app.test_client()
    seen = []
    for credential in CREDENTIALS.values():
        for name in ENDPOINTS:
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"},
                            {"Authorization": f"Bearer {WRONG}"}):
                response = call(client, name, credential, **headers)
                seen.append(response.get_data(as_text=True))
                seen.append(str(response.headers))
    warn = make_app(**KEYS, MLOPS_AUTH_MODE="warn", LOG_LEVEL="DEBUG").test_client()
    for credential in CREDENTIALS.values():
        seen.append(call(warn, "track", credential).get_data(as_text=True))
    log = (Path(service_env["LOG_DIR"]) / "mlops-service.log").read_text()
    assert "/track" in log and "mlops.auth" in log
    for secret in SECRETS:
        assert secret not in log
        assert not any(secret in text for text in seen)


# --- the chat app, as published and as edited by the security exercise ---------------------

NODE = shutil.which("node")


def run_chat_client(url: str, messages: list[dict], key: str | None, tmp_path) -> list[dict]:
    """Send ``messages`` through tests/chat_client.mjs (Node's fetch, the app's two calls)."""
    if NODE is None:
        pytest.fail("node is needed to run the chat app's calls (Debian package nodejs)")
    path = tmp_path / f"messages-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(messages))
    env = {k: v for k, v in os.environ.items() if k != "MLOPS_API_KEY"}
    env["MLOPS_SERVICE_URL"] = url
    if key:
        env["MLOPS_API_KEY"] = key
    result = subprocess.run([NODE, str(Path(__file__).with_name("chat_client.mjs")), str(path)],
                            capture_output=True, text=True, env=env, timeout=120, check=True)
    return [json.loads(line) for line in result.stdout.splitlines()]


def chat_messages(tag: str, n: int = 15) -> list[dict]:
    """``n`` messages like the app's, each with a session id of its own (to count them)."""
    events = varied(n - 2, ["3f0c9a52-5a55-4f55-9d4e-0b8f6d1f2a10", "unknown"]) + [
        SUCCESS, FAILURE]
    return [{**e, "session_id": f"{tag}-{i}"} for i, e in enumerate(events)]


def stored_sessions(pg, tag: str) -> int:
    return query(pg, "SELECT count(*) FROM mlops_events WHERE session_id LIKE %s",
                 f"{tag}-%")[0][0]


@pytest.mark.parametrize(("mode", "clients"), [
    # The modes docs/security.md recommends for each client: no key (or warn while
    # rolling out) for the published app, warn then enforce for the edited one.
    ("off", ["published", "edited"]),
    ("warn", ["published", "edited"]),
    ("enforce", ["edited"]),
])
def test_the_chat_app_loses_no_message_in_the_recommended_modes(gunicorn, pg, tmp_path, mode,
                                                                  clients):
    env = {"RATE_LIMIT_ENABLED": "true", "LOG_LEVEL": "INFO"}  # as a deployment runs
    if mode != "off":
        env |= {**KEYS, "MLOPS_AUTH_MODE": mode}
    server = gunicorn(workers=2, **env)
    for client in clients:
        tag = f"{mode}-{client}-{uuid.uuid4().hex[:6]}"
        messages = chat_messages(tag)
        replies = run_chat_client(server.url, messages, FULL_A if client == "edited" else None,
                                  tmp_path)
        assert replies == [{"track": 201, "refresh": 200}] * len(messages), (client, replies)
        assert stored_sessions(pg, tag) == len(messages)
    output = server.log()
    assert f'"auth": "{mode}"' in output  # the start-up line says which mode is on
    assert not any(secret in output for secret in SECRETS)


def test_enforce_refuses_the_unedited_app_loudly(gunicorn, pg, tmp_path):
    """Enforcing before the app sends its key loses its messages: 401s, counted and logged."""
    server = gunicorn(workers=2, RATE_LIMIT_ENABLED="true", **KEYS)
    tag = f"loud-{uuid.uuid4().hex[:6]}"
    messages = chat_messages(tag, n=5)
    replies = run_chat_client(server.url, messages, None, tmp_path)
    assert replies == [{"track": 401, "refresh": 200}] * len(messages)
    assert stored_sessions(pg, tag) == 0
    values = metric_values(requests.get(f"{server.url}/metrics", headers={"X-API-Key": READ},
                                        timeout=5).text)
    assert metric_sum(values, "mlops_auth_failures_total", scope="write",
                      reason="missing_key") == len(messages)
    assert "request refused: no valid credential for its scope" in server.log()



def test_a_key_is_accepted_as_a_bearer_token_as_opentelemetry_exporters_send_it(make_app, pg):
    """``OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer <key>`` works like ``X-API-Key``."""
    client = make_app(**KEYS).test_client()
    assert call(client, "track", Authorization=f"Bearer {FULL_A}").status_code == 201
    assert call(client, "track", Authorization=f"bearer  {FULL_B} ").status_code == 201
    assert call(client, "track", Authorization=f"Bearer {READ}").status_code == 403
    assert call(client, "analytics", Authorization=f"Bearer {READ}").status_code == 200
    assert call(client, "track", Authorization=f"Basic {FULL_A}").status_code == 401
    assert stored(pg) == 2
