"""The whole flow against a real hub (uvicorn on 127.0.0.1) with real devices:
registration → outbox → sealed push → merge → conflicts → pull → convergence."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.people import person
from field_client.enrolment import enrol
from field_client.store import Store
from field_client.sync_runner import run_sync
from schemas.fields import flatten
from schemas.record import RegistrationCreate
from server.hub import Hub
from server.records import load_records
from sync.hlc import system_ms
from sync.transport import HubClient, HubUnreachable
from tests.conftest import PASSPHRASE, sample_record
from tests.faults import Cut, FaultProxy, Request
from tests.hubkit import database_backends, fresh_database, init_hub, live_hub

DAY_MS = 86_400_000


@pytest.fixture(params=database_backends())
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Hub]]:
    with fresh_database(request.param) as url, live_hub(init_hub(tmp_path / "hub", url)) as live:
        yield live


def new_device(
    tmp_path: Path,
    name: str,
    base_url: str,
    hub: Hub,
    *,
    sites: list[str],
    wall_ms: Callable[[], int] = system_ms,
) -> Store:
    store = Store.init(
        tmp_path / name,
        PASSPHRASE,
        site=sites[0],
        operator=name,
        wall_ms=wall_ms,
        kdf_memory_kib=1024,
    )
    with httpx.Client(base_url=base_url) as http:
        enrol(
            store,
            HubClient(http),
            code=hub.create_enrol_code(sites, timedelta(hours=1), request_id="test-enrol"),
        )
    return store


def sync(store: Store, base_url: str, **kwargs: Any) -> Any:
    with httpx.Client(base_url=base_url) as http:
        return run_sync(store, HubClient(http), **kwargs)


def _clean(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v not in (None, [])}


def device_state(store: Store) -> dict[str, dict[str, Any]]:
    return {s.id: _clean(flatten(store.get(s.id))) for s in store.list_records()}


def hub_state(hub: Hub, site: str | None = None) -> dict[str, dict[str, Any]]:
    with hub.engine.connect() as conn:
        stmt = sa.text("SELECT id FROM records" + (" WHERE site = :s" if site else ""))
        ids = [r[0] for r in conn.execute(stmt, {"s": site})]
        recs = load_records(conn, ids, hub.secrets.master_key)
    return {rid: _clean({p: f["v"] for p, f in rec.fields.items()}) for rid, rec in recs.items()}


def count(hub: Hub, table: str) -> int:
    with hub.engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_whole_flow_two_devices_converge_with_one_conflict(
    tmp_path: Path, hub: tuple[str, Hub]
) -> None:
    url, live = hub
    a = new_device(tmp_path, "a", url, live, sites=["ras-jedir"])
    b = new_device(tmp_path, "b", url, live, sites=["dehiba", "ras-jedir"])
    with a, b:
        [shared, _] = a.register(
            [
                RegistrationCreate.model_validate(sample_record()),
                RegistrationCreate.model_validate(sample_record()),
            ]
        )
        b.register([RegistrationCreate.model_validate(sample_record(names={"given": "Amna"}))])
        first = sync(a, url)
        assert first.acknowledged == len(a.outbox(after_seq=0, limit=10_000))
        assert sync(b, url).received_edits == 2
        rid = str(shared.id)
        a.edit(rid, {"situation.needs": ["food"]})
        b.edit(rid, {"situation.needs": ["shelter"]})
        b.edit(rid, {"phone": "+218 91 111 1111"})  # a field only b touched: no conflict
        sync(a, url)
        b_summary = sync(b, url)
        sync(a, url)
        assert b_summary.conflicts == 1
        assert count(live, "conflicts") == 1
        assert device_state(a) == hub_state(live, "ras-jedir")
        assert {k: v for k, v in device_state(b).items() if k in device_state(a)} == device_state(a)
        assert device_state(b) == hub_state(live)
        # The edit that lost is kept in the loser's history, not current.
        history = [h for h in a.history(rid) if h.field == "situation.needs"]
        assert len(history) == 3 and sum(h.is_current for h in history) == 1


def test_clocks_a_day_behind_and_a_day_ahead_still_converge(
    tmp_path: Path, hub: tuple[str, Hub]
) -> None:
    url, live = hub
    behind = new_device(
        tmp_path, "behind", url, live, sites=["s1"], wall_ms=lambda: system_ms() - DAY_MS
    )
    ahead = new_device(
        tmp_path, "ahead", url, live, sites=["s1"], wall_ms=lambda: system_ms() + DAY_MS
    )
    with behind, ahead:
        [rec] = behind.register([RegistrationCreate.model_validate(sample_record())])
        sync(behind, url)
        sync(ahead, url)
        rid = str(rec.id)
        ahead.edit(rid, {"occupation": "driver"})
        behind.edit(rid, {"occupation": "cook"})
        for store in (ahead, behind, ahead, behind):
            sync(store, url)
        assert device_state(ahead) == device_state(behind) == hub_state(live)
        # The hub's own clock did not follow the device a day ahead.
        assert live.clock.last.wall_ms <= system_ms() + 60_000
        assert count(live, "conflicts") == 1


def test_connection_cut_at_random_offsets_loses_and_duplicates_nothing(
    tmp_path: Path, hub: tuple[str, Hub]
) -> None:
    url, live = hub
    rng = random.Random(20261129)
    device = new_device(tmp_path, "dev", url, live, sites=["ras-jedir"])
    people = [RegistrationCreate.model_validate(person(rng)) for _ in range(2000)]
    cuts_left = [8]

    def plan(request: Request) -> Cut | None:
        if cuts_left[0] == 0 or rng.random() > 0.35:
            return None
        cuts_left[0] -= 1
        return (
            Cut("up", rng.randint(0, 20_000))
            if rng.random() < 0.6
            else Cut("down", rng.randint(0, 1_500))
        )

    with device, FaultProxy(int(url.rsplit(":", 1)[1]), plan) as proxy:
        device.register(people)
        attempts = 0
        limits = httpx.Limits(max_keepalive_connections=0)
        while True:
            attempts += 1
            assert attempts <= 40, "sync did not finish"
            try:
                with httpx.Client(base_url=proxy.url, limits=limits) as http:
                    run_sync(device, HubClient(http), max_batch_bytes=64 * 1024)
                break
            except HubUnreachable:
                continue
        cuts = len(proxy.fired())
        pushes = proxy.requests_to("/api/v1/sync/push")
    assert cuts >= 3
    assert count(live, "records") == 2000
    assert count(live, "changes") == 2000  # one edit per person, none applied twice
    batches = count(live, "batches")
    assert pushes - batches <= cuts  # at most one batch re-sent per cut
    with device:
        pass
    reopened = Store.open(tmp_path / "dev", PASSPHRASE)
    with reopened:
        assert reopened.sync.pending_count() == 0


def _expect(device: Store, hub_view: dict[str, tuple[Any, Any]]) -> int:
    """Conflicts the hub must open for this device's pending edits (the rule, restated)."""
    found = 0
    for change in device.sync.outbox_edits(1 << 20):
        for path, value in change.fields:
            held = hub_view.get(path)
            if held is not None and change.bases.get(path) != held[0] and value != held[1]:
                found += 1
            if held is None or change.version > held[0]:
                hub_view[path] = (change.version, value)
    return found


