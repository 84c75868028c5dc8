"""History section of ``make bench``: reads stay flat as events pile up.

Loads a database of its own to each size in ``BENCH_HISTORY_SIZES``
(default 1,000,000 then 10,000,000 events), then measures the reads the
chat app, Prometheus and the dashboard make, against real gunicorn:

* ``POST /refresh-metrics`` p95 (only answers that re-read Postgres count),
* a ``/metrics`` scrape with stale gauges (``METRICS_CACHE_SECONDS=0``, so
  every scrape re-reads them),
* ``/analytics/<busiest business>?days=30`` p95,
* what ``store.insert_events`` costs per event by group size (client and
  Postgres CPU, as in the main table), with the history in place,
* the retention delete rate (``store.delete_expired_events`` batches of
  5,000 for events older than 45 days, for up to 10 s),


The loader writes the way the service does: ``store.insert_sql`` (the
statement ``insert_events`` runs: events plus rollups, idempotent) with a
``generate_series`` query as its source instead of VALUES or a staging
table, 250,000 events per transaction, in two sessions writing rollup shards
0 and 1.
Generated data: 200 businesses, ``biz-000`` holding 10% of conversations;
conversations of 10 messages a few minutes apart; conversation start times
spread evenly over the last 60 days; 3 models; response times 200-9,200 ms.
After each load it runs ``VACUUM ANALYZE``, as autovacuum would.

Run alone with ``python bench/history.py``; ``bench/run.py`` calls
:func:`run` and appends its table to ``bench/results.md``.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "mlops-service"
sys.path.insert(0, str(SERVICE))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (wrk helpers of the main benchmark)

from mlops import migrate, store  # noqa: E402

SIZES = [int(s) for s in os.environ.get("BENCH_HISTORY_SIZES", "1000000,10000000").split(",")]
CHUNK = 250_000
BUSIEST = "biz-000"
SECONDS_PER_60_DAYS = 60 * 86400

# Event number g: conversation g / 10; one business per conversation; each
# priced at gemini-1.5-flash's list rates (0.075 / 0.30 USD per million input /
# output tokens). (%% is a literal % here: the query takes parameters.)
_SOURCE = f"""
SELECT 'hist-' || g,
       now() - make_interval(
           secs => ((g / 10) * 7919) %% {SECONDS_PER_60_DAYS} + 600 - (g %% 10) * 45),
       b.id, b.id || '-c' || (g / 10), 'sess-' || (g / 10),
       200 + (g * 37) %% 9000, CASE WHEN g %% 20 = 0 THEN 0 ELSE 1 END, NULL::double precision,
       100 + g %% 800, 80 + g %% 600, 20 + g %% 200, (g %% 5000) / 1e6,
       (ARRAY['gemini-1.5-flash', 'gemini-1.5-pro', 'gpt-4o-mini'])[g %% 3 + 1], 'general',
       g %% 7 = 0, g %% 31 = 0, CASE WHEN g %% 7 = 0 THEN g %% 2 = 0 END,
       40 + g %% 300, 100 + g %% 1500, 'text', '{{}}'::jsonb,
       ((80 + g %% 600) * 0.075 + (20 + g %% 200) * 0.30) / 1e6, 'priced'
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g,
     LATERAL (SELECT CASE WHEN (g / 10) %% 10 = 0 THEN '{BUSIEST}'
                          ELSE 'biz-' || lpad(((g / 10) %% 199 + 1)::text, 3, '0') END AS id) b
