"""Helpers shared by the test modules.

* ``wait_until(condition, what)``: the one way a test waits for something to
  become true. It polls, returns the condition's first truthy value, and on
  timeout raises AssertionError naming what it waited for and the last value
  (or exception) the condition gave.
* ``holds_for(condition, what, seconds)``: that something stays true for a
  while, checked throughout, for what must not happen and has no positive
  signal to wait for.
* ``wait_for_ok(url)``: seconds until ``url`` answers 200 (a server starting).
* ``docker(*args)``: the docker CLI, failing with its output.
* ``spool_depth(url)`` / ``wait_drained(url)``: a running service's spool, as
  ``/health/detailed`` reports it.

The fixtures (``app``, ``make_app``, ``client``, ``gunicorn``, ``pg``,
``proxy``, ...) are in conftest.py.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

import requests

T = TypeVar("T")

# Long enough for a loaded 2-core machine; a wait returns as soon as its
# condition holds, so a generous timeout costs nothing when things work.
TIMEOUT_SECONDS = 30.0
INTERVAL_SECONDS = 0.05


def wait_until(condition: Callable[[], T], what: str, timeout: float = TIMEOUT_SECONDS,
               interval: float = INTERVAL_SECONDS,
               retry_on: type[BaseException] | tuple[type[BaseException], ...] = ()) -> T:
    """Call ``condition()`` every ``interval`` s until it returns something truthy.

    Returns that value. ``retry_on``: exception types that count as "not yet"
    (e.g. ``requests.RequestException`` while a server starts); any other
    exception propagates at once. After ``timeout`` s raises AssertionError
    ``"timed out after <timeout> s waiting for <what> (last: <value or
    exception>)"``. The condition is always called at least once, and once more
    after the deadline, so a slow single call cannot cause a false timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        expired = time.monotonic() >= deadline
        try:
            last = condition()
        except retry_on as exc:
            last = exc
        else:
            if last:
                return last
        if expired:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} "
                                 f"(last: {last!r})")
        time.sleep(interval)


def holds_for(condition: Callable[[], object], what: str, seconds: float,
              interval: float = INTERVAL_SECONDS) -> None:
    """Check ``condition()`` every ``interval`` s for ``seconds`` s: it must stay truthy.

    For what must *not* happen over a stretch of time (no side effect has a
    positive signal to wait for): raises AssertionError naming ``what`` and the
    value at the first call that gave something falsy.
    """
    deadline = time.monotonic() + seconds
    while True:
        expired = time.monotonic() >= deadline
        value = condition()
        if not value:
            raise AssertionError(f"{what} stopped holding (got {value!r})")
        if expired:
            return
        time.sleep(interval)


def spool_depth(url: str, headers: dict[str, str] | None = None) -> int:
    """Events in the spool of the service at ``url`` (from ``/health/detailed``)."""
    return requests.get(f"{url}/health/detailed", headers=headers,
                        timeout=5).json()["spool"]["depth"]


def wait_drained(url: str, timeout: float = 60.0, headers: dict[str, str] | None = None) -> None:
    """Wait until the spool of the service at ``url`` is empty."""
    wait_until(lambda: spool_depth(url, headers) == 0, f"the spool of {url} to drain",
               timeout=timeout, interval=0.1)


def wait_for_ok(url: str, timeout: float = 60.0) -> float:
    """Seconds until a GET of ``url`` answered 200 (connection refused: not yet)."""
    started = time.monotonic()
    wait_until(lambda: requests.get(url, timeout=2).status_code == 200, f"{url} to answer 200",
               timeout=timeout, interval=0.2, retry_on=requests.ConnectionError)
    return time.monotonic() - started


def docker(*args: str, timeout: float = 600, check: bool = True, **kwargs):
    """Run the docker CLI; return the completed process (text output).

    ``check``: raise AssertionError with its output if it exits non-zero.
    """
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                            **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result
