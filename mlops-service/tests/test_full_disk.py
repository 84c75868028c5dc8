"""A full database is an outage: events spool (202) and are stored once space is back.

The fault is real: a private PostgreSQL cluster whose ``mlops_events`` table
and its indexes live in a tablespace on a small tmpfs. A filler table takes
most of that tmpfs; the service's real gunicorn then fills the rest through
``/track`` until Postgres refuses to extend the table (SQLSTATE 53100
``disk_full``, "No space left on device"), the same error Neon raises when
a project reaches its size limit. Space comes back as it would for an
operator: data dropped, or the volume grown (``mount -o remount,size=``).
(Retention deleting old events frees space only once VACUUM has run, and on
a disk full to the last page VACUUM itself can fail to create an index's
free-space map; docs/operations.md says to act on the alerts before that.)

Mounting a tmpfs needs root (``mount -t tmpfs``); elsewhere the test skips,
saying so.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2
import pytest
import requests
from payloads import SUCCESS
from pgcluster import PgCluster
from support import wait_until

from mlops.config import Settings
from mlops.migrate import check_at_start

# The tmpfs holding the events; the filler leaves this much of it free.
TMPFS_SIZE = "4m"
HEADROOM_BYTES = 160 * 1024


def _mount_tmpfs(size: str) -> Path:
    """A fresh tmpfs of ``size``, owned by the server's OS user; skips when impossible."""
    if os.geteuid() != 0:
        pytest.skip("the full-disk test mounts a tmpfs for a tablespace and must run as root "
                    "(`mount -t tmpfs`); run it as root or in the CI container")
    where = Path(tempfile.mkdtemp(prefix="mlops-tablespace-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs for the full-disk test: {done.stderr.strip()}")
    user = pwd.getpwnam("postgres") if _has_user("postgres") else None
    if user is not None:
        os.chown(where, user.pw_uid, user.pw_gid)
    return where


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def small_tablespace():
    """``(cluster, url, mount point)``: a migrated database whose events live on a
    4 MiB tmpfs."""
    where = _mount_tmpfs(TMPFS_SIZE)
    cluster = PgCluster()
    try:
        cluster.start()
        cluster.psql("CREATE DATABASE mlops")
        url = cluster.url("mlops")
        assert check_at_start(Settings.from_env({"DATABASE_URL": url})) == "ready"
        cluster.psql(f"CREATE TABLESPACE small LOCATION '{where}'", "mlops")
        indexes = cluster.psql("SELECT string_agg(format('ALTER INDEX %I SET TABLESPACE small', "
                               "indexname), ';') FROM pg_indexes "
                               "WHERE tablename = 'mlops_events'", "mlops")
        cluster.psql(f"ALTER TABLE mlops_events SET TABLESPACE small; {indexes}", "mlops")
        yield cluster, url, where
    finally:
        cluster.destroy()
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        with contextlib.suppress(OSError):
            where.rmdir()


def _fill(url: str, headroom_bytes: int) -> None:
    """Fill the tablespace with ``mlops_filler`` but for about ``headroom_bytes``."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        # Rows of 7,000 bytes stored as they are (no compression): one 8 KiB page each.
        for table in ("mlops_headroom", "mlops_filler"):
            cur.execute(f"CREATE TABLE {table} (pad text) TABLESPACE small;"
                        f"ALTER TABLE {table} ALTER COLUMN pad SET STORAGE PLAIN")
        cur.execute("INSERT INTO mlops_headroom SELECT repeat('x', 7000) "
                    "FROM generate_series(1, %s)", (headroom_bytes // 8192,))
        while True:
            try:
                cur.execute("INSERT INTO mlops_filler SELECT repeat('x', 7000) "
                            "FROM generate_series(1, 8)")
            except psycopg2.errors.DiskFull:
                break
        cur.execute("DROP TABLE mlops_headroom")
    conn.close()


def _stored(url: str) -> list[str]:
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT event_id FROM mlops_events")
        rows = [r[0] for r in cur.fetchall()]
    conn.close()
    return rows


def _send(base: str, event_id: str) -> tuple[int, str]:
    answer = requests.post(f"{base}/track", json={**SUCCESS, "event_id": event_id}, timeout=10)
    return answer.status_code, answer.text


def _drop_the_filler(cluster: PgCluster, where: Path) -> None:
    cluster.psql("DROP TABLE mlops_filler", "mlops")


def _grow_the_volume(cluster: PgCluster, where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=64m", str(where)], check=True)


@pytest.mark.parametrize("free_space", [_drop_the_filler, _grow_the_volume],
                         ids=["drop-data", "bigger-volume"])
def test_a_full_database_spools_then_stores_every_event_once(small_tablespace, gunicorn,
                                                             free_space):
    cluster, url, where = small_tablespace
    _fill(url, HEADROOM_BYTES)
    server = gunicorn(workers=2, DATABASE_URL=url)

    acknowledged: list[str] = []
    statuses: list[int] = []
    queued = 0
    with ThreadPoolExecutor(4) as pool:
        for _ in range(60):  # at most 60 rounds of 20 events (~2,000 events, far past full)
            ids = [str(uuid.uuid4()) for _ in range(20)]
            answers = list(pool.map(lambda i: _send(server.url, i), ids))
            for event_id, (status, body) in zip(ids, answers, strict=True):
                assert status in (201, 202), f"/track answered {status}: {body}"
                statuses.append(status)
                acknowledged.append(event_id)
            queued += sum(status == 202 for status, _ in answers)
            if queued >= 100:
                break
    assert queued >= 100, (
        f"the database never filled: {statuses.count(201)} stored, {queued} queued; "
        f"log:\n{server.log()[-3000:]}")

    # The reason is visible to an operator, and no acknowledged event went to Postgres twice.
    for _ in range(4):  # whichever worker answers
        ready = requests.get(f"{server.url}/health/ready", timeout=5)
        assert ready.status_code == 503, ready.text
        assert ready.json()["reason"].startswith("database full"), ready.text
        assert ready.json()["database"]["status"] == "full", ready.text
    assert "database full: writes are spooled" in server.log()
    stored_while_full = _stored(url)
    assert len(stored_while_full) == len(set(stored_while_full))
    assert len(stored_while_full) < len(acknowledged)

    # Space comes back: the spool drains into Postgres, each event exactly once.
    free_space(cluster, where)

    def drained() -> bool:
        assert server.proc.poll() is None, f"gunicorn exited {server.proc.returncode}"
        detailed = requests.get(f"{server.url}/health/detailed", timeout=5).json()
        return detailed["spool"]["depth"] == 0 and len(_stored(url)) >= len(acknowledged)

    try:
        wait_until(drained, f"the spool to drain into Postgres ({len(acknowledged)} acknowledged)",
                   timeout=60, interval=0.2)
    except AssertionError as exc:
        exc.add_note(f"{len(_stored(url))} stored; log:\n{server.log()[-3000:]}")
        raise
    stored = _stored(url)
    assert sorted(stored) == sorted(acknowledged), (
        f"{len(stored)} stored of {len(acknowledged)} acknowledged; "
        f"log:\n{server.log()[-3000:]}")

    # Each worker reports room again after its next successful write.
    def ready_after_a_write() -> bool:
        assert _send(server.url, str(uuid.uuid4()))[0] == 201
        return requests.get(f"{server.url}/health/ready", timeout=5).status_code == 200

    wait_until(ready_after_a_write, "/health/ready to answer 200 after writes", timeout=45,
               interval=0)


def test_start_up_on_a_full_database_says_so_in_one_line(small_tablespace):
    cluster, url, _ = small_tablespace
    _fill(url, 0)
    cluster.psql("CREATE DATABASE fresh")
    cluster.psql("ALTER DATABASE fresh SET default_tablespace = small")
    outcome = check_at_start(Settings.from_env({"DATABASE_URL": cluster.url("fresh")}))
    assert outcome.startswith("unavailable: database full, migrations wait for space: "), outcome
    assert "\n" not in outcome
