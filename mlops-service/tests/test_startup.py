"""Start-up: configuration errors fail fast in one line; a Neon-like database works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests
from payloads import SUCCESS
from pgcluster import PgCluster
from servers import SERVICE_DIR, Gunicorn

from mlops.config import ConfigError, Settings


@pytest.mark.parametrize(("env", "message"), [
    ({}, "DATABASE_URL is not set"),
    ({"DATABASE_URL": "mysql://x@y/z"}, "DATABASE_URL must start with postgresql://"),
    ({"DATABASE_URL": "postgresql://u@h:notaport/db"}, "DATABASE_URL is malformed"),
    ({"DATABASE_URL": "postgresql://u@h/db", "SERVICE_PORT": "http"}, "SERVICE_PORT must be"),
    ({"DATABASE_URL": "postgresql://u@h/db", "LOG_LEVEL": "LOUD"}, "LOG_LEVEL must be"),
    ({"DATABASE_URL": "postgresql://u@h/db", "MLOPS_API_KEY_FILE": "/nonexistent"},
     "MLOPS_API_KEY_FILE cannot be read"),
])
def test_settings_name_the_bad_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "MLOPS_API_KEY", "PROMETHEUS_MULTIPROC_DIR")}
    return {**env, **extra}


@pytest.mark.parametrize("database_url", ["mysql://x@y/z", "postgresql://u@h:notaport/db"])
def test_python_app_py_fails_with_one_line(tmp_path, database_url):
    env = _clean_env(LOG_DIR=str(tmp_path), SPOOL_DIR=str(tmp_path))
    if database_url:
        env["DATABASE_URL"] = database_url
    result = subprocess.run([sys.executable, "app.py"], cwd=SERVICE_DIR, env=env,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("mlops-service: cannot start: DATABASE_URL")


def test_gunicorn_fails_fast_with_one_line_on_a_malformed_url(tmp_path):
    server = Gunicorn({"DATABASE_URL": "postgresql://u@h:notaport/db",
                       "LOG_DIR": str(tmp_path), "SPOOL_DIR": str(tmp_path)})
    with pytest.raises(RuntimeError, match="exited 1"):
        server.start()
    log = server.log()
    assert "Traceback" not in log
    assert [line for line in log.splitlines() if "cannot start" in line] == [
        "mlops-service: cannot start: DATABASE_URL is malformed: port 'notaport' is not a number"]


@pytest.fixture(scope="module")
def neon_like():
    """A cluster that, like Neon, accepts only TLS and scram-sha-256 passwords."""
    cluster = PgCluster(tls=True, password="npg_secret")
    cluster.start()
    yield cluster
    cluster.destroy()


def test_a_neon_style_url_works_with_tls_and_channel_binding(neon_like, tmp_path):
    url = neon_like.url(query="sslmode=require&channel_binding=require")
    server = Gunicorn({"DATABASE_URL": url, "LOG_DIR": str(tmp_path / "logs"),
                       "SPOOL_DIR": str(tmp_path / "spool")}, workers=2)
    try:
        server.start(wait_for="/health/ready")
        response = requests.post(f"{server.url}/track", json=SUCCESS, timeout=5)
        assert response.status_code == 201 and response.json()["storage"] == "stored"
        assert neon_like.psql("SELECT count(*) FROM mlops_events") == "1"
        # The pooled connections the service keeps open are all encrypted.
        assert neon_like.psql(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            "WHERE a.application_name = 'mlops-service'") == "t"
    finally:
        assert server.stop() == 0


def test_the_same_url_without_tls_on_the_server_fails_at_start(tmp_path):
    plain = PgCluster(tls=False, password="npg_secret")
    plain.start()
    try:
        url = plain.url(query="sslmode=require&channel_binding=require")
        server = Gunicorn({"DATABASE_URL": url, "LOG_DIR": str(tmp_path),
                           "SPOOL_DIR": str(tmp_path)})
        with pytest.raises(RuntimeError, match="exited 1"):
            server.start()
        lines = [line for line in server.log().splitlines() if "cannot start" in line]
        assert len(lines) == 1
        assert lines[0].startswith("mlops-service: cannot start: connection to server at")
        assert lines[0].endswith("server does not support SSL, but SSL was required")
        assert "Traceback" not in server.log()
    finally:
        plain.destroy()


def test_a_wrong_password_fails_at_start(neon_like, tmp_path):
    url = neon_like.url(query="sslmode=require").replace("npg_secret", "wrong")
    server = Gunicorn({"DATABASE_URL": url, "LOG_DIR": str(tmp_path), "SPOOL_DIR": str(tmp_path)})
    with pytest.raises(RuntimeError, match="exited 1"):
        server.start()
    assert "password authentication failed" in server.log()


@pytest.fixture
def broken_migrations(tmp_path):
    """A copy of the migrations folder plus a file whose SQL fails."""
    from mlops import migrate

    folder = tmp_path / "migrations"
    folder.mkdir()
    for _, path in migrate.pending_files():
        (folder / path.name).write_text(path.read_text())
    (folder / "9999_broken.sql").write_text("ALTER TABLE no_such_table ADD COLUMN x int;\n")
    return folder


def test_gunicorn_stops_on_a_failing_migration_naming_the_file(database_url, broken_migrations,
                                                                tmp_path):
    server = Gunicorn({"DATABASE_URL": database_url, "MIGRATIONS_DIR": str(broken_migrations),
                       "LOG_DIR": str(tmp_path), "SPOOL_DIR": str(tmp_path)})
    with pytest.raises(RuntimeError, match="exited 1"):
        server.start()
    assert "Traceback" not in server.log()
    assert [line for line in server.log().splitlines() if "cannot start" in line] == [
        "mlops-service: cannot start: migration 9999_broken.sql failed: "
        'relation "no_such_table" does not exist']


def test_python_app_py_stops_on_a_failing_migration_naming_the_file(database_url,
                                                                     broken_migrations, tmp_path):
    env = _clean_env(DATABASE_URL=database_url, MIGRATIONS_DIR=str(broken_migrations),
                     LOG_DIR=str(tmp_path), SPOOL_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "app.py"], cwd=SERVICE_DIR, env=env,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "mlops-service: cannot start: migration 9999_broken.sql failed: "
        'relation "no_such_table" does not exist']
