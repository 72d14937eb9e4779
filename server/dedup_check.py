"""Finding possible duplicates at the hub: the blind blocking index and the
check that queues candidate pairs. The SQL.

Blocking keys are stored as HMACs under a key derived from the master key,
like the name index: equal keys meet, the table alone says nothing about
anyone. A check works on a whole set of records at once (a push batch, a scan
chunk): one query for the block sizes, one for the members of the blocks
each record may use (`schemas.matching.usable_blocks`), one for the pairs
already known, and the candidates' profiles (`server.match_profiles`:
one query, and one unsealing of the records whose profile is missing or
stale). Scoring is `schemas.matching` (pure).
"""

from __future__ import annotations

import hmac
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from schemas.matching import (
    PROFILE_VERSION,
    REVIEW_THRESHOLD,
    Profile,
    pair_score,
    usable_blocks,
)
from server.bulk import chunks, insert_rows
from server.devices import get_meta, set_meta
from server.match_profiles import Entry, ProfileCache, read_entries, store_entries
from server.models import BlockKey, DedupPending, DuplicatePair, RecordRow
from server.records import HubRecord, load_records

__all__ = [
    "BlockIndex",
    "FoundPair",
    "Gathered",
    "all_record_ids",
    "check_records",
    "clear_checked",
    "clear_pending",
    "count_pending",
    "gather",
    "index_is_current",
    "index_records",
    "key_counts",
    "mark_index_current",
    "pending_ids",
    "queue_pairs",
    "queue_records",
    "reindex_records",
    "score_gathered",
    "take_pending",
]

block_keys = BlockKey.__table__  # type: ignore[attr-defined]
records = RecordRow.__table__  # type: ignore[attr-defined]
pairs = DuplicatePair.__table__  # type: ignore[attr-defined]
pending = DedupPending.__table__  # type: ignore[attr-defined]


class BlockIndex:
    def __init__(self, master_key: bytes) -> None:
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"fieldreg/block-index/v1"
        )
        self._key = hkdf.derive(master_key)

    def blind(self, key: str) -> str:
        return hmac.digest(self._key, key.encode(), "sha256").hex()[:32]


def index_records(
    conn: sa.Connection, recs: Mapping[str, HubRecord], *, index: BlockIndex
) -> dict[str, dict[str, str]]:
    """Replace the blocking-index entries of `recs` and store their profiles;
    return {record: {hash: key}}."""
    entries = store_entries(conn, recs)
    return _index(conn, {rid: e.profile for rid, e in entries.items()}, index)


def reindex_records(
    conn: sa.Connection, record_ids: Iterable[str], *, index: BlockIndex, master_key: bytes
) -> int:
    """Unseal `record_ids`, profile them and refile their blocking keys; return how many."""
    return len(index_records(conn, load_records(conn, record_ids, master_key), index=index))


_INDEX_VERSION = "block_index_version"  # hub_meta: the PROFILE_VERSION the index was filed by


def index_is_current(conn: sa.Connection) -> bool:
    """Whether every record is filed under the keys of this matcher's version.

    Not after an upgrade that changed `PROFILE_VERSION` (or from before the
    version was kept): until each record is filed again, a check misses the
    candidates whose keys changed. `dedup scan` refiles them all first."""
    return get_meta(conn, _INDEX_VERSION) == str(PROFILE_VERSION)


def mark_index_current(conn: sa.Connection) -> None:
    """Record that every record is filed by this matcher (a new hub, a refiling)."""
    set_meta(conn, _INDEX_VERSION, str(PROFILE_VERSION))


def _index(
    conn: sa.Connection, profiles: Mapping[str, Profile], index: BlockIndex
) -> dict[str, dict[str, str]]:
    keys_of = {rid: {index.blind(k): k for k in prof.keys} for rid, prof in profiles.items()}
    filed: dict[str, set[str]] = {}
    for chunk in chunks(profiles):
        stmt = sa.select(block_keys.c.record_id, block_keys.c.key_hash).where(
            block_keys.c.record_id.in_(chunk)
        )
        for rid, h in conn.execute(stmt):
            filed.setdefault(rid, set()).add(h)
    # A record filed under its keys already is left alone: a check of unchanged
    # records writes nothing (and on SQLite its commit waits for no disk).
    changed = [rid for rid, keys in keys_of.items() if filed.get(rid, set()) != keys.keys()]
    for chunk in chunks(rid for rid in changed if rid in filed):
        conn.execute(sa.delete(block_keys).where(block_keys.c.record_id.in_(chunk)))
    rows = [{"key_hash": h, "record_id": rid} for rid in changed for h in keys_of[rid]]
    if rows:
        conn.execute(sa.insert(block_keys), rows)
    return keys_of


