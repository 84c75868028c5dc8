"""WSGI entry point: ``gunicorn app:app`` (production) or ``python app.py`` (development).

The application itself lives in the ``mlops`` package (``mlops.create_app``).
"""

from __future__ import annotations

import signal
import sys

from mlops import create_app, embedded, start_server


def main() -> None:
    """Start as gunicorn's master does (:func:`mlops.start_server`), then serve on
    ``HOST:SERVICE_PORT`` with Flask's development server.

    Exits 1 with one line on stderr for a missing/malformed setting, a
    database that refuses these credentials or a migration file that fails;
    starts anyway (spooling) when the database is only unreachable. With
    ``DATABASE_URL`` unset or ``embedded``, runs an embedded PostgreSQL until
    Ctrl-C or SIGTERM.
    """
    # SIGTERM ends the process through `finally`, like Ctrl-C, so the embedded server stops.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    settings = start_server()
    try:
        application = create_app(settings)
        application.run(host=settings.host, port=settings.service_port, threaded=True)
    finally:
        embedded.stop()


if __name__ == "__main__":
    main()
else:
    app = create_app()
