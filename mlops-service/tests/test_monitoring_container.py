"""The compose ``monitoring`` profile on a real Docker engine.

Prometheus and Alertmanager run from the profile's pinned images (on this
machine, ensure-docker.sh's stand-ins: Debian's Prometheus 2.42 and
Alertmanager 0.25) and Prometheus scrapes the service container over the
compose network. Grafana has no image here: the profile's Grafana service is
checked in the resolved compose file, its provisioning and dashboard in
test_monitoring.py. Marked ``container``; every container, network, volume
and image made here is removed, pass or fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest
import requests
import support
import yaml
from baseimage import use_local_base
from payloads import SUCCESS
from pgcluster import free_port
from servers import SERVICE_DIR

pytestmark = [pytest.mark.system, pytest.mark.container]

MONITORING = SERVICE_DIR.parent / "monitoring"
PROFILE = {"prometheus", "alertmanager", "grafana"}


def wait_until(condition, what: str):
    """support.wait_until with a container's start-up time; no answer yet is "not yet"."""
    return support.wait_until(condition, what, timeout=120.0, interval=0.5,
                              retry_on=requests.RequestException)


@pytest.fixture
def project(tmp_path):
    """A fresh copy of mlops-service/ and monitoring/, unique names and ports."""
    if shutil.which("docker") is None or subprocess.run(
            ["docker", "info"], capture_output=True, timeout=30).returncode:
        pytest.fail("no Docker engine: run ../shared/ci/ensure-docker.sh (as .ci/run does), "
                    "or deselect these tests with -m 'not container'")
    checkout = tmp_path / "mlops-service"
    shutil.copytree(SERVICE_DIR, checkout, ignore=shutil.ignore_patterns(
        ".env", "logs", "data", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"))
    use_local_base(checkout)
    shutil.copytree(MONITORING, tmp_path / "monitoring")
    name = f"mlops-mon-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "MLOPS_API_KEY", "MLOPS_METRICS_TOKEN")}
    env |= {"MLOPS_PORT": str(free_port()), "MLOPS_CONTAINER_NAME": name,
            "MLOPS_IMAGE": f"mlops-service:{name}", "PROMETHEUS_PORT": str(free_port()),
            "ALERTMANAGER_PORT": str(free_port()), "GRAFANA_PORT": str(free_port())}

    def compose(*args: str, timeout: float = 600, check: bool = True) -> str:
        result = subprocess.run(["docker", "compose", "-p", name, *args], cwd=checkout,
                                env=env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode:
            raise AssertionError(f"docker compose {' '.join(args)}:\n{result.stdout}"
                                 f"{result.stderr}")
        return result.stdout

    compose.env = env
    yield compose
    compose("--profile", "monitoring", "down", "-v", "--remove-orphans", check=False)
    subprocess.run(["docker", "rmi", "-f", env["MLOPS_IMAGE"]], capture_output=True)
    shutil.rmtree(checkout / "logs", ignore_errors=True)


def test_the_profile_adds_only_monitoring_services_on_loopback_ports(project):
    plain = yaml.safe_load(project("config"))
    full = yaml.safe_load(project("--profile", "monitoring", "config"))
    assert set(full["services"]) - set(plain["services"]) == PROFILE
    # Without the profile the file resolves exactly as before it had one.
    assert plain["services"] == {k: v for k, v in full["services"].items() if k not in PROFILE}
    for service in PROFILE:
        spec = full["services"][service]
        image, _, tag = spec["image"].rpartition(":")
        assert tag[:1] == "v" or tag[:1].isdigit(), spec["image"]  # a version, not latest
        assert [p["host_ip"] for p in spec["ports"]] == ["127.0.0.1"]
    grafana = full["services"]["grafana"]["environment"]
    assert (grafana["GF_AUTH_ANONYMOUS_ENABLED"], grafana["GF_AUTH_ANONYMOUS_ORG_ROLE"]) == (
        "true", "Viewer")


def test_prometheus_scrapes_the_service_container_over_the_compose_network(project):
    project("up", "-d", "--build", "mlops-service", "prometheus", "alertmanager", timeout=900)
    prometheus = f"http://127.0.0.1:{project.env['PROMETHEUS_PORT']}"
    service = f"http://127.0.0.1:{project.env['MLOPS_PORT']}"

    def api(path: str, **params):
        body = requests.get(f"{prometheus}/api/v1/{path}", params=params, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]

    def target_up():
        targets = api("targets")["activeTargets"]
        return [t for t in targets if t["labels"]["job"] == "mlops-service"
                and t["health"] == "up"]

    try:
        [target] = wait_until(target_up, "Prometheus to scrape mlops-service:5001")
        assert target["scrapeUrl"] == "http://mlops-service:5001/metrics"

        wait_until(lambda: requests.get(f"{service}/health", timeout=2).ok, "the service")
        business = str(uuid.uuid4())
        response = requests.post(f"{service}/track", json={**SUCCESS, "business_id": business},
                                 timeout=5)
        assert response.status_code == 201
        query = f'sum(ai_requests_total{{business_id="{business}"}})'
        wait_until(lambda: api("query", query=query)["result"], "the message in Prometheus")
        assert api("query", query=query)["result"][0]["value"][1] == "1"

        rules = [r for g in wait_until(lambda: api("rules")["groups"], "rules")
                 for r in g["rules"]]
        assert len(rules) >= 20
        assert [r["name"] for r in rules if r["health"] == "err"] == []
        wait_until(lambda: api("alertmanagers")["activeAlertmanagers"], "Alertmanager")
        status = requests.get(f"http://127.0.0.1:{project.env['ALERTMANAGER_PORT']}"
                              "/api/v2/status", timeout=5).json()
        assert status["cluster"]["status"] in ("ready", "disabled")
        # The full config checks, with the token file compose wrote in place.
        project("exec", "-T", "prometheus", "promtool", "check", "config",
                "/etc/prometheus/prometheus.yml")
        project("exec", "-T", "alertmanager", "amtool", "check-config",
                "/etc/alertmanager/alertmanager.yml")
    except AssertionError:
        print(project("--profile", "monitoring", "logs", "--tail", "50", check=False))
        raise
    inspect = json.loads(subprocess.run(
        ["docker", "inspect", project.env["MLOPS_CONTAINER_NAME"]], capture_output=True,
        text=True).stdout)[0]
    assert inspect["State"]["Running"]
