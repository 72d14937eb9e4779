"""Accounts, the permission table, records and conflict review, on a real hub."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from server import accounts
from server.accounts import Role
from server.hub import Hub
from server.permissions import HUB_WIDE, PERMISSIONS, Permission
from sync.changes import Version
from tests.hubkit import HandDevice, database_backends, fresh_database, init_hub, live_hub

PASSWORD = "a long enough password"
USERS = {
    "ada": (Role.ADMIN, []),
    "aud": (Role.AUDITOR, []),
    "opa": (Role.HUB_OPERATOR, ["site-a"]),
    "fwa": (Role.FIELD_WORKER, ["site-a"]),
    "auda": (Role.AUDITOR, ["site-a"]),
    "adab": (Role.ADMIN, ["site-b"]),
}


class World:
    def __init__(self, http: httpx.Client, hub: Hub) -> None:
        self.http, self.hub = http, hub
        with hub.engine.begin() as conn:
            for name, (role, sites) in USERS.items():
                accounts.add_user(
                    conn,
                    name=name,
                    role=role,
                    sites=sites,
                    password=PASSWORD,
                    now=datetime.now(UTC),
                )
        a = HandDevice.enrol(http, hub, "site-a")
        a2 = HandDevice.enrol(http, hub, "site-a")
        b = HandDevice.enrol(http, hub, "site-b")
        self.rec_a = a.new_record("Mohamed")
        a.open_answer(a.push(a.envelope([self.rec_a])))
        self.rec_b = b.new_record("Grace")
        b.open_answer(b.push(b.envelope([self.rec_b])))
        base = Version(self.rec_a.version.stamp, a.id)
        first = a.edit(
            self.rec_a.record_id, {"situation.needs": ["food"]}, {"situation.needs": base}
        )
        second = a2.edit(
            self.rec_a.record_id, {"situation.needs": ["shelter"]}, {"situation.needs": base}
        )
        a.open_answer(a.push(a.envelope([first])))
        a2.open_answer(a2.push(a2.envelope([second])))
        self.devices = (a, a2, b)
        self.tokens = {name: self.login(name) for name in USERS}

    def login(self, name: str, password: str = PASSWORD) -> str:
        answer = self.http.post("/api/v1/auth/token", data={"username": name, "password": password})
        assert answer.status_code == 200, answer.text
        token: str = answer.json()["access_token"]
        return token

    def get(
        self, path: str, who: str | None, headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx.Response:
        auth = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return self.http.get(path, headers={**auth, **(headers or {})}, **kw)

    def post(self, path: str, who: str | None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return self.http.post(path, headers=headers, **kw)


@pytest.fixture(params=database_backends())
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with (
        fresh_database(request.param) as url,
        live_hub(init_hub(tmp_path / "hub", url)) as (base, hub),
        httpx.Client(base_url=base, timeout=30) as http,
    ):
        yield World(http, hub)


# Each people-facing route, the permission it needs, and a request to make.
ROUTES: dict[tuple[str, str], tuple[Permission | None, dict[str, Any]]] = {
    ("GET", "/api/v1/me"): (None, {}),
    ("POST", "/api/v1/auth/logout"): (None, {}),
    ("GET", "/api/v1/records"): (Permission.RECORDS_READ, {}),
    ("GET", "/api/v1/records/{record_id}"): (Permission.RECORDS_READ, {}),
    ("GET", "/api/v1/conflicts"): (Permission.CONFLICTS_READ, {}),
    ("GET", "/api/v1/conflicts/{conflict_id}"): (Permission.CONFLICTS_READ, {}),
    ("POST", "/api/v1/conflicts/{conflict_id}/resolve"): (
        Permission.CONFLICTS_RESOLVE,
        {"json": {"choice": "current", "reason": "checked with the person"}},
    ),
    ("POST", "/api/v1/conflicts/{conflict_id}/reopen"): (
        Permission.CONFLICTS_RESOLVE,
        {"json": {"reason": "decided too fast"}},
    ),
    ("GET", "/api/v1/audit"): (Permission.AUDIT_READ, {}),
    ("GET", "/api/v1/duplicates"): (Permission.DUPLICATES_READ, {}),
    ("GET", "/api/v1/duplicates/{pair_id}"): (Permission.DUPLICATES_READ, {}),
    ("POST", "/api/v1/duplicates/{pair_id}/merge"): (
        Permission.DUPLICATES_DECIDE,
        {"json": {"survivor": "00000000-0000-0000-0000-000000000000"}},
    ),
    ("POST", "/api/v1/duplicates/{pair_id}/reject"): (Permission.DUPLICATES_DECIDE, {}),
    ("POST", "/api/v1/duplicates/{pair_id}/unmerge"): (Permission.DUPLICATES_DECIDE, {}),
}
DEVICE_OR_PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/api/v1/hub"),
    ("POST", "/api/v1/enrol"),
    ("POST", "/api/v1/sync/push"),
    ("GET", "/api/v1/sync/pull"),
    ("POST", "/api/v1/auth/token"),
}


def test_every_route_is_in_the_permission_walk(world: World) -> None:
    spec = world.http.get("/openapi.json").json()
    routes = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    assert routes == set(ROUTES) | DEVICE_OR_PUBLIC


def test_every_route_with_every_role_and_no_token(world: World) -> None:
    for (method, template), (permission, kwargs) in ROUTES.items():
        path = template.format(record_id=world.rec_a.record_id, conflict_id=1, pair_id=999)
        no_token = world.http.request(method, path, **kwargs)
        assert no_token.status_code == 401, (method, path)
        assert no_token.headers["content-type"] == "application/problem+json"
        for name, (role, sites) in USERS.items():
            if (method, template) == ("POST", "/api/v1/auth/logout"):
                continue  # would end the session the rest of the walk uses
            answer = world.http.request(
                method, path, headers={"Authorization": f"Bearer {world.tokens[name]}"}, **kwargs
            )
            allowed = permission is None or (
                role in PERMISSIONS[permission] and not (permission in HUB_WIDE and sites)
            )
            if allowed:
                assert answer.status_code not in (401, 403), (method, path, name, answer.text)
            else:
                assert answer.status_code == 403, (method, path, name, answer.text)
                assert answer.json()["code"] == "auth.forbidden"


def test_scope_hides_other_sites(world: World) -> None:
    other = world.get(f"/api/v1/records/{world.rec_b.record_id}", "opa")
    assert other.status_code == 404 and other.json()["code"] == "record.not_found"
    assert world.get(f"/api/v1/records/{world.rec_b.record_id}", "aud").status_code == 200
    listed = {r["id"] for r in world.get("/api/v1/records", "opa").json()}
    assert listed == {world.rec_a.record_id}
    assert len(world.get("/api/v1/records", "ada").json()) == 2


def test_record_filters_search_and_history(world: World) -> None:
    assert [
        r["id"] for r in world.get("/api/v1/records", "ada", params={"q": "Muhammad"}).json()
    ] == [world.rec_a.record_id]
    assert world.get("/api/v1/records", "ada", params={"q": "Zzyzx"}).json() == []
    by_need = world.get("/api/v1/records", "ada", params={"need": "evacuation"}).json()
    assert [r["id"] for r in by_need] == [world.rec_b.record_id]  # rec_a's needs were edited since
    assert (
        world.get("/api/v1/records", "ada", params={"site": "site-b", "scenario": "trapped"}).json()
        == []
    )
    bad = world.get("/api/v1/records", "ada", params={"nationality": "egypt"})
    assert bad.status_code == 422 and bad.json()["code"] == "request.invalid"
    view = world.get(f"/api/v1/records/{world.rec_a.record_id}", "opa").json()
    needs = [h for h in view["history"] if h["field"] == "situation.needs"]
    assert len(needs) == 3 and sum(h["is_current"] for h in needs) == 1
    assert {h["operator"] for h in needs} == {"tester"}


def test_registration_days_at_the_ends_of_the_calendar(world: World) -> None:
    def ids(**params: str) -> list[str]:
        answer = world.get("/api/v1/records", "ada", params=params)
        assert answer.status_code == 200, answer.text
        return sorted(r["id"] for r in answer.json())

    both = sorted([world.rec_a.record_id, world.rec_b.record_id])
    assert ids(registered_to="9999-12-31") == both
    assert ids(registered_from="0001-01-01", registered_to="9999-12-31") == both
    assert ids(registered_from="9999-12-31", registered_to="9999-12-31") == []
    assert ids(registered_from="0001-01-01", registered_to="0001-01-01") == []


def test_conflict_side_by_side_resolve_propagates_and_reopen(world: World) -> None:
    [listed] = world.get("/api/v1/conflicts", "opa").json()
    detail = world.get(f"/api/v1/conflicts/{listed['id']}", "aud").json()
    assert detail["base"]["v"] == ["evacuation"]
    assert {detail["current"]["v"][0], detail["incoming"]["v"][0]} == {"food", "shelter"}
    assert detail["provisional_winner"] in {"current", "incoming"}
    bad = world.post(
        f"/api/v1/conflicts/{listed['id']}/resolve",
        "aud",
        json={"choice": "value", "value": ["flying"], "reason": "x y z"},
    )
    assert bad.status_code == 422
    done = world.post(
        f"/api/v1/conflicts/{listed['id']}/resolve",
        "aud",
        json={"choice": "value", "value": ["food", "shelter"], "reason": "both, said the person"},
    )
    assert done.status_code == 200, done.text
    assert world.get("/api/v1/conflicts", "aud").json() == []
    again = world.post(
        f"/api/v1/conflicts/{listed['id']}/resolve",
        "aud",
        json={"choice": "current", "reason": "again"},
    )
    assert again.status_code == 409
    view = world.get(f"/api/v1/records/{world.rec_a.record_id}", "aud").json()
    assert view["fields"]["situation.needs"] == ["food", "shelter"]
    settled = world.get(f"/api/v1/conflicts/{listed['id']}", "aud").json()["conflict"]
    reopened = world.post(
        f"/api/v1/conflicts/{listed['id']}/reopen", "aud", json={"reason": "the person called back"}
    )
    assert reopened.status_code == 200 and reopened.json()["status"] == "open"
    history = world.get(f"/api/v1/conflicts/{listed['id']}", "aud").json()
    assert history["resolution"]["reopened"][0]["reason"] == "the person called back"
    # Reopening empties the conflict's resolver columns: who decided, and when, stay here.
    decided = history["resolution"]
    assert decided["by"] == settled["resolved_by"] == "user:aud"
    at = datetime.fromisoformat(decided["at"])
    assert at == datetime.fromisoformat(settled["resolved_at"]) and at.tzinfo is not None
    anew = world.post(
        f"/api/v1/conflicts/{listed['id']}/resolve",
        "aud",
        json={"choice": "value", "value": ["food"], "reason": "shelter found since"},
    )
    assert anew.status_code == 200, anew.text
    # The new resolution keeps who reopened it, why, and what was decided before.
    kept = world.get(f"/api/v1/conflicts/{listed['id']}", "aud").json()["resolution"]
    assert kept["reason"] == "shelter found since" and kept["value"] == ["food"]
    assert [r["reason"] for r in kept["reopened"]] == ["the person called back"]
    assert kept["earlier"] == [
        {
            "choice": "value",
            "value": ["food", "shelter"],
            "reason": "both, said the person",
            "by": "user:aud",
            "at": decided["at"],
        }
    ]


def _add_user(world: World, name: str, role: Role, sites: list[str]) -> None:
    with world.hub.engine.begin() as conn:
        accounts.add_user(
            conn, name=name, role=role, sites=sites, password=PASSWORD, now=datetime.now(UTC)
        )
    world.tokens[name] = world.login(name)


def test_the_audit_log_is_for_auditors_and_admins_of_every_site(world: World) -> None:
    world.get(f"/api/v1/records/{world.rec_b.record_id}", "aud")  # site-b, in the log
    for who in ("auda", "adab"):
        refused = world.get("/api/v1/audit", who, params={"limit": 1000})
        assert refused.status_code == 403, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["code"] == "auth.forbidden"
        assert "covers every site" in refused.json()["detail"]
        assert world.rec_b.record_id not in refused.text
        # Their own sites' records they still read.
        assert world.get("/api/v1/records", who).status_code == 200
    for who in ("aud", "ada"):
        read = world.get("/api/v1/audit", who, params={"limit": 1000})
        assert read.status_code == 200
        assert f"record:{world.rec_b.record_id}" in {e["target"] for e in read.json()}


def test_login_failures_slow_down_then_lock(world: World) -> None:
    for _ in range(accounts.MAX_FAILED_LOGINS - 1):
        answer = world.http.post(
            "/api/v1/auth/token", data={"username": "fwa", "password": "wrong password!"}
        )
        assert answer.status_code == 401 and answer.json()["code"] == "auth.invalid_credentials"
    locked = world.http.post(
        "/api/v1/auth/token", data={"username": "fwa", "password": "wrong password!"}
    )
    assert locked.status_code == 429 and locked.json()["code"] == "auth.locked"
    assert int(locked.headers["Retry-After"]) > 0
    still = world.http.post("/api/v1/auth/token", data={"username": "fwa", "password": PASSWORD})
    assert still.status_code == 429  # even the right password waits out the lock
    unknown = world.http.post(
        "/api/v1/auth/token", data={"username": "nobody", "password": "whatever pass"}
    )
    assert unknown.status_code == 401


def test_logout_and_disable_end_sessions(world: World) -> None:
    token = world.tokens["opa"]
    assert world.get("/api/v1/me", "opa").json()["sites"] == ["site-a"]
    assert world.post("/api/v1/auth/logout", "opa").status_code == 204
    assert (
        world.http.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code
        == 401
    )
    fresh = world.login("aud")
    with world.hub.engine.begin() as conn:
        accounts.set_active(conn, "aud", is_active=False)
    assert (
        world.http.get("/api/v1/me", headers={"Authorization": f"Bearer {fresh}"}).status_code
        == 401
    )


def test_the_audit_log_records_reads_and_writes(world: World) -> None:
    viewed = world.get(
        f"/api/v1/records/{world.rec_a.record_id}", "opa", headers={"X-Request-ID": "req-42"}
    )
    assert viewed.headers["x-request-id"] == "req-42"  # echoed on the answer
    entries = world.get("/api/v1/audit", "aud", params={"action": "records.view"}).json()
    assert entries[0]["actor"] == "user:opa" and entries[0]["request_id"] == "req-42"
    again = world.get(f"/api/v1/records/{world.rec_a.record_id}", "opa")
    made_up = again.headers["x-request-id"]
    assert len(made_up) == 32 and made_up != "req-42"  # none given: the hub makes one
    given = {"X-Request-ID": "req-43"}
    for path in ("/healthz", "/api/v1/records", "/api/v1/no-such-route"):  # 200, 401, 404
        assert world.http.get(path, headers=given).headers["x-request-id"] == "req-43"
    assert entries[0]["target"] == f"record:{world.rec_a.record_id}"
    actions = {
        e["action"] for e in world.get("/api/v1/audit", "aud", params={"limit": 1000}).json()
    }
    assert {"device.enrol", "sync.push", "auth.login", "conflicts.resolve"} - actions == {
        "conflicts.resolve"
    }
    dump = repr(world.get("/api/v1/audit", "ada", params={"limit": 1000}).json())
    assert "Mohamed" not in dump and "Grace" not in dump
