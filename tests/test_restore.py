"""A hub restored from an older backup: devices find out and send again what it
lost; nothing is lost or applied twice.

Real parts throughout: a uvicorn hub on 127.0.0.1 over SQLite (and PostgreSQL
when FIELDREG_TEST_POSTGRES_URL is set), backed up and restored with the
commands docs/deployment.md gives (`sqlite3 .backup`, `pg_dump`/`pg_restore`),
`fieldreg-hub restored` as a subprocess, and real encrypted device stores
syncing with `run_sync`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from field_client.enrolment import CannotEnrolAgain, EnrolmentRefused, enrol, enrol_again
from field_client.store import Store
from schemas.record import RegistrationCreate
from server.feed import Cursor, decode_cursor, encode_cursor
from server.hub import Hub
from server.problems import Problem
from server.restore_commands import renew_epoch
from server.settings import HubSettings
from sync.protocol import ProtocolError, PullPage, Released
from sync.transport import HubClient
from tests.conftest import PASSPHRASE, run_cli, sample_record
from tests.hubkit import POSTGRES_ENV, database_backends, fresh_database, init_hub, live_hub
from tests.test_sync_e2e import count, device_state, hub_state, new_device, sync

SITE = "s1"


@dataclass(frozen=True)
class HubPlace:
    """Where a test hub lives: its data directory and database (None: SQLite there)."""

    settings: HubSettings
    backend: str

    @property
    def sqlite_file(self) -> Path:
        return self.settings.data_dir / "hub.db"

    def backup(self, dest: Path) -> None:
        """Back up the live hub's database the way docs/deployment.md says."""
        if self.backend == "sqlite":
            run(["sqlite3", str(self.sqlite_file), f".backup '{dest}'"])
        else:
            assert self.settings.database_url
            run(["pg_dump", "--format=custom", f"--file={dest}", self.settings.database_url])

    def restore(self, src: Path) -> None:
        """Put the backup in place of the database (the hub is stopped)."""
        if self.backend == "sqlite":
            for suffix in ("-wal", "-shm"):
                Path(f"{self.sqlite_file}{suffix}").unlink(missing_ok=True)
            shutil.copyfile(src, self.sqlite_file)
            return
        url = self.settings.database_url
        assert url
        name = url.rpartition("/")[2]
        import psycopg  # only with PostgreSQL (an optional extra)

        with psycopg.connect(os.environ[POSTGRES_ENV], autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        run(["pg_restore", "--no-owner", f"--dbname={url}", str(src)])

    def hub_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FIELDREG_HUB_DATA_DIR": str(self.settings.data_dir)}
        env.pop("FIELDREG_HUB_DATABASE_URL", None)
        if self.settings.database_url:
            env["FIELDREG_HUB_DATABASE_URL"] = self.settings.database_url
        return subprocess.run(
            [sys.executable, "-m", "server", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


@pytest.fixture(params=database_backends())
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HubPlace]:
    with fresh_database(request.param) as url:
        yield HubPlace(init_hub(tmp_path / "hub", url), request.param)


def register(store: Store, *names: str) -> list[str]:
    saved = store.register(
        [RegistrationCreate.model_validate(sample_record(names={"given": n})) for n in names]
    )
    return [str(r.id) for r in saved]


def own_changes(store: Store) -> int:
    return store.status().sync.last_seq


def log_duplicates(hub: Hub) -> int:
    """Device changes the hub's change log holds more than once."""
    stmt = sa.text(
        "SELECT count(*) FROM (SELECT device_id, device_seq FROM changes"
        " WHERE device_seq IS NOT NULL GROUP BY device_id, device_seq HAVING count(*) > 1) d"
    )
    with hub.engine.connect() as conn:
        return int(conn.execute(stmt).scalar_one())


def audited(hub: Hub, action: str) -> int:
    with hub.engine.connect() as conn:
        stmt = sa.text("SELECT count(*) FROM audit_log WHERE action = :a")
        return int(conn.execute(stmt, {"a": action}).scalar_one())


@dataclass
class Before:
    """What the hub held just before the restore: everything (it never lost anything)."""

    state: dict[str, dict[str, Any]]
    changes: int
    epoch: str
    a_after_backup: int  # own changes each device made after the backup
    b_after_backup: int


def _two_devices_then_backup(
    place: HubPlace, stack: ExitStack, tmp_path: Path, backup: Path
) -> tuple[Store, Store, Before]:
    """Devices a and b sync, the hub is backed up, both do more and sync again."""
    with live_hub(place.settings) as (url, live):
        a = stack.enter_context(new_device(tmp_path, "a", url, live, sites=[SITE]))
        b = stack.enter_context(new_device(tmp_path, "b", url, live, sites=[SITE]))
        a_first = register(a, "Amal", "Bashir")
        b_first = register(b, "Chiara")
        for store in (a, b, a):
            sync(store, url)
        place.backup(backup)  # the hub is live: the backup must be consistent anyway
        a_seq, b_seq = own_changes(a), own_changes(b)
        register(a, "Dawit", "Efua")
        a.edit(b_first[0], {"occupation": "driver"})  # on b's record the backup holds
        b.edit(a_first[0], {"phone": "+218 91 222 3333"})  # on a's record the backup holds
        register(b, "Fatou")
        for store in (a, b, a, b):
            sync(store, url)
        state = hub_state(live)
        assert device_state(a) == device_state(b) == state and len(state) == 6
        before = Before(
            state,
            count(live, "changes"),
            live.epoch,
            own_changes(a) - a_seq,
            own_changes(b) - b_seq,
        )
    return a, b, before


@pytest.mark.parametrize("renew", [True, False], ids=["restored-command", "no-command"])
def test_restore_from_an_older_backup_loses_nothing(
    place: HubPlace, tmp_path: Path, renew: bool
) -> None:
    backup = tmp_path / "hub-backup"
    with ExitStack() as stack:
        a, b, before = _two_devices_then_backup(place, stack, tmp_path, backup)
        place.restore(backup)
        if renew:
            done = place.hub_cli("restored")
            assert done.returncode == 0, done.stderr
            assert "new hub epoch" in done.stdout and "audit" in done.stdout
        # Without the command (a failover to a replica that lagged, an operator who
        # forgot) the epoch stays, and the hub hands out sequence numbers again.
        with live_hub(place.settings) as (url, live):
            assert (live.epoch != before.epoch) is renew
            assert count(live, "changes") < before.changes  # the backup is older
            # a made more since; its push meets a gap and it sends again from the
            # hub's mark. Three new registrations take the restored hub's sequence
            # past b's old cursor, so the numbers b has seen now mean other changes.
            made = own_changes(a)
            a_new = register(a, "Gaspard", "Hawa", "Ivan")
            a_run = sync(a, url)
            assert a_run.acknowledged == before.a_after_backup + own_changes(a) - made
            assert count(live, "changes") >= before.changes
            # b made nothing new: only a pull page can tell it the hub lost its changes.
            assert b.sync.pending_count() == 0
            b_run = sync(b, url)
            assert b_run.acknowledged == before.b_after_backup  # exactly what was lost
            assert b_run.received_edits > 0
            a_again = sync(a, url)
            assert a_again.acknowledged == 0 and a_again.received_edits > 0
            assert sync(b, url).acknowledged == 0

            state = hub_state(live)
            assert {rid: state[rid] for rid in before.state} == before.state
            assert set(state) - set(before.state) == set(a_new)
            assert device_state(a) == device_state(b) == state
            assert log_duplicates(live) == 0
            assert count(live, "changes") == before.changes + len(a_new)
            assert count(live, "quarantine") == 0 and count(live, "conflicts") == 0
            assert a.sync.pending_count() == b.sync.pending_count() == 0
            assert audited(live, "hub.restored") == int(renew)
        verified = place.hub_cli("audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr


def test_an_edit_parked_after_a_restore_is_released_and_its_device_hears_of_it(
    place: HubPlace, tmp_path: Path
) -> None:
    """b edits a's record; the hub is restored from before a registered it; b's
    edit arrives first and is parked (record.unknown), then applied when a sends
    the registration again. b's next pull says so: b no longer counts it held."""
    backup = tmp_path / "hub-backup"
    with ExitStack() as stack:
        with live_hub(place.settings) as (url, live):
            a = stack.enter_context(new_device(tmp_path, "a", url, live, sites=[SITE]))
            b = stack.enter_context(new_device(tmp_path, "b", url, live, sites=[SITE]))
            place.backup(backup)  # before anything was registered
            (amal,) = register(a, "Amal")
            sync(a, url)
            sync(b, url)
            b.edit(amal, {"phone": "+218 91 222 3333", "occupation": "driver"})
        place.restore(backup)
        with live_hub(place.settings) as (url, live):
            parked = sync(b, url)
            assert parked.quarantined == 2 and b.status().sync.quarantined == 2
            assert count(live, "quarantine") == 1
            sync(a, url)  # a learns the hub lost its registration and sends it again
            assert count(live, "quarantine") == 0
            assert hub_state(live)[amal]["phone"] == "+218 91 222 3333"
            heard = sync(b, url)
            assert heard.acknowledged == 0 and heard.released == 2
            status = b.status().sync
            assert status.quarantined == 0 and status.lost_edits == 0  # both applied
            assert device_state(a) == device_state(b) == hub_state(live)
            # Told once: a later pull page does not list it again.
            with live.engine.connect() as conn:
                released = conn.execute(sa.text("SELECT count(*) FROM released_edits")).scalar()
            later = sync(b, url)
            assert released == 1 and later.received_edits == 0 and later.released == 0


def test_a_change_pushed_again_onto_its_old_number_does_not_pass_for_the_original(
    place: HubPlace, tmp_path: Path
) -> None:
    """Restored without `restored` (a failover): c's change is lost, d's new one
    takes its number 1, and b's change, pushed again with a new one, lands on
    its old number 2. b's cursor (2 and its mark) must not pass: b would never
    pull d's change."""
    backup = tmp_path / "hub-backup"
    with ExitStack() as stack:
        with live_hub(place.settings) as (url, live):
            b = stack.enter_context(new_device(tmp_path, "b", url, live, sites=[SITE]))
            c = stack.enter_context(new_device(tmp_path, "c", url, live, sites=[SITE]))
            d = stack.enter_context(new_device(tmp_path, "d", url, live, sites=[SITE]))
            place.backup(backup)
            register(c, "Cala")
            sync(c, url)
            register(b, "Bilal")
            sync(b, url)
        place.restore(backup)  # and nobody runs `fieldreg-hub restored`
        with live_hub(place.settings) as (url, live):
            (dina,) = register(d, "Dina")
            sync(d, url)
            register(b, "Bilal's brother")
            sync(b, url)  # sends Bilal again (numbered 2 again), his brother, then pulls
            sync(b, url)
            assert dina in device_state(b)


def test_a_released_edit_takes_the_hubs_verdict_on_each_field(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "d", PASSPHRASE, site=SITE, operator="o", kdf_memory_kib=8192)
    with store:
        register(store, "Amal")
        last = own_changes(store)
        parked = "quarantined:record.unknown: the first edit of a record must carry it"
        verdicts = {seq: parked for seq in range(1, last + 1)}
        verdicts[last] = "quarantined:field.invalid: sex: not a sex"  # held for another reason
        store.sync.mark_pushed(last, verdicts)
        assert store.status().sync.quarantined == last
        result = store.sync.apply_pull(
            [],
            cursor="",
            epoch="e",
            released=(Released(1, last, {"names.given": "superseded", "sex": "conflict"}),),
        )
        assert result.released == last - 1  # each still held for record.unknown
        status = store.status().sync
        assert status.quarantined == 1  # the one held for another reason stays held
        assert status.lost_edits == 2  # names.given superseded, sex in conflict
        again = store.sync.apply_pull([], cursor="", epoch="e", released=(Released(1, last),))
        assert again.released == 0 and store.status().sync.lost_edits == 2  # told twice: same


def test_a_new_epoch_alone_sends_nothing_again(place: HubPlace, tmp_path: Path) -> None:
    """`restored` on a hub that lost nothing (the newest backup): devices pull
    from the start, and send again nothing the hub still holds."""
    with ExitStack() as stack, live_hub(place.settings) as (url, live):
        a = stack.enter_context(new_device(tmp_path, "a", url, live, sites=[SITE]))
        b = stack.enter_context(new_device(tmp_path, "b", url, live, sites=[SITE]))
        register(a, "Jamal", "Kofi")
        register(b, "Lina")
        for store in (a, b, a):
            sync(store, url)
        old = live.epoch
        renewal = renew_epoch(live, request_id="test")
        assert (renewal.old_epoch, renewal.epoch) == (old, live.epoch) and live.epoch != old
        assert renewal.devices == 2 and renewal.last_hub_seq == count(live, "changes")
        register(a, "Musa")
        a_run, b_run = sync(a, url), sync(b, url)
        assert a_run.acknowledged == a_run.sent_changes > 0  # only the new registration
        assert b_run.acknowledged == b_run.sent_changes == 0
        assert b_run.received_edits == 3  # all of a's edits: the pull started over
        assert a.sync.pull_position().epoch == b.sync.pull_position().epoch == live.epoch
        assert device_state(a) == device_state(b) == hub_state(live)
        assert log_duplicates(live) == 0 and audited(live, "hub.restored") == 1


def test_a_device_enrolled_after_the_backup_enrols_again_and_sends_everything(
    place: HubPlace, tmp_path: Path
) -> None:
    """The restored hub does not know a device enrolled after its backup: `fieldreg
    enrol --again` enrols the same store (same id, same keys, same pinned hub)
    with a new code, and its next sync sends every change the hub lacks."""
    backup = tmp_path / "hub-backup"
    with ExitStack() as stack:
        with live_hub(place.settings) as (url, live):
            a = stack.enter_context(new_device(tmp_path, "a", url, live, sites=[SITE]))
            register(a, "Nadia")
            sync(a, url)
            place.backup(backup)
            c = stack.enter_context(new_device(tmp_path, "c", url, live, sites=[SITE]))
            c_records = register(c, "Omar", "Precious")
            sync(c, url)
            device_id, keys = c.device_id, c.sync.read_enrolment()
        place.restore(backup)
        assert place.hub_cli("restored").returncode == 0
        port = httpx.URL(url).port
        with live_hub(place.settings, port=port) as (url, live):  # the same address
            refused = run_cli(tmp_path / "c", "sync")
            assert refused.returncode != 0 and "device.unknown" in refused.stderr
            assert "fieldreg enrol --again" in refused.stderr
            code = live.create_enrol_code([SITE], timedelta(hours=1), request_id="test-enrol")
            done = run_cli(tmp_path / "c", "enrol", "--again", "--code", code)
            assert done.returncode == 0, done.stderr
            assert "enrolled again with" in done.stdout
            again = c.sync.read_enrolment()
            assert again is not None and keys is not None and c.device_id == device_id
            assert again.keys.public() == keys.keys.public() and again.hub_keys == keys.hub_keys
            assert again.epoch == live.epoch != keys.epoch

            c_run = sync(c, url)
            assert c_run.acknowledged == own_changes(c)  # everything, once
            sync(a, url)
            state = hub_state(live)
            assert set(c_records) <= set(state)
            assert device_state(a) == device_state(c) == state
            assert log_duplicates(live) == 0

            # The hub knows the device now: enrolling again is refused, the code unspent.
            code = live.create_enrol_code([SITE], timedelta(hours=1), request_id="test-enrol")
            twice = run_cli(tmp_path / "c", "enrol", "--again", "--code", code)
            assert twice.returncode != 0 and "still knows this device" in twice.stderr
            e = stack.enter_context(
                Store.init(tmp_path / "e", PASSPHRASE, site=SITE, operator="e", kdf_memory_kib=1024)
            )
            with httpx.Client(base_url=url) as http:
                enrol(e, HubClient(http), code=code)  # the refusal left the code unspent


def test_enrolling_again_needs_the_pinned_hub_and_a_store_not_revoked(tmp_path: Path) -> None:
    settings = [init_hub(tmp_path / name, None) for name in ("hub", "other")]
    with ExitStack() as stack:
        url, live = stack.enter_context(live_hub(settings[0]))
        other_url, other = stack.enter_context(live_hub(settings[1]))
        store = stack.enter_context(new_device(tmp_path, "a", url, live, sites=[SITE]))

        def pinned() -> tuple[Any, ...]:
            e = store.sync.read_enrolment()
            assert e is not None
            return (e.hub_url, e.keys.public(), e.hub_keys, e.sites, e.epoch, e.enrolled_at_ms)

        before = pinned()
        code = other.create_enrol_code([SITE], timedelta(hours=1), request_id="test-enrol")
        with (
            httpx.Client(base_url=other_url) as http,
            pytest.raises(EnrolmentRefused, match="cannot move to another hub"),
        ):
            enrol_again(store, HubClient(http), code=code)
        assert count(other, "devices") == 0 and pinned() == before
        never = stack.enter_context(
            Store.init(tmp_path / "b", PASSPHRASE, site=SITE, operator="b", kdf_memory_kib=1024)
        )
        store.sync.mark_revoked()
        with httpx.Client(base_url=url) as http:
            for refused, why in ((never, "never enrolled"), (store, "revoked")):
                with pytest.raises(CannotEnrolAgain, match=why):
                    enrol_again(refused, HubClient(http), code=code)
        assert count(live, "devices") == 1


def test_cursors_carry_a_mark_and_refusals_name_the_epoch() -> None:
    epoch = uuid.uuid4().hex
    assert decode_cursor("", epoch) == Cursor(0)
    assert decode_cursor(encode_cursor(epoch, 42, "AbC-_9xyz012"), epoch) == Cursor(
        42, "AbC-_9xyz012"
    )
    assert decode_cursor(encode_cursor(epoch, 7), epoch) == Cursor(7)  # made before marks
    for bad in (
        encode_cursor("another-epoch", 7),
        "%%%",
        encode_cursor(epoch, 7, "m") + "Om9v",  # a fourth part
        encode_cursor(epoch, -1),
        encode_cursor(epoch, 2**63, "m"),  # past what the databases store: was a 500
        encode_cursor(epoch, 10**23, "m"),
    ):
        with pytest.raises(Problem) as info:
            decode_cursor(bad, epoch)
        assert (info.value.status, info.value.code) == (400, "cursor.invalid")
        assert info.value.extra == {"epoch": epoch}


def test_pull_pages_may_say_how_far_the_hub_holds_the_device() -> None:
    page = {"edits": [], "cursor": "c", "more": False, "epoch": "e"}
    assert PullPage.from_json(page).high_water is None  # a hub that does not say
    said = PullPage.from_json({**page, "high_water": 12})
    assert said.high_water == 12 and PullPage.from_json(said.to_json()) == said
    assert "high_water" not in PullPage([], "c", False, "e").to_json()
    for bad in (-1, "12", True, None, 1.5):
        with pytest.raises(ProtocolError) as info:
            PullPage.from_json({**page, "high_water": bad})
        assert info.value.code == "page.malformed"


def test_restored_refuses_a_directory_without_a_hub(tmp_path: Path) -> None:
    env = {**os.environ}
    env.pop("FIELDREG_HUB_DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "server", "restored", "--data-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr and not (tmp_path / "none").exists()
