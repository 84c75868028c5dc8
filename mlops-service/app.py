"""WSGI entry point: ``gunicorn app:app`` (production) or ``python app.py`` (development).

The application itself lives in the ``mlops`` package (``mlops.create_app``).
"""

from __future__ import annotations

import sys

from mlops import announce, create_app, logs
from mlops.config import ConfigError, Settings
from mlops.db import DatabaseMisconfigured, check_at_start


def main() -> None:
    """Check the settings and the database once, then serve on ``SERVICE_PORT``.

    Exits 1 with one line on stderr for a missing/malformed setting or a
    database that refuses these credentials; starts anyway (spooling) when
    the database is only unreachable.
    """
    try:
        settings = Settings.from_env()
        database = check_at_start(settings)
    except (ConfigError, DatabaseMisconfigured) as exc:
        sys.exit(f"mlops-service: cannot start: {exc}")
    logs.configure(settings.log_dir, settings.log_level)
    application = create_app(settings)
    announce(settings, database)
    application.run(host="0.0.0.0", port=settings.service_port, threaded=True)


if __name__ == "__main__":
    main()
else:
    app = create_app()
