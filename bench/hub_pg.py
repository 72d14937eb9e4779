"""Push ingest on PostgreSQL with one and with two hub processes, beside SQLite.

The same sealed batches go, in the same run, to three hubs: SQLite with one
process, PostgreSQL with one, and PostgreSQL with two (the devices split
between the processes, pushing at once). Every hub gets a fresh database but
the same hub keys, and the same devices (ids and keys) are enrolled in each,
so the envelopes are sealed once, before any clock starts, and every
configuration ingests byte-identical requests. The clock covers the pushes
only: HTTP, verifying and opening the envelope, merging, queueing the
records for the duplicate check (which runs once pushes pause), the audit
entry, the commit and the sealed acknowledgement. The acknowledgements are
opened and checked afterwards.

Each device keeps one batch in flight. The rounds interleave the
configurations (SQLite, PostgreSQL x1, PostgreSQL x2, then again), so a
machine busy with something else weighs on all of them alike; figures are
medians of the rounds, and ratios are of the medians. Hub CPU seconds per
1,000 records count the hub processes only, not PostgreSQL's own.

The PostgreSQL part needs a server: `FIELDREG_BENCH_POSTGRES_URL`, or else
`FIELDREG_TEST_POSTGRES_URL` (a database on it to connect to; the suite creates
and drops its own databases beside it). Without one it says so and reports
SQLite alone.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.people import person
from schemas.fields import flatten_doc
from schemas.record import SCHEMA_VERSION
from server.admin import initialise
from server.hub import EnrolRequest, Hub
from server.keystore import KEYS_FILE, MASTER_FILE, HubSecrets
from server.settings import HubSettings
from sync.changes import Version
from sync.envelope import Header, open_sealed, seal
from sync.hlc import Clock
from sync.keys import KeyPairs
from sync.protocol import Edit, dumps
from sync.transport import PUSH_PATH
from tests.hubprocs import hub_processes

__all__ = ["run"]

DEVICES = 8
BATCHES = 3
RECORDS_PER_BATCH = 50
SITE = "bench"
ENV_URLS = ("FIELDREG_BENCH_POSTGRES_URL", "FIELDREG_TEST_POSTGRES_URL")
ADMIN_PASSWORD = "bench admin password"


@dataclass(frozen=True)
class _Device:
    id: str
    keys: KeyPairs
    envelopes: list[bytes]
    last_seqs: list[int]


def _record_fields(device_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "registration": {
            "site": SITE,
            "device_id": device_id,
            "operator": "bench",
            "registered_at": "2026-11-29T10:00:00+00:00",
        },
    }
    fields.update(flatten_doc(doc))
    return fields


def _device(hub_keys: KeyPairs, rng: random.Random) -> _Device:
    """A device with `BATCHES` sealed push batches of `RECORDS_PER_BATCH` new records."""
    device_id, keys, clock = str(uuid.uuid4()), KeyPairs.generate(), Clock()
    seq, envelopes, last_seqs = 0, [], []
    for _ in range(BATCHES):
        edits = []
        for _ in range(RECORDS_PER_BATCH):
            fields = _record_fields(device_id, person(rng))
            version = Version(clock.now(), device_id)
            edit = Edit(str(uuid.uuid4()), version, "bench", tuple(fields.items()), {}, seq + 1)
            seq += len(fields)
            edits.append(edit)
        first, last = edits[0].first_seq or 1, seq
        header = Header(
            protocol=1,
            schema_version=SCHEMA_VERSION,
            kind="push",
            sender=device_id,
            recipient="hub",
            batch_id=f"{first}-{last}",
            seq_first=first,
            seq_last=last,
            sent_at_ms=clock.last.wall_ms,
            kem=hub_keys.public().kem_algorithm.value,
        )
        body = dumps({"edits": [e.to_json() for e in edits]})
        envelopes.append(seal(header, body, recipient=hub_keys.public(), sender=keys))
        last_seqs.append(last)
    return _Device(device_id, keys, envelopes, last_seqs)


# -- hubs -------------------------------------------------------------------------------------
def _postgres_admin_url() -> tuple[str | None, str]:
    """(server URL, why not) for the PostgreSQL part."""
    for name in ENV_URLS:
        if url := os.environ.get(name):
            try:
                import psycopg  # noqa: F401
            except ImportError:
                return None, "psycopg is not installed (pip install -e '.[postgres]')"
            return url, ""
    return None, f"set {ENV_URLS[0]} (or {ENV_URLS[1]}) to a PostgreSQL server"


@contextmanager
def _database(admin_url: str | None) -> Iterator[str | None]:
    """None for SQLite; else a new PostgreSQL database, dropped afterwards."""
    if admin_url is None:
        yield None
        return
    import psycopg

    name = f"fieldreg_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_url.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _hub(data_dir: Path, database_url: str | None, identity: Path) -> HubSettings:
    """A new hub on a fresh database, wearing the keys in `identity` (shared by every
    configuration, so one set of sealed envelopes opens at each)."""
    settings = HubSettings(data_dir=data_dir, database_url=database_url)
    initialise(settings, admin="admin", admin_password=ADMIN_PASSWORD)
    for name in (KEYS_FILE, MASTER_FILE):
        (data_dir / name).unlink()
        shutil.copyfile(identity / name, data_dir / name)
        (data_dir / name).chmod(0o600)
    return settings


def _enrol(settings: HubSettings, devices: list[_Device]) -> None:
    hub = Hub(settings)
    try:
        for dev in devices:
            code = hub.create_enrol_code([SITE], timedelta(hours=1), request_id="bench-enrol")
            hub.enrol(EnrolRequest(code, dev.id, SITE, dev.keys.public().to_json()))
    finally:
        hub.engine.dispose()


def _push_all(urls: list[str], devices: list[_Device]) -> tuple[float, dict[str, list[bytes]]]:
    """Every device pushes its batches in order, all devices at once, device i to
    process i mod len(urls). Returns the wall seconds and the answers."""
    answers: dict[str, list[bytes]] = {dev.id: [] for dev in devices}
    failures: list[str] = []
    ready = threading.Barrier(len(devices) + 1)

    def push(dev: _Device, url: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            ready.wait()
            for envelope in dev.envelopes:
                answer = http.post(
                    PUSH_PATH,
                    content=envelope,
                    headers={"content-type": "application/octet-stream"},
                )
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")
                    return
                answers[dev.id].append(answer.content)

    threads = [
        threading.Thread(target=push, args=(dev, urls[i % len(urls)]))
        for i, dev in enumerate(devices)
    ]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"pushes failed: {failures[:3]}")
    return elapsed, answers


def _check_acks(
    hub_keys: KeyPairs, devices: list[_Device], answers: dict[str, list[bytes]]
) -> None:
    for dev in devices:
        assert len(answers[dev.id]) == len(dev.envelopes), "a push went unanswered"
        for raw, last in zip(answers[dev.id], dev.last_seqs, strict=True):
            ack = json.loads(open_sealed(raw, sender=hub_keys.public(), recipient=dev.keys).body)
            assert ack["high_water"] == last and not ack["duplicate"] and not ack["quarantined"]


def _one_run(
    root: Path,
    identity: Path,
    devices: list[_Device],
    admin_url: str | None,
    processes: int,
) -> dict[str, float]:
    keys = HubSecrets.load(identity).keys
    with _database(admin_url) as url:
        settings = _hub(root / "hub", url, identity)
        _enrol(settings, devices)
        with hub_processes(settings, processes, log_dir=root / "logs") as procs:
            cpu_before = procs.cpu_s()
            elapsed, answers = _push_all(procs.urls, devices)
            cpu_s = procs.cpu_s() - cpu_before
    _check_acks(keys, devices, answers)
    records = len(devices) * BATCHES * RECORDS_PER_BATCH
    return {"records_per_s": records / elapsed, "hub_cpu_s_per_1000": 1000 * cpu_s / records}


def run(runs: int = 3) -> dict[str, dict[str, Any]]:
    admin_url, why_not = _postgres_admin_url()
    configs: list[tuple[str, str | None, int]] = [("sqlite_1_process", None, 1)]
    if admin_url:
        configs += [("postgres_1_process", admin_url, 1), ("postgres_2_processes", admin_url, 2)]
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory(prefix="fieldreg-hub-pg-bench-") as tmp:
        identity = Path(tmp) / "identity"
        hub_keys = HubSecrets.create(identity).keys
        rng = random.Random(6)
        devices = [_device(hub_keys, rng) for _ in range(DEVICES)]
        for i in range(runs):
            for name, url, processes in configs:
                root = Path(tmp) / f"{name}-{i}"
                results[name].append(_one_run(root, identity, devices, url, processes))
                shutil.rmtree(root, ignore_errors=True)
    figures: dict[str, Any] = {}
    for name, rows in results.items():
        for key in rows[0]:
            figures[f"{name}_{key}"] = statistics.median(r[key] for r in rows)
    base = figures["sqlite_1_process_records_per_s"]
    if admin_url:
        one, two = (
            figures["postgres_1_process_records_per_s"],
            figures["postgres_2_processes_records_per_s"],
        )
        figures["postgres_1_vs_sqlite"] = one / base
        figures["postgres_2_vs_sqlite"] = two / base
        figures["postgres_2_vs_postgres_1"] = two / one
    records = DEVICES * BATCHES * RECORDS_PER_BATCH
    title = (
        f"push ingest of {records:,} records ({DEVICES} devices x {BATCHES} batches x "
        f"{RECORDS_PER_BATCH}, one batch in flight each; median of {runs})"
    )
    out: dict[str, dict[str, Any]] = {title: figures}
    if not admin_url:
        out[f"PostgreSQL part skipped: {why_not}"] = {}
    return out
