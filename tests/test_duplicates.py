"""The hub's duplicate queue on a real hub: every pushed record is checked, a
person decides, and merges travel to devices and can be undone."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from bench.dedup_data import generate
from bench.dedup_hub import populate
from field_client.enrolment import enrol
from field_client.store import Store
from field_client.sync_runner import run_sync
from schemas.matching import (
    BLOCK_BUDGET,
    PROFILE_VERSION,
    REVIEW_THRESHOLD,
    candidates,
    profile,
    profile_to_json,
    score,
    usable_blocks,
)
from schemas.record import SCHEMA_VERSION
from server import accounts, dedup_check, dedup_scan, match_profiles
from server.accounts import Role
from server.dedup_worker import DuplicateChecker
from server.hub import Hub
from server.sealing import RecordCipher
from sync.changes import Version
from sync.hlc import Stamp
from sync.protocol import Edit
from sync.transport import HubClient
from tests.conftest import PASSPHRASE
from tests.hubkit import HandDevice, database_backends, fresh_database, init_hub, live_hub

PASSWORD = "operator password long"


def registration(
    dev: HandDevice, names: dict[str, str], dob: str | None, document: str | None
) -> Edit:
    fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "registration": {
            "site": dev.site,
            "device_id": dev.id,
            "operator": "tester",
            "registered_at": "2026-11-29T10:00:00+00:00",
        },
        **{f"names.{k}": v for k, v in names.items()},
        "sex": "male",
        "date_of_birth": {"value": dob, "precision": "exact"},
        "nationalities": ["EGY"],
        "situation.scenario": "crossed_border",
        "consent": {"given": True, "legal_basis": "consent", "scope": [], "recorded_by": "t"},
    }
    if dob is None:
        del fields["date_of_birth"]
    elif len(dob) == 4:
        fields["date_of_birth"] = {"value": f"{dob}-01-01", "precision": "year"}
    if document:
        fields["documents"] = [{"type": "passport", "status": "held", "number": document}]
    return dev.edit(str(uuid.uuid4()), fields)


def add_operator(hub: Hub, name: str, sites: list[str]) -> None:
    """A hub operator for `sites`, with password `PASSWORD`."""
    with hub.engine.begin() as conn:
        accounts.add_user(
            conn,
            name=name,
            role=Role.HUB_OPERATOR,
            sites=sites,
            password=PASSWORD,
            now=datetime.now(UTC),
        )


@pytest.fixture(params=database_backends())
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[httpx.Client, Hub, str]]:
    with (
        fresh_database(request.param) as url,
        live_hub(init_hub(tmp_path / "hub", url)) as (base, hub),
        httpx.Client(base_url=base, timeout=30) as http,
    ):
        add_operator(hub, "op", ["border", "camp"])
        add_operator(hub, "op-camp", ["camp"])
        yield http, hub, base


def login(http: httpx.Client, name: str = "op") -> dict[str, str]:
    token = http.post("/api/v1/auth/token", data={"username": name, "password": PASSWORD}).json()
    return {"Authorization": f"Bearer {token['access_token']}"}


def test_the_same_person_at_two_sites_is_queued_explained_and_decided(
    env: tuple[httpx.Client, Hub, str], tmp_path: Path
) -> None:
    http, hub, base = env
    border = HandDevice.enrol(http, hub, "border")
    camp = HandDevice.enrol(http, hub, "camp")
    first = registration(
        border, {"given": "Mohamed", "family": "Abdel Rahman"}, "1988-03-14", "A1234567"
    )
    other = registration(border, {"given": "Grace", "family": "Okafor"}, "1990-05-01", None)
    border.open_answer(border.push(border.envelope([first, other])))
    again = registration(
        camp,
        {"given_original": "محمد", "given": "Muhammad", "family": "Abdelrahman"},
        "1988",
        "a 1234567",
    )
    camp.open_answer(camp.push(camp.envelope([again])))
    auth = login(http)
    [pair] = http.get("/api/v1/duplicates", headers=auth).json()
    assert {pair["record_a"], pair["record_b"]} == {first.record_id, again.record_id}
    assert (
        http.get("/api/v1/duplicates", headers=login(http, "op-camp")).json() == []
    )  # both sites needed
    detail = http.get(f"/api/v1/duplicates/{pair['id']}", headers=auth).json()
    assert {e["field"] for e in detail["explanation"]} >= {"names", "date_of_birth", "documents"}
    assert any(e["outcome"] == "agree" for e in detail["explanation"])

    merged = http.post(
        f"/api/v1/duplicates/{pair['id']}/merge",
        headers=auth,
        json={"survivor": first.record_id, "take_from_other": ["names.given_original"]},
    )
    assert merged.status_code == 200, merged.text
    assert merged.json()["status"] == "merged"
    view = http.get(f"/api/v1/records/{again.record_id}", headers=login(http, "op")).json()
    assert view["fields"]["merged_into"] == first.record_id
    survivor = http.get(f"/api/v1/records/{first.record_id}", headers=auth).json()
    assert survivor["fields"]["names.given_original"] == "محمد"

    # A device at the border site receives the merge on its next pull.
    store = Store.init(
        tmp_path / "dev", PASSPHRASE, site="border", operator="x", kdf_memory_kib=1024
    )
    with store, httpx.Client(base_url=base) as dev_http:
        enrol(
            store,
            HubClient(dev_http),
            code=hub.create_enrol_code(
                ["border", "camp"], timedelta(hours=1), request_id="test-enrol"
            ),
        )
        run_sync(store, HubClient(dev_http))
        assert str(store.get(again.record_id).merged_into) == first.record_id

        undone = http.post(f"/api/v1/duplicates/{pair['id']}/unmerge", headers=auth)
        assert undone.status_code == 200 and undone.json()["status"] == "unmerged"
        run_sync(store, HubClient(dev_http))
        assert store.get(again.record_id).merged_into is None
        assert store.get(first.record_id).names.given_original is None
    assert http.post(f"/api/v1/duplicates/{pair['id']}/unmerge", headers=auth).status_code == 409


def test_rejected_pairs_are_not_queued_again_and_households_are_not_pairs(
    env: tuple[httpx.Client, Hub, str],
) -> None:
    http, hub, _ = env
    border = HandDevice.enrol(http, hub, "border")
    a = registration(border, {"given": "Ahmed", "family": "Mansour"}, "1975-02-02", "P7654321")
    b = registration(border, {"given": "Ahmad", "family": "Mansur"}, "1975-02-02", None)
    border.open_answer(border.push(border.envelope([a, b])))
    auth = login(http)
    [pair] = http.get("/api/v1/duplicates", headers=auth).json()
    rejected = http.post(f"/api/v1/duplicates/{pair['id']}/reject", headers=auth)
    assert rejected.json()["status"] == "rejected"
    edit = border.edit(a.record_id, {"phone": "+218 91 555 0000"})
    border.open_answer(border.push(border.envelope([edit])))  # checked again on every push
    assert http.get("/api/v1/duplicates", headers=auth).json() == []
    assert (
        len(http.get("/api/v1/duplicates", headers=auth, params={"status": "rejected"}).json()) == 1
    )
    bad = http.post(
        f"/api/v1/duplicates/{pair['id']}/merge", headers=auth, json={"survivor": a.record_id}
    )
    assert bad.status_code == 409 and bad.json()["code"] == "duplicate.not_open"


def test_one_push_holding_the_same_person_three_times_queues_each_pair_once(
    env: tuple[httpx.Client, Hub, str],
) -> None:
    http, hub, _ = env
    border = HandDevice.enrol(http, hub, "border")
    names = {"given": "Mohamed", "family": "Abdel Rahman"}
    same = [registration(border, names, "1988-03-14", "A1234567") for _ in range(3)]
    border.open_answer(border.push(border.envelope(same)))
    queued = http.get("/api/v1/duplicates", headers=login(http)).json()
    ids = sorted(e.record_id for e in same)
    assert sorted((p["record_a"], p["record_b"]) for p in queued) == [
        (ids[0], ids[1]),
        (ids[0], ids[2]),
        (ids[1], ids[2]),
    ]


def test_a_cached_match_profile_is_not_used_after_its_record_changed(
    env: tuple[httpx.Client, Hub, str],
) -> None:
    http, hub, _ = env
    hub.checker.stop()  # checks run when this test says, in this process or the other
    border = HandDevice.enrol(http, hub, "border")
    camp = HandDevice.enrol(http, hub, "camp")
    first = registration(border, {"given": "Grace", "family": "Okafor"}, "1990-05-01", None)
    border.open_answer(border.push(border.envelope([first])))
    assert hub.checker.check_all_pending() == 0
    assert first.record_id in hub.profiles
    # Another hub process renames the record and checks it: this process's
    # cached profile (Grace Okafor) is stale and must not be used.
    renamed = border.edit(first.record_id, {"names.given": "Tesfaye", "names.family": "Bekele"})
    other_process = Hub(hub.settings)
    try:
        other_process.push(border.envelope([renamed]))
        assert other_process.checker.check_all_pending() == 0
    finally:
        other_process.engine.dispose()
    again = registration(camp, {"given": "Tesfaye", "family": "Bekele"}, "1990-05-01", "EP9988776")
    camp.open_answer(camp.push(camp.envelope([again])))
    [pair] = http.get("/api/v1/duplicates", headers=login(http)).json()
    assert {pair["record_a"], pair["record_b"]} == {first.record_id, again.record_id}


def test_a_merge_that_would_make_strangers_one_person_is_refused(
    env: tuple[httpx.Client, Hub, str],
) -> None:
    http, hub, _ = env
    border = HandDevice.enrol(http, hub, "border")
    names = {"given": "Tesfaye", "family": "Gebremedhin"}
    vague = registration(border, names, None, None)  # matches both below
    older = registration(border, names, "1961-07-02", "Z7654321")
    younger = registration(border, names, "1988-03-14", "A1234567")
    border.open_answer(border.push(border.envelope([vague, older, younger])))
    auth = login(http)
    queued = {
        frozenset((p["record_a"], p["record_b"])): p["id"]
        for p in http.get("/api/v1/duplicates", headers=auth).json()
    }
    assert frozenset((older.record_id, younger.record_id)) not in queued  # two people
    with_older = queued[frozenset((vague.record_id, older.record_id))]
    with_younger = queued[frozenset((vague.record_id, younger.record_id))]
    first = http.post(
        f"/api/v1/duplicates/{with_older}/merge", headers=auth, json={"survivor": vague.record_id}
    )
    assert first.status_code == 200, first.text
    chained = http.post(
        f"/api/v1/duplicates/{with_younger}/merge",
        headers=auth,
        json={"survivor": vague.record_id},
    )
    assert chained.status_code == 409 and chained.json()["code"] == "duplicate.strangers"
    assert set(chained.json()["records"]) == {older.record_id, younger.record_id}
    assert http.get(f"/api/v1/duplicates/{with_younger}", headers=auth).json()["status"] == "open"
    into_merged = http.post(
        f"/api/v1/duplicates/{with_younger}/merge",
        headers=auth,
        json={"survivor": younger.record_id},
    )
    assert into_merged.status_code == 409
    assert into_merged.json()["code"] == "duplicate.strangers"
    # Once the first merge is undone, the second pair can be merged on its own.
    assert http.post(f"/api/v1/duplicates/{with_older}/unmerge", headers=auth).status_code == 200
    again = http.post(
        f"/api/v1/duplicates/{with_younger}/merge", headers=auth, json={"survivor": vague.record_id}
    )
    assert again.status_code == 200, again.text


def _queued(http: httpx.Client, auth: dict[str, str]) -> dict[frozenset[str], int]:
    return {
        frozenset((p["record_a"], p["record_b"])): p["id"]
        for p in http.get("/api/v1/duplicates", headers=auth).json()
    }


def _merge(http: httpx.Client, auth: dict[str, str], pair: int, survivor: Edit, **kw: Any) -> Any:
    return http.post(
        f"/api/v1/duplicates/{pair}/merge",
        headers=auth,
        json={"survivor": survivor.record_id, **kw},
    )


def test_a_chain_of_merges_is_checked_as_one_person(env: tuple[httpx.Client, Hub, str]) -> None:
    http, hub, _ = env
    border = HandDevice.enrol(http, hub, "border")
    names = {"given": "Tesfaye", "family": "Gebremedhin"}
    vague, vaguer = (
        registration(border, names, "1975", None),
        registration(border, names, "1975", None),
    )
    older = registration(border, names, "1975-02-03", "Z7654321")
    other = registration(border, names, "1975-11-20", "A1234567")
    border.open_answer(border.push(border.envelope([vague, vaguer, older, other])))
    auth = login(http)
    queued = _queued(http, auth)
    assert frozenset((older.record_id, other.record_id)) not in queued  # two people
    # `older` into `vague`, then `vague` into `vaguer`: all three are one person,
    # and `older` is weighed by the name counts the queue used (it scored them).
    into_vague = queued[frozenset((vague.record_id, older.record_id))]
    assert _merge(http, auth, into_vague, vague).status_code == 200
    up = _merge(http, auth, queued[frozenset((vague.record_id, vaguer.record_id))], vaguer)
    assert up.status_code == 200, up.text
    # `other` would join `older` two merges down: refused, as if they met directly.
    chained = _merge(http, auth, queued[frozenset((vaguer.record_id, other.record_id))], vaguer)
    assert chained.status_code == 409 and chained.json()["code"] == "duplicate.strangers"
    assert set(chained.json()["records"]) == {older.record_id, other.record_id}


def test_a_merge_weighs_names_as_the_queue_did(env: tuple[httpx.Client, Hub, str]) -> None:
    http, hub, _ = env
    border = HandDevice.enrol(http, hub, "border")
    names = {"given": "Tesfaye", "family": "Gebremedhin"}
    bare, barer = registration(border, names, None, None), registration(border, names, None, None)
    full = registration(border, names, "1961-07-02", "Z7654321")
    border.open_answer(border.push(border.envelope([bare, barer, full])))
    auth = login(http)
    queued = _queued(http, auth)
    # Three records carry the name: the queue weighed it by that, and so do
    # the pair's explanation and the strangers check of a merge.
    barer_full = queued[frozenset((barer.record_id, full.record_id))]
    shown = http.get(f"/api/v1/duplicates/{barer_full}", headers=auth).json()
    [names_weight] = [e for e in shown["explanation"] if e["field"] == "names"]
    assert "carried by 3 records" in names_weight["detail"]
    assert _merge(http, auth, queued[frozenset((bare.record_id, full.record_id))], bare).is_success
    joined = _merge(http, auth, queued[frozenset((bare.record_id, barer.record_id))], barer)
    assert joined.status_code == 200, joined.text


def test_a_record_stays_at_the_site_it_was_registered_at(
    env: tuple[httpx.Client, Hub, str],
) -> None:
    http, hub, _ = env
    both = HandDevice.enrol(http, hub, "camp", also=("border",))
    names = {"given": "Mohamed", "family": "Abdel Rahman"}
    a, b = (registration(both, names, "1988-03-14", "A1234567") for _ in range(2))
    both.open_answer(both.push(both.envelope([a, b])))
    camp = login(http, "op-camp")
    [pair] = http.get("/api/v1/duplicates", headers=camp).json()
    # Moved, the record would reach border devices without its earlier edits
    # and camp devices would never hear of it: the move is held back.
    moved = {**dict(a.fields)["registration"], "site": "border"}
    move = both.edit(a.record_id, {"registration": moved, "occupation": "cook"})
    ack = both.open_answer(both.push(both.envelope([move])))
    assert [reason.split(":")[0] for _, reason in ack["quarantined"]] == ["site.fixed"] * 2
    view = http.get(f"/api/v1/records/{a.record_id}", headers=camp).json()
    assert view["fields"]["registration"]["site"] == "camp" and "occupation" not in view["fields"]
    assert http.get("/api/v1/duplicates", headers=camp).json() == [pair]


def test_an_unmerge_gives_back_only_what_nobody_changed_since(
    env: tuple[httpx.Client, Hub, str],
) -> None:
    http, hub, _ = env
    border = HandDevice.enrol(http, hub, "border")
    family = {"family": "Abdel Rahman"}
    a, b, c = (
        registration(border, {"given": given, **family}, "1988-03-14", "A1234567")
        for given in ("Mohamed", "Muhammad", "Mohammed")
    )
    border.open_answer(border.push(border.envelope([a, b, c])))
    auth = login(http)
    queued = _queued(http, auth)
    with_b, with_c = (queued[frozenset((a.record_id, x.record_id))] for x in (b, c))

    def given() -> str:
        view = http.get(f"/api/v1/records/{a.record_id}", headers=auth).json()
        return str(view["fields"]["names.given"])

    for pair in (with_b, with_c):
        assert _merge(http, auth, pair, a, take_from_other=["names.given"]).status_code == 200
    assert given() == "Mohammed"
    # The later merge took the name again: it is undone first, or the first
    # undo would give back a name the later one still relies on.
    early = http.post(f"/api/v1/duplicates/{with_b}/unmerge", headers=auth)
    assert early.status_code == 409 and early.json()["code"] == "duplicate.unmerge_order"
    assert early.json()["pair"] == with_c and given() == "Mohammed"
    assert http.post(f"/api/v1/duplicates/{with_c}/unmerge", headers=auth).status_code == 200
    assert given() == "Muhammad"
    undone = http.post(f"/api/v1/duplicates/{with_b}/unmerge", headers=auth)
    assert undone.status_code == 200 and undone.json()["kept"] == []
    assert given() == "Mohamed"

    # A device corrects the merged name afterwards: the unmerge keeps the correction.
    d = registration(border, {"given": "Mohamad", **family}, "1988-03-14", "A1234567")
    border.open_answer(border.push(border.envelope([d])))
    with_d = _queued(http, auth)[frozenset((a.record_id, d.record_id))]
    assert _merge(http, auth, with_d, a, take_from_other=["names.given"]).status_code == 200
    view = http.get(f"/api/v1/records/{a.record_id}", headers=auth).json()
    [merged] = [h for h in view["history"] if h["field"] == "names.given" and h["is_current"]]
    seen = Version(Stamp.decode(merged["stamp"]), merged["device_id"])
    border.clock.observe(seen.stamp)
    fix = border.edit(a.record_id, {"names.given": "Mohammad"}, {"names.given": seen})
    assert border.open_answer(border.push(border.envelope([fix])))["conflicts"] == []
    kept = http.post(f"/api/v1/duplicates/{with_d}/unmerge", headers=auth)
    assert kept.status_code == 200 and kept.json()["kept"] == ["names.given"]
    assert given() == "Mohammad"
    d_view = http.get(f"/api/v1/records/{d.record_id}", headers=auth).json()
    assert d_view["fields"].get("merged_into") is None


def test_the_hub_checks_pushed_records_by_itself_after_the_push_answered(
    env: tuple[httpx.Client, Hub, str],
) -> None:
    http, hub, _ = env
    border = HandDevice.enrol(http, hub, "border")
    names = {"given": "Habtom", "family": "Asmerom"}
    twice = [registration(border, names, "1979-11-02", "P4455667") for _ in range(2)]
    border.open_answer(border.push(border.envelope(twice)))
    deadline = time.monotonic() + 30
    while True:  # nobody reads the queue: the hub's checker thread does the work
        with hub.engine.connect() as conn:
            waiting = dedup_check.count_pending(conn)
            found = conn.execute(sa.text("SELECT record_a, record_b FROM duplicates")).all()
        if not waiting and found:
            break
        assert time.monotonic() < deadline, f"{waiting} record(s) still wait for the check"
        time.sleep(0.1)
    assert sorted(found[0]) == sorted(e.record_id for e in twice)


def test_the_background_check_waits_while_pushes_arrive_but_not_for_ever() -> None:
    now = [100.0]
    checker = DuplicateChecker(
        sa.create_engine("sqlite://"),
        index=dedup_check.BlockIndex(b"k" * 32),
        master_key=b"k" * 32,
        cache=match_profiles.ProfileCache(0),
        now=lambda: datetime.now(UTC),
        idle_s=0.5,
        max_hold_s=10.0,
        monotonic=lambda: now[0],
    )
    assert checker.hold_off_s() == 0.0  # no push yet: check at once
    with checker.push_arriving():
        assert checker.hold_off_s() == 0.5  # a push in progress
        now[0] += 0.3
    assert checker.hold_off_s() == pytest.approx(0.5)  # it just ended
    now[0] += 0.5
    assert checker.hold_off_s() == 0.0  # a pause: check
    burst = now[0] + 0.2  # the first hold-off below
    for _ in range(100):  # pushes that never pause
        with checker.push_arriving():
            now[0] += 0.1
        now[0] += 0.1
        if not checker.hold_off_s():
            break
    assert now[0] - burst == pytest.approx(10.0, abs=0.25)  # checking starts after max_hold_s
    with checker.push_arriving():
        assert checker.hold_off_s() == 0.0  # and shares the time with them until a pause
    now[0] += 0.5
    assert checker.hold_off_s() == 0.0
    with checker.push_arriving():
        assert checker.hold_off_s() == 0.5  # the next burst is waited for again


def test_a_profile_stored_by_another_version_of_the_matcher_is_made_again(
    env: tuple[httpx.Client, Hub, str],
) -> None:
    http, hub, _ = env
    hub.checker.stop()
    border = HandDevice.enrol(http, hub, "border")
    camp = HandDevice.enrol(http, hub, "camp")
    names = {"given": "Tesfaye", "family": "Bekele"}
    first = registration(border, names, "1990-05-01", "EP9988776")
    border.open_answer(border.push(border.envelope([first])))
    assert hub.checker.check_all_pending() == 0
    # An older matcher's profile of the record (here: somebody else entirely).
    stranger = profile({"names": {"given": "Grace", "family": "Okafor"}, "sex": "female"})
    with hub.engine.begin() as conn:
        wrapped = conn.execute(
            sa.text("SELECT wrapped_key FROM records WHERE id = :r"), {"r": first.record_id}
        ).scalar_one()
        blob = RecordCipher(hub.secrets.master_key, first.record_id, wrapped).seal(
            [PROFILE_VERSION - 1, False, profile_to_json(stranger)], "profile"
        )
        stored = conn.execute(
            sa.text("UPDATE match_profiles SET sealed = :b WHERE record_id = :r"),
            {"b": blob, "r": first.record_id},
        )
        assert stored.rowcount == 1
    fresh = Hub(hub.settings)  # a restarted process: nothing in its memory
    try:
        again = registration(camp, names, "1990-05-01", "EP9988776")
        camp.open_answer(camp.push(camp.envelope([again])))
        assert fresh.checker.check_all_pending() == 0
    finally:
        fresh.engine.dispose()
    [pair] = http.get("/api/v1/duplicates", headers=login(http)).json()
    assert {pair["record_a"], pair["record_b"]} == {first.record_id, again.record_id}


def _blocked_pairs(
    docs: list[tuple[str, dict[str, Any], str]], budget: int = BLOCK_BUDGET
) -> dict[tuple[str, str], float]:
    """The pairs a scan must queue, found in memory: records sharing a usable key,
    scoring at least the review threshold."""
    profiles = {rid: profile(doc) for rid, doc, _ in docs}
    index: dict[str, list[str]] = {}
    for rid, p in profiles.items():
        for key in p.keys:
            index.setdefault(key, []).append(rid)
    counts = {key: len(ids) for key, ids in index.items()}
    expected = {}
    for rid, p in profiles.items():
        for other in candidates(p.keys, index, budget=budget) - {rid}:
            value = score(p, profiles[other], key_counts=counts).score
            if other < rid and value >= REVIEW_THRESHOLD:  # a scan looks back
                expected[other, rid] = value
    return expected


def _scan_docs() -> list[tuple[str, dict[str, Any], str]]:
    """150 persons' registrations (with duplicates), ids in a stable order."""
    return [
        (str(uuid.UUID(int=i + 1)), item.doc, item.site)
        for i, item in enumerate(generate(150, seed=5))
    ]


