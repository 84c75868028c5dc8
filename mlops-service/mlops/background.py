"""Background threads: a loop of passes with its stop, wake-up and join; a one-shot call.

:class:`Loop` runs ``step`` over and over in one named daemon thread until
:meth:`Loop.stop`; the step waits between passes through :meth:`Loop.wait`
(ends early on stop) or :meth:`Loop.idle` (ends early on :meth:`Loop.wake`
too). An exception a step lets out ends the thread (``threading.excepthook``
reports it): each user catches what it means to survive. Built on
``threading``, so in gevent's worker, where ``threading`` is patched, these
are greenlets (``mlops.watchdog`` needs an OS thread there and starts its own).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def start_thread(name: str, function: Callable[[], object]) -> threading.Thread:
    """Call ``function()`` once in a new daemon thread named ``name``; return the started thread."""
    thread = threading.Thread(target=function, name=name, daemon=True)
    thread.start()
    return thread


class Loop:
    """One daemon thread named ``name`` calling ``step()`` until :meth:`stop`.

    The thread starts with the first :meth:`start`; a step may call
    :meth:`stop` itself to make its pass the last.
    """

    def __init__(self, name: str, step: Callable[[], object]) -> None:
        self.name = name
        self._step = step
        self._lock = threading.Lock()  # guards _thread
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def start(self) -> bool:
        """Start the thread unless started before (thread-safe); True if this call started it."""
        with self._lock:
            if self._thread is not None:
                return False
            self._thread = start_thread(self.name, self._run)
            return True

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, ending early once stop is asked; True if it was."""
        return self._stop.wait(seconds)

    def idle(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, ending early on :meth:`wake` or stop; True if stop was asked.

        A wake-up given while the loop was not idling ends its next idle at once;
        each idle consumes the wake-ups given before it returns.
        """
        self._wake.wait(seconds)
        self._wake.clear()
        return self._stop.is_set()

    def wake(self) -> None:
        """End the loop's current (or next) :meth:`idle` now."""
        self._wake.set()

    def stop(self, join_seconds: float = 0.0) -> bool:
        """Ask the loop to end after its current pass; wait up to ``join_seconds`` for that.

        Returns True if the thread has ended (or never started). Called from the
        loop's own thread, it returns at once (False).
        """
        self._stop.set()
        self._wake.set()
        with self._lock:
            thread = self._thread
        if thread is None:
            return True
        if thread is threading.current_thread():
            return False
        thread.join(timeout=join_seconds)
        return not thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._step()
