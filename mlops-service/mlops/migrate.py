"""Versioned SQL migrations from ``migrations/NNNN_name.sql``, applied in order,
and the schema gate that applies them before a process's first call.

All pending files run in one transaction that first takes a
transaction-level advisory lock, so several gunicorn workers (or replicas)
starting at once apply each file exactly once. A transaction-level lock,
unlike a session-level one, also works through Neon's PgBouncer pooler,
which keeps no session state between transactions.

Servers migrate once, at start (:func:`check_at_start`, in gunicorn's master
before it forks). Each process's :class:`Schema` gate then reads the ledger
before its first call (one round trip) and migrates only if a file is not
recorded there, as when the database was away at start.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import psycopg2
import psycopg2.errors

from .config import Settings
from .postgres import (
    DatabaseFull,
    DatabaseMisconfigured,
    DatabaseUnavailable,
    classify,
    connect_options,
    transaction,
)

log = logging.getLogger(__name__)

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


_RECORD = "INSERT INTO mlops_schema_migrations (version, name) VALUES (%s, %s)"
_APPLIED = "SELECT version FROM mlops_schema_migrations"


class MigrationFailed(Exception):
    """A migration file is malformed or its SQL failed; ``str(error)`` names the file."""


class MigrationError(Exception):
    """A migration file failed at start; ``str(error)`` is one line naming it."""


def pending_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, Path]]:
    """Every migration file as ``(version, path)``, sorted by version.

    Raises :class:`MigrationFailed` for a file not named ``NNNN_name.sql``.
    """
    files = []
    for path in directory.glob("*.sql"):
        prefix = path.name.partition("_")[0]
        if not prefix.isdigit():
            raise MigrationFailed(f"migration {path.name}: name must start with a number")
        files.append((int(prefix), path))
    return sorted(files)


def is_applied(conn, directory: Path = MIGRATIONS_DIR) -> bool:
    """True if the ledger on ``conn`` (autocommit) records every file of ``directory``.

    One round trip. Raises :class:`MigrationFailed` for a misnamed file and
    ``psycopg2.Error`` when the connection fails.
    """
    with conn.cursor() as cur:
        try:
            cur.execute(_APPLIED)
        except psycopg2.errors.UndefinedTable:
            return False
        done = {row[0] for row in cur.fetchall()}
    return all(version in done for version, _ in pending_files(directory))


def is_current(url: str, directory: Path = MIGRATIONS_DIR) -> bool:
    """:func:`is_applied` on a connection of its own to ``url``."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        return is_applied(conn, directory)
    finally:
        conn.close()


def apply(conn, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Apply every migration of ``directory`` not yet recorded; return the versions applied.

    ``conn`` is an autocommit psycopg2 connection; the transaction is explicit.
    Raises :class:`MigrationFailed` (after rolling back) naming a file whose
    SQL fails, and ``psycopg2.OperationalError`` when the connection fails.
    """
    applied_now: list[int] = []
    files = pending_files(directory)
    with conn.cursor() as cur, transaction(cur):
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        cur.execute(_LEDGER)
        cur.execute(_APPLIED)
        done = {row[0] for row in cur.fetchall()}
        for version, path in files:
            if version in done:
                continue
            try:
                cur.execute(path.read_text(encoding="utf-8"))
            except (psycopg2.ProgrammingError, psycopg2.DataError,
                    psycopg2.IntegrityError, psycopg2.NotSupportedError) as exc:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise MigrationFailed(f"migration {path.name} failed: {reason}") from exc
            cur.execute(_RECORD, (version, path.stem))
            applied_now.append(version)
    return applied_now


class Schema:
    """The schema gate of one process: every migration of ``directory`` is applied
    before the first call that passes it.

    :meth:`ensure` reads the ledger once (one round trip) and migrates only
    when a file is missing from it; from then on it costs nothing.
    """

    def __init__(self, directory: Path = MIGRATIONS_DIR) -> None:
        self.directory = directory
        self._ready = False
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """True once this process found the schema current (or made it so)."""
        return self._ready

    def ensure(self, conn) -> None:
        """Make the schema on ``conn`` (autocommit) current, once per process.

        A migration that fails is logged and raised as
        :class:`DatabaseUnavailable` (callers spool until it is fixed);
        connection errors are raised as ``classify`` sorts them.
        """
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            try:
                if not is_applied(conn, self.directory):
                    apply(conn, self.directory)
            except MigrationFailed as exc:
                log.error("migration failed; spooling until it is fixed",
                          extra={"error": str(exc)})
                raise DatabaseUnavailable(str(exc)) from exc
            except psycopg2.Error as exc:
                raise classify(exc) from exc
            self._ready = True


def check_at_start(settings: Settings) -> str:
    """Connect once and apply pending migrations, as the start-up step of a server.

    Runs in gunicorn's master before it forks (and in ``python app.py``), so
    the workers find the schema current. Returns ``"ready"``, or
    ``"unavailable: <reason>"`` when Postgres cannot be reached or is full
    (``"unavailable: database full, ..."``, SQLSTATE 53100): the service
    starts anyway, spools, and migrates before its first delivery. Raises
    :class:`DatabaseMisconfigured` for settings no retry will fix and
    :class:`MigrationError` naming a migration file that fails.
    """
    try:
        conn = psycopg2.connect(settings.database_url, **connect_options(settings))
    except psycopg2.Error as exc:
        error = classify(exc)
        if isinstance(error, DatabaseMisconfigured):
            raise error from None
        return f"unavailable: {error}"
    try:
        conn.autocommit = True  # apply() begins and commits explicitly
        apply(conn, settings.migrations_dir)
    except MigrationFailed as exc:
        raise MigrationError(str(exc)) from None
    except psycopg2.Error as exc:
        error = classify(exc)
        if isinstance(error, DatabaseFull):
            return f"unavailable: database full, migrations wait for space: {error}"
        return f"unavailable: {error}"
    finally:
        conn.close()
    return "ready"
