"""The per-app services the request handlers share, and a typed accessor for them.

``create_app`` builds one :class:`Services` per process and stores it on the
app; handlers call :func:`get_services` (like flaskr's ``get_db()``) instead
of looking anything up by a string key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask import Flask, current_app

if TYPE_CHECKING:  # annotations only
    from .auth import Auth
    from .config import Settings
    from .db import Database
    from .ingest import Ingestor
    from .maintenance import Maintenance
    from .outbox import Outbox
    from .telemetry import Telemetry

_EXTENSION = "mlops"


@dataclass
class Services:
    """What the request handlers of one process share."""

    settings: Settings
    db: Database
    outbox: Outbox
    telemetry: Telemetry
    ingestor: Ingestor
    maintenance: Maintenance
    auth: Auth
    started_at: float = field(default_factory=time.monotonic)  # time.monotonic()

    def install(self, app: Flask) -> None:
        """Attach to ``app``, where :func:`get_services` finds it."""
        app.extensions[_EXTENSION] = self

    def shutdown(self, drain_seconds: float = 3.0) -> int:
        """Stop maintenance and group commits, drain the spool (``drain_seconds``), close the pool.

        Returns the events left in the spool.
        """
        self.maintenance.stop()
        self.ingestor.stop()
        left = self.outbox.stop(drain_seconds)
        self.db.close()
        self.outbox.spool.close()
        return left


def get_services(app: Flask | None = None) -> Services:
    """The :class:`Services` of ``app`` (default: the app handling this request).

    Raises ``KeyError`` for an app not built by ``create_app``.
    """
    return (app or current_app).extensions[_EXTENSION]
