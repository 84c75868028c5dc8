"""Benchmark mlops-service as deployed: gunicorn + the local Postgres, loaded by wrk.

Run with ``make bench``. Starts gunicorn (the project's gunicorn.conf.py) on
a free port against a database of its own on ``BENCH_DATABASE_URL``'s
server (default: the local Postgres), drives it with Debian's ``wrk`` from
a second process on loopback, and prints one markdown table, also written
to ``bench/results.md``. Every /track request counted is checked against
the rows committed in Postgres. ``python bench/run.py storage`` prints only
the storage-per-1,000-calls row (about a minute).

Environment: ``BENCH_DATABASE_URL`` (admin URL), ``WEB_CONCURRENCY``
(default 2, as gunicorn.conf.py: one gevent worker per core),
``GUNICORN_WORKER_CONNECTIONS``, ``BENCH_SECONDS`` (per wrk run, default 10).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "mlops-service"
sys.path.insert(0, str(SERVICE))
sys.path.insert(0, str(SERVICE / "tests"))
from payloads import FAILURE, SUCCESS  # noqa: E402

from mlops import store  # noqa: E402
from mlops.config import Settings  # noqa: E402
from mlops.db import Database  # noqa: E402
from mlops.schemas import Record, parse_event  # noqa: E402

ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
WORKERS = int(os.environ.get("WEB_CONCURRENCY", "2"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
CONNECTIONS = 32
BATCH_SIZE = 1000
SERIES_BUSINESSES, SERIES_MODELS = 700, 4  # about 10,000 series with the gauges
# wrk loads from one address far past a chat app's rate: the limiter still
# runs on every route (its cost is measured) but never refuses.
NEVER_REFUSE = {f"RATE_LIMIT_{group}": "1000000/second"
                for group in ("TRACK", "BATCH", "REFRESH", "READ", "ERASE")}
# Events as priced in production: known models with and without a provider and
# cached tokens, a total-only one, an unknown one.
PRICED_EVENTS = [
    SUCCESS, FAILURE, {**SUCCESS, "model_name": "gpt-4o-mini", "gen_ai.provider.name": "openai",
                       "gen_ai.usage.cache_read.input_tokens": 100},
    {**SUCCESS, "model_name": "claude-3-5-haiku", "prompt_tokens": None,
     "completion_tokens": None},
    {**SUCCESS, "model_name": "acme-chat-7b"},
]
REPEATS = 5  # throughput runs; the median is reported (this VM is noisy)
RUN_SECONDS = max(3, SECONDS // 2)  # each of those runs


def ensure_wrk() -> str:
    """wrk from Debian's package (installed on first use when running as root)."""
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() != 0:
        sys.exit("bench: wrk not found; install it: sudo apt-get install wrk")
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False,
                   stdout=subprocess.DEVNULL)
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True,
                       stdout=subprocess.DEVNULL)
    return shutil.which("wrk")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin(sql: str) -> None:
    conn = psycopg2.connect(ADMIN_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


def with_dbname(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    return base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")


# COPY text format of the batch's rows, in the store's column order (event_id,
# received_at, the contract's fields, extra); \N is NULL.
_COPY_COLUMNS = (
    "event_id", "received_at", "business_id", "conversation_id", "session_id",
    "response_time_ms", "success_rate", "user_satisfaction", "tokens_used", "prompt_tokens",
    "completion_tokens", "api_cost_usd", "model_name", "intent_detected",
    "appointment_requested", "human_handoff_requested", "appointment_booked",
    "user_message_length", "ai_response_length", "response_type", "extra",
)


def _copy_value(value: object) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


def copy_rate(url: str, events: list[dict], connections: int, seconds: float) -> float:
    """Events/s the bare database takes with ``COPY ... FROM STDIN`` of ``events`` per call,
    on ``connections`` connections at once for ``seconds``: the ceiling for /track/batch."""
    import io
    import threading
    from datetime import UTC, datetime

    def body() -> str:
        now = datetime.now(UTC).isoformat()
        lines = []
        for e in events:
            values = [uuid.uuid4().hex, now, *(e.get(c) for c in _COPY_COLUMNS[2:-1]), "{}"]
            lines.append("\t".join(map(_copy_value, values)))
        return "\n".join(lines) + "\n"

    sql = f"COPY mlops_events ({', '.join(_COPY_COLUMNS)}) FROM STDIN"
    copied = [0] * connections
    stop = time.monotonic() + seconds

    def load(index: int) -> None:
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            while time.monotonic() < stop:
                data = body()  # built per call, as the service parses each request
                cur.copy_expert(sql, io.StringIO(data))
                copied[index] += len(events)
        conn.close()

    started = time.monotonic()
    workers = [threading.Thread(target=load, args=(i,)) for i in range(connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(copied) / (time.monotonic() - started)


GROUP_SIZES = (1, 2, 4, 16)


def store_db(url: str) -> Database:
    """The service's own ``Database`` on ``url``, for measuring the store without HTTP."""
    return Database(Settings.from_env({"DATABASE_URL": url, "DB_STATEMENT_TIMEOUT_MS": "60000"}))


def _postgres_cpu_seconds() -> float:
    """User + system CPU of every process named postgres* on this machine (from /proc)."""
    ticks = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if not Path(f"/proc/{pid}/comm").read_text().startswith("postgres"):
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (proc(5))
    return ticks / os.sysconf("SC_CLK_TCK")


def group_costs(url: str, events: list[dict],
                per_size: int = 2000) -> list[tuple[int, float, float]]:
    """CPU per event of ``store.insert_events`` by group size: ``(size, client µs, Postgres µs)``.

    One connection delivers ``per_size`` events in groups of each of
    ``GROUP_SIZES``, one group after another, as the group commit of a
    ``/track`` does (insert, rollups, commit). Client CPU is this process's;
    Postgres's is read from /proc, so it is meaningful only for a server on
    this machine with nothing else running.
    """
    from datetime import UTC, datetime

    db = store_db(url)
    parsed = [parse_event(json.dumps(e).encode()) for e in events]
    costs = []
    for size in GROUP_SIZES:
        def group(size=size):
            now = datetime.now(UTC)
            return [Record(str(uuid.uuid4()), now, parsed[i % len(parsed)])
                    for i in range(size)]
        store.insert_events(db, group(), 10_000)  # warm: connection, plan
        calls = per_size // size
        client, server = time.process_time(), _postgres_cpu_seconds()
        for _ in range(calls):
            store.insert_events(db, group(), 10_000)
        client, server = time.process_time() - client, _postgres_cpu_seconds() - server
        costs.append((size, client / (calls * size) * 1e6, server / (calls * size) * 1e6))
    db.close()
    return costs


# Storage per 1,000 calls: a small product's month, 1,000 calls a day over 20
# days for 10 businesses, conversations of 8 messages (tests/payloads.py's
# varied messages), stored as /track stores them, then shards folded as the
# maintenance job does.
STORAGE_EVENTS, STORAGE_DAYS, STORAGE_BUSINESSES, CONVERSATION_MESSAGES = 20_000, 20, 10, 8
_ROLLUP_TABLES = ("mlops_rollup_daily", "mlops_rollup_latency", "mlops_rollup_intents",
                  "mlops_rollup_conversations")


def storage_per_1000() -> dict[str, float]:
    """Bytes Postgres holds per 1,000 stored calls: ``{"events", "indexes", "rollups"}``.

    In a database of its own, ``STORAGE_EVENTS`` contract events are
    inserted with ``store.insert_events`` in groups of 50, received over
    ``STORAGE_DAYS`` past UTC days; after each day its rollup shards are
    folded (``store.fold_shards``) and the rollup tables vacuumed, as the
    maintenance job and autovacuum do in steady service. ``events`` is
    ``pg_table_size('mlops_events')`` (heap, TOAST, free-space and
    visibility maps), ``indexes`` its ``pg_indexes_size``,
    ``rollups`` the ``pg_total_relation_size`` of the rollup tables (their
    indexes included), each minus its size when empty.
    """
    from datetime import UTC, datetime, timedelta

    from payloads import varied

    dbname = f"mlops_bench_storage_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{dbname}"')
    url = with_dbname(ADMIN_URL, dbname)
    sizes_sql = ("SELECT pg_table_size('mlops_events'), pg_indexes_size('mlops_events'), "
                 + " + ".join(f"pg_total_relation_size('{t}')" for t in _ROLLUP_TABLES))
    try:
        db = store_db(url)
        db.ping()  # applies the migrations

        def sizes() -> tuple[int, int, int]:
            def work(cur):
                cur.execute(sizes_sql)
                return cur.fetchone()
            return db.run(work)

        empty = sizes()
        events = varied(STORAGE_EVENTS, [f"business-{b:02d}" for b in range(STORAGE_BUSINESSES)])
        start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) \
            - timedelta(days=STORAGE_DAYS)
        step = timedelta(days=STORAGE_DAYS) / STORAGE_EVENTS
        records = []
        for i, event in enumerate(events):
            # varied() deals messages to the businesses in turn: a business's
            # 8 consecutive messages make one conversation.
            conversation = (i // (STORAGE_BUSINESSES * CONVERSATION_MESSAGES)
                            * STORAGE_BUSINESSES + i % STORAGE_BUSINESSES)
            event["conversation_id"] = str(uuid.UUID(int=conversation + 1))
            records.append(Record(str(uuid.uuid4()), start + i * step,
                                  parse_event(json.dumps(event).encode())))
        conn = psycopg2.connect(url)
        conn.autocommit = True
        per_day = STORAGE_EVENTS // STORAGE_DAYS
        for day in range(0, len(records), per_day):  # each day, then its night's maintenance
            for i in range(day, day + per_day, 50):
                store.insert_events(db, records[i:i + 50], 60_000)
            while store.fold_shards(db, 100_000):
                pass
            with conn.cursor() as cur:  # as autovacuum would, so the next day reuses the space
                cur.execute(f"VACUUM {', '.join(_ROLLUP_TABLES)}")
        with conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE")
        conn.close()
        full = sizes()
        db.close()
    finally:
        admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    per = 1000 / STORAGE_EVENTS
    return {name: (after - before) * per
            for name, before, after in zip(("events", "indexes", "rollups"), empty, full,
                                           strict=True)}


def storage_row(storage: dict[str, float]) -> tuple[str, str, str]:
    """The table row of :func:`storage_per_1000`'s figures (KiB)."""
    kib = {name: value / 1024 for name, value in storage.items()}
    return ("storage per 1,000 calls: events / their indexes / rollups",
            f"{kib['events']:.0f} / {kib['indexes']:.0f} / {kib['rollups']:.0f} KiB "
            f"({sum(kib.values()):.0f} KiB in all)",
            f"{STORAGE_EVENTS:,} varied contract events, {STORAGE_EVENTS // STORAGE_DAYS:,} a "
            f"day over {STORAGE_DAYS} days for {STORAGE_BUSINESSES} businesses, conversations "
            f"of {CONVERSATION_MESSAGES}; shards folded and vacuumed daily; pg_table_size, "
            "pg_indexes_size, pg_total_relation_size")
def _backends_cpu_seconds(db: Database) -> float:
    """User + system CPU of the client backends connected to ``db``'s database (from
    /proc): unlike every postgres process's, not moved by other databases' work, nor
    by an autovacuum worker that happens to visit this one."""
    def pids(cur):
        cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND backend_type = 'client backend'")
        return [row[0] for row in cur.fetchall()]

    ticks = 0
    for pid in db.run(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # not on this machine, or gone
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def pricing_costs(url: str, events: list[dict], rounds: int = 20, batches: int = 10,
                  size: int = BATCH_SIZE) -> tuple[float, float, float]:
    """CPU per event (client + Postgres, µs) of ``store.insert_events`` of ``size`` events
    (the COPY path of a /track/batch), with the service's pricing on and off:
    ``(median with, median without, median of the paired differences)``.

    Each round inserts ``batches`` batches, so it spans many clock ticks of /proc's
    CPU times (10 ms each). Rounds come in pairs, one with pricing and one
    without (``prices.configure``, as ``PRICES_ENABLED`` does), on one
    connection, in ABBA order (with, without, without, with, ...) so that a
    steady drift (the table growing, the machine's other load) cancels; the
    cost of pricing is the median of the ``rounds`` pairs' differences, each
    taken between two neighbouring rounds.
    Postgres's CPU is that of this database's backends. The
    same insert statement runs either way, so the difference is pricing's
    whole cost: the lookups, the arithmetic and the two values stored. Being
    a share of the store's cost alone, it is an upper bound of its share of
    a /track/batch request's (which also parses and validates the body).
    """
    from datetime import UTC, datetime

    from mlops import prices

    db = store_db(url)
    parsed = [parse_event(json.dumps(e).encode()) for e in events]
    tables = {True: prices.Table(), False: prices.Table(enabled=False)}
    figures: dict[bool, list[float]] = {True: [], False: []}
    differences: list[float] = []
    abba = [True, False, False, True] * ((rounds + 1) // 2)
    try:
        for i, enabled in enumerate([True, False, *abba[:2 * rounds]]):
            prices.configure(tables[enabled])
            client, server = 0.0, _backends_cpu_seconds(db)
            for _ in range(batches):  # one batch's records alive at a time, as in a request
                now = datetime.now(UTC)
                records = [Record(str(uuid.uuid4()), now, parsed[j % len(parsed)])
                           for j in range(size)]
                started = time.process_time()
                store.insert_events(db, records, 60_000)
                client += time.process_time() - started
            cpu = client + _backends_cpu_seconds(db) - server
            if i >= 2:  # the first of each warms the connection, plan and caches
                figures[enabled].append(cpu / (batches * size) * 1e6)
                if i % 2:  # the second round of a pair: its difference, with - without
                    with_, without = (figures[True][-1], figures[False][-1])
                    differences.append(with_ - without)
    finally:
        prices.configure(prices.Table())
        db.close()
    return (statistics.median(figures[True]), statistics.median(figures[False]),
            statistics.median(differences))


def wait_drained(base: str, timeout: float = 60.0) -> None:
    """Until the service's spool is empty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = get(f"{base}/health/detailed")
        if status == 200 and json.loads(body)["spool"]["depth"] == 0:
            return
        time.sleep(0.1)
    sys.exit("bench: the spool did not drain")


def count_rows(url: str) -> int:
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM mlops_events")
        n = cur.fetchone()[0]
    conn.close()
    return n


def settled_rows(url: str, quiet_seconds: float = 0.5) -> int:
    """The events stored once no request still in flight adds any: the count, unchanged
    over ``quiet_seconds`` (wrk stops with requests on the wire; they commit after)."""
    rows = count_rows(url)
    while True:
        time.sleep(quiet_seconds)
        rows, before = count_rows(url), rows
        if rows == before:
            return rows


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def post(url: str, body: object) -> int:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status


# Bodies a hostile client may send, each refused before it costs a worker much
# (mlops/bodies.py, schemas.parse_batch): what they do to a worker's peak memory.
HOSTILE_BODIES = (
    ("4 MB [{},…] batch", "/track/batch", b"[" + b",".join([b"{}"] * 1_333_333) + b"]"),
    ("1 MiB [{},…] batch", "/track/batch", b"[" + b",".join([b"{}"] * 349_000) + b"]"),
    ("50 MB /refresh-metrics", "/refresh-metrics", b"x" * 50_000_000),
)


def post_raw(port: int, path: str, data: bytes) -> tuple[int, float]:
    """POST ``data`` as JSON on a fresh connection; ``(status, seconds to the answer)``,
    counted from the headers or, for a body read whole, from its last byte.

    The body goes after the server has had a second to answer the headers and
    its first 64 KiB: a body refused for its length is answered before it is
    sent, as a client reading while it writes would see.
    """
    head = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head + data[:65536])
        if not select.select([sock], [], [], 1.0)[0]:
            sock.sendall(data[65536:])
            started = time.monotonic()  # from the body's last byte: the wait above was ours
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), time.monotonic() - started


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk(binary: str, url: str, script: Path | None = None, connections: int = CONNECTIONS,
        threads: int = 2, seconds: int = SECONDS) -> dict:
    """One wrk run; returns requests/s, p50/p99 in ms, total requests, non-2xx count."""
    args = [binary, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
            "--timeout", "10s"]
    if script:
        args += ["-s", str(script)]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout

    def latency(pct: str) -> float:
        value, unit = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M).groups()
        return float(value) * _UNITS[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": latency("50"), "p99": latency("99"),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "non2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def median_runs(binary: str, targets: list[tuple[str, Path | None]]) -> list[dict]:
    """``REPEATS`` rounds of one wrk run of ``RUN_SECONDS`` per ``(url, script)`` target, in
    turn; per target, the run with the median throughput, with ``requests`` and ``non2xx``
    summed over its runs and every run's rate in ``all_rps``. Taking turns spreads this
    VM's drifts over every target, so their ratios compare runs of the same minutes."""
    runs: list[list[dict]] = [[] for _ in targets]
    for _ in range(REPEATS):
        for target_runs, (url, script) in zip(runs, targets, strict=True):
            target_runs.append(wrk(binary, url, script, seconds=RUN_SECONDS))
    medians = []
    for target_runs in runs:
        middle = dict(sorted(target_runs, key=lambda r: r["rps"])[len(target_runs) // 2])
        middle["requests"] = sum(r["requests"] for r in target_runs)
        middle["non2xx"] = sum(r["non2xx"] for r in target_runs)
        middle["all_rps"] = [r["rps"] for r in target_runs]
        medians.append(middle)
    return medians


def listed(rates: list[float]) -> str:
    """Rates for a table note: whole numbers, lowest first."""
    return ", ".join(f"{r:.0f}" for r in sorted(rates))


def lua_post(path: str, bodies: list[str], delay_ms: float | None = None) -> Path:
    """A wrk script POSTing ``bodies`` in turn to ``path`` (optionally paced)."""
    quoted = ", ".join(f"[==[{b}]==]" for b in bodies)
    script = f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {{{quoted}}}
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, "{path}", nil, bodies[(i % #bodies) + 1])
end
"""
    if delay_ms:
        script += f"delay = function() return {delay_ms:.3f} end\n"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    return Path(handle.name)


# The trace id of every span of the OTLP body: 16 ASCII bytes the wrk script
# replaces per request, so each request's spans are new calls (new event ids).
OTLP_TRACE_PLACEHOLDER = b"TRACEPLACEHOLDER"


def otlp_body(events: list[dict]) -> bytes:
    """``events`` as the GenAI spans an instrumented app would export, in one protobuf
    ExportTraceServiceRequest: the same calls /track/batch stores (docs/otlp.md's mapping)."""
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    end = time.time_ns()

    def value(v: object) -> AnyValue:
        if isinstance(v, str):
            return AnyValue(string_value=v)
        return AnyValue(int_value=v) if isinstance(v, int) else AnyValue(double_value=v)

    for index, event in enumerate(events):
        attributes = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "gcp.gemini",
                      "gen_ai.request.model": event["model_name"],
                      "mlops.business_id": event["business_id"],
                      "gen_ai.usage.cost": float(event["api_cost_usd"])}
        for name, field in (("gen_ai.usage.input_tokens", "prompt_tokens"),
                            ("gen_ai.usage.output_tokens", "completion_tokens"),
                            ("gen_ai.conversation.id", "conversation_id")):
            if event.get(field) is not None:
                attributes[name] = event[field]
        if not event["success_rate"]:
            attributes["error.type"] = "timeout"
        span = spans.add(trace_id=OTLP_TRACE_PLACEHOLDER, span_id=(index + 1).to_bytes(8, "big"),
                         name="chat", kind=3, end_time_unix_nano=end,
                         start_time_unix_nano=end - int(event["response_time_ms"] * 1e6))
        span.attributes.extend(KeyValue(key=k, value=value(v)) for k, v in attributes.items())
        span.status.code = 2 if not event["success_rate"] else 0
    return request.SerializeToString()


def lua_otlp(body: bytes) -> Path:
    """A wrk script POSTing ``body`` (protobuf) to /v1/traces, each time under a trace id
    of its own (a per-script nonce, the wrk thread and a counter)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".pb", delete=False) as handle:
        handle.write(body)
    nonce = uuid.uuid4().hex[:5]
    script = f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-protobuf"
local file = io.open("{handle.name}", "rb")
local body = file:read("*a")
file:close()
-- the body cut at each trace id: table.concat(parts, trace) puts one in every cut
local parts, from = {{}}, 1
while true do
  local at = string.find(body, "{OTLP_TRACE_PLACEHOLDER.decode()}", from, true)
  if not at then break end
  parts[#parts + 1] = string.sub(body, from, at - 1)
  from = at + {len(OTLP_TRACE_PLACEHOLDER)}
end
parts[#parts + 1] = string.sub(body, from)
local next_thread = 0
function setup(thread)
  thread:set("thread_id", next_thread)
  next_thread = next_thread + 1
end
local sent = 0
request = function()
  sent = sent + 1
  local trace = string.format("{nonce}%02d%09d", thread_id, sent)
  return wrk.format(nil, "/v1/traces", nil, table.concat(parts, trace))
end
"""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    return Path(handle.name)


def worker_pids(master: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def series_count(metrics_text: str) -> int:
    return sum(1 for line in metrics_text.splitlines() if line and not line.startswith("#"))


def main() -> None:
    if sys.argv[1:] == ["storage"]:  # `python bench/run.py storage`: only that row
        print(f"| {' | '.join(storage_row(storage_per_1000()))} |")
        return
    wrk_bin = ensure_wrk()
    dbname = f"mlops_bench_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{dbname}"')
    database_url = with_dbname(ADMIN_URL, dbname)
    workdir = Path(tempfile.mkdtemp(prefix="mlops-bench-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DATABASE_URL": database_url, "SERVICE_PORT": str(port),
           "WEB_CONCURRENCY": str(WORKERS), "LOG_DIR": str(workdir / "logs"),
           "SPOOL_DIR": str(workdir / "spool"), "LOG_LEVEL": "WARNING",
           "METRICS_MAX_BUSINESSES": str(2 * SERIES_BUSINESSES),
           **NEVER_REFUSE}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)

    started = time.monotonic()
    with open(workdir / "server.log", "w") as server_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
            cwd=SERVICE, env=env, stdout=subprocess.DEVNULL, stderr=server_log)
    try:
        while get(f"{base}/health/ready")[0] != 200:
            if server.poll() is not None or time.monotonic() - started > 30:
                sys.exit(f"bench: server did not start:\n{(workdir / 'server.log').read_text()}")
            time.sleep(0.01)
        cold_start = time.monotonic() - started
        print(f"bench: gunicorn {WORKERS} gevent workers on :{port}, "
              f"ready in {cold_start:.2f}s", flush=True)

        time.sleep(2)  # let start-up settle
        # /health, /track and the rollups' hot-row check (the same events, every
        # one for one business, then spread over 100) take turns on one server
        # and database, so each ratio below compares the same minutes.
        rows_before = count_rows(database_url)
        bodies = [json.dumps(SUCCESS), json.dumps(FAILURE)]
        health, track, one, many = median_runs(wrk_bin, [
            (f"{base}/health", None),
            (base, lua_post("/track", bodies)),
            (base, lua_post("/track", [json.dumps({**event, "business_id": "hot-000"})
                                       for event in (SUCCESS, FAILURE)])),
            (base, lua_post("/track", [json.dumps({**(FAILURE if i % 2 else SUCCESS),
                                                   "business_id": f"hot-{i:03d}"})
                                       for i in range(100)])),
        ])
        stored = count_rows(database_url) - rows_before
        tracked = sum(run["requests"] for run in (track, one, many))
        assert track["non2xx"] == one["non2xx"] == many["non2xx"] == 0, (track, one, many)
        # wrk counts the requests answered within its window; the few still in
        # flight when it stops are committed too.
        assert tracked <= stored <= tracked + 3 * REPEATS * CONNECTIONS, (stored, tracked)
        print(f"bench: /health {health['rps']:.0f} req/s, /track {track['rps']:.0f} req/s, "
              f"one business {one['rps']:.0f} req/s, 100 businesses {many['rps']:.0f} req/s; "
              f"{stored} rows committed for {tracked} answers", flush=True)

        half = track["rps"] / 2
        paced_connections = 16
        paced_script = lua_post("/track", bodies,
                                delay_ms=1000.0 * paced_connections / half)
        paced = wrk(wrk_bin, base, paced_script, connections=paced_connections)
        print(f"bench: /track at {paced['rps']:.0f} req/s: p99 {paced['p99']:.1f} ms", flush=True)

        # /track/batch, the same calls as OTLP spans on /v1/traces, and the bare
        # database's COPY of the same rows take turns too; each rate is the
        # median of REPEATS runs, counting what finished inside each run's window.
        batch_events_sent = [SUCCESS if i % 2 else FAILURE for i in range(BATCH_SIZE)]
        batch_script = lua_post("/track/batch", [json.dumps(batch_events_sent)])
        otlp_spans = otlp_body(batch_events_sent)
        batch_rates, otlp_rates, copy_rates = [], [], []
        for _ in range(REPEATS):
            for script, rates in ((batch_script, batch_rates),
                                  (lua_otlp(otlp_spans), otlp_rates)):
                rows_before = settled_rows(database_url)  # the previous run's all in
                batch = wrk(wrk_bin, base, script, connections=4, seconds=RUN_SECONDS)
                wait_drained(base)  # a batch past its deadline is spooled, then flushed
                batch_events = settled_rows(database_url) - rows_before
                assert batch["non2xx"] == 0, batch
                answered = batch["requests"] * BATCH_SIZE
                assert answered <= batch_events <= answered + 4 * BATCH_SIZE, \
                    (batch_events, batch)
                rates.append(batch["rps"] * BATCH_SIZE)
            copy_rates.append(copy_rate(database_url, batch_events_sent, connections=4,
                                        seconds=RUN_SECONDS))
        batch_rate, bare_copy = statistics.median(batch_rates), statistics.median(copy_rates)
        otlp_rate = statistics.median(otlp_rates)
        print(f"bench: batch {batch_rate:.0f} events/s, OTLP {otlp_rate:.0f} events/s, "
              f"bare COPY {bare_copy:.0f} events/s", flush=True)

        # 10,000 live series: many businesses x models, spread over every worker.
        for start in range(0, SERIES_BUSINESSES, 100):
            events = [{**SUCCESS, "business_id": f"biz-{b:04d}",
                       "model_name": f"model-{m}", "appointment_booked": True}
                      for b in range(start, start + 100) for m in range(SERIES_MODELS)]
            for chunk in range(0, len(events), 100):
                post(f"{base}/track/batch", events[chunk:chunk + 100])
        _, text = get(f"{base}/metrics")
        series = series_count(text.decode())
        scrape = wrk(wrk_bin, f"{base}/metrics", connections=1, threads=1, seconds=5)
        print(f"bench: /metrics {series} series: p50 {scrape['p50']:.1f} ms", flush=True)

        rss = [peak_rss_mib(pid) for pid in worker_pids(server.pid)]
        hostile = [(name, *post_raw(port, path, body)) for name, path, body in HOSTILE_BODIES]
        hostile_rss = [peak_rss_mib(pid) for pid in worker_pids(server.pid)]
        print("bench: hostile bodies: " + ", ".join(
            f"{name} {status} in {seconds:.2f} s" for name, status, seconds in hostile)
            + f"; peak RSS {' / '.join(f'{r:.0f}' for r in hostile_rss)} MiB", flush=True)
        groups = group_costs(database_url, [SUCCESS, FAILURE])
        priced_cpu, unpriced_cpu, pricing_cpu = pricing_costs(database_url, PRICED_EVENTS)
        print(f"bench: pricing: {priced_cpu:.1f} µs per event with, {unpriced_cpu:.1f} without, "
              f"paired difference {pricing_cpu:+.1f}", flush=True)
        print("bench: insert_events CPU per event by group size: " + ", ".join(
            f"{n}: {c:.0f} + {p:.0f} µs" for n, c, p in groups), flush=True)
        storage = storage_row(storage_per_1000())
        print(f"bench: {storage[0]}: {storage[1]}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
        admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    batch_cpu = 1e6 * os.cpu_count() / batch_rate  # µs per event, all processes
    rows = [
        ("/health throughput", f"{health['rps']:.0f} req/s",
         "median of " + listed(health["all_rps"])),
        ("/health latency p50 / p99", f"{health['p50']:.2f} / {health['p99']:.2f} ms",
         f"{CONNECTIONS} connections"),
        ("/track throughput (each a committed row)", f"{track['rps']:.0f} req/s",
         "median of " + listed(track["all_rps"])
         + f"; with the hot-row runs, {tracked} answered, {stored} rows"),
        ("/track latency p50 / p99", f"{track['p50']:.2f} / {track['p99']:.2f} ms",
         f"{CONNECTIONS} connections"),
        ("/track ÷ /health", f"{track['rps'] / health['rps']:.3f}", "target ≥ 0.45"),
        ("/track, every event for one business", f"{one['rps']:.0f} req/s",
         "median of " + listed(one["all_rps"])
         + f"; ÷ /track {one['rps'] / track['rps']:.3f}; target within 10%"),
        ("/track, spread over 100 businesses", f"{many['rps']:.0f} req/s",
         "median of " + listed(many["all_rps"])
         + f"; one ÷ 100 businesses {one['rps'] / many['rps']:.3f}; target within 10%"),
        ("/track p99 at half saturation", f"{paced['p99']:.2f} ms",
         f"{paced['rps']:.0f} req/s paced; target ≤ 25 ms"),
        ("batch ingestion", f"{batch_rate:.0f} events/s",
         f"/track/batch of {BATCH_SIZE}, 4 connections, median of "
         + listed(batch_rates) + "; target ≥ 20,000"),
        ("OTLP protobuf ingest", f"{otlp_rate:.0f} events/s",
         f"/v1/traces, the same {BATCH_SIZE} calls as GenAI spans in one protobuf export "
         f"({len(otlp_spans)} bytes), 4 connections, median of " + listed(otlp_rates)
         + f"; ÷ /track/batch {otlp_rate / batch_rate:.3f}; target ≥ 0.8"),
        ("bare-database COPY of the same rows", f"{bare_copy:.0f} events/s",
         f"COPY of {BATCH_SIZE} per call, 4 connections, same table, median of "
         + listed(copy_rates)),
        ("/track/batch ÷ bare COPY", f"{batch_rate / bare_copy:.3f}", "target ≥ 0.5"),
        ("/health CPU per request at saturation", f"{1e6 * os.cpu_count() / health['rps']:.0f} µs",
         "the cores ÷ the median /health throughput"),
        ("store only: `insert_events` CPU per event, client / Postgres, groups of "
         + " / ".join(str(n) for n, _, _ in groups),
         " / ".join(f"{c:.0f}" for _, c, _ in groups) + " µs; "
         + " / ".join(f"{p:.0f}" for _, _, p in groups) + " µs",
         "one connection, one group at a time (insert, rollups, commit), on the idle server; "
         "/track's group commit shares a commit among the requests that wait together"),
        ("pricing's CPU per event in /track/batch",
         f"{pricing_cpu:+.1f} µs, {pricing_cpu / batch_cpu * 100:+.1f} %",
         f"`insert_events` of {BATCH_SIZE} (client + Postgres backends) with and without "
         f"pricing: median of the paired differences of neighbouring rounds in ABBA order "
         f"(medians {priced_cpu:.1f} µs with, {unpriced_cpu:.1f} µs without), "
         f"÷ /track/batch's CPU per event ({batch_cpu:.1f} µs: the cores ÷ the batch rate); "
         "target ≤ 5 %"),
        ("/metrics scrape p50 / p99", f"{scrape['p50']:.1f} / {scrape['p99']:.1f} ms",
         f"{series} series, {WORKERS} workers; target ≤ 50 ms"),
        ("cold start to /health/ready", f"{cold_start:.2f} s", "target ≤ 3 s"),
        storage,
        ("peak RSS per worker", " / ".join(f"{r:.0f}" for r in rss) + " MiB", "VmHWM"),
        ("peak RSS per worker after hostile bodies",
         " / ".join(f"{r:.0f}" for r in hostile_rss) + " MiB",
         "; ".join(f"{name} → {status} in {seconds:.2f} s" for name, status, seconds in hostile)
         + " (to the status line); target < 150 MiB"),
    ]
    table = "\n".join([
        f"# mlops-service benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Machine: {os.cpu_count()} cores; PostgreSQL on the same machine. Server: gunicorn "
        f"{WORKERS} gevent workers (gunicorn.conf.py). Load: wrk "
        f"{CONNECTIONS} connections, from a second process on loopback; each throughput is the "
        f"median of {REPEATS} runs of {RUN_SECONDS} s, the paced run takes {SECONDS} s.",
        "",
        "| measure | result | notes |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
    ])
    import history  # bench/history.py: the reads at 1M and 10M events stored
    table += "\n" + history.run()
    (ROOT / "bench" / "results.md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
