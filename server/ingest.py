"""Applying one push batch at the hub, in one transaction.

The decisions are `sync.merge.merge_field`'s; this module loads what they
need, applies what they return, and writes the change log, conflicts,
quarantine, the device's high-water mark and the stored acknowledgement.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa

from schemas.fields import KNOWN_PATHS, is_path_shaped, kept_value_error, other_path_error
from schemas.record import SCHEMA_VERSION
from server.bulk import insert_rows, mark, rows_in
from server.db import write_lock
from server.field_checks import edit_field_error
from server.models import (
    Batch,
    ChangeRow,
    ConflictRow,
    Device,
    HubMeta,
    QuarantineRow,
    ReleasedEdit,
)
from server.problems import Problem
from server.records import HubRecord, load_records, save_records
from server.sealing import compact_json
from sync.envelope import Header
from sync.hlc import Clock
from sync.merge import Decision, FieldState, Outcome, merge_field
from sync.protocol import Ack, Edit, ProtocolError, loads

__all__ = ["DeviceRevoked", "PushContext", "apply_parked", "apply_push", "parked_edits"]

batches = Batch.__table__  # type: ignore[attr-defined]
changes = ChangeRow.__table__  # type: ignore[attr-defined]
conflicts = ConflictRow.__table__  # type: ignore[attr-defined]
devices = Device.__table__  # type: ignore[attr-defined]
quarantine = QuarantineRow.__table__  # type: ignore[attr-defined]
hub_meta = HubMeta.__table__  # type: ignore[attr-defined]
released = ReleasedEdit.__table__  # type: ignore[attr-defined]

_UNKNOWN = "record.unknown"
_DAY_MS = 86_400_000
_LOG_COLUMNS = (
    "hub_seq",
    "record_id",
    "site",
    "device_id",
    "device_seq",
    "stamp",
    "operator",
    "batch_id",
    "sealed",
    "outcomes",
    "received_at",
)
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


class DeviceRevoked(Exception):
    """The pushing device was revoked before its batch could be applied."""


@dataclass
class PushContext:
    """Everything `apply_push` needs about one verified, opened push envelope."""

    device_id: str
    sites: frozenset[str]
    header: Header
    body: bytes
    digest: str
    envelope: bytes
    master_key: bytes
    clock: Clock
    now: datetime
    hub_now_ms: int
    # An edit stamped further ahead of `hub_now_ms` is quarantined (`_stamp_reason`).
    refuse_ahead_ms: int
    epoch: str
    quarantined: list[list[Any]] = field(default_factory=list)
    # Filled by `apply_push`: the records, as merged and saved, that an applied
    # edit wrote names to; what the name index needs, so the caller does not
    # read and unseal them again.
    renamed: dict[str, HubRecord] = field(default_factory=dict)
    # Filled by `apply_push`: every record an applied edit changed, as saved.
    touched: dict[str, HubRecord] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)  # records the batch registered


@dataclass
class _Pending:
    """What merging a batch produced, before it is written."""

    log_rows: list[tuple[Any, ...]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # device seqs of each log row
    hub_seqs: list[int] = field(default_factory=list)  # numbered when written
    conflicts: list[tuple[int, HubRecord, str, Decision, tuple[str, str]]] = field(
        default_factory=list
    )
    quarantine_rows: list[dict[str, Any]] = field(default_factory=list)
    superseded: list[int] = field(default_factory=list)
    conflict_seqs: list[int] = field(default_factory=list)
    quarantined: list[tuple[int, str]] = field(default_factory=list)


def _parse_edits(body: bytes) -> list[Edit]:
    try:
        data = loads(body)
    except ValueError:
        raise Problem(400, "batch.malformed", "the batch body is not JSON") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("edits"), list)
        or set(data) != {"edits"}
    ):
        raise Problem(400, "batch.malformed", 'the batch body must be {"edits": [...]}')
    try:
        return [Edit.from_json(raw) for raw in data["edits"]]
    except ProtocolError as exc:
        raise Problem(400, "batch.malformed", f"an edit is malformed: {exc.detail}") from None


def _check_sequence(edits: list[Edit], header: Header, device_id: str) -> None:
    expected = header.seq_first
    for edit in edits:
        if edit.version.device_id != device_id:
            raise Problem(400, "batch.malformed", "a device may only push its own edits")
        if edit.first_seq != expected:
            raise Problem(400, "batch.malformed", f"edits must number the sequence from {expected}")
        expected += len(edit.fields)
    if not edits or expected - 1 != header.seq_last:
        raise Problem(400, "batch.malformed", "the edits do not cover the header's sequence range")


def _unknown_path_reason(paths: list[str], schema_version: int) -> str | None:
    """Why fields this schema does not know make an edit poison, or None to keep them.

    From a device on an older schema version they are fields it had and a later
    version retired or renamed: kept as they are (see `schemas.fields`). From a
    device on this version they are a bug, never data to keep.
    """
    for path in paths:
        problem = other_path_error(path)
        if problem is None and schema_version >= SCHEMA_VERSION:
            problem = f"not a field of schema version {SCHEMA_VERSION}"
        if problem:
            # The reason is stored in clear: a path that is not shaped like a
            # field name may hold anything a faulty device wrote, so it is not named.
            named = path if is_path_shaped(path) else "a path"
            return f"field.unknown: {named}: {problem}"
    return None


def _stamp_reason(edit: Edit, hub_now_ms: int, refuse_ahead_ms: int) -> str | None:
    """Why an edit's stamp is too far ahead of the hub's clock to take, or None.

    The hub's own clock follows a device at most `clock_max_ahead_ms` (60 s),
    and device clocks a day, or a mistyped year, off are expected and taken;
    but every device that pulls an edit follows its stamp, whatever it is. One
    stamped at the last stamp the format holds would drag every clock of its
    sites there and leave them no stamp to go on with. The bound is wide
    (years): a device's clock keeps the highest stamp it made, so one that ran
    past the bound stays past it after its clock is set right, and its edits
    stay in quarantine.
    """
    ahead_ms = edit.version.stamp.wall_ms - hub_now_ms
    if ahead_ms <= refuse_ahead_ms:
        return None
    return (
        f"clock.ahead: stamped {ahead_ms / _DAY_MS:.1f} days ahead of the hub's clock"
        f" (at most {refuse_ahead_ms / _DAY_MS:g} taken): kept here, not applied"
    )


def _poison_reason(
    edit: Edit, rec: HubRecord | None, sites: frozenset[str], schema_version: int
) -> str | None:
    values = dict(edit.fields)
    if rec is None and "registration" not in values:
        return "record.unknown: the first edit of a record must carry its registration"
    if not values.keys() <= KNOWN_PATHS:
        unknown = [path for path, _ in edit.fields if path not in KNOWN_PATHS]
        reason = _unknown_path_reason(unknown, schema_version)
        if reason:
            return reason
        for path in unknown:  # kept as sent: only their nesting is bounded
            too_deep = kept_value_error(values[path])
            if too_deep:
                return f"field.invalid: {path}: {too_deep}"
    problem = edit_field_error(edit.fields, values)
    if problem:
        return f"field.invalid: {problem[0]}: {problem[1]}"
    # Both the site the edit names and the one the record is at must be the
    # device's: otherwise a registration naming its own site would move (and
    # overwrite) another site's record.
    if "registration" in values:
        site = values["registration"].get("site")
        if site not in sites:
            return f"site.out_of_scope: this device does not serve site {site!r}"
    if rec is not None and rec.site not in sites:
        return f"site.out_of_scope: this device does not serve site {rec.site!r}"
    # A registration stays at the site it was made at (devices never edit it):
    # a record that moved would reach the new site's devices without the edits
    # logged before, and the old site's would never hear of the move.
    if rec is not None and "registration" in values and rec.site is not None:
        site = values["registration"].get("site")
        if site != rec.site:
            return (
                f"site.fixed: a registration stays at its site {rec.site!r};"
                f" register the person at {site!r} (the duplicate check links them)"
            )
    return None


def _stored_ack(conn: sa.Connection, ctx: PushContext) -> dict[str, Any] | None:
    stmt = sa.select(batches.c.digest, batches.c.ack).where(
        batches.c.device_id == ctx.device_id, batches.c.batch_id == ctx.header.batch_id
    )
    row = conn.execute(stmt).first()
    if row is None:
        return None
    if row.digest != ctx.digest:
        raise Problem(409, "batch.id_reused", "this batch id was already used for other content")
    ack: dict[str, Any] = json.loads(row.ack)
    # The stored ack may come from before a restore: the epoch is the hub's now.
    return {**ack, "duplicate": True, "epoch": ctx.epoch}


def apply_push(conn: sa.Connection, ctx: PushContext) -> dict[str, Any]:
    """Apply a push batch; return the acknowledgement (also stored for retries).

    Raises `Problem` for a batch that cannot be taken as a whole (gap, replay,
    reused id, malformed); then nothing is stored. An edit that cannot be
    applied on its own (poison) is quarantined and the rest applies. Raises
    `DeviceRevoked` when the device is revoked by the time the write lock is
    held (the caller checked before, but a push may wait long for the lock).
    """
    write_lock(conn)
    device = conn.execute(
        sa.select(devices.c.high_water, devices.c.revoked_at).where(devices.c.id == ctx.device_id)
    ).one()
    if device.revoked_at is not None:
        raise DeviceRevoked(ctx.device_id)
    stored = _stored_ack(conn, ctx)
    if stored is not None:
        return stored
    header = ctx.header
    high_water = device.high_water
    if header.seq_first > high_water + 1:
        raise Problem(
            409,
            "batch.gap",
            f"expected sequence {high_water + 1} next",
            expected_seq=high_water + 1,
        )
    if header.seq_last <= high_water:
        raise Problem(
            409, "envelope.replayed", "these changes were already applied", high_water=high_water
        )
    edits = _parse_edits(ctx.body)
    _check_sequence(edits, header, ctx.device_id)
    pending = _apply_edits(conn, ctx, _drop_applied(edits, high_water))
    conn.execute(
        sa.update(devices)
        .where(devices.c.id == ctx.device_id)
        .values(
            high_water=header.seq_last,
            last_contact_at=ctx.now,
            clock_offset_ms=header.sent_at_ms - ctx.hub_now_ms,
        )
    )
    ack = Ack(
        batch_id=header.batch_id,
        high_water=header.seq_last,
        is_duplicate=False,
        epoch=ctx.epoch,
        hub_time_ms=ctx.hub_now_ms,
        superseded=tuple(pending.superseded),
        conflicts=tuple(pending.conflict_seqs),
        quarantined=tuple(pending.quarantined),
    ).to_json()
    conn.execute(
        sa.insert(batches).values(
            device_id=ctx.device_id,
            batch_id=header.batch_id,
            digest=ctx.digest,
            seq_first=header.seq_first,
            seq_last=header.seq_last,
            received_at=ctx.now,
            ack=_JSON.encode(ack),
        )
    )
    # Several hub processes share this row: keep the latest stamp any of them saw.
    # (Fixed-width lower-case hex: text order is stamp order.)
    last = ctx.clock.last.encode()
    conn.execute(
        sa.update(hub_meta)
        .where(hub_meta.c.key == "hlc", hub_meta.c.value < last)
        .values(value=last)
    )
    return ack


def _apply_edits(conn: sa.Connection, ctx: PushContext, edits: list[Edit]) -> _Pending:
    """Merge `edits` into their records and write the log, conflicts, quarantine
    and records; fills `ctx.renamed`, `ctx.touched` and `ctx.created`."""
    recs = load_records(conn, (e.record_id for e in edits), ctx.master_key)
    pending = _Pending()
    for edit in edits:
        if _merge_edit(ctx, edit, recs, pending) and any(
            path.startswith("names.") for path, _ in edit.fields
        ):
            ctx.renamed[edit.record_id] = recs[edit.record_id]
    hub_seqs = pending.hub_seqs = _next_hub_seqs(conn, len(pending.log_rows))
    log_rows = [(seq, *row) for seq, row in zip(hub_seqs, pending.log_rows, strict=True)]
    for seq, record_id, *_ in log_rows:
        recs[record_id].last_hub_seq = seq
    insert_rows(conn, changes, _LOG_COLUMNS, log_rows)
    _insert_conflicts(conn, ctx, pending.conflicts, hub_seqs)
    if pending.quarantine_rows:
        conn.execute(sa.insert(quarantine), pending.quarantine_rows)
    ctx.touched = {rid: rec for rid, rec in recs.items() if rec.is_dirty}
    ctx.created = [rid for rid, rec in ctx.touched.items() if rec.is_new]
    save_records(conn, recs.values(), now=ctx.now)
    return pending


class ParkedEdit(NamedTuple):
    """A quarantine row holding an edit that waits for its record (`parked_edits`)."""

    id: int
    device_id: str
    batch_id: str | None
    record_id: str
    payload: bytes


def parked_edits(conn: sa.Connection, record_ids: Iterable[str]) -> list[ParkedEdit]:
    """Quarantined edits that waited for these records to be registered
    (`record.unknown`): what a device sent again after a hub restore before the
    registration's own device did. Oldest first."""
    sql = (
        "SELECT id, device_id, batch_id, record_id, payload FROM quarantine"
        f" WHERE reason = {mark(conn)} AND record_id IN ({{marks}})"
    )
    rows = rows_in(conn, sql, sorted(set(record_ids)), before=(_UNKNOWN,))
    return sorted((ParkedEdit(*row) for row in rows), key=lambda row: row.id)


