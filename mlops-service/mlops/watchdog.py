"""One OS thread that shuts down the socket of a database call past its deadline.

``statement_timeout`` is enforced by the server, so it cannot help when the
server never hears the query (a network partition, a frozen pooler). The
watchdog enforces each call's deadline on the client side:
``shutdown(SHUT_RDWR)`` on the connection's socket wakes the thread or
greenlet blocked in libpq, which then fails with an ``OperationalError`` and
marks the connection closed, so the pool discards it.
"""

from __future__ import annotations

import _socket
import contextlib
import itertools
import os
import time

import psycopg2
import psycopg2.extensions
from gevent.monkey import get_original

# The unpatched thread primitives (gevent's worker patches ``threading`` and
# ``_thread`` into greenlets; ``get_original`` gives the originals whether or
# not they were patched).
_start_thread, _allocate_lock = get_original("_thread", ["start_new_thread", "allocate_lock"])

# The wake-up time with nothing to watch.
_NEVER = float("inf")


class Watchdog:
    """Shuts down the socket of a call still running past its deadline.

    It is a real OS thread with real locks even in gevent's worker, where
    ``threading`` is patched into greenlets: a COPY (``mlops.db.copy_from``)
    blocks the worker's greenlets, and its deadline must still hold. The
    thread starts with the first :meth:`watch`.
    """

    def __init__(self) -> None:
        self._lock = _allocate_lock()  # guards the fields below
        self._wake = _allocate_lock()  # released to wake the thread before its time
        self._wake.acquire()
        self._calls: dict[int, tuple[float, psycopg2.extensions.connection]] = {}
        self._fired: set[int] = set()
        self._tokens = itertools.count()
        self._wake_at = _NEVER
        self._started = False

    def watch(self, conn: psycopg2.extensions.connection, deadline: float) -> int:
        """Start watching ``conn`` until ``deadline`` (``time.monotonic()``); return a token."""
        with self._lock:
            if not self._started:
                self._started = True
                _start_thread(self._loop, ())
            token = next(self._tokens)
            self._calls[token] = (deadline, conn)
            sooner = deadline < self._wake_at
            if sooner:
                self._wake_at = deadline
        if sooner:
            with contextlib.suppress(RuntimeError):  # already woken
                self._wake.release()
        return token

    @property
    def pending(self) -> int:
        """Calls watched, plus calls whose deadline fired and whose token is not released
        yet: 0 once every call has ended."""
        with self._lock:
            return len(self._calls) + len(self._fired)

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
                    if deadline <= now:
                        del self._calls[token]
                        self._fired.add(token)
                        shut_down(conn)
                self._wake_at = min((d for d, _ in self._calls.values()), default=_NEVER)
                timeout = -1 if self._wake_at == _NEVER else self._wake_at - now
            self._wake.acquire(timeout=timeout)


def shut_down(conn: psycopg2.extensions.connection) -> None:
    """``shutdown(SHUT_RDWR)`` on ``conn``'s socket; errors (already closed) are ignored."""
    with contextlib.suppress(OSError, psycopg2.Error):
        sock = _socket.socket(fileno=os.dup(conn.fileno()))  # the C type: gevent never patches it
        try:
            sock.shutdown(_socket.SHUT_RDWR)
        finally:
            sock.close()
