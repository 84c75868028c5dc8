"""The database layer's guarantees, each against a real Postgres that misbehaves for real.

The test database sits behind a TCP proxy that can stop forwarding (a
silent server); ``pg_terminate_backend`` breaks a pooled connection the way
Neon does when its compute suspends. Fast enough to run for every mutant
of ``make mutation``.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycogreen.gevent
import psycopg2
import psycopg2.extensions
import pytest
from conftest import ADMIN_URL, admin, with_dbname
from psycopg2 import sql
from psycopg2.extensions import parse_dsn
from support import holds_for, wait_until

from mlops import migrate
from mlops.config import Settings
from mlops.db import (
    Database,
    DatabaseMisconfigured,
    DatabaseUnavailable,
    TransactionRolledBack,
    classify,
    copy_from,
)
from mlops.migrate import MigrationError, check_at_start
from mlops.postgres import DatabaseFull
from mlops.watchdog import Watchdog


@pytest.fixture
def dbname(database_url) -> str:
    return parse_dsn(database_url)["dbname"]


@pytest.fixture
def fresh_database():
    """Factory: the name of a new, empty database (dropped after the test)."""
    names = []

    def make() -> str:
        names.append(f"mlops_test_{uuid.uuid4().hex[:12]}")
        admin(f'CREATE DATABASE "{names[-1]}"')
        return names[-1]

    yield make
    for name in names:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def psql(name: str, sql: str):
    conn = psycopg2.connect(with_dbname(ADMIN_URL, name))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone() if cur.description else None
    conn.close()
    return row[0] if row else None


@pytest.fixture
def make_db(tmp_path):
    made = []

    def make(url: str, breaker_seconds: float = 0.5, **env) -> Database:
        settings = Settings.from_env({"DATABASE_URL": url, "SPOOL_DIR": str(tmp_path),
                                      "DB_CONNECT_TIMEOUT_SECONDS": "2",
                                      **{k: str(v) for k, v in env.items()}})
        db = Database(settings, breaker_seconds=breaker_seconds)
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


def assert_no_stale_deadline(db) -> None:
    """A 0.3 s call on the same connection, past an earlier call's deadline, runs once:
    the earlier call's watch did not outlive it (no socket shut down, no retry)."""
    runs = []

    def slow(cur):
        runs.append(1)
        cur.execute("SELECT pg_sleep(0.3)")

    db.run(slow, timeout_ms=2000)
    assert len(runs) == 1


def test_a_silent_server_cannot_hold_a_call_past_its_deadline(proxy, make_db, dbname):
    db = make_db(proxy.url(dbname))
    assert db.run(select_one, timeout_ms=100) == 1  # a warm connection in the pool
    time.sleep(0.2)  # past that call's deadline: the watchdog wakes with nothing to watch
    proxy.stall()
    threading.Timer(3.0, proxy.resume).start()  # without the deadline the call waits for this
    elapsed, error = timed(lambda: db.run(select_one, timeout_ms=200))
    assert isinstance(error, DatabaseUnavailable), error
    assert str(error) == "no answer within the deadline (server closed the connection unexpectedly)"
    assert 0.15 < elapsed < 0.6, elapsed
    assert db.pool_in_use() == 0
    assert db.watched_calls == 0  # nothing left behind