"""


def load(url: str, first: int, last: int) -> float:
    """Insert events ``first..last`` (inclusive) with their rollups; return seconds taken.

    Two sessions load alternate chunks (as two workers would); then the
    maintenance job's fold runs, and the tables are vacuumed and analysed.
    """
    started = time.monotonic()
    chunks = [(start, min(start + CHUNK - 1, last)) for start in range(first, last + 1, CHUNK)]

    def loader(mine: list[tuple[int, int]]) -> None:
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            for start, end in mine:
                cur.execute(store.insert_sql(_SOURCE, shard=(start // CHUNK) % 2),
                            {"first": start, "last": end})
                print(f"bench: history: loaded events {start:,}..{end:,}", flush=True)
        conn.close()

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(loader, [chunks[0::2], chunks[1::2]]))
    db = bench.store_db(url)
    while store.fold_shards(db, 50_000):
        pass
    db.close()
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        # The loader rewrites each rollup row once per chunk and the fold
        # deletes the second session's shard: space the service's steady
        # state reuses day after day. Compact it so reads see that state.
        cur.execute("VACUUM FULL mlops_rollup_daily, mlops_rollup_latency, "
                    "mlops_rollup_conversations")
        # A plain VACUUM then sets the visibility map (VACUUM FULL does not),
        # as autovacuum would, so index-only scans skip the heap.
        cur.execute("VACUUM ANALYZE mlops_rollup_daily, mlops_rollup_latency, "
                    "mlops_rollup_conversations")
        cur.execute("ANALYZE mlops_events")
    conn.close()
    return time.monotonic() - started


def call(method: str, url: str, body: object | None = None) -> tuple[float, dict | None]:
    """One request on a fresh connection (as the chat app makes); (ms, JSON body or None)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = response.read()
        kind = response.headers.get("Content-Type", "")
    elapsed = (time.perf_counter() - started) * 1000
    return elapsed, json.loads(payload) if kind.startswith("application/json") else None


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def measure(base: str, url: str) -> dict:
    """Read latencies at the current size, a write's CPU by group size, then the delete rate."""
    refresh = []
    for _ in range(60):
        ms, body = call("POST", f"{base}/refresh-metrics", {"trigger": "new_metrics"})
        if body and body.get("refreshed"):
            refresh.append(ms)
        time.sleep(0.35)  # the 1 s per-worker re-read floor: most calls re-read
    scrape = [call("GET", f"{base}/metrics")[0] for _ in range(30)]
    analytics = [call("GET", f"{base}/analytics/{BUSIEST}?days=30")[0] for _ in range(100)]
    _, sample = call("GET", f"{base}/analytics/{BUSIEST}?days=30")

    db = bench.store_db(url)
    window = store.BusinessTotals(30)
    window.read(db)  # as a worker's first read: later ones re-read yesterday and today only
    totals_ms, window_ms, analytics_ms = [], [], []
    for _ in range(50):
        started = time.perf_counter()
        window.read(db)
        window_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        store.business_totals(db, 30)
        totals_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        store.analytics(db, BUSIEST, 30)
        analytics_ms.append((time.perf_counter() - started) * 1000)
    # The write path at this size: a plan or index that grew with the history shows here.
    groups = bench.group_costs(url, [bench.SUCCESS, bench.FAILURE])
    deleted, started = 0, time.monotonic()
    while time.monotonic() - started < 10:
        n = store.delete_expired_events(db, 45, 5000)
        if not n:
            break
        deleted += n
    rate = deleted / (time.monotonic() - started)
    db.close()
    return {"refresh_p95": p95(refresh), "refresh_n": len(refresh),
            "scrape_p50": statistics.median(scrape), "scrape_p95": p95(scrape),
            "analytics_p95": p95(analytics), "analytics_p50": statistics.median(analytics),
            "busiest_messages": sample["metrics"]["total_messages"],
            "busiest_conversations": sample["metrics"]["total_conversations"],
            "deleted": deleted, "delete_rate": rate,
            "totals_p95": p95(totals_ms), "window_p95": p95(window_ms),
            "store_analytics_p95": p95(analytics_ms), "groups": groups}


