"""The hub's duplicate queue: blind blocking index, candidate checks, and the
decisions people take on a pair (merge, reject, unmerge). The SQL.

Scoring is `schemas.matching` (pure). Blocking keys are stored as HMACs under
a key derived from the master key, like the name index: equal keys meet, the
table alone says nothing about anyone. A merge links the two registrations
under one person (the other gets `merged_into`), copies the values chosen per
field onto the survivor, deletes nothing, and is undone by unmerge; all of it
travels to devices as hub-authored edits.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from schemas.fields import unflatten
from schemas.matching import MAX_BLOCK, REVIEW_THRESHOLD, Match, profile, record_keys, score
from server.db import write_lock
from server.hub_edits import hub_edit
from server.models import BlockKey, DuplicatePair, RecordRow
from server.problems import Problem
from server.records import HubRecord, load_records, save_records
from sync.hlc import Clock

__all__ = [
    "BlockIndex",
    "PairView",
    "all_record_ids",
    "check_records",
    "get_pair",
    "index_records",
    "list_pairs",
    "merge",
    "reject",
    "unmerge",
]

block_keys = BlockKey.__table__  # type: ignore[attr-defined]
records = RecordRow.__table__  # type: ignore[attr-defined]
pairs = DuplicatePair.__table__  # type: ignore[attr-defined]
MERGED_INTO = "merged_into"


class BlockIndex:
    def __init__(self, master_key: bytes) -> None:
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"fieldreg/block-index/v1"
        )
        self._key = hkdf.derive(master_key)

    def blind(self, key: str) -> str:
        return hmac.new(self._key, key.encode(), hashlib.sha256).hexdigest()[:32]


def _doc(rec: HubRecord) -> dict[str, Any]:
    return unflatten({p: f["v"] for p, f in rec.fields.items()})


def index_records(
    conn: sa.Connection, recs: Mapping[str, HubRecord], *, index: BlockIndex
) -> dict[str, dict[str, str]]:
    """Replace the blocking-index entries of `recs`; return {record: {hash: key}}."""
    keys_of = {
        rid: {index.blind(k): k for k in record_keys(_doc(rec))} for rid, rec in recs.items()
    }
    conn.execute(sa.delete(block_keys).where(block_keys.c.record_id.in_(list(recs))))
    rows = [(h, rid) for rid, keys in keys_of.items() for h in keys]
    if rows:
        conn.execute(sa.insert(block_keys), [{"key_hash": h, "record_id": rid} for h, rid in rows])
    return keys_of


def all_record_ids(conn: sa.Connection) -> list[str]:
    """Every record id, for a full scan."""
    return list(conn.execute(sa.select(records.c.id).order_by(records.c.id)).scalars())


def _key_counts(conn: sa.Connection, hashes: Iterable[str]) -> dict[str, int]:
    wanted = sorted(set(hashes))
    if not wanted:
        return {}
    stmt = (
        sa.select(block_keys.c.key_hash, sa.func.count())
        .where(block_keys.c.key_hash.in_(wanted))
        .group_by(block_keys.c.key_hash)
    )
    return {h: int(n) for h, n in conn.execute(stmt)}


def check_records(
    conn: sa.Connection,
    record_ids: Iterable[str],
    *,
    index: BlockIndex,
    master_key: bytes,
    now: datetime,
) -> int:
    """(Re)index `record_ids` and queue every new pair scoring >= the review threshold.

    Returns how many pairs were queued. Cost grows with each record's
    candidates (keys shared by more than `MAX_BLOCK` records are skipped), not
    with the database. Pairs already known (open, merged, rejected) are not
    queued again; registrations merged into another are not candidates.
    """
    recs = load_records(conn, record_ids, master_key)
    if not recs:
        return 0
    keys_of = index_records(conn, recs, index=index)
    queued = 0
    for rid, rec in recs.items():
        if rec.value(MERGED_INTO):
            continue
        counts = _key_counts(conn, keys_of[rid])
        usable = [h for h, n in counts.items() if n <= MAX_BLOCK]
        if not usable:
            continue
        found = conn.execute(
            sa.select(block_keys.c.record_id)
            .where(block_keys.c.key_hash.in_(usable), block_keys.c.record_id != rid)
            .distinct()
        ).scalars()
        known = {
            a if b == rid else b
            for a, b in conn.execute(
                sa.select(pairs.c.record_a, pairs.c.record_b).where(
                    sa.or_(pairs.c.record_a == rid, pairs.c.record_b == rid)
                )
            )
        }
        others = load_records(conn, [c for c in found if c not in known], master_key)
        mine = profile(_doc(rec))
        key_counts = {keys_of[rid][h]: n for h, n in counts.items()}
        for other_id, other in others.items():
            if other.value(MERGED_INTO):
                continue
            match = score(mine, profile(_doc(other)), key_counts=key_counts)
            if match.score < REVIEW_THRESHOLD:
                continue
            a, b = sorted((rid, other_id))
            site = {rid: rec.site or "", other_id: other.site or ""}
            conn.execute(
                sa.insert(pairs).values(
                    record_a=a,
                    record_b=b,
                    site_a=site[a],
                    site_b=site[b],
                    score=round(match.score, 4),
                    status="open",
                    created_at=now,
                )
            )
            known.add(other_id)
            queued += 1
    return queued


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


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value if value.tzinfo else value.replace(tzinfo=UTC)


def _view(row: Any, match: Match | None = None) -> PairView:
    explanation = tuple(
        {"field": f.field, "outcome": f.outcome, "weight": round(f.weight, 2), "detail": f.detail}
        for f in (match.explanation if match else ())
    )
    return PairView(
        row.id,
        row.record_a,
        row.record_b,
        row.site_a,
        row.site_b,
        row.score,
        row.status,
        _utc(row.created_at) or datetime.now(UTC),
        _utc(row.decided_at),
        row.decided_by,
        row.survivor,
        explanation,
    )


def _visible(sites: frozenset[str] | None) -> Any:
    if sites is None:
        return sa.true()
    return sa.and_(pairs.c.site_a.in_(sorted(sites)), pairs.c.site_b.in_(sorted(sites)))


def list_pairs(
    conn: sa.Connection,
    *,
    sites: frozenset[str] | None,
    status: str | None,
    limit: int,
    offset: int,
) -> list[PairView]:
    """Pairs both of whose records are within the caller's sites, best score first."""
    stmt = sa.select(pairs).where(_visible(sites)).order_by(pairs.c.score.desc(), pairs.c.id)
    if status:
        stmt = stmt.where(pairs.c.status == status)
    return [_view(r) for r in conn.execute(stmt.limit(limit).offset(offset))]


