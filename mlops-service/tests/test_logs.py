"""Logs: one JSON line per request in LOG_DIR, nothing else there, no key ever, and an
unwritable folder that warns once."""

from __future__ import annotations

import json
from pathlib import Path

from payloads import SUCCESS


def test_each_request_is_one_json_log_line_in_log_dir(make_app, service_env):
    make_app(LOG_LEVEL="INFO").test_client().get("/health")
    lines = (Path(service_env["LOG_DIR"]) / "mlops-service.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert any(r.get("path") == "/health" and r["status"] == 200 for r in records)
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)


def test_an_unwritable_log_dir_warns_once_and_carries_on(make_app, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    client = make_app(LOG_DIR=blocked / "logs", LOG_LEVEL="INFO").test_client()
    assert client.get("/health").status_code == 200
    out = capsys.readouterr().out
    assert out.count("LOG_DIR is not writable") == 1


def test_the_log_folder_holds_only_logs(make_app, service_env):
    make_app(LOG_LEVEL="INFO").test_client().get("/health")
    assert sorted(p.name for p in Path(service_env["LOG_DIR"]).iterdir()) == ["mlops-service.log"]


def test_the_key_is_never_logged(make_app, service_env):
    client = make_app(MLOPS_API_KEY="k-very-secret-key-0042", LOG_LEVEL="DEBUG").test_client()
    client.post("/track", json=SUCCESS, headers={"X-API-Key": "k-wrong-guess"})
    client.post("/track", json=SUCCESS, headers={"X-API-Key": "k-very-secret-key-0042"})
    client.get("/health/detailed")
    log = (Path(service_env["LOG_DIR"]) / "mlops-service.log").read_text()
    assert "/track" in log
    assert "k-very-secret-key-0042" not in log and "k-wrong-guess" not in log
