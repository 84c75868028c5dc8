"""Rollouts and restarts under the chat app's traffic, with real parts (no cluster runs here).

A Kubernetes rolling update is simulated with what plays each part for real:
two gunicorn servers with the project's gunicorn.conf.py (the pods, each with
its own spool folder, as each pod has its own emptyDir) behind HAProxy (the
Service), which learns which instances are ready only from their
``/health/ready`` (the endpoints controller reading readiness probes).

HAProxy runs in TCP mode, like kube-proxy: it picks an instance per new
connection and never looks inside the request. It does not retry: with
``retries 0`` and no ``redispatch``, a connection it cannot open to the chosen
instance is closed on the client, which then sees an error. A Service does not
retry either, so a retry here would hide exactly the failures under test.

The load is the chat app's: per message, ``POST /track`` (5 s timeout) then
``POST /refresh-metrics`` (3 s), each on a fresh connection, never retried,
at 50 messages per second.
"""

from __future__ import annotations

import csv
import io
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
import requests
from conftest import empty_tables
from payloads import varied
from pgcluster import free_port
from servers import Gunicorn
from support import wait_drained, wait_until

from mlops.spool import Spool

pytestmark = [pytest.mark.system, pytest.mark.rollout]

RATE = 50  # messages per second
PRESTOP_SECONDS = 2.0  # the pod's preStop pause, played by SHUTDOWN_DELAY_SECONDS
CHECK_INTERVAL_MS = 200  # HAProxy's readiness checks: every 200 ms, one failure marks down


@dataclass
class Call:
    path: str
    event_id: str
    sent_at: float  # time.monotonic()
    status: int | None  # None: no HTTP answer
    error: str | None  # "refused", "timeout" or "other: ..."