ops = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.sampled_from(["edit", "sync"]),
        st.sampled_from(["occupation", "employer"]),
    ),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=ops)
def test_three_devices_random_concurrent_edits_converge(
    tmp_path: Path, hub: tuple[str, Hub], plan: list[tuple[int, str, str]]
) -> None:
    url, live = hub
    site = f"camp-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        root = tmp_path / site
        devices = [
            stack.enter_context(new_device(root, f"d{i}", url, live, sites=[site]))
            for i in range(3)
        ]
        [rec] = devices[0].register([RegistrationCreate.model_validate(sample_record())])
        for d in devices:
            sync(d, url)
        rid = str(rec.id)
        before = count(live, "conflicts")
        expected = 0
        hub_view: dict[str, tuple[Any, Any]] = {}
        for step, (index, op, field) in enumerate(plan):
            d = devices[index]
            if op == "edit":
                d.edit(rid, {field: f"value {step} from d{index}"})
            else:
                expected += _expect(d, hub_view)
                sync(d, url)
        for _ in range(2):
            for d in devices:
                expected += _expect(d, hub_view)
                sync(d, url)
        states = [device_state(d) for d in devices]
        assert states[0] == states[1] == states[2] == hub_state(live, site)
        assert count(live, "conflicts") - before == expected
        # No silent overwrite: every edit any device made is in the hub's change log.
        edits_made = sum(
            len({c.version for c in d.outbox(after_seq=0, limit=10_000)}) for d in devices
        )
        with live.engine.connect() as conn:
            stmt = sa.text("SELECT count(*) FROM changes WHERE site = :s")
            assert conn.execute(stmt, {"s": site}).scalar_one() == edits_made


def test_a_resolution_reaches_devices_on_their_next_pull(
    tmp_path: Path, hub: tuple[str, Hub]
) -> None:
    url, live = hub
    a = new_device(tmp_path, "a", url, live, sites=["s1"])
    b = new_device(tmp_path, "b", url, live, sites=["s1"])
    with a, b:
        [rec] = a.register([RegistrationCreate.model_validate(sample_record())])
        sync(a, url)
        sync(b, url)
        rid = str(rec.id)
        a.edit(rid, {"occupation": "driver"})
        b.edit(rid, {"occupation": "cook"})
        sync(a, url)
        sync(b, url)
        with live.engine.begin() as conn:
            from server import conflict_review

            [open_conflict] = conflict_review.list_conflicts(
                conn, sites=None, status="open", field=None, site=None, limit=10, offset=0
            )
            conflict_review.resolve(
                conn,
                open_conflict.id,
                sites=None,
                choice="value",
                value="bus driver",
                reason="asked the person",
                actor="user:auditor",
                clock=live.clock,
                master_key=live.secrets.master_key,
                now=live.now(),
            )
        sync(a, url)
        sync(b, url)
        assert a.get(rid).occupation == b.get(rid).occupation == "bus driver"
        assert device_state(a) == device_state(b) == hub_state(live)