def queue_records(
    conn: sa.Connection,
    record_ids: Iterable[str],
    *,
    now: datetime,
    new: Container[str] = (),
) -> None:
    """File records for the duplicate check (once each, however often queued).

    `new` names records stored for the first time in this transaction: they
    cannot be queued already, so there is nothing of theirs to replace.
    """
    ids = sorted(set(record_ids))
    for chunk in chunks([rid for rid in ids if rid not in new]):
        conn.execute(sa.delete(pending).where(pending.c.record_id.in_(chunk)))
    insert_rows(conn, pending, ("record_id", "queued_at"), [(rid, now) for rid in ids])


def take_pending(conn: sa.Connection, limit: int) -> list[str]:
    """The longest-waiting records queued for the check (they stay queued)."""
    stmt = (
        sa.select(pending.c.record_id)
        .order_by(pending.c.queued_at, pending.c.record_id)
        .limit(limit)
    )
    return list(conn.execute(stmt).scalars())


def clear_pending(conn: sa.Connection, record_ids: Iterable[str]) -> None:
    """Records checked: off the queue."""
    for chunk in chunks(record_ids):
        conn.execute(sa.delete(pending).where(pending.c.record_id.in_(chunk)))


def clear_checked(conn: sa.Connection, seqs: Mapping[str, int]) -> None:
    """Records checked at these `last_hub_seq`s: off the queue, unless one has
    changed since (it stays queued, to be checked again as it is now)."""
    unchanged: list[str] = []
    for chunk in chunks(seqs):
        stmt = sa.select(records.c.id, records.c.last_hub_seq).where(records.c.id.in_(chunk))
        unchanged += [rid for rid, seq in conn.execute(stmt) if seqs[rid] == seq]
    clear_pending(conn, unchanged)


def pending_ids(conn: sa.Connection) -> list[str]:
    """Every record queued for the check, in id order."""
    return list(
        conn.execute(sa.select(pending.c.record_id).order_by(pending.c.record_id)).scalars()
    )


def count_pending(conn: sa.Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(pending)).scalar_one())


def all_record_ids(conn: sa.Connection) -> list[str]:
    """Every record id, for a full scan."""
    return list(conn.execute(sa.select(records.c.id).order_by(records.c.id)).scalars())


def _block_sizes(conn: sa.Connection, hashes: Iterable[str]) -> dict[str, int]:
    """How many records are filed under each of `hashes` (filed already)."""
    sizes: dict[str, int] = {}
    for chunk in chunks(hashes):
        stmt = (
            sa.select(block_keys.c.key_hash, sa.func.count())
            .where(block_keys.c.key_hash.in_(chunk))
            .group_by(block_keys.c.key_hash)
        )
        sizes.update((h, int(n)) for h, n in conn.execute(stmt))
    return sizes


def key_counts(conn: sa.Connection, keys: Iterable[str], *, index: BlockIndex) -> dict[str, int]:
    """How many records are filed under each of `keys` (clear match keys; a key
    no record is filed under is left out), as a check weighs names by them."""
    blinded = {index.blind(k): k for k in keys}
    return {blinded[h]: n for h, n in _block_sizes(conn, blinded).items()}


def _block_members(conn: sa.Connection, hashes: Iterable[str]) -> dict[str, list[str]]:
    """The records filed under each of `hashes`."""
    members: dict[str, list[str]] = {}
    for chunk in chunks(hashes):
        stmt = sa.select(block_keys.c.key_hash, block_keys.c.record_id).where(
            block_keys.c.key_hash.in_(chunk)
        )
        for h, rid in conn.execute(stmt):
            members.setdefault(h, []).append(rid)
    return members


def _known_pairs(conn: sa.Connection, ids: Iterable[str]) -> set[tuple[str, str]]:
    known: set[tuple[str, str]] = set()
    for chunk in chunks(ids):
        stmt = sa.select(pairs.c.record_a, pairs.c.record_b).where(
            sa.or_(pairs.c.record_a.in_(chunk), pairs.c.record_b.in_(chunk))
        )
        known.update((a, b) for a, b in conn.execute(stmt))
    return known


@dataclass(frozen=True)
class Gathered:
    """What scoring a set of records against their candidates needs (`gather`)."""

    mine: dict[str, Entry]  # the records checked
    others: dict[str, Entry]  # their candidates not known yet, and the records themselves
    candidates: dict[str, set[str]]  # record -> candidates it shares a usable key with
    key_counts: dict[str, dict[str, int]]  # record -> {its key: records filed under it}
    known: set[tuple[str, str]]  # pairs already in the queue, decided or not


