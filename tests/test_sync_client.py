"""The device side of sync on real SQLCipher stores: the outbox and its mark,
merging pulled pages, enrolment, and the sync loop against a small fake hub
(an `httpx.MockTransport`) that exists only to drive the client's state machine.
End-to-end runs against the real hub live elsewhere."""

from __future__ import annotations

import dataclasses
import gc
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from field_client import sync_push
from field_client.db import SCHEMA_VERSION, NewerStore, decode_versions
from field_client.enrolment import AlreadyEnrolled, EnrolmentRefused, enrol
from field_client.store import Store
from field_client.store_reads import UnreadableRecord
from field_client.sync_runner import DeviceRevoked, SyncError, SyncSummary, run_sync, watch
from field_client.sync_store import HubAheadOfStore, PullPosition
from schemas.fields import flatten
from schemas.record import Registration, RegistrationCreate
from sync.changes import Version
from sync.envelope import Header, open_sealed, read_header_unverified, seal
from sync.hlc import Stamp
from sync.http_signature import SignatureError, read_key_id_unverified, verify_request
from sync.keys import KeyPairs, PublicKeys
from sync.merge import FieldState, Outcome, merge_field
from sync.protocol import Edit, dumps, group_changes
from sync.transport import HubClient, HubProblem, HubUnreachable
from tests.conftest import PASSPHRASE, run_cli, sample_record

SITE = "ras-jedir"
LAST_STAMP = Stamp(2**48 - 1, 2**24 - 1)  # the largest stamp the format holds
OTHER = "0190a5a0-0000-7000-8000-00000000beef"  # another device's id


def create(**overrides: Any) -> RegistrationCreate:
    return RegistrationCreate.model_validate(sample_record(**overrides))


def new_store(path: Path) -> Store:
    return Store.init(path, PASSPHRASE, site=SITE, operator="Amina", kdf_memory_kib=8 * 1024)


def octets(data: bytes) -> httpx.Response:
    return httpx.Response(200, content=data, headers={"content-type": "application/octet-stream"})


def problem(status: int, code: str, detail: str, **extra: Any) -> httpx.Response:
    body = {"type": "about:blank", "title": "x", "status": status, "code": code, "detail": detail}
    return httpx.Response(
        status,
        content=json.dumps({**body, **extra}),
        headers={"content-type": "application/problem+json"},
    )


# --- a fake hub: just enough protocol to drive the client ---------------------------------


@dataclass
class FakeDevice:
    public_keys: PublicKeys
    high_water: int = 0
    batches: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    is_revoked: bool = False


@dataclass
class FakeHub:
    keys: KeyPairs = field(default_factory=KeyPairs.generate)
    epoch: str = "epoch-1"
    codes: dict[str, str] = field(default_factory=lambda: {"CODE-1": SITE, "CODE-2": SITE})
    devices: dict[str, FakeDevice] = field(default_factory=dict)
    log: list[Edit] = field(default_factory=list)
    state: dict[tuple[str, str], FieldState] = field(default_factory=dict)
    pushes: list[Header] = field(default_factory=list)
    enrol_posts: int = 0
    pulls: int = 0
    drop_push: dict[int, str] = field(default_factory=dict)  # push number -> before|after
    answer_keys: KeyPairs | None = None  # sign answers with other keys (a forger)
    partial: dict[int, int] = field(default_factory=dict)  # push number -> edits it applies

    def info(self) -> dict[str, Any]:
        public = self.keys.public()
        return {
            "public_keys": public.to_json(),
            "fingerprint": public.fingerprint(),
            "epoch": self.epoch,
            "protocol": 1,
        }

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/v1/hub":
            return httpx.Response(200, json=self.info())
        if path == "/api/v1/enrol":
            return self._enrol(json.loads(request.content))
        if path == "/api/v1/sync/push":
            return self._push(request.content)
        if path == "/api/v1/sync/pull":
            return self._pull(request)
        return problem(404, "not_found", "no such route")

    def _enrol(self, body: dict[str, Any]) -> httpx.Response:
        self.enrol_posts += 1
        site = self.codes.pop(body["code"], None)
        if site is None:
            return problem(403, "enrol.code_invalid", "the code is unknown")
        self.devices[body["device_id"]] = FakeDevice(PublicKeys.from_json(body["public_keys"]))
        info = self.info()
        del info["protocol"]
        return httpx.Response(
            200, json={"device_id": body["device_id"], "sites": [site], "hub": info}
        )

    def _seal(self, kind: str, device_id: str, like: Header, body: dict[str, Any]) -> bytes:
        """An answer to `device_id`: `like`'s batch id and range, sealed to its keys."""
        device = self.devices[device_id]
        header = dataclasses.replace(
            like,
            kind=kind,
            sender="hub",
            recipient=device_id,
            kem=device.public_keys.kem_algorithm.value,
        )
        signer = self.answer_keys or self.keys
        return seal(header, dumps(body), recipient=device.public_keys, sender=signer)

    def _apply(self, edits: list[Edit]) -> tuple[list[int], list[int]]:
        superseded: list[int] = []
        conflicts: list[int] = []
        for edit in edits:
            self.log.append(dataclasses.replace(edit, hub_seq=len(self.log) + 1))
            for change in edit.changes():
                key = (edit.record_id, change.field)
                incoming = FieldState(change.value, change.version, change.base)
                decision = merge_field(self.state.get(key), incoming)
                self.state[key] = decision.state
                assert change.device_seq is not None
                if decision.outcome is Outcome.SUPERSEDED:
                    superseded.append(change.device_seq)
                if decision.conflict is not None:
                    conflicts.append(change.device_seq)
        return superseded, conflicts

    def _push(self, data: bytes) -> httpx.Response:
        header = read_header_unverified(data)
        device = self.devices.get(header.sender)
        if device is None:
            return problem(401, "device.unknown", "no such device")
        if device.is_revoked:
            return problem(403, "device.revoked", "this device is revoked", action="wipe")
        opened = open_sealed(data, sender=device.public_keys, recipient=self.keys)
        self.pushes.append(header)
        drop = self.drop_push.get(len(self.pushes))
        if drop == "before":
            raise httpx.ReadError("connection reset by peer")
        stored = device.batches.get(header.batch_id)
        if stored is not None:
            if stored[0] != opened.body_sha256:
                return problem(409, "batch.id_reused", "same id, other content")
            ack = {**stored[1], "duplicate": True}
        elif header.seq_first > device.high_water + 1:
            expected = device.high_water + 1
            return problem(409, "batch.gap", f"expected {expected}", expected_seq=expected)
        elif header.seq_last <= device.high_water:
            return problem(409, "envelope.replayed", "applied", high_water=device.high_water)
        else:
            edits = [Edit.from_json(e) for e in json.loads(opened.body)["edits"]]
            edits = edits[: self.partial.get(len(self.pushes), len(edits))]
            superseded, conflicts = self._apply(edits)
            device.high_water = edits[-1].last_seq or 0
            ack = {
                "batch_id": header.batch_id,
                "duplicate": False,
                "high_water": device.high_water,
                "superseded": superseded,
                "conflicts": conflicts,
                "quarantined": [],
                "hub_time_ms": 1_700_000_000_000,
                "epoch": self.epoch,
            }
            device.batches[header.batch_id] = (opened.body_sha256, ack)
        answer = octets(self._seal("ack", header.sender, header, ack))
        if drop == "after":
            raise httpx.ReadError("connection reset by peer")
        return answer

    def _pull(self, request: httpx.Request) -> httpx.Response:
        query = request.url.query.decode("ascii")
        device_id = read_key_id_unverified(request.headers)
        device = self.devices.get(device_id)
        if device is None:
            return problem(401, "device.unknown", "no such device")
        try:
            verify_request(
                method="GET",
                path=request.url.path,
                query=query,
                headers=request.headers,
                public_key=device.public_keys.signing_public_key(),
            )
        except SignatureError as exc:
            return problem(401, exc.code, exc.detail)
        if device.is_revoked:
            return problem(403, "device.revoked", "this device is revoked", action="wipe")
        self.pulls += 1
        params = parse_qs(query, keep_blank_values=True)
        cursor, limit = params["cursor"][0], int(params["limit"][0])
        if cursor and not cursor.startswith(f"{self.epoch}:"):
            return problem(400, "cursor.invalid", "another epoch; pull from the start")
        after = int(cursor.rpartition(":")[2]) if cursor else 0
        page: list[Edit] = []
        covered = after
        for edit in self.log[after:]:
            if len(page) == limit:
                break
            covered = edit.hub_seq or 0
            if edit.version.device_id != device_id:
                page.append(edit)
        body = {
            "edits": [e.to_json() for e in page],
            "cursor": f"{self.epoch}:{covered}",
            "more": covered < len(self.log),
            "epoch": self.epoch,
        }
        like = Header(1, 1, "pull", "hub", device_id, f"pull-{after}", after, covered, 0, "x25519")
        return octets(self._seal("pull", device_id, like, body))


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub()