def test_concurrent_calls_each_keep_their_own_deadline(proxy, make_db, dbname):
    db = make_db(proxy.url(dbname), breaker_seconds=60)
    barrier = threading.Barrier(3)

    def hold_one(cur):
        barrier.wait(5)  # three connections checked out at once
        return select_one(cur)

    threads = [threading.Thread(target=db.run, args=(hold_one,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert db.idle_connections == 3 and db.watched_calls == 0  # finished calls are not watched
    proxy.stall()
    threading.Timer(3.0, proxy.resume).start()
    results: list[tuple[float, BaseException | None]] = []

    def call():
        results.append(timed(lambda: db.run(select_one, timeout_ms=200)))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 3
    assert all(isinstance(e, DatabaseUnavailable) and t < 0.6 for t, e in results), results


def test_a_ping_is_a_real_round_trip(proxy, make_db, dbname):
    db = make_db(proxy.url(dbname), breaker_seconds=60)
    assert db.run(select_one) == 1  # a warm connection in the pool
    proxy.stall()
    assert isinstance(timed(lambda: db.ping(200))[1], DatabaseUnavailable)


def test_a_connection_not_ready_by_the_deadline_joins_the_pool_later(proxy, make_db, dbname):
    db = make_db(proxy.url(dbname), breaker_seconds=60)  # no probe meanwhile
    proxy.stall()
    elapsed, error = timed(lambda: db.run(select_one, timeout_ms=200))
    assert isinstance(error, DatabaseUnavailable) and elapsed < 0.6, (elapsed, error)
    assert str(error) == "no connection within the deadline"
    proxy.resume()
    wait_until(lambda: db.idle_connections, "the late connection to join the pool",
               interval=0.02)
    assert db.idle_connections == 1
    assert db.run(select_one, timeout_ms=200) == 1


def test_a_connection_failing_after_its_deadline_gives_its_slot_back(proxy, make_db, dbname):
    db = make_db(proxy.url(dbname), breaker_seconds=60, DB_POOL_SIZE=1)
    proxy.stall()
    assert isinstance(timed(lambda: db.run(select_one, timeout_ms=200))[1], DatabaseUnavailable)
    assert db.pool_in_use() == 1  # the connect goes on in the background
    proxy.refuse()
    wait_until(lambda: db.pool_in_use() == 0, "the failed connect to give its slot back",
               interval=0.02)
    assert db.idle_connections == 0


def test_after_a_failure_calls_that_may_skip_do_not_wait(proxy, make_db, dbname):
    db = make_db(proxy.url(dbname))
    db.run(select_one)
    proxy.stall()
    assert isinstance(timed(lambda: db.run(select_one, timeout_ms=200, skip_if_down=True))[1],
                      DatabaseUnavailable)
    elapsed, error = timed(lambda: db.run(select_one, timeout_ms=200, skip_if_down=True))
    assert isinstance(error, DatabaseUnavailable) and elapsed < 0.05, (elapsed, error)
    assert str(error) == "skipped: the database failed its last call"
    proxy.resume()
    # A call that may not skip (readiness, the flusher) still tries, and closes the breaker.
    assert db.run(select_one) == 1
    assert db.run(select_one, timeout_ms=200, skip_if_down=True) == 1


def test_a_background_probe_closes_the_breaker_once_the_database_answers(proxy, make_db,
                                                                          dbname):
    db = make_db(proxy.url(dbname), breaker_seconds=0.2)

    def skipping_call_succeeds() -> bool:
        return timed(lambda: db.run(select_one, timeout_ms=500, skip_if_down=True))[1] is None

    for _ in range(2):  # a second outage needs a new probe
        db.run(select_one)
        proxy.refuse()
        assert isinstance(timed(lambda: db.run(select_one, timeout_ms=100, skip_if_down=True))[1],
                          DatabaseUnavailable)
        # Several probes fail meanwhile; the breaker stays open and the probing goes on.
        holds_for(lambda: not skipping_call_succeeds(), "the breaker open while refused", 0.7)
        proxy.resume()
        wait_until(skipping_call_succeeds, "the breaker to close")
        wait_until(lambda: not db.breaker.probing, "the probe to end once the breaker closed",
                   interval=0.02)


def test_a_broken_pooled_connection_is_retried_once_on_a_fresh_one(database_url, dbname,
                                                                    make_db):
    db = make_db(database_url, DB_POOL_SIZE=1)
    assert db.run(select_one) == 1
    assert psql(dbname, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'mlops-service' "
                        "AND datname = current_database()") >= 1
    assert db.run(select_one) == 1
    assert db.pool_in_use() == 0


def test_a_connection_that_breaks_twice_is_reported_unavailable(database_url, make_db):
    db = make_db(database_url)

    def always_break(cur):
        cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    elapsed, error = timed(lambda: db.run(always_break))
    assert isinstance(error, DatabaseUnavailable), error
    assert str(error) == "server closed the connection unexpectedly"
    assert db.pool_in_use() == 0


def test_a_refused_connection_is_unavailable_and_a_wrong_database_misconfigured(make_db):
    refused = make_db("postgresql://postgres@127.0.0.1:1/postgres")
    error = timed(refused.ping)[1]
    assert isinstance(error, DatabaseUnavailable)
    assert str(error).startswith('connection to server at "127.0.0.1", port 1 failed')
    wrong = make_db(with_dbname(ADMIN_URL, "no_such_database"))
    error = timed(wrong.ping)[1]
    assert isinstance(error, DatabaseMisconfigured)
    assert str(error).endswith('database "no_such_database" does not exist')


def test_the_start_up_check_tells_away_from_misconfigured():
    away = Settings.from_env({"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres"})
    assert check_at_start(away).startswith(
        'unavailable: connection to server at "127.0.0.1", port 1 failed')
    wrong = Settings.from_env({"DATABASE_URL": with_dbname(ADMIN_URL, "no_such_database")})
    with pytest.raises(DatabaseMisconfigured, match='"no_such_database" does not exist'):
        check_at_start(wrong)


def test_a_bug_in_the_sql_propagates_unchanged_and_keeps_the_connection(database_url,
                                                                         make_db):
    db = make_db(database_url)

    def broken(cur):
        cur.execute("SELEC 1")

    with pytest.raises(psycopg2.errors.SyntaxError):
        db.run(broken)
    assert db.pool_in_use() == 0 and db.run(select_one) == 1


def test_migrations_run_at_start_once_and_a_broken_file_is_named(fresh_database, tmp_path):
    name = fresh_database()
    url = with_dbname(ADMIN_URL, name)
    good = tmp_path / "good"
    good.mkdir()
    for _, path in migrate.pending_files():
        (good / path.name).write_text(path.read_text())
    settings = Settings.from_env({"DATABASE_URL": url, "MIGRATIONS_DIR": str(good)})
    assert not migrate.is_current(url, good)
    assert check_at_start(settings) == "ready"
    assert migrate.is_current(url, good)
    assert psql(name, "SELECT count(*) FROM mlops_schema_migrations") == len(
        migrate.pending_files())
    assert check_at_start(settings) == "ready"  # again: nothing left to apply
    assert psql(name, "SELECT count(*) FROM mlops_schema_migrations") == len(
        migrate.pending_files())

    broken = tmp_path / "migrations"
    broken.mkdir()
    for _, path in migrate.pending_files():
        (broken / path.name).write_text(path.read_text())
    (broken / "9999_broken.sql").write_text("CREATE TABLE oops (;\n")
    bad = Settings.from_env({"DATABASE_URL": url, "MIGRATIONS_DIR": str(broken)})
    with pytest.raises(MigrationError, match=r"^migration 9999_broken\.sql failed: syntax error"):
        check_at_start(bad)
    assert psql(name, "SELECT to_regclass('oops') IS NULL") is True


def test_a_database_away_at_start_is_migrated_before_its_first_use(fresh_database, proxy,
                                                                    make_db):
    name = fresh_database()
    proxy.stall()
    settings = Settings.from_env({"DATABASE_URL": proxy.url(name),
                                  "DB_CONNECT_TIMEOUT_SECONDS": "1"})
    assert check_at_start(settings).startswith("unavailable")
    proxy.resume()
    db = make_db(proxy.url(name))
    assert db.run(lambda cur: cur.execute("SELECT count(*) FROM mlops_events")) is None
    assert psql(name, "SELECT count(*) > 0 FROM mlops_schema_migrations") is True
    assert migrate.is_current(proxy.url(name))  # a worker started now skips the check


def test_a_migration_failing_later_keeps_the_service_spooling(fresh_database, make_db,
                                                               tmp_path):
    name = fresh_database()
    broken = tmp_path / "migrations"
    broken.mkdir()
    (broken / "0001_broken.sql").write_text("SELEC 1;\n")
    db = make_db(with_dbname(ADMIN_URL, name), MIGRATIONS_DIR=broken)
    elapsed, error = timed(db.ping)
    assert isinstance(error, DatabaseUnavailable)
    assert "0001_broken.sql" in str(error)


def test_a_misnamed_migration_file_is_named(tmp_path):
    (tmp_path / "first.sql").write_text("SELECT 1;\n")
    with pytest.raises(migrate.MigrationFailed, match="first.sql"):
        migrate.pending_files(Path(tmp_path))


def test_apply_reports_what_it_applied_and_rolls_back_a_failing_file(fresh_database, tmp_path):
    name = fresh_database()
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_first_table.sql").write_text("CREATE TABLE first_table (x int);\n")
    (folder / "0002_second_table.sql").write_text("CREATE TABLE second_table (x int);\n")
    conn = psycopg2.connect(with_dbname(ADMIN_URL, name))
    conn.autocommit = True
    try:
        assert migrate.apply(conn, folder) == [1, 2]
        assert migrate.apply(conn, folder) == []
        (folder / "0003_broken.sql").write_text("CREATE TABLE first_table (x int);\n")
        with pytest.raises(migrate.MigrationFailed, match="^migration 0003_broken.sql failed"):
            migrate.apply(conn, folder)
        # Rolled back: the connection is usable and nothing of 0003 is recorded.
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        with conn.cursor() as cur:
            cur.execute("SELECT max(version) FROM mlops_schema_migrations")
            assert cur.fetchone() == (2,)
    finally:
        conn.close()


def test_close_gives_back_every_connection(database_url, dbname, make_db):
    db = make_db(database_url)
    db.run(select_one)

    def ours() -> int:
        return psql(dbname, "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                            "'mlops-service' AND datname = current_database()")

    assert ours() >= 1
    db.close()
    assert db.pool_in_use() == 0 and db.pool_size == 0
    assert ours() == 0


@pytest.mark.parametrize("dsn_suffix, says", [
    ("?sslmode=require", "server does not support SSL"),
    ("?sslmode=bogus", 'invalid sslmode value: "bogus"'),
    ("?channel_binding=require", "channel binding required"),
    ("?require_auth=password", 'authentication method requirement "password" failed'),
])
def test_settings_no_retry_can_fix_stop_the_start_up(dsn_suffix, says):
    settings = Settings.from_env({"DATABASE_URL": ADMIN_URL + dsn_suffix})
    with pytest.raises(DatabaseMisconfigured, match=says):
        check_at_start(settings)


def test_an_unknown_host_is_misconfigured_and_a_silent_resolver_unavailable():
    """The resolver's answer decides: "no such name" will not change by retrying;
    "try again" (no DNS server reachable, as in .ci/offline-check) may."""
    host = "no-such-host.invalid"
    settings = Settings.from_env({"DATABASE_URL": f"postgresql://postgres@{host}/x"})
    resolver = None
    try:
        socket.getaddrinfo(host, 5432)
    except socket.gaierror as exc:
        resolver = exc.errno
    if resolver == socket.EAI_AGAIN:
        assert check_at_start(settings).startswith("unavailable: ")
    else:
        with pytest.raises(DatabaseMisconfigured, match="Name or service not known"):
            check_at_start(settings)


def test_a_connection_lost_while_migrating_at_start_is_reported_unavailable(fresh_database,
                                                                              tmp_path):
    name = fresh_database()
    (tmp_path / "0001_drop_the_connection.sql").write_text(
        "SELECT pg_terminate_backend(pg_backend_pid());\n")
    settings = Settings.from_env({"DATABASE_URL": with_dbname(ADMIN_URL, name),
                                  "MIGRATIONS_DIR": str(tmp_path)})
    assert check_at_start(settings) == "unavailable: server closed the connection unexpectedly"
    assert not migrate.is_current(settings.database_url, tmp_path)


def test_the_watchdog_outlives_a_deadline_on_a_connection_already_closed(proxy, make_db,
                                                                        dbname):
    db = make_db(proxy.url(dbname), breaker_seconds=60)

    def close_and_linger(cur):
        cur.connection.close()
        time.sleep(0.3)  # the deadline passes on a closed connection

    db.run(close_and_linger, timeout_ms=100)
    assert db.run(select_one) == 1 and db.pool_in_use() == 0
    proxy.stall()
    threading.Timer(3.0, proxy.resume).start()
    elapsed, error = timed(lambda: db.run(select_one, timeout_ms=200))
    assert isinstance(error, DatabaseUnavailable) and elapsed < 0.6, (elapsed, error)


def test_an_error_without_a_message_is_named_by_its_kind():
    assert str(classify(psycopg2.OperationalError())) == "OperationalError"


def test_a_database_created_after_a_failure_closes_the_breaker_on_its_own(make_db):
    name = f"mlops_test_{uuid.uuid4().hex[:12]}"
    db = make_db(with_dbname(ADMIN_URL, name), breaker_seconds=0.1)
    assert isinstance(timed(lambda: db.run(select_one, timeout_ms=500, skip_if_down=True))[1],
                      DatabaseMisconfigured)
    time.sleep(0.3)  # the probe meets the same error a few times, and goes on
    admin(f'CREATE DATABASE "{name}"')
    try:
        def pings() -> bool:
            return timed(lambda: db.run(select_one, timeout_ms=2000, skip_if_down=True))[1] \
                is None

        wait_until(pings, "the breaker to close")
    finally:
        db.close()
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_close_does_not_wait_for_a_connection_attempt_in_progress(proxy, make_db, dbname):
    db = make_db(proxy.url(dbname), breaker_seconds=60)
    proxy.stall()
    assert isinstance(timed(lambda: db.ping(100))[1], DatabaseUnavailable)
    elapsed, error = timed(db.close)
    assert error is None and elapsed < 0.5, elapsed


def test_close_abandons_the_connects_still_waiting_for_a_thread(proxy, make_db, dbname):
    db = make_db(proxy.url(dbname), breaker_seconds=60, DB_POOL_SIZE=4)
    proxy.stall()

    def call():
        timed(lambda: db.ping(100))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    # (client, server) pairs through the proxy: connections made. Two connects
    # are under way; two wait for a connector thread.
    wait_until(lambda: proxy.connections == 2, "the two connects under way")
    db.close()
    proxy.resume()
    # The two abandoned ones would connect within half a second, were they not abandoned.
    holds_for(lambda: proxy.connections == 2, "no abandoned connect arriving", 0.5)


def test_a_full_pool_waits_for_a_connection_until_the_deadline(database_url, make_db):
    db = make_db(database_url, DB_POOL_SIZE=2)
    holding = threading.Barrier(3)
    release = threading.Event()

    def hold(cur):
        holding.wait(5)
        release.wait(5)
        return select_one(cur)

    threads = [threading.Thread(target=db.run, args=(hold,)) for _ in range(2)]
    for t in threads:
        t.start()
    holding.wait(5)
    elapsed, error = timed(lambda: db.run(select_one, timeout_ms=200))
    assert isinstance(error, DatabaseUnavailable) and 0.15 < elapsed < 0.6, (elapsed, error)
    assert str(error) == "connection pool exhausted (2 in use)"

    # A connection given back in time serves the waiting call.
    threading.Timer(0.2, release.set).start()
    elapsed, error = timed(lambda: db.run(select_one, timeout_ms=3000))
    for t in threads:
        t.join(5)
    assert error is None and 0.15 < elapsed < 1.0, (elapsed, error)
    assert db.pool_in_use() == 0


def test_a_call_that_raises_is_no_longer_watched(database_url, make_db):
    db = make_db(database_url, DB_POOL_SIZE=1)

    def bug(cur):
        raise ValueError("a bug in the caller")

    with pytest.raises(ValueError):
        db.run(bug, timeout_ms=100)
    assert_no_stale_deadline(db)


def test_a_call_without_a_timeout_ends_by_the_default_one(proxy, make_db, dbname):
    db = make_db(proxy.url(dbname), breaker_seconds=60, DB_CONNECT_TIMEOUT_SECONDS=1,
                 DB_STATEMENT_TIMEOUT_MS=200)
    assert db.run(select_one) == 1  # a warm connection in the pool
    proxy.stall()
    threading.Timer(4.0, proxy.resume).start()
    elapsed, error = timed(lambda: db.run(select_one))
    assert isinstance(error, DatabaseUnavailable) and 1.0 < elapsed < 2.0, (elapsed, error)


def test_a_migration_at_first_use_ends_by_the_calls_deadline(fresh_database, make_db,
                                                              tmp_path):
    name = fresh_database()
    (tmp_path / "0001_slow.sql").write_text("SELECT pg_sleep(3);\n")
    db = make_db(with_dbname(ADMIN_URL, name), breaker_seconds=60, MIGRATIONS_DIR=tmp_path)
    elapsed, error = timed(lambda: db.ping(300))
    assert isinstance(error, DatabaseUnavailable) and elapsed < 1.0, (elapsed, error)
    assert str(error) == "server closed the connection unexpectedly"


def test_a_worker_forked_after_the_migration_does_not_migrate_again(fresh_database, make_db,
                                                                      tmp_path):
    name = fresh_database()
    url = with_dbname(ADMIN_URL, name)
    (tmp_path / "0001_broken.sql").write_text("SELECT 1;\n")
    assert check_at_start(Settings.from_env({"DATABASE_URL": url,  # as gunicorn's master does
                                             "MIGRATIONS_DIR": str(tmp_path)})) == "ready"
    (tmp_path / "0001_broken.sql").write_text("SELEC 1;\n")
    db = make_db(url, MIGRATIONS_DIR=tmp_path)
    assert db.run(select_one) == 1


def test_a_migration_at_first_use_is_recorded_for_later_workers(fresh_database, make_db,
                                                                 tmp_path):
    name = fresh_database()
    url = with_dbname(ADMIN_URL, name)
    for _, path in migrate.pending_files():
        (tmp_path / path.name).write_text(path.read_text())
    db = make_db(url, MIGRATIONS_DIR=tmp_path)
    assert not migrate.is_current(url, tmp_path)
    assert db.run(select_one) == 1
    assert migrate.is_current(url, tmp_path)


def test_a_connection_left_in_a_transaction_is_not_reused(database_url, make_db):
    db = make_db(database_url, DB_POOL_SIZE=1)
    db.run(lambda cur: cur.execute("BEGIN"))
    status = db.run(lambda cur: cur.connection.info.transaction_status)
    assert status == psycopg2.extensions.TRANSACTION_STATUS_IDLE


def test_by_default_a_probe_every_second_closes_the_breaker(proxy, dbname, tmp_path):
    settings = Settings.from_env({"DATABASE_URL": proxy.url(dbname),
                                  "SPOOL_DIR": str(tmp_path)})
    db = Database(settings)
    try:
        proxy.refuse()
        assert isinstance(timed(lambda: db.run(select_one, timeout_ms=500, skip_if_down=True))[1],
                          DatabaseUnavailable)
        proxy.resume()
        started = time.monotonic()

        def pings() -> bool:
            return timed(lambda: db.run(select_one, timeout_ms=500, skip_if_down=True))[1] \
                is None

        wait_until(pings, "the breaker to close", timeout=1.9, interval=0.02)
        assert time.monotonic() - started > 0.9
    finally:
        db.close()


def test_a_dead_connection_is_found_by_keepalives_and_unacknowledged_data(database_url,
                                                                          make_db):
    """Idle: probes after 30 s, every 10 s, 3 times; busy: 1 s past the statement timeout."""
    db = make_db(database_url, DB_STATEMENT_TIMEOUT_MS=2500)
    params = db.run(lambda cur: cur.connection.get_dsn_parameters())
    assert {k: params[k] for k in ("keepalives", "keepalives_idle", "keepalives_interval",
                                   "keepalives_count", "tcp_user_timeout")} == {
        "keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
        "keepalives_count": "3", "tcp_user_timeout": "3500"}
    # A connect gives up by itself too (DB_CONNECT_TIMEOUT_SECONDS), and says whose it is.
    assert (params["connect_timeout"], params["application_name"]) == ("2", "mlops-service")


# A process as gevent's worker runs it (mlops/gunicorn_worker.py): patched, psycopg2
# waiting through gevent. It COPYs once, then again while a second connection of
# its own holds a lock on the table.
_GREEN_COPY = """
from gevent import monkey
monkey.patch_all()
import psycogreen.gevent
psycogreen.gevent.patch_psycopg()
import io, sys, time
import psycopg2, psycopg2.extensions
from mlops.config import Settings
from mlops.db import Database, DatabaseUnavailable, copy_from
db = Database(Settings.from_env({"DATABASE_URL": sys.argv[1], "SPOOL_DIR": sys.argv[2]}))
def copy(cur):
    copy_from(cur, "COPY copy_probe FROM STDIN", io.StringIO("1\\n"))
db.run(copy)
print("copied" if psycopg2.extensions.get_wait_callback() else "green mode lost", flush=True)
locker = psycopg2.connect(sys.argv[1])
locker.cursor().execute("LOCK TABLE copy_probe IN ACCESS EXCLUSIVE MODE")
started = time.monotonic()
try:
    db.run(copy, timeout_ms=300)
    print("copied again", flush=True)
except DatabaseUnavailable:
    print(f"unavailable after {time.monotonic() - started:.2f} s", flush=True)
"""


def test_a_copy_under_gevent_works_and_ends_by_its_deadline(database_url, tmp_path):
    """COPY runs with psycopg2's wait callback cleared, so it blocks every greenlet of
    its process: only a real watchdog thread can end it at its deadline. The
    callback is back once the COPY is done."""
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE copy_probe (n int)")
    conn.close()
    script = subprocess.run(
        [sys.executable, "-c", _GREEN_COPY, database_url, str(tmp_path)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        timeout=20)
    lines = script.stdout.splitlines()
    assert lines[:1] == ["copied"], (script.stdout, script.stderr)
    assert lines[1].startswith("unavailable after 0.3"), (script.stdout, script.stderr)


def test_one_watchdog_thread_watches_every_call(database_url, make_db):
    db = make_db(database_url)
    db.ping()  # starts the watchdog
    before = len(os.listdir("/proc/self/task"))  # this process's threads
    for _ in range(20):
        db.ping()
    assert len(os.listdir("/proc/self/task")) < before + 5


def test_copy_from_runs_with_a_wait_callback_set_and_puts_it_back(database_url):
    """As in gevent's worker: psycopg2 refuses COPY while a wait callback is set."""
    psycopg2.extensions.set_wait_callback(psycogreen.gevent.gevent_wait_callback)
    try:
        conn = psycopg2.connect(database_url)
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE copied (n int)")
            copy_from(cur, "COPY copied FROM STDIN", io.StringIO("1\n2\n"))
            assert psycopg2.extensions.get_wait_callback() is \
                psycogreen.gevent.gevent_wait_callback
            cur.execute("SELECT count(*) FROM copied")
            assert cur.fetchone()[0] == 2
        conn.close()
    finally:
        psycopg2.extensions.set_wait_callback(None)


def test_the_watchdog_takes_ever_sooner_deadlines_in_a_row(database_url):
    watchdog = Watchdog()
    conn = psycopg2.connect(database_url)
    now = time.monotonic()
    tokens = [watchdog.watch(conn, now + 100 - i) for i in range(50)]  # each one sooner
    assert not any(watchdog.release(t) for t in tokens)  # none fired
    conn.close()


def show_timeout(cur) -> str:
    cur.execute("SHOW statement_timeout")
    return cur.fetchone()[0]


def test_run_sends_its_timeout_as_the_statement_timeout(database_url, make_db):
    db = make_db(database_url, DB_STATEMENT_TIMEOUT_MS=2500)
    assert db.run(show_timeout) == "2500ms"  # the setting, by default
    assert db.run(show_timeout, timeout_ms=1234) == "1234ms"
    assert db.run(show_timeout, timeout_ms=1234, transaction=True) == "1234ms"

    def show_timeout_as(query):
        def show(cur) -> str:
            cur.execute(query)
            return cur.fetchone()[0]
        return show

    # A statement composed with psycopg2.sql, or given as bytes, carries it too.
    composed = sql.SQL("SHOW {}").format(sql.Identifier("statement_timeout"))
    assert db.run(show_timeout_as(composed), timeout_ms=1500) == "1500ms"
    assert db.run(show_timeout_as(b"SHOW statement_timeout"), timeout_ms=1600) == "1600ms"
    elapsed, error = timed(lambda: db.run(lambda cur: cur.execute("SELECT pg_sleep(5)"),
                                          timeout_ms=300))
    assert isinstance(error, DatabaseUnavailable) and elapsed < 1.5, (elapsed, error)


def test_run_in_a_transaction_commits_or_rolls_back_as_one(database_url, make_db):
    db = make_db(database_url, DB_POOL_SIZE=1)
    name = f"t_{uuid.uuid4().hex[:8]}"

    def create_then(fail: bool):
        def work(cur):
            status = cur.connection.info.transaction_status
            cur.execute(f"CREATE TABLE {name} (n int)")
            cur.execute(f"INSERT INTO {name} VALUES (1)")
            if fail:
                raise ValueError("a bug after the statements")
            return status, show_timeout(cur)
        return work

    with pytest.raises(ValueError):
        db.run(create_then(fail=True), timeout_ms=2000, transaction=True)
    assert db.run(lambda cur: (cur.execute("SELECT to_regclass(%s)", (name,)),
                               cur.fetchone()[0])[1]) is None
    assert db.run(create_then(fail=False), timeout_ms=2000, transaction=True) == (
        psycopg2.extensions.TRANSACTION_STATUS_INTRANS, "2s")
    assert db.run(lambda cur: (cur.execute(f"SELECT count(*) FROM {name}"),
                               cur.fetchone()[0])[1]) == 1
    db.run(lambda cur: cur.execute(f"DROP TABLE {name}"))
    assert db.pool_in_use() == 0


def test_run_skips_at_once_while_the_breaker_is_open_when_asked(make_db):
    db = make_db("postgresql://postgres@127.0.0.1:1/postgres", breaker_seconds=60)
    assert not db.breaker.is_open
    assert isinstance(timed(lambda: db.run(select_one))[1], DatabaseUnavailable)
    assert db.breaker.is_open
    error = timed(lambda: db.run(select_one, timeout_ms=200, skip_if_down=True))[1]
    assert str(error) == "skipped: the database failed its last call"
    error = timed(lambda: db.run(select_one, timeout_ms=200))[1]
    assert str(error).startswith('connection to server at "127.0.0.1", port 1 failed')


DISK_FULL = "could not extend file: No space left on device"


def refused_for_lack_of_space(cur) -> None:
    """What Postgres answers a write with when its disk is full (SQLSTATE 53100)."""
    cur.execute(f"DO $$ BEGIN RAISE EXCEPTION '{DISK_FULL}' USING ERRCODE = 'disk_full'; "
                "END $$")


def test_a_write_refused_for_lack_of_space_is_reported_until_one_succeeds(database_url,
                                                                          make_db):
    db = make_db(database_url, breaker_seconds=60)
    assert db.full_reason() is None
    with pytest.raises(DatabaseFull, match=f"^{DISK_FULL}$"):
        db.run(refused_for_lack_of_space)
    assert db.full_reason() == DISK_FULL and db.breaker.is_open
    assert db.run(select_one) == 1  # a read still works: still reported full
    assert db.full_reason() == DISK_FULL
    db.write_succeeded()
    assert db.full_reason() is None


def test_a_migration_refused_for_lack_of_space_at_start_waits_for_space(fresh_database,
                                                                          tmp_path):
    name = fresh_database()
    (tmp_path / "0001_grow.sql").write_text(
        f"DO $$ BEGIN RAISE EXCEPTION '{DISK_FULL}' USING ERRCODE = 'disk_full'; END $$;\n")
    settings = Settings.from_env({"DATABASE_URL": with_dbname(ADMIN_URL, name),
                                  "MIGRATIONS_DIR": str(tmp_path)})
    assert check_at_start(settings) == (
        f"unavailable: database full, migrations wait for space: {DISK_FULL}")


def test_only_a_connection_error_can_be_misconfigured(database_url):
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.ProgrammingError) as raised:
            cur.execute("SELECT * FROM no_such_table")
    finally:
        conn.close()
    assert "does not exist" in str(raised.value)  # the words of a wrong database name
    error = classify(raised.value)
    assert type(error) is DatabaseUnavailable and str(error).startswith(
        'relation "no_such_table" does not exist')


def test_a_pool_of_one_keeps_its_connection_between_calls(database_url, make_db):
    db = make_db(database_url, DB_POOL_SIZE=1)
    first = db.run(lambda cur: cur.connection.get_backend_pid())
    assert db.idle_connections == 1
    assert db.run(lambda cur: cur.connection.get_backend_pid()) == first


def test_the_gate_applies_a_file_its_directory_has_beyond_the_bundled_ones(fresh_database,
                                                                           make_db, tmp_path):
    name = fresh_database()
    url = with_dbname(ADMIN_URL, name)
    assert check_at_start(Settings.from_env({"DATABASE_URL": url})) == "ready"  # bundled ones
    for _, path in migrate.pending_files():
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "9999_extra.sql").write_text("CREATE TABLE extra_table (n int);\n")
    db = make_db(url, MIGRATIONS_DIR=tmp_path)
    assert db.run(lambda cur: (cur.execute("SELECT to_regclass('extra_table') IS NOT NULL"),
                               cur.fetchone()[0])[1]) is True


def test_a_call_postgres_rolled_back_is_no_longer_watched(database_url, dbname, make_db):
    db = make_db(database_url, DB_POOL_SIZE=1)
    table = f"t_{uuid.uuid4().hex[:8]}"
    psql(dbname, f"CREATE TABLE {table} (n int); INSERT INTO {table} VALUES (1)")

    def update_after_another_session(cur):
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur.execute(f"SELECT n FROM {table}")  # the transaction's snapshot
        psql(dbname, f"UPDATE {table} SET n = 2")  # another session commits meanwhile
        cur.execute(f"UPDATE {table} SET n = 3")

    try:
        with pytest.raises(TransactionRolledBack, match="could not serialize access"):
            db.run(update_after_another_session, timeout_ms=100, transaction=True)
        assert not db.breaker.is_open  # the database itself is fine
        assert_no_stale_deadline(db)
    finally:
        psql(dbname, f"DROP TABLE {table}")