@dataclass(frozen=True, slots=True)
class FoundPair:
    """A new pair scoring at least `REVIEW_THRESHOLD` (record_a < record_b)."""

    record_a: str
    record_b: str
    site_a: str
    site_b: str
    score: float


def gather(
    conn: sa.Connection,
    record_ids: Iterable[str],
    *,
    index: BlockIndex,
    master_key: bytes,
    cache: ProfileCache | None = None,
    earlier_only: bool = False,
) -> Gathered:
    """(Re)index `record_ids`, store their profiles, and read what scoring them
    needs: their candidates (with `earlier_only`, only those with a smaller
    id), profiles and known pairs."""
    cache = cache if cache is not None else ProfileCache(0)
    mine = read_entries(conn, set(record_ids), master_key, cache)
    if not mine:
        return Gathered({}, {}, {}, {}, set())
    keys_of = _index(conn, {rid: e.profile for rid, e in mine.items()}, index)
    sizes = _block_sizes(conn, (h for keys in keys_of.values() for h in keys))
    usable = {
        rid: usable_blocks({h: sizes[h] for h in keys if h in sizes})
        for rid, keys in keys_of.items()
        if not mine[rid].merged
    }
    # A key only one record carries is the asking record's own: no candidate there.
    searched = {h for used in usable.values() for h in used if sizes[h] > 1}
    blocks = _block_members(conn, searched)
    found: dict[str, set[str]] = {}
    for rid, used in sorted(usable.items()):
        near = (o for h in used for o in blocks.get(h, ()))
        found[rid] = {o for o in near if not earlier_only or o < rid} - {rid}
    known = _known_pairs(conn, found)
    # A candidate only in pairs known already is not scored: its profile is not read.
    wanted = {
        o
        for rid, cands in found.items()
        for o in cands
        if o not in mine and ((rid, o) if rid < o else (o, rid)) not in known
    }
    others = read_entries(conn, wanted, master_key, cache)
    others.update(mine)
    counts = {rid: {keys_of[rid][h]: sizes[h] for h in keys_of[rid] if h in sizes} for rid in found}
    return Gathered(mine, others, found, counts, known)


def score_gathered(gathered: Gathered) -> list[FoundPair]:
    """Score each record against its candidates, once per pair not known yet;
    return the pairs at or above `REVIEW_THRESHOLD`. Pure: no database."""
    known = set(gathered.known)
    out: list[FoundPair] = []
    for rid, cands in gathered.candidates.items():
        entry = gathered.mine[rid]
        key_counts = gathered.key_counts[rid]
        for other_id in sorted(cands):
            pair = (rid, other_id) if rid < other_id else (other_id, rid)
            other = gathered.others.get(other_id)
            if pair in known or other is None or other.merged:
                continue
            known.add(pair)
            value = pair_score(
                entry.profile, other.profile, key_counts=key_counts, at_least=REVIEW_THRESHOLD
            )
            if value is None:
                continue
            site = {rid: entry.site, other_id: other.site}
            out.append(FoundPair(pair[0], pair[1], site[pair[0]], site[pair[1]], value))
    return out


def queue_pairs(
    conn: sa.Connection, found: Iterable[FoundPair], *, now: datetime, recheck: bool = True
) -> int:
    """Queue `found` as open pairs; return how many. With `recheck` a pair that
    became known since it was gathered (another checker's) is left out."""
    found = list(found)
    if recheck:
        known = _known_pairs(conn, {p.record_a for p in found})
        found = [p for p in found if (p.record_a, p.record_b) not in known]
    rows = [
        {
            "record_a": p.record_a,
            "record_b": p.record_b,
            "site_a": p.site_a,
            "site_b": p.site_b,
            "score": p.score,
            "status": "open",
            "created_at": now,
        }
        for p in found
    ]
    if rows:
        conn.execute(sa.insert(pairs), rows)
    return len(rows)


def check_records(
    conn: sa.Connection,
    record_ids: Iterable[str],
    *,
    index: BlockIndex,
    master_key: bytes,
    now: datetime,
    cache: ProfileCache | None = None,
) -> int:
    """(Re)index `record_ids` and queue every new pair scoring >= the review threshold.

    Returns how many pairs were queued. Cost grows with the records' candidates
    (each record's `usable_blocks`: rarest keys first, within a budget), not
    with the database. Pairs already known (open, merged, rejected) are not
    queued again; registrations merged into another are not candidates. In one
    transaction: `gather`, `score_gathered`, `queue_pairs`; a scan runs them in
    three, to score outside the write lock, and looks back only (`gather`'s
    `earlier_only`).
    """
    gathered = gather(conn, record_ids, index=index, master_key=master_key, cache=cache)
    return queue_pairs(conn, score_gathered(gathered), now=now, recheck=False)
