"""Audit log benchmarks: what auditing adds to ingest (push batches of ~256 KiB
applied in-process through `Hub.push`, with and without auditing), and
`verify` over 1,000,000 entries on SQLite (target: 20 s or less)."""

from __future__ import annotations

import json
import random
import sqlite3
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.people import person
from schemas.record import SCHEMA_VERSION
from server import audit
from server.admin import initialise
from server.hub import EnrolRequest, Hub
from server.settings import HubSettings
from sync.changes import Version
from sync.envelope import Header, seal
from sync.hlc import Clock
from sync.keys import KeyPairs
from sync.protocol import Edit, dumps

__all__ = ["run"]

BATCH_BYTES = 256 * 1024
BATCHES = 20
WARMUP = 2
VERIFY_ENTRIES = 1_000_000
_START = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)


class _Device:
    """An enrolled device writing whole push envelopes itself (as tests/hubkit.py does)."""

    def __init__(self, hub: Hub, site: str = "bench") -> None:
        self.id = str(uuid.uuid4())
        self.keys = KeyPairs.generate()
        self.hub_keys = hub.public_keys
        self.seq = 0
        self.clock = Clock()
        code = hub.create_enrol_code([site], timedelta(hours=1), request_id="bench-enrol")
        hub.enrol(EnrolRequest(code, self.id, site, self.keys.public().to_json()))
        self.site = site
        self.last_batch_records = 0

    def _new_record(self, rng: random.Random) -> Edit:
        p = person(rng)
        fields: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "registration": {
                "site": self.site,
                "device_id": self.id,
                "operator": "bench",
                "registered_at": "2026-11-29T10:00:00+00:00",
            },
            "names.given": p["names"]["given"],
            "names.family": p["names"]["family"],
            "situation.scenario": "crossed_border",
            "situation.needs": ["evacuation"],
            "consent": {"given": True, "legal_basis": "consent", "scope": [], "recorded_by": "b"},
        }
        edit = Edit(
            str(uuid.uuid4()),
            Version(self.clock.now(), self.id),
            "bench",
            tuple(fields.items()),
            {},
            self.seq + 1,
        )
        self.seq += len(fields)
        return edit

    def batch(self, rng: random.Random) -> bytes:
        """One sealed push envelope of about BATCH_BYTES of edits."""
        edits: list[Edit] = []
        size = 0
        while size < BATCH_BYTES:
            edit = self._new_record(rng)
            edits.append(edit)
            size += len(dumps(edit.to_json()))
        self.last_batch_records = len(edits)
        first, last = edits[0].first_seq or 1, edits[-1].last_seq or 1
        header = Header(
            protocol=1,
            schema_version=SCHEMA_VERSION,
            kind="push",
            sender=self.id,
            recipient="hub",
            batch_id=f"{first}-{last}",
            seq_first=first,
            seq_last=last,
            sent_at_ms=self.clock.last.wall_ms,
            kem=self.hub_keys.kem_algorithm.value,
        )
        body = dumps({"edits": [e.to_json() for e in edits]})
        return seal(header, body, recipient=self.hub_keys, sender=self.keys)


def _append_ms(hub: Hub, calls: int = 2000) -> float:
    """`audit.append` alone, as push calls it, in one transaction (rolled back)."""
    with hub.engine.connect() as conn:
        start = time.perf_counter()
        for i in range(calls):
            audit.append(
                conn,
                actor=f"device:{uuid.uuid4()}",
                action="sync.push",
                target=f"batch:{i}-{i + 400}",
                request_id=uuid.uuid4().hex,
                now=datetime.now(UTC),
                signer=hub.secrets.keys,
                detail={"seq": [i, i + 400], "duplicate": False, "conflicts": 0, "quarantined": 0},
            )
        elapsed = time.perf_counter() - start
        conn.rollback()
    return elapsed / calls * 1000


