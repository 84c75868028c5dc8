"""/health, /health/ready and /health/detailed, JSON answers to unknown routes, and CORS,
in process against a real Postgres."""

from __future__ import annotations

from mlops.version import __version__


def test_health_endpoints(client):
    health = client.get("/health").get_json()
    assert {k: health[k] for k in ("status", "service", "monitoring")} == {
        "status": "healthy", "service": "mlops-service", "monitoring": "prometheus"}
    assert "timestamp" in health
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.get_json()["database"]["status"] == "up"
    detailed = client.get("/health/detailed").get_json()
    assert detailed["version"] == __version__
    assert 0 < detailed["uptime_seconds"] < 60
    assert detailed["pool"]["max_connections"] == 10
    assert detailed["spool"]["depth"] == 0


def test_readiness_reports_a_database_that_is_gone(make_app):
    client = make_app(DATABASE_URL="postgresql://postgres@127.0.0.1:1/none",
                      DB_CONNECT_TIMEOUT_SECONDS=1).test_client()
    assert client.get("/health").status_code == 200
    response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.get_json()["reason"].startswith("database unavailable")


def test_unknown_routes_and_methods_answer_json(client):
    assert client.get("/nope").get_json()["error"] == "not_found"
    assert client.get("/track").status_code == 405
    assert client.get("/track").get_json()["status"] == "error"


def test_cors_only_for_listed_origins(make_app):
    closed = make_app().test_client()
    assert "Access-Control-Allow-Origin" not in closed.get(
        "/health", headers={"Origin": "https://evil.example"}).headers
    client = make_app(ALLOWED_ORIGINS="https://app.example").test_client()
    ok = client.get("/health", headers={"Origin": "https://app.example"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Access-Control-Allow-Origin" not in client.get(
        "/health", headers={"Origin": "https://evil.example"}).headers
