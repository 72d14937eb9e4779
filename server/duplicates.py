"""The hub's duplicate queue: the decisions people take on a pair (merge,
reject, unmerge) and the pairs as they read them. The SQL.

Pairs are found by `server.dedup_check`. A merge links the two registrations
under one person (the other gets `merged_into`), copies the values chosen per
field onto the survivor, deletes nothing, and is undone by unmerge; all of it
travels to devices as hub-authored edits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from schemas.fields import KNOWN_PATHS, unflatten
from schemas.matching import REVIEW_THRESHOLD, Match, Profile, profile, score
from server.db import write_lock
from server.dedup_check import BlockIndex, key_counts
from server.hub_edits import HUB_DEVICE, hub_edit
from server.match_profiles import MERGED_INTO
from server.models import ChangeRow, DuplicatePair, RecordRow, as_utc
from server.problems import Problem
from server.records import HubRecord, load_records, save_records
from sync.hlc import Clock

__all__ = [
    "PairView",
    "get_pair",
    "list_pairs",
    "merge",
    "reject",
    "unmerge",
]

pairs = DuplicatePair.__table__  # type: ignore[attr-defined]
changes = ChangeRow.__table__  # type: ignore[attr-defined]
records = RecordRow.__table__  # type: ignore[attr-defined]
# A pair is seen, and decided, by the sites its two records are at now (a
# record may move to another site after the pair was queued).
_rec_a, _rec_b = records.alias("rec_a"), records.alias("rec_b")


def _doc(rec: HubRecord) -> dict[str, Any]:
    return unflatten({p: f["v"] for p, f in rec.fields.items()})


@dataclass(frozen=True)
class PairView:
    id: int
    record_a: str
    record_b: str
    site_a: str
    site_b: str
    score: float
    status: str
    created_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    survivor: str | None
    explanation: tuple[dict[str, Any], ...] = ()
    kept: tuple[str, ...] = ()  # fields an unmerge left as they are (changed since the merge)


def _view(row: Any, match: Match | None = None, kept: tuple[str, ...] = ()) -> PairView:
    explanation = tuple(
        {"field": f.field, "outcome": f.outcome, "weight": round(f.weight, 2), "detail": f.detail}
        for f in (match.explanation if match else ())
    )
    return PairView(
        row.id,
        row.record_a,
        row.record_b,
        row.site_now_a,
        row.site_now_b,
        row.score,
        row.status,
        as_utc(row.created_at) or datetime.now(UTC),
        as_utc(row.decided_at),
        row.decided_by,
        row.survivor,
        explanation,
        kept,
    )


def _select() -> sa.Select[Any]:
    return (
        sa.select(pairs, _rec_a.c.site.label("site_now_a"), _rec_b.c.site.label("site_now_b"))
        .join(_rec_a, _rec_a.c.id == pairs.c.record_a)
        .join(_rec_b, _rec_b.c.id == pairs.c.record_b)
    )


def _visible(sites: frozenset[str] | None) -> Any:
    if sites is None:
        return sa.true()
    return sa.and_(_rec_a.c.site.in_(sorted(sites)), _rec_b.c.site.in_(sorted(sites)))


def list_pairs(
    conn: sa.Connection,
    *,
    sites: frozenset[str] | None,
    status: str | None,
    limit: int,
    offset: int,
) -> list[PairView]:
    """Pairs both of whose records are within the caller's sites, best score first."""
    stmt = _select().where(_visible(sites)).order_by(pairs.c.score.desc(), pairs.c.id)
    if status:
        stmt = stmt.where(pairs.c.status == status)
    return [_view(r) for r in conn.execute(stmt.limit(limit).offset(offset))]


def _load(conn: sa.Connection, pair_id: int, sites: frozenset[str] | None) -> Any:
    row = conn.execute(_select().where(pairs.c.id == pair_id, _visible(sites))).first()
    if row is None:
        raise Problem(404, "duplicate.not_found", f"no duplicate pair {pair_id}")
    return row


def _profiles(
    conn: sa.Connection, recs: dict[str, HubRecord], index: BlockIndex
) -> tuple[dict[str, Profile], dict[str, int]]:
    """The records' match profiles, and how many records carry each of their
    keys: names weigh by it, as when the hub's check scored and queued a pair."""
    profiles = {rid: profile(_doc(rec)) for rid, rec in recs.items()}
    keys = {k for p in profiles.values() for k in p.keys}
    return profiles, key_counts(conn, keys, index=index)


def get_pair(
    conn: sa.Connection,
    pair_id: int,
    *,
    sites: frozenset[str] | None,
    master_key: bytes,
    index: BlockIndex,
) -> PairView:
    """One pair with its explanation, recomputed from both records as they are now."""
    row = _load(conn, pair_id, sites)
    recs = load_records(conn, [row.record_a, row.record_b], master_key)
    profiles, counts = _profiles(conn, recs, index)
    return _view(row, score(profiles[row.record_a], profiles[row.record_b], key_counts=counts))


