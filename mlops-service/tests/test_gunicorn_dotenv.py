"""gunicorn takes its bind address, workers and log level from the service's settings,
`.env` included, and says what it bound in its start-up line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import requests
from pgcluster import free_port
from servers import SERVICE_DIR
from support import wait_until


@pytest.fixture
def started(service_env, tmp_path):
    """Factory: gunicorn started in ``tmp_path`` (its `.env` written first) with ``env``."""
    procs = []

    def start(dotenv: str, env: dict[str, str]) -> subprocess.Popen:
        (tmp_path / ".env").write_text(dotenv)
        out = open(tmp_path / "gunicorn.out", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(SERVICE_DIR / "gunicorn.conf.py"),
             "app:app"],
            cwd=tmp_path, env={**env, "PYTHONPATH": str(SERVICE_DIR)}, stdout=out,
            stderr=subprocess.STDOUT)
        procs.append((proc, out))
        return proc

    yield start
    for proc, out in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        out.close()


def _environment(service_env: dict[str, str], *unset: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (*unset, "PROMETHEUS_MULTIPROC_DIR", "WEB_CONCURRENCY")}
    return {**env, **{k: v for k, v in service_env.items() if k not in unset}}


def _lines(tmp_path) -> list[dict]:
    lines = []
    for line in (tmp_path / "gunicorn.out").read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_gunicorn_binds_the_port_and_workers_dot_env_gives(started, service_env, tmp_path):
    port = free_port()
    env = _environment(service_env, "SERVICE_PORT", "LOG_LEVEL")
    proc = started(f"SERVICE_PORT={port}\nWEB_CONCURRENCY=2\nLOG_LEVEL=INFO\n", env)

    def answering() -> bool:
        assert proc.poll() is None, f"gunicorn exited {proc.returncode}"  # fails the wait now
        return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200

    try:
        wait_until(answering, f"gunicorn to answer /health on port {port}", timeout=30,
                   interval=0.1, retry_on=requests.RequestException)
    except AssertionError as exc:  # exited or never answered: its output says why
        exc.add_note((tmp_path / "gunicorn.out").read_text())
        raise
    starting = [line for line in _lines(tmp_path) if line["message"] == "mlops-service starting"]
    assert [line["port"] for line in starting] == [port]
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    assert len(workers.stdout.split()) == 2


def test_a_bad_dot_env_value_stops_gunicorn_with_one_line(started, service_env, tmp_path):
    proc = started("SERVICE_PORT=six\n", _environment(service_env, "SERVICE_PORT"))
    assert proc.wait(30) == 1
    output = (tmp_path / "gunicorn.out").read_text()
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if "cannot start" in line] == [
        "mlops-service: cannot start: SERVICE_PORT must be a whole number, got 'six'"]
