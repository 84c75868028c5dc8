"""Access control: scoped API keys in ``X-API-Key``, a bearer token for ``/metrics``.

Scopes, and which keys grant them (README.md, "Authentication"):

==========  =====================================================  ==========================
scope       endpoints                                              keys
==========  =====================================================  ==========================
``write``   ``POST /track``, ``POST /track/batch``                 ``MLOPS_API_KEY``
``read``    ``GET /analytics/<id>``, ``GET /businesses``,          ``MLOPS_API_KEY`` or
            the dashboard's data                                   ``MLOPS_READ_API_KEY``
``erase``   ``DELETE /conversations/<id>``, ``/businesses/<id>``   ``MLOPS_API_KEY``
==========  =====================================================  ==========================

``POST /refresh-metrics`` takes no key (it only marks cached gauges stale,
and is rate limited); ``/health*`` and ``/openapi.json`` are open;
``/metrics`` needs ``Authorization: Bearer <MLOPS_METRICS_TOKEN>`` when that
is set. Each variable may hold several comma-separated keys, so a key can be
rotated without downtime.

Modes (``Settings.auth_mode``): ``off`` when no key is set; ``enforce`` (the
default with a key): 401 without a key, 403 for a wrong key or a key without
the scope; ``warn``: the same failures on the ``write`` scope are let through
(the event is stored), counted in ``mlops_auth_failures_total`` and logged,
so the chat app can be given its key without losing a message. ``read`` and
``erase`` are enforced in both modes.

Every failure is counted; a log line is written at most once per
``FAILURE_LOG_INTERVAL_SECONDS`` per process (each gunicorn worker logs on
its own), saying how many failures it held back. No key or token is ever
logged or echoed: a key is named by :func:`key_id`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import wraps

from flask import Flask, g, request

from .errors import error_response
from .services import get_services
from .telemetry import AUTH_FAILURES

log = logging.getLogger(__name__)

HEADER = "X-API-Key"
SCOPES = ("write", "read", "erase")
FULL_ACCESS = frozenset(SCOPES)
READ_ONLY = frozenset({"read"})
FAILURE_LOG_INTERVAL_SECONDS = 60.0


def key_id(key: str) -> str:
    """A key's public name: the first 12 hex digits of its SHA-256 (48 bits).

    For log and audit lines ("which key did this"); it does not reveal the key.
    """
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class Keyring:
    """The configured keys and the scopes each grants, compared in constant time.

    Keys are held as SHA-256 digests so every comparison is between 32-byte
    values (``hmac.compare_digest``), and every key is compared on every call,
    so the time taken says nothing about which key, or how much of one, matched.
    """

    def __init__(self, full: Iterable[str], read: Iterable[str]) -> None:
        self._entries = [(_digest(k), FULL_ACCESS) for k in full]
        self._entries += [(_digest(k), READ_ONLY) for k in read]

    def scopes_for(self, given: str) -> frozenset[str]:
        """The scopes ``given`` grants: all three, ``{"read"}``, or none (unknown key)."""
        digest = _digest(given)
        granted: frozenset[str] = frozenset()
        for expected, scopes in self._entries:
            if hmac.compare_digest(digest, expected):
                granted = scopes
        return granted


class FailureLog:
    """Logs auth failures at most once per ``interval`` seconds (in this process).

    ``clock`` (default ``time.monotonic``) is replaceable so tests can move time.
    """

    def __init__(self, interval: float = FAILURE_LOG_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last: float | None = None
        self._held_back = 0
        self._lock = threading.Lock()

    def record(self, scope: str, reason: str, mode: str, stored: bool) -> bool:
        """Note one failure; log it unless a line was written in the last interval.

        Returns whether a line was written.
        """
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last < self.interval:
                self._held_back += 1
                return False
            held_back, self._held_back, self._last = self._held_back, 0, now
        endpoint = request.url_rule.rule if request.url_rule else request.path
        log.warning(
            "write stored without a valid API key (MLOPS_AUTH_MODE=warn)" if stored
            else "request refused: no valid credential for its scope",
            extra={"scope": scope, "reason": reason, "auth_mode": mode, "endpoint": endpoint,
                   "remote_addr": request.remote_addr,
                   "failures_not_logged_since_last_line": held_back,
                   "log_interval_seconds": self.interval})
        return True


@dataclass(frozen=True)
class Identity:
    """Who sent this request: a configured key (``key_id``, scopes), or nobody."""

    key_id: str | None
    scopes: frozenset[str]
    reason: str | None  # why no key was recognised: missing_key, wrong_key; None if one was


class Auth:
    """One app's keys, mode, /metrics token and failure log."""

    def __init__(self, settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.mode: str = settings.auth_mode
        self.keyring = Keyring(settings.api_keys, settings.read_api_keys)
        token = settings.metrics_token
        self._metrics_token = _digest(token) if token else None
        self.failures = FailureLog(clock=clock)

    def identify(self) -> Identity:
        """The current request's :class:`Identity` (worked out once per request)."""
        identity = g.get("mlops_identity")
        if identity is None:
            given = request.headers.get(HEADER)
            if not given:
                identity = Identity(None, frozenset(), "missing_key")
            else:
                scopes = self.keyring.scopes_for(given)
                identity = Identity(key_id(given) if scopes else None, scopes,
                                    None if scopes else "wrong_key")
            g.mlops_identity = identity
        return identity

    def check(self, scope: str):
        """``None`` if the request may use ``scope``, else the error response to send."""
        if self.mode == "off":
            return None
        identity = self.identify()
        if scope in identity.scopes:
            return None
        reason = identity.reason or "insufficient_scope"
        stored = self.mode == "warn" and scope == "write"
        AUTH_FAILURES.labels(scope, reason).inc()
        self.failures.record(scope, reason, self.mode, stored)
        if stored:
            return None
        if reason == "missing_key":
            return error_response(401, "unauthorized", f"missing {HEADER} header")
        if reason == "wrong_key":
            return error_response(403, "forbidden", f"wrong {HEADER}")
        return error_response(403, "forbidden", f"this {HEADER} does not grant {scope} access")

    def check_metrics_token(self):
        """``None`` if ``/metrics`` may be read, else a 401 with ``WWW-Authenticate: Bearer``."""
        if self._metrics_token is None:
            return None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token and hmac.compare_digest(
                _digest(token.strip()), self._metrics_token):
            return None
        reason = "wrong_token" if token else "missing_token"
        AUTH_FAILURES.labels("metrics", reason).inc()
        self.failures.record("metrics", reason, "enforce", stored=False)
        response, status = error_response(
            401, "unauthorized", "/metrics needs Authorization: Bearer <MLOPS_METRICS_TOKEN>")
        response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response, status


def get_auth(app: Flask | None = None) -> Auth:
    """The :class:`Auth` of ``app`` (default: the app handling this request)."""
    return get_services(app).auth


def require_scope(scope: str):
    """Decorator: the view needs a key granting ``scope`` (``write``, ``read`` or ``erase``).

    Errors: 401 ``unauthorized`` (no ``X-API-Key``), 403 ``forbidden`` (unknown
    key, or a key without ``scope``); none when auth is off, nor for ``write``
    in warn mode.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; one of {SCOPES}")

    def decorate(view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            refusal = get_auth().check(scope)
            return refusal if refusal is not None else view(*args, **kwargs)

        wrapper.auth_scope = scope
        return wrapper

    return decorate


def require_metrics_token(view):
    """Decorator for ``/metrics``: ``Authorization: Bearer <MLOPS_METRICS_TOKEN>`` when set."""

    @wraps(view)
    def wrapper(*args, **kwargs):
        refusal = get_auth().check_metrics_token()
        return refusal if refusal is not None else view(*args, **kwargs)

    return wrapper


DATA_MIMETYPES = frozenset({"application/json", "text/plain", "application/openmetrics-text"})


def init_app(app: Flask) -> None:
    """Mark data responses ``no-store``.

    ``Cache-Control: no-store`` goes on every JSON or metrics-text response
    that does not set its own, so no shared cache keeps data fetched with a key.
    """

    @app.after_request
    def _no_store(response):
        if response.mimetype in DATA_MIMETYPES and "Cache-Control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
        return response
