"""Load: 200 simulated devices push and pull concurrently through real hub processes.

The hub runs as separate `python -m server serve` processes on 127.0.0.1 over
one database: three on PostgreSQL (when `FIELDREG_TEST_POSTGRES_URL` is set)
and one on SQLite. Each request goes to the next process in turn, so one
device's pushes land on different processes and the same record is edited
through several of them at once.

200 devices are enrolled over HTTP at five sites. They seal their own batches
(real keys, real envelopes), pull with signed requests, and keep the state a
real device would: their own edits merged locally, pulled edits merged with
`sync.merge`, their clock observing every stamp they pull. The work runs in
phases, a thread pool of `WORKERS` devices at a time, so what must hold after
each is exact:

1. enrol every device; one device per site pushes the site's shared records;
2. every device pulls (now each holds the shared records);
3. every device pushes a new record together with an edit of one field of a
   shared record, based on the version it pulled. Edits of one field in this
   phase are concurrent: a field edited by k devices must get exactly k - 1
   conflicts at the hub;
4. the first editor of each shared field pulls and edits that field again,
   based on the winner it now holds (sequential: no new conflict), while
   every other device pushes an edit of its own record;
5. every device pulls to the end.

Then: no answer >= 500 and no transport error; every change in the hub's log
exactly once per (device, sequence) and nothing else; every device's state
for its site equal to the hub's, field by field, value and version; conflicts
exactly where concurrent edits of one field were made; no quarantine; the
audit chain intact. The p50/p95 push latency is printed, never asserted.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa

from bench.people import person
from schemas.fields import flatten_doc
from schemas.record import SCHEMA_VERSION
from server import audit
from server import devices as device_store
from server.hub import EnrolRequest, Hub
from server.problems import Problem
from server.records import load_records
from sync.envelope import open_sealed
from sync.hlc import Clock, Stamp, system_ms
from sync.http_signature import sign_request
from sync.keys import KeyPairs, PublicKeys
from sync.merge import FieldState, merge_field
from sync.protocol import Edit, PullPage
from sync.transport import ENROL_PATH, PULL_PATH, PUSH_PATH
from tests.hubkit import POSTGRES_ENV, HandDevice, database_backends, fresh_database, init_hub
from tests.hubprocs import HubProcesses, hub_processes

SITES = tuple(f"load-site-{i}" for i in range(5))
DEVICES = 200
PER_SITE = DEVICES // len(SITES)
SHARED_PER_SITE = 4
SHARED_FIELDS = ("occupation", "employer", "names.given", "place_of_birth", "phone")
# A device's round among the editors of its shared record (index // SHARED_PER_SITE)
# picks the field it edits: three, two, one, one and three editors per field.
FIELD_OF_ROUND = (0, 0, 0, 1, 1, 2, 3, 4, 4, 4)
WORKERS = 24
PAGE = 500
MAX_PAGES = 50
DEADLINE_S = 300.0
POSTGRES_PROCESSES = 3


def _variants() -> list[Any]:
    found = [pytest.param("sqlite", 1, id="sqlite-1-process")]
    if os.environ.get(POSTGRES_ENV):
        found.append(
            pytest.param(
                "postgresql", POSTGRES_PROCESSES, id=f"postgresql-{POSTGRES_PROCESSES}-processes"
            )
        )
    return found


# -- a simulated device ---------------------------------------------------------------------
@dataclass
class SimDevice:
    """A device that seals its own batches and keeps the state it has merged."""

    hand: HandDevice
    index: int  # its place among the devices of its site
    rng: random.Random
    cursor: str = ""
    state: dict[str, dict[str, FieldState]] = field(default_factory=dict)
    sent: list[Edit] = field(default_factory=list)
    own_records: list[str] = field(default_factory=list)
    pushes: int = 0

    @property
    def id(self) -> str:
        return self.hand.id

    @property
    def site(self) -> str:
        return self.hand.site

    def merge(self, edit: Edit) -> None:
        rec = self.state.setdefault(edit.record_id, {})
        for path, value in edit.fields:
            incoming = FieldState(value, edit.version, edit.bases.get(path))
            rec[path] = merge_field(rec.get(path), incoming).state

    def edit(self, record_id: str, values: dict[str, Any]) -> Edit:
        """A local edit of `values`, based on the versions this device holds."""
        held = self.state.get(record_id, {})
        bases = {p: held[p].version for p in values if p in held}
        made = self.hand.edit(record_id, values, bases)
        self.merge(made)
        return made

    def new_record(self) -> Edit:
        made = self.edit(str(uuid.uuid4()), registration_fields(self, self.rng))
        self.own_records.append(made.record_id)
        return made


def registration_fields(dev: SimDevice, rng: random.Random) -> dict[str, Any]:
    """The fields of a new, valid registration at the device's site."""
    doc = person(rng)
    fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "registration": {
            "site": dev.site,
            "device_id": dev.id,
            "operator": "tester",
            "registered_at": "2026-11-29T10:00:00+00:00",
        },
    }
    fields.update(flatten_doc(doc))
    return fields


