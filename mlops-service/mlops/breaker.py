"""A circuit breaker: open after a failure, closed again by a background probe.

While it is open, callers that ask to (``skip_if_down``) fail at once
instead of waiting for a deadline; one thread calls the probe every
``interval_seconds`` until a call succeeds and :meth:`Breaker.close` runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from .background import Loop


class Breaker:
    """Open from :meth:`trip` until :meth:`close`; one probe thread runs while it is open.

    ``probe`` is called every ``interval_seconds`` (in its own thread, named
    ``thread_name``) while the breaker is open; it closes the breaker by
    succeeding through a path that calls :meth:`close`. Exceptions of
    ``expected`` from it are ignored (the probing goes on); :meth:`stop`
    ends the probing for good.
    """

    def __init__(self, probe: Callable[[], object], interval_seconds: float, *,
                 expected: tuple[type[BaseException], ...] = (Exception,),
                 thread_name: str = "breaker-probe") -> None:
        self._probe = probe
        self._interval = interval_seconds
        self._expected = expected
        self._thread_name = thread_name
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._stopped = False
        self._prober: Loop | None = None  # guarded by _lock

    @property
    def is_open(self) -> bool:
        """True from a failure until a call succeeds."""
        return self._open.is_set()

    @property
    def probing(self) -> bool:
        """True while the probe thread runs."""
        return self._prober is not None

    def trip(self) -> bool:
        """Open the breaker and make sure a probe runs; True if it was closed until now."""
        with self._lock:
            if self._open.is_set():
                return False
            self._open.set()
            if self._prober is None and not self._stopped:
                self._prober = Loop(self._thread_name, self._probe_pass)
                self._prober.start()
            return True

    def close(self) -> None:
        """A call succeeded: callers may try again; the probe thread ends."""
        self._open.clear()

    def stop(self) -> None:
        """End the probing for good (the owner is closing)."""
        with self._lock:
            self._stopped = True

    def _probe_pass(self) -> None:
        """One pass of the probe thread: end it if closed or stopped, else wait and probe."""
        with self._lock:
            prober = self._prober
            if not self._open.is_set() or self._stopped:
                self._prober = None
                prober.stop()  # the last pass
                return
        prober.wait(self._interval)
        with contextlib.suppress(*self._expected):
            self._probe()