def apply_parked(conn: sa.Connection, ctx: PushContext, record_id: str) -> int:
    """Apply the edits of `record_id` held in the parked batch `ctx` (opened and
    verified by the caller; the device is the one that sent it), now that the
    record exists, and release them from quarantine. Returns the edits applied.

    Each edit applied is noted in `released_edits` for the device that sent
    it: its own edits never come back in its pull pages, so that is how it
    learns they are no longer held (`server.feed.released_for`)."""
    edits = [e for e in _parse_edits(ctx.body) if e.record_id == record_id]
    pending = _apply_edits(conn, ctx, edits)
    spans = zip(pending.hub_seqs, pending.spans, strict=True)
    insert_rows(
        conn,
        released,
        ("device_id", "hub_seq", "first_seq", "last_seq"),
        [(ctx.device_id, seq, first, last) for seq, (first, last) in spans],
    )
    conn.execute(
        sa.delete(quarantine).where(
            quarantine.c.reason == _UNKNOWN,
            quarantine.c.record_id == record_id,
            quarantine.c.device_id == ctx.device_id,
            quarantine.c.batch_id == ctx.header.batch_id,
        )
    )
    return len(edits)


def _merge_edit(
    ctx: PushContext, edit: Edit, recs: dict[str, HubRecord], pending: _Pending
) -> bool:
    """Merge one edit into its record and queue its log row; or quarantine it.

    Returns whether it was merged (False: quarantined).
    """
    first_seq = edit.first_seq
    assert first_seq is not None
    rec = recs.get(edit.record_id)
    reason = _stamp_reason(edit, ctx.hub_now_ms, ctx.refuse_ahead_ms) or _poison_reason(
        edit, rec, ctx.sites, ctx.header.schema_version
    )
    if reason is not None:
        pending.quarantine_rows.append(_quarantine_row(ctx, edit, reason))
        seqs = range(first_seq, first_seq + len(edit.fields))
        pending.quarantined.extend((seq, reason) for seq in seqs)
        return False
    if rec is None:
        rec = recs[edit.record_id] = HubRecord.new(edit.record_id, ctx.master_key)
    ctx.clock.observe(edit.version.stamp)
    version, operator, bases = edit.version, edit.operator, edit.bases
    stamp, device_id = version.stamp.encode(), version.device_id
    based = {p: b.to_json() for p, b in bases.items()}  # as stored and logged
    # The fields that did not simply apply (JSON writes an `Outcome` as its value):
    # most edits apply whole, and the log stores "{}" for them.
    outcomes: dict[str, str] = {}
    held = rec.fields
    for offset, (path, value) in enumerate(edit.fields):
        if path not in held:
            # Never written: `merge_field` applies it whatever it is; skip
            # building the states it would compare (a new record's every field).
            rec.put(path, value, stamp, device_id, based.get(path), operator)
            continue
        decision = merge_field(rec.state(path), FieldState(value, version, bases.get(path)))
        outcome = decision.outcome
        if decision.conflict:
            outcomes[path] = "conflict"
            pending.conflict_seqs.append(first_seq + offset)
            authors = (str(rec.fields[path].get("o", "")), operator)
            pending.conflicts.append((len(pending.log_rows), rec, path, decision, authors))
        elif outcome is not Outcome.APPLIED:
            outcomes[path] = outcome
            if outcome is Outcome.SUPERSEDED:
                pending.superseded.append(first_seq + offset)
        if outcome is Outcome.APPLIED:
            rec.put(path, value, stamp, device_id, based.get(path), operator)
    rec.is_dirty = True
    pending.spans.append((first_seq, first_seq + len(edit.fields) - 1))
    # JSON writes the (path, value) pairs as [path, value] lists.
    sealed = rec.cipher.seal_json(compact_json({"f": edit.fields, "b": based}), "change")
    pending.log_rows.append(
        (
            rec.id,
            rec.site or "",
            ctx.device_id,
            first_seq,
            stamp,
            operator,
            ctx.header.batch_id,
            sealed,
            _JSON.encode(outcomes) if outcomes else "{}",
            ctx.now,
        )
    )
    return True


