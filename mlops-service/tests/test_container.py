"""The image and the compose file, on a real Docker engine, as a user runs them.

Marked ``container``: they need a Docker engine (``.ci/run`` starts one with
``shared/ci/ensure-docker.sh``). Without one they are skipped (conftest.py),
or fail at once with ``REQUIRE_DOCKER=1``.
Every container, network and volume they create is removed, pass or fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from baseimage import use_local_base
from conftest import EMPTY_TABLES_SQL, query
from payloads import FAILURE, SUCCESS
from pgcluster import free_port
from servers import SERVICE_DIR
from support import docker, wait_for_ok, wait_until

pytestmark = [pytest.mark.system, pytest.mark.container]

BASE_IMAGE = "python:3.11-slim"
MAX_ADDED_BYTES = 80 * 1000 * 1000


@pytest.fixture(scope="module", autouse=True)
def engine():
    if shutil.which("docker") is None or docker("info", check=False, timeout=30).returncode:
        pytest.fail("no Docker engine: run ../shared/ci/ensure-docker.sh (as .ci/run does), "
                    "or deselect these tests with -m 'not container'")


def test_the_image_is_lean_non_root_and_holds_only_the_app(image):
    inspect = json.loads(docker("image", "inspect", image).stdout)[0]
    user = inspect["Config"]["User"]
    assert user and user.split(":")[0] not in ("", "0", "root")
    assert "5001/tcp" in inspect["Config"]["ExposedPorts"]
    assert inspect["Config"]["Healthcheck"]["Test"][0] == "CMD"

    files = docker("run", "--rm", "--entrypoint", "find", image, "/app", "-mindepth", "1",
                   "-not", "-path", "*/mlops/*").stdout.split()
    assert sorted(files) == ["/app/app.py", "/app/data", "/app/gunicorn.conf.py", "/app/logs",
                             "/app/mlops", "/app/requirements.txt"]
    inside = docker("run", "--rm", "--entrypoint", "find", image, "/app").stdout
    for unwanted in ("tests", ".env", "__pycache__", ".pyc", ".pytest_cache", ".git", "Dockerfile"):
        assert unwanted not in inside

    # Only logs/ and data/ are the app user's to write.
    owners = docker("run", "--rm", "--entrypoint", "stat", image, "-c", "%U %n",
                    "/app", "/app/app.py", "/app/mlops", "/app/logs", "/app/data").stdout
    assert owners.split("\n")[:5] == ["root /app", "root /app/app.py", "root /app/mlops",
                                      "app /app/logs", "app /app/data"]

    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    for secret in ("MLOPS_API_KEY=", "PASSWORD=", "DATABASE_URL=", "COPY .env", "/app/.env"):
        assert secret not in history

    added = inspect["Size"] - json.loads(docker("image", "inspect", BASE_IMAGE).stdout)[0]["Size"]
    assert added <= MAX_ADDED_BYTES, f"image adds {added / 1e6:.1f} MB to {BASE_IMAGE}"


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert binary, "hadolint not installed: run `make install`"
    result = subprocess.run([binary, str(SERVICE_DIR / "Dockerfile")], capture_output=True,
                            text=True)
    assert (result.returncode, result.stdout) == (0, "")


def test_docker_run_serves_stores_and_stops_gracefully(image, database_url, pg):
    port = free_port()
    name = f"mlops-run-{uuid.uuid4().hex[:8]}"
    # Host networking reaches the machine's Postgres on 127.0.0.1.
    docker("run", "-d", "--name", name, "--network", "host",
           "-e", f"SERVICE_PORT={port}", "-e", f"DATABASE_URL={database_url}", image)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_ok(f"{url}/health")
        body = requests.post(f"{url}/track", json=SUCCESS, timeout=5).json()
        assert body["storage"] == "stored"
        assert query(pg, "SELECT tokens_used FROM mlops_events WHERE event_id = %s",
                     body["event_id"]) == [(SUCCESS["tokens_used"],)]
        metrics = requests.get(f"{url}/metrics", timeout=5).text
        assert f'ai_tokens_used_total{{business_id="{SUCCESS["business_id"]}"' in metrics

        started = time.monotonic()
        docker("stop", name, timeout=30)
        took = time.monotonic() - started
        state = json.loads(docker("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0
        assert took < 10, f"docker stop took {took:.1f}s"
        assert "Shutting down" in docker("logs", name).stderr + docker("logs", name).stdout
    finally:
        docker("rm", "-f", name, check=False)
        pg.cursor().execute(EMPTY_TABLES_SQL)


@pytest.fixture
def compose_project(tmp_path):
    """A fresh copy of mlops-service/ (no .env, no logs/) and a unique project name."""
    checkout = tmp_path / "mlops-service"
    shutil.copytree(SERVICE_DIR, checkout, ignore=shutil.ignore_patterns(
        ".env", "logs", "data", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"))
    use_local_base(checkout)
    project = f"mlops-test-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "MLOPS_API_KEY")}
    env |= {"MLOPS_PORT": str(free_port()), "MLOPS_CONTAINER_NAME": project,
            "MLOPS_IMAGE": f"mlops-service:{project}"}

    def compose(*args: str, timeout: float = 600, check: bool = True):
        return docker("compose", "-p", project, *args, cwd=checkout, env=env, timeout=timeout,
                      check=check)

    compose.dir = checkout
    compose.url = f"http://127.0.0.1:{env['MLOPS_PORT']}"
    compose.container = project
    yield compose
    compose("down", "-v", "--remove-orphans", check=False)
    docker("rmi", "-f", env["MLOPS_IMAGE"], check=False)
    # ./logs was handed to the container's user; make it removable again.
    shutil.rmtree(checkout / "logs", ignore_errors=True)


def _health(container: str) -> str:
    state = json.loads(docker("inspect", container).stdout)[0]["State"]
    return state.get("Health", {}).get("Status", state["Status"])


def _wait_healthy(compose, timeout: float = 120.0) -> float:
    """Seconds until both compose services are healthy; fails with their state and logs."""
    started = time.monotonic()

    def healthy() -> bool:
        ids = compose("ps", "-q", "mlops-service", "postgres").stdout.split()
        return len(ids) == 2 and all(_health(i) == "healthy" for i in ids)

    try:
        wait_until(healthy, "mlops-service and postgres to be healthy", timeout=timeout,
                   interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{compose('ps', '-a').stdout}"
                             f"{compose('logs', check=False).stdout[-3000:]}") from None
    return time.monotonic() - started


def test_compose_up_with_no_env_file_runs_service_and_database(compose_project):
    compose = compose_project
    assert not (compose.dir / "logs").exists()
    compose("up", "-d", "--build", timeout=900)
    started = time.monotonic()
    healthy_after = _wait_healthy(compose)
    print(f"compose: healthy {healthy_after:.1f}s after `up -d` returned")

    business = str(uuid.uuid4())
    for payload in ({**SUCCESS, "business_id": business},
                    {**FAILURE, "business_id": business}):
        response = requests.post(f"{compose.url}/track", json=payload, timeout=5)
        assert response.status_code == 201 and response.json()["storage"] == "stored"

    def rows() -> str:
        return compose("exec", "-T", "postgres", "psql", "-U", "mlops", "-d", "mlops", "-Atc",
                       f"SELECT count(*), sum(tokens_used) FROM mlops_events "
                       f"WHERE business_id = '{business}'").stdout.strip()

    assert rows() == f"2|{SUCCESS['tokens_used']}"
    metrics = requests.get(f"{compose.url}/analytics/{business}", timeout=5).json()["metrics"]
    assert (metrics["total_messages"], metrics["total_tokens"]) == (2, SUCCESS["tokens_used"])

    # The database port is not published to the host.
    (postgres,) = compose("ps", "-q", "postgres").stdout.split()
    assert json.loads(docker("inspect", postgres).stdout)[0]["HostConfig"]["PortBindings"] in (
        {}, None)

    compose("down")
    compose("up", "-d")
    _wait_healthy(compose)
    assert rows() == f"2|{SUCCESS['tokens_used']}"
    assert requests.get(f"{compose.url}/analytics/{business}", timeout=5).json()[
        "metrics"]["total_messages"] == 2

    log_file = compose.dir / "logs" / "mlops-service.log"
    assert log_file.exists() and '"path": "/track"' in log_file.read_text()
    assert time.monotonic() - started < 300

    compose("down", "-v")
    assert compose("ps", "-a", "-q").stdout.strip() == ""
    volumes = docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project="
                     f"{compose.container}").stdout.strip()
    assert volumes == ""
