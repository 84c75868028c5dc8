"""How every test is set up.

* A real PostgreSQL: ``TEST_DATABASE_URL`` if set, else the local server at
  127.0.0.1:5432. Each run creates a database of its own and drops it after.
  If no server answers, the run stops at once with one line saying so.
* ``app``/``client``: a fresh app per test (Flask's test client), with its
  own log and spool folders; the events table is emptied after each test.
* ``gunicorn``: a factory for real gunicorn servers on free ports.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from servers import Gunicorn  # noqa: E402

from mlops import create_app, migrate  # noqa: E402
from mlops.config import Settings  # noqa: E402
from mlops.services import get_services  # noqa: E402

ADMIN_URL = os.environ.get("TEST_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"


def _with_dbname(url: str, dbname: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + dbname
    return base + (f"?{query}" if query else "")


def pytest_configure(config):
    try:
        psycopg2.connect(ADMIN_URL, connect_timeout=3).close()
    except psycopg2.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0]
        pytest.exit(
            f"no PostgreSQL at {ADMIN_URL.split('@')[-1]} ({reason}): start one locally "
            "(trust auth on 127.0.0.1:5432) or set TEST_DATABASE_URL=postgresql://...",
            returncode=3)


def _admin(sql: str) -> None:
    conn = psycopg2.connect(ADMIN_URL, connect_timeout=3)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


@pytest.fixture(scope="session")
def database_url():
    """URL of a database created for this test run and dropped after it."""
    name = f"mlops_test_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}"')
    url = _with_dbname(ADMIN_URL, name)
    conn = psycopg2.connect(url)
    conn.autocommit = True
    migrate.apply(conn)
    conn.close()
    yield url
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg(database_url):
    """An autocommit connection to the test database, for checking what was stored."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    yield conn
    conn.close()


def query(conn, sql: str, *params):
    """Rows of ``sql``."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


@pytest.fixture
def service_env(database_url, tmp_path):
    """Environment for a service under test: its database, log and spool folders."""
    return {
        "DATABASE_URL": database_url,
        "LOG_DIR": str(tmp_path / "logs"),
        "SPOOL_DIR": str(tmp_path / "spool"),
        "LOG_LEVEL": "WARNING",
        "MAINTENANCE_INTERVAL_SECONDS": "0",  # tests run maintenance rounds themselves
    }


@pytest.fixture
def make_app(service_env, database_url):
    """Factory: ``make_app(**env_overrides)`` builds an app; all are shut down after."""
    apps = []

    def make(**overrides):
        env = {**service_env, **{k: str(v) for k, v in overrides.items()}}
        app = create_app(Settings.from_env(env))
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        get_services(app).shutdown(drain_seconds=0)
    _truncate(database_url)


def _truncate(url: str) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('mlops_events') IS NOT NULL")
        if cur.fetchone()[0]:
            cur.execute("TRUNCATE mlops_events, mlops_rollup_daily, mlops_rollup_latency, "
                        "mlops_rollup_conversations")
    conn.close()


@pytest.fixture
def app(make_app):
    """A fresh app on the test database."""
    return make_app()


@pytest.fixture
def client(app):
    """Flask's test client for ``app``."""
    return app.test_client()


@pytest.fixture
def gunicorn(service_env, database_url):
    """Factory: ``gunicorn(workers=3, **env)`` starts a real server; all stopped after."""
    servers = []

    def start(workers: int = 3, wait_for: str = "/health", **env):
        server = Gunicorn({**service_env, **{k: str(v) for k, v in env.items()}}, workers)
        servers.append(server)
        return server.start(wait_for=wait_for)

    yield start
    for server in servers:
        server.stop()
    _truncate(database_url)


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    """Parse Prometheus text into ``{(sample_name, sorted_label_items): value}``."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def metric_sum(values: dict, name: str, **labels) -> float:
    """Sum of every sample named ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in values.items()
               if n == name and all((k, val) in ls for k, val in labels.items()))
