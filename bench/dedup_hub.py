"""The hub's duplicate checks at scale: checking one new record against an
indexed population, and a full `dedup scan`, on SQLite."""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.dedup_data import generate
from schemas.fields import FIELD_PATHS, flatten_doc
from server import dedup_check, dedup_scan
from server.admin import initialise
from server.hub import Hub
from server.records import HubRecord, save_records
from server.settings import HubSettings
from sync.changes import Version
from sync.hlc import Stamp
from sync.merge import FieldState

__all__ = ["populate", "run"]


def _flat(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten_doc(doc).items() if k in FIELD_PATHS}


def populate(hub: Hub, docs: list[tuple[str, dict[str, Any], str]], *, chunk: int = 2_000) -> float:
    """Store records directly (sealed state, projections, blocking index): the
    population a hub would hold after syncing them. Returns seconds taken."""
    start = time.perf_counter()
    version = Version(Stamp(1, 0), "bench")
    now = datetime.now(UTC)
    for i in range(0, len(docs), chunk):
        recs: dict[str, HubRecord] = {}
        for rid, doc, site in docs[i : i + chunk]:
            rec = HubRecord.new(rid, hub.secrets.master_key)
            registration = {
                "site": site,
                "device_id": "bench",
                "operator": "b",
                "registered_at": now.isoformat(),
            }
            for path, value in {**_flat(doc), "registration": registration}.items():
                rec.set(path, FieldState(value, version), "bench")
            recs[rid] = rec
        with hub.engine.begin() as conn:
            save_records(conn, recs.values(), now=now)
            dedup_check.index_records(conn, recs, index=hub.block_index)
    return time.perf_counter() - start


def _hub(root: Path) -> Hub:
    settings = HubSettings(data_dir=root)
    initialise(settings, admin="admin", admin_password="bench admin password")
    return Hub(settings)


def bench_single_check(persons: int, probes: int = 200) -> dict[str, float]:
    labelled = generate(persons, seed=3)
    docs = [
        (f"{i:08d}-0000-7000-8000-000000000000", lab.doc, lab.site)
        for i, lab in enumerate(labelled)
    ]
    held, fresh = docs[:-probes], docs[-probes:]
    with tempfile.TemporaryDirectory(prefix="fieldreg-dedup-") as tmp:
        hub = _hub(Path(tmp))
        populate_s = populate(hub, held)
        populate(hub, fresh)
        latencies = []
        for rid, _, _ in fresh:
            start = time.perf_counter()
            with hub.engine.begin() as conn:
                dedup_check.check_records(
                    conn,
                    [rid],
                    index=hub.block_index,
                    master_key=hub.secrets.master_key,
                    now=datetime.now(UTC),
                    cache=hub.profiles,
                )
            latencies.append((time.perf_counter() - start) * 1000)
        hub.engine.dispose()
    latencies.sort()
    return {
        "records_held": len(held),
        "populate_s": populate_s,
        "median_ms": statistics.median(latencies),
        "p95_ms": latencies[int(len(latencies) * 0.95) - 1],
    }


def bench_full_scan(persons: int, workers: int) -> dict[str, float]:
    labelled = generate(persons, seed=4)
    docs = [
        (f"{i:08d}-0000-7000-8000-000000000000", lab.doc, lab.site)
        for i, lab in enumerate(labelled)
    ]
    with tempfile.TemporaryDirectory(prefix="fieldreg-scan-") as tmp:
        hub = _hub(Path(tmp))
        populate(hub, docs)
        start, cpu = time.perf_counter(), _cpu_s()
        with hub.engine.connect() as conn:
            ids = dedup_check.all_record_ids(conn)
        queued = dedup_scan.scan(
            hub.engine, ids, master_key=hub.secrets.master_key, cache=hub.profiles, workers=workers
        )
        scan_s, cpu_s = time.perf_counter() - start, _cpu_s() - cpu
        hub.engine.dispose()
    return {"records": len(docs), "scan_s": scan_s, "cpu_s": cpu_s, "pairs_queued": queued}


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (scan workers)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run() -> dict[str, dict[str, float]]:
    # FIELDREG_BENCH_CHECK_PERSONS=570000 holds about 1,000,000 records (the
    # issue's size for the single check; about an hour on a shared 2-core box).
    persons = int(os.environ.get("FIELDREG_BENCH_CHECK_PERSONS", "55000"))
    scan_persons = int(os.environ.get("FIELDREG_BENCH_SCAN_PERSONS", "55000"))  # 97,251 records
    return {
        f"check one new record against the records of {persons:,} persons"
        " (target at 1M records: p95 <= 20 ms)": bench_single_check(persons),
        "full dedup scan, 2 worker processes (target: 100k records <= 60 s on 2 cores)": (
            bench_full_scan(scan_persons, workers=2)
        ),
    }