def _group(conn: sa.Connection, record_id: str) -> set[str]:
    """A record and every registration merged into it, directly or through
    another (O merged into V, then V into X: X's group holds V and O)."""
    group, frontier = {record_id}, [record_id]
    while frontier:
        rows = conn.execute(
            sa.select(pairs.c.record_a, pairs.c.record_b, pairs.c.survivor).where(
                pairs.c.status == "merged", pairs.c.survivor.in_(frontier)
            )
        )
        found = {a if b == survivor else b for a, b, survivor in rows} - group
        group |= found
        frontier = sorted(found)
    return group


def _check_groups(
    conn: sa.Connection, survivor: str, other: str, master_key: bytes, index: BlockIndex
) -> None:
    """Refuse a merge that would chain strangers together (`schemas.clustering`):
    every registration already merged into either side must not look like a
    different person from every one on the other side. The pair being decided
    is the operator's call and is not second-guessed."""
    mine, theirs = _group(conn, survivor), _group(conn, other)
    if len(mine) == len(theirs) == 1:
        return
    profiles, counts = _profiles(conn, load_records(conn, mine | theirs, master_key), index)
    for x in sorted(mine):
        for y in sorted(theirs):
            if {x, y} == {survivor, other} or x not in profiles or y not in profiles:
                continue
            value = score(profiles[x], profiles[y], key_counts=counts).score
            if value < REVIEW_THRESHOLD:
                raise Problem(
                    409,
                    "duplicate.strangers",
                    f"{x} and {y} would end up as one person but score {value:.2f}: "
                    "they look like different people; unmerge or reject first",
                    records=[x, y],
                )


def reject(
    conn: sa.Connection, pair_id: int, *, sites: frozenset[str] | None, actor: str, now: datetime
) -> PairView:
    """Not one person: the pair is remembered and never queued again.

    Takes the write lock first, as merge and unmerge do: on PostgreSQL a reject
    that read the pair open while a merge of it was under way would otherwise
    overwrite the merge, or deadlock with it over the lock the audit entry takes.
    """
    write_lock(conn)
    row = _load(conn, pair_id, sites)
    if row.status != "open":
        raise Problem(409, "duplicate.not_open", f"pair {pair_id} is {row.status}")
    conn.execute(
        sa.update(pairs)
        .where(pairs.c.id == pair_id)
        .values(status="rejected", decided_at=now, decided_by=actor)
    )
    return _view(_load(conn, pair_id, sites))


def _check_takeable(take_from_other: list[str], keep: HubRecord, other: HubRecord) -> None:
    """Every field named must be one a record can hold (of this schema version, or
    one of the two records holds it) and one a merge may copy; else 422."""
    for path in take_from_other:
        if path in ("registration", "schema_version", MERGED_INTO):
            raise Problem(422, "request.invalid", f"take_from_other: {path!r} cannot be taken")
        if path not in KNOWN_PATHS and path not in keep.fields and path not in other.fields:
            raise Problem(
                422,
                "request.invalid",
                f"take_from_other: {path!r} is not a field (use paths such as names.given,"
                " date_of_birth, documents); nothing was merged",
            )


def merge(
    conn: sa.Connection,
    pair_id: int,
    *,
    sites: frozenset[str] | None,
    survivor: str,
    take_from_other: list[str],
    actor: str,
    clock: Clock,
    master_key: bytes,
    index: BlockIndex,
    now: datetime,
) -> PairView:
    """Link the pair under `survivor`; copy the other's value of each field in
    `take_from_other` onto the survivor. Nothing is deleted; `unmerge` undoes it."""
    write_lock(conn)
    row = _load(conn, pair_id, sites)
    if row.status != "open":
        raise Problem(409, "duplicate.not_open", f"pair {pair_id} is {row.status}")
    if survivor not in (row.record_a, row.record_b):
        raise Problem(422, "request.invalid", "survivor: must be one of the pair's two records")
    other_id = row.record_b if survivor == row.record_a else row.record_a
    recs = load_records(conn, [survivor, other_id], master_key)
    keep, other = recs[survivor], recs[other_id]
    if keep.value(MERGED_INTO):
        raise Problem(
            409,
            "duplicate.survivor_merged",
            f"{survivor} is merged into {keep.value(MERGED_INTO)}: merge into that record instead",
        )
    if other.value(MERGED_INTO):
        raise Problem(
            409,
            "duplicate.already_merged",
            f"{other_id} is merged into {other.value(MERGED_INTO)} already",
        )
    _check_groups(conn, survivor, other_id, master_key, index)
    _check_takeable(take_from_other, keep, other)
    values = {f: other.value(f) for f in take_from_other if other.value(f) != keep.value(f)}
    restore = {f: keep.value(f) for f in values}
    label = f"merge-{pair_id}"
    if values:
        hub_edit(conn, keep, values, actor=actor, label=label, clock=clock, now=now)
    hub_edit(conn, other, {MERGED_INTO: survivor}, actor=actor, label=label, clock=clock, now=now)
    save_records(conn, [keep, other], now=now)
    decision = keep.cipher.seal({"took": sorted(values), "restore": restore}, "merge")
    conn.execute(
        sa.update(pairs)
        .where(pairs.c.id == pair_id)
        .values(
            status="merged", decided_at=now, decided_by=actor, survivor=survivor, decision=decision
        )
    )
    return _view(_load(conn, pair_id, sites))


