"""Crash safety: `kill -9` the hub and the `fieldreg` CLI at random moments.

The hub runs as real `python -m server serve` processes on an SQLite hub; five
real devices push concurrently from threads (small batches, so there are many)
while the test kills the serving hub at seeded random moments and starts it
again. Afterwards nothing may be lost, nothing applied twice, and the SQLite
file must pass `PRAGMA integrity_check`. The device tests kill `fieldreg
register --json` inside its import transaction and `fieldreg sync` mid-sync.

A cold hub start costs about 2 s of imports, so the hub runs in a rotation of
a few processes on their own ports over the same data directory: the test kills
the one devices talk to, moves them to another that is already up, and starts
a new process on the freed port while the others serve. Only one process gets
traffic at a time; each takes over with the state the last one left on disk.

`FIELDREG_SOAK_KILLS` raises the number of hub kills (default 25; `make soak`);
the device tests kill a sixth as often, at least 4 times each.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import sqlalchemy as sa

from bench.people import person
from field_client.enrolment import enrol
from field_client.store import Store
from field_client.sync_runner import run_sync
from schemas.fields import flatten
from schemas.record import RegistrationCreate
from server import audit
from server.hub import Hub
from server.records import load_records
from server.settings import HubSettings
from sync.transport import HubClient, HubUnreachable
from tests.conftest import PASSPHRASE
from tests.hubkit import free_port, init_hub, live_hub

SOAK_ENV = "FIELDREG_SOAK_KILLS"
HUB_KILLS = int(os.environ.get(SOAK_ENV, "25"))
DEVICE_KILLS = max(4, HUB_KILLS // 6)
SEED = 20261206
HUB_SLOTS = 4  # processes in the rotation: one serves, the others start or stand by
MAX_BATCH_BYTES = 4096  # a few people per batch: many batches, many moments to die in
START_TIMEOUT_S = 60.0
TEST_BUDGET_S = 240.0 + 4.0 * HUB_KILLS  # a hard bound for every loop below


# -- the hub as real processes ---------------------------------------------------------------
@dataclass
class HubProcess:
    """One `python -m server serve` on a port of its own, logging to a file."""

    port: int
    env: dict[str, str]
    log: IO[bytes]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--port", str(self.port)],
            env=self.env,
            stdout=self.log,
            stderr=self.log,
        )

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the hub on port {self.port} exited: {self.proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.02)
        raise AssertionError(f"the hub on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL this process (by its pid) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


class HubRotation:
    """Hub processes over one data directory; devices talk to `url`."""

    def __init__(self, settings: HubSettings, log_path: Path, slots: int) -> None:
        env = {**os.environ, "FIELDREG_HUB_DATA_DIR": str(settings.data_dir)}
        if settings.database_url:
            env["FIELDREG_HUB_DATABASE_URL"] = settings.database_url
        self.log_path = log_path
        self._log = log_path.open("ab")
        self._slots = [HubProcess(free_port(), env, self._log) for _ in range(slots)]
        self._live = 0
        self._lock = threading.Lock()
        self.kills = 0
        self.waited_s = 0.0

    def __enter__(self) -> HubRotation:
        for slot in self._slots:
            slot.start()
        for slot in self._slots:
            slot.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        with self._lock:
            return self._slots[self._live].url

    def kill_live(self) -> None:
        """Kill the serving process, move traffic to the next one, restart the killed one."""
        victim = self._slots[self._live]
        successor = (self._live + 1) % len(self._slots)
        t0 = time.monotonic()
        self._slots[successor].wait_ready()
        self.waited_s += time.monotonic() - t0
        victim.kill()
        self.kills += 1
        with self._lock:
            self._live = successor
        victim.start()

    def stop(self) -> None:
        """The last stop is a kill too: nothing gets a chance to tidy up."""
        for slot in self._slots:
            slot.kill()
        self._log.close()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


# -- devices that keep registering and syncing ------------------------------------------------
@dataclass
class Device:
    store: Store
    rng: random.Random
    registered: list[str] = field(default_factory=list)
    unreachable: int = 0
    syncs: int = 0


def _device_state(store: Store) -> dict[str, dict[str, Any]]:
    return {
        s.id: {k: v for k, v in flatten(store.get(s.id)).items() if v not in (None, [])}
        for s in store.list_records(limit=100_000)
    }


def _edits_made(store: Store) -> int:
    """Own edits: one registration or one `edit` call each, one stamp each."""
    return len({c.version for c in store.outbox(after_seq=0, limit=1_000_000)})


def sync_through(
    device: Device, url: Callable[[], str], deadline: float, active: list[int], lock: threading.Lock
) -> None:
    """Sync until a run completes; a hub that dies mid-run is tried again (bounded)."""
    limits = httpx.Limits(max_keepalive_connections=0)
    while True:
        assert time.monotonic() < deadline, "a device could not finish syncing in time"
        with lock:
            active[0] += 1
        try:
            with httpx.Client(base_url=url(), limits=limits) as http:
                run_sync(
                    device.store,
                    HubClient(http, connect_timeout_s=5, read_timeout_s=30),
                    max_batch_bytes=MAX_BATCH_BYTES,
                )
            device.syncs += 1
            return
        except HubUnreachable:
            device.unreachable += 1
            time.sleep(0.02)
        finally:
            with lock:
                active[0] -= 1


def device_work(
    device: Device,
    url: Callable[[], str],
    stop: threading.Event,
    deadline: float,
    active: list[int],
    lock: threading.Lock,
) -> None:
    """Register a few people, edit one, sync; again until told to stop (bounded)."""
    for _round in range(10_000):
        if stop.is_set():
            break
        people = [RegistrationCreate.model_validate(person(device.rng)) for _ in range(4)]
        saved = device.store.register(people)
        device.registered.extend(str(r.id) for r in saved)
        target = device.rng.choice(device.registered)
        device.store.edit(target, {"occupation": f"trade {device.rng.randrange(10**6)}"})
        sync_through(device, url, deadline, active, lock)
        time.sleep(device.rng.uniform(0.1, 0.5))
    sync_through(device, url, deadline, active, lock)


def _count(conn: sa.Connection, table: str, where: str = "", **params: Any) -> int:
    stmt = sa.text(f"SELECT count(*) FROM {table}" + (f" WHERE {where}" if where else ""))
    return int(conn.execute(stmt, params).scalar_one())


def _hub_state(hub: Hub, site: str) -> dict[str, dict[str, Any]]:
    with hub.engine.connect() as conn:
        ids = [
            r[0]
            for r in conn.execute(sa.text("SELECT id FROM records WHERE site = :s"), {"s": site})
        ]
        recs = load_records(conn, ids, hub.secrets.master_key)
    return {
        rid: {p: f["v"] for p, f in rec.fields.items() if f["v"] not in (None, [])}
        for rid, rec in recs.items()
    }


def test_hub_killed_25_times_under_five_pushing_devices_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    deadline = started + TEST_BUDGET_S
    settings = init_hub(tmp_path / "hub")
    sites = ["camp-a", "camp-a", "camp-a", "camp-b", "camp-b"]
    rng = random.Random(SEED)
    stores: list[Store] = []
    with HubRotation(settings, tmp_path / "hub.log", HUB_SLOTS) as hubs:
        enrolling = Hub(settings)
        try:
            for i, site in enumerate(sites):
                store = Store.init(
                    tmp_path / f"dev{i}",
                    PASSPHRASE,
                    site=site,
                    operator=f"op{i}",
                    kdf_memory_kib=1024,
                )
                stores.append(store)
                code = enrolling.create_enrol_code(
                    [site], timedelta(hours=1), request_id="test-enrol"
                )
                with httpx.Client(base_url=hubs.url) as http:
                    enrol(store, HubClient(http), code=code)
        finally:
            enrolling.engine.dispose()
        devices = [Device(s, random.Random(rng.randrange(2**32))) for s in stores]
        stop = threading.Event()
        errors: list[BaseException] = []
        active = [0]
        lock = threading.Lock()

        def run(device: Device) -> None:
            try:
                device_work(device, lambda: hubs.url, stop, deadline, active, lock)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(d,), daemon=True) for d in devices]
        for t in threads:
            t.start()
        try:
            for _ in range(HUB_KILLS):
                time.sleep(rng.uniform(0.1, 0.6))
                # Die while a device is mid-sync, not between syncs.
                while active[0] == 0 and not errors and time.monotonic() < deadline:
                    time.sleep(0.002)
                if errors:
                    break
                hubs.kill_live()
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=max(1.0, deadline - time.monotonic()))
        kill_phase_s = time.monotonic() - started
        assert not errors, f"{errors[0]!r}\n--- hub log ---\n{hubs.log_tail()}"
        assert not any(t.is_alive() for t in threads), "a device did not finish"
        assert hubs.kills == HUB_KILLS
        # Everyone pulls what the others pushed last.
        for device in devices:
            sync_through(device, lambda: hubs.url, deadline, [0], lock)
    # Every hub process is dead now (SIGKILL, like all the others).
    with sqlite3.connect(settings.data_dir / "hub.db") as raw:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    hub = Hub(settings)
    try:
        with hub.engine.connect() as conn:
            registered = [rid for d in devices for rid in d.registered]
            held = {r[0] for r in conn.execute(sa.text("SELECT id FROM records"))}
            assert set(registered) <= held, f"lost {len(set(registered) - held)} records"
            assert len(held) == len(registered) == len(set(registered))
            assert _count(conn, "changes") == sum(_edits_made(d.store) for d in devices)
            for d in devices:
                assert d.store.sync.pending_count() == 0
                high_water = conn.execute(
                    sa.text("SELECT high_water FROM devices WHERE id = :d"),
                    {"d": d.store.device_id},
                ).scalar_one()
                assert high_water == d.store.sync.pushed_seq()
            assert _count(conn, "quarantine") == 0
            assert audit.verify(conn, hub.public_keys.signing_public_key()).is_intact
        for site in sorted(set(sites)):
            at_hub = _hub_state(hub, site)
            for d in devices:
                if d.store.site == site:
                    assert _device_state(d.store) == at_hub
    finally:
        hub.engine.dispose()
        for s in stores:
            s.close()
    print(
        f"\n{HUB_KILLS} hub kills in {time.monotonic() - started:.1f} s;"
        f" {len(registered)} people, {sum(d.syncs for d in devices)} syncs,"
        f" {sum(d.unreachable for d in devices)} interrupted; kill phase {kill_phase_s:.1f} s,"
        f" waiting for a standby {hubs.waited_s:.1f} s"
    )


# -- the device CLI, killed ---------------------------------------------------------------------
def _cli(data_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    """Start `fieldreg ARGS` on the store in `data_dir`; stderr goes to `data_dir`/cli.log."""
    env = {
        **os.environ,
        "FIELDREG_HOME": str(data_dir),
        "FIELDREG_PASSPHRASE": PASSPHRASE,
        "COLUMNS": "200",
    }
    with (data_dir.parent / "cli.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "field_client", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def _cli_log(data_dir: Path) -> str:
    return (data_dir.parent / "cli.log").read_text(errors="replace")[-4000:]


def _kill(proc: subprocess.Popen[bytes]) -> bool:
    """SIGKILL `proc` (by its pid); return whether it was still running."""
    running = proc.poll() is None
    if running:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return running


@dataclass(frozen=True)
class StoreCheck:
    own_records: int
    device_seq: int
    pushed_seq: int


def check_store(data_dir: Path) -> StoreCheck:
    """Open the store as a user would, prove its file intact and its outbox whole.

    Also checkpoints the WAL to zero bytes, so the next run's writes show as growth.
    """
    with Store.open(data_dir, PASSPHRASE) as store:
        conn = store._conn
        with conn.begin():
            assert conn.exec_driver_sql("PRAGMA integrity_check").all() == [("ok",)]
            own = conn.exec_driver_sql(
                "SELECT count(*) FROM records WHERE origin_device = ?", (store.device_id,)
            ).scalar_one()
            logged = conn.exec_driver_sql(
                "SELECT count(DISTINCT record_id), max(device_seq), count(*) FROM changes"
                " WHERE device_seq IS NOT NULL"
            ).one()
            meta: dict[str, str] = {
                str(k): str(v) for k, v in conn.exec_driver_sql("SELECT key, value FROM meta")
            }
        # Each own record has its outbox entries, and the sequence has no hole.
        assert logged[0] >= own
        assert int(meta["device_seq"]) == (logged[1] or 0) == logged[2]
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cursor = raw.cursor()  # outside any transaction
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        cursor.close()
        return StoreCheck(own, int(meta["device_seq"]), int(meta["pushed_seq"]))


def _wal(data_dir: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        return (data_dir / "store.db-wal").stat().st_size
    return 0


def _jsonl(path: Path, rng: random.Random, count: int) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for _ in range(count):
            out.write(json.dumps(person(rng), ensure_ascii=False) + "\n")
    return path


def _new_store(data_dir: Path, site: str) -> None:
    Store.init(data_dir, PASSPHRASE, site=site, operator="Amina", kdf_memory_kib=1024).close()


def test_register_killed_mid_import_writes_all_or_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    data_dir = tmp_path / "dev"
    _new_store(data_dir, "ras-jedir")
    batch = 3000
    people = _jsonl(tmp_path / "people.jsonl", rng, batch)
    deadline = time.monotonic() + TEST_BUDGET_S
    outcomes: list[str] = []
    before = check_store(data_dir)
    for _ in range(DEVICE_KILLS):
        proc = _cli(data_dir, "register", "--json", str(people))
        # Wait until the import transaction writes (the WAL grows), then a little more.
        # Mostly early in the transaction; sometimes past its end (then it commits whole).
        grown = rng.randrange(1, (4 if rng.random() < 0.7 else 24) * 1024 * 1024)
        while proc.poll() is None and _wal(data_dir) < grown:
            assert time.monotonic() < deadline, "register neither wrote nor finished"
            time.sleep(0.001)
        was_running = _kill(proc)
        after = check_store(data_dir)
        assert after.own_records in (before.own_records, before.own_records + batch)
        assert (after.device_seq == before.device_seq) == (after.own_records == before.own_records)
        outcomes.append("none" if after.own_records == before.own_records else "all")
        if not was_running:
            assert proc.returncode == 0 and outcomes[-1] == "all"
        before = after
    print(f"\nregister kills: {outcomes}")
    # At least one kill landed inside the transaction and rolled it back.
    assert "none" in outcomes, outcomes
    # The store still takes a clean import after all that.
    proc = _cli(data_dir, "register", "--json", str(people))
    assert proc.wait(timeout=120) == 0, _cli_log(data_dir)
    assert check_store(data_dir).own_records == before.own_records + batch


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[str, Hub]]:
    with live_hub(init_hub(tmp_path / "hub")) as served:
        yield served


def test_sync_killed_mid_push_and_mid_pull_loses_nothing(
    tmp_path: Path, live: tuple[str, Hub]
) -> None:
    url, hub = live
    rng = random.Random(SEED + 2)
    site = "ras-jedir"
    # Another device registered people first: the CLI's sync has pages to pull.
    other = Store.init(tmp_path / "other", PASSPHRASE, site=site, operator="B", kdf_memory_kib=1024)
    with other, httpx.Client(base_url=url) as http:
        enrol(
            other,
            HubClient(http),
            code=hub.create_enrol_code([site], timedelta(hours=1), request_id="test-enrol"),
        )
        other.register([RegistrationCreate.model_validate(person(rng)) for _ in range(1500)])
        run_sync(other, HubClient(http))
    data_dir = tmp_path / "dev"
    _new_store(data_dir, site)
    with Store.open(data_dir, PASSPHRASE) as store, httpx.Client(base_url=url) as http:
        enrol(
            store,
            HubClient(http),
            code=hub.create_enrol_code([site], timedelta(hours=1), request_id="test-enrol"),
        )
        store.register([RegistrationCreate.model_validate(person(rng)) for _ in range(1500)])
        device_id = store.device_id

    def high_water() -> int:
        with hub.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT high_water FROM devices WHERE id = :d"), {"d": device_id}
                ).scalar_one()
            )

    deadline = time.monotonic() + TEST_BUDGET_S
    for i in range(DEVICE_KILLS):
        start_mark = high_water()
        proc = _cli(data_dir, "sync", "--max-batch-bytes", "16384")
        if i % 2 == 0:  # mid-push: once the hub has taken a few more batches
            target = start_mark + rng.randrange(1, 400)
            while proc.poll() is None and high_water() < target:
                assert time.monotonic() < deadline, "sync neither pushed nor finished"
                time.sleep(0.002)
        else:  # anywhere, pull included
            time.sleep(rng.uniform(0.5, 4.0))
        _kill(proc)
        state = check_store(data_dir)
        # The device never believes the hub has more than it has.
        assert state.pushed_seq <= high_water() <= state.device_seq
    proc = _cli(data_dir, "sync")
    assert proc.wait(timeout=120) == 0, _cli_log(data_dir)
    with Store.open(data_dir, PASSPHRASE) as store:
        assert store.sync.pending_count() == 0
        assert high_water() == store.sync.pushed_seq()
        with hub.engine.connect() as conn:
            assert _count(conn, "records") == 3000
            assert _count(conn, "changes", "device_id = :d", d=device_id) == _edits_made(store)
        assert store.status().records == 3000
        assert _device_state(store) == _hub_state(hub, site)
