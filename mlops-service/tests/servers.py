"""Real gunicorn processes for tests: started on a free port, stopped by signal."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from pgcluster import free_port

SERVICE_DIR = Path(__file__).resolve().parent.parent


class Gunicorn:
    """``gunicorn -c gunicorn.conf.py app:app`` in the service folder, as a user runs it."""

    def __init__(self, env: dict[str, str], workers: int = 3) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Tests send far faster than a chat app from one address: limits are off
        # unless a test turns them on (test_ratelimit.py, test_auth.py).
        self.env = {**os.environ, "RATE_LIMIT_ENABLED": "false", **env,
                    "SERVICE_PORT": str(self.port),
                    "WEB_CONCURRENCY": str(workers)}
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc: subprocess.Popen | None = None
        self.output = Path(env.get("LOG_DIR", "/tmp")) / f"gunicorn-{self.port}.out"

    def start(self, wait_for: str = "/health", timeout: float = 20.0) -> Gunicorn:
        """Start and wait until ``wait_for`` answers 200."""
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
                cwd=SERVICE_DIR, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + wait_for, timeout=1).status_code == 200:
                    return self
            except requests.RequestException:  # refused, reset or read timeout while booting
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn not ready in {timeout}s:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        """PIDs of the master's worker processes."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` to the master and wait; return its exit code.

        First the test process lets go of the connections it no longer uses:
        a finished ``requests`` response can sit in a reference cycle with its
        kept-alive socket open, and a gevent worker stopping gracefully waits on
        an idle kept-alive connection for gunicorn's ``keepalive`` (5 s).
        """
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        gc.collect()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        """Everything gunicorn and the app printed so far."""
        return self.output.read_text(errors="replace") if self.output.exists() else ""
