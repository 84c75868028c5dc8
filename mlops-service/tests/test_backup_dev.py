"""`make backup` / `make restore` and `make dev`, on a real Docker engine.

Each test runs a compose project of its own (unique name, port, container
and image) from a temporary copy of the repository's Makefile and
mlops-service/ folder, so editing source or writing backups never touches
the checkout. Marked ``container``; everything created is removed after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
from baseimage import use_local_base
from payloads import FAILURE, SUCCESS
from pgcluster import free_port
from servers import SERVICE_DIR
from support import docker, wait_for_ok, wait_until

pytestmark = [pytest.mark.system, pytest.mark.container]

REPO_DIR = SERVICE_DIR.parent


class Project:
    """A copy of the repository (Makefile + mlops-service/) run as compose project ``name``."""

    def __init__(self, root: Path, image: str) -> None:
        self.root = root
        self.dir = root / "mlops-service"
        shutil.copy(REPO_DIR / "Makefile", root / "Makefile")
        shutil.copytree(SERVICE_DIR, self.dir, ignore=shutil.ignore_patterns(
            ".env", "logs", "data", "backups", "__pycache__", ".pytest_cache", ".ruff_cache",
            ".hypothesis"))
        use_local_base(self.dir)  # `make dev` builds the image from this copy
        self.name = f"mlops-test-{uuid.uuid4().hex[:8]}"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("DATABASE_URL", "MLOPS_API_KEY", "MAKEFLAGS", "MAKELEVEL")}
        self.env |= {"COMPOSE_PROJECT_NAME": self.name, "MLOPS_PORT": str(port),
                     "MLOPS_CONTAINER_NAME": self.name, "MLOPS_IMAGE": image}

    def compose(self, *args: str, timeout: float = 600, check: bool = True):
        return docker("compose", *args, cwd=self.dir, env=self.env, timeout=timeout, check=check)

    def make(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """``make -C <copy> args...`` with this project's environment (not checked)."""
        return subprocess.run(["make", "--no-print-directory", "-C", str(self.root), *args],
                              capture_output=True, text=True, timeout=600,
                              env={**self.env, **(env or {})})

    def wait_healthy(self, timeout: float = 120.0) -> None:
        def healthy() -> bool:
            ids = self.compose("ps", "-q", "mlops-service", "postgres").stdout.split()
            states = [json.loads(docker("inspect", i).stdout)[0]["State"] for i in ids]
            return len(ids) == 2 and all(s.get("Health", {}).get("Status") == "healthy"
                                         for s in states)

        try:
            wait_until(healthy, "mlops-service and postgres to be healthy", timeout=timeout,
                       interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.compose('ps', '-a').stdout}"
                                 f"{self.compose('logs', check=False).stdout[-3000:]}") from None

    def totals(self, business: str) -> dict:
        metrics = requests.get(f"{self.url}/analytics/{business}", timeout=5).json()["metrics"]
        return {k: metrics[k] for k in ("total_messages", "total_tokens", "success_rate")}

    def track(self, payload: dict) -> None:
        response = requests.post(f"{self.url}/track", json=payload, timeout=5)
        assert response.status_code == 201 and response.json()["storage"] == "stored"


@pytest.fixture
def project(tmp_path, image):
    proj = Project(tmp_path, image)
    yield proj
    proj.compose("-f", "docker-compose.yml", "-f", "docker-compose.dev.yml", "down", "-v",
                 "--remove-orphans", check=False)
    # ./logs was handed to the container's user; make it removable again.
    shutil.rmtree(proj.dir / "logs", ignore_errors=True)