def _load(conn: sa.Connection, pair_id: int, sites: frozenset[str] | None) -> Any:
    row = conn.execute(sa.select(pairs).where(pairs.c.id == pair_id, _visible(sites))).first()
    if row is None:
        raise Problem(404, "duplicate.not_found", f"no duplicate pair {pair_id}")
    return row


def get_pair(
    conn: sa.Connection, pair_id: int, *, sites: frozenset[str] | None, master_key: bytes
) -> PairView:
    """One pair with its explanation, recomputed from both records as they are now."""
    row = _load(conn, pair_id, sites)
    recs = load_records(conn, [row.record_a, row.record_b], master_key)
    match = score(_doc(recs[row.record_a]), _doc(recs[row.record_b]))
    return _view(row, match)


def reject(
    conn: sa.Connection, pair_id: int, *, sites: frozenset[str] | None, actor: str, now: datetime
) -> PairView:
    """Not one person: the pair is remembered and never queued again."""
    row = _load(conn, pair_id, sites)
    if row.status != "open":
        raise Problem(409, "duplicate.not_open", f"pair {pair_id} is {row.status}")
    conn.execute(
        sa.update(pairs)
        .where(pairs.c.id == pair_id)
        .values(status="rejected", decided_at=now, decided_by=actor)
    )
    return _view(_load(conn, pair_id, sites))


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
    bad = [f for f in take_from_other if f in ("registration", "schema_version", MERGED_INTO)]
    if bad:
        raise Problem(422, "request.invalid", f"take_from_other: {bad[0]!r} cannot be taken")
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
    """Undo a merge: the survivor gets back the values it had, the other is its own again.
    The pair stays known (status `unmerged`) so it is not queued again."""
    write_lock(conn)
    row = _load(conn, pair_id, sites)
    if row.status != "merged" or row.survivor is None:
        raise Problem(409, "duplicate.not_merged", f"pair {pair_id} is {row.status}")
    other_id = row.record_b if row.survivor == row.record_a else row.record_a
    recs = load_records(conn, [row.survivor, other_id], master_key)
    keep, other = recs[row.survivor], recs[other_id]
    decision = keep.cipher.open(row.decision, "merge")
    label = f"unmerge-{pair_id}"
    if decision["restore"]:
        hub_edit(conn, keep, decision["restore"], actor=actor, label=label, clock=clock, now=now)
    hub_edit(conn, other, {MERGED_INTO: None}, actor=actor, label=label, clock=clock, now=now)
    save_records(conn, [keep, other], now=now)
    conn.execute(
        sa.update(pairs)
        .where(pairs.c.id == pair_id)
        .values(status="unmerged", decided_at=now, decided_by=actor)
    )
    return _view(_load(conn, pair_id, sites))
