"""Request bodies: how many bytes of one are read, and for how long.

Every route that takes a body reads it through :func:`read_body`, with that
route's cap; ``MAX_CONTENT_LENGTH`` (the largest route cap, set by
``create_app``) covers anything else werkzeug might read. A cap holds before
a byte is parsed: a ``Content-Length`` over it is refused without reading,
and a chunked body is read up to the cap plus one byte, so an over-long one
is refused with 413 rather than cut short and parsed.

:class:`ReadDeadline` bounds the time: a body must have arrived in full
within ``BODY_READ_TIMEOUT_SECONDS`` of the request reaching the app, or the
request is answered 408. gunicorn already cuts slow headers (its keep-alive
timeout), but not a body sent a byte at a time, and such a socket would hold
one of a worker's connection slots for as long as the client liked.
"""

from __future__ import annotations

import time

import gevent
from flask import request
from werkzeug.exceptions import RequestEntityTooLarge, RequestTimeout, UnsupportedMediaType

# Bytes. POST /refresh-metrics takes {"trigger": "<at most 64 characters>"}.
REFRESH_BODY_BYTES = 1024


def read_body(limit: int, *, json: bool = True) -> bytes:
    """The request's raw body: at most ``limit`` bytes.

    Raises werkzeug's ``UnsupportedMediaType`` (415) when ``json`` and the
    ``Content-Type`` is not JSON, ``RequestEntityTooLarge`` (413) past
    ``limit`` bytes, whether the length was declared or the body chunked,
    and ``RequestTimeout`` (408) past the read deadline (:class:`ReadDeadline`).
    """
    if json and not request.is_json:
        raise UnsupportedMediaType("Content-Type must be application/json")
    # One byte over the cap tells a chunked body that ends at the cap from one
    # that goes on: werkzeug stops reading a chunked stream at the cap silently.
    request.max_content_length = limit + 1
    data = request.get_data(cache=False)
    if len(data) > limit:
        raise RequestEntityTooLarge(f"the body must be at most {limit} bytes")
    return data


class ReadDeadline:
    """WSGI middleware: a request's body must be read within ``seconds`` of its arrival.

    Wraps ``wsgi.input`` so that each read waits at most until the deadline;
    then it raises werkzeug's ``RequestTimeout``, which the app answers as a
    JSON 408. The wait is gevent's (``gevent.Timeout``), which interrupts a
    read blocked on a socket of gunicorn's gevent worker; with an in-memory
    body (Flask's test client) no read ever waits.
    """

    def __init__(self, app, seconds: float) -> None:
        self._app = app
        self._seconds = seconds

    def __call__(self, environ, start_response):
        environ["wsgi.input"] = _DeadlineStream(environ["wsgi.input"],
                                                time.monotonic() + self._seconds,
                                                self._seconds)
        return self._app(environ, start_response)


class _DeadlineStream:
    """A WSGI input stream whose reads end at ``deadline`` (``time.monotonic()`` seconds)."""

    def __init__(self, stream, deadline: float, seconds: float) -> None:
        self._stream = stream
        self._deadline = deadline
        self._seconds = seconds

    def _call(self, method, *args):
        remaining = self._deadline - time.monotonic()
        timeout = RequestTimeout(f"the body did not arrive within {self._seconds:g} s")
        if remaining <= 0:
            raise timeout
        with gevent.Timeout(remaining, timeout):
            return method(*args)

    def read(self, size: int = -1) -> bytes:
        """As ``wsgi.input.read``, ending at the deadline (408)."""
        return self._call(self._stream.read, size)

    def readline(self, size: int = -1) -> bytes:
        """As ``wsgi.input.readline``, ending at the deadline (408)."""
        return self._call(self._stream.readline, size)

    def readlines(self, hint: int = -1) -> list[bytes]:
        """As ``wsgi.input.readlines``, ending at the deadline (408)."""
        return self._call(self._stream.readlines, hint)

    def __iter__(self):
        while line := self.readline():
            yield line