def shared_value(path: str, dev: SimDevice, step: int) -> Any:
    """A value for a shared field that no other device writes."""
    site, index = SITES.index(dev.site), dev.index
    if path == "phone":
        return f"+218 9{step} {site:03d} {index:04d}"
    return f"{path} {step} by {site}-{index}"


# -- the load driver ------------------------------------------------------------------------
class Load:
    """HTTP to the hub processes in turn, counting what went wrong and push latency."""

    def __init__(self, procs: HubProcesses, deadline: float) -> None:
        limits = httpx.Limits(max_connections=WORKERS, max_keepalive_connections=WORKERS)
        timeout = httpx.Timeout(60.0, connect=10.0)
        self.clients = [
            httpx.Client(base_url=u, timeout=timeout, limits=limits) for u in procs.urls
        ]
        self.deadline = deadline
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self.server_errors: list[str] = []
        self.transport_errors: list[str] = []
        self.requests: Counter[str] = Counter()
        self.push_latency_s: list[float] = []

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if time.monotonic() > self.deadline:
            raise TimeoutError("the load test ran past its deadline")
        with self._lock:
            client = self.clients[next(self._turn) % len(self.clients)]
        try:
            answer = client.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            with self._lock:
                self.transport_errors.append(f"{method} {url}: {exc!r}")
            raise
        with self._lock:
            self.requests[method] += 1
            if answer.status_code >= 500:
                self.server_errors.append(f"{method} {url}: {answer.status_code} {answer.text}")
        if answer.status_code != 200:
            raise AssertionError(f"{method} {url}: {answer.status_code} {answer.text}")
        return answer

    def enrol(self, hub: Hub, site: str, index: int) -> SimDevice:
        code = hub.create_enrol_code([site], timedelta(hours=1), request_id="test-enrol")
        keys = KeyPairs.generate()
        device_id = str(uuid.uuid4())
        body = {
            "code": code,
            "device_id": device_id,
            "site": site,
            "public_keys": keys.public().to_json(),
        }
        answer = self.send("POST", ENROL_PATH, json=body)
        hub_keys = PublicKeys.from_json(answer.json()["hub"]["public_keys"])
        hand = HandDevice(self.clients[0], device_id, site, keys, hub_keys)
        return SimDevice(hand, index, random.Random(f"{site}/{index}"))

    def push(self, dev: SimDevice, edits: list[Edit]) -> None:
        envelope = dev.hand.envelope(edits)
        start = time.perf_counter()
        answer = self.send(
            "POST",
            PUSH_PATH,
            content=envelope,
            headers={"content-type": "application/octet-stream"},
        )
        elapsed = time.perf_counter() - start
        ack = dev.hand.open_answer(answer)
        assert ack["duplicate"] is False and ack["high_water"] == edits[-1].last_seq, ack
        assert not ack["quarantined"], ack
        dev.sent.extend(edits)
        dev.pushes += 1
        with self._lock:
            self.push_latency_s.append(elapsed)

    def pull(self, dev: SimDevice) -> None:
        """Pull pages until the hub says there is no more, merging each."""
        for _ in range(MAX_PAGES):
            query = f"cursor={quote(dev.cursor, safe='')}&limit={PAGE}"
            headers = sign_request(
                method="GET",
                path=PULL_PATH,
                query=query,
                key_id=dev.id,
                private_key=dev.hand.keys.signing,
                created=int(time.time()),
            )
            answer = self.send("GET", f"{PULL_PATH}?{query}", headers=headers)
            opened = open_sealed(answer.content, sender=dev.hand.hub_keys, recipient=dev.hand.keys)
            assert opened.header.kind == "pull" and opened.header.recipient == dev.id
            page = PullPage.from_json(json.loads(opened.body))
            for edit in page.edits:
                assert edit.version.device_id != dev.id, "a device was sent its own edit"
                dev.hand.clock.observe(edit.version.stamp)
                dev.merge(edit)
            dev.cursor = page.cursor
            if not page.more:
                return
        raise AssertionError(f"device {dev.id} still had pages after {MAX_PAGES}")

    def phase(
        self, pool: ThreadPoolExecutor, work: Callable[[SimDevice], None], devs: list[SimDevice]
    ) -> None:
        """Run `work` for every device, `WORKERS` at a time; fail with the first errors."""
        futures = [pool.submit(work, dev) for dev in devs]
        done, pending = wait(futures, timeout=max(1.0, self.deadline - time.monotonic()))
        for future in pending:
            future.cancel()
        failures = [repr(f.exception()) for f in done if f.exception() is not None]
        assert not pending, f"{len(pending)} devices did not finish before the deadline"
        assert not failures, f"{len(failures)} devices failed, e.g. {failures[:3]}"