def _drop_applied(edits: list[Edit], high_water: int) -> list[Edit]:
    # A batch re-cut after a crash may overlap what the hub already has:
    # apply only the fields above the high-water mark.
    fresh: list[Edit] = []
    for edit in edits:
        assert edit.first_seq is not None
        skip = max(0, high_water - edit.first_seq + 1)
        if skip >= len(edit.fields):
            continue
        if skip:
            kept = edit.fields[skip:]
            edit = Edit(
                edit.record_id,
                edit.version,
                edit.operator,
                kept,
                {p: b for p, b in edit.bases.items() if p in dict(kept)},
                edit.first_seq + skip,
            )
        fresh.append(edit)
    return fresh


def _next_hub_seqs(conn: sa.Connection, count: int) -> list[int]:
    """`count` hub sequence numbers for new change-log rows, in increasing order.

    The caller holds the write lock, so no other writer takes numbers until it
    commits: the numbers follow commit order, which pulls rely on. PostgreSQL
    draws them from the column's sequence (other writers that let the column
    default still get fresh numbers); SQLite numbers after the largest, as its
    own rowid assignment would.
    """
    if not count:
        return []
    if conn.dialect.name == "postgresql":
        drawn = conn.exec_driver_sql(
            "SELECT nextval(pg_get_serial_sequence('changes', 'hub_seq'))"
            " FROM generate_series(1, %s)",
            (count,),
        )
        return sorted(int(seq) for seq in drawn.scalars())
    last = conn.exec_driver_sql("SELECT max(hub_seq) FROM changes").scalar()
    start = int(last or 0) + 1
    return list(range(start, start + count))


