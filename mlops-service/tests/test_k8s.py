"""The Kubernetes manifests (deploy/k8s): rendered, schema-valid, and saying what the service needs.

Both overlays are rendered with ``kubectl kustomize`` (kubectl's built-in
kustomize), every object is validated strictly (unknown fields refused)
against the Kubernetes OpenAPI schemas bundled in ``kubernetes-validate``
(no network), and the properties the service depends on are checked against
the service's own code: its routes, its gunicorn settings, the image's user.
No cluster runs here; tests/test_rollout.py simulates a rollout.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import kubernetes_validate
import psycopg2
import pytest
import requests
import yaml
from conftest import empty_tables
from payloads import SUCCESS
from pgcluster import free_port
from servers import SERVICE_DIR
from support import wait_for_ok

from mlops.config import ConfigError, Settings

pytestmark = pytest.mark.system

DEPLOY = SERVICE_DIR.parent / "deploy" / "k8s"
OVERLAYS = ["local", "production"]
# The oldest Kubernetes minor still supported upstream when written, and the
# newest that kubernetes-validate bundles.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
# Kinds whose schema is a CRD's, not Kubernetes' own (checked field by field below).
CUSTOM_KINDS = {"ServiceMonitor"}


def kustomize(path: Path) -> list[dict]:
    """``kubectl kustomize path`` as a list of objects."""
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl not found: it renders the manifests (kubectl kustomize); "
                    "the machine image ships it, see docs/kubernetes.md")
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(DEPLOY / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def with_servicemonitor(tmp_path_factory) -> list[dict]:
    """Production plus the optional ServiceMonitor component, as a user would add it."""
    root = tmp_path_factory.mktemp("k8s-sm")
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "mlops",
        "resources": [os.path.relpath(DEPLOY / "overlays" / "production", root)],
        "components": [os.path.relpath(DEPLOY / "components" / "servicemonitor", root)],
    }))
    return kustomize(root)


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects
             if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def service_container(objects: list[dict]) -> dict:
    pod = one(objects, "Deployment", "mlops-service")["spec"]["template"]["spec"]
    return one([{**c, "kind": "c", "metadata": {"name": c["name"]}} for c in pod["containers"]],
               "c", "mlops-service")


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def gunicorn_settings(env: dict[str, str]) -> dict:
    """gunicorn.conf.py's settings as gunicorn reads them, under the pod's environment."""
    code = ("import json, runpy; s = runpy.run_path('gunicorn.conf.py'); "
            "print(json.dumps({k: s[k] for k in ('workers', 'graceful_timeout', "
            "'shutdown_delay_seconds', 'worker_tmp_dir', 'bind')}))")
    pod_env = {k: v for k, v in env.items() if v is not None}
    out = subprocess.run([sys.executable, "-c", code], cwd=SERVICE_DIR, capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", **pod_env}, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def quantity_cores(value: str | int) -> float:
    value = str(value)
    return int(value[:-1]) / 1000 if value.endswith("m") else float(value)


# -- rendering and schemas -------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly_against_the_kubernetes_schemas(rendered, overlay):
    objects = rendered[overlay]
    assert objects
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_refuses_a_misspelt_field(rendered):
    deployment = json.loads(json.dumps(one(rendered["production"], "Deployment")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux's unshare is missing")
def test_validation_needs_no_network(tmp_path, rendered):
    """The schemas ship inside the package: validate in a network namespace with no links."""
    manifest = tmp_path / "production.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered["production"]))
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {probe.stderr.decode().strip()}")
    out = subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "kubernetes_validate", "--strict",
         "-k", KUBERNETES_VERSIONS[0], str(manifest)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed") == len(rendered["production"])


def test_the_servicemonitor_component_selects_the_service_port(with_servicemonitor):
    monitor = one(with_servicemonitor, "ServiceMonitor", "mlops-service")
    service = one(with_servicemonitor, "Service", "mlops-service")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"] == "mlops"
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    assert "http" in port_names
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    for obj in with_servicemonitor:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[0], strict=True)


# -- the pod -----------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_the_services_own_health_routes_on_its_port(rendered, overlay, app):
    container = service_container(rendered[overlay])
    routes = {rule.rule for rule in app.url_map.iter_rules()}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {kind: container[kind]["httpGet"]
              for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/health/ready"
    # Liveness never asks the database: a Postgres outage must not restart pods.
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/health"
    for probe in probes.values():
        assert probe["path"] in routes
        assert ports[probe["port"]] == 5001
    settings = gunicorn_settings(env_of(container))
    assert settings["bind"].endswith(":5001")
    # A startup probe that gives up restarts a slow pod for ever: a minute at least.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    assert env_of(container)["READINESS_CHECKS_DATABASE"] == "false"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_prestop_gunicorn_graceful_stop_and_spool_drain(rendered, overlay):
    pod = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    container = service_container(rendered[overlay])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 5, "endpoints need a few seconds to drop the pod everywhere"
    settings = gunicorn_settings(env_of(container))
    # graceful_timeout bounds in-flight requests plus worker_exit's spool drain (3 s).
    assert settings["graceful_timeout"] >= 3 + 1
    needed = pre_stop + settings["shutdown_delay_seconds"] + settings["graceful_timeout"]
    assert pod["terminationGracePeriodSeconds"] >= needed + 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_context_matches_the_image_and_locks_the_container_down(rendered, overlay):
    pod = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    container = service_container(rendered[overlay])
    user = re.search(r"^USER (\d+):(\d+)$", (SERVICE_DIR / "Dockerfile").read_text(), re.M)
    assert user, "the Dockerfile names its user by number"
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"]) == (int(user[1]), int(user[2]))
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    own = container["securityContext"]
    assert own["allowPrivilegeEscalation"] is False
    assert own["readOnlyRootFilesystem"] is True
    assert own["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in own and "runAsUser" not in own


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_path_the_service_writes_is_a_volume(rendered, overlay):
    """Read-only root: logs, spool, metric files and /tmp on emptyDirs; heartbeat on /dev/shm."""
    pod = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    container = service_container(rendered[overlay])
    env = env_of(container)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    def mounted(path: str) -> bool:
        return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)

    for variable in ("LOG_DIR", "SPOOL_DIR", "PROMETHEUS_MULTIPROC_DIR"):
        assert mounted(env[variable]), f"{variable}={env[variable]} is on the read-only root"
    assert mounted("/tmp")
    for name in mounts.values():
        assert "emptyDir" in volumes[name] and volumes[name]["emptyDir"].get("sizeLimit")
    # gunicorn's heartbeat files go to the runtime's own tmpfs.
    assert gunicorn_settings(env)["worker_tmp_dir"] == "/dev/shm"
    spool = volumes[mounts[env["SPOOL_DIR"]]]["emptyDir"]
    spool_limit = int(spool["sizeLimit"].removesuffix("Mi")) * 2**20
    assert spool_limit > int(env["SPOOL_MAX_BYTES"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_are_set_and_workers_match_the_cpu_limit(rendered, overlay):
    for obj in rendered[overlay]:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for container in obj["spec"]["template"]["spec"]["containers"]:
                resources = container["resources"]
                for section in ("requests", "limits"):
                    assert {"cpu", "memory"} <= resources[section].keys(), container["name"]
    container = service_container(rendered[overlay])
    cores = quantity_cores(container["resources"]["limits"]["cpu"])
    settings = gunicorn_settings(env_of(container))
    assert settings["workers"] == int(env_of(container)["WEB_CONCURRENCY"]) == math.ceil(cores)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_has_an_explicit_tag_and_none_is_latest(rendered, overlay):
    for obj in rendered[overlay]:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for container in obj["spec"]["template"]["spec"]["containers"]:
                image = container["image"]
                name, _, tag = image.rpartition(":")
                assert name and "/" not in tag, f"{image} has no tag"
                assert tag != "latest" and "@" not in name
    assert service_container(rendered["local"])["image"] == "mlops-service:local"
    assert service_container(rendered["production"])["image"].startswith("ghcr.io/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_scrape_annotations_reach_the_pods_port(rendered, overlay):
    objects = rendered[overlay]
    deployment = one(objects, "Deployment", "mlops-service")
    service = one(objects, "Service", "mlops-service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container = service_container(objects)
    names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "5001"
    assert annotations["prometheus.io/path"] == "/metrics"
    strategy = deployment["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


# -- the overlays ------------------------------------------------------------------------

def test_production_reads_the_database_url_from_a_secret_it_does_not_ship(rendered):
    objects = rendered["production"]
    assert not [o for o in objects if o["kind"] == "Secret"]
    container = service_container(objects)
    database = next(e for e in container["env"] if e["name"] == "DATABASE_URL")
    assert database == {"name": "DATABASE_URL", "valueFrom": {
        "secretKeyRef": {"name": "mlops-database", "key": "DATABASE_URL"}}}
    committed = "\n".join(p.read_text() for p in DEPLOY.rglob("*.yaml"))
    assert not re.search(r"postgres(ql)?://[^\s'\"]*:[^\s'\"@]+@[^\s'\"]*neon", committed)


def test_local_generates_its_secret_and_runs_postgres_on_a_volume(rendered):
    objects = rendered["local"]
    secret = one(objects, "Secret")
    container = service_container(objects)
    ref = next(e for e in container["env"] if e["name"] == "DATABASE_URL")
    assert ref["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert secret["metadata"]["name"].startswith("mlops-database-")  # content hash suffix
    assert "DATABASE_URL" in secret["data"]
    postgres = one(objects, "StatefulSet", "postgres")
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    mounts = postgres["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert [m["name"] for m in mounts] == ["data"]
    service = one(objects, "Service", "postgres")
    assert "@postgres:5432/" in _secret_value(secret, "DATABASE_URL")
    assert service["spec"]["ports"][0]["port"] == 5432


def _secret_value(secret: dict, key: str) -> str:
    import base64

    return base64.b64decode(secret["data"][key]).decode()


def test_production_scales_two_to_ten_on_cpu_with_a_disruption_budget(rendered):
    objects = rendered["production"]
    deployment = one(objects, "Deployment", "mlops-service")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = one(objects, "HorizontalPodAutoscaler", "mlops-service")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "mlops-service"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = one(objects, "PodDisruptionBudget", "mlops-service")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname",
                                                  "topology.kubernetes.io/zone"}
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()


# The labels README documents for the clients the NetworkPolicy admits.
CLIENT_LABEL = {"mlops-service/client": "true"}
PROMETHEUS_PODS = {"app.kubernetes.io/name": "prometheus"}
PROMETHEUS_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}


def test_production_network_policy_admits_only_the_chat_app_and_prometheus(rendered):
    objects = rendered["production"]
    policy = one(objects, "NetworkPolicy", "mlops-service")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    for rule in rules:  # a rule without `from` would admit every source
        assert rule["ports"] == [{"protocol": "TCP", "port": 5001}]
        assert rule["from"] and all(peer.get("podSelector", {}).get("matchLabels")
                                    for peer in rule["from"]), rule
        assert not any("ipBlock" in peer for peer in rule["from"])
    peers = [(peer.get("namespaceSelector"), peer["podSelector"]["matchLabels"])
             for rule in rules for peer in rule["from"]]
    assert peers == [({}, CLIENT_LABEL),
                     ({"matchLabels": PROMETHEUS_NAMESPACE}, PROMETHEUS_PODS)]
    documented = (DEPLOY / "overlays" / "production" / "networkpolicy.yaml").read_text()
    for labels in (CLIENT_LABEL, PROMETHEUS_PODS, PROMETHEUS_NAMESPACE):
        for key, value in labels.items():
            assert key in documented and value in documented


def _secret_refs(container: dict) -> dict[str, dict]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}


def test_production_requires_an_api_key_and_a_metrics_token_from_a_secret(rendered):
    """Required secretKeyRefs: a missing Secret or key leaves the pod in
    CreateContainerConfigError, so the rollout stops instead of serving open."""
    objects = rendered["production"]
    assert not [o for o in objects if o["kind"] == "Secret"]  # created by the operator
    refs = _secret_refs(service_container(objects))
    for name in ("MLOPS_API_KEY", "MLOPS_METRICS_TOKEN"):
        assert refs[name] == {"name": "mlops-auth", "key": name}, refs.get(name)
        assert "optional" not in refs[name]
    assert refs["MLOPS_READ_API_KEY"]["optional"] is True
    # What the pod's environment gives the service: keys enforced, /metrics behind the token.
    env = {k: v for k, v in env_of(service_container(objects)).items() if v is not None}
    env |= {"DATABASE_URL": "postgresql://u@h/db",
            "MLOPS_API_KEY": "k" * 43, "MLOPS_METRICS_TOKEN": "t" * 43}
    settings = Settings.from_env(env)
    assert (settings.auth_mode, settings.metrics_token) == ("enforce", "t" * 43)
    assert settings.host == "0.0.0.0"  # the pod IP: Service, Prometheus, kubelet
    with pytest.raises(ConfigError, match="MLOPS_API_KEY must be at least 16"):
        Settings.from_env({**env, "MLOPS_API_KEY": "changeme"})
    # The local overlay stays zero-config (its cluster is the developer's own).
    assert "MLOPS_API_KEY" not in _secret_refs(service_container(rendered["local"]))
    steps = (DEPLOY / "overlays" / "production" / "kustomization.yaml").read_text()
    assert "create secret generic mlops-auth" in steps
    assert "MLOPS_API_KEY=" in steps and "MLOPS_METRICS_TOKEN=" in steps


def test_the_servicemonitor_sends_the_pods_metrics_token(with_servicemonitor):
    (endpoint,) = one(with_servicemonitor, "ServiceMonitor", "mlops-service")["spec"]["endpoints"]
    token = _secret_refs(service_container(with_servicemonitor))["MLOPS_METRICS_TOKEN"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": token}


# -- the readiness the manifests rely on -------------------------------------------------

def test_readiness_stays_200_while_postgres_is_away_when_told_not_to_check_it(make_app):
    """READINESS_CHECKS_DATABASE=false (the pods): a spooling pod stays in the Service."""
    away = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    checking = make_app(DATABASE_URL=away).test_client()
    assert checking.get("/health/ready").status_code == 503
    pod = make_app(DATABASE_URL=away, READINESS_CHECKS_DATABASE="false").test_client()
    response = pod.get("/health/ready")
    assert response.status_code == 200
    assert response.json["database"] == {"status": "not_checked"}
    assert pod.post("/track", json=SUCCESS).status_code == 202  # it does take events


@pytest.mark.parametrize("raw, value", [("false", False), ("0", False), ("TRUE", True)])
def test_readiness_checks_database_is_a_boolean(raw, value):
    env = {"DATABASE_URL": "postgresql://postgres@127.0.0.1/postgres",
           "READINESS_CHECKS_DATABASE": raw}
    assert Settings.from_env(env).readiness_checks_database is value


def test_a_malformed_readiness_setting_is_refused_by_name():
    with pytest.raises(ConfigError, match="READINESS_CHECKS_DATABASE"):
        Settings.from_env({"DATABASE_URL": "postgresql://postgres@127.0.0.1/postgres",
                           "READINESS_CHECKS_DATABASE": "sometimes"})


# -- the image under the pod's security context, on a real Docker engine ----------------

@pytest.mark.container
def test_the_image_serves_under_the_pods_security_context(rendered, image, database_url):
    """docker run with what the pod spec asks: uid, read-only root, no capabilities, its volumes."""
    pod = one(rendered["production"], "Deployment")["spec"]["template"]["spec"]
    container = service_container(rendered["production"])
    context, own = pod["securityContext"], container["securityContext"]
    port = free_port()
    flags = ["--user", f"{context['runAsUser']}:{context['runAsGroup']}",
             "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    if own["readOnlyRootFilesystem"]:
        flags.append("--read-only")
    # Each emptyDir as an anonymous volume: it starts with the image folder's
    # owner (app, or root with mode 1777 for /tmp), while an emptyDir is mode
    # 0777 with the fsGroup, so what works here works there.
    for mount in container["volumeMounts"]:
        flags += ["-v", mount["mountPath"]]
    # What the pod's Secrets would hold (the optional read key is left out).
    secrets = {"DATABASE_URL": database_url, "MLOPS_API_KEY": "k8s-test-api-key-0123456789",
               "MLOPS_METRICS_TOKEN": "k8s-test-metrics-token-0123456789"}
    for name, value in env_of(container).items():
        if value is not None or name in secrets:
            flags += ["-e", f"{name}={value if value is not None else secrets[name]}"]
    name = f"mlops-k8s-{uuid.uuid4().hex[:8]}"
    run = subprocess.run(["docker", "run", "-d", "--name", name, "--network", "host",
                          *flags, "-e", f"SERVICE_PORT={port}", image],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_ok(f"{url}/health/ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{_docker_logs(name)}") from None
        event_id = str(uuid.uuid4())
        response = requests.post(f"{url}/track", json={**SUCCESS, "event_id": event_id},
                                 headers={"X-API-Key": secrets["MLOPS_API_KEY"]}, timeout=5)
        assert response.status_code == 201, response.text
        assert requests.get(f"{url}/metrics", timeout=5).status_code == 401
        bearer = {"Authorization": f"Bearer {secrets['MLOPS_METRICS_TOKEN']}"}
        assert "mlops_events_stored_total" in requests.get(f"{url}/metrics", headers=bearer,
                                                           timeout=5).text
        # The preStop command exists in the image and runs as the pod's user.
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert subprocess.run(["docker", "exec", name, pre_stop[0], "0"],
                              timeout=30).returncode == 0
        grace = pod["terminationGracePeriodSeconds"]
        started = time.monotonic()
        subprocess.run(["docker", "stop", "-t", str(grace), name], capture_output=True,
                       timeout=grace + 30)
        stopped_in = time.monotonic() - started
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", name],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        logs = _docker_logs(name)
        assert state == "0" and stopped_in < grace, logs
        assert "Read-only file system" not in logs and "Permission denied" not in logs, logs
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True, timeout=60)
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM mlops_events WHERE event_id = %s", (event_id,))
        assert cur.fetchone()[0] == 1  # stored once
    conn.close()
    empty_tables(database_url)


def _docker_logs(name: str) -> str:
    out = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=30)
    return out.stdout + out.stderr
