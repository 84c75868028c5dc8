"""What the service exposes, and to whom.

* compose publishes the port on the host's loopback unless told otherwise;
* with keys set, /metrics and /health/detailed's details need a credential,
  and no health route shows the database's own error text without one;
* no redirect takes its host from the request (a forged ``Host``), and every
  response carries ``nosniff`` (dashboard paths: the dashboard's CSP too);
* a short key stops the server at start in one line; an exposed server
  without keys (or without a /metrics token) says so in one WARNING line.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import yaml
from pgcluster import free_port
from servers import SERVICE_DIR, Gunicorn

from mlops import announce
from mlops.auth import same_origin
from mlops.config import Settings
from mlops.routes.dashboard import SECURITY_HEADERS

FULL = "exposure-full-key-6b1f0c9a2d"
READ = "exposure-read-key-0e7d3a5c81"
TOKEN = "exposure-metrics-token-4f2a9e"
KEYS = {"MLOPS_API_KEY": FULL, "MLOPS_READ_API_KEY": READ, "MLOPS_METRICS_TOKEN": TOKEN}
CSP = SECURITY_HEADERS["Content-Security-Policy"]


# -- compose ---------------------------------------------------------------------------

def _compose_ports(tmp_path: Path, **env: str) -> tuple[list[dict], dict]:
    """The service's published ports and environment as compose resolves them.

    ``docker compose config`` when the CLI is here (it needs no engine), else
    the YAML with compose's ``${VAR:-default}`` resolved the same way.
    """
    empty = tmp_path / "empty.env"
    empty.write_text("")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MLOPS_", "COMPOSE_")) and k != "HOST"} | env
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30).returncode == 0:
        out = subprocess.run([docker, "compose", "--env-file", str(empty), "-f",
                              "docker-compose.yml", "config", "--format", "json"],
                             cwd=SERVICE_DIR, env=clean, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        service = json.loads(out.stdout)["services"]["mlops-service"]
        return ([{"host_ip": p.get("host_ip", ""), "published": str(p["published"]),
                  "target": int(p["target"])} for p in service["ports"]],
                service["environment"])

    def resolve(text: str) -> str:
        return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: clean.get(m[1]) or m[2], text)

    service = yaml.safe_load((SERVICE_DIR / "docker-compose.yml").read_text())[
        "services"]["mlops-service"]
    ports = []
    for spec in service["ports"]:
        parts = resolve(spec).rsplit(":", 2)
        host_ip, published, target = parts if len(parts) == 3 else ["", *parts]
        ports.append({"host_ip": host_ip, "published": published, "target": int(target)})
    return ports, {k: resolve(str(v)) for k, v in service["environment"].items()}


def test_compose_publishes_the_port_on_loopback_unless_told_otherwise(tmp_path):
    ports, environment = _compose_ports(tmp_path)
    assert ports == [{"host_ip": "127.0.0.1", "published": "5001", "target": 5001}]
    # Inside its network namespace the container listens everywhere (ports: decides).
    assert environment["HOST"] == "0.0.0.0"
    ports, _ = _compose_ports(tmp_path, MLOPS_PUBLISH_ADDRESS="0.0.0.0", MLOPS_PORT="5002")
    assert ports == [{"host_ip": "0.0.0.0", "published": "5002", "target": 5001}]


# -- credentials on /metrics and /health/detailed, on a real server ----------------------

@pytest.fixture
def keyed(gunicorn):
    return gunicorn(workers=2, **KEYS)


def test_metrics_refuses_without_credentials_when_keys_are_set(keyed):
    refused = requests.get(f"{keyed.url}/metrics", timeout=5)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert "mlops_" not in refused.text
    for headers in ({"Authorization": f"Bearer {TOKEN}"}, {"Authorization": f"Bearer {READ}"},
                    {"X-API-Key": READ}, {"X-API-Key": FULL}):
        response = requests.get(f"{keyed.url}/metrics", headers=headers, timeout=5)
        assert response.status_code == 200, headers
        assert "mlops_build_info" in response.text


def test_health_detailed_shows_details_to_a_read_key_only(keyed):
    for path in ("/health", "/health/ready"):
        assert requests.get(f"{keyed.url}{path}", timeout=5).status_code == 200, path
    anonymous = requests.get(f"{keyed.url}/health/detailed", timeout=5)
    assert anonymous.status_code == 200
    body = anonymous.json()
    assert body["status"] == "healthy" and body["database"] == {"status": "up"}
    assert body["auth"] == "api_key" and "read scope" in body["details"]
    assert not {"version", "pid", "pool", "spool"} & body.keys()
    for key in (READ, FULL):
        full = requests.get(f"{keyed.url}/health/detailed", headers={"X-API-Key": key},
                            timeout=5).json()
        assert {"version", "pid", "pool", "spool"} <= full.keys()
        assert full["database"]["status"] == "up" and "latency_ms" in full["database"]
    wrong = requests.get(f"{keyed.url}/health/detailed",
                         headers={"X-API-Key": "not-a-key-but-long-enough"}, timeout=5).json()
    assert wrong.keys() == body.keys()


def test_the_database_error_reaches_the_log_not_an_anonymous_caller(make_app, service_env):
    port = free_port()  # nothing listens: "connection to server at ... port <port> failed"
    away = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    for env in ({}, KEYS):
        client = make_app(DATABASE_URL=away, **env).test_client()
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.get_json()["database"]["error"] == "unavailable"
        detailed = client.get("/health/detailed")
        assert detailed.get_json()["status"] == "degraded"
        for response in (ready, detailed):
            assert str(port) not in response.get_data(as_text=True), env
    shown = client.get("/health/detailed", headers={"X-API-Key": READ}).get_json()
    assert str(port) in shown["database"]["error"]
    log = (Path(service_env["LOG_DIR"]) / "mlops-service.log").read_text()
    down = [json.loads(line) for line in log.splitlines() if "database unavailable" in line]
    assert down and all(str(port) in line["error"] for line in down)


# -- redirects and headers ---------------------------------------------------------------

def _raw_get(server, path: str, host: str) -> http.client.HTTPResponse:
    """GET ``path`` exactly as written (no client normalises the slashes), with ``Host``."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host)
    conn.endheaders()
    response = conn.getresponse()
    response.body = response.read()
    conn.close()
    return response