def _side(state: FieldState, operator: str) -> dict[str, Any]:
    version = state.version
    return {"v": state.value, "s": version.stamp.encode(), "d": version.device_id, "o": operator}


def _insert_conflicts(
    conn: sa.Connection,
    ctx: PushContext,
    pending: list[tuple[int, HubRecord, str, Decision, tuple[str, str]]],
    hub_seqs: list[int],
) -> None:
    rows = []
    for log_index, rec, path, decision, (current_operator, incoming_operator) in pending:
        assert decision.conflict is not None
        current, incoming = decision.conflict.current, decision.conflict.incoming
        winner, loser = decision.conflict.winner, decision.conflict.loser
        payload = {
            "field": path,
            "current": _side(current, current_operator),
            "incoming": _side(incoming, incoming_operator),
            "base": incoming.base.to_json() if incoming.base else None,
        }
        rows.append(
            {
                "record_id": rec.id,
                "site": rec.site or "",
                "field": path,
                "status": "open",
                "winner_stamp": winner.version.stamp.encode(),
                "winner_device": winner.version.device_id,
                "loser_stamp": loser.version.stamp.encode(),
                "loser_device": loser.version.device_id,
                "payload": rec.cipher.seal(payload, "conflict"),
                "opened_at": ctx.now,
                "opened_by_seq": hub_seqs[log_index],
            }
        )
    if rows:
        conn.execute(sa.insert(conflicts), rows)


def _quarantine_row(ctx: PushContext, edit: Edit, reason: str) -> dict[str, Any]:
    assert edit.first_seq is not None
    last = edit.first_seq + len(edit.fields) - 1
    return {
        "device_id": ctx.device_id,
        "batch_id": ctx.header.batch_id,
        "reason": reason.split(":", 1)[0],
        "record_id": edit.record_id,
        "detail": f"sequence {edit.first_seq}-{last} (record {edit.record_id}): {reason}",
        "payload": ctx.envelope,
        "is_sealed_envelope": True,
        "received_at": ctx.now,
    }
