"""Rate limits (Flask-Limiter), per API key, or per client address without one.

A route opts in with ``@rate_limited(group)``; its limit is the setting of
that group (``RATE_LIMIT_TRACK``, ``_BATCH``, ``_REFRESH``, ``_READ``,
``_ERASE``, in the ``limits`` notation: ``100/second``, ``1000 per minute``).
Each route keeps its own count per client. A client is the key id of a valid
``X-API-Key`` (:func:`mlops.auth.key_id`), else the request's address, which
comes from ``X-Forwarded-For`` only behind ``TRUSTED_PROXIES`` proxies
(werkzeug's ProxyFix, wired in ``create_app``); unknown keys are counted by
address, so inventing keys does not buy fresh limits.

What a limit means: a rate per client and route for the whole service,
whatever the number of gunicorn workers; how exactly it holds depends on
the storage (``RATE_LIMIT_STORAGE_URI``):

* ``redis://host:6379/0`` (or ``rediss://``, ``redis+unix://``): every
  worker and replica shares one count, so the limit is exact. If Redis stops
  answering, each worker falls back to counting in its own memory and retries
  Redis with a growing back-off (Flask-Limiter's
  ``in_memory_fallback_enabled``), so a Redis outage never refuses an event;
  meanwhile each worker counts the whole limit.
* ``memory://`` (the default): each worker counts only the requests it
  serves, and one client's keep-alive connections are spread over the
  workers unevenly (each connection stays with the worker that accepted it;
  measured here: up to 29 of one client's 32 connections on one of 2
  workers, up to 125 of 200 on one of 4). So each of N workers
  (``WEB_CONCURRENCY``, which gunicorn.conf.py sets in every worker to the
  number running) enforces :func:`per_process` of the limit,
  ``ceil(limit x min(N, 2) / N)``: with one worker the limit itself; with
  N >= 2, twice its even share. A client
  sending at the limit is then never refused while no worker serves more
  than twice its even share of that client's requests (with 2 workers:
  never), and the service never takes more than twice the limit from one
  client. With several replicas, each counts on its own: use Redis.

Cost of a 429 and how to size a limit: the refused request is not stored.
The course's chat app sends each event once, with no retry, so for it a 429
is a lost event. Set a route's limit to at least twice the peak rate of its
busiest legitimate client (that client's whole traffic if it sends from one
address, as a chat app's server does): the defaults (1000/second for
``/track`` and ``/refresh-metrics``) are twice a 500 messages/s peak. A
client looping far above the limit gets 429s instead of the service's
capacity.

Strategy: limits' moving window, which counts the requests of exactly the
last period, so ``Retry-After`` is the time until the oldest counted request
leaves the window. A refused request gets 429 in the JSON error shape with
``Retry-After`` in whole seconds (Flask-Limiter rounds the reset time up and
adds up to a second: 1 or 2 for a one-second window) and is counted in
``mlops_rate_limited_requests_total``.
"""

from __future__ import annotations

import logging
import math
import time

from flask import Flask, current_app, request
from flask_limiter import Limiter, RateLimitExceeded
from limits import parse_many

from .auth import get_auth
from .errors import error_response
from .telemetry import RATE_LIMITED

GROUPS = ("track", "batch", "refresh", "read", "erase")
STRATEGY = "moving-window"
# With memory:// counts, how far above its even share of one client's requests
# a worker may serve before that client is refused below the limit; also the
# most the service takes from one client, as a multiple of the limit.
UNEVEN_SPREAD_TOLERANCE = 2
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


def per_process(limit: str, processes: int) -> str:
    """What one of ``processes`` workers enforces of ``limit`` when each counts in memory.

    ``limit`` is in the ``limits`` notation (``1000/second``, ``10/second;300/minute``);
    each amount becomes ``ceil(amount x min(processes, 2) / processes)``, at
    least 1, over the same period (see the module's docstring for why twice
    the even share). Example: ``per_process("1000/second", 4) == "500 per 1 second"``.
    """
    share = min(processes, UNEVEN_SPREAD_TOLERANCE) / processes
    return ";".join(
        f"{max(1, math.ceil(item.amount * share))} per {item.multiples} {item.GRANULARITY.name}"
        for item in parse_many(limit))


def init_app(app: Flask, settings) -> Limiter:
    """Build this app's :class:`Limiter` from ``settings`` and answer 429s in JSON.

    The limits are looked up per request from the view's ``@rate_limited``
    group, so views registered after this call are limited too.
    """
    uri = settings.rate_limit_storage_uri
    shared = uri.startswith(("redis://", "rediss://", "redis+unix://"))
    configured = {g: getattr(settings, f"rate_limit_{g}") for g in GROUPS}
    enforced = (configured if shared else
                {g: per_process(limit, settings.rate_limit_processes)
                 for g, limit in configured.items()})

    def group_of_this_route() -> str | None:
        view = current_app.view_functions.get(request.endpoint or "")
        return getattr(view, "rate_limit_group", None)

    def limit_for_this_route() -> str:
        return enforced.get(group_of_this_route(), "")

    options = ({"socket_timeout": REDIS_TIMEOUT_SECONDS,
                "socket_connect_timeout": REDIS_TIMEOUT_SECONDS} if shared else {})
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
        limit = configured.get(group_of_this_route(), exc.description)
        response, status = error_response(
            429, "rate_limited", f"rate limit of {limit} exceeded; retry after {retry_after} s")
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
