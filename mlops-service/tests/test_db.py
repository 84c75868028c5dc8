"""The database layer's guarantees, each against a real Postgres that misbehaves for real.

A private cluster sits behind a TCP proxy that can stop forwarding (a
silent server); ``pg_terminate_backend`` breaks a pooled connection the way
Neon does when its compute suspends.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg2
import pytest
from pgcluster import PgCluster
from tcpproxy import StallingProxy

from mlops import migrate
from mlops.config import Settings
from mlops.db import (
    Database,
    DatabaseMisconfigured,
    DatabaseUnavailable,
    MigrationError,
    check_at_start,
)


@pytest.fixture(scope="module")
def cluster():
    """A private cluster shared by this module's tests; each leaves it running."""
    c = PgCluster()
    c.start()
    yield c
    c.destroy()


@pytest.fixture
def proxy(cluster):
    p = StallingProxy(cluster.port)
    yield p
    p.close()


@pytest.fixture
def make_db(tmp_path):
    made = []

    def make(url: str, **env) -> Database:
        settings = Settings.from_env({"DATABASE_URL": url, "SPOOL_DIR": str(tmp_path),
                                      "DB_CONNECT_TIMEOUT_SECONDS": "2",
                                      **{k: str(v) for k, v in env.items()}})
        db = Database(settings, breaker_seconds=0.5)
        made.append(db)
        return db

    yield make
    for db in made:
        db.close()


def select_one(cur) -> int:
    cur.execute("SELECT 1")
    return cur.fetchone()[0]


def timed(call) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - returned for the test to judge
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def test_a_silent_server_cannot_hold_a_call_past_its_deadline(proxy, make_db):
    db = make_db(proxy.url())
    assert db.run(select_one) == 1  # a warm connection in the pool
    proxy.stall()
    threading.Timer(3.0, proxy.resume).start()  # without the deadline the call waits for this
    with db.deadline(200):
        elapsed, error = timed(lambda: db.run(select_one))
    assert isinstance(error, DatabaseUnavailable), error
    assert 0.15 < elapsed < 0.6, elapsed
    assert db.pool_in_use() == 0


def test_a_connection_not_ready_by_the_deadline_joins_the_pool_later(proxy, make_db):
    db = make_db(proxy.url())
    proxy.stall()
    with db.deadline(200):
        elapsed, error = timed(lambda: db.run(select_one))
    assert isinstance(error, DatabaseUnavailable) and elapsed < 0.6, (elapsed, error)
    proxy.resume()
    deadline = time.monotonic() + 5
    while not db._idle and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(db._idle) == 1
    with db.deadline(200):
        assert db.run(select_one) == 1


def test_after_a_failure_calls_that_may_skip_do_not_wait(proxy, make_db):
    db = make_db(proxy.url())
    db.run(select_one)
    proxy.stall()
    with db.deadline(200, skip_if_down=True):
        assert isinstance(timed(lambda: db.run(select_one))[1], DatabaseUnavailable)
    with db.deadline(200, skip_if_down=True):
        elapsed, error = timed(lambda: db.run(select_one))
    assert isinstance(error, DatabaseUnavailable) and elapsed < 0.05, (elapsed, error)
    proxy.resume()
    # A call that may not skip (readiness, the flusher) still tries, and closes the breaker.
    assert db.run(select_one) == 1
    with db.deadline(200, skip_if_down=True):
        assert db.run(select_one) == 1


def test_a_background_probe_closes_the_breaker_once_the_database_answers(proxy, make_db):
    db = make_db(proxy.url())
    db.run(select_one)
    proxy.stall()
    with db.deadline(100, skip_if_down=True):
        assert isinstance(timed(lambda: db.run(select_one))[1], DatabaseUnavailable)
    proxy.resume()

    def skipping_call_succeeds() -> bool:
        with db.deadline(500, skip_if_down=True):
            return timed(lambda: db.run(select_one))[1] is None

    deadline = time.monotonic() + 10
    while not skipping_call_succeeds():
        assert time.monotonic() < deadline, "the breaker never closed"
        time.sleep(0.05)


