"""``python -m mlops.reprice --since DATE --until DATE``: price a window of stored events again.

Behind ``make reprice``. Uses the service's settings (``DATABASE_URL``,
``PRICES_FILE``, ...; see docs/prices.md): each event received from
``--since`` (inclusive) to ``--until`` (exclusive), UTC dates or ISO 8601
times, is priced by the current table (the installed genai-prices and the
overrides file), and the rollups' price sums move with it. Safe to run
while the service runs (batches under the maintenance lock) and to run
again (unchanged prices are left alone). Prints one line; exits 1 with one
line on a bad argument, setting or database error.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, date, datetime, time

from . import price_overrides, prices, store
from .config import ConfigError, Settings
from .db import Database, DatabaseMisconfigured, DatabaseUnavailable


def _moment(text: str) -> datetime:
    """A UTC date (midnight) or an ISO 8601 time (UTC when it names no offset)."""
    try:
        moment = datetime.combine(date.fromisoformat(text), time(), UTC)
    except ValueError:
        moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, 1 refused or failed)."""
    parser = argparse.ArgumentParser(prog="python -m mlops.reprice", description=__doc__.split(
        "\n", 1)[0])
    parser.add_argument("--since", required=True, type=_moment,
                        help="first UTC date (or ISO 8601 time) to price again, inclusive")
    parser.add_argument("--until", required=True, type=_moment,
                        help="UTC date (or ISO 8601 time) to stop at, exclusive")
    args = parser.parse_args(argv)
    if args.until <= args.since:
        print("reprice: --until must be after --since", file=sys.stderr)
        return 1
    try:
        settings = Settings.from_env()
        table = prices.Table.from_file(settings.prices_file)
    except (ConfigError, price_overrides.PricesFileError) as exc:
        print(f"reprice: {exc}", file=sys.stderr)
        return 1
    db = Database(settings)
    try:
        read, changed = store.reprice(db, args.since, args.until, table,
                                      limit=settings.maintenance_batch_rows,
                                      timeout_ms=settings.erasure_timeout_ms)
    except (DatabaseUnavailable, DatabaseMisconfigured, RuntimeError) as exc:
        print(f"reprice: {exc}", file=sys.stderr)
        return 1
    finally:
        db.close()
    print(f"reprice: {read} events received from {args.since.isoformat()} to "
          f"{args.until.isoformat()}, {changed} with a new price ({table.version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
