"""The hub's push route against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from server import conflict_review, devices, name_index
from server.hub import Hub
from server.records import load_records
from sync.changes import Version
from sync.envelope import Header, seal
from sync.hlc import Clock, Stamp, system_ms
from sync.protocol import Edit
from tests.hubkit import (
    ADMIN_PASSWORD,
    HandDevice,
    database_backends,
    fresh_database,
    init_hub,
    live_hub,
)


@pytest.fixture(params=database_backends())
def hub_env(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[httpx.Client, Hub, Path]]:
    with fresh_database(request.param) as url:
        settings = init_hub(tmp_path / "hub", url)
        with live_hub(settings) as (base, hub), httpx.Client(base_url=base, timeout=30) as http:
            yield http, hub, tmp_path / "hub"


def count(hub: Hub, table: str) -> int:
    with hub.engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def stored(hub: Hub) -> tuple[int, ...]:
    return tuple(count(hub, t) for t in ("records", "changes", "batches", "conflicts"))


def test_push_applies_once_and_duplicates_are_acknowledged(
    hub_env: tuple[httpx.Client, Hub, Path],
) -> None:
    http, hub, _ = hub_env
    dev = HandDevice.enrol(http, hub, "ras-jedir")
    edits = [dev.new_record("Amina"), dev.new_record("Yusuf")]
    envelope = dev.envelope(edits)
    ack = dev.open_answer(dev.push(envelope))
    assert ack["duplicate"] is False and ack["high_water"] == edits[-1].last_seq
    assert stored(hub) == (2, 2, 1, 0)
    again = dev.open_answer(dev.push(envelope))  # the answer was lost; the device retries
    assert again["duplicate"] is True and again["high_water"] == ack["high_water"]
    resealed = dev.open_answer(dev.push(dev.envelope(edits)))  # re-sealed after a crash
    assert resealed["duplicate"] is True
    assert stored(hub) == (2, 2, 1, 0)


def test_same_batch_id_other_content_is_refused(hub_env: tuple[httpx.Client, Hub, Path]) -> None:
    http, hub, _ = hub_env
    dev = HandDevice.enrol(http, hub, "ras-jedir")
    edit = dev.new_record("Amina")
    dev.open_answer(dev.push(dev.envelope([edit])))
    other = type(edit)(
        edit.record_id, edit.version, edit.operator, (("names.given", "X"),), {}, edit.first_seq
    )
    before = stored(hub)
    answer = dev.push(dev.envelope([other], batch_id=f"{edit.first_seq}-{edit.last_seq}"))
    assert answer.status_code == 409 and answer.json()["code"] in {
        "batch.id_reused",
        "batch.malformed",
    }
    assert stored(hub) == before


def test_gap_names_the_expected_sequence(hub_env: tuple[httpx.Client, Hub, Path]) -> None:
    http, hub, _ = hub_env
    dev = HandDevice.enrol(http, hub, "ras-jedir")
    dev.new_record("Lost")  # numbered, never sent
    answer = dev.push(dev.envelope([dev.new_record("Later")]))
    assert answer.status_code == 409
    problem = answer.json()
    assert answer.headers["content-type"] == "application/problem+json"
    assert problem["code"] == "batch.gap" and problem["expected_seq"] == 1
    assert stored(hub) == (0, 0, 0, 0)


def test_replay_under_a_new_batch_id_is_refused(hub_env: tuple[httpx.Client, Hub, Path]) -> None:
    http, hub, _ = hub_env
    dev = HandDevice.enrol(http, hub, "ras-jedir")
    edits = [dev.new_record("Amina")]
    dev.open_answer(dev.push(dev.envelope(edits)))
    before = stored(hub)
    answer = dev.push(dev.envelope(edits, batch_id="replayed-copy"))
    assert answer.status_code == 409 and answer.json()["code"] == "envelope.replayed"
    assert stored(hub) == before


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_tampering_is_refused_with_stable_codes(hub_env: tuple[httpx.Client, Hub, Path]) -> None:
    http, hub, _ = hub_env
    dev = HandDevice.enrol(http, hub, "ras-jedir")
    other = HandDevice.enrol(http, hub, "ras-jedir")
    envelope = dev.envelope([dev.new_record("Amina")])
    header_len = int.from_bytes(envelope[5:9], "big")
    ct_start = 9 + header_len + 4
    cases = {
        "header": (
            _flip(envelope, 9 + header_len // 2),
            {"envelope.malformed", "envelope.bad_signature"},
        ),
        "ciphertext": (_flip(envelope, ct_start + 100), {"envelope.bad_signature"}),
        "signature": (_flip(envelope, len(envelope) - 5), {"envelope.bad_signature"}),
        "truncated": (envelope[:-10], {"envelope.malformed"}),
        "magic": (b"XXXX" + envelope[4:], {"envelope.malformed"}),
    }
    for name, (bad, codes) in cases.items():
        answer = dev.push(bad)
        assert answer.status_code in (400, 401), name
        assert answer.json()["code"] in codes, (name, answer.json())
    # Device B re-signs A's batch under A's name: the signature does not verify against A's key.
    header = Header(
        protocol=1,
        schema_version=1,
        kind="push",
        sender=dev.id,
        recipient="hub",
        batch_id="1-7",
        seq_first=1,
        seq_last=7,
        sent_at_ms=system_ms(),
        kem=dev.hub_keys.kem_algorithm.value,
    )
    forged = seal(header, b'{"edits":[]}', recipient=dev.hub_keys, sender=other.keys)
    assert dev.push(forged).json()["code"] == "envelope.bad_signature"
    # An unknown device, and an unsupported protocol version.
    stranger = HandDevice(http, "not-enrolled", "ras-jedir", other.keys, dev.hub_keys)
    assert (
        dev.push(stranger.envelope([stranger.new_record("X")])).json()["code"] == "device.unknown"
    )
    future = envelope[:9] + envelope[9:].replace(b'"protocol":1', b'"protocol":2', 1)
    assert dev.push(future).json()["code"] == "protocol.unsupported"
    assert stored(hub) == (0, 0, 0, 0)


def test_a_body_nested_too_deep_to_parse_is_malformed(
    hub_env: tuple[httpx.Client, Hub, Path],
) -> None:
    http, hub, _ = hub_env
    dev = HandDevice.enrol(http, hub, "ras-jedir")
    record = dev.new_record("Amina")
    for depth in (5_000, 100_000):
        body = b'{"edits":' + b"[" * depth + b"]" * depth + b"}"
        answer = dev.push(dev.envelope([record], body=body))
        assert answer.status_code == 400, answer.text
        assert answer.json()["code"] == "batch.malformed"
    assert stored(hub) == (0, 0, 0, 0)
    dev.open_answer(dev.push(dev.envelope([record])))
    assert stored(hub) == (1, 1, 1, 0)


def test_poison_edit_is_quarantined_and_the_rest_applies(
    hub_env: tuple[httpx.Client, Hub, Path],
) -> None:
    http, hub, _ = hub_env
    dev = HandDevice.enrol(http, hub, "ras-jedir")
    good = dev.new_record("Amina")
    bad = dev.edit(good.record_id, {"sex": "robot"})
    hidden = dev.edit(good.record_id, {"names.given": "Ami\u202ena"})  # an older device's
    elsewhere = dev.new_record("Far")
    elsewhere_fields = dict(elsewhere.fields)
    elsewhere_fields["registration"] = {**elsewhere_fields["registration"], "site": "other-site"}
    outside = type(elsewhere)(
        elsewhere.record_id,
        elsewhere.version,
        "t",
        tuple(elsewhere_fields.items()),
        {},
        elsewhere.first_seq,
    )
    unknown = dev.edit(str(uuid.uuid4()), {"phone": "+218 91 000 0000"})
    ack = dev.open_answer(dev.push(dev.envelope([good, bad, hidden, outside, unknown])))
    reasons = {reason.split(":")[0] for _, reason in ack["quarantined"]}
    assert reasons == {"field.invalid", "site.out_of_scope", "record.unknown"}
    assert ack["high_water"] == unknown.last_seq
    assert count(hub, "records") == 1 and count(hub, "quarantine") == 4


def test_a_device_cannot_move_another_sites_record_to_its_own(
    hub_env: tuple[httpx.Client, Hub, Path],
) -> None:
    http, hub, _ = hub_env
    ours = HandDevice.enrol(http, hub, "ras-jedir")
    theirs = HandDevice.enrol(http, hub, "port-zarzis")
    record = theirs.new_record("Amina")
    theirs.open_answer(theirs.push(theirs.envelope([record])))
    registration = {**dict(record.fields)["registration"], "site": "ras-jedir"}
    take = ours.edit(record.record_id, {"registration": registration, "names.given": "Taken"})
    ack = ours.open_answer(ours.push(ours.envelope([take])))
    assert [reason for _, reason in ack["quarantined"]] == [
        "site.out_of_scope: this device does not serve site 'port-zarzis'"
    ] * 2
    assert ack["conflicts"] == [] and count(hub, "quarantine") == 1
    view = hub_record(hub, record.record_id)
    assert view["registration"] == dict(record.fields)["registration"]
    assert view["names.given"] == "Amina"


def test_a_registration_time_past_either_end_of_the_calendar_is_kept_but_not_listed(
    hub_env: tuple[httpx.Client, Hub, Path],
) -> None:
    http, hub, _ = hub_env
    dev = HandDevice.enrol(http, hub, "ras-jedir")
    # Valid times whose UTC falls before year 1 or after year 9999.
    for at in ("0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00-05:00"):
        made = dev.new_record("Amina")
        fields = dict(made.fields)
        fields["registration"] = {**fields["registration"], "registered_at": at}
        edit = type(made)(
            made.record_id, made.version, "t", tuple(fields.items()), {}, made.first_seq
        )
        ack = dev.open_answer(dev.push(dev.envelope([edit])))
        assert ack["quarantined"] == [] and ack["high_water"] == edit.last_seq
    with hub.engine.connect() as conn:
        kept = conn.execute(sa.text("SELECT registered_at FROM records")).scalars().all()
    assert kept == [None, None]  # the sealed registration keeps what the device sent
    # An unknown registration time is on no day, the last one included.
    token = http.post(
        "/api/v1/auth/token", data={"username": "admin", "password": ADMIN_PASSWORD}
    ).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    for last in ("9999-12-30", "9999-12-31"):
        listed = http.get("/api/v1/records", headers=auth, params={"registered_to": last})
        assert listed.status_code == 200 and listed.json() == [], listed.text


def test_revoked_device_is_refused_and_its_batch_quarantined(
    hub_env: tuple[httpx.Client, Hub, Path],
) -> None:
    http, hub, _ = hub_env
    dev = HandDevice.enrol(http, hub, "ras-jedir")
    with hub.engine.begin() as conn:
        devices.revoke_device(conn, dev.id, reason="phone lost", now=datetime.now(UTC))
    answer = dev.push(dev.envelope([dev.new_record("Amina")]))
    assert answer.status_code == 403
    assert answer.json()["code"] == "device.revoked" and answer.json()["action"] == "wipe"
    assert count(hub, "records") == 0 and count(hub, "quarantine") == 1


def test_concurrent_edits_open_one_conflict(hub_env: tuple[httpx.Client, Hub, Path]) -> None:
    http, hub, _ = hub_env
    a = HandDevice.enrol(http, hub, "ras-jedir")
    b = HandDevice.enrol(http, hub, "ras-jedir")
    create = a.new_record("Amina")
    a.open_answer(a.push(a.envelope([create])))
    base = Version(create.version.stamp, a.id)
    a_edit = a.edit(create.record_id, {"situation.needs": ["food"]}, {"situation.needs": base})
    b_create_seq = b.seq
    b_edit = b.edit(create.record_id, {"situation.needs": ["shelter"]}, {"situation.needs": base})
    assert b_create_seq == 0
    a.open_answer(a.push(a.envelope([a_edit])))
    ack = b.open_answer(b.push(b.envelope([b_edit])))
    assert ack["conflicts"] == [b_edit.first_seq]
    assert count(hub, "conflicts") == 1
    # The same field edited again on top of the winner is sequential: no new conflict.
    winner = max(a_edit.version, b_edit.version)
    a_next = a.edit(
        create.record_id, {"situation.needs": ["food", "shelter"]}, {"situation.needs": winner}
    )
    a.open_answer(a.push(a.envelope([a_next])))
    assert count(hub, "conflicts") == 1


def test_identifying_values_never_reach_the_database_in_clear(
    hub_env: tuple[httpx.Client, Hub, Path],
) -> None:
    http, hub, data_dir = hub_env
    dev = HandDevice.enrol(http, hub, "ras-jedir")
    names = ["Zubeidaqa", "Qarawiyyinoo", "Tesfamariamx"]
    edits = [dev.new_record(n) for n in names]
    dev.open_answer(dev.push(dev.envelope(edits)))
    with hub.engine.connect() as conn:  # every row of every table, as the database returns it
        for table in sa.inspect(conn).get_table_names():
            dump = repr(conn.execute(sa.text(f"SELECT * FROM {table}")).all())
            for name in names:
                assert name not in dump, f"{name} in table {table}"
    hub.engine.dispose()
    for path in data_dir.iterdir():
        raw = path.read_bytes()
        for name in [*names, "Testperson"]:
            assert name.encode() not in raw, f"{name} in {path.name}"
    assert count(hub, "records") == 3


def test_enrol_codes_are_one_time_and_expire(hub_env: tuple[httpx.Client, Hub, Path]) -> None:
    http, hub, _ = hub_env
    from sync.keys import KeyPairs

    keys = KeyPairs.generate().public().to_json()
    code = hub.create_enrol_code(["ras-jedir"], timedelta(hours=1), request_id="test-enrol")
    first = http.post(
        "/api/v1/enrol",
        json={"code": code, "device_id": "d1", "site": "ras-jedir", "public_keys": keys},
    )
    assert first.status_code == 200
    again = http.post(
        "/api/v1/enrol",
        json={"code": code, "device_id": "d2", "site": "ras-jedir", "public_keys": keys},
    )
    assert again.status_code == 403 and "already used" in again.json()["detail"]
    # The device it enrolled may ask again (its answer lost), with the same keys only.
    repeat = {"code": code, "device_id": "d1", "site": "ras-jedir", "public_keys": keys}
    assert http.post("/api/v1/enrol", json=repeat).json()["device_id"] == "d1"
    other_keys = KeyPairs.generate().public().to_json()
    taken = http.post("/api/v1/enrol", json={**repeat, "public_keys": other_keys})
    assert taken.status_code == 403 and "already used" in taken.json()["detail"]
    with hub.engine.begin() as conn:
        devices.revoke_device(conn, "d1", reason="phone lost", now=datetime.now(UTC))
    assert http.post("/api/v1/enrol", json=repeat).status_code == 403
    expired = hub.create_enrol_code(["ras-jedir"], timedelta(seconds=-1), request_id="test-enrol")
    late = http.post(
        "/api/v1/enrol",
        json={"code": expired, "device_id": "d3", "site": "ras-jedir", "public_keys": keys},
    )
    assert late.status_code == 403 and "expired" in late.json()["detail"]
    other = hub.create_enrol_code(["port-zarzis"], timedelta(hours=1), request_id="test-enrol")
    wrong = http.post(
        "/api/v1/enrol",
        json={"code": other, "device_id": "d4", "site": "ras-jedir", "public_keys": keys},
    )
    assert wrong.status_code == 409 and wrong.json()["code"] == "enrol.site_mismatch"
    bad_keys = http.post(
        "/api/v1/enrol",
        json={
            "code": other,
            "device_id": "d5",
            "site": "port-zarzis",
            "public_keys": {**keys, "signing": "AA"},
        },
    )
    assert bad_keys.status_code == 422 and bad_keys.json()["code"] == "request.invalid"


def test_no_device_may_enrol_under_the_hubs_own_id(
    hub_env: tuple[httpx.Client, Hub, Path],
) -> None:
    from server.hub import HUB_ID
    from server.hub_edits import HUB_DEVICE
    from sync.keys import KeyPairs

    http, hub, _ = hub_env
    code = hub.create_enrol_code(["ras-jedir"], timedelta(hours=1), request_id="test-enrol")
    keys = KeyPairs.generate().public().to_json()
    for device_id in sorted({HUB_ID, HUB_DEVICE, "HUB", "Hub"}):
        answer = http.post(
            "/api/v1/enrol",
            json={"code": code, "device_id": device_id, "site": "ras-jedir", "public_keys": keys},
        )
        assert answer.status_code == 409, answer.text
        assert answer.json()["code"] == "device.id_reserved"
        assert answer.headers["content-type"].startswith("application/problem+json")
    assert count(hub, "devices") == 0
    fine = http.post(  # the code was not spent
        "/api/v1/enrol",
        json={"code": code, "device_id": "hub-2", "site": "ras-jedir", "public_keys": keys},
    )
    assert fine.status_code == 200, fine.text


def test_device_a_day_ahead_cannot_drag_the_hub_clock(
    hub_env: tuple[httpx.Client, Hub, Path],
) -> None:
    http, hub, _ = hub_env
    day_ms = 86_400_000
    dev = HandDevice.enrol(http, hub, "ras-jedir")
    dev.clock = Clock(wall_ms=lambda: system_ms() + day_ms)
    dev.open_answer(dev.push(dev.envelope([dev.new_record("Amina")])))
    assert hub.clock.last.wall_ms <= system_ms() + 60_000
    with hub.engine.connect() as conn:
        offset = conn.execute(
            sa.text("SELECT clock_offset_ms FROM devices WHERE id = :i"), {"i": dev.id}
        ).scalar_one()
    assert offset > day_ms - 60_000


def test_an_edit_stamped_too_far_ahead_is_quarantined_and_never_served(
    hub_env: tuple[httpx.Client, Hub, Path],
) -> None:
    http, hub, _ = hub_env
    bound = hub.settings.clock_refuse_ahead_ms
    dev = HandDevice.enrol(http, hub, "ras-jedir")
    reader = HandDevice.enrol(http, hub, "ras-jedir")
    edits = [dev.new_record(name) for name in ("Amina", "Yusuf", "Idris")]
    hub_clock_before = hub.clock.last
    far = [Stamp(2**48 - 1, 2**24 - 1), Stamp(system_ms() + bound + 3_600_000, 0)]
    for i, stamp in enumerate(far):
        edits[i] = dataclasses.replace(edits[i], version=Version(stamp, dev.id))
    ack = dev.open_answer(dev.push(dev.envelope(edits)))
    held = {seq for seq, _ in ack["quarantined"]}
    assert held == set(range(1, (edits[1].last_seq or 0) + 1))
    assert {reason.split(":")[0] for _, reason in ack["quarantined"]} == {"clock.ahead"}
    assert "kept here, not applied" in ack["quarantined"][0][1]
    assert count(hub, "records") == 1 and count(hub, "quarantine") == 2
    assert hub.clock.last.wall_ms <= max(hub_clock_before.wall_ms, system_ms()) + 60_000
    page = reader.open_answer(reader.pull())
    assert {e["r"] for e in page["edits"]} == {edits[2].record_id}


def test_a_hub_edit_above_a_full_counter_carries_into_the_next_millisecond(
    hub_env: tuple[httpx.Client, Hub, Path],
) -> None:
    http, hub, _ = hub_env
    a = HandDevice.enrol(http, hub, "ras-jedir")
    b = HandDevice.enrol(http, hub, "ras-jedir")
    record = a.new_record("Amina")
    a.open_answer(a.push(a.envelope([record])))
    ahead = Stamp(system_ms() + 86_400_000, 2**24 - 1)  # a day ahead, counter full: taken
    other = Edit(record.record_id, Version(ahead, b.id), "t", (("names.given", "Amna"),), {}, 1)
    b.seq = 1
    assert b.open_answer(b.push(b.envelope([other])))["conflicts"] == [1]
    with hub.engine.connect() as conn:
        conflict = conn.execute(sa.text("SELECT id FROM conflicts")).scalar_one()
    with hub.engine.begin() as conn:
        seq = conflict_review.resolve(
            conn,
            conflict,
            sites=None,
            choice="current",
            value=None,
            reason="the registration is right",
            actor="user:auditor",
            clock=hub.clock,
            master_key=hub.secrets.master_key,
            now=hub.now(),
        )
    with hub.engine.connect() as conn:
        stamp = conn.execute(
            sa.text("SELECT stamp FROM changes WHERE hub_seq = :s"), {"s": seq}
        ).scalar_one()
    assert Stamp.decode(stamp) == Stamp(ahead.wall_ms + 1, 0)
    page = a.open_answer(a.pull())  # every pull of the site answered 500 before
    assert [(e["s"], e["d"]) for e in page["edits"]] == [(ahead.encode(), b.id), (stamp, "hub")]


def test_edits_sent_before_their_record_was_registered_apply_when_it_is(
    hub_env: tuple[httpx.Client, Hub, Path],
) -> None:
    # After a hub restore, device B may send again its edit of a record that
    # device A registered after the backup, before A sends the registration.
    http, hub, _ = hub_env
    a = HandDevice.enrol(http, hub, "ras-jedir")
    b = HandDevice.enrol(http, hub, "ras-jedir")
    registration = a.new_record("Amina")
    phone = b.edit(registration.record_id, {"phone": "+218 91 000 0000", "sex": "female"})
    parked = b.open_answer(b.push(b.envelope([phone])))
    assert {reason.split(":")[0] for _, reason in parked["quarantined"]} == {"record.unknown"}
    assert count(hub, "quarantine") == 1 and count(hub, "records") == 0

    a.open_answer(a.push(a.envelope([registration])))
    with hub.engine.connect() as conn:
        state = conn.execute(
            sa.text("SELECT device_id, device_seq FROM changes WHERE record_id = :r"),
            {"r": registration.record_id},
        ).all()
    assert sorted(state) == sorted(
        [(a.id, registration.first_seq), (b.id, phone.first_seq)]
    )  # B's edit is logged once, as B's
    assert count(hub, "quarantine") == 0
    view = hub_record(hub, registration.record_id)
    assert view["phone"] == "+218 91 000 0000" and view["sex"] == "female"
    assert view["names.given"] == "Amina"


def test_the_name_index_follows_registrations_and_renames(
    hub_env: tuple[httpx.Client, Hub, Path],
) -> None:
    http, hub, _ = hub_env
    dev = HandDevice.enrol(http, hub, "ras-jedir")
    amina = dev.new_record("Amina")
    yusuf = dev.new_record("Yusuf")
    renamed_at_once = dev.edit(yusuf.record_id, {"names.given": "Idris"})  # same batch
    dev.open_answer(dev.push(dev.envelope([amina, yusuf, renamed_at_once])))
    assert found(hub, "Amina") == {amina.record_id}
    assert found(hub, "Yusuf") == set() and found(hub, "Idris") == {yusuf.record_id}
    renamed_later = dev.edit(amina.record_id, {"names.given": "Halima"})
    dev.open_answer(dev.push(dev.envelope([renamed_later])))
    assert found(hub, "Amina") == set() and found(hub, "Halima") == {amina.record_id}
    assert found(hub, "Testperson") == {amina.record_id, yusuf.record_id}


def found(hub: Hub, name: str) -> set[str]:
    with hub.engine.connect() as conn:
        return set(name_index.search_ids(conn, hub.name_index, name))


def hub_record(hub: Hub, record_id: str) -> dict[str, object]:
    with hub.engine.connect() as conn:
        rec = load_records(conn, [record_id], hub.secrets.master_key)[record_id]
    return {path: field["v"] for path, field in rec.fields.items()}
