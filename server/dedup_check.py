"""Finding possible duplicates at the hub: the blind blocking index and the
check that queues candidate pairs. The SQL.

Blocking keys are stored as HMACs under a key derived from the master key,
like the name index: equal keys meet, the table alone says nothing about
anyone. A check works on a whole set of records at once (a push batch, a scan
chunk): one query for the block sizes, one for the candidates, one for the
pairs already known, one for the candidates' stored match profiles
(`match_profiles`, each sealed under its record's own key), and one unsealing
of the records whose profile is missing or stale. Scoring is
`schemas.matching` (pure).
"""

from __future__ import annotations

import hmac
import threading
from collections import OrderedDict
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic_core import from_json

from schemas.fields import unflatten
from schemas.matching import (
    MAX_BLOCK,
    PROFILE_VERSION,
    REVIEW_THRESHOLD,
    Profile,
    pair_score,
    profile,
    profile_from_json,
    profile_to_json,
)
from server.bulk import IN_CHUNK, insert_rows, rows_in
from server.devices import get_meta, set_meta
from server.models import BlockKey, DedupPending, DuplicatePair, MatchProfile, RecordRow
from server.records import HubRecord, load_records
from server.sealing import RecordCipher, SealError

__all__ = [
    "MERGED_INTO",
    "BlockIndex",
    "FoundPair",
    "Gathered",
    "ProfileCache",
    "all_record_ids",
    "check_records",
    "clear_checked",
    "clear_pending",
    "count_pending",
    "gather",
    "index_is_current",
    "index_records",
    "mark_index_current",
    "queue_pairs",
    "queue_records",
    "reindex_records",
    "score_gathered",
    "store_profiles",
    "take_pending",
    "unprofiled_ids",
]

block_keys = BlockKey.__table__  # type: ignore[attr-defined]
records = RecordRow.__table__  # type: ignore[attr-defined]
pairs = DuplicatePair.__table__  # type: ignore[attr-defined]
pending = DedupPending.__table__  # type: ignore[attr-defined]
profiles = MatchProfile.__table__  # type: ignore[attr-defined]
MERGED_INTO = "merged_into"


class BlockIndex:
    def __init__(self, master_key: bytes) -> None:
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"fieldreg/block-index/v1"
        )
        self._key = hkdf.derive(master_key)

    def blind(self, key: str) -> str:
        return hmac.digest(self._key, key.encode(), "sha256").hex()[:32]


class _Entry:
    __slots__ = ("merged", "profile", "seq", "site")

    def __init__(self, seq: int, site: str, merged: bool, profile: Profile) -> None:
        self.seq, self.site, self.merged, self.profile = seq, site, merged, profile


class ProfileCache:
    """Match profiles of recently checked records, in this process's memory only.

    An entry is valid for the record's `last_hub_seq`: every change to a record
    gives it a new one, so a stale profile is never used. Bounded (least
    recently used out); `size=0` turns it off. Profiles hold normalised names,
    like any record the hub unseals to work on; they never leave the process.
    """

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # the checker thread and request threads share it

    def get(self, record_id: str, seq: int) -> _Entry | None:
        return self.get_many({record_id: seq}).get(record_id)

    def get_many(self, seqs: Mapping[str, int]) -> dict[str, _Entry]:
        """The entries valid for `seqs` ({record: its last_hub_seq}) that are held."""
        out: dict[str, _Entry] = {}
        if self.size <= 0:
            return out
        with self._lock:
            for record_id, seq in seqs.items():
                entry = self._entries.get(record_id)
                if entry is not None and entry.seq == seq:
                    self._entries.move_to_end(record_id)
                    out[record_id] = entry
        return out

    def put(self, record_id: str, entry: _Entry) -> None:
        self.put_many({record_id: entry})

    def put_many(self, entries: Mapping[str, _Entry]) -> None:
        if self.size <= 0 or not entries:
            return
        with self._lock:
            for record_id, entry in entries.items():
                self._entries[record_id] = entry
                self._entries.move_to_end(record_id)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._entries


def _entry(rec: HubRecord) -> _Entry:
    doc = unflatten({p: f["v"] for p, f in rec.fields.items()})
    return _Entry(rec.last_hub_seq, rec.site or "", bool(rec.value(MERGED_INTO)), profile(doc))


def _chunks(items: Iterable[str]) -> Iterable[list[str]]:
    wanted = sorted(set(items))
    for start in range(0, len(wanted), IN_CHUNK):
        yield wanted[start : start + IN_CHUNK]


