"""The PostgreSQL connection life-cycle: one pool per process, created after fork.

Connections run in autocommit mode; each unit of work is one SQL string, so
one round trip, and a statement timeout rides along as ``SET LOCAL`` in that
same string (``options=-c ...`` would not survive Neon's PgBouncer pooler,
which runs in transaction mode and keeps no session state).

Errors are sorted into two kinds:

* :class:`DatabaseUnavailable` — transient (refused, timeout, server shutting
  down, Neon waking up, pool exhausted). Callers spool and retry later.
* :class:`DatabaseMisconfigured` — permanent (wrong password, TLS refused,
  unknown database). Start-up fails fast on these with one line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import psycopg2
import psycopg2.pool

from . import migrate
from .config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Substrings of libpq / server messages that no retry will fix. Anything else
# that stops a connection is treated as transient.
_PERMANENT = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",  # database or role
    "ssl is not enabled on the server",
    "server does not support ssl",
    "channel binding",
    "certificate",
    "invalid sslmode",
    "invalid connection option",
    "invalid integer value",
    "name or service not known",
    "permission denied",
    "authentication method",
)


class DatabaseUnavailable(Exception):
    """Postgres cannot be reached or answered too slowly; worth retrying later."""


class DatabaseMisconfigured(Exception):
    """The connection settings are wrong; retrying will not help."""


def classify(exc: psycopg2.Error) -> Exception:
    """Map a psycopg2 error raised while connecting or querying to our two kinds."""
    message = " ".join(str(exc).split()).lower()
    if isinstance(exc, psycopg2.OperationalError) and any(m in message for m in _PERMANENT):
        return DatabaseMisconfigured(_first_line(exc))
    return DatabaseUnavailable(_first_line(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Database:
    """A lazily-filled connection pool plus the schema-migration gate.

    Create it inside the worker process (the app factory runs there), never
    before gunicorn forks: a libpq connection must not be shared across fork.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # minconn=0: open nothing now (Postgres may be down at start-up) ...
        self._pool = psycopg2.pool.ThreadedConnectionPool(
            0,
            settings.db_pool_size,
            settings.database_url,
            connect_timeout=settings.db_connect_timeout_seconds,
            application_name="mlops-service",
            keepalives=1,
            keepalives_idle=30,
        )
        # ... then keep every returned connection: psycopg2 closes those beyond
        # minconn on putconn, which would mean a new connection per request.
        self._pool.minconn = settings.db_pool_size
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self.statement_timeout_ms = settings.db_statement_timeout_ms

    @property
    def pool_size(self) -> int:
        """Maximum connections this process may open."""
        return self._pool.maxconn

    def pool_in_use(self) -> int:
        """Connections currently checked out of the pool."""
        return len(self._pool._used)  # psycopg2 exposes no public counter

    def run(self, work: Callable[[psycopg2.extensions.cursor], T]) -> T:
        """Run ``work(cursor)`` on a pooled connection and return its result.

        A connection found broken (Neon closes idle ones when its compute
        suspends) is discarded, not returned to the pool, and ``work`` is
        retried once on a fresh connection. Raises :class:`DatabaseUnavailable`
        or :class:`DatabaseMisconfigured`; other ``psycopg2.Error`` (a bug in
        our SQL, a constraint) propagate unchanged.
        """
        self._ensure_schema()
        for attempt in (1, 2):
            conn = self._getconn()
            try:
                with conn.cursor() as cur:
                    result = work(cur)
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                broken = bool(conn.closed)
                self._pool.putconn(conn, close=broken)
                if broken and attempt == 1:
                    log.warning("database connection broke, retrying once",
                                extra={"error": _first_line(exc)})
                    continue
                raise classify(exc) from exc
            except BaseException:
                self._pool.putconn(conn, close=bool(conn.closed))
                raise
            self._pool.putconn(conn)
            return result
        raise AssertionError("unreachable")

    def timeout_prefix(self) -> str:
        """SQL to prepend to a unit of work so it cannot outlive the statement timeout."""
        return f"SET LOCAL statement_timeout = {int(self.statement_timeout_ms)};"

    def ping(self) -> None:
        """One round trip (``SELECT 1``). Raises like :meth:`run`."""
        self.run(lambda cur: cur.execute(self.timeout_prefix() + "SELECT 1"))

    def close(self) -> None:
        """Close every pooled connection (process shutdown)."""
        self._pool.closeall()

    def _getconn(self) -> psycopg2.extensions.connection:
        try:
            conn = self._pool.getconn()
        except psycopg2.pool.PoolError as exc:  # exhausted or closed
            raise DatabaseUnavailable(f"connection pool: {exc}") from exc
        except psycopg2.Error as exc:
            raise classify(exc) from exc
        if not conn.autocommit:
            conn.autocommit = True
        return conn

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            conn = self._getconn()
            try:
                migrate.apply(conn)
            except psycopg2.Error as exc:
                self._pool.putconn(conn, close=True)
                raise classify(exc) from exc
            self._pool.putconn(conn)
            self._schema_ready = True


def check_at_start(settings: Settings) -> str:
    """Connect once and migrate, as the start-up check of a server process.

    Returns ``"ready"``, or ``"unavailable: <reason>"`` for a transient
    failure (the service starts anyway and spools until Postgres is back).
    Raises :class:`DatabaseMisconfigured` for settings no retry will fix.
    """
    try:
        conn = psycopg2.connect(
            settings.database_url,
            connect_timeout=settings.db_connect_timeout_seconds,
            application_name="mlops-service",
        )
        try:
            conn.autocommit = True
            migrate.apply(conn)
        finally:
            conn.close()
    except psycopg2.Error as exc:
        error = classify(exc)
        if isinstance(error, DatabaseMisconfigured):
            raise error from None
        return f"unavailable: {error}"
    return "ready"
