"""The PostgreSQL connection life-cycle: one pool per process, created after fork.

Connections run in autocommit mode; each unit of work is one SQL string, so
one round trip, and a statement timeout rides along as ``SET LOCAL`` in that
same string (``options=-c ...`` would not survive Neon's PgBouncer pooler,
which runs in transaction mode and keeps no session state).

Every call has a deadline, enforced here, on the client side:
``statement_timeout`` is enforced by the server, so it cannot help when the
server never hears the query (a network partition, a frozen pooler). A
watchdog thread shuts down the socket of a call that outlives its deadline,
which makes libpq's blocked read return at once; a connection that is not
ready in time is left to finish in the background and joins the pool.

Errors are sorted into two kinds:

* :class:`DatabaseUnavailable` — transient (refused, deadline passed, server
  shutting down, Neon waking up, pool exhausted). Callers spool and retry.
* :class:`DatabaseMisconfigured` — permanent (wrong password, TLS refused,
  unknown database). Start-up fails fast on these with one line.

A full database (SQLSTATE 53100 ``disk_full``: the disk, or Neon's project
size limit) is an outage, :class:`DatabaseFull`, a kind of
``DatabaseUnavailable``: writes spool until space is freed.
"""

from __future__ import annotations

import _socket
import contextlib
import contextvars
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from gevent.monkey import get_original

from . import migrate
from .config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# The unpatched thread primitives, for the watchdog (gevent's worker patches
# ``threading`` and ``_thread`` into greenlets; ``get_original`` gives the originals
# whether or not they were patched).
_start_thread, _allocate_lock = get_original("_thread", ["start_new_thread", "allocate_lock"])

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


# The watchdog's wake-up time with nothing to watch.
_NEVER = float("inf")


class DatabaseUnavailable(Exception):
    """Postgres cannot be reached or answered too slowly; worth retrying later."""


class DatabaseMisconfigured(Exception):
    """The connection settings are wrong; retrying will not help."""


class DatabaseFull(DatabaseUnavailable):
    """Postgres refused to grow a table: its disk, or the project's size limit, is full.

    SQLSTATE 53100 ``disk_full`` (PostgreSQL manual, Appendix A): "could not
    extend file ...: No space left on device" from a self-hosted server,
    "could not extend file because project size limit (N MB) has been
    exceeded" from Neon. Reads still work; writes succeed again once space
    is freed (retention, a bigger volume or plan), so callers spool and retry.
    """


# SQLSTATE of disk_full (PostgreSQL manual, Appendix A, class 53).
DISK_FULL = "53100"

# Seconds a process keeps reporting the database full after its last write
# refused for that reason (a successful write ends it at once). The outbox's
# flusher retries at least every BACKOFF_MAX_SECONDS (10 s) while events wait,
# so a process that keeps seeing the refusal keeps reporting it.
FULL_REPORT_SECONDS = 30.0
class TransactionRolledBack(DatabaseUnavailable):
    """Postgres rolled the transaction back to end a deadlock or a serialization
    conflict (SQLSTATE class 40, PostgreSQL manual Appendix A); running it
    again normally succeeds. The database itself is fine: the breaker stays closed."""


