"""Conflicts as people review them: list, side by side, resolve, reopen. The SQL.

A resolution is a hub-authored edit like any other: it gets a fresh stamp
(above both competing versions, so it wins on every replica), goes into the
change log with a hub sequence, and devices receive it on their next pull.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from schemas.fields import field_error
from server.db import write_lock
from server.hub_edits import hub_edit
from server.models import ChangeRow, ConflictRow, RecordRow, as_utc
from server.problems import Problem
from server.records import load_records, save_records
from server.sealing import RecordCipher
from sync.hlc import Clock

__all__ = [
    "ConflictDetail",
    "ConflictSummary",
    "get_conflict",
    "list_conflicts",
    "reopen",
    "resolve",
]

conflicts = ConflictRow.__table__  # type: ignore[attr-defined]
records = RecordRow.__table__  # type: ignore[attr-defined]
changes = ChangeRow.__table__  # type: ignore[attr-defined]

# A conflict belongs to its record's site today, not the one it was opened at:
# `conflicts.site` is copied when the conflict opens and a record can move since
# (a device serving both sites sends a new `registration`). Scope, the `site`
# filter and the site shown all read `records.site`.
_SITE = records.c.site
_COLUMNS = (*(c for c in conflicts.c if c.name != "site"), _SITE)


@dataclass(frozen=True)
class ConflictSummary:
    id: int
    record_id: str
    site: str
    field: str
    status: str
    opened_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None


@dataclass(frozen=True)
class ConflictDetail:
    summary: ConflictSummary
    base: dict[str, Any] | None  # the value both authors started from, if known
    current: dict[str, Any]  # what the field held when the other write arrived
    incoming: dict[str, Any]
    provisional_winner: str  # "current" or "incoming"
    field_now: dict[str, Any] | None  # what the field holds today
    resolution: dict[str, Any] | None


def _summary(row: Any) -> ConflictSummary:
    return ConflictSummary(
        row.id,
        row.record_id,
        row.site,
        row.field,
        row.status,
        as_utc(row.opened_at) or datetime.now(UTC),
        as_utc(row.resolved_at),
        row.resolved_by,
    )


def list_conflicts(
    conn: sa.Connection,
    *,
    sites: frozenset[str] | None,
    status: str | None,
    field: str | None,
    site: str | None,
    limit: int,
    offset: int,
) -> list[ConflictSummary]:
    """Conflicts of records within the caller's sites, oldest first; no values
    (those are identifying)."""
    stmt = (
        sa.select(*_COLUMNS)
        .join(records, records.c.id == conflicts.c.record_id)
        .order_by(conflicts.c.id)
        .limit(limit)
        .offset(offset)
    )
    if sites is not None:
        stmt = stmt.where(_SITE.in_(sorted(sites)))
    for column, value in (
        (conflicts.c.status, status),
        (conflicts.c.field, field),
        (_SITE, site),
    ):
        if value:
            stmt = stmt.where(column == value)
    return [_summary(r) for r in conn.execute(stmt)]


def _load(conn: sa.Connection, conflict_id: int, sites: frozenset[str] | None) -> Any:
    """The conflict with its record's current site and key; 404 outside `sites`."""
    row = conn.execute(
        sa.select(*_COLUMNS, records.c.wrapped_key)
        .join(records, records.c.id == conflicts.c.record_id)
        .where(conflicts.c.id == conflict_id)
    ).first()
    if row is None or (sites is not None and row.site not in sites):
        raise Problem(404, "conflict.not_found", f"no conflict {conflict_id}")
    return row


def _base_value(
    conn: sa.Connection, cipher: RecordCipher, record_id: str, field: str, base: Any
) -> Any:
    if not base:
        return None
    stmt = sa.select(changes.c.sealed).where(
        changes.c.record_id == record_id, changes.c.stamp == base[0], changes.c.device_id == base[1]
    )
    for (sealed,) in conn.execute(stmt):
        for path, value in cipher.open(sealed, "change")["f"]:
            if path == field:
                return {"v": value, "s": base[0], "d": base[1]}
    return None


