"""The PostgreSQL connection life-cycle: one pool per process, created after fork,
and :meth:`Database.run`, the one way to run a unit of work with a deadline.

Connections run in autocommit mode. A call's ``timeout_ms`` is its one
deadline: enforced on the client side (the watchdog, mlops/watchdog.py,
shuts down the socket of a call that outlives it, which makes libpq's
blocked read return at once; a connection that is not ready in time is left
to finish in the background and joins the pool) and sent to the server as
``SET LOCAL statement_timeout`` in the same SQL string as the statement, so
one round trip (``options=-c ...`` would not survive Neon's PgBouncer
pooler, which runs in transaction mode and keeps no session state).

The error kinds live in mlops/postgres.py and are named here too.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from .breaker import Breaker
from .config import Settings
from .migrate import Schema
from .postgres import (
    DatabaseFull,
    DatabaseMisconfigured,
    DatabaseUnavailable,
    TransactionRolledBack,
    classify,
    connect_options,
    first_line,
)
from .postgres import transaction as begin_commit
from .watchdog import Watchdog

# The error kinds are named here for the modules above.
__all__ = [
    "FULL_REPORT_SECONDS", "Database", "DatabaseFull", "DatabaseMisconfigured",
    "DatabaseUnavailable", "TransactionRolledBack", "classify", "connect_options", "copy_from",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds a process keeps reporting the database full after its last write
# refused for that reason (a successful write ends it at once). The outbox's
# flusher retries at least every BACKOFF_MAX_SECONDS (10 s) while events wait,
# so a process that keeps seeing the refusal keeps reporting it.
FULL_REPORT_SECONDS = 30.0


def copy_from(cur: psycopg2.extensions.cursor, sql: str, data: io.TextIOBase) -> None:
    """``cur.copy_expert(sql, data)``: a ``COPY ... FROM STDIN`` of ``data``, also under gevent.

    psycopg2 refuses COPY while a wait callback is set ("copy_expert cannot
    be used with an asynchronous callback"), and gevent's worker sets one
    (psycogreen). The callback is cleared for this call only: the COPY then
    blocks the worker's other greenlets until it ends (a batch of 1,000
    events takes a few ms), and none of them can start a query meanwhile.
    The call's deadline still holds: the watchdog is a real thread.
    """
    callback = psycopg2.extensions.get_wait_callback()
    psycopg2.extensions.set_wait_callback(None)
    try:
        cur.copy_expert(sql, data)
    finally:
        psycopg2.extensions.set_wait_callback(callback)


class _TimedCursor(psycopg2.extensions.cursor):
    """A cursor whose statements sent outside a transaction block carry
    ``SET LOCAL statement_timeout`` (``self.timeout_prefix``) in the same string.

    Inside a block the block's setting holds: a ``BEGIN`` so prefixed keeps
    it until ``COMMIT`` (the string's implicit block becomes the explicit one).
    """

    timeout_prefix = ""

    def execute(self, query, vars=None):  # noqa: A002 - psycopg2's parameter name
        if self.connection.info.transaction_status == \
                psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            if isinstance(query, sql.Composable):
                query = sql.SQL(self.timeout_prefix) + query
            elif isinstance(query, bytes):
                query = self.timeout_prefix.encode() + query
            else:
                query = self.timeout_prefix + query
        return super().execute(query, vars)


class Database:
    """A lazily-filled connection pool with deadlines, a circuit breaker (mlops/breaker.py)
    and the schema gate (``migrate.Schema``).

    Create it inside the worker process (the app factory runs there), never
    before gunicorn forks: a libpq connection must not be shared across fork.
    """

    def __init__(self, settings: Settings, *, breaker_seconds: float = 1.0,
                 schema: Schema | None = None) -> None:
        self._dsn = settings.database_url
        self._options = connect_options(settings)
        self._max = settings.db_pool_size
        self._idle: list[psycopg2.extensions.connection] = []
        self._open = 0
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)  # a connection came back or was dropped
        self._connector: ThreadPoolExecutor | None = None
        self._watchdog = Watchdog()
        self.breaker = Breaker(self.ping, breaker_seconds,
                               expected=(DatabaseUnavailable, DatabaseMisconfigured),
                               thread_name="db-probe")
        # (time.monotonic(), message) of the last write refused for lack of space
        self._full: tuple[float, str] | None = None
        self.schema = schema or Schema(settings.migrations_dir)
        self.statement_timeout_ms = settings.db_statement_timeout_ms
        # Default deadline of a call: a connect, then the statement.
        self.default_timeout_ms = (settings.db_connect_timeout_seconds * 1000
                                   + settings.db_statement_timeout_ms)

    @property
    def pool_size(self) -> int:
        """Maximum connections this process may open."""
        return self._max

    def pool_in_use(self) -> int:
        """Connections currently checked out of the pool."""
        with self._lock:
            return self._open - len(self._idle)

    @property
    def watched_calls(self) -> int:
        """Calls the deadline watchdog still holds (:attr:`mlops.watchdog.Watchdog.pending`):
        0 when no call is running."""
        return self._watchdog.pending

    @property
    def idle_connections(self) -> int:
        """Connections open and idle in the pool, ready for the next call."""
        with self._lock:
            return len(self._idle)

    def full_reason(self) -> str | None:
        """Why writes are refused for lack of space, or None.

        The message of this process's last :class:`DatabaseFull`, while no
        write succeeded since (:meth:`write_succeeded`) and it is less than
        ``FULL_REPORT_SECONDS`` old.
        """
        full = self._full
        if full is None or time.monotonic() - full[0] > FULL_REPORT_SECONDS:
            return None
        return full[1]

    def write_succeeded(self) -> None:
        """Record that a write committed: the database has room again."""
        self._full = None

    def run(self, work: Callable[[psycopg2.extensions.cursor], T], *,
            timeout_ms: int | None = None, transaction: bool = False,
            skip_if_down: bool = False) -> T:
        """Run ``work(cursor)`` on a pooled connection and return its result.

        ``timeout_ms`` is the call's one deadline, in all (connect, wait for a
        connection, statements): past it the call fails on the client side,
        and each statement ``work`` sends carries ``SET LOCAL
        statement_timeout = timeout_ms`` so the server stops too. Without it
        the deadline is ``default_timeout_ms`` and the statement timeout
        ``statement_timeout_ms`` (setting ``DB_STATEMENT_TIMEOUT_MS``).
        ``transaction=True`` runs ``work`` between ``BEGIN`` and ``COMMIT``
        (``ROLLBACK`` when it raises), the statement timeout set once for the
        block. ``skip_if_down=True`` raises :class:`DatabaseUnavailable` at
        once, without trying, while the breaker is open (a call failed and
        none succeeded since): while Postgres is away a request costs one
        spool write, not a deadline's wait; a background probe pings every
        ``breaker_seconds`` meanwhile, so the breaker closes on its own.

        A connection found broken (Neon closes idle ones when its compute
        suspends) is discarded and ``work`` retried once on a fresh
        connection if time is left. Raises :class:`DatabaseUnavailable`
        (:class:`TransactionRolledBack` for a deadlock or serialization
        failure, SQLSTATE class 40, which leaves the breaker closed;
        :class:`DatabaseFull` for SQLSTATE 53100) or
        :class:`DatabaseMisconfigured`; other ``psycopg2.Error`` (a bug in
        our SQL, a constraint) propagate unchanged.
        """
        deadline = time.monotonic() + (
            timeout_ms if timeout_ms is not None else self.default_timeout_ms) / 1000
        if skip_if_down and self.breaker.is_open:
            raise DatabaseUnavailable("skipped: the database failed its last call")
        statement_ms = int(timeout_ms if timeout_ms is not None else self.statement_timeout_ms)
        if transaction:
            def unit(cur: psycopg2.extensions.cursor) -> T:
                with begin_commit(cur):
                    return work(cur)
        else:
            unit = work
        try:
            result = self._run(unit, deadline, f"SET LOCAL statement_timeout = {statement_ms};")
        except TransactionRolledBack:
            raise
        except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
            self._trip(exc)
            raise
        self.breaker.close()
        return result

    def _trip(self, exc: Exception) -> None:
        """Record a full database; open the breaker (its probe closes it)."""
        if isinstance(exc, DatabaseFull):
            if self._full is None:
                log.error("database full: writes are spooled until space is freed "
                          "(retention, a bigger disk or plan)", extra={"error": str(exc)})
            self._full = (time.monotonic(), str(exc))
        if self.breaker.trip():
            log.warning("database unavailable", extra={"error": str(exc)})

    def _run(self, work: Callable[[psycopg2.extensions.cursor], T], deadline: float,
             prefix: str) -> T:
        self._ensure_schema(deadline)
        for may_retry in (True, False):
            conn = self._acquire(deadline)
            token = self._watchdog.watch(conn, deadline)
            try:
                with conn.cursor(cursor_factory=_TimedCursor) as cur:
                    cur.timeout_prefix = prefix
                    result = work(cur)
            except psycopg2.errors.TransactionRollbackError as exc:
                self._watchdog.release(token)
                self._release(conn)
                raise TransactionRolledBack(first_line(exc)) from exc
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                fired = self._watchdog.release(token)
                self._release(conn)
                if fired:
                    raise DatabaseUnavailable(
                        f"no answer within the deadline ({first_line(exc)})") from exc
                if conn.closed and may_retry and time.monotonic() < deadline:
                    log.warning("database connection broke, retrying once",
                                extra={"error": first_line(exc)})
                    continue
                raise classify(exc) from exc
            except BaseException:
                self._watchdog.release(token)
                self._release(conn)
                raise
            if self._watchdog.release(token):
                conn.close()  # answered just in time, but its socket is shut down
            self._release(conn)
            return result
        raise AssertionError("unreachable")

    def ping(self, timeout_ms: int | None = None) -> None:
        """One round trip (``SELECT 1``) within ``timeout_ms``. Raises like :meth:`run`."""
        def select_one(cur: psycopg2.extensions.cursor) -> None:
            cur.execute("SELECT 1")

        self.run(select_one, timeout_ms=timeout_ms)

    def close(self) -> None:
        """Close every idle connection; those in use close when given back."""
        self.breaker.stop()
        with self._lock:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._max = 0
            self._returned.notify_all()
        for conn in idle:
            conn.close()
        if self._connector is not None:
            self._connector.shutdown(wait=False, cancel_futures=True)

    def _connect(self) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(self._dsn, **self._options)
        conn.autocommit = True
        return conn

    def _acquire(self, deadline: float) -> psycopg2.extensions.connection:
        """An idle connection, or a new one if it is ready by ``deadline``.

        With every connection in use, waits for one to come back until
        ``deadline``, then raises ``DatabaseUnavailable``.
        """
        with self._lock:
            while not self._idle and self._open >= self._max:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._max:
                    raise DatabaseUnavailable(f"connection pool exhausted ({self._max} in use)")
                self._returned.wait(remaining)
            if self._idle:
                return self._idle.pop()
            self._open += 1
            if self._connector is None:
                self._connector = ThreadPoolExecutor(2,
                                                     thread_name_prefix="db-connect")
        future = self._connector.submit(self._connect)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            future.add_done_callback(self._adopt)  # a late connection serves the next call
            raise DatabaseUnavailable("no connection within the deadline") from None
        except psycopg2.Error as exc:
            self._forget()
            raise classify(exc) from exc
        except BaseException:
            self._forget()
            raise

    def _adopt(self, future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            self._forget()
        else:
            self._release(future.result())

    def _forget(self) -> None:
        with self._lock:
            self._open -= 1
            self._returned.notify()

    def _release(self, conn: psycopg2.extensions.connection) -> None:
        """Give ``conn`` back; a closed or mid-transaction one is discarded."""
        usable = not conn.closed and conn.info.transaction_status == \
            psycopg2.extensions.TRANSACTION_STATUS_IDLE
        with self._lock:
            self._returned.notify()
            if usable and self._open <= self._max:
                self._idle.append(conn)
                return
            self._open -= 1
        conn.close()

    def _ensure_schema(self, deadline: float) -> None:
        """Pass the schema gate before the first call (see ``migrate.Schema``)."""
        if self.schema.ready:
            return
        conn = self._acquire(deadline)
        token = self._watchdog.watch(conn, deadline)
        try:
            self.schema.ensure(conn)
        finally:
            self._watchdog.release(token)
            self._release(conn)

