"""`HubClient.push(on_sent=...)` over a real socket: the push loop waits for it
before it goes on reading, so it must come once the request is written, and
never for a request that was not."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from sync.transport import HubClient, HubUnreachable
from tests.hubkit import free_port


class _Echo(BaseHTTPRequestHandler):
    """Answers a push with its own body reversed, once it has read all of it."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.bodies.append(body)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[::-1])

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def echo_server() -> Iterator[tuple[str, list[bytes]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.bodies  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_on_sent_comes_once_per_request_before_the_answer() -> None:
    envelope = bytes(range(256)) * 1024  # 256 KiB: more than one write
    calls: list[str] = []
    with echo_server() as (url, bodies), httpx.Client(base_url=url) as http:
        client = HubClient(http)
        for n in (1, 2):  # a fresh connection, then a kept one
            answer = client.push(envelope, on_sent=lambda: calls.append("sent"))
            assert answer == envelope[::-1]
            assert calls == ["sent"] * n
    assert bodies == [envelope, envelope]


def test_on_sent_never_comes_for_a_request_that_was_not_written() -> None:
    calls: list[str] = []
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens
    with httpx.Client(base_url=url) as http, pytest.raises(HubUnreachable):
        HubClient(http).push(b"FRGE", on_sent=lambda: calls.append("sent"))
    assert calls == []
