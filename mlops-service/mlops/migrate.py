"""Versioned SQL migrations from ``migrations/NNNN_name.sql``, applied in order.

All pending files run in one transaction that first takes a
transaction-level advisory lock, so several gunicorn workers (or replicas)
starting at once apply each file exactly once. A transaction-level lock,
unlike a session-level one, also works through Neon's PgBouncer pooler,
which keeps no session state between transactions.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import psycopg2

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

# pg_advisory_xact_lock key: any bigint unique to this service's schema
# ("mlops" in ASCII, 0x6d6c6f7073).
LOCK_KEY = 0x6D6C6F7073

_LEDGER = """
CREATE TABLE IF NOT EXISTS mlops_schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


def pending_files() -> list[tuple[int, Path]]:
    """Every migration file as ``(version, path)``, sorted by version."""
    files = []
    for path in MIGRATIONS_DIR.glob("*.sql"):
        version = int(path.name.split("_", 1)[0])
        files.append((version, path))
    return sorted(files)


def apply(conn) -> list[int]:
    """Apply every migration not yet recorded; return the versions applied.

    ``conn`` is an autocommit psycopg2 connection; the transaction is explicit.
    Raises ``psycopg2.Error`` (after rolling back) if any file fails.
    """
    applied_now: list[int] = []
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        try:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            cur.execute(_LEDGER)
            cur.execute("SELECT version FROM mlops_schema_migrations")
            done = {row[0] for row in cur.fetchall()}
            for version, path in pending_files():
                if version in done:
                    continue
                cur.execute(path.read_text(encoding="utf-8"))
                cur.execute(
                    "INSERT INTO mlops_schema_migrations (version, name) VALUES (%s, %s)",
                    (version, path.stem),
                )
                applied_now.append(version)
            cur.execute("COMMIT")
        except BaseException:
            if not conn.closed:
                with contextlib.suppress(psycopg2.Error):  # keep the original error
                    cur.execute("ROLLBACK")
            raise
    return applied_now
