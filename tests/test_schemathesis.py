"""Schemathesis over the hub's OpenAPI, against a live hub on 127.0.0.1.

Every check schemathesis has runs, in every phase (examples, coverage, fuzzing,
stateful), with a fixed seed and a bounded number of examples per operation:
once as nobody over every route, once as a logged-in admin over the people
routes. The schemathesis CLI does the work (`python -m schemathesis.cli run`):
the lazy fixtures of its pytest plugin fail under this pytest.

What is excluded is excluded here, in the open, each with its reason:

- `positive_data_acceptance` on `POST /api/v1/sync/push`: its body is a signed,
  sealed envelope. The schema can only say "bytes"; which bytes are a valid
  envelope of an enrolled device is a matter of signatures, which no generator
  can guess. `tests/test_fuzz.py` covers that route with mutated envelopes.
- `POST /api/v1/auth/logout` in the logged-in pass: it ends the very session
  the pass runs with. The anonymous pass covers it.

Each bug these passes once found is also pinned by a small test below.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.hub import Hub
from tests.hubkit import (
    ADMIN_PASSWORD,
    database_backends,
    fresh_database,
    init_hub,
    live_hub,
)

SEED = 20261208
MAX_EXAMPLES = 25
PHASES = "examples,coverage,fuzzing,stateful"
LOGOUT = "/api/v1/auth/logout"
PROBLEM_JSON = "application/problem+json"
# Genuinely inapplicable: a push body is valid only when signed by an enrolled device.
PUSH_BODY_IS_A_SIGNED_ENVELOPE = """
[[operations]]
include-path = "/api/v1/sync/push"
include-method = "POST"
checks.positive_data_acceptance.enabled = false
"""


@dataclass(frozen=True)
class Served:
    url: str
    hub: Hub
    token: str
    spec: dict[str, Any]
    workdir: Path


@pytest.fixture(scope="module", params=database_backends())
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("schemathesis")
    with (
        fresh_database(request.param) as db_url,
        live_hub(init_hub(workdir / "hub", db_url)) as (url, hub),
    ):
        answer = httpx.post(
            f"{url}/api/v1/auth/token", data={"username": "admin", "password": ADMIN_PASSWORD}
        )
        assert answer.status_code == 200, answer.text
        spec = httpx.get(f"{url}/openapi.json").json()
        yield Served(url, hub, answer.json()["access_token"], spec, workdir)


def run_schemathesis(
    served: Served, name: str, spec: dict[str, Any], config: str, *args: str
) -> str:
    """Run the CLI over `spec` against the live hub; return its output (asserting success)."""
    spec_path = served.workdir / f"{name}.openapi.json"
    spec_path.write_text(json.dumps(spec))
    config_path = served.workdir / f"{name}.toml"
    config_path.write_text(
        f"seed = {SEED}\nworkers = 1\n"
        f"[generation]\nmax-examples = {MAX_EXAMPLES}\n"
        "[checks]\nenabled = true\n" + config
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(config_path),
            "run",
            str(spec_path),
            "--url",
            served.url,
            "--phases",
            PHASES,
            "--request-timeout",
            "10",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    return output


def _operations(spec: dict[str, Any], pattern: str = "") -> int:
    return sum(len(item) for path, item in spec["paths"].items() if re.match(pattern, path))


def people_routes(spec: dict[str, Any]) -> str:
    """A regex of the paths that need a login, but logout (it would end the pass's session)."""
    paths = [
        path
        for path, item in spec["paths"].items()
        if path != LOGOUT and any("security" in op for op in item.values())
    ]
    return "^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


BUGS = (
    "500s (integers past 64 bits in conflicts/audit offsets and conflict ids; date filters"
    " of GET /api/v1/records; NUL in text on PostgreSQL), error answers undocumented in the"
    " OpenAPI, 405 without Allow, enrol answering 422 to schema-valid bodies, http.400 code"
)


def test_schemathesis_every_check_as_nobody(served: Served) -> None:
    out = run_schemathesis(served, "anonymous", served.spec, PUSH_BODY_IS_A_SIGNED_ENVELOPE)
    assert f"Tested: {_operations(served.spec)}" in out, out[-3000:]


def test_schemathesis_every_check_as_an_admin_on_the_people_routes(served: Served) -> None:
    try:
        out = run_schemathesis(
            served,
            "admin",
            served.spec,
            "",
            "--header",
            f"Authorization: Bearer {served.token}",
            "--include-path-regex",
            people_routes(served.spec),
        )
    finally:
        # The session survived the run: every answer was given to the admin.
        me = httpx.get(
            f"{served.url}/api/v1/me", headers={"authorization": f"Bearer {served.token}"}
        )
        assert me.status_code == 200
    assert f"Tested: {_operations(served.spec, people_routes(served.spec))}" in out, out[-3000:]


def test_the_served_openapi_documents_every_problem_answer(served: Served) -> None:
    for path, item in served.spec["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            where = f"{method.upper()} {path}"
            assert "4XX" in responses or "default" in responses, where
            for status, answer in responses.items():
                if not status.startswith("2"):
                    assert set(answer.get("content", {})) == {PROBLEM_JSON}, (where, status)


def test_a_405_names_the_methods_allowed(served: Served) -> None:
    answer = httpx.request("TRACE", f"{served.url}/healthz")
    assert answer.status_code == 405
    assert answer.headers["content-type"] == PROBLEM_JSON
    assert answer.headers.get("allow") == "GET"


def test_enrol_with_an_unknown_code_is_refused_for_the_code(served: Served) -> None:
    body = {
        "code": "NOT-A-CODE",
        "device_id": "dev-1",
        "site": "ras-jedir",
        "public_keys": {"signing": "x", "kem": "y", "kem_algorithm": "x25519"},
    }
    answer = httpx.post(f"{served.url}/api/v1/enrol", json=body)
    assert answer.status_code == 403, answer.text
    assert answer.json()["code"] == "enrol.code_invalid"


NUL_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/api/v1/auth/token", {"data": {"username": "a\x00b", "password": "x"}}),
    ("GET", "/api/v1/records", {"params": {"site": "a\x00b"}, "auth": True}),
    ("GET", "/api/v1/records/a%00b", {"auth": True}),
    ("GET", "/api/v1/audit", {"params": {"actor": "a\x00b"}, "auth": True}),
    ("GET", "/api/v1/conflicts", {"params": {"field": "a\x00b"}, "auth": True}),
]


def _nul_backends() -> list[Any]:
    return database_backends()


@pytest.mark.parametrize("backend", _nul_backends())
def test_a_nul_in_any_text_parameter_is_never_a_server_error(backend: str, tmp_path: Path) -> None:
    with (
        fresh_database(backend) as db_url,
        live_hub(init_hub(tmp_path / "hub", db_url)) as (url, _hub),
    ):
        token = httpx.post(
            f"{url}/api/v1/auth/token", data={"username": "admin", "password": ADMIN_PASSWORD}
        ).json()["access_token"]
        failed = []
        for method, path, spec in NUL_REQUESTS:
            kwargs = dict(spec)
            if kwargs.pop("auth", False):
                kwargs["headers"] = {"authorization": f"Bearer {token}"}
            # A connection of its own: after a 500 the server closes the one it answered on.
            answer = httpx.request(method, f"{url}{path}", timeout=30, **kwargs)
            if answer.status_code >= 500:
                failed.append(f"{method} {path}: {answer.status_code}")
        assert not failed


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/conflicts?offset=887377753651341814661120",
        "/api/v1/audit?offset=887377753651341814661120",
        "/api/v1/conflicts/12169986164482813984768",
    ],
)
def test_a_huge_integer_parameter_is_a_client_error(served: Served, path: str) -> None:
    answer = httpx.get(
        f"{served.url}{path}", headers={"authorization": f"Bearer {served.token}"}, timeout=30
    )
    assert 400 <= answer.status_code < 500, answer.text


@pytest.mark.parametrize("bound", ["registered_from", "registered_to"])
def test_the_date_filters_of_the_records_list_work(served: Served, bound: str) -> None:
    answer = httpx.get(
        f"{served.url}/api/v1/records",
        params={bound: "2000-01-01"},
        headers={"authorization": f"Bearer {served.token}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text


def test_a_json_body_that_is_not_utf8_gets_a_stable_code(served: Served) -> None:
    answer = httpx.post(
        f"{served.url}/api/v1/enrol",
        content=b"L}U\xffC\xfe",
        headers={"content-type": "application/json"},
    )
    assert answer.headers["content-type"] == PROBLEM_JSON
    assert answer.json()["code"] == "request.invalid", answer.text