def _writer(conn: sa.Connection, rec: HubRecord, path: str) -> str | None:
    """The label of the hub edit that wrote `rec`'s current value of `path`
    (`merge-7`, `unmerge-7`, `conflict-3`), or None when a device wrote it."""
    state = rec.fields.get(path)
    if state is None or state.get("d") != HUB_DEVICE:
        return None
    label: str | None = conn.execute(
        sa.select(changes.c.batch_id).where(
            changes.c.record_id == rec.id,
            changes.c.device_id == HUB_DEVICE,
            changes.c.stamp == state["s"],
        )
    ).scalar()
    return label


def _written(conn: sa.Connection, rec: HubRecord, label: str) -> dict[str, Any]:
    """The values the hub edit `label` wrote on `rec` (from the change log)."""
    sealed = conn.execute(
        sa.select(changes.c.sealed).where(
            changes.c.record_id == rec.id,
            changes.c.device_id == HUB_DEVICE,
            changes.c.batch_id == label,
        )
    ).scalar()
    return dict(rec.cipher.open(sealed, "change")["f"]) if sealed else {}


def _restorable(
    conn: sa.Connection, keep: HubRecord, pair_id: int, restore: dict[str, Any]
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Which of the values a merge replaced go back: those of fields still
    holding what the merge wrote. A field changed since keeps its newer value
    (a device's correction, a resolution), named in the second part; one a
    later merge into the same record took again refuses the unmerge until that
    merge is undone (its own undo puts back what this merge wrote)."""
    wrote = _written(conn, keep, f"merge-{pair_id}") if restore else {}
    back: dict[str, Any] = {}
    kept: list[str] = []
    for path, value in restore.items():
        if path in wrote and keep.value(path) == wrote[path]:
            back[path] = value
            continue
        writer = _writer(conn, keep, path) or ""
        later = writer.removeprefix("merge-")
        if writer.startswith("merge-") and later.isdigit():
            status = conn.execute(sa.select(pairs.c.status).where(pairs.c.id == int(later)))
            if status.scalar() == "merged":
                raise Problem(
                    409,
                    "duplicate.unmerge_order",
                    f"pair {later} was merged into {keep.id} after this one and took {path}"
                    f" again: unmerge pair {later} first",
                    pair=int(later),
                )
        kept.append(path)
    return back, tuple(sorted(kept))


def unmerge(
    conn: sa.Connection,
    pair_id: int,
    *,
    sites: frozenset[str] | None,
    actor: str,
    clock: Clock,
    master_key: bytes,
    now: datetime,
) -> PairView:
    """Undo a merge: the other is its own again, and the survivor gets back the
    values the merge replaced, where nobody changed them since (`kept` names
    those left as they are). The pair stays known (status `unmerged`) so it is
    not queued again."""
    write_lock(conn)
    row = _load(conn, pair_id, sites)
    if row.status != "merged" or row.survivor is None:
        raise Problem(409, "duplicate.not_merged", f"pair {pair_id} is {row.status}")
    other_id = row.record_b if row.survivor == row.record_a else row.record_a
    recs = load_records(conn, [row.survivor, other_id], master_key)
    keep, other = recs[row.survivor], recs[other_id]
    decision = keep.cipher.open(row.decision, "merge")
    back, kept = _restorable(conn, keep, pair_id, decision["restore"])
    label = f"unmerge-{pair_id}"
    if back:
        hub_edit(conn, keep, back, actor=actor, label=label, clock=clock, now=now)
    hub_edit(conn, other, {MERGED_INTO: None}, actor=actor, label=label, clock=clock, now=now)
    save_records(conn, [keep, other], now=now)
    conn.execute(
        sa.update(pairs)
        .where(pairs.c.id == pair_id)
        .values(status="unmerged", decided_at=now, decided_by=actor)
    )
    return _view(_load(conn, pair_id, sites), kept=kept)
