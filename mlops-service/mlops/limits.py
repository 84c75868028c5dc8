"""Rate limits (Flask-Limiter), per API key, or per client address without one.

A route opts in with ``@rate_limited(group)``; its limit is the setting of
that group (``RATE_LIMIT_TRACK``, ``_BATCH``, ``_REFRESH``, ``_READ``,
``_ERASE``, in the ``limits`` notation: ``100/second``, ``1000 per minute``).
Each route keeps its own count per client. A client is the key id of a valid
``X-API-Key`` (:func:`mlops.auth.key_id`), else the request's address, which
comes from ``X-Forwarded-For`` only behind ``TRUSTED_PROXIES`` proxies
(werkzeug's ProxyFix, wired in ``create_app``); unknown keys are counted by
address, so inventing keys does not buy fresh limits.

Storage (``RATE_LIMIT_STORAGE_URI``): ``memory://`` keeps the counts in each
process, so with N gunicorn workers a client may get up to N times the limit;
``redis://host:6379/0`` shares them across workers and replicas. If Redis
stops answering, each worker falls back to in-memory counts and retries Redis
with a growing back-off (Flask-Limiter's ``in_memory_fallback_enabled``), so
a Redis outage never refuses an event.

Strategy: limits' moving window, which counts the requests of exactly the
last period, so ``Retry-After`` is the time until the oldest counted request
leaves the window. A refused request gets 429 in the JSON error shape with
``Retry-After`` (seconds) and is counted in ``mlops_rate_limited_requests_total``.
"""

from __future__ import annotations

import logging
import math
import time

from flask import Flask, current_app, request
from flask_limiter import Limiter, RateLimitExceeded

from .auth import get_auth
from .errors import error_response
from .telemetry import RATE_LIMITED

GROUPS = ("track", "batch", "refresh", "read", "erase")
STRATEGY = "moving-window"
# Seconds. Redis calls give up quickly so a dead Redis costs a request little
# (then the in-memory fallback takes over).
REDIS_TIMEOUT_SECONDS = 0.5


def rate_limited(group: str):
    """Decorator: rate limit the view by ``RATE_LIMIT_<GROUP>`` (one of :data:`GROUPS`)."""
    if group not in GROUPS:
        raise ValueError(f"unknown rate limit group {group!r}; one of {GROUPS}")

    def mark(view):
        view.rate_limit_group = group
        return view

    return mark


def client_key() -> str:
    """Who is counted: ``key:<key id>`` for a valid key, else ``addr:<client address>``."""
    identity = get_auth().identify()
    if identity.key_id:
        return f"key:{identity.key_id}"
    return f"addr:{request.remote_addr or 'unknown'}"


def init_app(app: Flask, settings) -> Limiter:
    """Build this app's :class:`Limiter` from ``settings`` and answer 429s in JSON.

    The limits are looked up per request from the view's ``@rate_limited``
    group, so views registered after this call are limited too.
    """
    by_group = {g: getattr(settings, f"rate_limit_{g}") for g in GROUPS}

    def limit_for_this_route() -> str:
        view = current_app.view_functions.get(request.endpoint or "")
        return by_group.get(getattr(view, "rate_limit_group", None), "")

    uri = settings.rate_limit_storage_uri
    options = ({"socket_timeout": REDIS_TIMEOUT_SECONDS,
                "socket_connect_timeout": REDIS_TIMEOUT_SECONDS}
               if uri.startswith(("redis://", "rediss://", "redis+unix://")) else {})
    limiter = Limiter(
        client_key,
        default_limits=[limit_for_this_route],
        storage_uri=uri,
        storage_options=options,
        strategy=STRATEGY,
        key_prefix=settings.rate_limit_key_prefix,
        headers_enabled=False,  # Retry-After is set on 429s only, below
        swallow_errors=True,
        in_memory_fallback_enabled=True,
        enabled=settings.rate_limit_enabled,
    )
    # Its own lines (a refused request, Redis lost or back) join the service's JSON log.
    limiter.logger = logging.getLogger(__name__)
    limiter.init_app(app)

    @app.errorhandler(RateLimitExceeded)
    def _too_many_requests(exc: RateLimitExceeded):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        RATE_LIMITED.labels(endpoint).inc()
        retry_after = _retry_after_seconds(limiter)
        response, status = error_response(
            429, "rate_limited",
            f"rate limit of {exc.description} exceeded; retry after {retry_after} s")
        response.headers["Retry-After"] = str(retry_after)
        return response, status

    return limiter


def _retry_after_seconds(limiter: Limiter) -> int:
    """Whole seconds until the breached limit lets a request through again (at least 1)."""
    breached = limiter.current_limit
    try:
        reset_at = breached.reset_at if breached else time.time() + 1
    except Exception:  # storage gone between the check and now: a short, safe guess
        return 1
    return max(1, math.ceil(reset_at - time.time()))
