"""The hub client: what goes on the wire, and how every kind of answer is turned
into bytes, JSON, `HubProblem` or `HubUnreachable`."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from sync.http_signature import sign_request, verify_request
from sync.keys import KemAlgorithm, KeyPairs
from sync.transport import (
    MIN_UPLINK_BYTES_PER_S,
    PULL_PATH,
    HubClient,
    HubProblem,
    HubUnreachable,
)

Handler = Callable[[httpx.Request], httpx.Response]


@contextmanager
def hub_client(handler: Handler, **options: float) -> Iterator[HubClient]:
    with httpx.Client(transport=httpx.MockTransport(handler), base_url="http://hub.test/") as http:
        yield HubClient(http, **options)


def problem(status: int, code: str, detail: str, **extra: Any) -> httpx.Response:
    body = {
        "type": f"urn:fieldreg:problem:{code}",
        "title": "Conflict",
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    return httpx.Response(
        status, content=json.dumps(body), headers={"content-type": "application/problem+json"}
    )


def octets(data: bytes) -> httpx.Response:
    return httpx.Response(200, content=data, headers={"content-type": "application/octet-stream"})


def test_hub_info_and_enrol_return_json_with_explicit_timeouts() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/api/v1/hub":
            return httpx.Response(200, json={"epoch": "e1", "protocol": 1})
        return httpx.Response(200, json={"echo": json.loads(request.content)})

    with hub_client(handler, read_timeout_s=7.5) as client:
        assert client.base_url == "http://hub.test"
        assert client.hub_info() == {"epoch": "e1", "protocol": 1}
        assert client.enrol({"code": "C"}) == {"echo": {"code": "C"}}
    assert [r.method for r in seen] == ["GET", "POST"]
    assert seen[1].url.path == "/api/v1/enrol"
    timeout = seen[0].extensions["timeout"]
    assert (timeout["connect"], timeout["read"]) == (10.0, 7.5)


def test_push_posts_octets_and_returns_the_answer_bytes() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return octets(b"sealed ack")

    with hub_client(handler) as client:
        assert client.push(b"sealed batch") == b"sealed ack"
    assert seen[0].url.path == "/api/v1/sync/push"
    assert seen[0].headers["content-type"] == "application/octet-stream"
    assert seen[0].content == b"sealed batch"


def test_a_request_body_lengthens_the_wait_by_its_upload_time_on_a_slow_link() -> None:
    # The kernel takes the whole body at once: the wait for the answer starts while
    # it is still on its way, so the timeout allows for it at 64 kbit/s.
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/api/v1/enrol":
            return httpx.Response(200, json={})
        return octets(b"answer")

    with hub_client(handler, read_timeout_s=5.0, connect_timeout_s=3.0) as client:
        client.push(b"x" * 80_000)
        client.enrol({"code": "C" * 800})
        client.pull("limit=1", {})
    push, enrol, pull = (r.extensions["timeout"] for r in seen)
    assert push["connect"] == 3.0
    assert push["read"] == push["write"] == 5.0 + 80_000 / MIN_UPLINK_BYTES_PER_S == 15.0
    assert enrol["read"] == 5.0 + len(seen[1].content) / MIN_UPLINK_BYTES_PER_S
    assert (pull["connect"], pull["read"]) == (3.0, 5.0)


def test_pull_query_travels_exactly_as_signed() -> None:
    keys = KeyPairs.generate(KemAlgorithm.X25519)
    query = "cursor=ZXBvY2g6MTI%3D%2B%2F&limit=500"
    headers = sign_request(
        method="GET",
        path=PULL_PATH,
        query=query,
        key_id="dev-1",
        private_key=keys.signing,
        created=1_700_000_000,
    )

    def handler(request: httpx.Request) -> httpx.Response:
        verify_request(
            method=request.method,
            path=request.url.path,
            query=request.url.query.decode("ascii"),
            headers=request.headers,
            public_key=keys.public().signing_public_key(),
        )
        return octets(b"page")

    with hub_client(handler) as client:
        assert client.pull(query, headers) == b"page"
        with pytest.raises(ValueError, match="percent-encode"):
            client.pull("cursor=a b&limit=1", headers)


def test_problem_body_becomes_hub_problem_with_extra() -> None:
    with (
        hub_client(
            lambda _: problem(409, "batch.gap", "expected sequence 5 next", expected_seq=5)
        ) as client,
        pytest.raises(HubProblem) as info,
    ):
        client.push(b"x")
    exc = info.value
    assert (exc.status, exc.code, exc.detail) == (409, "batch.gap", "expected sequence 5 next")
    assert exc.extra == {"expected_seq": 5}
    assert str(exc) == "batch.gap: expected sequence 5 next"


@pytest.mark.parametrize(
    ("response", "status", "fragment"),
    [
        (httpx.Response(502, text="<html>Bad gateway</html>"), 502, "without a problem body"),
        (
            httpx.Response(
                403, content=b"{not json", headers={"content-type": "application/problem+json"}
            ),
            403,
            "unreadable problem body",
        ),
        (
            httpx.Response(
                403,
                content=b"[" * 100_000 + b"]" * 100_000,
                headers={"content-type": "application/problem+json"},
            ),
            403,
            "unreadable problem body",
        ),
        (
            httpx.Response(
                409,
                json={"detail": "no code"},
                headers={"content-type": "application/problem+json"},
            ),
            409,
            "lacking code or detail",
        ),
        (httpx.Response(200, json={"ok": True}), 200, "expected application/octet-stream"),
        (httpx.Response(302, headers={"location": "/elsewhere"}), 302, "without a problem body"),
    ],
)
def test_answers_outside_the_protocol_are_bad_answers(
    response: httpx.Response, status: int, fragment: str
) -> None:
    with hub_client(lambda _: response) as client, pytest.raises(HubProblem) as info:
        client.push(b"x")
    assert (info.value.code, info.value.status) == ("hub.bad_answer", status)
    assert fragment in info.value.detail


def test_a_json_answer_nested_too_deep_is_a_bad_answer() -> None:
    deep = httpx.Response(
        200, content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"}
    )
    with hub_client(lambda _: deep) as client, pytest.raises(HubProblem, match="not valid JSON"):
        client.hub_info()


def test_json_calls_refuse_other_content() -> None:
    with hub_client(lambda _: octets(b"[]")) as client, pytest.raises(HubProblem) as info:
        client.hub_info()
    assert info.value.code == "hub.bad_answer"
    json_list = httpx.Response(200, json=[1, 2])
    with hub_client(lambda _: json_list) as client, pytest.raises(HubProblem, match="object"):
        client.hub_info()


@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (httpx.ConnectError("connection refused"), "connection refused"),
        (httpx.ReadError("connection reset by peer"), "connection reset"),
        (httpx.ReadTimeout("timed out"), "no answer in time (ReadTimeout)"),
        (httpx.RemoteProtocolError("server disconnected"), "server disconnected"),
    ],
)
def test_network_failures_are_unreachable(error: httpx.TransportError, fragment: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    with hub_client(handler) as client, pytest.raises(HubUnreachable) as info:
        client.push(b"x")
    assert fragment in info.value.detail


def test_a_closed_port_on_loopback_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The socket is closed again: nothing listens on that port.
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{port}") as http,
        pytest.raises(HubUnreachable),
    ):
        HubClient(http, connect_timeout_s=2).hub_info()
