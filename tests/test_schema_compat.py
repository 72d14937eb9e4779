"""Schema versions (issue 6, point 5): an envelope from a device on an older schema
version is accepted, and the fields its version had that this one does not know
are kept intact: sealed at the hub, merged per field, pulled as they were sent,
shown and kept by `fieldreg`.

Version 1 had no field this version retired (version 2 only added
`communication`), so the older device's retired field here, `shelter_location`,
stands for the first field a later version retires or renames.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from field_client.enrolment import enrol
from field_client.forms import prompt_record
from field_client.store import Store
from schemas.fields import (
    FIELD_PATHS,
    MAX_KEPT_DEPTH,
    kept_value_error,
    other_path_error,
    split_fields,
)
from schemas.record import MIN_SCHEMA_VERSION, SCHEMA_VERSION, RegistrationCreate
from schemas.validation import InvalidRecord, validate
from server.hub import Hub
from server.records import load_records
from sync.changes import Version
from sync.envelope import Header, seal
from sync.hlc import Stamp
from sync.protocol import Edit, dumps
from sync.transport import HubClient
from tests.conftest import PASSPHRASE, run_cli, sample_record
from tests.hubkit import (
    ADMIN_PASSWORD,
    HandDevice,
    database_backends,
    fresh_database,
    init_hub,
    live_hub,
)

SITE = "ras-jedir"
OLDER = SCHEMA_VERSION - 1
RETIRED = "shelter_location"


@pytest.fixture(params=database_backends())
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[httpx.Client, Hub, Path]]:
    data_dir = tmp_path / "hub"
    with (
        fresh_database(request.param) as url,
        live_hub(init_hub(data_dir, url)) as (base_url, live),
        httpx.Client(base_url=base_url, timeout=60) as http,
    ):
        yield http, live, data_dir


def envelope(dev: HandDevice, edits: list[Edit], *, schema_version: int) -> bytes:
    """`HandDevice.envelope` with the header's schema version chosen."""
    first, last = edits[0].first_seq, edits[-1].last_seq
    assert first is not None and last is not None
    header = Header(
        protocol=1,
        schema_version=schema_version,
        kind="push",
        sender=dev.id,
        recipient="hub",
        batch_id=f"{first}-{last}",
        seq_first=first,
        seq_last=last,
        sent_at_ms=dev.clock.last.wall_ms,
        kem=dev.hub_keys.kem_algorithm.value,
    )
    body = dumps({"edits": [e.to_json() for e in edits]})
    return seal(header, body, recipient=dev.hub_keys, sender=dev.keys)


def older_record(dev: HandDevice, given: str, **extra: Any) -> Edit:
    """The first edit of a record as a device on the older version writes it."""
    fields = {
        "schema_version": OLDER,
        "registration": {
            "site": dev.site,
            "device_id": dev.id,
            "operator": "tester",
            "registered_at": "2026-11-29T10:00:00+00:00",
        },
        "names.given": given,
        "names.family": "Testperson",
        "situation.scenario": "crossed_border",
        "consent": {"given": True, "legal_basis": "consent", "scope": [], "recorded_by": "t"},
        **extra,
    }
    return dev.edit(str(uuid.uuid4()), fields)


def pull_all(dev: HandDevice) -> list[dict[str, Any]]:
    """Every edit the hub sends `dev`, page after page (a signed GET, as a device asks)."""
    edits: list[dict[str, Any]] = []
    cursor = ""
    for _ in range(50):
        page = dev.open_answer(dev.pull(cursor))
        edits.extend(page["edits"])
        cursor = page["cursor"]
        if not page["more"]:
            return edits
    raise AssertionError("the pull did not end within 50 pages")


def hub_fields(hub: Hub, record_id: str) -> dict[str, Any]:
    with hub.engine.connect() as conn:
        rec = load_records(conn, [record_id], hub.secrets.master_key)[record_id]
    return {path: state["v"] for path, state in rec.fields.items()}


