"""WSGI entry point: ``gunicorn app:app`` (production) or ``python app.py`` (development).

The application itself lives in the ``mlops`` package (``mlops.create_app``).
"""

from __future__ import annotations

import signal
import sys

from mlops import announce, create_app, embedded, logs
from mlops.config import ConfigError, Settings
from mlops.db import DatabaseMisconfigured, MigrationError, check_at_start


def main() -> None:
    """Check the settings, migrate the database once, then serve on ``HOST:SERVICE_PORT``.

    Exits 1 with one line on stderr for a missing/malformed setting, a
    database that refuses these credentials or a migration file that fails;
    starts anyway (spooling) when the database is only unreachable. With
    ``DATABASE_URL`` unset or ``embedded``, runs an embedded PostgreSQL until
    Ctrl-C or SIGTERM.
    """
    # SIGTERM ends the process through `finally`, like Ctrl-C, so the embedded server stops.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        pgdata = embedded.start_if_asked()
        settings = Settings.from_env()
        database = check_at_start(settings)
    except (ConfigError, DatabaseMisconfigured, MigrationError) as exc:
        embedded.stop()
        sys.exit(f"mlops-service: cannot start: {exc}")
    try:
        logs.configure(settings.log_dir, settings.log_level, settings.spool_dir)
        application = create_app(settings)
        announce(settings, database, embedded_pgdata=pgdata)
        application.run(host=settings.host, port=settings.service_port, threaded=True)
    finally:
        embedded.stop()


if __name__ == "__main__":
    main()
else:
    app = create_app()