def test_a_forged_host_never_reaches_a_location_header(gunicorn):
    server = gunicorn(workers=1)
    response = _raw_get(server, "/dashboard//etc/passwd", "evil.example")
    assert response.status == 308
    assert response.getheader("Location") == "/dashboard/etc/passwd"
    assert b"evil.example" not in response.body
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    assert response.getheader("Content-Security-Policy") == CSP
    followed = _raw_get(server, response.getheader("Location"), "evil.example")
    assert followed.status == 404 and followed.getheader("Content-Security-Policy") == CSP
    for path in ("/dashboard//index.html", "//dashboard//dashboard.js", "/dashboard///x"):
        answer = _raw_get(server, path, "evil.example")
        location = answer.getheader("Location") or "/"
        assert location.startswith("/") and not location.startswith("//"), (path, location)
        assert "evil" not in location and b"evil.example" not in answer.body, path


def test_every_response_says_nosniff_and_dashboard_paths_carry_the_csp(client):
    responses = {
        "page": client.get("/"), "asset": client.get("/dashboard/dashboard.js"),
        "flask static": client.get("/static/dashboard/index.html"),
        "missing asset": client.get("/dashboard/nope.js"),
        "redirect": client.get("/dashboard//dashboard.js"),
        "json": client.get("/health"), "not found": client.get("/nope"),
        "wrong method": client.get("/track"),
        "validation": client.post("/track", json={}),
    }
    for name, response in responses.items():
        assert response.headers.get("X-Content-Type-Options") == "nosniff", name
    for name in ("page", "asset", "flask static", "missing asset", "redirect"):
        assert responses[name].headers.get("Content-Security-Policy") == CSP, name
    assert responses["redirect"].status_code == 308


