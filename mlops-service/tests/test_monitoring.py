"""The monitoring kit (``../monitoring``) against real parts.

A real Prometheus (Debian's 2.42 binary, ``make tools``) loads the project's
rule files and scrapes a real gunicorn (2 workers) whose Postgres is a private
cluster this module can stop. The config it runs is the project's
``prometheus.yml`` with only the target, the token file's path and the
intervals changed (1 s scrapes and evaluations; alerts' ``for`` cut to 1 s,
since the promtool unit tests cover the real durations), so alerts fire in
seconds. Grafana has no package or image here: its provisioning files and
dashboard JSON are checked, and every dashboard query runs on this Prometheus.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from payloads import FAILURE, SUCCESS, varied
from pgcluster import PgCluster, free_port
from servers import SERVICE_DIR, Gunicorn
from support import wait_until

from mlops import telemetry

pytestmark = pytest.mark.system

REPO = SERVICE_DIR.parent
MONITORING = REPO / "monitoring"
PROM_DIR = MONITORING / "prometheus"
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
JOB = "mlops-service"
BUSINESSES = ["acme-dental", "bright-smile", "city-clinic"]
# Dashboard panels that are empty while all is well.
MAY_BE_EMPTY = {"Alerts firing"}
TIMEOUT = 60.0


def tool(name: str) -> str:
    """Path of promtool / prometheus: $PROMTOOL / $PROMETHEUS, ../.tools, or PATH."""
    candidates = [os.environ.get(name.upper()), str(REPO / ".tools" / name), shutil.which(name)]
    found = next((c for c in candidates if c and os.path.exists(c)), None)
    if found is None:
        pytest.fail(f"{name} not found: run `make tools` (or set {name.upper()}=/path/to/{name})")
    return os.path.abspath(found)


class Prometheus:
    """A Prometheus server run from the project's config, on a free port."""

    def __init__(self, workdir: Path, target: str, token: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.token_file = workdir / "metrics-token"
        self.token_file.write_text(token + "\n")  # as compose writes it
        rules = workdir / "rules"
        rules.mkdir()
        for path in sorted((PROM_DIR / "rules").glob("*.yml")):
            doc = yaml.safe_load(path.read_text())
            for group in doc["groups"]:
                for rule in group["rules"]:
                    if "for" in rule:
                        rule["for"] = "1s"
            (rules / path.name).write_text(yaml.safe_dump(doc, sort_keys=False))
        config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        config["global"] |= {"scrape_interval": "1s", "scrape_timeout": "1s",
                             "evaluation_interval": "1s"}
        config.pop("alerting")
        scrape = next(j for j in config["scrape_configs"] if j["job_name"] == JOB)
        scrape["authorization"]["credentials_file"] = str(self.token_file)
        scrape["static_configs"] = [{"targets": [target]}]
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={self.config}",
                 f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT)
        wait_until(self._ready, "Prometheus to be ready", timeout=TIMEOUT)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n"
                               f"{self.log.read_text()[-3000:]}")
        try:
            return requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def api(self, path: str, **params) -> dict | list:
        """``data`` of a Prometheus HTTP API answer; fails on an error answer."""
        body = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant vector result of ``expr``."""
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr``, or None when it has no result."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A private Postgres, gunicorn (2 workers) on it, and Prometheus scraping it
    with the metrics token (the compose test covers the no-token default)."""
    work = tmp_path_factory.mktemp("monitoring")
    token = "metrics-token-for-tests"
    cluster = PgCluster()
    cluster.start()
    server = prometheus = None
    try:
        server = Gunicorn({"DATABASE_URL": cluster.url(), "LOG_DIR": str(work / "logs"),
                           "SPOOL_DIR": str(work / "spool"), "LOG_LEVEL": "WARNING",
                           "METRICS_CACHE_SECONDS": "0", "MLOPS_METRICS_TOKEN": token},
                          workers=2).start()
        prometheus = Prometheus(work, f"127.0.0.1:{server.port}", token)
        yield cluster, server, prometheus
    finally:
        if prometheus:
            prometheus.stop()
        if server:
            server.stop()
        cluster.destroy()


