"""What every connection to PostgreSQL shares: its libpq options and the error kinds.

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

import contextlib
from collections.abc import Iterator

import psycopg2
import psycopg2.extensions

from .config import Settings

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

# SQLSTATE of disk_full (PostgreSQL manual, Appendix A, class 53).
DISK_FULL = "53100"


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
        return DatabaseFull(first_line(exc))
    message = " ".join(str(exc).split()).lower()
    if isinstance(exc, psycopg2.OperationalError) and any(m in message for m in _PERMANENT):
        return DatabaseMisconfigured(first_line(exc))
    return DatabaseUnavailable(first_line(exc))


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none."""
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


@contextlib.contextmanager
def transaction(cur: psycopg2.extensions.cursor) -> Iterator[None]:
    """``BEGIN`` … ``COMMIT`` around the block on an autocommit connection's cursor.

    An error in the block (or in ``COMMIT``) sends ``ROLLBACK`` when the
    connection is still open and propagates unchanged.
    """
    cur.execute("BEGIN")
    try:
        yield
        cur.execute("COMMIT")
    except BaseException:
        if not cur.connection.closed:
            with contextlib.suppress(psycopg2.Error):  # keep the original error
                cur.execute("ROLLBACK")
        raise