@pytest.fixture
def client(hub: FakeHub) -> Iterator[HubClient]:
    transport = httpx.MockTransport(hub.handle)
    with httpx.Client(transport=transport, base_url="http://hub.test") as http:
        yield HubClient(http)


def enrolled(store: Store, hub: FakeHub, client: HubClient, code: str = "CODE-1") -> Store:
    enrol(store, client, code=code)
    return store


def pushed_seqs(hub: FakeHub, device_id: str) -> list[int]:
    return [
        c.device_seq or 0 for e in hub.log for c in e.changes() if e.version.device_id == device_id
    ]


def other_record(given: str, *, wall_ms: int, number: int = 1) -> tuple[str, Edit]:
    """A whole registration as another device would push it, as one pulled edit."""
    record = Registration.model_validate(
        {
            **sample_record(names={"given": given, "family": "Okafor"}),
            "id": f"0190a5a0-1111-7000-8000-{number:012d}",
            "registration": {
                "site": SITE,
                "device_id": OTHER,
                "operator": "Yusuf",
                "registered_at": "2026-11-01T10:00:00Z",
            },
        }
    )
    fields = tuple((p, v) for p, v in flatten(record).items() if v not in (None, []))
    rid = str(record.id)
    return rid, Edit(rid, Version(Stamp(wall_ms), OTHER), "Yusuf", fields, {}, 1, 1)


# --- the outbox and the pushed mark ---------------------------------------------------------


def test_outbox_batches_by_bytes_and_never_cuts_an_edit(store: Store) -> None:
    store.register([create(names={"given": f"Person{i}"}) for i in range(12)])
    saved = store.register([create()])
    store.edit(str(saved[0].id), {"phone": "+218 92 000 0000", "occupation": "baker"})
    everything = list(group_changes(store.outbox(after_seq=0, limit=10_000)))
    one_edit = len(dumps(everything[0].to_json()))
    for chunk_rows in (3, 7, 15, 1000):  # smaller and larger than one edit's rows
        for max_bytes in (1, one_edit * 2, one_edit * 5, 10**7):
            batches: list[list[Edit]] = []
            while edits := store.sync.outbox_edits(max_bytes, chunk_rows=chunk_rows):
                batches.append(edits)
                body = len(dumps({"edits": [e.to_json() for e in edits]}))
                assert len(edits) == 1 or body <= max_bytes
                store.sync.mark_pushed(edits[-1].last_seq or 0, {})
            assert [e for b in batches for e in b] == everything
            if max_bytes == 1:
                assert all(len(b) == 1 for b in batches)
            store.sync.reset_pushed(0)


def test_outbox_gives_the_same_batch_until_the_mark_moves(store: Store) -> None:
    store.register([create(names={"given": f"Person{i}"}) for i in range(5)])
    first = store.sync.outbox_edits(4000)
    assert store.sync.outbox_edits(4000) == first
    store.sync.mark_pushed(first[-1].last_seq or 0, {})
    assert store.sync.outbox_edits(4000)[0].first_seq == (first[-1].last_seq or 0) + 1


