"""The encrypted device store on real SQLCipher files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from field_client.store import Store
from field_client.store_files import StoreBusy, StoreExists
from field_client.store_reads import NotFound
from field_client.unlock import WeakPassphrase, WrongPassphrase
from schemas.record import RegistrationCreate
from schemas.validation import InvalidRecord
from tests.conftest import PASSPHRASE, sample_record


def create(**overrides: Any) -> RegistrationCreate:
    return RegistrationCreate.model_validate(sample_record(**overrides))


def digest_dir(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_register_round_trip_and_outbox(store: Store) -> None:
    [saved] = store.register([create()])
    got = store.get(str(saved.id))
    assert got == saved
    assert got.registration.site == "ras-jedir"
    assert got.registration.device_id == store.device_id
    outbox = store.outbox(after_seq=0, limit=1000)
    assert [c.device_seq for c in outbox] == list(range(1, len(outbox) + 1))
    fields = {c.field for c in outbox}
    assert {"names.given", "situation.needs", "consent", "registration"} <= fields
    assert "notes" not in fields  # absent values are not sent
    assert all(c.base is None for c in outbox)
    assert store.status().pending_outbox == len(outbox)


def test_register_with_existing_id_writes_nothing(store: Store) -> None:
    [saved] = store.register([create()])
    before = store.status()
    with pytest.raises(InvalidRecord, match="already registered"):
        store.register([create(), create(id=str(saved.id))])
    after = store.status()
    assert (after.records, after.changes, after.pending_outbox) == (
        before.records,
        before.changes,
        before.pending_outbox,
    )


def test_failure_between_record_and_outbox_leaves_neither(store: Store, tmp_path: Path) -> None:
    real_execute = store._conn.exec_driver_sql

    def failing_execute(sql: str, *args: Any, **kwargs: Any) -> Any:
        if sql.startswith("INSERT INTO changes"):
            raise OSError("disk unplugged")
        return real_execute(sql, *args, **kwargs)

    store._conn.exec_driver_sql = failing_execute  # type: ignore[method-assign,assignment]
    with pytest.raises(OSError):
        store.register([create()])
    store._conn.exec_driver_sql = real_execute  # type: ignore[method-assign]
    store.close()
    with Store.open(tmp_path / "dev", PASSPHRASE) as reopened:
        status = reopened.status()
        assert (status.records, status.changes, status.pending_outbox) == (0, 0, 0)


def test_clock_and_sequence_survive_restart(store: Store, tmp_path: Path) -> None:
    store.register([create()])
    status = store.status()
    store.close()
    # The device clock is reset to 1970 after the restart: stamps still increase.
    with Store.open(tmp_path / "dev", PASSPHRASE, wall_ms=lambda: 1_000) as again:
        [second] = again.register([create()])
        outbox = again.outbox(after_seq=0, limit=1000)
        stamps = [c.version.stamp for c in outbox]
        assert stamps[-1] > status.last_stamp
        assert outbox[-1].device_seq == len(outbox)
        assert again.get(str(second.id))


def test_edit_records_base_and_history(store: Store) -> None:
    [saved] = store.register([create()])
    rid = str(saved.id)
    first_version = {c.field: c.version for c in store.outbox(after_seq=0, limit=100)}
    updated = store.edit(
        rid, {"situation.needs": ["food"], "phone": "+218 92 000 0000"}, operator="Yusuf"
    )
    assert updated.situation.needs[0].value == "food"
    edits = [c for c in store.outbox(after_seq=0, limit=100) if c.operator == "Yusuf"]
    assert {c.field for c in edits} == {"situation.needs", "phone"}
    assert all(c.base == first_version[c.field] for c in edits)
    history = [h for h in store.history(rid) if h.field == "situation.needs"]
    assert [h.value for h in history] == [["consular_assistance", "evacuation"], ["food"]]
    assert [h.is_current for h in history] == [False, True]


def test_edit_without_change_records_nothing(store: Store) -> None:
    [saved] = store.register([create()])
    before = store.status().changes
    store.edit(str(saved.id), {"sex": "male"})
    assert store.status().changes == before


def test_edit_validates_and_writes_nothing_on_error(store: Store) -> None:
    [saved] = store.register([create()])
    before = store.status().changes
    with pytest.raises(InvalidRecord) as info:
        store.edit(
            str(saved.id),
            {
                "nationalities": ["EGY", "XXX"],
                "date_of_birth": {"value": "2999-01-01"},
                "registration": {},
            },
        )
    assert [str(e) for e in info.value.errors] == ["registration: cannot be edited"]
    with pytest.raises(InvalidRecord) as info:
        store.edit(
            str(saved.id),
            {"nationalities": ["EGY", "XXX"], "date_of_birth": {"value": "2999-01-01"}},
        )
    assert {str(e) for e in info.value.errors} == {
        "nationalities[1]: 'XXX' is not an ISO 3166-1 alpha-3 code",
        "date_of_birth: in the future",
    }
    with pytest.raises(InvalidRecord, match="unknown field"):
        store.edit(str(saved.id), {"favourite_colour": "blue"})
    assert store.status().changes == before


def test_id_prefix_lookup(store: Store) -> None:
    [saved] = store.register([create()])
    assert store.get(str(saved.id)[:13]).id == saved.id
    with pytest.raises(NotFound, match="too short"):
        store.get("0")
    with pytest.raises(NotFound, match="no record"):
        store.get("ffffffff-ffff")


def test_list_filters(store: Store) -> None:
    a, b = store.register(
        [
            create(),
            create(
                names={"given": "Grace", "family": "Okafor"},
                situation={"scenario": "trapped", "needs": ["shelter"]},
            ),
        ]
    )
    assert {r.id for r in store.list_records()} == {str(a.id), str(b.id)}
    assert [r.id for r in store.list_records(scenario="trapped")] == [str(b.id)]
    assert [r.id for r in store.list_records(need="evacuation")] == [str(a.id)]
    assert [r.id for r in store.list_records(need="shelter")] == [str(b.id)]
    assert store.list_records(site="elsewhere") == []
    today = a.registration.registered_at.date()
    assert len(store.list_records(registered_from=today, registered_to=today)) == 2


def test_search_across_spellings_and_scripts(store: Store) -> None:
    mohamed, arabic, mahmoud, grace = store.register(
        [
            create(names={"given": "Mohamed", "family": "Ali"}),
            create(names={"given_original": "محمد", "family_original": "علي"}),
            create(names={"given": "Mahmoud", "family": "Ali"}),
            create(names={"given": "Grace", "family": "Okafor"}),
        ]
    )
    hits = store.search("Muhammad")
    ids = [h.id for h in hits]
    assert str(mohamed.id) in ids and str(arabic.id) in ids
    assert str(grace.id) not in ids
    assert str(mahmoud.id) not in ids
    exact = store.search("Mohamed Ali")
    assert exact[0].id == str(mohamed.id)
    assert store.search("Okafor Grace")[0].id == str(grace.id)  # name order swapped
    assert store.search("!!!") == []


def test_wrong_passphrase_touches_nothing(store: Store, tmp_path: Path) -> None:
    store.register([create()])
    store.close()
    before = digest_dir(tmp_path / "dev")
    with pytest.raises(WrongPassphrase):
        Store.open(tmp_path / "dev", "not the right passphrase at all")
    assert digest_dir(tmp_path / "dev") == before


def test_weak_passphrase_refused(tmp_path: Path) -> None:
    with pytest.raises(WeakPassphrase):
        Store.init(tmp_path / "d", "short", site="s", operator="o")
    with pytest.raises(WeakPassphrase):
        Store.init(tmp_path / "d", "aaaaaaaaaaaaaaa", site="s", operator="o")
    assert not (tmp_path / "d" / "store.db").exists()
    # Four words are enough even when short.
    Store.init(tmp_path / "w", "ox by my tea", site="s", operator="o").close()


def test_init_refuses_existing_store(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreExists):
        Store.init(tmp_path / "dev", PASSPHRASE, site="s", operator="o")


def test_change_passphrase(store: Store, tmp_path: Path) -> None:
    [saved] = store.register([create()])
    key_before = (tmp_path / "dev" / "store.key").read_bytes()
    store.change_passphrase(PASSPHRASE, "a whole new set of words")
    store.close()
    assert (tmp_path / "dev" / "store.key").read_bytes() != key_before
    with pytest.raises(WrongPassphrase):
        Store.open(tmp_path / "dev", PASSPHRASE)
    with Store.open(tmp_path / "dev", "a whole new set of words") as again:
        assert again.get(str(saved.id)) == saved


def test_an_init_that_fails_part_way_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the new store is made: no half store is left for
    the next `init` to call an existing one."""

    def disk_full(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("field_client.store_files._bootstrap", disk_full)
    with pytest.raises(OSError, match="No space left"):
        Store.init(tmp_path / "dev", PASSPHRASE, site="s", operator="o", kdf_memory_kib=1024)
    assert list((tmp_path / "dev").iterdir()) == []
    monkeypatch.undo()
    with Store.init(
        tmp_path / "dev", PASSPHRASE, site="s", operator="  Amina  ", kdf_memory_kib=1024
    ) as store:
        assert store.operator == "Amina"  # kept as the change log will write it


def test_change_passphrase_while_another_process_has_the_store_open(
    store: Store, tmp_path: Path
) -> None:
    """SQLite cannot leave WAL mode (nor re-key) while another connection has the
    database open (`fieldreg sync --watch`): refused, nothing changed or left behind."""
    [saved] = store.register([create()])
    key_before = (tmp_path / "dev" / "store.key").read_bytes()
    with Store.open(tmp_path / "dev", PASSPHRASE) as other:
        other.status()
        with pytest.raises(StoreBusy, match="close other fieldreg commands and try again"):
            store.change_passphrase(PASSPHRASE, "a whole new set of words")
        assert other.get(str(saved.id)) == saved
    assert store.get(str(saved.id)) == saved
    store.close()
    assert sorted(p.name for p in (tmp_path / "dev").iterdir()) == ["store.db", "store.key"]
    assert (tmp_path / "dev" / "store.key").read_bytes() == key_before
    with pytest.raises(WrongPassphrase):
        Store.open(tmp_path / "dev", "a whole new set of words")
    with Store.open(tmp_path / "dev", PASSPHRASE) as again:
        assert again.get(str(saved.id)) == saved


class _Killed(BaseException):
    """The process dying: nothing catches it."""


def _change_killed(store: Store, new: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Change the passphrase with the step patched in to die; return the store's
    directory, closed, its new key file written."""
    with pytest.raises(_Killed):
        store.change_passphrase(PASSPHRASE, new)
    monkeypatch.undo()
    store.close()
    assert (store.data_dir / "store.key.new").exists()
    return store.data_dir


def test_a_passphrase_change_killed_after_re_encrypting_is_finished_by_open(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the database was re-keyed, before the new key file replaced
    the old: the new passphrase opens the store (and completes the change); the
    old one is told what happened instead of being called wrong."""
    [saved] = store.register([create()])
    new = "a whole new set of words"

    replace = os.replace

    def killed(src: Any, dst: Any) -> None:
        if Path(dst).name == "store.key":  # the last step: the new key file in place
            raise _Killed
        replace(src, dst)

    monkeypatch.setattr("field_client.store_files.os.replace", killed)
    data_dir = _change_killed(store, new, monkeypatch)
    with pytest.raises(WrongPassphrase, match=r"interrupted .* new passphrase"):
        Store.open(data_dir, PASSPHRASE)
    with Store.open(data_dir, new) as again:
        assert again.get(str(saved.id)) == saved
    assert not (data_dir / "store.key.new").exists()
    with Store.open(data_dir, new) as again:  # the change is complete
        assert again.get(str(saved.id)) == saved
    with pytest.raises(WrongPassphrase):
        Store.open(data_dir, PASSPHRASE)


def test_a_passphrase_change_killed_before_re_encrypting_leaves_the_old_one(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed once the new key file was written, before the database was
    re-keyed: the old passphrase still opens the store, and the stale new key
    file is removed; the new passphrase does not open it."""
    [saved] = store.register([create()])
    new = "a whole new set of words"

    def killed(*_: Any) -> None:
        raise _Killed

    monkeypatch.setattr(store._conn, "commit", killed)  # the step before re-keying
    data_dir = _change_killed(store, new, monkeypatch)
    with pytest.raises(WrongPassphrase):
        Store.open(data_dir, new)
    with Store.open(data_dir, PASSPHRASE) as again:
        assert again.get(str(saved.id)) == saved
    assert not (data_dir / "store.key.new").exists()


def test_no_identifying_value_in_clear_on_disk(store: Store, tmp_path: Path) -> None:
    secrets = ["Zubeida", "Qarawiyyin", "زبيدة", "Tesfamariam", "A9988776", "+218 95 111 2222"]
    store.register(
        [
            create(
                names={
                    "given": "Zubeida",
                    "family": "Qarawiyyin",
                    "given_original": "زبيدة",
                    "aliases": ["Tesfamariam"],
                },
                documents=[{"type": "passport", "status": "held", "number": "A9988776"}],
                phone="+218 95 111 2222",
            )
        ]
    )
    data_dir = tmp_path / "dev"

    def leaks() -> list[str]:
        found = []
        for path in data_dir.iterdir():
            raw = path.read_bytes()
            for secret in secrets:
                for encoded in (secret.encode("utf-8"), secret.encode("utf-16-le")):
                    if encoded in raw or encoded.lower() in raw:
                        found.append(f"{path.name}: {secret}")
        return found

    # While open the WAL holds the latest pages; after close everything is checkpointed.
    assert any(p.name.endswith("-wal") for p in data_dir.iterdir())
    assert leaks() == []
    store.close()
    assert leaks() == []
