"""Access control: scoped API keys (``X-API-Key`` or ``Bearer``), a token for ``/metrics``.

Scopes, and which keys grant them (docs/security.md, "Authentication"):

==========  =====================================================  ==========================
scope       endpoints                                              keys
==========  =====================================================  ==========================
``write``   ``POST /track``, ``POST /track/batch``,                ``MLOPS_API_KEY``
            ``POST /v1/traces``, ``/v1/metrics``, ``/v1/logs``
``read``    ``GET /analytics/<id>``, ``GET /businesses``,          ``MLOPS_API_KEY`` or
            the dashboard's data                                   ``MLOPS_READ_API_KEY``
``erase``   ``DELETE /conversations/<id>``, ``/businesses/<id>``   ``MLOPS_API_KEY``
==========  =====================================================  ==========================

A key of ``MLOPS_KEYS_FILE`` (mlops/keys.py) grants the scopes its entry
names, may be limited per scope to a list of business ids, and may expire.
Routes that name a business ask :meth:`Auth.may` (or
:meth:`Auth.check_business`, or :meth:`Auth.businesses` for a list); a
refused business gets the same 403 as a refused key, whether the business
exists or not, counted as ``business_not_allowed``. An expired key is
refused like an unknown one, counted as ``expired_key`` and logged with its
id (at most once per ``FAILURE_LOG_INTERVAL_SECONDS`` per key and process).
``/metrics``, ``GET /erasures`` and every key's listing in
``/health/detailed`` name every business, so a limited key gets none of them.

``POST /refresh-metrics`` takes no key (it only marks cached gauges stale,
and is rate limited); ``/health``, ``/health/ready`` and ``/openapi.json``
are open; ``/health/detailed`` shows its details to a key with the ``read``
scope only (routes/health.py). ``/metrics`` takes
``Authorization: Bearer <MLOPS_METRICS_TOKEN>`` when a token is set, and,
when keys are set, any key with the ``read`` scope (as ``Bearer`` or in
``X-API-Key``); it is open only when neither is set. Each variable may hold
several comma-separated keys, so a key can be rotated without downtime.

Modes (``Settings.auth_mode``): ``off`` when no key is set; ``enforce`` (the
default with a key): 401 without a key; 403 for a key that is unknown or
lacks the scope, with one body for both, so a caller cannot tell a valid
read key from a made-up one by trying it on a write route. ``warn``: the
same failures on the ``write`` scope are let through (the event is stored),
counted in ``mlops_auth_failures_total`` and logged, so the chat app can be
given its key without losing a message. ``read``, ``erase`` and
``/metrics`` are enforced in both modes.

Every failure is counted; a log line is written at most once per
``FAILURE_LOG_INTERVAL_SECONDS`` per process (each gunicorn worker logs on
its own), saying how many failures it held back. No key or token is ever
logged or echoed: a key is named by :func:`key_id`.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import wraps
from urllib.parse import urlsplit

from flask import Flask, g, request

from .errors import error_response
from .keys import SCOPES, Grant, Keyring
from .services import get_services
from .telemetry import AUTH_FAILURES

log = logging.getLogger(__name__)

HEADER = "X-API-Key"
FAILURE_LOG_INTERVAL_SECONDS = 60.0


def key_id(key: str, app: Flask | None = None) -> str:
    """A key's public name in ``app``'s deployment (default: the current app).

    For log and audit lines ("which key did this") and rate-limit buckets; it
    does not reveal the key. See :meth:`Keyring.key_id`.
    """
    return get_auth(app).keyring.key_id(key)


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

    def record(self, scope: str, reason: str, mode: str, stored: bool,
               key_id: str | None = None) -> bool:
        """Note one failure; log it unless a line was written in the last interval.

        ``key_id`` names the key when one was recognised (a business refusal).
        Returns whether a line was written.
        """
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last < self.interval:
                self._held_back += 1
                return False
            held_back, self._held_back, self._last = self._held_back, 0, now
        endpoint = request.url_rule.rule if request.url_rule else request.path
        if stored:
            message = "write stored without a valid API key (MLOPS_AUTH_MODE=warn)"
        elif reason == BUSINESS_NOT_ALLOWED:
            message = "request refused: the key does not reach this business"
        else:
            message = "request refused: no valid credential for its scope"
        log.warning(
            message,
            extra={"scope": scope, "reason": reason, "auth_mode": mode, "endpoint": endpoint,
                   "key_id": key_id,
                   "remote_addr": request.remote_addr,
                   "failures_not_logged_since_last_line": held_back,
                   "log_interval_seconds": self.interval})
        return True


@dataclass(frozen=True)
class Identity:
    """Who sent this request: a configured key (``key_id``, scopes, grant), or nobody."""

    key_id: str | None
    scopes: frozenset[str]
    reason: str | None  # why no key is recognised: missing_key, wrong_key, expired_key
    grant: Grant | None = None


BUSINESS_NOT_ALLOWED = "business_not_allowed"


# The one refusal for a key that is unknown or lacks the scope: the same
# status, body and headers, whatever the key (see the module docstring).
FORBIDDEN_MESSAGE = f"the {HEADER} sent does not grant access to this endpoint"


def bearer_token() -> str:
    """The credential of this request's ``Authorization: Bearer <token>`` header, or "".

    OpenTelemetry exporters send keys this way (``OTEL_EXPORTER_OTLP_HEADERS``),
    so every route accepts a key as ``Bearer`` as well as in ``X-API-Key``.
    """
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Auth:
    """One app's keys, mode, /metrics token and failure log."""

    def __init__(self, settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.mode: str = settings.auth_mode
        self.keyring = Keyring(settings.api_keys, settings.read_api_keys,
                               settings.scoped_keys)
        token = settings.metrics_token
        self._metrics_token = self.keyring.digest(token) if token else None
        self.failures = FailureLog(clock=clock)
        self._expired_logged: dict[str, float] = {}  # key id -> clock() of its last line
        self._clock = clock

    def _valid_grant(self, given: str) -> tuple[Grant | None, str | None]:
        """``given``'s grant and reason: (grant, None), or (None, wrong_key/expired_key)."""
        grant = self.keyring.grant_for(given)
        if grant is None:
            return None, "wrong_key"
        if grant.expired(datetime.now(UTC)):
            self._log_expired(self.keyring.key_id(given), grant)
            return None, "expired_key"
        return grant, None

    def _log_expired(self, key_id: str, grant: Grant) -> None:
        """One line per expired key per ``FAILURE_LOG_INTERVAL_SECONDS`` in this process."""
        now = self._clock()
        last = self._expired_logged.get(key_id)
        if last is not None and now - last < self.failures.interval:
            return
        self._expired_logged[key_id] = now
        log.warning("request refused: the API key has expired",
                    extra={"reason": "expired_key", "key_id": key_id, "key_name": grant.name,
                           "expired_at": grant.expires_at.isoformat(),
                           "remote_addr": request.remote_addr})

    def identify(self) -> Identity:
        """The current request's :class:`Identity` (worked out once per request)."""
        identity = g.get("mlops_identity")
        if identity is None:
            given = request.headers.get(HEADER) or bearer_token()
            if not given:
                identity = Identity(None, frozenset(), "missing_key")
            else:
                grant, reason = self._valid_grant(given)
                identity = (Identity(None, frozenset(), reason) if grant is None else
                            Identity(self.keyring.key_id(given), grant.scopes, None, grant))
            g.mlops_identity = identity
        return identity

    def allows(self, scope: str) -> bool:
        """Whether keys are checked and this request's key grants ``scope``.

        False when auth is off: nobody is authenticated then. Counts and logs
        nothing (for routes that answer everyone, showing more to a key).
        """
        return self.mode != "off" and scope in self.identify().scopes

    def check(self, scope: str):
        """``None`` if the request may use ``scope``, else the error response to send.

        401 without a key; 403 with :data:`FORBIDDEN_MESSAGE` for an unknown
        key and for a key without ``scope`` alike (the reason is counted and
        logged, not answered).
        """
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
        return error_response(403, "forbidden", FORBIDDEN_MESSAGE)

    def businesses(self, scope: str) -> frozenset[str] | None:
        """The business ids this request's key is limited to in ``scope``; None: every one.

        None also when auth is off, and for a request let through without a
        recognised key (warn mode). Call it after :meth:`check` allowed ``scope``.
        """
        if self.mode == "off":
            return None
        grant = self.identify().grant
        return grant.limited_to(scope) if grant is not None else None

    def may(self, scope: str, business_id: str) -> bool:
        """Whether this request's key may use ``scope`` on ``business_id`` (after
        :meth:`check`). Counts and logs nothing: see :meth:`count_refusals`."""
        allowed = self.businesses(scope)
        return allowed is None or business_id in allowed

    def count_refusals(self, scope: str, count: int = 1) -> None:
        """Count ``count`` items of ``scope`` refused for their business
        (``mlops_auth_failures_total{reason="business_not_allowed"}``) and log
        (sparingly, as every failure). Answer each with :data:`FORBIDDEN_MESSAGE`."""
        if count <= 0:
            return
        AUTH_FAILURES.labels(scope, BUSINESS_NOT_ALLOWED).inc(count)
        self.failures.record(scope, BUSINESS_NOT_ALLOWED, self.mode, stored=False,
                             key_id=self.identify().key_id)

    def check_business(self, scope: str, business_id: str | None = None):
        """``None`` if the request may use ``scope`` on ``business_id``, else the 403.

        ``business_id=None`` asks for every business (a listing naming them
        all): refused to a key limited in ``scope``. The 403 is the body
        :meth:`check` sends for an unknown key, whether the business exists or not.
        """
        allowed = self.businesses(scope)
        if allowed is None or (business_id is not None and business_id in allowed):
            return None
        self.count_refusals(scope)
        return error_response(403, "forbidden", FORBIDDEN_MESSAGE)

    def metrics_open(self) -> bool:
        """Whether ``/metrics`` answers without credentials: no key and no token set."""
        return self.mode == "off" and self._metrics_token is None

    def check_metrics(self):
        """``None`` if ``/metrics`` may be read, else a 401 with ``WWW-Authenticate: Bearer``.

        Accepted: ``Authorization: Bearer <MLOPS_METRICS_TOKEN>``; when keys
        are set, also a key with the ``read`` scope, as ``Bearer`` or in
        ``X-API-Key`` (in warn mode too). Every refusal is the same 401.
        """
        if self.metrics_open():
            return None
        bearer = bearer_token()
        if bearer and self._metrics_token is not None and hmac.compare_digest(
                self.keyring.digest(bearer), self._metrics_token):
            return None
        if self.mode != "off":
            for given in (bearer, request.headers.get(HEADER, "")):
                grant = self._valid_grant(given)[0] if given else None
                if grant is not None and "read" in grant.scopes \
                        and grant.limited_to("read") is None:
                    return None
        given_any = bool(bearer or request.headers.get("Authorization")
                         or request.headers.get(HEADER))
        reason = "wrong_token" if given_any else "missing_token"
        AUTH_FAILURES.labels("metrics", reason).inc()
        self.failures.record("metrics", reason, "enforce", stored=False)
        accepted = "Bearer <MLOPS_METRICS_TOKEN>" if self._metrics_token is not None else ""
        if self.mode != "off":
            accepted = " or ".join(filter(None, (
                accepted, f"a key with the read scope (Bearer or {HEADER})")))
        response, status = error_response(401, "unauthorized", f"/metrics needs {accepted}")
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


def require_metrics_credentials(view):
    """Decorator for ``/metrics``: the token or a read key, unless neither is set
    (:meth:`Auth.check_metrics`)."""

    @wraps(view)
    def wrapper(*args, **kwargs):
        refusal = get_auth().check_metrics()
        return refusal if refusal is not None else view(*args, **kwargs)

    return wrapper


DATA_MIMETYPES = frozenset({"application/json", "text/plain", "application/openmetrics-text"})


def same_origin(location: str) -> str:
    """``location`` as a path on this origin: ``http://any.host/a?b`` -> ``/a?b``.

    Werkzeug's routing redirects (``//`` merged, a missing trailing slash)
    build an absolute URL from the request's ``Host`` header
    (``MapAdapter.make_redirect_url``), so a forged Host would send the
    client elsewhere. This service never redirects to another site, so the
    scheme and host are dropped; leading slashes collapse to one so the path
    cannot read as ``//other.host``.
    """
    parts = urlsplit(location)
    path = "/" + parts.path.lstrip("/")
    return f"{path}?{parts.query}" if parts.query else path


def init_app(app: Flask) -> None:
    """Headers on every response, errors and redirects included.

    ``Cache-Control: no-store`` on every JSON or metrics-text response that
    does not set its own, so no shared cache keeps data fetched with a key;
    ``X-Content-Type-Options: nosniff``, so no browser runs a response as
    another type than it says; ``Location`` as a path on this origin
    (:func:`same_origin`), with an empty body where it was absolute.
    """

    @app.after_request
    def _response_headers(response):
        if response.mimetype in DATA_MIMETYPES and "Cache-Control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        location = response.headers.get("Location")
        if location and (local := same_origin(location)) != location:
            response.headers["Location"] = local
            response.set_data(b"")  # werkzeug's redirect page links the absolute URL
        return response
