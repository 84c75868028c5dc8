"""What the service keeps in Postgres: events, their rollups, and every read.

Every function takes a :class:`mlops.db.Database` and runs its SQL through
``Database.run``, so it inherits the pool, the retry-once-on-broken-connection
rule and the error kinds. Most are one SQL string (one round trip).

One module per concern:

- :mod:`.events`: the insert of events and their rollups, the PL/pgSQL
  function a migration generates from it, COPY encoding;
- :mod:`.rollup_sql`: the rollups' SQL, shared by every writer of a rollup;
- :mod:`.reads`: analytics and per-business totals, from the rollups only;
- :mod:`.housekeeping`: the maintenance job's backfill, shard folding, expiry;
- :mod:`.pricing`: the price backfill and ``reprice`` of stored events;
- :mod:`.erasure`: erasure and its audit trail;
- :mod:`.maintenance_lock`: the advisory lock those last three run under.

Each row also holds the service's price of the call (``price_usd``,
``price_status``; mlops/prices.py), computed where a record becomes a row,
and the daily rollup holds its sums beside the client's ``api_cost_usd``.
The maintenance job prices rows stored before prices existed, and
:func:`reprice` prices a window again; both move the rollups by the
difference, so they stay equal to the raw sums.

This package re-exports what the rest of the service calls, so callers
write ``store.insert_events(...)``; the modules inside import each other
directly.
"""

from .erasure import (
    Requester,
    businesses_holding,
    erase_business,
    erase_conversation,
    erase_session,
    erasure_audit,
    record_erasure_refusal,
)
from .events import (
    COPY_THRESHOLD,
    INSERT_FUNCTION_MIGRATION,
    Inserted,
    insert_events,
    insert_function_sql,
    insert_sql,
)
from .housekeeping import (
    backfill_batch,
    backfill_finished,
    delete_expired_events,
    delete_expired_rollups,
    fold_shards,
)
from .maintenance_lock import MAINTENANCE_LOCK_KEY
from .pricing import price_backfill_batch, reprice
from .reads import (
    BusinessRow,
    BusinessTotals,
    analytics,
    business_totals,
    oldest_event_received_at,
)
from .rollup_sql import PRICE_SUMS, SHARDS

__all__ = [
    "COPY_THRESHOLD",
    "INSERT_FUNCTION_MIGRATION",
    "MAINTENANCE_LOCK_KEY",
    "PRICE_SUMS",
    "SHARDS",
    "BusinessRow",
    "BusinessTotals",
    "Inserted",
    "Requester",
    "analytics",
    "backfill_batch",
    "backfill_finished",
    "business_totals",
    "businesses_holding",
    "delete_expired_events",
    "delete_expired_rollups",
    "erase_business",
    "erase_conversation",
    "erase_session",
    "erasure_audit",
    "fold_shards",
    "insert_events",
    "insert_function_sql",
    "insert_sql",
    "oldest_event_received_at",
    "price_backfill_batch",
    "record_erasure_refusal",
    "reprice",
]
