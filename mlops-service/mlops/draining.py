"""Draining: the part of a shutdown during which the server still serves but is not ready.

A load balancer (a Kubernetes Service's endpoints, HAProxy's health checks)
stops sending new connections to an instance only after it has seen it go
unready. So on SIGTERM the gunicorn master first sets a flag that every worker
sees, which turns ``/health/ready`` into 503, keeps serving for
``SHUTDOWN_DELAY_SECONDS``, and only then starts gunicorn's graceful stop
(stop accepting, finish in-flight requests, drain the spool).

The flag is one byte of anonymous shared memory, created when this module is
first imported: gunicorn.conf.py imports it in the master, before the workers
are forked, so master and workers share the same byte. In a process that
imports it later (Flask's development server, tests) it is private to that
process, which is all such a process needs.
"""

from __future__ import annotations

import logging
import mmap
import signal
import threading

log = logging.getLogger("mlops")

_flag = mmap.mmap(-1, 1)  # MAP_SHARED | MAP_ANONYMOUS: inherited across fork()


def begin() -> None:
    """Mark this server as draining: ``/health/ready`` answers 503 from now on."""
    _flag[0] = 1


def is_draining() -> bool:
    """True once :func:`begin` ran in this process, its gunicorn master or a worker."""
    return _flag[0] == 1


def delay_sigterm(delay_seconds: float) -> None:
    """gunicorn master (``when_ready``): on SIGTERM, drain for ``delay_seconds``, then stop.

    Wraps the SIGTERM handler gunicorn installed: the first SIGTERM calls
    :func:`begin` and hands the signal on to gunicorn ``delay_seconds`` later
    (at once for 0); further SIGTERMs meanwhile change nothing. SIGINT and
    SIGQUIT keep gunicorn's immediate stop. A reload (HUP) retires old workers
    with their own SIGTERM, which never reaches this handler, so it does not
    drain the server.
    """
    gunicorn_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        if is_draining():
            return
        begin()
        if delay_seconds <= 0:
            gunicorn_handler(signum, frame)
            return
        # No logging inside a signal handler (it may interrupt a log call).
        timer = threading.Timer(delay_seconds, stop_after_drain, (signum,))
        timer.daemon = True
        timer.start()

    def stop_after_drain(signum):
        log.info("drained; stopping", extra={"shutdown_delay_seconds": delay_seconds})
        gunicorn_handler(signum, None)

    signal.signal(signal.SIGTERM, on_sigterm)