def test_mark_pushed_never_lowers_and_reset_does(store: Store) -> None:
    store.register([create(), create(names={"given": "Grace"})])
    last = store.status().sync.last_seq
    assert store.sync.mark_pushed(5, {1: "applied", 2: "superseded", 3: "conflict"}) == 5
    assert store.sync.mark_pushed(3, {}) == 5
    status = store.status()
    assert (status.sync.pushed_seq, status.pending_outbox) == (5, last - 5)
    assert status.sync.lost_edits == 2
    assert status.sync.last_sync_at_ms is not None
    store.sync.reset_pushed(2)
    assert store.status().sync.pushed_seq == 2
    assert store.status().sync.lost_edits == 1  # the verdict above the mark is void
    with pytest.raises(HubAheadOfStore, match="restored from an old copy"):
        store.sync.mark_pushed(last + 1, {1: "conflict"})
    with pytest.raises(HubAheadOfStore):
        store.sync.reset_pushed(last + 1)
    assert (store.status().sync.pushed_seq, store.status().sync.lost_edits) == (2, 1)


# --- merging pulled pages ----------------------------------------------------------------------


def test_pulled_newer_value_wins_older_is_history_only(store: Store) -> None:
    [saved] = store.register([create()])
    rid = str(saved.id)
    mine = {c.field: c.version for c in store.outbox(after_seq=0, limit=100)}
    later = mine["phone"].stamp.wall_ms + 60_000
    earlier = mine["occupation"].stamp.wall_ms - 60_000
    newer = Edit(
        rid,
        Version(Stamp(later), OTHER),
        "Yusuf",
        (("phone", "+218 93 333 3333"), ("names.family", "Abderrahmane")),
        {"phone": mine["phone"], "names.family": mine["names.family"]},
        hub_seq=7,
    )
    older = Edit(
        rid, Version(Stamp(earlier), OTHER), "Yusuf", (("occupation", "baker"),), {}, None, 8
    )
    result = store.sync.apply_pull([newer, older], cursor="epoch-1:8", epoch="epoch-1")
    assert (result.applied, result.superseded, result.new_records) == (2, 1, 0)
    got = store.get(rid)
    assert got.phone == "+218 93 333 3333"
    assert got.occupation == "mason"
    assert got.names.family == "Abderrahmane"
    history = {(h.field, json.dumps(h.value)): h for h in store.history(rid)}
    assert history[("occupation", '"baker"')].is_current is False
    assert history[("occupation", '"mason"')].is_current is True
    assert history[("phone", '"+218 93 333 3333"')].is_current is True
    assert [h.id for h in store.search("Abderrahmane")] == [rid]  # match keys followed
    assert store.sync.pull_position().cursor == "epoch-1:8"
    assert store.status().last_stamp > Stamp(later)  # the clock observed the stamp
    # The next local edit is based on the pulled version.
    store.edit(rid, {"phone": "+218 94 444 4444"})
    [mine_again] = [c for c in store.outbox(after_seq=0, limit=100) if c.field == "phone"][-1:]
    assert mine_again.base == newer.version
    # The same page again changes nothing (the phone is ours again: a later edit).
    changes = store.status().changes
    again = store.sync.apply_pull([newer, older], cursor="epoch-1:8", epoch="epoch-1")
    assert (again.applied, again.superseded, again.duplicates) == (0, 2, 1)
    assert store.status().changes == changes


def test_record_from_another_device_is_readable_and_searchable(store: Store) -> None:
    rid, edit = other_record("Chiamaka", wall_ms=1_800_000_000_000)
    result = store.sync.apply_pull([edit], cursor="c1", epoch="epoch-1")
    assert result.new_records == 1
    assert [h.id for h in store.search("Chiamaka Okafor")] == [rid]
    [row] = store.list_records()
    assert (row.id, row.name, row.site) == (rid, "Chiamaka Okafor", SITE)
    assert store.get(rid).registration.device_id == OTHER
    status = store.status()
    assert (status.records, status.own_records, status.pending_outbox) == (1, 0, 0)


def test_partial_or_newer_records_do_not_break_reads(store: Store) -> None:
    store.register([create()])
    partial = Edit(
        "0190a5a0-2222-7000-8000-000000000002",
        Version(Stamp(1_800_000_000_000), OTHER),
        "Yusuf",
        (("phone", "+218 95 555 5555"), ("favourite_colour", "blue")),
        hub_seq=3,
    )
    rid, full = other_record("Ngozi", wall_ms=1_800_000_000_000)
    newer_field = Edit(rid, Version(Stamp(1_800_000_000_001), OTHER), "Yusuf", (("shoe_size", 42),))
    store.sync.apply_pull(
        [partial, full, dataclasses.replace(newer_field, hub_seq=4)], cursor="c", epoch="e"
    )
    assert len(store.list_records()) == 3
    assert "?" in {r.name for r in store.list_records()}
    assert [h.id for h in store.search("Ngozi")] == [rid]
    with pytest.raises(UnreadableRecord, match="does not fit this version"):
        store.get(partial.record_id)
    # A field this schema does not know sets the record apart from nothing: it
    # reads as usual, with the field beside it (tests/test_schema_compat.py).
    assert store.get(rid).names.given == "Ngozi"
    assert store.other_fields(rid) == {"shoe_size": 42}
    kept = {h.field: h.value for h in store.history(rid)}
    assert kept["shoe_size"] == 42  # a field this schema does not know is kept


def test_pull_page_and_cursor_are_one_transaction(store: Store, tmp_path: Path) -> None:
    store.register([create()])
    before = store.status()
    _, edit = other_record("Chiamaka", wall_ms=1_800_000_000_000)
    real_put = store.sync._put_meta

    def failing_put(values: Any) -> None:
        if "pull_cursor" in values:
            raise OSError("disk unplugged")
        real_put(values)

    store.sync._put_meta = failing_put  # type: ignore[method-assign]
    with pytest.raises(OSError):
        store.sync.apply_pull([edit], cursor="c-after", epoch="epoch-1")
    store.sync._put_meta = real_put  # type: ignore[method-assign]
    store.close()
    with Store.open(tmp_path / "dev", PASSPHRASE) as again:
        after = again.status()
        assert (after.records, after.changes, after.last_stamp) == (
            before.records,
            before.changes,
            before.last_stamp,
        )
        assert again.search("Chiamaka") == []
        assert again.sync.pull_position().cursor == ""


