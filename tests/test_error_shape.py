"""Every route answers bad input with the one problem+json shape (pinned here)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from server import accounts
from server.app import create_app
from server.hub import Hub
from tests.hubkit import init_hub, live_hub

PROBLEM_KEYS = {"type", "title", "status", "code", "detail"}
PASSWORD = "error shape test password"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Hub]]:
    settings = init_hub(Path(tmp_path_factory.mktemp("hub")))
    with live_hub(settings) as (url, hub), httpx.Client(base_url=url, timeout=30) as http:
        yield http, hub


def assert_problem(answer: httpx.Response, status: int) -> dict[str, object]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = answer.json()
    assert set(body) >= PROBLEM_KEYS
    assert body["status"] == status
    assert (isinstance(body["code"], str) and "." in body["code"]) or body["code"] in {
        "not_found",
        "internal",
    }
    assert "Traceback" not in answer.text
    assert len(answer.headers["x-request-id"]) == 32  # every answer, refusals included
    return body


BAD_REQUESTS: dict[tuple[str, str], list[tuple[dict[str, Any], int]]] = {
    ("POST", "/api/v1/enrol"): [
        ({"content": b"not json", "headers": {"content-type": "application/json"}}, 422),
        ({"json": {"code": "x"}}, 422),
        ({"json": {"code": "x", "device_id": "a b", "site": "s", "public_keys": {}}}, 422),
    ],
    ("POST", "/api/v1/sync/push"): [
        ({"content": b""}, 400),
        ({"content": b"FRGE\x01garbage"}, 400),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415),
    ],
    ("GET", "/api/v1/sync/pull"): [
        ({}, 401),
        ({"params": {"limit": "0"}}, 422),
        ({"headers": {"signature-input": "nonsense", "signature": "x"}}, 401),
    ],
    ("GET", "/healthz"): [],
    ("GET", "/api/v1/hub"): [],
    ("POST", "/api/v1/auth/token"): [
        ({"data": {"username": "nobody"}}, 422),
        ({"data": {"username": "nobody", "password": "nothing at all"}}, 401),
    ],
    ("POST", "/api/v1/auth/logout"): [({"headers": {"authorization": "Bearer nonsense"}}, 401)],
    ("GET", "/api/v1/me"): [({}, 401)],
    ("GET", "/api/v1/audit"): [({"params": {"limit": "-1"}, "auth": True}, 422)],
    ("GET", "/api/v1/duplicates"): [({"params": {"status": "maybe"}, "auth": True}, 422)],
    ("GET", "/api/v1/duplicates/{pair_id}"): [
        ({"path": "/api/v1/duplicates/7", "auth": True}, 404)
    ],
    ("POST", "/api/v1/duplicates/{pair_id}/merge"): [
        ({"path": "/api/v1/duplicates/7/merge", "json": {"survivor": "short"}, "auth": True}, 422),
        (
            {
                "path": "/api/v1/duplicates/7/merge",
                "json": {"survivor": "00000000-0000-0000-0000-000000000000"},
                "auth": True,
            },
            404,
        ),
    ],
    ("POST", "/api/v1/duplicates/{pair_id}/reject"): [
        ({"path": "/api/v1/duplicates/x/reject", "auth": True}, 422)
    ],
    ("POST", "/api/v1/duplicates/{pair_id}/unmerge"): [
        ({"path": "/api/v1/duplicates/7/unmerge", "auth": True}, 404)
    ],
    ("GET", "/api/v1/records"): [
        ({"params": {"limit": "0"}, "auth": True}, 422),
        ({"params": {"scenario": "party"}, "auth": True}, 422),
        ({"params": {"registered_from": "yesterday"}, "auth": True}, 422),
    ],
    ("GET", "/api/v1/records/{record_id}"): [({"path": "/api/v1/records/nope", "auth": True}, 404)],
    ("GET", "/api/v1/conflicts"): [({"params": {"status": "maybe"}, "auth": True}, 422)],
    ("GET", "/api/v1/conflicts/{conflict_id}"): [
        ({"path": "/api/v1/conflicts/abc", "auth": True}, 422),
        ({"path": "/api/v1/conflicts/999", "auth": True}, 404),
    ],
    ("POST", "/api/v1/conflicts/{conflict_id}/resolve"): [
        ({"path": "/api/v1/conflicts/1/resolve", "json": {"choice": "coin"}, "auth": True}, 422),
        (
            {
                "path": "/api/v1/conflicts/999/resolve",
                "json": {"choice": "current", "reason": "why not"},
                "auth": True,
            },
            404,
        ),
    ],
    ("POST", "/api/v1/conflicts/{conflict_id}/reopen"): [
        (
            {
                "path": "/api/v1/conflicts/1/reopen",
                "content": b"{",
                "headers": {"content-type": "application/json"},
                "auth": True,
            },
            422,
        ),
    ],
}


def test_every_route_is_covered_here(live: tuple[httpx.Client, Hub]) -> None:
    _, hub = live
    spec = create_app(hub.settings, hub=hub).openapi()
    routes = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert routes == set(BAD_REQUESTS)


@pytest.mark.parametrize(("method", "path"), list(BAD_REQUESTS))
def test_bad_input_gets_a_problem(live: tuple[httpx.Client, Hub], method: str, path: str) -> None:
    http, hub = live
    for spec, status in BAD_REQUESTS[(method, path)]:
        kwargs = dict(spec)
        target = kwargs.pop("path", path)
        if kwargs.pop("auth", False):
            kwargs["headers"] = {
                **kwargs.get("headers", {}),
                "authorization": f"Bearer {_token(http, hub)}",
            }
        assert_problem(http.request(method, target, **kwargs), status)


def _token(http: httpx.Client, hub: Hub) -> str:
    with hub.engine.begin() as conn:
        if accounts.get_user(conn, "shape") is None:
            accounts.add_user(
                conn,
                name="shape",
                role=accounts.Role.ADMIN,
                sites=[],
                password=PASSWORD,
                now=datetime.now(UTC),
            )
    answer = http.post("/api/v1/auth/token", data={"username": "shape", "password": PASSWORD})
    token: str = answer.json()["access_token"]
    return token


def test_unknown_route_and_method(live: tuple[httpx.Client, Hub]) -> None:
    http, _ = live
    assert assert_problem(http.get("/nowhere"), 404)["code"] == "route.not_found"
    assert assert_problem(http.delete("/api/v1/enrol"), 405)["code"] == "route.method_not_allowed"


def test_too_large_envelope(live: tuple[httpx.Client, Hub]) -> None:
    http, hub = live
    size = hub.settings.max_request_bytes + 1
    answer = http.post(
        "/api/v1/sync/push",
        content=b"F" * size,
        headers={"content-type": "application/octet-stream"},
    )
    assert assert_problem(answer, 413)["code"] == "request.too_large"


def test_openapi_and_health(live: tuple[httpx.Client, Hub]) -> None:
    http, _ = live
    spec = http.get("/openapi.json").json()
    assert "/api/v1/sync/push" in spec["paths"]
    health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["database"] == "sqlite"