@pytest.mark.parametrize(("location", "local"), [
    ("http://evil.example/dashboard/x?a=1", "/dashboard/x?a=1"),
    ("https://evil.example//evil.example/x", "/evil.example/x"),  # never //host
    ("/already/local", "/already/local"),
])
def test_same_origin_keeps_only_the_path_and_query(location, local):
    assert same_origin(location) == local


# -- start-up ----------------------------------------------------------------------------

def test_a_short_key_stops_gunicorn_with_one_line(tmp_path):
    server = Gunicorn({"DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
                       "LOG_DIR": str(tmp_path), "SPOOL_DIR": str(tmp_path),
                       "MLOPS_API_KEY": "tiny-key-1"})
    with pytest.raises(RuntimeError, match="exited 1"):
        server.start()
    log = server.log()
    assert "Traceback" not in log and "tiny-key-1" not in log
    assert [line for line in log.splitlines() if "cannot start" in line] == [
        "mlops-service: cannot start: MLOPS_API_KEY must be at least 16 characters "
        "(it has 10); make one with: python3 -c 'import secrets; "
        "print(secrets.token_urlsafe(32))'"]


def _warnings(text: str) -> list[str]:
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [r["message"] for r in lines if r["level"] == "WARNING" and r["logger"] == "mlops"]


@pytest.mark.parametrize(("host", "env", "expected"), [
    ("0.0.0.0", {}, ["MLOPS_API_KEY is not set and HOST=0.0.0.0 (not loopback): "
                     "/track, the read endpoints, erasure (DELETE) and /metrics "
                     "(every business's costs) are open"]),
    ("0.0.0.0", {"MLOPS_METRICS_TOKEN": TOKEN}, ["erasure (DELETE) are open"]),
    ("::", {"MLOPS_API_KEY": FULL}, ["MLOPS_METRICS_TOKEN is not set and HOST=:: "
                                     "(not loopback): /metrics takes only API keys"]),
    ("mlops.internal", {"MLOPS_API_KEY": FULL}, ["MLOPS_METRICS_TOKEN is not set"]),
    ("0.0.0.0", {"MLOPS_API_KEY": FULL, "MLOPS_METRICS_TOKEN": TOKEN}, []),
    ("127.0.0.1", {}, []),
    ("::1", {"MLOPS_API_KEY": FULL}, []),
    ("localhost", {}, []),
    ("127.0.0.1", {"MLOPS_API_KEY": FULL, "MLOPS_AUTH_MODE": "warn"},
     ["MLOPS_AUTH_MODE=warn"]),
])
def test_start_up_warns_once_per_exposure(make_app, service_env, capsys, host, env,
                                          expected):
    make_app()  # configures logging to stdout and LOG_DIR as a server does
    capsys.readouterr()
    announce(Settings.from_env({**service_env, "HOST": host, **env}), "ready")
    warnings = _warnings(capsys.readouterr().out)
    assert len(warnings) == len(expected), warnings
    for warning, start in zip(warnings, expected, strict=True):
        assert start in warning
    assert not any(secret in "".join(warnings) for secret in (FULL, TOKEN))
    if expected and "not loopback" in expected[0]:
        fix = "HOST=127.0.0.1" if "MLOPS_API_KEY is not set" in expected[0] else \
            "set MLOPS_METRICS_TOKEN"
        assert fix in warnings[0]


def test_gunicorn_on_every_interface_without_a_key_warns_at_start(gunicorn):
    server = gunicorn(workers=1, HOST="0.0.0.0")
    (warning,) = _warnings(server.log())
    assert warning.startswith("MLOPS_API_KEY is not set and HOST=0.0.0.0 (not loopback)")
    assert "set MLOPS_API_KEY" in warning
    quiet = gunicorn(workers=1, HOST="127.0.0.1")
    assert _warnings(quiet.log()) == []