def count(hub: Hub, table: str) -> int:
    with hub.engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def assert_nowhere_in_clear(hub: Hub, data_dir: Path, text: str) -> None:
    """`text` is in no row of any table as the database returns it, nor in any file."""
    with hub.engine.connect() as conn:
        for table in sa.inspect(conn).get_table_names():
            dump = repr(conn.execute(sa.text(f"SELECT * FROM {table}")).all())
            assert text not in dump, f"{text} in table {table}"
    for path in data_dir.iterdir():  # the SQLite file and its WAL, keys
        assert text.encode() not in path.read_bytes(), f"{text} in {path.name}"


# -- the hub ----------------------------------------------------------------------------


def test_an_older_device_is_accepted_and_its_unknown_field_kept_sealed(
    hub: tuple[httpx.Client, Hub, Path],
) -> None:
    http, live, data_dir = hub
    assert MIN_SCHEMA_VERSION <= OLDER < SCHEMA_VERSION
    dev = HandDevice.enrol(http, live, SITE)
    marker = f"kept-{uuid.uuid4().hex[:12]}"
    kept = {
        "block": "Q-7",
        "note": f"خيمة ٧ near the water point {marker}",
        "since": [2026, 11, 2],
        "checked": True,
        "share": 1.5,
        "by": None,
    }
    create = older_record(dev, "Amina", **{RETIRED: kept})
    rid = create.record_id
    bad = dev.edit(rid, {"sex": "robot"})
    moved = {**kept, "block": "Q-8"}
    later = dev.edit(
        rid,
        {"phone": "+218 91 000 0001", RETIRED: moved},
        {RETIRED: create.version},
    )
    # Written before `later` (an older stamp) but sent after it: the later value stays.
    stale_seq = dev.seq + 1
    stale = Edit(
        rid,
        Version(Stamp(create.version.stamp.wall_ms - 1_000), dev.id),
        "tester",
        ((RETIRED, {"block": "stale"}),),
        {},
        stale_seq,
    )
    dev.seq = stale_seq
    answer = dev.push(envelope(dev, [create, bad, later, stale], schema_version=OLDER))
    ack = dev.open_answer(answer)
    assert ack["high_water"] == stale_seq
    assert [seq for seq, _ in ack["quarantined"]] == [bad.first_seq]
    assert ack["quarantined"][0][1].startswith("field.invalid: sex:")
    assert ack["superseded"] == [stale_seq] and ack["conflicts"] == []

    fields = hub_fields(live, rid)
    assert fields["names.given"] == "Amina" and fields["phone"] == "+218 91 000 0001"
    assert "sex" not in fields  # the bad value did not apply
    assert dumps(fields[RETIRED]) == dumps(moved)
    assert (count(live, "changes"), count(live, "quarantine"), count(live, "records")) == (3, 1, 1)
    with live.engine.connect() as conn:
        version = conn.execute(sa.text("SELECT schema_version FROM records")).scalar_one()
    assert version == OLDER  # the record says which version registered it
    assert_nowhere_in_clear(live, data_dir, marker)

    # Another device of the site pulls every edit exactly as the older device sent it.
    reader = HandDevice.enrol(http, live, SITE)
    pulled = [e for e in pull_all(reader) if e["r"] == rid]
    assert [e["s"] for e in pulled] == [e.version.stamp.encode() for e in (create, later, stale)]
    for sent, got in zip((create, later, stale), pulled, strict=True):
        assert dumps(got["f"]) == dumps([[p, v] for p, v in sent.fields])
    assert dumps(dict(pulled[0]["f"])[RETIRED]) == dumps(kept)

    # Two older devices that changed the field without seeing each other: a conflict,
    # as for any field.
    concurrent = reader.edit(rid, {RETIRED: {"block": "R-1"}}, {RETIRED: create.version})
    ack = reader.open_answer(reader.push(envelope(reader, [concurrent], schema_version=OLDER)))
    assert ack["conflicts"] == [concurrent.first_seq] and count(live, "conflicts") == 1


