"""Migrations and the schema gate (mlops/migrate.py), against the local Postgres."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import psycopg2
import pytest
from conftest import ADMIN_URL, admin, with_dbname

from mlops import migrate
from mlops.config import Settings
from mlops.postgres import DatabaseUnavailable


@pytest.fixture
def url():
    """A new, empty database (dropped after the test)."""
    name = f"mlops_test_{uuid.uuid4().hex[:12]}"
    admin(f'CREATE DATABASE "{name}"')
    yield with_dbname(ADMIN_URL, name)
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def conn(url):
    c = psycopg2.connect(url)
    c.autocommit = True
    yield c
    c.close()


def folder(path: Path, **files: str) -> Path:
    path.mkdir(exist_ok=True)
    for name, text in files.items():
        (path / f"{name}.sql").write_text(text)
    return path


def ledger(conn) -> list[tuple[int, str]]:
    with conn.cursor() as cur:
        cur.execute("SELECT version, name FROM mlops_schema_migrations ORDER BY version")
        return cur.fetchall()


def test_files_are_ordered_by_number_and_a_misnamed_one_is_named(tmp_path):
    good = folder(tmp_path / "good", **{"0010_b": "", "0002_a": "", "0001_c": ""})
    assert [v for v, _ in migrate.pending_files(good)] == [1, 2, 10]
    bad = folder(tmp_path / "bad", **{"0001_a": "", "first": ""})
    with pytest.raises(migrate.MigrationFailed, match="^migration first.sql: name must start"):
        migrate.pending_files(bad)


def test_the_gate_applies_what_the_ledger_lacks_once_per_process(conn, tmp_path):
    files = folder(tmp_path, **{"0001_t": "CREATE TABLE t (n int);",
                                "0002_u": "CREATE TABLE u (n int);"})
    schema = migrate.Schema(files)
    assert not schema.ready and not migrate.is_applied(conn, files)
    schema.ensure(conn)
    assert schema.ready and migrate.is_applied(conn, files)
    assert ledger(conn) == [(1, "0001_t"), (2, "0002_u")]
    conn.close()
    schema.ensure(conn)  # ready: no round trip, so a closed connection does not matter


def test_the_gate_trusts_the_ledger_and_runs_no_file_it_records(url, conn, tmp_path):
    files = folder(tmp_path, **{"0001_t": "CREATE TABLE t (n int);"})
    assert migrate.check_at_start(Settings.from_env({"DATABASE_URL": url,
                                                     "MIGRATIONS_DIR": str(files)})) == "ready"
    assert migrate.is_current(url, files)
    (files / "0001_t.sql").write_text("SELEC 1;")  # would fail if it ran again
    schema = migrate.Schema(files)
    schema.ensure(conn)
    assert schema.ready


def test_a_failing_migration_is_logged_and_the_gate_stays_shut_until_fixed(conn, tmp_path,
                                                                             caplog):
    files = folder(tmp_path, **{"0001_t": "CREATE TABLE t (n int);",
                                "0002_broken": "CREATE TABLE oops (;"})
    schema = migrate.Schema(files)
    with caplog.at_level(logging.ERROR, logger="mlops.migrate"), \
            pytest.raises(DatabaseUnavailable, match="^migration 0002_broken.sql failed: syntax"):
        schema.ensure(conn)
    assert [r.getMessage() for r in caplog.records] == [
        "migration failed; spooling until it is fixed"]
    assert not schema.ready and not migrate.is_applied(conn, files)
    with conn.cursor() as cur:  # one transaction: the good file was rolled back too
        cur.execute("SELECT to_regclass('t') IS NULL AND to_regclass('oops') IS NULL")
        assert cur.fetchone()[0] is True
    (files / "0002_broken.sql").write_text("CREATE TABLE fixed (n int);")
    schema.ensure(conn)
    assert schema.ready and [v for v, _ in ledger(conn)] == [1, 2]


def test_a_lost_connection_is_sorted_and_leaves_the_gate_shut(url, tmp_path):
    files = folder(tmp_path, **{"0001_t": "CREATE TABLE t (n int);"})
    schema = migrate.Schema(files)
    lost = psycopg2.connect(url)
    lost.autocommit = True
    lost.close()
    with pytest.raises(DatabaseUnavailable):
        schema.ensure(lost)
    assert not schema.ready


def test_check_at_start_applies_everything_then_nothing(url, conn):
    settings = Settings.from_env({"DATABASE_URL": url})
    assert not migrate.is_current(url)
    assert migrate.check_at_start(settings) == "ready"
    assert migrate.is_current(url)
    before = ledger(conn)
    assert len(before) == len(migrate.pending_files())
    assert migrate.check_at_start(settings) == "ready"
    assert ledger(conn) == before
    assert migrate.apply(conn) == []
