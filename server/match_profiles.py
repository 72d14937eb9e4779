"""Match profiles for the hub's duplicate checks: where a check gets the
profile of a record it scores, and keeps it.

A profile (`schemas.matching.profile`) is stored sealed under its record's
own data key (`match_profiles`), valid while its `profile_seq` equals the
record's `last_hub_seq` and it was made by this `PROFILE_VERSION`; recently
used ones are also kept in this process's memory (`ProfileCache`). A
candidate's whole state is unsealed and profiled again only after it (or the
matcher) changed. Erasing a record destroys its key, and with it its profile.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from pydantic_core import from_json

from schemas.fields import unflatten
from schemas.matching import PROFILE_VERSION, Profile, profile, profile_from_json, profile_to_json
from server.bulk import chunks, insert_rows, rows_in
from server.models import MatchProfile, RecordRow
from server.records import HubRecord, load_records
from server.sealing import RecordCipher, SealError

__all__ = [
    "MERGED_INTO",
    "Entry",
    "ProfileCache",
    "entry_of",
    "read_entries",
    "store_entries",
    "store_profiles",
    "unprofiled_ids",
]

records = RecordRow.__table__  # type: ignore[attr-defined]
profiles = MatchProfile.__table__  # type: ignore[attr-defined]
MERGED_INTO = "merged_into"


class Entry:
    """A record as a check scores it: its profile, made at `seq` (its
    `last_hub_seq` then), its site, and whether it is merged into another."""

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
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()  # the checker thread and request threads share it

    def get(self, record_id: str, seq: int) -> Entry | None:
        return self.get_many({record_id: seq}).get(record_id)

    def get_many(self, seqs: Mapping[str, int]) -> dict[str, Entry]:
        """The entries valid for `seqs` ({record: its last_hub_seq}) that are held."""
        out: dict[str, Entry] = {}
        if self.size <= 0:
            return out
        with self._lock:
            for record_id, seq in seqs.items():
                entry = self._entries.get(record_id)
                if entry is not None and entry.seq == seq:
                    self._entries.move_to_end(record_id)
                    out[record_id] = entry
        return out

    def put(self, record_id: str, entry: Entry) -> None:
        self.put_many({record_id: entry})

    def put_many(self, entries: Mapping[str, Entry]) -> None:
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


def entry_of(rec: HubRecord) -> Entry:
    doc = unflatten({p: f["v"] for p, f in rec.fields.items()})
    return Entry(rec.last_hub_seq, rec.site or "", bool(rec.value(MERGED_INTO)), profile(doc))


def read_entries(
    conn: sa.Connection, ids: Iterable[str], master_key: bytes, cache: ProfileCache
) -> dict[str, Entry]:
    """Profiles of `ids`: from the cache, else from the sealed profile stored for
    the record (`match_profiles`), where the record has not changed since; else
    unsealed and profiled (and stored). Each is cached.

    A check at a large hub reads hundreds of candidates here, so the loop is
    kept lean: plain tuples, one cache lock per chunk."""
    out: dict[str, Entry] = {}
    stale: list[str] = []
    for chunk in chunks(ids):
        rows = _candidate_rows(conn, chunk)
        out.update(cache.get_many({row[0]: row[1] for row in rows}))
        opened: dict[str, Entry] = {}
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
    made = store_entries(conn, load_records(conn, stale, master_key))
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
) -> Entry | None:
    try:
        version, merged, data = from_json(
            RecordCipher(master_key, rid, wrapped).open_json(sealed, "profile")
        )
        if version != PROFILE_VERSION:
            return None  # made by another version of `profile`: make it again
        return Entry(seq, site or "", bool(merged), profile_from_json(data))
    except (SealError, ValueError, TypeError):
        return None  # unreadable: profile it again


def store_entries(conn: sa.Connection, recs: Mapping[str, HubRecord]) -> dict[str, Entry]:
    """Profile `recs` (unsealed already) and store each profile sealed under the
    record's own cipher, for the checks to come."""
    entries = {rid: entry_of(rec) for rid, rec in recs.items()}
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
    for chunk in chunks(entries):
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
    return len(store_entries(conn, load_records(conn, record_ids, master_key)))