def _one_line_refusal(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    refusal = [line for line in result.stderr.splitlines() if line.startswith("make ")
               and not line.startswith("make: ")]
    assert len(refusal) == 1, result.stderr
    for needle in needles:
        assert needle in refusal[0], refusal[0]
    return refusal[0]


def test_backup_survives_down_v_and_restores_the_same_totals(project):
    project.compose("up", "-d")
    project.wait_healthy()
    business = str(uuid.uuid4())
    for payload in (SUCCESS, {**SUCCESS, "tokens_used": 1000}, FAILURE):
        project.track({**payload, "business_id": business})
    before = project.totals(business)
    assert before["total_messages"] == 3

    made = project.make("backup")
    assert made.returncode == 0, made.stdout + made.stderr
    (backup,) = (project.dir / "backups").glob("mlops-*.dump")
    assert backup.name in made.stdout and backup.stat().st_size > 0
    assert not list((project.dir / "backups").glob("*.partial"))

    _one_line_refusal(project.make("restore", "FILE=backups/no-such.dump"), "is not a file")
    _one_line_refusal(project.make("restore", f"FILE={backup}"), "3 events", "FORCE=1")

    project.compose("down", "-v")
    project.compose("up", "-d")
    project.wait_healthy()
    assert project.totals(business)["total_messages"] == 0

    restored = project.make("restore", f"FILE={backup}")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert project.totals(business) == before
    ready = requests.get(f"{project.url}/health/ready", timeout=5).json()
    assert ready["status"] == "ready" and ready["spool"]["depth"] == 0

    # The service keeps storing into the restored tables; FORCE=1 rolls them back.
    project.track({**SUCCESS, "business_id": business})
    assert project.totals(business)["total_messages"] == 4
    forced = project.make("restore", f"FILE={backup}", "FORCE=1")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert project.totals(business) == before


def test_backup_refuses_a_remote_database(project):
    neon = "postgresql://u:p@ep-cool-name-123.eu-central-1.aws.neon.tech/neondb?sslmode=require"
    result = project.make("backup", env={"DATABASE_URL": neon})
    _one_line_refusal(result, "ep-cool-name-123.eu-central-1.aws.neon.tech",
                      "point-in-time restore")
    assert not (project.dir / "backups").exists()
    # The same URL from .env, where compose reads it.
    (project.dir / ".env").write_text(f"DATABASE_URL={neon}\n")
    _one_line_refusal(project.make("backup"), "neon.tech")


def test_dev_mode_serves_an_edited_route_without_a_rebuild(project):
    made = project.make("dev", "DETACH=1")
    assert made.returncode == 0, made.stdout + made.stderr
    project.wait_healthy()
    assert requests.get(f"{project.url}/health", timeout=5).json()["monitoring"] == "prometheus"
    (container,) = project.compose("ps", "-q", "mlops-service").stdout.split()
    state_before = json.loads(docker("inspect", container).stdout)[0]
    # The mounted source is read-only to the container.
    touch = project.compose("exec", "-T", "mlops-service", "touch", "/app/mlops/x", check=False)
    assert touch.returncode != 0

    marker = f"edited-{uuid.uuid4().hex[:8]}"
    route = project.dir / "mlops" / "routes" / "health.py"
    source = route.read_text()
    assert source.count('"monitoring": "prometheus",') == 1
    route.write_text(source.replace('"monitoring": "prometheus",', f'"monitoring": "{marker}",'))
    edited = time.monotonic()
    try:
        wait_until(lambda: requests.get(f"{project.url}/health", timeout=2).json()[
            "monitoring"] == marker, "the edit to be served", interval=0.2,
            retry_on=(requests.ConnectionError, ValueError))  # the worker is restarting
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n"
                             f"{project.compose('logs', 'mlops-service').stdout[-3000:]}") from None
    served = time.monotonic() - edited
    print(f"dev mode: edit served after {served:.1f}s")
    assert served < 10

    state_after = json.loads(docker("inspect", container).stdout)[0]
    assert state_after["Image"] == state_before["Image"]
    assert state_after["State"]["StartedAt"] == state_before["State"]["StartedAt"]
    wait_for_ok(f"{project.url}/health/ready")
    logs = project.compose("logs", "mlops-service").stdout
    assert '"level": "DEBUG"' in logs or "[DEBUG]" in logs
