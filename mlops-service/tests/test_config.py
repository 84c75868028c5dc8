"""Settings: each declared once, read from the environment and `.env`, checked on the way in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from annotated_types import Ge, Le

from mlops.config import ConfigError, ServerSettings, Settings, embedded_pgdata

URL = "postgresql://u@h/db"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
# Declared fields with bounds: (variable, lowest, highest or None).
BOUNDED = [(f.validation_alias, next(m.ge for m in f.metadata if isinstance(m, Ge)),
            next((m.le for m in f.metadata if isinstance(m, Le)), None))
           for f in Settings.model_fields.values() if any(isinstance(m, Ge) for m in f.metadata)]


def settings(**env) -> Settings:
    return Settings.from_env({"DATABASE_URL": URL, **env})


def test_the_defaults_serve_this_machine_only_with_everything_checked():
    s = settings()
    assert (s.host, s.service_port, s.log_level) == ("127.0.0.1", 5001, "INFO")
    assert (s.auth_mode, s.api_keys, s.metrics_token) == ("off", (), None)
    assert (s.rate_limit_processes, s.workers) == (1, 2)  # python app.py; gunicorn
    assert (s.retention_days, s.rollup_retention_days) == (None, None)
    assert s.migrations_dir == Path(__file__).resolve().parents[1] / "mlops" / "migrations"
    assert s.readiness_checks_database and s.rate_limit_enabled


@pytest.mark.parametrize(("name", "low", "high"), BOUNDED)
def test_every_bound_is_enforced_and_names_the_variable(name, low, high):
    assert getattr(settings(**{name: str(low)}), name.lower()) == low
    with pytest.raises(ConfigError, match=f"^{name} must be (between|at least) {low}"):
        settings(**{name: str(low - 1)})
    if high is not None:
        assert getattr(settings(**{name: str(high)}), name.lower()) == high
        with pytest.raises(ConfigError, match=f"^{name} must be between {low} and {high}, "
                                              f"got {high + 1}$"):
            settings(**{name: str(high + 1)})


@pytest.mark.parametrize(("name", "value", "message"), [
    ("SERVICE_PORT", "http", "SERVICE_PORT must be a whole number, got 'http'"),
    ("METRICS_CACHE_SECONDS", "2.5", "METRICS_CACHE_SECONDS must be a whole number"),
    ("SHUTDOWN_DELAY_SECONDS", "soon", "SHUTDOWN_DELAY_SECONDS must be a number, got 'soon'"),
    ("READINESS_CHECKS_DATABASE", "maybe", "READINESS_CHECKS_DATABASE must be true or false"),
    ("RATE_LIMIT_ENABLED", "1", "RATE_LIMIT_ENABLED must be true or false, got '1'"),
    ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got 'LOUD'"),
    ("DATABASE_URL", "mysql://x@y/z", "DATABASE_URL must start with postgresql://"),
])
def test_a_bad_value_is_one_line_naming_the_variable(name, value, message):
    with pytest.raises(ConfigError) as refused:
        settings(**{name: value})
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_values_are_read_as_before():
    s = settings(SERVICE_PORT=" 6123 ", LOG_LEVEL="debug", ALLOWED_ORIGINS="https://a, https://b,",
                 READINESS_CHECKS_DATABASE="No", RATE_LIMIT_ENABLED="FALSE", RETENTION_DAYS="30",
                 METRICS_CACHE_SECONDS="5", WEB_CONCURRENCY="4", SHUTDOWN_DELAY_SECONDS="1.5")
    assert (s.service_port, s.log_level, s.allowed_origins) == (
        6123, "DEBUG", ("https://a", "https://b"))
    assert (s.readiness_checks_database, s.rate_limit_enabled, s.retention_days) == (
        False, False, 30)
    assert (s.metrics_cache_seconds, s.rate_limit_processes, s.workers) == (5.0, 4, 4)
    assert s.shutdown_delay_seconds == 1.5


def test_an_empty_value_counts_as_unset():
    assert settings(SERVICE_PORT="", HOST="", MLOPS_API_KEY="").service_port == 5001
    with pytest.raises(ConfigError, match="^DATABASE_URL is not set"):
        Settings.from_env({"DATABASE_URL": ""})


def test_secrets_stay_out_of_the_repr():
    key, token = "k" * 20, "t" * 20
    s = settings(MLOPS_API_KEY=key, MLOPS_METRICS_TOKEN=token,
                 RATE_LIMIT_STORAGE_URI="redis://:password@redis:6379/0")
    assert s.api_keys == (key,) and s.metrics_token == token
    assert key not in repr(s) and token not in repr(s) and "password" not in repr(s)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory of its own, with no setting of the test's in the environment."""
    monkeypatch.chdir(tmp_path)
    for name in ("DATABASE_URL", "SERVICE_PORT", "LOG_LEVEL", "EMBEDDED_PGDATA"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_dot_env_in_the_working_directory_is_read(workdir):
    (workdir / ".env").write_text(f"DATABASE_URL={URL}\nSERVICE_PORT=6123\nLOG_LEVEL=debug\n"
                                  "SOMETHING_ELSE=ignored\n")
    s = Settings.from_env()
    assert (s.database_url, s.service_port, s.log_level) == (URL, 6123, "DEBUG")
    assert ServerSettings.from_env().service_port == 6123  # what gunicorn.conf.py reads


def test_the_environment_wins_over_dot_env(workdir, monkeypatch):
    (workdir / ".env").write_text(f"DATABASE_URL={URL}\nSERVICE_PORT=6123\n")
    monkeypatch.setenv("SERVICE_PORT", "7001")
    assert Settings.from_env().service_port == 7001
    monkeypatch.setenv("SERVICE_PORT", "")  # empty: unset, so .env's line holds
    assert Settings.from_env().service_port == 6123


def test_a_bad_dot_env_line_names_the_variable(workdir):
    (workdir / ".env").write_text(f"DATABASE_URL={URL}\nSERVICE_PORT=six\n")
    with pytest.raises(ConfigError, match="^SERVICE_PORT must be a whole number, got 'six'$"):
        Settings.from_env()


def test_a_given_mapping_is_read_alone(workdir, monkeypatch):
    (workdir / ".env").write_text("SERVICE_PORT=6123\n")
    monkeypatch.setenv("LOG_LEVEL", "ERROR")
    s = settings()
    assert (s.service_port, s.log_level) == (5001, "INFO")


def test_the_embedded_server_is_asked_for_by_an_unset_or_embedded_url(workdir):
    assert embedded_pgdata({}) == Path("data/postgres")
    assert embedded_pgdata({"DATABASE_URL": "embedded", "EMBEDDED_PGDATA": "/srv/pg"}) == \
        Path("/srv/pg")
    assert embedded_pgdata({"DATABASE_URL": URL}) is None
    (workdir / ".env").write_text(f"DATABASE_URL={URL}\n")
    assert embedded_pgdata() is None


def documented_variables() -> set[str]:
    """The variables named in the first column of docs/configuration.md's settings table."""
    names = set()
    for row in re.findall(r"^\| (`[^|]+) \|", DOCS.read_text(), re.M):
        if "not read by the service" in row:
            continue
        prefix = ""
        for written in re.findall(r"`([A-Z_]+)`", row):
            if written.startswith("_"):  # `RATE_LIMIT_TRACK`, `_BATCH`: the same prefix
                names.add(prefix + written)
            else:
                prefix = written.rsplit("_", 1)[0]
                names.add(written)
    return names


def test_the_settings_table_documents_exactly_the_declared_variables():
    declared = {field.validation_alias for field in Settings.model_fields.values()}
    assert documented_variables() == declared


def test_the_settings_table_gives_the_declared_whole_number_defaults():
    cells = dict(re.findall(r"^\| `([A-Z_]+)` \| (\d+) \|", DOCS.read_text(), re.M))
    fields = {f.validation_alias: f for f in Settings.model_fields.values()}
    assert cells
    for name, default in cells.items():
        declared = fields[name].default if fields[name].default is not None else \
            {"WEB_CONCURRENCY": Settings.from_env({"DATABASE_URL": URL}).workers}[name]
        assert int(default) == declared, name