# -- the plan of shared edits ---------------------------------------------------------------
def shared_cell(dev: SimDevice) -> tuple[int, str] | None:
    """(shared record number, field) this device edits concurrently; None for the seeder."""
    if dev.index == 0:
        return None
    number, round_ = dev.index % SHARED_PER_SITE, dev.index // SHARED_PER_SITE
    return number, SHARED_FIELDS[FIELD_OF_ROUND[round_ % len(FIELD_OF_ROUND)]]


@dataclass
class Plan:
    shared: dict[str, list[str]]  # site -> its shared record ids, by number
    editors: dict[tuple[str, str], list[SimDevice]]  # (record, field) -> concurrent editors


def run_load(procs: HubProcesses, hub: Hub) -> tuple[list[SimDevice], Plan, Load]:
    load = Load(procs, time.monotonic() + DEADLINE_S)
    plan = Plan({}, {})
    try:
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="device") as pool:
            slots = [(site, i) for i in range(PER_SITE) for site in SITES]
            devs = list(pool.map(lambda slot: load.enrol(hub, *slot), slots))
            seeders = [d for d in devs if d.index == 0]

            def seed(dev: SimDevice) -> None:
                edits = [dev.new_record() for _ in range(SHARED_PER_SITE)]
                plan.shared[dev.site] = [e.record_id for e in edits]
                load.push(dev, edits)

            load.phase(pool, seed, seeders)
            load.phase(pool, load.pull, devs)
            for dev in devs:
                if (cell := shared_cell(dev)) is not None:
                    number, path = cell
                    key = (plan.shared[dev.site][number], path)
                    plan.editors.setdefault(key, []).append(dev)

            def concurrent(dev: SimDevice) -> None:
                edits = [dev.new_record()]
                if (cell := shared_cell(dev)) is not None:
                    number, path = cell
                    rid = plan.shared[dev.site][number]
                    edits.append(dev.edit(rid, {path: shared_value(path, dev, 1)}))
                load.push(dev, edits)

            load.phase(pool, concurrent, devs)
            followers = {editors[0].id: key for key, editors in plan.editors.items()}

            def sequential(dev: SimDevice) -> None:
                if dev.id in followers:
                    load.pull(dev)
                    rid, path = followers[dev.id]
                    edit = dev.edit(rid, {path: shared_value(path, dev, 2)})
                else:
                    edit = dev.edit(dev.own_records[-1], {"occupation": f"trade {dev.index}"})
                load.push(dev, [edit])

            load.phase(pool, sequential, devs)
            load.phase(pool, load.pull, devs)
    finally:
        load.close()
    return devs, plan, load


