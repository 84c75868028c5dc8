"""Optional shared-key auth: the ``X-API-Key`` header against ``MLOPS_API_KEY``."""

from __future__ import annotations

import hmac
from functools import wraps

from flask import request

from .errors import error_response
from .services import get_services

HEADER = "X-API-Key"


def require_api_key(view):
    """Decorator: with a key configured, 401 when the header is missing, 403 when wrong.

    Comparison is constant-time (``hmac.compare_digest``). Without a key
    configured the endpoint is open (the start-up log says so once).
    """

    @wraps(view)
    def wrapper(*args, **kwargs):
        expected = get_services().settings.api_key
        if expected:
            given = request.headers.get(HEADER)
            if not given:
                return error_response(401, "unauthorized", f"missing {HEADER} header")
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return error_response(403, "forbidden", f"wrong {HEADER}")
        return view(*args, **kwargs)

    return wrapper
