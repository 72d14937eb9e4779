"""The read side of the device store: a record by id, its other fields and
history, filtered lists, name search, possible duplicates of a new
registration, and the store's counts, with the result types they return.

`StoreReads` is `field_client.store.Store`'s base class: its queries run on
the store's connection, each in one read transaction, and write nothing. The
write path (register, edit, the outbox) is `field_client.store`'s.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError

from field_client import db
from field_client.sync_store import SyncStatus, SyncStore
from schemas.fields import flatten_doc, split_fields, unflatten
from schemas.matching import REVIEW_THRESHOLD, profile, score
from schemas.names import name_similarity, query_keys
from schemas.record import Registration, RegistrationCreate
from sync.hlc import Stamp

__all__ = [
    "HistoryEntry",
    "NotFound",
    "PossibleDuplicate",
    "RecordSummary",
    "SearchHit",
    "StoreReads",
    "StoreStatus",
    "UnreadableRecord",
    "display_name",
    "read_doc",
]

_SEARCH_CANDIDATES = 200


class NotFound(LookupError):
    """No record with that id (or id prefix) in this store."""


class UnreadableRecord(ValueError):
    """A stored record (received from the hub) whose fields of this schema version
    are not a valid `Registration`: typically a record whose first edits have not
    been pulled yet. Its document and history are kept."""


@dataclass(frozen=True)
class RecordSummary:
    id: str
    name: str
    site: str
    scenario: str | None
    registered_at: str


@dataclass(frozen=True)
class SearchHit:
    id: str
    name: str
    site: str
    score: float


@dataclass(frozen=True)
class PossibleDuplicate:
    """A local record that may be the same person as a new registration."""

    id: str
    name: str
    site: str
    registered_at: str
    score: float
    why: str


@dataclass(frozen=True)
class HistoryEntry:
    field: str
    value: Any
    stamp: Stamp
    device_id: str
    operator: str
    is_current: bool


@dataclass(frozen=True)
class StoreStatus:
    device_id: str
    site: str
    records: int
    own_records: int
    changes: int
    pending_outbox: int
    last_stamp: Stamp
    sync: SyncStatus


def _names(doc: Mapping[str, Any], *keys: str) -> list[str]:
    # Documents pulled from the hub may not validate: read names defensively.
    names = doc.get("names")
    names = names if isinstance(names, dict) else {}
    return [p for p in (names.get(k) for k in keys) if isinstance(p, str) and p]


def display_name(doc: Mapping[str, Any]) -> str:
    """`Given Family (original)` for lists and search results."""
    latin = " ".join(_names(doc, "given", "family"))
    original = " ".join(_names(doc, "given_original", "family_original"))
    if latin and original:
        return f"{latin} ({original})"
    return latin or original or "?"


def _all_names(doc: Mapping[str, Any]) -> list[str]:
    names = doc.get("names")
    aliases = names.get("aliases") if isinstance(names, dict) else None
    extra = [a for a in aliases if isinstance(a, str)] if isinstance(aliases, list) else []
    return _names(doc, "given", "family", "given_original", "family_original") + extra


def read_doc(row: Any) -> tuple[Registration, dict[str, Any]]:
    """The record in a `records` row and its other fields: `{path: value}` of the
    paths this schema version does not know, kept as received (an older
    version's retired field, a newer version's field).

    Raises `UnreadableRecord` when this version's fields do not validate.
    """
    try:
        return Registration.model_validate_json(row.doc), {}
    except ValidationError as exc:
        error = exc
    known, other = split_fields(flatten_doc(json.loads(row.doc)))
    if other:
        try:
            return Registration.model_validate({"id": row.id, **unflatten(known)}), other
        except ValidationError as exc:
            error = exc
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "record"
    raise UnreadableRecord(
        f"record {row.id} does not fit this version of fieldreg"
        f" ({error.error_count()} problem(s), first: {where}: {first['msg']});"
        " it is kept as received: update fieldreg or sync again"
    )


class StoreReads:
    """The read-only queries of a `Store` (its base class)."""

    _conn: sa.Connection
    device_id: str
    site: str
    sync: SyncStore

    def _load_row(self, record_id: str) -> sa.Row[Any]:
        rid = record_id.strip().lower()
        if len(rid) < 8:
            raise NotFound(f"record id {record_id!r} is too short (give at least 8 characters)")
        # A range on the primary key (not LIKE, which SQLite cannot index here):
        # every id starting with `rid` sorts in [rid, rid + U+FFFF).
        ids = db.records.c.id
        stmt = sa.select(db.records).where(ids >= rid, ids < rid + "\uffff").limit(2)
        rows = self._conn.execute(stmt).all()
        if not rows:
            raise NotFound(f"no record {record_id!r} in this store")
        if len(rows) > 1:
            raise NotFound(f"record id prefix {record_id!r} is ambiguous: give more characters")
        return rows[0]

    def get(self, record_id: str) -> Registration:
        """The record with this id (or unique id prefix of >= 8 characters).

        Raises `NotFound`, or `UnreadableRecord` for a received record that
        does not validate under this schema version.
        """
        with self._conn.begin():
            return read_doc(self._load_row(record_id))[0]

    def other_fields(self, record_id: str) -> dict[str, Any]:
        """`{path: value}` of the record's fields that this schema version does not
        know, kept as received: an older version's retired or renamed field (the
        hub keeps those from older devices), a newer version's field. Empty for
        most records. Raises like `get`."""
        with self._conn.begin():
            return read_doc(self._load_row(record_id))[1]

    def history(self, record_id: str) -> list[HistoryEntry]:
        """Every recorded value of every field (own changes and received edits),
        by field and then oldest first, marking the current one."""
        c, r = db.changes.c, db.received.c
        with self._conn.begin():
            row = self._load_row(record_id)
            own = self._conn.execute(
                sa.select(c.field, c.value, c.stamp, c.device_id, c.operator).where(
                    c.record_id == row.id
                )
            ).all()
            received = self._conn.execute(
                sa.select(r.fields, r.stamp, r.device_id, r.operator)
                .where(r.record_id == row.id)
                .order_by(r.id)
            ).all()
        logged = [(f, json.loads(v), s, d, o) for f, v, s, d, o in own]
        for fields, stamp, device_id, operator in received:
            logged.extend((f, v, stamp, device_id, operator) for f, v in json.loads(fields).items())
        logged.sort(key=lambda e: (e[0], e[2], e[3]))
        current = db.decode_versions(row.versions)
        entries = []
        for path, value, stamp_text, device_id, operator in logged:
            stamp = Stamp.decode(stamp_text)
            held = current.get(path)
            is_current = held is not None and (held.stamp, held.device_id) == (stamp, device_id)
            entries.append(HistoryEntry(path, value, stamp, device_id, operator, is_current))
        return entries

    def list_records(
        self,
        *,
        site: str | None = None,
        scenario: str | None = None,
        need: str | None = None,
        registered_from: date | None = None,
        registered_to: date | None = None,
        limit: int | None = None,
    ) -> list[RecordSummary]:
        """Records matching every given filter, most recently registered first."""
        r = db.records.c
        stmt = sa.select(r.id, r.site, r.scenario, r.registered_at, r.doc).order_by(
            r.registered_at.desc(), r.id
        )
        if site:
            stmt = stmt.where(r.site == site)
        if scenario:
            stmt = stmt.where(r.scenario == scenario)
        if need:
            needs = sa.func.json_each(r.doc, "$.situation.needs").table_valued("value")
            stmt = stmt.where(
                sa.exists(sa.select(1).select_from(needs).where(needs.c.value == need))
            )
        if registered_from:
            stmt = stmt.where(r.registered_at >= registered_from.isoformat())
        if registered_to:
            # registered_at is ISO text; the day after `to` bounds it inclusively.
            stmt = stmt.where(sa.func.substr(r.registered_at, 1, 10) <= registered_to.isoformat())
        if limit:
            stmt = stmt.limit(limit)
        with self._conn.begin():
            rows = self._conn.execute(stmt).all()
        return [
            RecordSummary(
                row.id, display_name(json.loads(row.doc)), row.site, row.scenario, row.registered_at
            )
            for row in rows
        ]

    def search(self, text: str, *, limit: int = 20) -> list[SearchHit]:
        """Records whose names match `text` in any script or spelling, best first.

        Candidates come from the match-key index (cost grows with candidates,
        not with the store); the best `_SEARCH_CANDIDATES` by matched query
        tokens are then scored by name similarity.
        """
        by_token = query_keys(text)
        key_to_tokens: dict[str, set[str]] = {}
        for token, keys in by_token.items():
            for key in keys:
                key_to_tokens.setdefault(key, set()).add(token)
        if not key_to_tokens:
            return []
        # SQLite ranks the candidates itself (a common name matches thousands of
        # keys; fetching them all into Python was the cost of a search).
        order = {token: i for i, token in enumerate(by_token)}
        which_token = {key: min(order[t] for t in toks) for key, toks in key_to_tokens.items()}
        mk = db.match_keys.c
        matched = sa.func.count(sa.distinct(sa.case(which_token, value=mk.key))).label("matched")
        hits = sa.func.count().label("hits")
        ranked = (
            sa.select(mk.record_id, matched)
            .where(mk.key.in_(list(key_to_tokens)))
            .group_by(mk.record_id)
            .order_by(matched.desc(), hits.desc(), mk.record_id)
            .limit(_SEARCH_CANDIDATES)
        )
        with self._conn.begin():
            tokens = {rid: n for rid, n in self._conn.execute(ranked)}
            best = list(tokens)
            r = db.records.c
            rows = self._conn.execute(sa.select(r.id, r.site, r.doc).where(r.id.in_(best))).all()
        scored = []
        for row in rows:
            doc = json.loads(row.doc)
            score = name_similarity(text, _all_names(doc)) * (
                0.5 + 0.5 * tokens[row.id] / len(by_token)
            )
            scored.append(SearchHit(row.id, display_name(doc), row.site, round(score, 1)))
        scored.sort(key=lambda h: (-h.score, h.id))
        return scored[:limit]

    def possible_duplicates(
        self, item: RegistrationCreate, *, limit: int = 5
    ) -> list[PossibleDuplicate]:
        """Local records (own and pulled) that may be this person, best first.

        Offline: candidates come from the name-key index like `search`, then
        each is scored field by field with `schemas.matching`, with key
        frequencies counted among the candidates; those at or above the review
        threshold are returned with the fields that agreed.
        """
        names = " ".join(item.names.all_names())
        new = profile(item.model_dump(mode="json"))
        found: list[PossibleDuplicate] = []
        candidates = self.search(names, limit=_SEARCH_CANDIDATES) if names.strip() else []
        with self._conn.begin():
            rows = self._conn.execute(
                sa.select(
                    db.records.c.id, db.records.c.doc, db.records.c.site, db.records.c.registered_at
                ).where(db.records.c.id.in_([c.id for c in candidates]))
            ).all()
        # How many records carry each of the new record's keys: the candidates
        # share its names, so counting among them (plus the new record) stands
        # in for the hub's index, which the scores' thresholds assume.
        docs = {row.id: json.loads(row.doc) for row in rows}
        profiles = {rid: profile(doc) for rid, doc in docs.items()}
        counts = Counter(k for p in profiles.values() for k in p.keys if k in new.keys)
        key_counts = {k: counts[k] + 1 for k in new.keys}
        for row in rows:
            doc = docs[row.id]
            match = score(new, profiles[row.id], key_counts=key_counts)
            if match.score < REVIEW_THRESHOLD or doc.get("merged_into"):
                continue
            agreed = [f"{f.field}: {f.detail}" for f in match.explanation if f.outcome == "agree"]
            found.append(
                PossibleDuplicate(
                    row.id,
                    display_name(doc),
                    row.site,
                    row.registered_at[:10],
                    round(match.score, 2),
                    "; ".join(agreed) or "names are close",
                )
            )
        found.sort(key=lambda d: (-d.score, d.id))
        return found[:limit]

    def status(self) -> StoreStatus:
        """Counts and the outbox backlog."""
        with self._conn.begin():
            meta = {k: v for k, v in self._conn.execute(sa.select(db.meta.c.key, db.meta.c.value))}
            count = sa.select(sa.func.count()).select_from
            records = self._conn.execute(count(db.records)).scalar_one()
            own = self._conn.execute(
                count(db.records).where(db.records.c.origin_device == self.device_id)
            ).scalar_one()
            # Field changes: own ones are a row each, a received edit holds several.
            changes = self._conn.execute(count(db.changes)).scalar_one() + int(
                self._conn.exec_driver_sql(
                    "SELECT coalesce(sum((SELECT count(*) FROM json_each(fields))), 0)"
                    " FROM received"
                ).scalar_one()
            )
        pending = int(meta["device_seq"]) - int(meta["pushed_seq"])
        return StoreStatus(
            self.device_id,
            self.site,
            records,
            own,
            changes,
            pending,
            Stamp.decode(meta["hlc"]),
            self.sync.status(),
        )