# -- what must hold -------------------------------------------------------------------------
def check_exactly_once(hub: Hub, devs: list[SimDevice]) -> None:
    sent = Counter((d.id, e.first_seq) for d in devs for e in d.sent)
    assert all(n == 1 for n in sent.values()), "the test sent a sequence twice"
    with hub.engine.connect() as conn:
        logged = conn.execute(
            sa.text(
                "SELECT device_id, device_seq, count(*) FROM changes GROUP BY device_id, device_seq"
            )
        ).all()
        batches = conn.execute(sa.text("SELECT count(*) FROM batches")).scalar_one()
        high_water: dict[str, int] = {
            device: mark
            for device, mark in conn.execute(sa.text("SELECT id, high_water FROM devices"))
        }
        quarantined = conn.execute(sa.text("SELECT count(*) FROM quarantine")).scalar_one()
    in_log = Counter({(device, seq): n for device, seq, n in logged})
    duplicated = [key for key, n in in_log.items() if n > 1]
    lost = sorted(set(sent) - set(in_log))
    unknown = sorted(set(in_log) - set(sent))
    assert not duplicated and not lost and not unknown, (duplicated[:3], lost[:3], unknown[:3])
    assert batches == sum(d.pushes for d in devs)
    assert {d.id: d.hand.seq for d in devs} == high_water
    assert quarantined == 0


def hub_state(hub: Hub, site: str) -> dict[str, dict[str, tuple[Any, str, str]]]:
    with hub.engine.connect() as conn:
        ids = conn.execute(sa.text("SELECT id FROM records WHERE site = :s"), {"s": site})
        recs = load_records(conn, ids.scalars().all(), hub.secrets.master_key)
    return {
        rid: {p: (f["v"], f["s"], f["d"]) for p, f in rec.fields.items()}
        for rid, rec in recs.items()
    }


def device_state(dev: SimDevice) -> dict[str, dict[str, tuple[Any, str, str]]]:
    return {
        rid: {
            p: (s.value, s.version.stamp.encode(), s.version.device_id) for p, s in fields.items()
        }
        for rid, fields in dev.state.items()
    }


def check_converged(hub: Hub, devs: list[SimDevice]) -> None:
    for site in SITES:
        expected = hub_state(hub, site)
        assert len(expected) == SHARED_PER_SITE + PER_SITE
        diverged = [d.id for d in devs if d.site == site and device_state(d) != expected]
        assert not diverged, f"{len(diverged)} devices at {site} differ from the hub"


def check_conflicts(hub: Hub, plan: Plan) -> None:
    expected = {key: len(eds) - 1 for key, eds in plan.editors.items() if len(eds) > 1}
    assert expected and any(len(eds) == 1 for eds in plan.editors.values())
    with hub.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT record_id, field, count(*) FROM conflicts GROUP BY record_id, field")
        ).all()
        chain = audit.verify(conn, hub.public_keys.signing_public_key())
    assert {(rid, path): n for rid, path, n in rows} == expected
    assert chain.is_intact, chain.reason


def check_all(hub: Hub, devs: list[SimDevice], plan: Plan, load: Load, logs: str) -> None:
    assert not load.transport_errors, load.transport_errors[:3]
    assert not load.server_errors, load.server_errors[:3]
    assert "Traceback" not in logs, logs[-4000:]
    check_exactly_once(hub, devs)
    check_converged(hub, devs)
    check_conflicts(hub, plan)