def sql_value(store: Store, sql: str) -> Any:
    with store._conn.begin():
        return store._conn.exec_driver_sql(sql).scalar_one()


def received_rows(store: Store) -> int:
    return int(sql_value(store, "SELECT count(*) FROM received"))


def history_of(store: Store, rid: str) -> list[tuple[str, Any, str, str, bool]]:
    return [
        (h.field, h.value, h.stamp.encode(), h.device_id, h.is_current) for h in store.history(rid)
    ]


def test_a_pulled_edit_is_one_row_and_a_repeated_version_logs_only_new_fields(
    store: Store,
) -> None:
    rid, edit = other_record("Chiamaka", wall_ms=1_800_000_000_000)
    store.sync.apply_pull([edit], cursor="c1", epoch="epoch-1")
    assert received_rows(store) == 1
    assert store.status().changes == len(edit.fields)
    # The hub sends the same version again with one more field (say, held in
    # quarantine until now): only that field is logged, once.
    extra = dataclasses.replace(
        edit, fields=(*edit.fields, ("notes", "met at the clinic")), hub_seq=2
    )
    result = store.sync.apply_pull([extra, extra], cursor="c2", epoch="epoch-1")
    assert (result.applied, result.duplicates) == (1, 2 * len(edit.fields) + 1)
    assert received_rows(store) == 2
    assert store.status().changes == len(edit.fields) + 1
    history = history_of(store, rid)
    assert [h[:2] for h in history if h[0] == "notes"] == [("notes", "met at the clinic")]
    assert len(history) == len({h[0] for h in history}) == len(edit.fields) + 1


def test_a_pulled_name_change_moves_the_record_in_search(store: Store) -> None:
    rid, edit = other_record("Chiamaka", wall_ms=1_800_000_000_000)
    store.sync.apply_pull([edit], cursor="c1", epoch="epoch-1")
    assert [h.id for h in store.search("Okafor")] == [rid]
    renamed = Edit(
        rid, Version(Stamp(1_800_000_000_001), OTHER), "Yusuf", (("names.family", "Nwosu"),)
    )
    store.sync.apply_pull([dataclasses.replace(renamed, hub_seq=2)], cursor="c2", epoch="e")
    assert store.search("Okafor") == []
    assert [h.id for h in store.search("Nwosu")] == [rid]


def as_schema_1(store: Store) -> None:
    """Lay the store out as fieldreg before store schema 2 kept it: each record's
    versions an object naming every field's `[stamp, device]`."""
    conn = store._conn
    with conn.begin():
        rows = conn.exec_driver_sql("SELECT id, versions FROM records").all()
        conn.exec_driver_sql(
            "UPDATE records SET versions = ? WHERE id = ?",
            [
                (json.dumps({p: v.to_json() for p, v in decode_versions(text).items()}), rid)
                for rid, text in rows
            ],
        )
        conn.exec_driver_sql("PRAGMA user_version = 1")


def as_schema_0(store: Store) -> None:
    """Lay the store out as fieldreg before store schema 1 kept it: each received
    field change a row of `changes`, written as that version's pull wrote them."""
    as_schema_1(store)
    conn = store._conn
    with conn.begin():
        rows = conn.exec_driver_sql(
            "SELECT record_id, fields, stamp, device_id, bases, operator, hub_seq, recorded_at"
            " FROM received ORDER BY id"
        ).all()
        for rid, fields, stamp, device, bases, operator, hub_seq, at in rows:
            based = json.loads(bases) if bases else {}
            conn.exec_driver_sql(
                "INSERT INTO changes (record_id, field, value, stamp, device_id, base_stamp,"
                " base_device, operator, device_seq, hub_seq, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                [
                    (rid, path, json.dumps(value), stamp, device, *base, operator, hub_seq, at)
                    for path, value in json.loads(fields).items()
                    for base in [based.get(path, (None, None))]
                ],
            )
        conn.exec_driver_sql("DROP TABLE received")
        conn.exec_driver_sql("PRAGMA user_version = 0")


def test_a_store_of_schema_0_opens_with_its_received_changes_as_edits(
    store: Store, tmp_path: Path
) -> None:
    [saved] = store.register([create()])
    mine = str(saved.id)
    own = {c.field: c.version for c in store.outbox(after_seq=0, limit=100)}
    newer = Edit(
        mine,
        Version(Stamp(own["phone"].stamp.wall_ms + 60_000), OTHER),
        "Yusuf",
        (("phone", "+218 93 333 3333"), ("occupation", "baker")),
        {"phone": own["phone"]},
        hub_seq=7,
    )
    theirs, edit = other_record("Chiamaka", wall_ms=1_800_000_000_000)
    page = [edit, newer]
    store.sync.apply_pull(page, cursor="c1", epoch="epoch-1")
    before = store.status()
    histories = {rid: history_of(store, rid) for rid in (mine, theirs)}
    as_schema_0(store)
    store.close()
    with Store.open(tmp_path / "dev", PASSPHRASE) as again:
        assert sql_value(again, "PRAGMA user_version") == SCHEMA_VERSION
        assert sql_value(again, "SELECT count(*) FROM changes WHERE device_seq IS NULL") == 0
        assert received_rows(again) == len(page)  # one row per edit again
        bases = sql_value(again, "SELECT bases FROM received WHERE hub_seq = 7")
        assert json.loads(bases) == {"phone": own["phone"].to_json()}
        assert {rid: history_of(again, rid) for rid in histories} == histories
        assert again.status().changes == before.changes
        # The same page again changes nothing; the store keeps working.
        result = again.sync.apply_pull(page, cursor="c1", epoch="epoch-1")
        assert result.applied == 0 and received_rows(again) == len(page)
        again.edit(mine, {"phone": "+218 94 444 4444"})
        assert again.status().changes == before.changes + 1
    with Store.open(tmp_path / "dev", PASSPHRASE) as third:  # migrated once only
        assert third.status().changes == before.changes + 1


