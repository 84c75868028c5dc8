"""A TCP proxy for tests that can be told to stop forwarding, like a network partition.

While stalled it keeps accepting and holding connections but forwards no
byte in either direction; what it read meanwhile is forwarded, in order,
once it resumes (as TCP retransmission would deliver it after a partition).
"""

from __future__ import annotations

import contextlib
import socket
import threading


class StallingProxy:
    """127.0.0.1:``port`` forwarding to 127.0.0.1:``upstream_port``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._sockets: list[socket.socket] = []
        self._refusing = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL through the proxy, as user ``postgres``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def connections(self) -> int:
        """Connections forwarded since the last :meth:`refuse` (client-upstream pairs)."""
        with self._lock:
            return len(self._sockets) // 2

    def stall(self) -> None:
        """Stop forwarding; connections stay open and new ones are accepted."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again, starting with what was held."""
        self._refusing = False
        self._flowing.set()

    def refuse(self) -> None:
        """Close every connection, and each new one at once (a server that went away)."""
        self._refusing = True
        self._flowing.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the listener and every connection."""
        self._flowing.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                self._flowing.wait()
                dst.sendall(data)
            self._flowing.wait()
            dst.shutdown(socket.SHUT_WR)