def serve(url: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = bench.free_port()
    env = {**os.environ, "DATABASE_URL": url, "SERVICE_PORT": str(port),
           "WEB_CONCURRENCY": str(bench.WORKERS), "LOG_DIR": str(workdir / "logs"),
           "SPOOL_DIR": str(workdir / "spool"), "LOG_LEVEL": "WARNING",
           "METRICS_CACHE_SECONDS": "0", "MAINTENANCE_INTERVAL_SECONDS": "0",
           **bench.NEVER_REFUSE}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
        cwd=SERVICE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while bench.get(f"{base}/health/ready")[0] != 200:
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit("bench: history: server did not start")
        time.sleep(0.05)
    return server, base


def run() -> str:
    """Load, measure at each size; return the markdown table (also printed).
    """
    dbname = f"mlops_history_{uuid.uuid4().hex[:8]}"
    bench.admin(f'CREATE DATABASE "{dbname}"')
    url = bench.with_dbname(bench.ADMIN_URL, dbname)
    conn = psycopg2.connect(url)
    conn.autocommit = True
    migrate.apply(conn)
    workdir = Path(tempfile.mkdtemp(prefix="mlops-history-"))
    results, loaded = [], 0
    try:
        for size in SIZES:
            seconds = load(url, loaded + 1, size)
            rate = (size - loaded) / seconds
            loaded = size
            server, base = serve(url, workdir)
            try:
                figures = measure(base, url)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=30)
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM mlops_rollup_daily")
                rollup_rows = cur.fetchone()[0]
            figures.update(size=size, load_rate=rate, rollup_rows=rollup_rows)
            print(f"bench: history at {size:,}: {figures}", flush=True)
            results.append(figures)
    finally:
        conn.close()
        bench.admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    def row(label: str, cell, note: str = "") -> str:
        return f"| {label} | " + " | ".join(cell(r) for r in results) + f" | {note} |"

    first, last = results[0], results[-1]
    table = "\n".join([
        "## History: reads read rollups (bench/history.py)",
        "",
        "Events spread over 60 days, 200 businesses, the busiest holding 10%; "
        "loaded through `store.insert_sql` (events + rollups, as the service writes them).",
        "",
        "| measure | " + " | ".join(f"{r['size']:,} events" for r in results) + " | notes |",
        "|---|" + "---|" * len(results) + "---|",
        row("`POST /refresh-metrics` p95", lambda r: f"{r['refresh_p95']:.1f} ms",
            f"target ≤ 20 ms; {last['refresh_p95'] / first['refresh_p95']:.2f}× across sizes"),
        row("`/metrics` scrape, stale gauges, p50 / p95",
            lambda r: f"{r['scrape_p50']:.1f} / {r['scrape_p95']:.1f} ms",
            "METRICS_CACHE_SECONDS=0: every scrape re-reads Postgres"),
        row(f"`/analytics/{BUSIEST}?days=30` p95", lambda r: f"{r['analytics_p95']:.1f} ms",
            f"target ≤ 50 ms; {last['analytics_p95'] / first['analytics_p95']:.2f}× across sizes"),
        row("… its window", lambda r: f"{r['busiest_messages']:,} messages, "
            f"{r['busiest_conversations']:,} conversations"),
        row("store only: `BusinessTotals(30).read` / `business_totals(30)` / "
            "`analytics(busiest, 30)` p95",
            lambda r: f"{r['window_p95']:.1f} / {r['totals_p95']:.1f} / "
            f"{r['store_analytics_p95']:.1f} ms",
            "the SQL behind the reads, on a pooled connection, no HTTP; the gauges use "
            "the first, warm (settled days kept)"),
        row("store only: `insert_events` CPU per event, client / Postgres, groups of "
            + " / ".join(str(n) for n, _, _ in first["groups"]),
            lambda r: " / ".join(f"{c:.0f}" for _, c, _ in r["groups"]) + " µs; "
            + " / ".join(f"{p:.0f}" for _, _, p in r["groups"]) + " µs",
            "as in the table above, with the history in place: what a write costs"),
        row("retention delete rate", lambda r: f"{r['delete_rate']:,.0f} events/s",
            "batches of 5,000, events older than 45 days, ≤ 10 s"),
        row("load rate (events + rollups)", lambda r: f"{r['load_rate']:,.0f} events/s",
            f"{CHUNK:,} per transaction"),
        row("`mlops_rollup_daily` rows", lambda r: f"{r['rollup_rows']:,}"),
        "",
    ])
    print(table)
    return table


if __name__ == "__main__":
    run()