# -- the test -------------------------------------------------------------------------------
@pytest.mark.parametrize(("backend", "processes"), _variants())
def test_200_devices_through_several_hub_processes(
    backend: str, processes: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with fresh_database(backend) as url:
        hub = Hub(init_hub(tmp_path / "hub", url))
        try:
            start = time.monotonic()
            with hub_processes(hub.settings, processes, log_dir=tmp_path / "logs") as procs:
                devs, plan, load = run_load(procs, hub)
            elapsed = time.monotonic() - start
            logs = procs.logs_text()
            check_all(hub, devs, plan, load, logs)
        finally:
            hub.engine.dispose()
    latency = sorted(load.push_latency_s)
    cuts = statistics.quantiles(latency, n=20)
    with capsys.disabled():
        print(
            f"\n[load {backend}, {processes} hub process(es), {len(devs)} devices] "
            f"{sum(load.requests.values())} requests ({load.requests['POST']} POST, "
            f"{load.requests['GET']} GET) in {elapsed:.1f} s; "
            f"push latency p50 {statistics.median(latency) * 1000:.0f} ms, "
            f"p95 {cuts[18] * 1000:.0f} ms"
        )


# -- what several processes share -----------------------------------------------------------
# Two `Hub` objects on one database stand for two hub processes: each has its
# own engine, clock and connection pool, as a process would.
@pytest.mark.parametrize("backend", database_backends())
def test_one_enrol_code_enrols_one_device_even_through_two_processes(
    backend: str, tmp_path: Path
) -> None:
    with fresh_database(backend) as url:
        settings = init_hub(tmp_path / "hub", url)
        first, second = Hub(settings), Hub(settings)
        try:
            code = first.create_enrol_code(["s"], timedelta(hours=1), request_id="test-enrol")
            keys = KeyPairs.generate().public().to_json()
            started, outcome = threading.Event(), {}

            def enrol_elsewhere() -> None:
                started.set()
                try:
                    second.enrol(EnrolRequest(code, str(uuid.uuid4()), "s", keys))
                    outcome["second"] = "enrolled"
                except Problem as exc:
                    outcome["second"] = exc.code

            other = threading.Thread(target=enrol_elsewhere)
            with first.engine.begin() as conn:
                device_store.redeem_code(
                    conn,
                    code=code,
                    device_id=str(uuid.uuid4()),
                    site="s",
                    public_keys=keys,
                    now=first.now(),
                )
                other.start()
                started.wait(10)
                time.sleep(0.5)  # the second process reads the code before the first commits
            other.join(60)
            assert outcome == {"second": "enrol.code_invalid"}
            with first.engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM devices")).scalar_one() == 1
        finally:
            first.engine.dispose()
            second.engine.dispose()


@pytest.mark.parametrize("backend", database_backends())
def test_the_hub_clock_stored_by_several_processes_never_goes_back(
    backend: str, tmp_path: Path
) -> None:
    with fresh_database(backend) as url:
        settings = init_hub(tmp_path / "hub", url)
        now = system_ms()
        ahead, behind = Hub(settings, wall_ms=lambda: now), Hub(settings, wall_ms=lambda: now)
        try:
            with httpx.Client() as unused:

                def device(hub: Hub, skew_ms: int) -> HandDevice:
                    keys = KeyPairs.generate()
                    code = hub.create_enrol_code(["s"], timedelta(hours=1), request_id="test-enrol")
                    request = EnrolRequest(code, str(uuid.uuid4()), "s", keys.public().to_json())
                    hub_keys = PublicKeys.from_json(hub.enrol(request)["hub"]["public_keys"])
                    clock = Clock(wall_ms=lambda: now + skew_ms)
                    return HandDevice(unused, request.device_id, "s", keys, hub_keys, clock=clock)

                fast, slow = device(ahead, 30_000), device(behind, 0)
                fast_edit = fast.new_record("Amina")
                ahead.push(fast.envelope([fast_edit]))  # this process's clock follows it
                behind.push(slow.envelope([slow.new_record("Yusuf")]))  # this one's did not
            with behind.engine.connect() as conn:
                stored = Stamp.decode(device_store.get_meta(conn, "hlc") or "")
            assert stored >= fast_edit.version.stamp
            restarted = Hub(settings, wall_ms=lambda: now)
            assert restarted.clock.now() > fast_edit.version.stamp
            restarted.engine.dispose()
        finally:
            ahead.engine.dispose()
            behind.engine.dispose()