def reply_times_ms(n: int, seed: int = 11) -> list[int]:
    """Log-normal reply times (median 1.5 s, p95 near 5.6 s), as chat replies look."""
    rng = random.Random(seed)
    return [max(300, min(30000, round(1500 * math.exp(rng.gauss(0, 0.8))))) for _ in range(n)]


@pytest.fixture(scope="module")
def traffic(stack):
    """What was sent: 240 varied messages, the contract's success sample and 6
    failures, all twice, and one invalid body; waits until Prometheus has
    scraped all of it. The second round makes every series' rate() non-zero
    (a series' first sample is not counted as an increase)."""
    _, server, prometheus = stack
    events = varied(240, BUSINESSES, seed=3)
    for event, ms in zip(events, reply_times_ms(len(events)), strict=True):
        event["response_time_ms"] = ms
    events += [SUCCESS] + [FAILURE] * 6
    for event in events[:20]:
        assert requests.post(f"{server.url}/track", json=event, timeout=5).status_code == 201
    for start in range(20, len(events), 100):
        batch = events[start:start + 100]
        assert requests.post(f"{server.url}/track/batch", json=batch, timeout=10).ok
    assert requests.post(f"{server.url}/track", data=b"{", timeout=5,
                         headers={"Content-Type": "application/json"}).status_code == 422
    requests.post(f"{server.url}/refresh-metrics", json={"trigger": "new_metrics"}, timeout=5)

    def messages():
        return prometheus.value(f'sum(ai_requests_total{{job="{JOB}"}})')

    wait_until(lambda: messages() == len(events), "Prometheus to scrape the first round",
               timeout=TIMEOUT)
    assert requests.post(f"{server.url}/track/batch", json=events, timeout=10).ok
    events = events * 2
    wait_until(lambda: messages() == len(events), "Prometheus to scrape the second round",
               timeout=TIMEOUT)
    # rate() needs two samples after the last change; give it a few scrapes.
    scraped = prometheus.value(f'max(timestamp(up{{job="{JOB}"}}))')
    wait_until(lambda: prometheus.value(f'max(timestamp(up{{job="{JOB}"}}))') > scraped + 2,
               "three more scrapes", timeout=TIMEOUT)
    return events


# --- promtool: config, rules, unit tests ------------------------------------


def promtool(*args: str, cwd: Path = PROM_DIR) -> str:
    result = subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_promtool_checks_config_and_rules_and_runs_the_rule_unit_tests(stack):
    _, _, prometheus = stack
    # The file as shipped (its token file exists only in the container) ...
    promtool("check", "config", "--syntax-only", "prometheus.yml")
    # ... and as run here, in full: rule files and the token file included.
    promtool("check", "config", str(prometheus.config))
    rules = sorted(str(p.relative_to(PROM_DIR)) for p in (PROM_DIR / "rules").glob("*.yml"))
    promtool("check", "rules", *rules)
    out = promtool("test", "rules", *sorted(
        str(p.relative_to(PROM_DIR)) for p in (PROM_DIR / "tests").glob("*.yml")))
    assert "SUCCESS" in out