def test_a_device_on_this_version_sending_an_unknown_field_is_quarantined(
    hub: tuple[httpx.Client, Hub, Path],
) -> None:
    http, live, _ = hub
    dev = HandDevice.enrol(http, live, SITE)
    create = dev.new_record("Amina")
    unknown = dev.edit(create.record_id, {"phone": "+218 91 000 0002", RETIRED: "tent 4"})
    ack = dev.open_answer(dev.push(envelope(dev, [create, unknown], schema_version=SCHEMA_VERSION)))
    assert ack["quarantined"] == [
        [seq, f"field.unknown: {RETIRED}: not a field of schema version {SCHEMA_VERSION}"]
        for seq in range(unknown.first_seq or 0, (unknown.last_seq or 0) + 1)
    ]
    fields = hub_fields(live, create.record_id)
    assert RETIRED not in fields and "phone" not in fields  # nothing of that edit applied
    # `names` before its parts: stored, it broke the duplicate check (500) before.
    whole_names = dev.edit(str(uuid.uuid4()), {"names": "x", **dict(create.fields)})
    ack = dev.open_answer(dev.push(envelope(dev, [whole_names], schema_version=SCHEMA_VERSION)))
    assert {reason for _, reason in ack["quarantined"]} == {
        "field.unknown: names: a reserved name, not a field of any schema version"
    }

    # From an older device too, a path no schema version can have is not kept: `names`
    # or `id` would take the place of the names object or the record id.
    rid = create.record_id
    odd = [
        dev.edit(rid, {"names": "Amina Testperson", "names.given": "Amna"}),
        dev.edit(rid, {"id": str(uuid.uuid4())}),
        dev.edit(rid, {"Shelter Location": "tent 4"}),
        dev.edit(rid, {"a.b.c": 1}),
    ]
    ack = dev.open_answer(dev.push(envelope(dev, odd, schema_version=OLDER)))
    reasons = {reason for _, reason in ack["quarantined"]}
    assert len(ack["quarantined"]) == sum(len(e.fields) for e in odd)
    assert {r.split(":")[0] for r in reasons} == {"field.unknown"}
    assert any("reserved name" in r for r in reasons)
    assert "field.unknown: a path: not a field path (lower-case names, at most one '.')" in reasons
    with live.engine.connect() as conn:  # the quarantine's reasons are in clear
        details = repr(conn.execute(sa.text("SELECT reason, detail FROM quarantine")).all())
    assert "Shelter Location" not in details and "a.b.c" not in details
    assert hub_fields(live, rid)["names.given"] == "Amina"
    assert count(live, "quarantine") == 2 + len(odd)


def nested(depth: int) -> Any:
    value: Any = "tent 4"
    for _ in range(depth):
        value = [value]
    return value


def test_a_kept_field_nested_too_deep_is_quarantined_and_the_rest_applies(
    hub: tuple[httpx.Client, Hub, Path],
) -> None:
    http, live, _ = hub
    dev = HandDevice.enrol(http, live, SITE)
    create = older_record(dev, "Amina")
    deepest = dev.edit(create.record_id, {RETIRED: nested(MAX_KEPT_DEPTH)})
    too_deep = dev.edit(create.record_id, {RETIRED: "PLACEHOLDER", "phone": "+218 91 000 0003"})
    later = dev.edit(create.record_id, {"occupation": "driver"})
    edits = [create, deepest, too_deep, later]
    body = dumps({"edits": [e.to_json() for e in edits]})
    # 900 deep: more than the hub's JSON encoder takes (it answered 500, for ever).
    body = body.replace(b'"PLACEHOLDER"', b"[" * 900 + b"]" * 900)
    first, last = create.first_seq or 0, later.last_seq or 0
    kem = dev.hub_keys.kem_algorithm.value
    header = Header(1, OLDER, "push", dev.id, "hub", f"{first}-{last}", first, last, 1, kem)
    ack = dev.open_answer(dev.push(seal(header, body, recipient=dev.hub_keys, sender=dev.keys)))
    reason = f"field.invalid: {RETIRED}: nested deeper than {MAX_KEPT_DEPTH} levels"
    assert ack["quarantined"] == [[too_deep.first_seq, reason], [too_deep.last_seq, reason]]
    fields = hub_fields(live, create.record_id)
    assert fields[RETIRED] == nested(MAX_KEPT_DEPTH) and fields["occupation"] == "driver"
    assert "phone" not in fields and count(live, "quarantine") == 1


