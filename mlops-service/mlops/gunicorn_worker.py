"""The service's gunicorn worker: gevent, with psycopg2 made cooperative, resetting no client.

gevent runs every request of a worker as a greenlet on one thread, so a
worker holds many requests at once for the cost of a greenlet switch, not a
thread hand-off under the GIL. That is what lets the group commit
(``mlops.deliver.GroupCommit``) share one transaction among many concurrent
``/track`` calls (measurements: ``bench/layouts.md``). psycopg2 waits
through gevent too (``psycogreen``), so a request waiting on Postgres does
not hold up the others.

gunicorn's own gevent worker, told to stop, closes its listening socket
while connections the kernel has already queued on it are still waiting:
each is reset, and the client sees "connection reset" for a request the
server never read, which the chat app counts as a lost event. This worker
first accepts (and will answer) every connection already queued, then
closes its copy of the listening socket. Once every process has closed it,
new connections are refused, which clients handle as "server down" rather
than a broken request.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import warnings
from functools import partial

import gevent
import psycogreen.gevent
from gevent.monkey import MonkeyPatchWarning
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker

# How often a serving worker checks whether it was told to stop, and a stopping
# worker whether its last requests have finished (gunicorn's own worker: 1 s).
_POLL_SECONDS = 0.05


class DrainingGeventWorker(GeventWorker):
    """``worker_class = "mlops.gunicorn_worker.DrainingGeventWorker"``."""

    def init_process(self) -> None:
        """As gunicorn's, with the stop signals handled from this method's first line.

        gunicorn installs the worker's handlers (``init_signals``) only after
        gevent has patched the process, which takes a while on a busy machine;
        until then a SIGTERM, SIGINT or SIGQUIT reaches the handler copied from the
        master at the fork, which queues it in the master's (copied) queue:
        the worker never learns it should stop, boots, serves, and is
        killed only when ``graceful_timeout`` runs out. A worker told to stop
        while booting now stops as soon as it has booted.
        """
        for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(stop, self.handle_exit)
        super().init_process()

    def patch(self) -> None:
        """As gunicorn's (gevent's ``patch_all``), plus psycopg2's wait callback (psycogreen).

        gevent warns that ``ssl`` was imported before it patched it: gunicorn's
        master always imports it (``gunicorn.sock``), before any worker
        exists. The service makes no TLS connection through Python's ``ssl``
        (libpq has its own), so the warning is silenced.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=MonkeyPatchWarning)
            super().patch()
        psycogreen.gevent.patch_psycopg()

    def handle_request(self, listener_name, req, sock, addr) -> bool:
        """As gunicorn's, then yield to the worker's other greenlets before the next request.

        On a keep-alive connection whose client sends again at once, the next
        request is often already in the socket when this one ends, so the
        read does not wait and one connection could be served many times
        while the others wait: with wrk's 32 connections, /health's p99 read
        350-1,000 ms against a p50 of 0.5 ms. Yielding here serves them in
        turn (p99 24-34 ms), and lets more /track calls join each group commit.
        """
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            gevent.sleep(0)

    def run(self) -> None:
        """Serve until told to stop; then drain the accept queue, close, finish in-flight requests.

        As gunicorn's ``GeventWorker.run``, except that it accepts the
        connections already queued before closing a listener, and checks for
        a stop signal and then for the end of the last requests every 50 ms
        rather than every second: a stop takes up to 1 s less, so a restart
        or rolling update refuses connections for less time. Requests still
        running after ``graceful_timeout`` are killed, as gunicorn does.
        """
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        servers = []
        for listener in self.sockets:
            listener.setblocking(1)
            # The handler gets the listener's address, not the socket, so that a
            # connection accepted just before the socket closes is still served.
            handle = partial(self.handle, _ListenerAddress(listener.getsockname()))
            server = StreamServer(listener, handle=handle,
                                  spawn=Pool(self.worker_connections), **ssl_args)
            if self.cfg.workers > 1:
                server.max_accept = 1  # share the queue with the other workers
            server.start()
            servers.append(server)

        while self.alive:
            self.notify()
            gevent.sleep(_POLL_SECONDS)

        for server in servers:  # nothing runs between the last accept and the close
            _accept_queued(server)
            server.close()
        stop_at = time.monotonic() + self.cfg.graceful_timeout
        while any(s.pool.free_count() != s.pool.size for s in servers):
            if time.monotonic() >= stop_at:
                self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
                for server in servers:
                    server.stop(timeout=1)
                return
            self.notify()
            gevent.sleep(_POLL_SECONDS)


class _ListenerAddress:
    """What gunicorn's connection handler asks of its listener: its address.

    ``AsyncWorker.handle`` calls ``listener.getsockname()`` once a
    connection is under way; on a closed socket that fails (EBADF) and the
    connection is dropped.
    """

    def __init__(self, address: object) -> None:
        self._address = address

    def getsockname(self) -> object:
        """The listener's address, as ``socket.getsockname()`` gave it when serving began."""
        return self._address


def _accept_queued(server: StreamServer) -> None:
    """Stop accepting new work on ``server``'s listener, after taking every connection queued."""
    server.stop_accepting()
    server.socket.setblocking(False)
    while accepted := server.do_read():  # None once accept() would block
        server.do_handle(*accepted)


def exit_now_if_clean(clean_exit: type[BaseException]) -> None:
    """End this process at once, skipping interpreter teardown, if it is leaving cleanly.

    Called last in gunicorn's ``worker_exit`` (worker) and ``on_exit`` (master)
    hooks, which run while gunicorn raises the exception that ends the
    process: ``SystemExit(0)`` for a worker that stopped normally,
    ``StopIteration`` for a master stopped by SIGTERM or SIGINT. The listener
    is already closed then, so the interpreter's teardown of modules and
    threads (0.3 to 0.9 s per process, measured on 2 busy cores) is time
    during which a stop-then-start restart refuses every connection. Logs are
    flushed first. Any other exit (a failed boot, a halted master, a non-zero
    code) returns and takes gunicorn's own path with its exit status.
    """
    pending = sys.exc_info()[1]
    if not isinstance(pending, clean_exit):
        return
    if isinstance(pending, SystemExit) and pending.code not in (0, None):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