def classify(exc: psycopg2.Error) -> Exception:
    """Map a psycopg2 error raised while connecting or querying to our kinds.

    SQLSTATE 53100 gives :class:`DatabaseFull`; connection errors no retry
    will fix give :class:`DatabaseMisconfigured`; the rest
    :class:`DatabaseUnavailable`.
    """
    if getattr(exc, "pgcode", None) == DISK_FULL:
        return DatabaseFull(_first_line(exc))
    message = " ".join(str(exc).split()).lower()
    if isinstance(exc, psycopg2.OperationalError) and any(m in message for m in _PERMANENT):
        return DatabaseMisconfigured(_first_line(exc))
    return DatabaseUnavailable(_first_line(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def connect_options(settings: Settings) -> dict:
    """libpq options for every connection of the service.

    Keepalives find a dead idle connection within ``30 + 3 × 10`` s;
    ``tcp_user_timeout`` closes one whose sent data stays unacknowledged
    (libpq parameters, PostgreSQL manual §34.1.2).
    """
    return {
        "connect_timeout": settings.db_connect_timeout_seconds,
        "application_name": "mlops-service",
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": settings.db_statement_timeout_ms + 1000,
    }


class _Watchdog:
    """Shuts down the socket of a call still running past its deadline.

    ``shutdown(SHUT_RDWR)`` on the connection's socket wakes the thread or
    greenlet blocked in libpq, which then fails with an ``OperationalError``
    and marks the connection closed, so the pool discards it.

    It is a real OS thread with real locks even in gevent's worker, where
    ``threading`` is patched into greenlets: a COPY (:func:`copy_from`)
    blocks the worker's greenlets, and its deadline must still hold.
    """

    def __init__(self) -> None:
        self._lock = _allocate_lock()  # guards the fields below
        self._wake = _allocate_lock()  # released to wake the thread before its time
        self._wake.acquire()
        self._calls: dict[int, tuple[float, psycopg2.extensions.connection]] = {}
        self._fired: set[int] = set()
        self._next = 0  # pragma: no mutate - any start keeps tokens unique
        self._wake_at = _NEVER
        self._started = False

    def watch(self, conn: psycopg2.extensions.connection, deadline: float) -> int:
        """Start watching ``conn`` until ``deadline`` (``time.monotonic()``); return a token."""
        with self._lock:
            if not self._started:
                self._started = True
                _start_thread(self._loop, ())
            self._next += 1  # pragma: no mutate - any other step keeps tokens unique
            self._calls[self._next] = (deadline, conn)
            sooner = deadline < self._wake_at  # pragma: no mutate - <= only adds a spare wake-up
            if sooner:
                self._wake_at = deadline
            token = self._next
        if sooner:
            with contextlib.suppress(RuntimeError):  # already woken
                self._wake.release()
        return token

    def release(self, token: int) -> bool:
        """Stop watching; True if the deadline passed and the socket was shut down."""
        with self._lock:
            self._calls.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def _loop(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                for token, (deadline, conn) in list(self._calls.items()):
                    if deadline <= now:  # pragma: no mutate - with <, the next pass fires it
                        del self._calls[token]
                        self._fired.add(token)
                        _shut_down(conn)
                self._wake_at = min((d for d, _ in self._calls.values()), default=_NEVER)
                timeout = -1 if self._wake_at == _NEVER else self._wake_at - now
            self._wake.acquire(timeout=timeout)


def _shut_down(conn: psycopg2.extensions.connection) -> None:
    with contextlib.suppress(OSError, psycopg2.Error):
        sock = _socket.socket(fileno=os.dup(conn.fileno()))  # the C type: gevent never patches it
        try:
            sock.shutdown(_socket.SHUT_RDWR)
        finally:
            sock.close()


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


_deadline: contextvars.ContextVar[tuple[float, bool] | None] = contextvars.ContextVar(
    "mlops_db_deadline", default=None)


class Database:
    """A lazily-filled connection pool with deadlines, a circuit breaker and the schema gate.

    Create it inside the worker process (the app factory runs there), never
    before gunicorn forks: a libpq connection must not be shared across fork.
    """

    def __init__(self, settings: Settings, *, breaker_seconds: float = 1.0) -> None:
        self._dsn = settings.database_url
        self._options = connect_options(settings)
        self._migrations_dir = settings.migrations_dir
        self._max = settings.db_pool_size
        self._idle: list[psycopg2.extensions.connection] = []
        self._open = 0
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)  # a connection came back or was dropped
        self._connector: ThreadPoolExecutor | None = None
        self._watchdog = _Watchdog()
        self._breaker_seconds = breaker_seconds
        self._down = threading.Event()  # set from a failed call until a call succeeds
        self._prober: threading.Thread | None = None
        # (time.monotonic(), message) of the last write refused for lack of space
        self._full: tuple[float, str] | None = None
        self._schema_ready = migrate.is_current(settings.database_url, self._migrations_dir)
        self._schema_lock = threading.Lock()
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

    @contextlib.contextmanager
    def deadline(self, timeout_ms: int, *, skip_if_down: bool = False) -> Iterator[None]:
        """Bound every :meth:`run` inside the block to ``timeout_ms`` in all.

        With ``skip_if_down``, a call made after a failure raises
        :class:`DatabaseUnavailable` at once instead of trying, until some
        call succeeds: while Postgres is away a request costs one spool
        write, not a deadline's wait. A background probe pings every
        ``breaker_seconds`` meanwhile, so the breaker closes on its own.
        """
        token = _deadline.set((time.monotonic() + timeout_ms / 1000, skip_if_down))
        try:
            yield
        finally:
            _deadline.reset(token)

    def run(self, work: Callable[[psycopg2.extensions.cursor], T]) -> T:
        """Run ``work(cursor)`` on a pooled connection and return its result.

        The call ends by its deadline (see :meth:`deadline`; otherwise
        ``default_timeout_ms``). A connection found broken (Neon closes idle
        ones when its compute suspends) is discarded and ``work`` retried
        once on a fresh connection if time is left. Raises
        :class:`DatabaseUnavailable` (:class:`TransactionRolledBack` for a
        deadlock or serialization failure, which leaves the breaker closed)
        or :class:`DatabaseMisconfigured`; other
        ``psycopg2.Error`` (a bug in our SQL, a constraint) propagate unchanged.
        """
        limit = _deadline.get()
        if limit is None:
            deadline, skip_if_down = time.monotonic() + self.default_timeout_ms / 1000, False
        else:
            deadline, skip_if_down = limit
        if skip_if_down and self._down.is_set():
            raise DatabaseUnavailable("skipped: the database failed its last call")
        try:
            result = self._run(work, deadline)
        except TransactionRolledBack:
            raise
        except (DatabaseUnavailable, DatabaseMisconfigured) as exc:
            self._trip(exc)  # pragma: no mutate - exc only feeds the log line
            raise
        self._down.clear()
        return result

    def _trip(self, exc: Exception) -> None:
        """Open the breaker and make sure a probe is running to close it."""
        with self._lock:
            if isinstance(exc, DatabaseFull):
                if self._full is None:
                    log.error("database full: writes are spooled until space is freed "
                              "(retention, a bigger disk or plan)", extra={"error": str(exc)})
                self._full = (time.monotonic(), str(exc))
            if self._down.is_set():
                return
            self._down.set()
            log.warning("database unavailable", extra={"error": str(exc)})  # pragma: no mutate
            if self._prober is None:
                # Not mutated: the thread's name and daemon flag.
                prober = threading.Thread(target=self._probe, daemon=True)  # pragma: no mutate
                prober.name = "db-probe"  # pragma: no mutate
                self._prober = prober
                self._prober.start()

    def _probe(self) -> None:
        while True:
            with self._lock:
                if not self._down.is_set() or not self._max:
                    self._prober = None
                    return
            time.sleep(self._breaker_seconds)
            with contextlib.suppress(DatabaseUnavailable, DatabaseMisconfigured):
                self.ping()

    def _run(self, work: Callable[[psycopg2.extensions.cursor], T], deadline: float) -> T:
        self._ensure_schema(deadline)
        for attempt in (1, 2):  # pragma: no mutate - only attempt 1 is compared
            conn = self._acquire(deadline)
            token = self._watchdog.watch(conn, deadline)
            try:
                with conn.cursor() as cur:
                    result = work(cur)
            except psycopg2.errors.TransactionRollbackError as exc:
                self._watchdog.release(token)
                self._release(conn)
                raise TransactionRolledBack(_first_line(exc)) from exc
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                fired = self._watchdog.release(token)
                self._release(conn)
                if fired:
                    raise DatabaseUnavailable(
                        f"no answer within the deadline ({_first_line(exc)})") from exc
                if conn.closed and attempt == 1 and time.monotonic() < deadline:
                    extra = {"error": _first_line(exc)}  # pragma: no mutate
                    log.warning("database connection broke, retrying once",  # pragma: no mutate
                                extra=extra)
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
        raise AssertionError("unreachable")  # pragma: no mutate

    def timeout_prefix(self) -> str:
        """SQL to prepend to a unit of work so it cannot outlive the statement timeout."""
        return f"SET LOCAL statement_timeout = {int(self.statement_timeout_ms)};"

    def ping(self) -> None:
        """One round trip (``SELECT 1``). Raises like :meth:`run`."""
        # Not mutated: "select 1" (SQL's case) is the same statement.
        self.run(lambda cur: cur.execute(self.timeout_prefix() + "SELECT 1"))  # pragma: no mutate

    def close(self) -> None:
        """Close every idle connection; those in use close when given back."""
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
                if remaining <= 0 or not self._max:  # pragma: no mutate - < 0 waits 0 s more
                    raise DatabaseUnavailable(f"connection pool exhausted ({self._max} in use)")
                self._returned.wait(remaining)
            if self._idle:
                return self._idle.pop()
            self._open += 1
            if self._connector is None:
                name = "db-connect"  # pragma: no mutate
                self._connector = ThreadPoolExecutor(  # pragma: no mutate - the threads' name
                    2, thread_name_prefix=name)
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
        """Migrate before the first call if the start-up check could not (database was away)."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            conn = self._acquire(deadline)
            token = self._watchdog.watch(conn, deadline)
            try:
                migrate.apply(conn, self._migrations_dir)
            except migrate.MigrationFailed as exc:
                extra = {"error": str(exc)}  # pragma: no mutate
                log.error("migration failed; spooling until it is fixed",  # pragma: no mutate
                          extra=extra)
                raise DatabaseUnavailable(str(exc)) from exc
            except psycopg2.Error as exc:
                raise classify(exc) from exc
            finally:
                self._watchdog.release(token)
                self._release(conn)
            self._schema_ready = True
            migrate.mark_current(self._dsn, self._migrations_dir)


class MigrationError(Exception):
    """A migration file failed at start; ``str(error)`` is one line naming it."""


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
        conn.autocommit = True  # pragma: no mutate - apply() begins and commits explicitly
        migrate.apply(conn, settings.migrations_dir)
    except migrate.MigrationFailed as exc:
        raise MigrationError(str(exc)) from None
    except psycopg2.Error as exc:
        error = classify(exc)
        if isinstance(error, DatabaseFull):
            return f"unavailable: database full, migrations wait for space: {error}"
        return f"unavailable: {error}"
    finally:
        conn.close()
    migrate.mark_current(settings.database_url, settings.migrations_dir)
    return "ready"