@contextmanager
def _scan_hub(
    tmp_path: Path, docs: list[tuple[str, dict[str, Any], str]], url: str | None = None
) -> Iterator[tuple[Hub, list[str]]]:
    """A hub holding `docs` (filed, profiled), and its record ids in order."""
    hub = Hub(init_hub(tmp_path / "hub", url))
    try:
        populate(hub, docs)
        with hub.engine.begin() as conn:
            ids = dedup_check.all_record_ids(conn)
        yield hub, ids
    finally:
        hub.engine.dispose()


def _scan(hub: Hub, ids: list[str], **options: Any) -> int:
    """`dedup scan` of `ids` at `hub`, with a fresh profile cache."""
    return dedup_scan.scan(
        hub.engine,
        ids,
        master_key=hub.secrets.master_key,
        cache=match_profiles.ProfileCache(),
        **options,
    )


def _queued_pairs(hub: Hub) -> dict[tuple[str, str], float]:
    with hub.engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT record_a, record_b, score FROM duplicates")).all()
    return {(a, b): round(v, 4) for a, b, v in rows}


@pytest.mark.parametrize("backend", database_backends())
def test_a_scan_in_two_processes_queues_the_pairs_a_serial_scan_does(
    backend: str, tmp_path: Path
) -> None:
    docs = _scan_docs()
    expected = _blocked_pairs(docs)
    assert len(expected) >= 10  # enough duplicates for the test to mean something
    with fresh_database(backend) as url, _scan_hub(tmp_path, docs, url) as (hub, ids):
        found = {}
        for workers in (1, 2):
            with hub.engine.begin() as conn:
                conn.execute(sa.text("DELETE FROM duplicates"))
            shown: list[int] = []
            queued = _scan(hub, ids, chunk=5, workers=workers, progress=shown.append)
            found[workers] = _queued_pairs(hub)
            assert queued == len(found[workers])
            assert sum(shown) == len(ids) and len(shown) == -(-len(ids) // 5)
        assert found[1] == found[2] == expected


def test_a_check_searches_only_the_blocks_its_budget_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub takes each record's rarest blocks within the budget, as
    `schemas.matching.candidates` does: a scan under a small budget queues the
    pairs the pure rule finds with that budget, and fewer than without it."""
    docs = _scan_docs()
    small = _blocked_pairs(docs, budget=6)
    assert len(small) < len(_blocked_pairs(docs)) and len(small) >= 5
    monkeypatch.setattr(dedup_check, "usable_blocks", lambda sizes: usable_blocks(sizes, budget=6))
    with _scan_hub(tmp_path, docs) as (hub, ids):
        _scan(hub, ids)
        assert _queued_pairs(hub) == small


def test_a_scan_after_the_matcher_changed_refiles_every_record_before_checking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = _scan_docs()
    expected = _blocked_pairs(docs)
    with _scan_hub(tmp_path, docs) as (hub, ids):
        with hub.engine.begin() as conn:
            # An upgrade whose matcher (PROFILE_VERSION 2) files records under other
            # keys: those filed by the old one meet nothing, as if there were none.
            conn.execute(sa.text("DELETE FROM block_keys"))
        monkeypatch.setattr(dedup_check, "PROFILE_VERSION", 2)

        def scan(refiling: Any = lambda done, total: None) -> None:
            _scan(hub, ids, chunk=5, refiling=refiling)

        def queued() -> set[tuple[str, str]]:
            with hub.engine.begin() as conn:
                rows = conn.execute(sa.text("SELECT record_a, record_b FROM duplicates")).all()
            return {(a, b) for a, b in rows}

        # What a scan gets wrong if it trusted the old keys: a record's blocks and
        # its names' weights count only the records filed before it.
        with hub.engine.begin() as conn:
            dedup_check.mark_index_current(conn)
        scan()
        assert queued() != set(expected)
        with hub.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM duplicates"))
            stale = "UPDATE hub_meta SET value = '1' WHERE key = 'block_index_version'"
            conn.execute(sa.text(stale))
            assert not dedup_check.index_is_current(conn)
        told: list[tuple[int, int]] = []
        scan(lambda done, total: told.append((done, total)))
        assert queued() == set(expected)
        assert told[-1] == (len(ids), len(ids)) and len(told) == -(-len(ids) // 5)
        with hub.engine.begin() as conn:
            assert dedup_check.index_is_current(conn)
        told.clear()
        scan(lambda done, total: told.append((done, total)))
        assert not told  # refiled once, not on every scan


def test_a_scan_files_the_records_still_waiting_for_their_check_first(tmp_path: Path) -> None:
    """Records a push stored whose check has not run yet (the hub stopped first)
    are filed under no key: a scan files them before checking anything, so each
    record's blocks and weights count them whichever chunk they are in, and the
    pairs found do not depend on the chunks or on which chunk is checked first."""
    docs = _scan_docs()
    expected = _blocked_pairs(docs)
    with _scan_hub(tmp_path, docs) as (hub, ids):
        with hub.engine.begin() as conn:
            waiting = ids[::2]
            for rid in waiting:
                conn.execute(sa.text("DELETE FROM block_keys WHERE record_id = :r"), {"r": rid})
            dedup_check.queue_records(conn, waiting, now=datetime.now(UTC))
            assert dedup_check.index_is_current(conn)
        _scan(hub, ids, chunk=5)
        with hub.engine.begin() as conn:
            assert dedup_check.count_pending(conn) == 0
        assert _queued_pairs(hub) == expected


def test_a_new_hub_s_index_is_current(tmp_path: Path) -> None:
    hub = Hub(init_hub(tmp_path / "hub"))
    try:
        with hub.engine.begin() as conn:
            assert dedup_check.index_is_current(conn)
    finally:
        hub.engine.dispose()


def test_the_hub_and_a_scans_workers_open_sqlite_as_the_settings_say(tmp_path: Path) -> None:
    settings = init_hub(tmp_path / "hub").model_copy(
        update={"sqlite_mmap_mb": 64, "busy_timeout_s": 7.0}
    )
    for mmap_mb in (64, 0):
        hub = Hub(settings.model_copy(update={"sqlite_mmap_mb": mmap_mb}))
        try:
            with hub.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA mmap_size").scalar_one() == mmap_mb * 2**20
            # what a scan's worker processes open their own engines with
            options = dedup_scan._sqlite_options(hub.engine)
            assert options == {"busy_timeout_s": 7.0, "mmap_mb": mmap_mb}
        finally:
            hub.engine.dispose()


def test_a_scan_whose_worker_dies_stops_with_a_reason_and_keeps_what_it_queued(
    tmp_path: Path,
) -> None:
    docs = _scan_docs()
    with _scan_hub(tmp_path, docs) as (hub, ids):
        killed: list[int] = []

        def kill_a_worker(_checked: int) -> None:
            # After the first chunk: one of the scoring processes is killed (as
            # the kernel's out-of-memory killer would).
            if not killed:
                victim = multiprocessing.active_children()[0]
                os.kill(victim.pid or 0, signal.SIGKILL)
                killed.append(victim.pid or 0)

        started = time.monotonic()
        with pytest.raises(dedup_scan.ScanStopped, match="died"):
            _scan(hub, ids, chunk=5, workers=2, progress=kill_a_worker)
        assert killed and time.monotonic() - started < 120  # it stops; it does not hang
        # The hub is usable and a scan run again finds every pair, once.
        assert _scan(hub, ids) >= 0
        with hub.engine.begin() as conn:
            rows = conn.execute(sa.text("SELECT record_a, record_b FROM duplicates")).all()
        assert {(a, b) for a, b in rows} == set(_blocked_pairs(docs))
        assert len(rows) == len({(a, b) for a, b in rows})


@pytest.mark.parametrize("backend", database_backends())
def test_a_scan_queues_a_pair_found_meanwhile_once_and_keeps_changed_records_pending(
    backend: str, tmp_path: Path
) -> None:
    docs = [
        (str(uuid.UUID(int=i + 1)), item.doc, item.site)
        for i, item in enumerate(generate(40, seed=5))
    ]
    with fresh_database(backend) as url:
        hub = Hub(init_hub(tmp_path / "hub", url))
        try:
            populate(hub, docs)
            ids = [rid for rid, _, _ in docs]
            with hub.engine.begin() as conn:
                gathered = dedup_check.gather(
                    conn, ids, index=hub.block_index, master_key=hub.secrets.master_key
                )
                dedup_check.queue_records(conn, ids, now=datetime.now(UTC))
            found = dedup_check.score_gathered(gathered)
            assert found
            with hub.engine.begin() as conn:  # another checker queues them first
                assert dedup_check.queue_pairs(conn, found, now=datetime.now(UTC)) == len(found)
            with hub.engine.begin() as conn:  # then the scan that found them too
                assert dedup_check.queue_pairs(conn, found, now=datetime.now(UTC)) == 0
                conn.execute(
                    sa.text("UPDATE records SET last_hub_seq = last_hub_seq + 1 WHERE id = :r"),
                    {"r": ids[0]},
                )
                dedup_check.clear_checked(conn, {r: e.seq for r, e in gathered.mine.items()})
                assert dedup_check.take_pending(conn, 100) == [ids[0]]
        finally:
            hub.engine.dispose()