def test_a_store_of_schema_1_opens_with_the_same_records_versions_and_history(
    store: Store, tmp_path: Path
) -> None:
    [saved] = store.register([create()])
    mine = str(saved.id)
    own = {c.field: c.version for c in store.outbox(after_seq=0, limit=100)}
    store.edit(mine, {"occupation": "tailor"})  # a second version in the record
    newer = Edit(
        mine,
        Version(Stamp(own["phone"].stamp.wall_ms + 60_000), OTHER),
        "Yusuf",
        (("phone", "+218 93 333 3333"),),
        {"phone": own["phone"]},
        hub_seq=7,
    )
    theirs, edit = other_record("Chiamaka", wall_ms=1_800_000_000_000)
    page = [edit, newer]
    store.sync.apply_pull(page, cursor="c1", epoch="epoch-1")

    def versions_of(s: Store) -> dict[str, dict[str, Version]]:
        with s._conn.begin():
            rows = s._conn.exec_driver_sql("SELECT id, versions FROM records").all()
        return {rid: decode_versions(text) for rid, text in rows}

    versions = versions_of(store)
    assert {v.device_id for v in versions[mine].values()} == {store.device_id, OTHER}
    records = {rid: store.get(rid) for rid in (mine, theirs)}
    histories = {rid: history_of(store, rid) for rid in (mine, theirs)}
    before = store.status()
    as_schema_1(store)
    store.close()
    with Store.open(tmp_path / "dev", PASSPHRASE) as again:
        assert sql_value(again, "PRAGMA user_version") == SCHEMA_VERSION
        text = sql_value(again, f"SELECT versions FROM records WHERE id = '{theirs}'")
        assert text.count(OTHER) == 1  # one entry for the one version of its fields
        assert versions_of(again) == versions
        assert {rid: again.get(rid) for rid in records} == records
        assert {rid: history_of(again, rid) for rid in histories} == histories
        assert again.status() == before
        # The same page again changes nothing; edits go on from the kept versions.
        result = again.sync.apply_pull(page, cursor="c1", epoch="epoch-1")
        assert result.applied == 0 and received_rows(again) == len(page)
        again.edit(mine, {"phone": "+218 94 444 4444"})
        [phone] = [c for c in again.outbox(after_seq=0, limit=100) if c.field == "phone"][-1:]
        assert phone.base == newer.version


def test_a_store_of_a_newer_schema_is_refused(store: Store, tmp_path: Path) -> None:
    with store._conn.begin():
        store._conn.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store.close()
    with pytest.raises(NewerStore, match="made by a newer fieldreg"):
        Store.open(tmp_path / "dev", PASSPHRASE)


# --- enrolment -----------------------------------------------------------------------------


def test_enrol_pins_the_hub_and_keeps_keys_inside_the_store(
    store: Store, hub: FakeHub, client: HubClient, tmp_path: Path
) -> None:
    fingerprint = hub.keys.public().fingerprint()
    result = enrol(store, client, code="CODE-1", expect_fingerprint=fingerprint.lower())
    assert (result.hub_fingerprint, result.sites) == (fingerprint, (SITE,))
    enrolment = store.sync.read_enrolment()
    assert enrolment is not None
    assert enrolment.hub_keys == hub.keys.public()
    assert enrolment.keys.public() == hub.devices[store.device_id].public_keys
    status = store.status().sync
    assert (status.hub_url, status.hub_fingerprint, status.sites) == (
        "http://hub.test",
        fingerprint,
        (SITE,),
    )
    with pytest.raises(AlreadyEnrolled):
        enrol(store, client, code="CODE-2")
    assert hub.enrol_posts == 1
    store.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "dev").iterdir())
    assert enrolment.keys.signing.private_bytes_raw() not in raw


def test_enrol_refuses_a_wrong_fingerprint_before_spending_the_code(
    store: Store, hub: FakeHub, client: HubClient
) -> None:
    with pytest.raises(EnrolmentRefused, match="not the expected"):
        enrol(store, client, code="CODE-1", expect_fingerprint="0000 1111 2222")
    assert hub.enrol_posts == 0 and "CODE-1" in hub.codes
    assert store.sync.read_enrolment() is None
    assert not store.status().sync.is_enrolled


def test_enrol_refuses_an_answer_with_other_keys(
    store: Store, hub: FakeHub, client: HubClient
) -> None:
    real = hub.info
    calls = iter([real(), {**real(), "public_keys": KeyPairs.generate().public().to_json()}])

    def switching() -> dict[str, Any]:
        info = next(calls)
        info["fingerprint"] = PublicKeys.from_json(info["public_keys"]).fingerprint()
        return info

    hub.info = switching  # type: ignore[method-assign]
    with pytest.raises(EnrolmentRefused, match="keys changed"):
        enrol(store, client, code="CODE-1")
    assert store.sync.read_enrolment() is None


def test_enrol_passes_on_the_hubs_refusal(store: Store, client: HubClient) -> None:
    with pytest.raises(HubProblem) as info:
        enrol(store, client, code="NOT-A-CODE")
    assert (info.value.status, info.value.code) == (403, "enrol.code_invalid")
    assert store.sync.read_enrolment() is None


# --- the sync loop -------------------------------------------------------------------------