def index_records(
    conn: sa.Connection, recs: Mapping[str, HubRecord], *, index: BlockIndex
) -> dict[str, dict[str, str]]:
    """Replace the blocking-index entries of `recs` and store their profiles;
    return {record: {hash: key}}."""
    entries = _profiled(conn, recs)
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
    for chunk in _chunks(profiles):
        stmt = sa.select(block_keys.c.record_id, block_keys.c.key_hash).where(
            block_keys.c.record_id.in_(chunk)
        )
        for rid, h in conn.execute(stmt):
            filed.setdefault(rid, set()).add(h)
    # A record filed under its keys already is left alone: a check of unchanged
    # records writes nothing (and on SQLite its commit waits for no disk).
    changed = [rid for rid, keys in keys_of.items() if filed.get(rid, set()) != keys.keys()]
    for chunk in _chunks(rid for rid in changed if rid in filed):
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
    for chunk in _chunks([rid for rid in ids if rid not in new]):
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
    for chunk in _chunks(record_ids):
        conn.execute(sa.delete(pending).where(pending.c.record_id.in_(chunk)))


def clear_checked(conn: sa.Connection, seqs: Mapping[str, int]) -> None:
    """Records checked at these `last_hub_seq`s: off the queue, unless one has
    changed since (it stays queued, to be checked again as it is now)."""
    unchanged: list[str] = []
    for chunk in _chunks(seqs):
        stmt = sa.select(records.c.id, records.c.last_hub_seq).where(records.c.id.in_(chunk))
        unchanged += [rid for rid, seq in conn.execute(stmt) if seqs[rid] == seq]
    clear_pending(conn, unchanged)


def count_pending(conn: sa.Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(pending)).scalar_one())


def all_record_ids(conn: sa.Connection) -> list[str]:
    """Every record id, for a full scan."""
    return list(conn.execute(sa.select(records.c.id).order_by(records.c.id)).scalars())