def classify(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timeout"
    if "Connection refused" in str(exc):
        return "refused"
    return f"other: {exc}"


class ChatApp:
    """The Next.js app's calls, one message every 1/RATE s, from a thread pool."""

    def __init__(self, url: str, business_id: str) -> None:
        self.url = url
        self.business_id = business_id
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _post(self, path: str, event_id: str, body: dict, timeout: float) -> None:
        sent = time.monotonic()
        try:
            response = requests.post(self.url + path, json=body, timeout=timeout)
            status, error = response.status_code, None
        except requests.RequestException as exc:
            status, error = None, classify(exc)
        with self._lock:
            self.calls.append(Call(path, event_id, sent, status, error))

    def _message(self, event: dict) -> None:
        self._post("/track", event["event_id"], event, 5.0)
        self._post("/refresh-metrics", event["event_id"], {"trigger": "new_metrics"}, 3.0)

    def _run(self) -> None:
        events = varied(RATE * 120, [self.business_id], seed=12)
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=32) as pool:
            for index, event in enumerate(events):
                delay = start + index / RATE - time.monotonic()
                if self._stop.wait(max(delay, 0)):
                    break
                pool.submit(self._message, {**event, "event_id": str(uuid.uuid4())})

    def start(self) -> ChatApp:
        self._thread.start()
        return self

    def wait_messages(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` /track calls have been answered (or failed)."""
        wait_until(lambda: self.tracked() >= count, f"{count} answered messages (had "
                   f"{self.tracked()} when the wait began)", timeout=timeout)

    def tracked(self) -> int:
        with self._lock:
            return sum(c.path == "/track" for c in self.calls)

    def stop(self) -> list[Call]:
        self._stop.set()
        self._thread.join(timeout=15)  # the pool waits for calls in flight (5 s at most)
        return list(self.calls)


def failures(calls: list[Call], path: str) -> Counter:
    """``{"refused": n, "timeout": n, "other: …": n, "HTTP 5xx": n}`` for ``path``."""
    found = Counter()
    for call in calls:
        if call.path != path:
            continue
        if call.error:
            found[call.error] += 1
        elif not 200 <= call.status < 300:
            found[f"HTTP {call.status}"] += 1
    return found


def acknowledged(calls: list[Call]) -> set[str]:
    return {c.event_id for c in calls
            if c.path == "/track" and c.status is not None and 200 <= c.status < 300}


def stored(database_url: str, business_id: str) -> Counter:
    """``{event_id: rows}`` in Postgres for ``business_id``."""
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT event_id, count(*) FROM mlops_events WHERE business_id = %s "
                    "GROUP BY event_id", (business_id,))
        rows = Counter(dict(cur.fetchall()))
    conn.close()
    return rows


class HAProxy:
    """Debian's haproxy in the foreground, TCP mode, checking ``/health/ready``."""

    def __init__(self, folder: Path, servers: dict[str, int]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket_path = folder / "haproxy.sock"
        self.config = folder / "haproxy.cfg"
        lines = [
            "global",
            f"    stats socket {self.socket_path} mode 600 level admin",
            "    maxconn 4096",
            "defaults",
            "    mode tcp",
            "    timeout connect 1s",
            "    timeout client 10s",
            "    timeout server 10s",
            "    timeout check 1s",
            "    retries 0",  # no second attempt: a failed connect reaches the client
            "frontend chat_app",
            f"    bind 127.0.0.1:{self.port}",
            "    default_backend mlops",
            "backend mlops",
            "    balance roundrobin",
            "    option httpchk",
            "    http-check send meth GET uri /health/ready",
            "    http-check expect status 200",
            f"    default-server check inter {CHECK_INTERVAL_MS}ms fall 1 rise 1",
            *(f"    server {name} 127.0.0.1:{port}" for name, port in servers.items()),
        ]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> HAProxy:
        check = subprocess.run(["haproxy", "-c", "-f", str(self.config)], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        def serving() -> bool:
            assert self.proc.poll() is None, "haproxy exited"
            return self.socket_path.exists() and port_open(self.port)

        wait_until(serving, "haproxy to listen", timeout=10, interval=0.02)
        return self

    def stats(self) -> dict[str, dict]:
        """``show stat`` per server: ``{name: {"status": "UP"|"DOWN"|…, "stot": sessions}}``."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket_path))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == "mlops"
                and r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_status(self, server: str, status: str, timeout: float = 10.0) -> float:
        """Seconds until HAProxy reports ``server`` as ``status``."""
        started = time.monotonic()
        wait_until(lambda: self.stats()[server]["status"] == status,
                   f"haproxy to report {server} {status}", timeout=timeout, interval=0.01)
        return time.monotonic() - started

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


class PortWatch:
    """Probes a port every 2 ms with a TCP connect; records when it was refused."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.closed_at: list[float] = []  # monotonic times of refused probes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            if not port_open(self.port):
                self.closed_at.append(now)
            time.sleep(0.002)  # the probes' pace

    def __enter__(self) -> PortWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def closed_seconds(self) -> float:
        """From the first to the last refused probe (0 if none was refused)."""
        return self.closed_at[-1] - self.closed_at[0] if self.closed_at else 0.0


@pytest.fixture
def servers(service_env, tmp_path, database_url):
    """Factory for gunicorn servers with their own spool and log folders; all stopped after,
    and the events table emptied (as conftest's fixtures leave it)."""
    started: list[Gunicorn] = []

    def make(name: str, **env) -> Gunicorn:
        folder = tmp_path / name
        server = Gunicorn({**service_env, "SPOOL_DIR": str(folder / "spool"),
                           "LOG_DIR": str(folder / "logs"),
                           **{k: str(v) for k, v in env.items()}}, workers=2)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(signal.SIGQUIT)  # gunicorn's quick stop: no drain pause in teardown
    empty_tables(database_url)


@pytest.fixture
def haproxy_binary():
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy not found: `apt-get install -y haproxy` "
                    "(`make system-deps` installs it)")


def test_a_rolling_update_behind_a_load_balancer_refuses_and_loses_nothing(
        servers, haproxy_binary, tmp_path, database_url):
    old = servers("old", SHUTDOWN_DELAY_SECONDS=PRESTOP_SECONDS)
    new = servers("new", SHUTDOWN_DELAY_SECONDS=PRESTOP_SECONDS)
    old.start(wait_for="/health/ready")
    balancer = HAProxy(tmp_path, {"old": old.port, "new": new.port}).start()
    try:
        balancer.wait_status("old", "UP")
        balancer.wait_status("new", "DOWN")  # not started yet: no traffic may go there
        business = f"biz-rollout-{uuid.uuid4().hex[:8]}"
        app = ChatApp(balancer.url, business).start()
        app.wait_messages(RATE)  # a second of traffic on the old pod alone

        # Kubernetes' sequence for one pod of a Deployment (maxSurge 1, maxUnavailable 0):
        new.start(wait_for="/health/ready")           # the new pod passes its readiness probe
        balancer.wait_status("new", "UP")             # ... and joins the Service's endpoints
        app.wait_messages(app.tracked() + RATE)       # both serve for a second
        old.proc.send_signal(signal.SIGTERM)          # the old pod: unready at once,
        unready_after = balancer.wait_status("old", "DOWN")   # dropped from the endpoints,
        assert old.proc.wait(timeout=PRESTOP_SECONDS + 15) == 0  # pause, then a graceful stop
        app.wait_messages(app.tracked() + RATE)       # a second on the new pod alone
        calls = app.stop()
        sessions = {name: int(row["stot"]) for name, row in balancer.stats().items()}
    finally:
        balancer.stop()

    wait_drained(new.url)
    track, refresh = failures(calls, "/track"), failures(calls, "/refresh-metrics")
    rows = stored(database_url, business)
    ok = acknowledged(calls)
    sent = sum(c.path == "/track" for c in calls)
    print(f"\nrolling update at {RATE} msg/s: {sent} messages, /track failures {dict(track)}, "
          f"/refresh-metrics failures {dict(refresh)}, old unready in LB after "
          f"{unready_after * 1000:.0f} ms, sessions per instance {sessions}, "
          f"rows {sum(rows.values())}")
    assert track == Counter(), "the chat app lost messages during the rollout"
    assert refresh == Counter()
    assert sessions["old"] > 0 and sessions["new"] > 0
    assert unready_after < PRESTOP_SECONDS, "the pause must outlast the LB noticing"
    assert set(rows) == ok and len(ok) == sent
    assert set(rows.values()) == {1}, "an event was stored twice"
    # The old pod's spool (an emptyDir, gone with the pod) was left empty.
    assert Spool(Path(old.env["SPOOL_DIR"]), 1 << 20).depth() == 0


def test_a_single_instance_restart_costs_refused_messages_and_a_reload_costs_none(
        servers, database_url):
    first = servers("first").start(wait_for="/health/ready")
    business = f"biz-restart-{uuid.uuid4().hex[:8]}"
    app = ChatApp(first.url, business).start()
    app.wait_messages(RATE)

    # A full restart (stop, then start), as `docker restart` or a container
    # restart in a pod does it: the port is closed from SIGTERM until the new
    # master binds it.
    with PortWatch(first.port) as watch:
        term_at = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=15) == 0
        exited_at = time.monotonic()
        second = servers("second")
        second.port, second.url = first.port, first.url
        second.env.update(SERVICE_PORT=str(first.port), SPOOL_DIR=first.env["SPOOL_DIR"])
        second.start(wait_for="/health/ready")
    closed = watch.closed_seconds()
    bound_after = watch.closed_at[-1] - exited_at if watch.closed_at else 0.0
    app.wait_messages(app.tracked() + RATE)
    restart_calls = app.stop()

    # gunicorn's graceful reload (`make reload`): new workers, the same listener.
    reload_business = f"biz-reload-{uuid.uuid4().hex[:8]}"
    app = ChatApp(second.url, reload_business).start()
    app.wait_messages(RATE)
    with PortWatch(second.port) as reload_watch:
        workers = set(second.worker_pids())
        second.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: not set(second.worker_pids()) & workers
                   and len(second.worker_pids()) >= 2, "the reload to replace the workers",
                   timeout=20)
        app.wait_messages(app.tracked() + RATE)
    reload_calls = app.stop()
    wait_drained(second.url)

    restart, reload = failures(restart_calls, "/track"), failures(reload_calls, "/track")
    print(f"\nfull restart at {RATE} msg/s: {sum(c.path == '/track' for c in restart_calls)} "
          f"messages, /track failures {dict(restart)}, port closed {closed * 1000:.0f} ms "
          f"(SIGTERM to exit {(exited_at - term_at) * 1000:.0f} ms, exit to new bind "
          f"{bound_after * 1000:.0f} ms); "
          f"reload (HUP): {sum(c.path == '/track' for c in reload_calls)} messages, "
          f"/track failures {dict(reload)}, "
          f"port closed {reload_watch.closed_seconds() * 1000:.0f} ms")
    # Stopping refuses new connections and never resets or half-answers one:
    # the only failures are refusals, and no acknowledged event is lost.
    assert set(restart) <= {"refused"}
    assert closed > 0 and restart["refused"] > 0, "the restart never closed the port"
    assert reload == Counter() and reload_watch.closed_seconds() == 0
    for calls, biz in ((restart_calls, business), (reload_calls, reload_business)):
        rows = stored(database_url, biz)
        assert set(rows) == acknowledged(calls) and set(rows.values()) == {1}
