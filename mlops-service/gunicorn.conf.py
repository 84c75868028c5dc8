"""gunicorn settings for mlops-service (``gunicorn -c gunicorn.conf.py app:app``).

Read by gunicorn from the working directory. Environment: ``HOST`` (bind
address, default 127.0.0.1, this machine only; the image sets 0.0.0.0),
``SERVICE_PORT`` (default 5001), ``WEB_CONCURRENCY`` (workers, default 2),
``GUNICORN_WORKER_CONNECTIONS`` (concurrent connections per worker, default
1000), ``PROMETHEUS_MULTIPROC_DIR`` (default: a fresh
temporary directory), ``SHUTDOWN_DELAY_SECONDS`` (default 0; see
``when_ready``).
"""

import os
import shutil
import sys
import tempfile

# prometheus_client picks its multiprocess storage when first imported, so the
# directory must be in the environment before any worker imports the app.
_own_prometheus_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
if _own_prometheus_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mlops-prometheus-")

bind = f"{os.environ.get('HOST') or '127.0.0.1'}:{os.environ.get('SERVICE_PORT', '5001')}"
# One worker per core, each serving its connections as gevent greenlets, so
# concurrent /track calls share one commit (measurements: bench/layouts.md).
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# gunicorn's gevent worker with psycopg2 made cooperative, closing its listener
# without resetting queued connections on shutdown (see mlops/gunicorn_worker.py).
worker_class = "mlops.gunicorn_worker.DrainingGeventWorker"
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
# No worker recycling: every recycled worker would leave metric files behind.
max_requests = 0
timeout = 30
# Well inside `docker stop`'s 10 s: finish in-flight requests, drain the spool.
graceful_timeout = 8
# After SIGTERM, serve this long with /health/ready at 503 before the graceful
# stop, so a load balancer checking readiness moves traffic away first
# (mlops/draining.py). Total stop time: this + graceful_timeout at most.
shutdown_delay_seconds = float(os.environ.get("SHUTDOWN_DELAY_SECONDS", "0"))
keepalive = 5
# The heartbeat file on tmpfs: /tmp is a disk in containers, and a slow disk
# stalls workers into timeouts.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# One JSON line per request comes from the app itself (mlops/logs.py).
accesslog = None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# gunicorn's control socket (a file under $HOME) is not used by this service.
control_socket_disable = True


def on_starting(server):
    """Master, before forking: fresh metric files; migrate once; fail fast on a bad
    config, database or migration file."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    from mlops import announce, embedded, logs
    from mlops.config import ConfigError, Settings
    from mlops.db import DatabaseMisconfigured, MigrationError, check_at_start
    from mlops.spool import Spool

    try:
        pgdata = embedded.start_if_asked()  # DATABASE_URL unset or `embedded`
        settings = Settings.from_env()
        database = check_at_start(settings)
    except (ConfigError, DatabaseMisconfigured, MigrationError) as exc:
        embedded.stop()
        print(f"mlops-service: cannot start: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    logs.configure(settings.log_dir, settings.log_level, settings.spool_dir)
    # Create the spool file (and its WAL mode) once, before the workers race to.
    Spool(settings.spool_dir, settings.spool_max_bytes).close()
    announce(settings, database, embedded_pgdata=pgdata)


def when_ready(server):
    """Master, listening: SIGTERM drains for ``shutdown_delay_seconds`` first."""
    from mlops import draining

    draining.delay_sigterm(shutdown_delay_seconds)


def post_fork(server, worker):
    """Worker, before loading the app: ``WEB_CONCURRENCY`` says how many workers run now
    (also when set by ``--workers``), so each divides the memory:// rate limits
    among them (mlops/limits.py)."""
    os.environ["WEB_CONCURRENCY"] = str(server.num_workers)


def post_worker_init(worker):
    """Worker, app loaded: read the Postgres-derived gauges once, in the background,
    so the first /refresh-metrics or scrape after a start pays no connect and full read."""
    from mlops.services import get_services

    get_services(worker.wsgi).telemetry.state.prime()


def worker_exit(server, worker):
    """Worker, after its last request: let the spool flusher drain for a moment."""
    from mlops.gunicorn_worker import exit_now_if_clean
    from mlops.services import get_services

    if worker.wsgi is not None:  # None if the app failed to load
        get_services(worker.wsgi).shutdown(drain_seconds=3.0)
    exit_now_if_clean(SystemExit)


def child_exit(server, worker):
    """Master: a worker died; drop its live-gauge files (prometheus_client protocol)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Master, last: stop the embedded PostgreSQL if it runs one; remove the metrics directory."""
    from mlops import embedded
    from mlops.gunicorn_worker import exit_now_if_clean

    embedded.stop()
    if _own_prometheus_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    exit_now_if_clean(StopIteration)
