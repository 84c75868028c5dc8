"""The database's size against its budget: samples, growth, gauges, health, dashboard.

Against the real test database: the maintenance round takes real
``pg_database_size`` samples into ``mlops_database_size_samples``; where a
test needs seven days of history, it writes earlier rows into that table
(what the job would have written over the week), anchored on the size
Postgres reports now, and the newest sample is the job's own.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

import pytest
import requests
from conftest import metric_values, query
from payloads import SUCCESS
from selenium.webdriver.common.by import By
from support import holds_for, wait_until
from test_dashboard import assert_clean_console, browser, open_page, page, screenshot  # noqa: F401

from mlops.config import ConfigError, Settings
from mlops.services import get_services
from mlops.storage_budget import KEEP_SECONDS, Reading, sample

MIB = 1 << 20


@pytest.fixture
def samples(pg):
    """The samples table, empty before and after the test."""
    query(pg, "DELETE FROM mlops_database_size_samples RETURNING 1")
    yield pg
    query(pg, "DELETE FROM mlops_database_size_samples RETURNING 1")


def database_size(pg) -> int:
    return query(pg, "SELECT pg_database_size(current_database())")[0][0]


def write_history(pg, *, growth_per_day: int, days: float = 7, step_hours: float = 6) -> None:
    """Samples every ``step_hours`` over the last ``days`` days, up to a minute ago,
    growing ``growth_per_day`` bytes a day towards the size Postgres reports now."""
    now_size = database_size(pg)
    query(pg, """
        INSERT INTO mlops_database_size_samples (sampled_at, size_bytes)
        SELECT now() - make_interval(secs => age), %s::bigint - round(%s::numeric * age / 86400.0)
        FROM generate_series(120, %s, %s) AS age
        RETURNING 1""", now_size, growth_per_day, int(days * 86400), int(step_hours * 3600))


# ---- The setting.

@pytest.mark.parametrize(("raw", "expected"), [
    ("0.5GB", 500_000_000), ("512MiB", 512 * MIB), ("1048576", MIB), ("2 gib", 2 << 30)])
def test_the_limit_is_read_with_units(raw, expected):
    settings = Settings.from_env({"DATABASE_URL": "postgresql://u@h/d",
                                  "DATABASE_SIZE_LIMIT": raw})
    assert settings.database_size_limit_bytes == expected


def test_no_limit_by_default_and_a_bad_one_is_named():
    assert Settings.from_env({"DATABASE_URL": "postgresql://u@h/d"}).database_size_limit_bytes \
        is None
    for bad in ("half a gig", "10kB", "-1GB"):
        with pytest.raises(ConfigError, match="DATABASE_SIZE_LIMIT"):
            Settings.from_env({"DATABASE_URL": "postgresql://u@h/d",
                               "DATABASE_SIZE_LIMIT": bad})


# ---- Sampling.

def test_the_maintenance_round_samples_the_size_at_most_once_a_minute(make_app, samples):
    app = make_app()
    maintenance = get_services(app).maintenance
    before = database_size(samples)
    maintenance.run_once()
    maintenance.run_once()
    rows = query(samples, "SELECT size_bytes FROM mlops_database_size_samples")
    assert len(rows) == 1
    assert rows[0][0] == pytest.approx(before, rel=0.01)
    # A sample a minute old lets the next round take one.
    query(samples, "UPDATE mlops_database_size_samples "
                   "SET sampled_at = sampled_at - interval '61 seconds' RETURNING 1")
    maintenance.run_once()
    assert query(samples, "SELECT count(*) FROM mlops_database_size_samples")[0][0] == 2


def test_samples_older_than_eight_days_are_pruned(make_app, samples):
    db = get_services(make_app()).db
    query(samples, "INSERT INTO mlops_database_size_samples VALUES "
                   "(now() - make_interval(secs => %s), 1), "
                   "(now() - make_interval(secs => %s), 2) RETURNING 1",
          KEEP_SECONDS + 60, KEEP_SECONDS - 3600)
    assert sample(db) is not None
    assert sorted(r[0] for r in query(samples, "SELECT size_bytes FROM "
                                      "mlops_database_size_samples"))[:1] == [2]
    assert query(samples, "SELECT count(*) FROM mlops_database_size_samples")[0][0] == 2


# ---- What follows from the samples.

def test_reading_figures():
    reading = Reading(0.0, 400 * MIB, 500 * MIB, 10 * MIB / 86400)
    assert reading.used_ratio == pytest.approx(0.8)
    assert reading.seconds_left == pytest.approx(10 * 86400)
    assert reading.as_json()["days_left"] == 10.0
    assert Reading(0.0, 500 * MIB, 500 * MIB, 1.0).seconds_left == 0
    assert Reading(0.0, 1, 500 * MIB, -1.0).seconds_left == math.inf
    assert Reading(0.0, 1, 500 * MIB, -1.0).as_json()["days_left"] is None
    assert Reading(0.0, 1, None, 1.0).seconds_left is None
    assert Reading(0.0, 1, 500 * MIB, None).seconds_left is None


def test_gauges_and_health_report_size_budget_and_time_left(make_app, samples):
    growth = MIB // 2  # a day (the test database is a few MiB: seven days of it fit)
    write_history(samples, growth_per_day=growth)
    size = database_size(samples)
    limit = size + 5 * MIB  # ten days at that growth
    app = make_app(DATABASE_SIZE_LIMIT=str(limit))
    get_services(app).maintenance.run_once()  # the newest sample: the job's own
    client = app.test_client()

    text = client.get("/metrics").get_data(as_text=True)
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not promtool or not os.path.exists(promtool):
        pytest.fail("promtool not found: run `make tools` (or set PROMTOOL=/path/to/promtool)")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")
    values = metric_values(text)
    assert values[("mlops_database_size_limit_bytes", ())] == limit
    measured = values[("mlops_database_size_bytes", ())]
    assert measured == pytest.approx(size, rel=0.01)
    assert values[("mlops_database_size_growth_bytes_per_second", ())] == pytest.approx(
        growth / 86400, rel=0.05)
    assert values[("mlops_database_size_time_left_seconds", ())] == pytest.approx(
        (limit - measured) / (growth / 86400), rel=0.05)

    storage = client.get("/health/detailed").get_json()["storage"]
    assert storage["limit_bytes"] == limit
    assert storage["size_bytes"] == measured
    assert storage["used_ratio"] == pytest.approx(measured / limit, abs=1e-4)
    assert storage["growth_bytes_per_day"] == pytest.approx(growth, rel=0.05)
    assert storage["days_left"] == pytest.approx(10, abs=0.6)


def test_without_a_budget_only_the_size_is_reported(make_app, samples):
    app = make_app()
    client = app.test_client()
    assert client.get("/health/detailed").get_json()["storage"] == {
        "size_bytes": None, "limit_bytes": None}
    assert "mlops_database_size" not in client.get("/metrics").get_data(as_text=True)

    app = make_app()
    get_services(app).maintenance.run_once()
    text = app.test_client().get("/metrics").get_data(as_text=True)
    names = set(re.findall(r"^(mlops_database_size\w*) ", text, flags=re.M))
    assert names == {"mlops_database_size_bytes", "mlops_database_size_sampled_timestamp_seconds"}
    storage = app.test_client().get("/health/detailed").get_json()["storage"]
    assert storage["limit_bytes"] is None and storage["days_left"] is None
    assert storage["size_bytes"] > 0


def test_a_shrinking_database_has_no_end_in_sight(make_app, samples):
    write_history(samples, growth_per_day=-MIB)
    app = make_app(DATABASE_SIZE_LIMIT="100GiB")
    get_services(app).maintenance.run_once()
    values = metric_values(app.test_client().get("/metrics").get_data(as_text=True))
    assert values[("mlops_database_size_time_left_seconds", ())] == math.inf
    assert app.test_client().get("/health/detailed").get_json()["storage"]["days_left"] is None


def test_gunicorn_serves_the_gauges_from_every_worker(gunicorn, samples):
    write_history(samples, growth_per_day=MIB)
    server = gunicorn(workers=2, DATABASE_SIZE_LIMIT="1GiB", MAINTENANCE_INTERVAL_SECONDS="1")
    assert requests.post(f"{server.url}/track", json=SUCCESS, timeout=5).status_code == 201

    def sampled() -> bool:
        return query(samples, "SELECT count(*) FROM mlops_database_size_samples "
                              "WHERE sampled_at > now() - interval '100 seconds'")[0][0] == 1

    wait_until(sampled, "the maintenance job to take a sample", timeout=15, interval=0.2)
    # Both workers' later rounds (one a second) in the same minute add nothing.
    holds_for(sampled, "one sample in the minute", seconds=1.5, interval=0.2)
    # Whichever worker answers, it reports the same figures, read from the shared samples.
    pids = set()

    def both_workers_answered() -> bool:
        detailed = requests.get(f"{server.url}/health/detailed", timeout=5).json()
        if detailed["storage"].get("days_left"):
            pids.add(detailed["pid"])
            assert detailed["storage"]["limit_bytes"] == 1 << 30
        return len(pids) == 2

    wait_until(both_workers_answered, "both workers to answer with the storage figures",
               timeout=30, interval=0.1)


# ---- The dashboard's service line, in Chromium.

@pytest.mark.browser
def test_the_dashboard_service_line_shows_size_budget_and_days_left(
        gunicorn, samples, page):  # noqa: F811 - the fixture imported from test_dashboard
    write_history(samples, growth_per_day=MIB // 2)
    limit = int(database_size(samples) / 0.85)  # 85% used: the warning colour
    server = gunicorn(workers=2, DATABASE_SIZE_LIMIT=str(limit), MAINTENANCE_INTERVAL_SECONDS="1")
    wait_until(lambda: query(samples, "SELECT count(*) FROM mlops_database_size_samples "
                                      "WHERE sampled_at > now() - interval '100 seconds'")[0][0],
               "the maintenance job to take a sample", timeout=15, interval=0.2)
    storage = requests.get(f"{server.url}/health/detailed", timeout=5).json()["storage"]

    open_page(page, server.url + "/")
    pill = page.find_element(By.ID, "storage-state")
    assert pill.is_displayed()
    shown = re.fullmatch(r"Storage: ([\d.]+) MB of ([\d.]+) MB \((\d+)%\) · (\d+) days left",
                         pill.text)
    assert shown, pill.text
    assert float(shown[1]) == pytest.approx(storage["size_bytes"] / 1e6, abs=0.06)
    assert float(shown[2]) == pytest.approx(limit / 1e6, abs=0.06)
    assert int(shown[3]) == round(storage["used_ratio"] * 100)
    assert int(shown[4]) == round(storage["days_left"])
    assert pill.get_attribute("data-state") == "waiting"
    assert f"of DATABASE_SIZE_LIMIT {limit}" in pill.get_attribute("title")
    screenshot(page, "storage-budget", 1366, 900)
    assert_clean_console(page)