def test_two_devices_meet_through_the_hub(
    store: Store, hub: FakeHub, client: HubClient, tmp_path: Path
) -> None:
    enrolled(store, hub, client)
    [saved] = store.register([create(names={"given": "Zubeida", "family": "Haddad"})])
    summary = run_sync(store, client)
    sent = store.status().sync.last_seq
    assert summary == SyncSummary(
        sent_batches=1, sent_changes=sent, acknowledged=sent, received_edits=0
    )
    assert pushed_seqs(hub, store.device_id) == list(range(1, sent + 1))
    assert store.status().pending_outbox == 0
    with new_store(tmp_path / "dev-b") as other:
        enrolled(other, hub, client, code="CODE-2")
        other.register([create(names={"given": "Grace", "family": "Okafor"})])
        summary_b = run_sync(other, client)
        assert summary_b.received_edits == 1
        assert [h.id for h in other.search("Zubeida")] == [str(saved.id)]
        other.edit(str(saved.id), {"phone": "+218 96 666 6666"})
        run_sync(other, client)
    summary = run_sync(store, client)
    assert summary.received_edits == 2  # Grace, and the phone edit
    assert store.get(str(saved.id)).phone == "+218 96 666 6666"
    assert [h.name for h in store.search("Grace Okafor")][:1] == ["Grace Okafor"]
    assert run_sync(store, client) == SyncSummary()


@pytest.mark.parametrize("frozen_before", [False, True])
def test_a_sync_run_leaves_the_cyclic_collector_as_it_found_it(
    store: Store, hub: FakeHub, client: HubClient, tmp_path: Path, frozen_before: bool
) -> None:
    enrolled(store, hub, client)
    store.register([create()])
    run_sync(store, client)
    seen: dict[str, tuple[int, tuple[int, int, int]]] = {}
    with new_store(tmp_path / "dev-b") as other:
        enrolled(other, hub, client, code="CODE-2")
        other.register([create(names={"given": "Zubeida", "family": "Hamad"})])

        def watching(name: str, real: Any) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                seen[name] = (gc.get_freeze_count(), gc.get_threshold())
                return real(*args, **kwargs)

            return call

        other.sync.outbox_batch = watching("push", other.sync.outbox_batch)  # type: ignore[method-assign]
        other.sync.apply_pull = watching("pull", other.sync.apply_pull)  # type: ignore[method-assign]
        pending = other.status().pending_outbox
        before = gc.get_threshold()
        if frozen_before:
            gc.freeze()
        try:
            summary = run_sync(other, client)
            assert summary.acknowledged == pending > 0 and summary.received_edits >= 1
            assert (gc.get_freeze_count() > 0, gc.get_threshold()) == (frozen_before, before)
        finally:
            gc.unfreeze()
    assert set(seen) == {"push", "pull"}
    for frozen_in_run, thresholds_in_run in seen.values():
        assert frozen_in_run > 0  # what existed before the run was out of the scans
        if frozen_before:  # someone else froze objects: the run leaves the collector alone
            assert thresholds_in_run == before
        else:
            assert thresholds_in_run[0] > before[0]


@pytest.mark.parametrize("drop", ["before", "after"])
def test_dropped_connection_resends_only_the_batch_in_flight(
    store: Store, hub: FakeHub, client: HubClient, drop: str
) -> None:
    """The 2nd push loses its connection, before the hub read it or after it
    applied it: the next run re-sends exactly that batch, under the same id."""
    enrolled(store, hub, client)
    store.register([create(names={"given": f"Person{i}"}) for i in range(6)])
    total = store.status().pending_outbox
    hub.drop_push = {2: drop}
    with pytest.raises(HubUnreachable):
        run_sync(store, client, max_batch_bytes=3000)
    first, dropped = hub.pushes
    assert store.sync.pushed_seq() == first.seq_last  # only the acknowledged batch counts
    summary = run_sync(store, client, max_batch_bytes=3000)
    resent = hub.pushes[2]
    assert (resent.batch_id, resent.seq_first, resent.seq_last) == (
        dropped.batch_id,
        dropped.seq_first,
        dropped.seq_last,
    )
    in_flight = dropped.seq_last - dropped.seq_first + 1
    assert summary.duplicates == (in_flight if drop == "after" else 0)
    assert summary.acknowledged == total - first.seq_last
    assert pushed_seqs(hub, store.device_id) == list(range(1, total + 1))  # each once
    assert store.status().pending_outbox == 0


class _Killed(BaseException):
    """The process dying: nothing catches it."""