def test_every_alert_has_a_runbook_in_the_monitoring_page_and_a_unit_test():
    page = (REPO / "docs" / "monitoring.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", page, flags=re.M)}
    unit_tests = "".join(p.read_text() for p in (PROM_DIR / "tests").glob("*.yml"))
    alerts = [rule for path in (PROM_DIR / "rules").glob("*.yml")
              for group in yaml.safe_load(path.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule]
    assert len(alerts) >= 9
    for rule in alerts:
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        anchor = notes["runbook_url"].partition("docs/monitoring.md#")[2]
        assert anchor == rule["alert"].lower() and anchor in anchors, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert f"alertname: {rule['alert']}\n" in unit_tests, rule["alert"]


def test_grafana_provisioning_matches_the_compose_profile_and_the_dashboard_is_sound():
    compose = yaml.safe_load((SERVICE_DIR / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in grafana["volumes"] if v.startswith("../"))
    provisioning = MONITORING / "grafana" / "provisioning"
    assert mounts["../monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"

    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    assert (source["type"], source["uid"]) == ("prometheus", "prometheus")
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "mlops.yml").read_text())[
        "providers"]
    assert mounts["../monitoring/grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (MONITORING / "grafana" / "dashboards" / home.rsplit("/", 1)[1]).exists()

    assert DASHBOARDS
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids
        uids.add(board["uid"])
        names = {v["name"] for v in board["templating"]["list"]}
        assert {"datasource", "job", "business_id"} <= names
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
            if panel["type"] == "row":
                continue
            assert panel["title"] and panel["description"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), panel["title"]
            for target in panel["targets"]:
                used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
                assert used <= names | {"__rate_interval", "__interval", "__range"}, used


# --- the running stack --------------------------------------------------------


def test_every_rule_is_healthy_after_traffic(stack, traffic):
    _, _, prometheus = stack
    assert prometheus.value(f'up{{job="{JOB}"}}') == 1  # scraped with the token

    def evaluated():
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return rules if all(r["health"] != "unknown" for r in rules) else None

    rules = wait_until(evaluated, "every rule to be evaluated", timeout=TIMEOUT)
    loaded = {r["name"] for r in rules}
    shipped = {rule.get("record") or rule.get("alert")
               for path in (PROM_DIR / "rules").glob("*.yml")
               for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]}
    assert loaded == shipped
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    # The recording rules the dashboard and alerts read have values.
    for name in ("business_id:ai_requests:rate5m", "business_id:ai_requests_failed:ratio_rate15m",
                 "business_id_model_name:ai_tokens_used:rate5m",
                 "business_id:ai_cost_usd:rate1h", "job:ai_response_time_seconds:p95_5m",
                 "job:http_requests:error_ratio_rate5m", "mlops_daily_budget_usd"):
        assert prometheus.query(name), name
    assert prometheus.value(f'job:http_requests:error_ratio_rate5m{{job="{JOB}"}}') == 0
    failed = prometheus.query("business_id:ai_requests_failed:ratio_rate15m")
    assert {r["metric"]["business_id"]: float(r["value"][1]) for r in failed}["unknown"] == 1.0


def grafana_regex(values: list[str]) -> str:
    """A multi-value variable as Grafana's Prometheus datasource writes it in a regex:
    regex metacharacters escaped with a backslash that survives PromQL's string unquoting."""
    return "(" + "|".join(re.sub(r"([$^*{}\[\]'+?.()|\\])", r"\\\\\1", v)
                          for v in values) + ")"


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, expr
    return expr


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_query_runs_and_has_data(stack, traffic, dashboard):
    _, _, prometheus = stack
    board = json.loads(dashboard.read_text())
    variables = {"__rate_interval": "5m", "__interval": "15s", "__range": "1h"}
    options = {}
    for var in board["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        # label_values(selector, label): what Grafana asks the label API.
        selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)",
                                       var["query"]["query"]).groups()
        found = prometheus.api(f"label/{label}/values",
                               **{"match[]": substitute(selector, variables)})
        options[var["name"]] = found
        variables[var["name"]] = grafana_regex(found) if var.get("multi") else found[0]
    assert options["job"] == [JOB]
    assert set(options["business_id"]) == {*BUSINESSES, SUCCESS["business_id"], "unknown"}

    empty = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            result = prometheus.query(substitute(target["expr"], variables))
            if not [r for r in result if r["value"][1] != "NaN"]:
                empty.append(panel["title"])
    assert set(empty) <= MAY_BE_EMPTY
    print("alerts firing after the test traffic:",
          sorted({r["metric"]["alertname"] for r in prometheus.query("ALERTS")}))


