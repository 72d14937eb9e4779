"""A TCP proxy on 127.0.0.1 that cuts connections at chosen byte offsets.

For connection number i (0-based), `plan(i)` returns None (forward it whole),
`("up", n)` (close after n bytes from the client reached the server: the
request is cut), or `("down", n)` (close after n bytes of the answer reached
the client: the hub may have committed, the client never hears). Bounded:
it serves until `stop()`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

Plan = Callable[[int], tuple[str, int] | None]


@dataclass
class ConnectionLog:
    first_bytes: bytes = b""
    cut: tuple[str, int] | None = None


@dataclass
class CuttingProxy:
    target_port: int
    plan: Plan
    connections: list[ConnectionLog] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            with self._lock:
                index = len(self.connections)
                log = ConnectionLog(cut=self.plan(index))
                self.connections.append(log)
            threading.Thread(target=self._relay, args=(client, log), daemon=True).start()

    def _relay(self, client: socket.socket, log: ConnectionLog) -> None:
        server = socket.create_connection(("127.0.0.1", self.target_port))
        closed = threading.Event()

        def close_both() -> None:
            closed.set()
            for s in (client, server):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

        def pump(src: socket.socket, dst: socket.socket, direction: str) -> None:
            budget = log.cut[1] if log.cut and log.cut[0] == direction else None
            try:
                while not closed.is_set():
                    data = src.recv(65536)
                    if not data:
                        break
                    if direction == "up" and len(log.first_bytes) < 64:
                        log.first_bytes += data[: 64 - len(log.first_bytes)]
                    if budget is not None:
                        if len(data) >= budget:
                            dst.sendall(data[:budget])
                            break
                        budget -= len(data)
                    dst.sendall(data)
            except OSError:
                pass
            if budget is not None or direction == "down":
                close_both()
            else:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        threading.Thread(target=pump, args=(client, server, "up"), daemon=True).start()
        pump(server, client, "down")

    def requests_to(self, path: str) -> int:
        """How many connections carried a request for `path`."""
        return sum(1 for c in self.connections if path.encode() in c.first_bytes)