def test_a_conflict_on_a_kept_field_is_resolved_within_the_same_nesting_bound(
    hub: tuple[httpx.Client, Hub, Path],
) -> None:
    http, live, _ = hub
    a, b = HandDevice.enrol(http, live, SITE), HandDevice.enrol(http, live, SITE)
    create = older_record(a, "Amina", **{RETIRED: "tent 1"})
    a.open_answer(a.push(envelope(a, [create], schema_version=OLDER)))
    other = b.edit(create.record_id, {RETIRED: "tent 2"})
    assert b.open_answer(b.push(envelope(b, [other], schema_version=OLDER)))["conflicts"]
    token = http.post(
        "/api/v1/auth/token", data={"username": "admin", "password": ADMIN_PASSWORD}
    ).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    [conflict] = http.get("/api/v1/conflicts", headers=auth).json()
    resolve = f"/api/v1/conflicts/{conflict['id']}/resolve"
    for depth in (MAX_KEPT_DEPTH + 1, 300):  # 300: past what the hub's encoder takes
        chosen = {"choice": "value", "value": nested(depth), "reason": "asked the person"}
        refused = http.post(resolve, headers=auth, json=chosen)
        assert refused.status_code == 422, refused.text
        assert f"nested deeper than {MAX_KEPT_DEPTH} levels" in refused.json()["detail"]
    assert hub_fields(live, create.record_id)[RETIRED] in ("tent 1", "tent 2")
    chosen = {"choice": "value", "value": nested(MAX_KEPT_DEPTH - 1), "reason": "asked the person"}
    assert http.post(resolve, headers=auth, json=chosen).status_code == 200
    assert hub_fields(live, create.record_id)[RETIRED] == nested(MAX_KEPT_DEPTH - 1)


@pytest.mark.parametrize(
    ("version", "update"),
    [(SCHEMA_VERSION + 1, "update the hub"), (MIN_SCHEMA_VERSION - 1, "update fieldreg")],
)
def test_a_schema_version_outside_the_accepted_range_is_refused(
    hub: tuple[httpx.Client, Hub, Path], version: int, update: str
) -> None:
    http, live, _ = hub
    dev = HandDevice.enrol(http, live, SITE)
    create = dev.new_record("Amina")
    answer = dev.push(envelope(dev, [create], schema_version=version))
    assert answer.status_code == 400
    problem = answer.json()
    assert problem["code"] == "protocol.unsupported" and update in problem["detail"]
    for table in ("records", "changes", "batches", "quarantine"):
        assert count(live, table) == 0, table
    # Nothing moved: the same changes under a supported version apply from the start.
    ack = dev.open_answer(dev.push(envelope(dev, [create], schema_version=SCHEMA_VERSION)))
    assert ack["high_water"] == create.last_seq and ack["quarantined"] == []


# -- the field client -------------------------------------------------------------------


def test_fieldreg_pulls_shows_and_edits_a_record_with_an_older_versions_field(
    hub: tuple[httpx.Client, Hub, Path], tmp_path: Path
) -> None:
    http, live, _ = hub
    home = tmp_path / "device"
    store = Store.init(home, PASSPHRASE, site=SITE, operator="Yusuf", kdf_memory_kib=1024)
    with store:
        enrol(
            store,
            HubClient(http),
            code=live.create_enrol_code([SITE], timedelta(hours=1), request_id="test-enrol"),
        )
    older = HandDevice.enrol(http, live, SITE)
    marker = f"kept-{uuid.uuid4().hex[:12]}"
    kept = {"zone": "C-14 [/]", "tag": marker}  # "[/]": shown as text, not Rich markup
    create = older_record(older, "Amina", **{RETIRED: kept})
    rid = create.record_id
    older.open_answer(older.push(envelope(older, [create], schema_version=OLDER)))

    assert run_cli(home, "sync").returncode == 0
    shown = run_cli(home, "show", rid)
    assert shown.returncode == 0, shown.stderr
    main, _, other = shown.stdout.partition("Other fields (another schema version")
    assert "Amina Testperson" in main and "names.given" in main and RETIRED not in main
    assert RETIRED in other and marker in other and "current" in other
    as_json = json.loads(run_cli(home, "show", rid, "--json").stdout)
    assert as_json["names"]["given"] == "Amina"
    assert dumps(as_json["other_fields"]) == dumps({RETIRED: kept})

    # Editing the record keeps the field; the field itself is not editable here.
    assert run_cli(home, "edit", rid, "--set", "phone=+218 91 555 0000").returncode == 0
    refused = run_cli(home, "edit", rid, "--set", f"{RETIRED}=tent 9")
    assert refused.returncode == 2 and "not editable here" in refused.stderr
    as_json = json.loads(run_cli(home, "show", rid, "--json").stdout)
    assert as_json["phone"] == "+218 91 555 0000"
    assert dumps(as_json["other_fields"]) == dumps({RETIRED: kept})
    assert run_cli(home, "sync").returncode == 0
    fields = hub_fields(live, rid)
    assert fields["phone"] == "+218 91 555 0000" and dumps(fields[RETIRED]) == dumps(kept)