def test_a_broken_pooled_connection_is_retried_once_on_a_fresh_one(cluster, make_db):
    db = make_db(cluster.url(), DB_POOL_SIZE=1)
    assert db.run(select_one) == 1
    cluster.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE application_name = 'mlops-service'")
    assert db.run(select_one) == 1
    assert db.pool_in_use() == 0


def test_a_connection_that_breaks_twice_is_reported_unavailable(cluster, make_db):
    db = make_db(cluster.url())

    def always_break(cur):
        cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    elapsed, error = timed(lambda: db.run(always_break))
    assert isinstance(error, DatabaseUnavailable), error
    assert db.pool_in_use() == 0


def test_a_refused_connection_is_unavailable_and_a_wrong_database_misconfigured(
        cluster, make_db):
    refused = make_db("postgresql://postgres@127.0.0.1:1/postgres")
    assert isinstance(timed(refused.ping)[1], DatabaseUnavailable)
    wrong = make_db(cluster.url("no_such_database"))
    assert isinstance(timed(wrong.ping)[1], DatabaseMisconfigured)


def test_a_bug_in_the_sql_propagates_unchanged_and_keeps_the_connection(cluster, make_db):
    db = make_db(cluster.url())

    def broken(cur):
        cur.execute("SELEC 1")

    with pytest.raises(psycopg2.errors.SyntaxError):
        db.run(broken)
    assert db.pool_in_use() == 0 and db.run(select_one) == 1


def _fresh_database(cluster: PgCluster) -> str:
    name = f"db_{time.monotonic_ns()}"
    cluster.psql(f"CREATE DATABASE {name}")
    return name


def test_migrations_run_at_start_once_and_a_broken_file_is_named(cluster, tmp_path):
    name = _fresh_database(cluster)
    settings = Settings.from_env({"DATABASE_URL": cluster.url(name)})
    assert check_at_start(settings) == "ready"
    assert migrate.is_current(settings.database_url, settings.migrations_dir)
    assert cluster.psql("SELECT count(*) FROM mlops_schema_migrations", name) == str(
        len(migrate.pending_files()))

    broken = tmp_path / "migrations"
    broken.mkdir()
    for _, path in migrate.pending_files():
        (broken / path.name).write_text(path.read_text())
    (broken / "9999_broken.sql").write_text("CREATE TABLE oops (;\n")
    bad = Settings.from_env({"DATABASE_URL": cluster.url(name), "MIGRATIONS_DIR": str(broken)})
    with pytest.raises(MigrationError, match=r"^migration 9999_broken\.sql failed: syntax error"):
        check_at_start(bad)
    assert cluster.psql("SELECT to_regclass('oops') IS NULL", name) == "t"


def test_a_database_away_at_start_is_migrated_before_its_first_use(cluster, proxy, make_db):
    name = _fresh_database(cluster)
    proxy.stall()
    settings = Settings.from_env({"DATABASE_URL": proxy.url(name),
                                  "DB_CONNECT_TIMEOUT_SECONDS": "1"})
    assert check_at_start(settings).startswith("unavailable")
    proxy.resume()
    db = make_db(proxy.url(name))
    assert db.run(lambda cur: cur.execute("SELECT count(*) FROM mlops_events")) is None
    assert cluster.psql("SELECT count(*) > 0 FROM mlops_schema_migrations", name) == "t"


def test_a_migration_failing_later_keeps_the_service_spooling(cluster, make_db, tmp_path):
    name = _fresh_database(cluster)
    broken = tmp_path / "migrations"
    broken.mkdir()
    (broken / "0001_broken.sql").write_text("SELEC 1;\n")
    db = make_db(cluster.url(name), MIGRATIONS_DIR=broken)
    elapsed, error = timed(db.ping)
    assert isinstance(error, DatabaseUnavailable)
    assert "0001_broken.sql" in str(error)


def test_a_misnamed_migration_file_is_named(tmp_path):
    (tmp_path / "first.sql").write_text("SELECT 1;\n")
    with pytest.raises(migrate.MigrationFailed, match="first.sql"):
        migrate.pending_files(Path(tmp_path))