def test_a_sync_killed_before_an_answer_is_stored_resends_only_that_batch(
    store: Store, hub: FakeHub, client: HubClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device dies as it stores the hub's answer to the 2nd batch: the hub
    has applied that batch, but the next batch was not sent yet, so the next
    run re-sends the 2nd batch alone (answered as a duplicate) and goes on."""
    enrolled(store, hub, client)
    store.register([create(names={"given": f"Person{i}"}) for i in range(9)])
    total = store.status().pending_outbox
    stored = store.sync.mark_pushed
    calls = 0

    def dies_on_the_second(*args: Any, **kwargs: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise _Killed
        return stored(*args, **kwargs)

    monkeypatch.setattr(store.sync, "mark_pushed", dies_on_the_second)
    with pytest.raises(_Killed):
        run_sync(store, client, max_batch_bytes=3000)
    monkeypatch.undo()
    first, unstored = hub.pushes  # nothing went out after the answer it died storing
    assert store.sync.pushed_seq() == first.seq_last
    summary = run_sync(store, client, max_batch_bytes=3000)
    resent = [
        h.batch_id for h in hub.pushes[2:] if h.batch_id in {first.batch_id, unstored.batch_id}
    ]
    assert resent == [unstored.batch_id]
    assert summary.duplicates == unstored.seq_last - unstored.seq_first + 1
    assert len(hub.pushes) >= 4  # the run went on past the re-sent batch
    assert pushed_seqs(hub, store.device_id) == list(range(1, total + 1))  # each applied once
    assert store.status().pending_outbox == 0


def test_ctrl_c_while_the_hub_is_slow_stops_at_once_and_resends_one_batch(
    store: Store, hub: FakeHub, client: HubClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the hub sits on a batch (a slow link): the sync stops at
    once instead of waiting for that exchange to end, and the next run sends
    that batch again, once."""
    enrolled(store, hub, client)
    store.register([create(names={"given": f"Person{i}"}) for i in range(6)])
    total = store.status().pending_outbox
    released = threading.Event()
    push = hub._push

    def slow(data: bytes) -> httpx.Response:
        released.wait(30)
        return push(data)

    read = store.sync.outbox_batch

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if "after_seq" in kwargs:  # reading ahead while the first batch is in flight
            raise KeyboardInterrupt
        return read(*args, **kwargs)

    monkeypatch.setattr(hub, "_push", slow)
    monkeypatch.setattr(store.sync, "outbox_batch", interrupted)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_sync(store, client, max_batch_bytes=3000)
    assert time.monotonic() - started < 5  # not the 30 s the hub sits on it
    released.set()
    monkeypatch.undo()
    assert store.sync.pushed_seq() == 0
    summary = run_sync(store, client, max_batch_bytes=3000)
    assert summary.acknowledged == total
    assert pushed_seqs(hub, store.device_id) == list(range(1, total + 1))  # each applied once


def test_an_ack_for_part_of_a_batch_drops_the_batch_sealed_to_follow_it(
    store: Store, hub: FakeHub, client: HubClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub applies only the first edit of the 2nd batch: the batch read and
    sealed to follow it is never sent; the next starts right after what the
    hub holds, with no gap and nothing sent twice."""
    enrolled(store, hub, client)
    store.register([create(names={"given": f"Person{i}"}) for i in range(8)])
    total = store.status().pending_outbox
    hub.partial = {2: 1}
    sealed = []
    seal = sync_push._seal

    def counted(*args: Any) -> Any:
        sealed.append(seal(*args))
        return sealed[-1]

    monkeypatch.setattr(sync_push, "_seal", counted)
    summary = run_sync(store, client, max_batch_bytes=3000)
    # The 3rd batch was sealed while the hub worked on the 2nd (the device reads
    # ahead), then dropped: the batch after the cut is another one.
    assert sealed[2].header.seq_first == hub.pushes[1].seq_last + 1
    assert sealed[2].header.batch_id not in {h.batch_id for h in hub.pushes}
    first, cut, *rest = hub.pushes
    kept = hub.devices[store.device_id].batches[cut.batch_id][1]["high_water"]
    assert first.seq_last < kept < cut.seq_last
    assert rest[0].seq_first == kept + 1  # not cut.seq_last + 1: that batch was dropped
    assert [b.seq_first for b in rest[1:]] == [b.seq_last + 1 for b in rest[:-1]]
    assert rest[-1].seq_last == total
    assert pushed_seqs(hub, store.device_id) == list(range(1, total + 1))  # each once
    assert summary.acknowledged == total and summary.duplicates == 0
    assert summary.sent_batches == len(hub.pushes)
    assert store.status().pending_outbox == 0


def test_gap_rewinds_to_where_the_hub_stands(store: Store, hub: FakeHub, client: HubClient) -> None:
    enrolled(store, hub, client)
    store.register([create(names={"given": f"Person{i}"}) for i in range(3)])
    run_sync(store, client)
    # The hub is restored from a backup that holds only the first record.
    device = hub.devices[store.device_id]
    kept = hub.log[0].last_seq or 0
    hub.log = hub.log[:1]
    device.high_water, device.batches = kept, {}
    store.register([create(names={"given": "Late"})])
    summary = run_sync(store, client)
    gap, *resent = hub.pushes[1:]
    assert gap.seq_first > kept + 1
    assert resent[0].seq_first == kept + 1
    assert pushed_seqs(hub, store.device_id) == list(range(1, store.status().sync.last_seq + 1))
    assert summary.acknowledged == store.status().sync.last_seq - kept
    assert store.status().pending_outbox == 0


def test_replayed_under_another_batch_id_moves_the_mark(
    store: Store, hub: FakeHub, client: HubClient
) -> None:
    enrolled(store, hub, client)
    store.register([create(names={"given": f"Person{i}"}) for i in range(4)])
    run_sync(store, client)
    applied = len(hub.log)
    store.sync.reset_pushed(0)  # as if every answer had been lost
    summary = run_sync(store, client, max_batch_bytes=2000)  # other batches, other ids
    assert len(hub.log) == applied
    assert summary.acknowledged == summary.duplicates == store.status().sync.last_seq
    assert store.status().pending_outbox == 0


def test_verdicts_are_stored_per_change(store: Store, hub: FakeHub, client: HubClient) -> None:
    enrolled(store, hub, client)
    [saved] = store.register([create()])
    run_sync(store, client)
    rid = str(saved.id)
    # Another device wrote the phone far in the future; our later edit loses.
    future = Version(Stamp(4_000_000_000_000), OTHER)
    hub._apply([Edit(rid, future, "Yusuf", (("phone", "+218 97 777 7777"),), {}, 1)])
    store.edit(rid, {"phone": "+218 98 888 8888", "occupation": "baker"})
    summary = run_sync(store, client)
    assert (summary.superseded, summary.conflicts) == (1, 1)
    assert store.status().sync.lost_edits == 1  # one change: superseded, and a conflict
    assert store.get(rid).phone == "+218 97 777 7777"  # the pull brought the winner


def test_answers_not_signed_by_the_pinned_hub_are_refused(
    store: Store, hub: FakeHub, client: HubClient
) -> None:
    enrolled(store, hub, client)
    store.register([create()])
    hub.answer_keys = KeyPairs.generate()  # someone else answers in the hub's name
    with pytest.raises(SyncError) as info:
        run_sync(store, client)
    assert info.value.code == "envelope.bad_signature"
    assert store.sync.pushed_seq() == 0


def test_a_pull_page_nested_too_deep_is_a_bad_answer_and_changes_nothing(
    store: Store, hub: FakeHub, client: HubClient
) -> None:
    enrolled(store, hub, client)
    sealed = hub._seal

    def deep(kind: str, device_id: str, like: Header, body: dict[str, Any]) -> bytes:
        if kind != "pull":
            return sealed(kind, device_id, like, body)
        keys = hub.devices[device_id].public_keys
        header = dataclasses.replace(
            like, kind=kind, recipient=device_id, kem=keys.kem_algorithm.value
        )
        return seal(header, b"[" * 100_000 + b"]" * 100_000, recipient=keys, sender=hub.keys)

    hub._seal = deep  # type: ignore[method-assign]
    before = store.sync.pull_position()
    with pytest.raises(HubProblem) as info:
        run_sync(store, client)
    assert info.value.code == "hub.bad_answer" and "not JSON" in info.value.detail
    assert store.sync.pull_position() == before


def test_a_pulled_stamp_no_clock_can_follow_is_a_bad_answer_and_the_store_still_opens(
    store: Store, hub: FakeHub, client: HubClient, tmp_path: Path
) -> None:
    enrolled(store, hub, client)
    _, fine = other_record("Ada", wall_ms=1_800_000_000_000, number=2)
    _, last = other_record("Bola", wall_ms=0, number=3)
    hub._apply([fine, dataclasses.replace(last, version=Version(LAST_STAMP, OTHER))])
    clock_before = store.status().last_stamp
    with pytest.raises(HubProblem) as info:
        run_sync(store, client)
    assert info.value.code == "hub.bad_answer" and "past any clock" in info.value.detail
    assert store.sync.pull_position().cursor == ""  # nothing of the page was stored
    assert store.status().last_stamp == clock_before
    store.close()
    reopened = Store.open(tmp_path / "dev", PASSPHRASE)  # it once overflowed: unopenable
    try:
        assert reopened.status().last_stamp == clock_before
        assert reopened.list_records() == []
    finally:
        reopened.close()


def test_revoked_device_is_marked_and_keeps_its_data(
    store: Store, hub: FakeHub, client: HubClient
) -> None:
    enrolled(store, hub, client)
    store.register([create()])
    hub.devices[store.device_id].is_revoked = True
    assert not store.sync.is_revoked()
    with pytest.raises(DeviceRevoked, match="ordered it wiped"):
        run_sync(store, client)
    assert store.sync.is_revoked() and store.status().sync.is_revoked
    assert store.status().records == 1
    pushes = len(hub.pushes)
    with pytest.raises(DeviceRevoked):
        run_sync(store, client)
    assert len(hub.pushes) == pushes  # no further contact


def test_pull_follows_pages_until_no_more(store: Store, hub: FakeHub, client: HubClient) -> None:
    enrolled(store, hub, client)
    store.register([create(names={"given": "Mine"})])
    run_sync(store, client)  # the hub's log starts with our own edit, never sent back
    for i, name in enumerate(["Ada", "Bola", "Chidi", "Dayo", "Emeka"]):
        _, edit = other_record(name, wall_ms=1_800_000_000_000 + i, number=i + 2)
        hub._apply([edit])
    hub.pulls = 0
    summary = run_sync(store, client, pull_limit=2)
    assert summary.received_edits == 5 and hub.pulls == 3
    assert store.sync.pull_position().cursor == "epoch-1:6"
    assert len(store.list_records()) == 6
    assert run_sync(store, client, pull_limit=2).received_edits == 0


def test_new_epoch_pulls_from_the_start(store: Store, hub: FakeHub, client: HubClient) -> None:
    enrolled(store, hub, client)
    rid, edit = other_record("Chiamaka", wall_ms=1_800_000_000_000)
    hub._apply([edit])
    assert run_sync(store, client).received_edits == 1
    hub.epoch = "epoch-2"  # the hub was rebuilt: old cursors mean nothing
    assert run_sync(store, client).received_edits == 1
    assert store.sync.pull_position() == PullPosition("epoch-2:1", "epoch-2")
    assert [h.id for h in store.search("Chiamaka")] == [rid]


def test_watch_backs_off_and_stops_on_interrupt(
    store: Store, hub: FakeHub, client: HubClient
) -> None:
    enrolled(store, hub, client)
    outcomes = iter(["down", "down", "down", "down", "ok", "ok", "ok", "ok", "ok"])

    def flaky(request: httpx.Request) -> httpx.Response:
        if next(outcomes) == "down":
            raise httpx.ConnectError("network is unreachable")
        return hub.handle(request)

    delays: list[float] = []

    def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 6:
            raise KeyboardInterrupt

    store.register([create()])
    seen: list[SyncSummary | Exception] = []
    with httpx.Client(transport=httpx.MockTransport(flaky), base_url="http://hub.test") as http:
        total = watch(
            store,
            HubClient(http),
            sleep=sleep,
            jitter=lambda: 1.0,
            on_run=seen.append,
            max_delay_s=5,
        )
    # 4 runs fail (1, 2, 4, 5 s: capped), one moves data (1 s), one moves nothing (1 s).
    assert delays == [1, 2, 4, 5, 1, 1]
    assert [type(s).__name__ for s in seen] == ["HubUnreachable"] * 4 + ["SyncSummary"] * 2
    assert total.acknowledged == store.status().sync.last_seq


def test_watch_stops_on_a_refusal(store: Store, hub: FakeHub, client: HubClient) -> None:
    enrolled(store, hub, client)
    hub.devices[store.device_id].is_revoked = True
    store.register([create()])
    with pytest.raises(DeviceRevoked):
        watch(store, client, sleep=lambda _: None)


# --- the command line ----------------------------------------------------------------------


def test_cli_sync_and_enrol_refuse_clearly(tmp_path: Path) -> None:
    home = tmp_path / "device"
    assert run_cli(home, "init", "--site", SITE, "--operator", "Amina").returncode == 0
    result = run_cli(home, "sync")
    assert result.returncode == 2
    assert "not enrolled" in result.stderr and "fieldreg enrol" in result.stderr
    assert "Traceback" not in result.stderr
    assert "not enrolled" in run_cli(home, "status").stdout
    result = run_cli(home, "enrol", "--hub", "ftp://hub.example.org", "--code", "C")
    assert result.returncode == 2 and "not an http:// or https:// URL" in result.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    result = run_cli(home, "enrol", "--hub", f"http://127.0.0.1:{port}", "--code", "C")
    assert result.returncode == 2, result.stderr
    assert f"hub unreachable at http://127.0.0.1:{port}" in result.stderr
    assert "nothing was stored" in result.stderr and "Traceback" not in result.stderr