def test_a_split_objects_unknown_part_is_kept_beside_the_record(tmp_path: Path) -> None:
    with Store.init(
        tmp_path / "dev", PASSPHRASE, site=SITE, operator="Yusuf", kdf_memory_kib=1024
    ) as store:
        [mine] = store.register([RegistrationCreate.model_validate(sample_record())])
        rid = str(mine.id)
        other = "0190a5a0-3333-7000-8000-000000000003"
        pulled = Edit(
            rid, Version(Stamp(1_800_000_000_000), other), "Yusuf", (("names.nickname", "Abu Ali"),)
        )
        store.sync.apply_pull([pulled], cursor="c", epoch="e")
        assert store.get(rid).names.given == "Mohamed"
        assert store.other_fields(rid) == {"names.nickname": "Abu Ali"}
        store.edit(rid, {"names.given": "Mohammed"})
        assert store.get(rid).names.given == "Mohammed"
        assert store.other_fields(rid) == {"names.nickname": "Abu Ali"}
        with pytest.raises(InvalidRecord, match="not editable here"):
            store.edit(rid, {"names.nickname": "Abu Hassan"})


# -- the schema -------------------------------------------------------------------------


def test_which_unknown_paths_an_older_version_may_have_had() -> None:
    for path in (RETIRED, "names.nickname", "situation.camp_zone", *FIELD_PATHS):
        assert other_path_error(path) is None, path
    for path in ("names", "situation", "id"):
        assert "reserved" in (other_path_error(path) or ""), path
    for path in ("Shelter", "shelter location", "a.b.c", "_x", "x" * 40, "names.", ""):
        assert "not a field path" in (other_path_error(path) or ""), path
    assert kept_value_error({"a": [1, {"b": None}]}) is None
    assert kept_value_error(nested(MAX_KEPT_DEPTH)) is None
    assert kept_value_error(nested(MAX_KEPT_DEPTH + 1)) == "nested deeper than 32 levels"
    assert kept_value_error({"a": nested(100_000)}) == "nested deeper than 32 levels"
    known, other = split_fields({"names.given": "A", "names.nickname": "B", RETIRED: 1})
    assert known == {"names.given": "A"} and other == {"names.nickname": "B", RETIRED: 1}


def test_version_2_records_how_to_talk_with_the_person() -> None:
    record = validate(
        RegistrationCreate,
        sample_record(communication={"language": "ha", "interpreter_needed": True}),
    )
    assert record.communication is not None and record.communication.interpreter_needed
    with pytest.raises(InvalidRecord) as refused:
        validate(RegistrationCreate, sample_record(communication={"language": "Hausa"}))
    found = {str(e) for e in refused.value.errors}
    assert any(e.startswith("communication.language:") for e in found)
    assert "communication.interpreter_needed: required" in found

    answers = {"Given name": "Amina", "Preferred language": "HA", "Interpreter needed": "yes"}

    def ask(question: str, default: str) -> str:
        return next((a for q, a in answers.items() if question.startswith(q)), default)

    asked = validate(RegistrationCreate, prompt_record(ask, operator="Yusuf"))
    assert asked.communication is not None
    assert (asked.communication.language, asked.communication.interpreter_needed) == ("ha", True)
    answers.pop("Preferred language")
    assert validate(RegistrationCreate, prompt_record(ask, operator="Yusuf")).communication is None
