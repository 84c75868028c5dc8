"""Versioned SQL migrations from ``migrations/NNNN_name.sql``, applied in order.

All pending files run in one transaction that first takes a
transaction-level advisory lock, so several gunicorn workers (or replicas)
starting at once apply each file exactly once. A transaction-level lock,
unlike a session-level one, also works through Neon's PgBouncer pooler,
which keeps no session state between transactions.

Servers migrate once, at start (``mlops.db.check_at_start``, in gunicorn's
master before it forks); :func:`is_current` lets the forked workers skip it.
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


_RECORD = "INSERT INTO mlops_schema_migrations (version, name) VALUES (%s, %s)"  # pragma: no mutate

# (database URL, migrations folder) pairs known to be current in this process,
# or in the gunicorn master it was forked from.
_current: set[tuple[str, str]] = set()


class MigrationFailed(Exception):
    """A migration file is malformed or its SQL failed; ``str(error)`` names the file."""


def is_current(url: str, directory: Path = MIGRATIONS_DIR) -> bool:
    """True if this process (or its parent before fork) applied ``directory`` to ``url``."""
    return (url, str(directory)) in _current


def mark_current(url: str, directory: Path = MIGRATIONS_DIR) -> None:
    """Record that every file of ``directory`` is applied to ``url``."""
    _current.add((url, str(directory)))


def pending_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, Path]]:
    """Every migration file as ``(version, path)``, sorted by version.

    Raises :class:`MigrationFailed` for a file not named ``NNNN_name.sql``.
    """
    files = []
    for path in directory.glob("*.sql"):
        prefix = path.name.split("_", 1)[0]  # pragma: no mutate - any maxsplit, same [0]
        if not prefix.isdigit():
            raise MigrationFailed(f"migration {path.name}: name must start with a number")
        files.append((int(prefix), path))
    return sorted(files)


def apply(conn, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Apply every migration of ``directory`` not yet recorded; return the versions applied.

    ``conn`` is an autocommit psycopg2 connection; the transaction is explicit.
    Raises :class:`MigrationFailed` (after rolling back) naming a file whose
    SQL fails, and ``psycopg2.OperationalError`` when the connection fails.
    """
    applied_now: list[int] = []
    files = pending_files(directory)
    with conn.cursor() as cur:
        cur.execute("BEGIN")  # pragma: no mutate
        try:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))  # pragma: no mutate
            cur.execute(_LEDGER)
            cur.execute("SELECT version FROM mlops_schema_migrations")  # pragma: no mutate
            done = {row[0] for row in cur.fetchall()}
            for version, path in files:
                if version in done:
                    continue
                try:
                    cur.execute(path.read_text(encoding="utf-8"))  # pragma: no mutate
                except (psycopg2.ProgrammingError, psycopg2.DataError,
                        psycopg2.IntegrityError, psycopg2.NotSupportedError) as exc:
                    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise MigrationFailed(f"migration {path.name} failed: {reason}") from exc
                cur.execute(_RECORD, (version, path.stem))
                applied_now.append(version)
            cur.execute("COMMIT")  # pragma: no mutate
        except BaseException:
            if not conn.closed:
                with contextlib.suppress(psycopg2.Error):  # keep the original error
                    cur.execute("ROLLBACK")  # pragma: no mutate
            raise
    return applied_now
