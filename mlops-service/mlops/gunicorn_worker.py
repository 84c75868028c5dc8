"""A gthread worker that resets no client connection when it shuts down.

gunicorn's ThreadWorker, told to stop, stops polling its listening socket,
waits for in-flight requests and only then closes the socket. Connections
the kernel queued on that socket in the meantime are reset when it closes:
the client sees "connection reset" for a request the server never read,
which the chat app counts as a lost event.

This worker, when it stops accepting, first accepts (and will answer) every
connection already queued, then closes its copy of the listening socket at
once. Once every process has closed it, new connections are refused, which
clients handle as "server down" rather than a broken request.
"""

from __future__ import annotations

from gunicorn.workers.gthread import ThreadWorker


class DrainingThreadWorker(ThreadWorker):
    """``worker_class = "mlops.gunicorn_worker.DrainingThreadWorker"``."""

    def set_accept_enabled(self, enabled: bool) -> None:
        """As gunicorn's, plus: on shutdown, drain the accept queue and close the listener."""
        super().set_accept_enabled(enabled)
        if enabled or self.alive:
            return
        for listener in self.sockets:
            while True:  # the listener is non-blocking: accept() stops at EAGAIN
                accepted = self.nr_conns
                self.accept(listener)
                if self.nr_conns == accepted:
                    break
            listener.close()