def _blocks(
    conn: sa.Connection, hashes: Iterable[str]
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """How many records are filed under each of `hashes` (filed already), and
    which, for the blocks of 2 to `MAX_BLOCK` records (a larger one is too common
    to use)."""
    sizes: dict[str, int] = {}
    for chunk in _chunks(hashes):
        stmt = (
            sa.select(block_keys.c.key_hash, sa.func.count())
            .where(block_keys.c.key_hash.in_(chunk))
            .group_by(block_keys.c.key_hash)
        )
        sizes.update((h, int(n)) for h, n in conn.execute(stmt))
    members: dict[str, list[str]] = {}
    # A key only one record carries is the asking record's own: no candidate there.
    for chunk in _chunks(h for h, n in sizes.items() if 1 < n <= MAX_BLOCK):
        stmt = sa.select(block_keys.c.key_hash, block_keys.c.record_id).where(
            block_keys.c.key_hash.in_(chunk)
        )
        for h, rid in conn.execute(stmt):
            members.setdefault(h, []).append(rid)
    return sizes, members


def _known_pairs(conn: sa.Connection, ids: Iterable[str]) -> set[tuple[str, str]]:
    known: set[tuple[str, str]] = set()
    for chunk in _chunks(ids):
        stmt = sa.select(pairs.c.record_a, pairs.c.record_b).where(
            sa.or_(pairs.c.record_a.in_(chunk), pairs.c.record_b.in_(chunk))
        )
        known.update((a, b) for a, b in conn.execute(stmt))
    return known


def _candidate_entries(
    conn: sa.Connection, ids: Iterable[str], master_key: bytes, cache: ProfileCache
) -> dict[str, _Entry]:
    """Profiles of `ids`: from the cache, else from the sealed profile stored for
    the record (`match_profiles`), where the record has not changed since; else
    unsealed and profiled (and stored). Each is cached.

    A check at a large hub reads hundreds of candidates here, so the loop is
    kept lean: plain tuples, one cache lock per chunk."""
    out: dict[str, _Entry] = {}
    stale: list[str] = []
    for chunk in _chunks(ids):
        rows = _candidate_rows(conn, chunk)
        out.update(cache.get_many({row[0]: row[1] for row in rows}))
        opened: dict[str, _Entry] = {}
        for rid, seq, site, wrapped, profile_seq, sealed in rows:
            if rid in out:
                continue
            entry = None
            if profile_seq == seq:
                entry = _stored_entry(rid, seq, site, wrapped, sealed, master_key)
            if entry is None:
                stale.append(rid)
            else:
                opened[rid] = entry
        cache.put_many(opened)
        out.update(opened)
    made = _profiled(conn, load_records(conn, stale, master_key))
    cache.put_many(made)
    return {**out, **made}


def _candidate_rows(conn: sa.Connection, chunk: list[str]) -> list[Any]:
    """(id, last_hub_seq, site, wrapped_key, profile_seq, sealed profile) of each
    record in `chunk`, straight through the driver (`bulk.rows_in`)."""
    sql = (
        "SELECT r.id, r.last_hub_seq, r.site, r.wrapped_key, p.profile_seq, p.sealed"
        f" FROM {records.name} r LEFT JOIN {profiles.name} p ON p.record_id = r.id"
        " WHERE r.id IN ({marks})"
    )
    return rows_in(conn, sql, chunk)


def _stored_entry(
    rid: str, seq: int, site: str | None, wrapped: bytes, sealed: bytes, master_key: bytes
) -> _Entry | None:
    try:
        version, merged, data = from_json(
            RecordCipher(master_key, rid, wrapped).open_json(sealed, "profile")
        )
        if version != PROFILE_VERSION:
            return None  # made by another version of `profile`: make it again
        return _Entry(seq, site or "", bool(merged), profile_from_json(data))
    except (SealError, ValueError, TypeError):
        return None  # unreadable: profile it again


def _profiled(conn: sa.Connection, recs: Mapping[str, HubRecord]) -> dict[str, _Entry]:
    """Profile `recs` (unsealed already) and store each profile sealed under the
    record's own cipher, for the checks to come."""
    entries = {rid: _entry(rec) for rid, rec in recs.items()}
    rows = [
        (
            rid,
            entry.seq,
            recs[rid].cipher.seal(
                [PROFILE_VERSION, entry.merged, profile_to_json(entry.profile)], "profile"
            ),
        )
        for rid, entry in entries.items()
    ]
    for chunk in _chunks(entries):
        conn.execute(sa.delete(profiles).where(profiles.c.record_id.in_(chunk)))
    insert_rows(conn, profiles, ("record_id", "profile_seq", "sealed"), rows)
    return entries


def unprofiled_ids(conn: sa.Connection) -> list[str]:
    """Records with no current stored profile (never checked, or changed since):
    after an upgrade, every record until its next check or a `dedup scan`."""
    stmt = (
        sa.select(records.c.id)
        .select_from(records.outerjoin(profiles, profiles.c.record_id == records.c.id))
        .where(
            sa.or_(
                profiles.c.profile_seq.is_(None), profiles.c.profile_seq != records.c.last_hub_seq
            )
        )
        .order_by(records.c.id)
    )
    return list(conn.execute(stmt).scalars())


def store_profiles(conn: sa.Connection, record_ids: Iterable[str], *, master_key: bytes) -> int:
    """Unseal, profile and store the profiles of `record_ids`; return how many."""
    return len(_profiled(conn, load_records(conn, record_ids, master_key)))


@dataclass(frozen=True)
class Gathered:
    """What scoring a set of records against their candidates needs (`gather`)."""

    mine: dict[str, _Entry]  # the records checked
    others: dict[str, _Entry]  # their candidates not known yet, and the records themselves
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
    skip: Container[str] = (),
) -> Gathered:
    """(Re)index `record_ids`, store their profiles, and read what scoring them
    needs: their candidates (not those in `skip`), profiles and known pairs."""
    cache = cache if cache is not None else ProfileCache(0)
    mine = _candidate_entries(conn, set(record_ids), master_key, cache)
    if not mine:
        return Gathered({}, {}, {}, {}, set())
    keys_of = _index(conn, {rid: e.profile for rid, e in mine.items()}, index)
    sizes, blocks = _blocks(conn, (h for keys in keys_of.values() for h in keys))
    found: dict[str, set[str]] = {}
    for rid, keys in sorted(keys_of.items()):
        if mine[rid].merged:
            continue
        found[rid] = {other for h in keys for other in blocks.get(h, ()) if other not in skip} - {
            rid
        }
    known = _known_pairs(conn, found)
    # A candidate only in pairs known already is not scored: its profile is not read.
    wanted = {
        o
        for rid, cands in found.items()
        for o in cands
        if o not in mine and ((rid, o) if rid < o else (o, rid)) not in known
    }
    others = _candidate_entries(conn, wanted, master_key, cache)
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
    skip: Container[str] = (),
) -> int:
    """(Re)index `record_ids` and queue every new pair scoring >= the review threshold.

    Returns how many pairs were queued. Cost grows with the records' candidates
    (keys shared by more than `MAX_BLOCK` records are skipped), not with the
    database. Pairs already known (open, merged, rejected) are not queued again;
    registrations merged into another are not candidates. Candidates
    in `skip` are not scored (a scan skips the records it has checked already:
    their pairs with these were scored then). In one transaction: `gather`,
    `score_gathered`, `queue_pairs`; a scan runs them in three, to score
    outside the write lock.
    """
    gathered = gather(conn, record_ids, index=index, master_key=master_key, cache=cache, skip=skip)
    return queue_pairs(conn, score_gathered(gathered), now=now, recheck=False)