def _ingest(root: Path) -> dict[str, Any]:
    """Push batches alternately with `Hub.audit_enabled` on and off (two devices,
    one hub, order flipped every pair); medians per mode after a warm-up."""
    settings = HubSettings(data_dir=root / "hub")
    initialise(settings, admin="admin", admin_password="bench admin password")
    hub = Hub(settings)
    rng = random.Random(4)
    audited, plain = _Device(hub), _Device(hub)
    pairs = [(audited.batch(rng), plain.batch(rng)) for _ in range(WARMUP + BATCHES)]
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for i, (with_audit, without) in enumerate(pairs):
            runs = [(True, with_audit), (False, without)]
            for enabled, envelope in runs if i % 2 else runs[::-1]:
                hub.audit_enabled = enabled
                start = time.perf_counter()
                hub.push(envelope)
                if i >= WARMUP:
                    times[enabled].append(time.perf_counter() - start)
        append_ms = _append_ms(hub)
    finally:
        hub.engine.dispose()
    on, off = (statistics.median(times[mode]) * 1000 for mode in (True, False))
    return {
        "batches_per_mode": BATCHES,
        "push_ms_per_batch_audited": on,
        "push_ms_per_batch_unaudited": off,
        "ingest_throughput_ratio": off / on,
        "append_ms_per_call": append_ms,
        "implied_throughput_ratio": off / (off + append_ms),
        "implied_overhead_percent": append_ms / off * 100,
        "records_per_batch": audited.last_batch_records,
    }


def _sqlite_time(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")  # how SQLAlchemy stores DateTime in SQLite


def _fill(db: Path, signer: KeyPairs, n: int) -> None:
    """Write `n` chained entries (one every 100 ms) and a checkpoint every 1,000."""
    detail = {"seq": [1, 400], "duplicate": False, "conflicts": 0, "quarantined": 0}
    detail_json = json.dumps(detail, sort_keys=True, separators=(",", ":"))
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    prev = audit.GENESIS_HASH
    rows: list[tuple[Any, ...]] = []
    marks: list[tuple[Any, ...]] = []
    for i in range(1, n + 1):
        at = _START + timedelta(milliseconds=100 * i)
        fields = {
            "actor": f"device:{i % 50:08d}",
            "action": "sync.push",
            "target": f"batch:{i}",
            "request_id": f"{i:032x}",
        }
        digest = audit.entry_hash(prev, id=i, at=at, detail=detail, **fields)
        rows.append((i, _sqlite_time(at), *fields.values(), detail_json, prev, digest))
        if i == 1 or i % audit.CHECKPOINT_EVERY == 1:
            mark_id = len(marks) + 1
            message = audit.checkpoint_message(
                checkpoint_id=mark_id, entry_id=i, entry_hash=digest, at=at
            )
            marks.append((mark_id, i, digest, _sqlite_time(at), signer.signing.sign(message).hex()))
        prev = digest
        if len(rows) == 100_000:
            _insert(conn, rows)
            rows = []
    _insert(conn, rows)
    conn.executemany("INSERT INTO audit_checkpoints VALUES (?, ?, ?, ?, ?)", marks)
    conn.execute("COMMIT")
    conn.close()


def _insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.executemany(
        "INSERT INTO audit_log (id, at, actor, action, target, request_id, detail, prev_hash,"
        " hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


def _verify(root: Path) -> dict[str, Any]:
    settings = HubSettings(data_dir=root / "verify")
    initialise(settings, admin="admin", admin_password="bench admin password")
    hub = Hub(settings)
    try:
        start = time.perf_counter()
        _fill(settings.data_dir / "hub.db", hub.secrets.keys, VERIFY_ENTRIES)
        fill_s = time.perf_counter() - start
        with hub.engine.connect() as conn:
            start = time.perf_counter()
            result = audit.verify(conn, hub.public_keys.signing_public_key())
            verify_s = time.perf_counter() - start
    finally:
        hub.engine.dispose()
    assert result.is_intact and result.entries == VERIFY_ENTRIES, result
    return {
        "entries": result.entries,
        "checkpoints": result.checkpoints,
        "generate_s": fill_s,
        "verify_s": verify_s,
        "verify_entries_per_s": VERIFY_ENTRIES / verify_s,
    }


def run() -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="fieldreg-audit-bench-") as tmp:
        return {
            "audit on/off, ~256 KiB push batches via Hub.push": _ingest(Path(tmp)),
            "verify 1,000,000 entries (SQLite)": _verify(Path(tmp)),
        }
