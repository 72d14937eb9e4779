"""The hub's HTTP API as a device sees it: four calls and two errors.

`HubClient` wraps an `httpx.Client` whose `base_url` is the hub, so a test can
hand it a client over `httpx.MockTransport`, over the ASGI app, or over a real
server on 127.0.0.1. It moves bytes and JSON and turns every failure into one
of two exceptions: `HubProblem` (the hub answered, and said no; or answered
something that is not the protocol) and `HubUnreachable` (no answer at all:
nothing is known about what the hub did). It neither seals nor opens
envelopes and keeps no state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from sync.envelope import MAX_ENVELOPE_BYTES

__all__ = [
    "CONNECT_TIMEOUT_S",
    "ENROL_PATH",
    "HUB_PATH",
    "MIN_UPLINK_BYTES_PER_S",
    "PULL_PATH",
    "PUSH_PATH",
    "READ_TIMEOUT_S",
    "HubClient",
    "HubProblem",
    "HubUnreachable",
    "request_timeout",
]

HUB_PATH = "/api/v1/hub"
ENROL_PATH = "/api/v1/enrol"
PUSH_PATH = "/api/v1/sync/push"
PULL_PATH = "/api/v1/sync/pull"
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
# The slowest uplink a request's size is allowed for: 64 kbit/s. The device's
# kernel takes a whole batch into its buffers at once, so the wait for the answer
# starts while the batch is still on its way; it is lengthened by the time the
# request takes at this rate, so a slow link's upload does not count as a silent hub.
MIN_UPLINK_BYTES_PER_S = 8_000

_JSON = "application/json"
_PROBLEM_JSON = "application/problem+json"
_OCTETS = "application/octet-stream"
_PROBLEM_KEYS = frozenset({"type", "title", "status", "code", "detail"})
_MAX_JSON_BYTES = 1024 * 1024


class HubProblem(Exception):
    """The hub answered with an error (`status`, dotted `code`, `detail`, `extra`).

    `code` "hub.bad_answer" means the answer was not the protocol at all
    (wrong content type, an error without a problem body, unreadable JSON).
    `extra` holds the problem's other members, e.g. `expected_seq`.
    """

    def __init__(
        self, status: int, code: str, detail: str, extra: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.extra: dict[str, Any] = dict(extra or {})


class HubUnreachable(Exception):
    """No answer from the hub (connection refused or dropped, timeout, TLS failure).

    The request may or may not have reached the hub: callers must only retry
    what is safe to retry (every push is, by its batch id).
    """

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _bad_answer(status: int, detail: str) -> HubProblem:
    return HubProblem(status, "hub.bad_answer", detail)


def _media_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip().lower()


def _unreachable(exc: httpx.TransportError) -> HubUnreachable:
    if isinstance(exc, httpx.TimeoutException):
        return HubUnreachable(f"no answer in time ({type(exc).__name__})")
    return HubUnreachable(str(exc) or type(exc).__name__)


def _problem(status: int, content: bytes) -> HubProblem:
    try:
        body = json.loads(content)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _bad_answer(status, f"HTTP {status} with an unreadable problem body")
    code, detail = (body.get("code"), body.get("detail")) if isinstance(body, dict) else (0, 0)
    if not isinstance(code, str) or not code or not isinstance(detail, str):
        return _bad_answer(status, f"HTTP {status} with a problem body lacking code or detail")
    extra = {k: v for k, v in body.items() if k not in _PROBLEM_KEYS}
    return HubProblem(status, code, detail, extra)


def _when_sent(on_sent: Callable[[], None]) -> Callable[[str, Mapping[str, Any]], None]:
    """An httpcore `trace` callback that calls `on_sent()` when a request's body is written."""

    def trace(event: str, info: Mapping[str, Any]) -> None:
        if event.endswith(".send_request_body.complete"):
            on_sent()

    return trace


def request_timeout(connect_s: float, read_s: float, request_bytes: int) -> httpx.Timeout:
    """Timeouts for a request of `request_bytes`: connect `connect_s`; read, write and
    pool `read_s` plus the time the request takes at `MIN_UPLINK_BYTES_PER_S`."""
    return httpx.Timeout(read_s + request_bytes / MIN_UPLINK_BYTES_PER_S, connect=connect_s)