def get_conflict(
    conn: sa.Connection, conflict_id: int, *, sites: frozenset[str] | None, master_key: bytes
) -> ConflictDetail:
    """Both sides, the base they started from, the provisional winner, and any resolution."""
    row = _load(conn, conflict_id, sites)
    cipher = RecordCipher(master_key, row.record_id, row.wrapped_key)
    payload = cipher.open(row.payload, "conflict")
    state = load_records(conn, [row.record_id], master_key)[row.record_id]
    winner = (
        "incoming"
        if payload["incoming"]["d"] == row.winner_device
        and payload["incoming"]["s"] == row.winner_stamp
        else "current"
    )
    return ConflictDetail(
        summary=_summary(row),
        base=_base_value(conn, cipher, row.record_id, row.field, payload.get("base")),
        current=payload["current"],
        incoming=payload["incoming"],
        provisional_winner=winner,
        field_now=state.fields.get(row.field),
        resolution=cipher.open(row.resolution, "resolution") if row.resolution else None,
    )


def resolve(
    conn: sa.Connection,
    conflict_id: int,
    *,
    sites: frozenset[str] | None,
    choice: str,
    value: Any,
    reason: str,
    actor: str,
    clock: Clock,
    master_key: bytes,
    now: datetime,
) -> int:
    """Close an open conflict with the chosen (or a new) value; returns the hub sequence
    of the hub-authored edit that carries it to every replica."""
    write_lock(conn)
    row = _load(conn, conflict_id, sites)
    if row.status != "open":
        raise Problem(
            409, "conflict.not_open", f"conflict {conflict_id} is {row.status}; reopen it first"
        )
    cipher = RecordCipher(master_key, row.record_id, row.wrapped_key)
    payload = cipher.open(row.payload, "conflict")
    # Resolved before and reopened: who reopened it and why, and what the
    # earlier resolutions were, stay with the new one.
    before = cipher.open(row.resolution, "resolution") if row.resolution else {}
    kept: dict[str, Any] = {"reopened": before["reopened"]} if "reopened" in before else {}
    if "choice" in before:
        earlier = {k: before[k] for k in ("choice", "value", "reason", "by", "at") if k in before}
        kept["earlier"] = [*before.get("earlier", []), earlier]
    if choice in ("current", "incoming"):
        value = payload[choice]["v"]
    elif choice != "value":
        raise Problem(422, "request.invalid", "choice: expected 'current', 'incoming' or 'value'")
    problem = field_error(row.field, value)
    if problem:
        raise Problem(422, "request.invalid", f"value: {problem}")
    rec = load_records(conn, [row.record_id], master_key)[row.record_id]
    hub_seq = hub_edit(
        conn,
        rec,
        {row.field: value},
        actor=actor,
        label=f"conflict-{conflict_id}",
        clock=clock,
        now=now,
    )
    save_records(conn, [rec], now=now)
    conn.execute(
        sa.update(conflicts)
        .where(conflicts.c.id == conflict_id)
        .values(
            status="resolved",
            resolved_at=now,
            resolved_by=actor,
            resolution=cipher.seal(
                {"choice": choice, "value": value, "reason": reason, **kept}, "resolution"
            ),
            resolution_seq=hub_seq,
        )
    )
    return hub_seq


def reopen(
    conn: sa.Connection,
    conflict_id: int,
    *,
    sites: frozenset[str] | None,
    reason: str,
    actor: str,
    master_key: bytes,
    now: datetime,
) -> ConflictSummary:
    """Open a resolved conflict again. The resolution's edit stays in the log (and
    the field keeps its value) until someone resolves it anew; who reopened it and
    why is kept (sealed) with the earlier resolution, and both with the next
    (`resolve`: `reopened`, `earlier`). Takes the write lock, as
    resolve does: on PostgreSQL two reopenings at once would otherwise both
    succeed, the second replacing the first's reason."""
    write_lock(conn)
    row = _load(conn, conflict_id, sites)
    if row.status == "open":
        raise Problem(409, "conflict.already_open", f"conflict {conflict_id} is open")
    cipher = RecordCipher(master_key, row.record_id, row.wrapped_key)
    earlier = cipher.open(row.resolution, "resolution") if row.resolution else {}
    reopened = [
        *earlier.get("reopened", []),
        {"by": actor, "reason": reason, "at": now.isoformat()},
    ]
    # Who resolved it and when leave the row's columns: they stay with the resolution.
    decided = as_utc(row.resolved_at)
    earlier |= {"by": row.resolved_by, "at": decided.isoformat() if decided else None}
    conn.execute(
        sa.update(conflicts)
        .where(conflicts.c.id == conflict_id)
        .values(
            status="open",
            resolved_at=None,
            resolved_by=None,
            resolution=cipher.seal({**earlier, "reopened": reopened}, "resolution"),
        )
    )
    return _summary(_load(conn, conflict_id, sites))
