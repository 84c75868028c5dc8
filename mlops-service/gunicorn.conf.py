"""gunicorn settings for mlops-service (``gunicorn -c gunicorn.conf.py app:app``).

Read by gunicorn from the working directory. The server's settings come from
the service's own declarations (``mlops.config.ServerSettings``: the
environment, then `.env`, as for the app): ``HOST`` and ``SERVICE_PORT``
(bind), ``WEB_CONCURRENCY`` (workers, default 2),
``GUNICORN_WORKER_CONNECTIONS``, ``LOG_LEVEL``, ``PROMETHEUS_MULTIPROC_DIR``
(default: a fresh temporary directory) and ``SHUTDOWN_DELAY_SECONDS`` (see
``when_ready``); docs/configuration.md has the table. A bad value stops
gunicorn with one line naming it.
"""

import os
import shutil
import sys
import tempfile

from mlops.config import ConfigError, ServerSettings

try:
    _server = ServerSettings.from_env()
except ConfigError as exc:
    print(f"mlops-service: cannot start: {exc}", file=sys.stderr, flush=True)
    sys.exit(1)

# prometheus_client picks its multiprocess storage when first imported, so the
# directory must be in the environment before any worker imports the app.
_own_prometheus_dir = _server.prometheus_multiproc_dir is None
_prometheus_dir = str(_server.prometheus_multiproc_dir
                      or tempfile.mkdtemp(prefix="mlops-prometheus-"))
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _prometheus_dir

bind = f"{_server.host}:{_server.service_port}"
# One worker per core, each serving its connections as gevent greenlets, so
# concurrent /track calls share one commit (measurements: bench/layouts.md).
workers = _server.workers
# gunicorn's gevent worker with psycopg2 made cooperative, closing its listener
# without resetting queued connections on shutdown (see mlops/gunicorn_worker.py).
worker_class = "mlops.gunicorn_worker.DrainingGeventWorker"
worker_connections = _server.gunicorn_worker_connections
# No worker recycling: every recycled worker would leave metric files behind.
max_requests = 0
timeout = 30
# Well inside `docker stop`'s 10 s: finish in-flight requests, drain the spool.
graceful_timeout = 8
# After SIGTERM, serve this long with /health/ready at 503 before the graceful
# stop, so a load balancer checking readiness moves traffic away first
# (mlops/draining.py). Total stop time: this + graceful_timeout at most.
shutdown_delay_seconds = _server.shutdown_delay_seconds
keepalive = 5
# The heartbeat file on tmpfs: /tmp is a disk in containers, and a slow disk
# stalls workers into timeouts.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# One JSON line per request comes from the app itself (mlops/logs.py).
accesslog = None
errorlog = "-"
loglevel = _server.log_level.lower()
# gunicorn's control socket (a file under $HOME) is not used by this service.
control_socket_disable = True


def on_starting(server):
    """Master, before forking: fresh metric files, then the service's one start-up
    sequence (``mlops.start_server``: embedded PostgreSQL if asked, settings,
    migrations, logging, spool, start-up line); it exits at once on a bad
    config, database or migration file."""
    os.makedirs(_prometheus_dir, exist_ok=True)
    for name in os.listdir(_prometheus_dir):
        path = os.path.join(_prometheus_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    from mlops import start_server

    start_server(exit_now=os._exit)


def when_ready(server):
    """Master, listening: SIGTERM drains for ``shutdown_delay_seconds`` first."""
    from mlops import draining

    draining.delay_sigterm(shutdown_delay_seconds)


def post_fork(server, worker):
    """Worker, before loading the app: ``WEB_CONCURRENCY`` says how many workers run now
    (also when set by ``--workers``), so each divides the memory:// rate limits
    among them (mlops/ratelimit.py)."""
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
        shutil.rmtree(_prometheus_dir, ignore_errors=True)
    exit_now_if_clean(StopIteration)