class HubClient:
    """The device's side of the hub API over one `httpx.Client` (base URL included).

    Each call sets its own timeouts, whatever the client's defaults are:
    connect `connect_timeout_s`; read (the longest silence of the hub) and
    write `read_timeout_s`, plus, for a request with a body, the time the body
    takes to upload at `MIN_UPLINK_BYTES_PER_S` (a 256 KiB envelope: 33 s more).
    """

    def __init__(
        self,
        http: httpx.Client,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self._http = http
        self._connect_s = connect_timeout_s
        self._read_s = read_timeout_s
        self._timeout = request_timeout(connect_timeout_s, read_timeout_s, 0)

    def _timeout_for(self, content: bytes) -> httpx.Timeout:
        return request_timeout(self._connect_s, self._read_s, len(content))

    @property
    def base_url(self) -> str:
        """The hub's base URL, without a trailing slash."""
        return str(self._http.base_url).rstrip("/")

    def hub_info(self) -> dict[str, Any]:
        """`GET /api/v1/hub`: the hub's keys, fingerprint, epoch and protocol (unverified)."""
        return self._json(self._http.build_request("GET", HUB_PATH, timeout=self._timeout))

    def enrol(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """`POST /api/v1/enrol` with `payload`; return the hub's JSON answer as it came."""
        request = self._http.build_request("POST", ENROL_PATH, json=dict(payload))
        request.extensions["timeout"] = self._timeout_for(request.content).as_dict()
        return self._json(request)

    def push(self, envelope: bytes, *, on_sent: Callable[[], None] | None = None) -> bytes:
        """`POST /api/v1/sync/push` a sealed batch; return the sealed acknowledgement (unopened).

        `on_sent()` is called, on the calling thread, once the whole request is
        written to the connection and the wait for the answer begins; only
        transports that report it call it (httpx's own, through httpcore's
        `trace` extension), and never after a failure to send.
        """
        request = self._http.build_request(
            "POST",
            PUSH_PATH,
            content=envelope,
            headers={"content-type": _OCTETS},
            timeout=self._timeout_for(envelope),
        )
        if on_sent is not None:
            request.extensions["trace"] = _when_sent(on_sent)
        return self._octets(request)

    def pull(self, query: str, headers: Mapping[str, str]) -> bytes:
        """`GET /api/v1/sync/pull?{query}` with signature `headers`; return the sealed page.

        `query` goes on the wire exactly as given (already percent-encoded, no
        leading "?"), so it matches what was signed.
        """
        url = f"{PULL_PATH}?{query}" if query else PULL_PATH
        request = self._http.build_request("GET", url, headers=dict(headers), timeout=self._timeout)
        if request.url.query != query.encode("ascii"):
            raise ValueError("the query would not travel as signed: percent-encode it first")
        return self._octets(request)

    # -- the one place bytes cross the network -----------------------------------------------
    def _send(self, request: httpx.Request, limit: int) -> tuple[httpx.Response, bytes]:
        try:
            response = self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _unreachable(exc) from None
        content = bytearray()
        try:
            for chunk in response.iter_bytes():
                content += chunk
                if len(content) > limit:
                    raise _bad_answer(response.status_code, f"answer over {limit} bytes")
        except httpx.TransportError as exc:
            raise _unreachable(exc) from None
        except httpx.DecodingError:
            raise _bad_answer(response.status_code, "the answer's encoding is broken") from None
        finally:
            response.close()
        status = response.status_code
        if not 200 <= status < 300:
            if _media_type(response) == _PROBLEM_JSON:
                raise _problem(status, bytes(content))
            raise _bad_answer(status, f"HTTP {status} without a problem body")
        return response, bytes(content)

    def _json(self, request: httpx.Request) -> dict[str, Any]:
        response, content = self._send(request, _MAX_JSON_BYTES)
        if _media_type(response) != _JSON:
            raise _bad_answer(
                response.status_code, f"expected {_JSON}, got {_media_type(response) or 'none'}"
            )
        try:
            body = json.loads(content)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise _bad_answer(response.status_code, "the answer is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad_answer(response.status_code, "the answer is not a JSON object")
        return body

    def _octets(self, request: httpx.Request) -> bytes:
        response, content = self._send(request, MAX_ENVELOPE_BYTES)
        if _media_type(response) != _OCTETS:
            raise _bad_answer(
                response.status_code, f"expected {_OCTETS}, got {_media_type(response) or 'none'}"
            )
        return content
