"""``GET /``: the dashboard, a static page that reads the service's own JSON endpoints.

The page (``mlops/static/dashboard/``) holds no data, so it is open; what it
shows comes from ``/businesses``, ``/analytics/<id>`` and ``/health/detailed``
in the browser, with the ``X-API-Key`` the person types when those ask for it.
With a key limited to some businesses (``MLOPS_KEYS_FILE``) ``/businesses``
lists only those, so the picker offers only them, and ``?business_id=`` of
another shows the page's refusal (``/analytics`` answers 403), never figures.
Everything is served from this origin: no CDN, works offline.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, request, send_from_directory

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "dashboard"

bp = Blueprint("dashboard", __name__, static_folder=str(STATIC_DIR),
               static_url_path="/dashboard")

# Scripts, styles, images and fetches from this origin only; no inline script
# or style (``element.style`` set from a script file is allowed by CSP); no
# framing (clickjacking); forms never submit, so a key typed while the script
# is not running cannot leave in a URL.
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers without CSP level 2
}


def is_dashboard_path(path: str) -> bool:
    """``/`` and everything under ``/dashboard``, however many slashes a client sends;
    and ``/static``, where Flask's default static route serves the same files."""
    segments = [part for part in path.split("/") if part]
    return not segments or segments[0] in ("dashboard", "static")


@bp.after_app_request
def _security_headers(response):
    """The page's headers on the page, its assets, and every redirect or error
    answered for a dashboard path (those never reach this blueprint's own hooks:
    routing answers them before a view is chosen)."""
    if is_dashboard_path(request.path):
        response.headers.update(SECURITY_HEADERS)
    return response


@bp.get("/")
def dashboard():
    """The dashboard (HTML). ``?business_id=<id>`` opens that business, ``?days=N``
    that window (1, 7, 30 or 90); plain ``/`` opens the busiest business of 30 days.
    """
    response = send_from_directory(STATIC_DIR, "index.html", max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    return response
