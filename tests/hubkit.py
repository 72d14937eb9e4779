"""Test helpers for the hub: a real uvicorn server on 127.0.0.1, and a device
that crafts envelopes by hand (to send what a correct client never would)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import uvicorn

from schemas.record import SCHEMA_VERSION
from server.admin import initialise
from server.app import create_app
from server.hub import PULL_PATH, Hub
from server.settings import HubSettings
from sync.changes import Version
from sync.envelope import Header, open_sealed, seal
from sync.hlc import Clock
from sync.http_signature import sign_request
from sync.keys import KeyPairs, PublicKeys
from sync.protocol import Edit, dumps

ADMIN_PASSWORD = "hub admin test password"
POSTGRES_ENV = "FIELDREG_TEST_POSTGRES_URL"


def database_backends() -> list[str]:
    """'sqlite' always; 'postgresql' too when FIELDREG_TEST_POSTGRES_URL is set."""
    return ["sqlite", "postgresql"] if os.environ.get(POSTGRES_ENV) else ["sqlite"]


@contextmanager
def fresh_database(backend: str) -> Iterator[str | None]:
    """A database URL for one test: None (SQLite in the hub's data dir) or a new,
    empty PostgreSQL database created on the server named by the environment and
    dropped afterwards."""
    if backend == "sqlite":
        yield None
        return
    import psycopg

    admin_url = os.environ[POSTGRES_ENV]
    name = f"fieldreg_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def init_hub(data_dir: Path, database_url: str | None = None) -> HubSettings:
    settings = HubSettings(data_dir=data_dir, database_url=database_url)
    initialise(settings, admin="admin", admin_password=ADMIN_PASSWORD)
    return settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def live_hub(settings: HubSettings, *, port: int | None = None) -> Iterator[tuple[str, Hub]]:
    """Serve the hub with uvicorn on 127.0.0.1 in a thread (on `port`, or a free
    one); yield (base URL, hub)."""
    hub = Hub(settings)
    port = port or free_port()
    config = uvicorn.Config(
        create_app(settings, hub=hub), host="127.0.0.1", port=port, log_level="error"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the hub did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", hub
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        hub.engine.dispose()


@dataclass
class HandDevice:
    """A device enrolled for real, whose envelopes the test writes itself."""

    http: httpx.Client
    id: str
    site: str
    keys: KeyPairs
    hub_keys: PublicKeys
    seq: int = 0
    clock: Clock = field(default_factory=Clock)

    @classmethod
    def enrol(
        cls, http: httpx.Client, hub: Hub, site: str, *, also: tuple[str, ...] = ()
    ) -> HandDevice:
        """Enrolled at `site` (where it registers), serving the sites `also` too."""
        code = hub.create_enrol_code([site, *also], timedelta(hours=1), request_id="test-enrol")
        keys = KeyPairs.generate()
        device_id = str(uuid.uuid4())
        answer = http.post(
            "/api/v1/enrol",
            json={
                "code": code,
                "device_id": device_id,
                "site": site,
                "public_keys": keys.public().to_json(),
            },
        )
        assert answer.status_code == 200, answer.text
        hub_keys = PublicKeys.from_json(answer.json()["hub"]["public_keys"])
        return cls(http, device_id, site, keys, hub_keys)

    def edit(
        self, record_id: str, fields: dict[str, Any], bases: dict[str, Version] | None = None
    ) -> Edit:
        version = Version(self.clock.now(), self.id)
        edit = Edit(record_id, version, "tester", tuple(fields.items()), bases or {}, self.seq + 1)
        self.seq += len(fields)
        return edit

    def new_record(self, given: str, record_id: str | None = None) -> Edit:
        rid = record_id or str(uuid.uuid4())
        return self.edit(
            rid,
            {
                "schema_version": SCHEMA_VERSION,
                "registration": {
                    "site": self.site,
                    "device_id": self.id,
                    "operator": "tester",
                    "registered_at": "2026-11-29T10:00:00+00:00",
                },
                "names.given": given,
                "names.family": "Testperson",
                "situation.scenario": "crossed_border",
                "situation.needs": ["evacuation"],
                "consent": {
                    "given": True,
                    "legal_basis": "consent",
                    "scope": [],
                    "recorded_by": "t",
                },
            },
        )

    def envelope(
        self, edits: list[Edit], *, batch_id: str | None = None, body: bytes | None = None
    ) -> bytes:
        first = edits[0].first_seq or 1
        last = edits[-1].last_seq or first
        header = Header(
            protocol=1,
            schema_version=SCHEMA_VERSION,
            kind="push",
            sender=self.id,
            recipient="hub",
            batch_id=batch_id or f"{first}-{last}",
            seq_first=first,
            seq_last=last,
            sent_at_ms=self.clock.last.wall_ms,
            kem=self.hub_keys.kem_algorithm.value,
        )
        payload = body if body is not None else dumps({"edits": [e.to_json() for e in edits]})
        return seal(header, payload, recipient=self.hub_keys, sender=self.keys)

    def push(self, envelope: bytes) -> httpx.Response:
        return self.http.post(
            "/api/v1/sync/push",
            content=envelope,
            headers={"content-type": "application/octet-stream"},
        )

    def pull(self, cursor: str = "", limit: int = 500) -> httpx.Response:
        """A signed pull request, as a device makes it."""
        query = f"cursor={quote(cursor, safe='')}&limit={limit}"
        headers = sign_request(
            method="GET",
            path=PULL_PATH,
            query=query,
            key_id=self.id,
            private_key=self.keys.signing,
            created=int(time.time()),
        )
        return self.http.get(f"{PULL_PATH}?{query}", headers=headers)

    def open_answer(self, answer: httpx.Response) -> dict[str, Any]:
        assert answer.status_code == 200, answer.text
        opened = open_sealed(answer.content, sender=self.hub_keys, recipient=self.keys)
        assert opened.header.recipient == self.id
        result: dict[str, Any] = json.loads(opened.body)
        return result