def test_otel_genai_histograms_match_what_was_sent(stack, traffic):
    _, _, prometheus = stack
    stored = traffic
    for token_type, field in (("input", "prompt_tokens"), ("output", "completion_tokens")):
        sent = [e[field] for e in stored if e.get(field) is not None]
        sel = f'job="{JOB}", gen_ai_token_type="{token_type}", gen_ai_operation_name="chat"'
        assert prometheus.value(f"sum(gen_ai_client_token_usage_sum{{{sel}}})") == sum(sent)
        assert prometheus.value(f"sum(gen_ai_client_token_usage_count{{{sel}}})") == len(sent)
        for le in (64, 256, 1024):
            assert prometheus.value(
                f'sum(gen_ai_client_token_usage_bucket{{{sel}, le="{le}.0"}})'
            ) == sum(1 for t in sent if t <= le)

    duration = "gen_ai_client_operation_duration_seconds"
    assert prometheus.value(f"sum({duration}_count)") == len(stored)
    failures = [e for e in stored if e["success_rate"] == 0]
    assert prometheus.value(f'sum({duration}_count{{error_type="_OTHER"}})') == len(failures)
    assert prometheus.value(f'sum({duration}_sum)') == pytest.approx(
        sum(e["response_time_ms"] for e in stored) / 1000)
    by_provider = {r["metric"]["gen_ai_provider_name"]: float(r["value"][1]) for r in
                   prometheus.query(f"sum by (gen_ai_provider_name) ({duration}_count)")}
    assert by_provider == {
        "gcp.gemini": sum(1 for e in stored if e["model_name"].startswith("gemini")),
        "openai": sum(1 for e in stored if e["model_name"].startswith("gpt"))}


def nearest_rank(values: list[float], q: float) -> float:
    """The exact ``q`` quantile by nearest rank: the least value with q·n values at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def test_reply_time_p95_from_buckets_is_within_5_percent(stack, traffic):
    _, _, prometheus = stack
    exact = nearest_rank([e["response_time_ms"] / 1000 for e in traffic], 0.95)
    estimate = prometheus.value(
        "histogram_quantile(0.95, sum by (le) (ai_response_time_seconds_bucket))")
    print(f"p95 reply time: exact {exact:.3f}s, from buckets {estimate:.3f}s "
          f"({(estimate / exact - 1) * 100:+.2f}%)")
    assert abs(estimate / exact - 1) <= 0.05


def test_reply_time_buckets_are_at_most_4_9_percent_apart_from_0_3_to_30_seconds():
    bounds = telemetry.RESPONSE_TIME_BUCKETS
    assert set(telemetry.COURSE_RESPONSE_TIME_BUCKETS) <= set(bounds)
    # The bucket holding any q in [0.3, 30] is (a, b] with a >= 0.25 and b / a <= 1.049.
    holding = [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > 0.3 and a < 30]
    assert holding[0][0] >= 0.25 and holding[-1][1] >= 30
    assert max(b / a for a, b in holding) <= 1.049
    assert len(bounds) + 3 == 117  # the series: finite buckets, +Inf, _sum, _count


@pytest.mark.parametrize(("model", "provider"), [
    ("gemini-1.5-flash", "gcp.gemini"), ("models/gemini-2.0-pro", "gcp.gemini"),
    ("gpt-4o-mini", "openai"), ("o3-mini", "openai"), ("claude-3-5-sonnet", "anthropic"),
    ("mistral-large", "mistral_ai"), ("openai/gpt-4o", "openai"), ("llama-3.1-70b", "_OTHER")])
def test_provider_name_is_mapped_from_the_model_name(model, provider):
    assert telemetry.gen_ai_provider(model) == provider


def test_database_down_alert_fires_and_resolves(stack, traffic):
    cluster, server, prometheus = stack

    def alert_state():
        alerts = [a for a in prometheus.api("alerts")["alerts"]
                  if a["labels"]["alertname"] == "MlopsDatabaseDown"]
        return alerts[0]["state"] if alerts else "inactive"

    assert alert_state() == "inactive"
    started = time.monotonic()
    cluster.stop()
    try:
        wait_until(lambda: alert_state() == "firing", "MlopsDatabaseDown to fire", timeout=TIMEOUT)
        fired = time.monotonic() - started
        # Meanwhile the service keeps taking events, into the spool.
        body = requests.post(f"{server.url}/track", json=SUCCESS, timeout=5).json()
        assert body["storage"] == "queued"
    finally:
        cluster.start()
    wait_until(lambda: alert_state() == "inactive", "MlopsDatabaseDown to resolve", timeout=TIMEOUT)
    print(f"MlopsDatabaseDown: fired {fired:.1f}s after the stop, "
          f"resolved {time.monotonic() - started - fired:.1f}s later")
    wait_until(lambda: prometheus.value(f'max(mlops_spool_events{{job="{JOB}"}})') == 0,
               "the spool to drain", timeout=TIMEOUT)
