"""The sync side of the device store: enrolment, the outbox position, the hub's
verdicts on this device's edits, and edits pulled from the hub.

All SQL that sync needs lives here; `field_client.sync_runner` decides and
calls, and runs none. A `SyncStore` shares its `Store`'s connection and HLC
clock (one clock per device: a stamp observed while pulling must bound the
next local edit). Every method is one transaction.

The pushed mark (`pushed_seq`) advances only on the hub's answer: `mark_pushed`
after an acknowledgement (never lowering it), `reset_pushed` when the hub says
where it stands (`batch.gap`, `envelope.replayed`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from field_client import db
from schemas.fields import SPLIT_OBJECTS, unflatten
from schemas.names import match_keys
from schemas.record import Registration
from sync.changes import FieldChange, Version
from sync.hlc import Clock, Stamp
from sync.keys import KeyPairs, PublicKeys
from sync.merge import FieldState, Outcome, merge_field
from sync.protocol import Edit, batch_edits, group_changes

__all__ = [
    "AlreadyEnrolled",
    "Enrolment",
    "HubAheadOfStore",
    "PullPosition",
    "PullResult",
    "SyncStatus",
    "SyncStore",
]

_OUTBOX_CHUNK_ROWS = 1000
_LOST_OUTCOMES = ("superseded", "conflict")


class AlreadyEnrolled(RuntimeError):
    """The store is enrolled with a hub already; enrolment is once per store."""


class HubAheadOfStore(ValueError):
    """The hub claims more of this device's changes than this store ever made.

    Happens when a store is restored from an old backup: new changes would
    reuse sequence numbers the hub has applied, so sync must stop.
    """


@dataclass(frozen=True, eq=False)
class Enrolment:
    """What enrolment pins: the hub (URL, public keys, epoch, sites) and this device's keys."""

    hub_url: str
    keys: KeyPairs = field(repr=False)
    hub_keys: PublicKeys
    sites: tuple[str, ...]
    epoch: str
    enrolled_at_ms: int

    @property
    def hub_fingerprint(self) -> str:
        return self.hub_keys.fingerprint()


@dataclass(frozen=True)
class PullPosition:
    """Where the next pull starts: the hub's opaque cursor ("" for the start) and epoch."""

    cursor: str
    epoch: str


@dataclass(frozen=True)
class PullResult:
    """What one pulled page did, counted per field."""

    applied: int  # the pulled value is now the field's value
    superseded: int  # a later value stays current; the pulled one is kept in history
    duplicates: int  # this very version was here already
    new_records: int


@dataclass(frozen=True)
class SyncStatus:
    hub_url: str | None
    hub_fingerprint: str | None
    sites: tuple[str, ...]
    pushed_seq: int
    last_seq: int
    last_sync_at_ms: int | None
    lost_edits: int  # own edits the hub answered superseded or conflict
    quarantined: int  # own edits the hub quarantined
    is_revoked: bool

    @property
    def is_enrolled(self) -> bool:
        return self.hub_url is not None

    @property
    def pending(self) -> int:
        return self.last_seq - self.pushed_seq


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _flatten_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """`schemas.fields.flatten` for a raw document, which may not validate."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "id":
            continue
        if key in SPLIT_OBJECTS and isinstance(value, dict):
            out.update({f"{key}.{sub}": sub_value for sub, sub_value in value.items()})
        else:
            out[key] = value
    return out


def _doc_names(doc: Mapping[str, Any]) -> list[str]:
    names = doc.get("names")
    if not isinstance(names, dict):
        return []
    parts = [names.get(k) for k in ("given", "family", "given_original", "family_original")]
    aliases = names.get("aliases")
    found = [p for p in parts if isinstance(p, str) and p]
    return found + [a for a in aliases or [] if isinstance(a, str) and a]


def _text_at(doc: Mapping[str, Any], outer: str, inner: str) -> str | None:
    part = doc.get(outer)
    value = part.get(inner) if isinstance(part, dict) else None
    return value if isinstance(value, str) else None


_UPDATE_COLUMNS = ("site", "origin_device", "scenario", "registered_at", "doc", "versions")


def _record_row(
    record_id: str, doc: dict[str, Any], versions: Mapping[str, Version]
) -> dict[str, Any]:
    """The `records` row for a merged document.

    A document that validates is stored in its canonical form, exactly like a
    local one. One that does not (a newer device's fields, a record whose
    first edits have not arrived yet) is kept as it is: nothing received is
    dropped, and reads that need a `Registration` say why they cannot.
    """
    columns: dict[str, Any]
    try:
        record = Registration.model_validate(doc)
    except ValidationError:
        columns = {
            "site": _text_at(doc, "registration", "site") or "",
            "origin_device": _text_at(doc, "registration", "device_id") or "",
            "scenario": _text_at(doc, "situation", "scenario"),
            "registered_at": _text_at(doc, "registration", "registered_at") or "",
            "doc": _dumps(doc),
        }
    else:
        columns = {
            "site": record.registration.site,
            "origin_device": record.registration.device_id,
            "scenario": record.situation.scenario.value,
            "registered_at": record.registration.registered_at.isoformat(),
            "doc": record.model_dump_json(),
        }
    versions_json = _dumps({p: v.to_json() for p, v in versions.items()})
    return {"id": record_id, **columns, "versions": versions_json}


@dataclass
class _Merging:
    """One record while a page is merged into it."""

    fields: dict[str, Any]
    versions: dict[str, Version]
    is_new: bool
    is_changed: bool = False
    are_names_changed: bool = False


class SyncStore:
    """Sync state and pulled data, over the `Store`'s connection and clock."""

    def __init__(
        self, conn: sa.Connection, clock: Clock, *, device_id: str, wall_ms: Callable[[], int]
    ) -> None:
        self._conn = conn
        self._clock = clock
        self._device_id = device_id
        self._wall_ms = wall_ms

    # -- meta ------------------------------------------------------------------------------
    def _meta(self) -> dict[str, str]:
        rows = self._conn.execute(sa.select(db.meta.c.key, db.meta.c.value)).all()
        return {k: v for k, v in rows}

    def _put_meta(self, values: Mapping[str, str]) -> None:
        stmt = sqlite_insert(db.meta)
        stmt = stmt.on_conflict_do_update(
            index_elements=[db.meta.c.key], set_={"value": stmt.excluded.value}
        )
        self._conn.execute(stmt, [{"key": k, "value": v} for k, v in values.items()])

    # -- enrolment -------------------------------------------------------------------------
    def read_enrolment(self) -> Enrolment | None:
        """The pinned hub and this device's keys, or None before enrolment."""
        with self._conn.begin():
            meta = self._meta()
        if "device_keys" not in meta:
            return None
        return Enrolment(
            hub_url=meta["hub_url"],
            keys=KeyPairs.from_bytes(base64.b64decode(meta["device_keys"])),
            hub_keys=PublicKeys.from_json(json.loads(meta["hub_public_keys"])),
            sites=tuple(json.loads(meta["sites"])),
            epoch=meta["hub_epoch"],
            enrolled_at_ms=int(meta["enrolled_at"]),
        )

    def save_enrolment(self, enrolment: Enrolment) -> None:
        """Store the enrolment in one transaction; `AlreadyEnrolled` (nothing written) if any.

        The private keys go into this (encrypted) database only. The pull
        cursor starts at the beginning of the hub's epoch.
        """
        with self._conn.begin():
            if "device_keys" in self._meta():
                raise AlreadyEnrolled("this store is enrolled with a hub already")
            self._put_meta(
                {
                    "device_keys": base64.b64encode(enrolment.keys.to_bytes()).decode("ascii"),
                    "hub_url": enrolment.hub_url,
                    "hub_public_keys": _dumps(enrolment.hub_keys.to_json()),
                    "sites": _dumps(list(enrolment.sites)),
                    "hub_epoch": enrolment.epoch,
                    "pull_cursor": "",
                    "enrolled_at": str(enrolment.enrolled_at_ms),
                }
            )

    def mark_revoked(self) -> None:
        """Record that the hub revoked this device (and ordered a wipe). Deletes nothing."""
        with self._conn.begin():
            self._put_meta({"revoked_at": str(self._wall_ms())})

    # -- push ------------------------------------------------------------------------------
    def _outbox_rows(self, after_seq: int, limit: int) -> list[FieldChange]:
        # Raw rows and a version cache: the fields of one edit share their
        # stamp and author, and a batch holds thousands of rows.
        rows = self._conn.exec_driver_sql(
            "SELECT record_id, field, value, stamp, device_id, base_stamp, base_device,"
            " operator, device_seq FROM changes WHERE device_seq > ? ORDER BY device_seq LIMIT ?",
            (after_seq, limit),
        ).all()
        versions: dict[tuple[str, str], Version] = {}

        def version(stamp: str, device: str) -> Version:
            found = versions.get((stamp, device))
            if found is None:
                found = versions[(stamp, device)] = Version(Stamp.decode(stamp), device)
            return found

        return [
            FieldChange(
                record_id=rid,
                field=path,
                value=json.loads(value),
                version=version(stamp, device),
                base=version(base_stamp, base_device) if base_stamp else None,
                operator=operator,
                device_seq=seq,
            )
            for rid, path, value, stamp, device, base_stamp, base_device, operator, seq in rows
        ]

    def _outbox_edits(self, after_seq: int, chunk_rows: int) -> Iterator[Edit]:
        """Whole edits after `after_seq`, read `chunk_rows` change rows at a time.

        A full chunk may end inside an edit: its last group is read again
        with the next chunk (or, if the chunk is one edit, with a bigger one).
        """
        limit = chunk_rows
        while True:
            rows = self._outbox_rows(after_seq, limit)
            edits = list(group_changes(rows))
            if len(rows) == limit:
                if len(edits) == 1:
                    limit *= 2
                    continue
                edits.pop()
            yield from edits
            if len(rows) < limit:
                return
            last = edits[-1].last_seq
            assert last is not None
            after_seq, limit = last, chunk_rows

    def outbox_edits(
        self, max_batch_bytes: int, *, chunk_rows: int = _OUTBOX_CHUNK_ROWS
    ) -> list[Edit]:
        """The next batch to push: whole edits above the pushed mark, in sequence order,
        cut by `sync.protocol.batch_edits` at `max_batch_bytes` ([] when all is pushed).

        The same store and limit give the same batch until the mark moves, so a
        batch re-sent after a lost answer has the same id and content.
        """
        with self._conn.begin():
            pushed = int(self._meta()["pushed_seq"])
            edits = self._outbox_edits(pushed, chunk_rows)
            return next(batch_edits(edits, max_batch_bytes), [])

    def _check_not_ahead(self, seq: int, meta: Mapping[str, str]) -> None:
        if seq > int(meta["device_seq"]):
            raise HubAheadOfStore(
                f"the hub has applied changes up to {seq} from this device, but this store"
                f" made only {meta['device_seq']}: was it restored from an old copy?"
            )

    def mark_pushed(self, high_water: int, verdicts: Mapping[int, str]) -> int:
        """Record the hub's acknowledgement: raise the pushed mark to `high_water`
        (never lower it) and set the outcome of each own change in `verdicts`
        (device seq → 'applied' | 'superseded' | 'conflict' | 'quarantined:<reason>').

        Returns the mark. Raises `HubAheadOfStore` (nothing written) if the hub
        claims more than this store made.
        """
        with self._conn.begin():
            meta = self._meta()
            self._check_not_ahead(high_water, meta)
            mark = max(int(meta["pushed_seq"]), high_water)
            if verdicts:
                stmt = (
                    sa.update(db.changes)
                    .where(db.changes.c.device_seq == sa.bindparam("seq"))
                    .values(outcome=sa.bindparam("verdict"))
                )
                rows = [{"seq": s, "verdict": v} for s, v in sorted(verdicts.items())]
                self._conn.execute(stmt, rows)
            self._put_meta({"pushed_seq": str(mark), "last_sync_at": str(self._wall_ms())})
        return mark

    def reset_pushed(self, seq: int) -> None:
        """Set the pushed mark to `seq`, lower or higher, because the hub said so.

        Verdicts above a lowered mark are cleared: they will come again.
        Raises `HubAheadOfStore` (nothing written) past the last change made.
        """
        with self._conn.begin():
            meta = self._meta()
            self._check_not_ahead(seq, meta)
            self._conn.execute(
                sa.update(db.changes).where(db.changes.c.device_seq > seq).values(outcome=None)
            )
            self._put_meta({"pushed_seq": str(max(seq, 0))})

    def pushed_seq(self) -> int:
        """The pushed mark: every own change up to it is confirmed by the hub."""
        with self._conn.begin():
            return int(self._meta()["pushed_seq"])

    def pending_count(self) -> int:
        """How many own changes wait above the pushed mark."""
        with self._conn.begin():
            meta = self._meta()
        return int(meta["device_seq"]) - int(meta["pushed_seq"])

    # -- pull ------------------------------------------------------------------------------
    def pull_position(self) -> PullPosition:
        with self._conn.begin():
            meta = self._meta()
        return PullPosition(meta.get("pull_cursor", ""), meta.get("hub_epoch", ""))

    def restart_pull(self, epoch: str) -> None:
        """Pull from the start of hub epoch `epoch` next time (merging is idempotent)."""
        with self._conn.begin():
            self._put_meta({"pull_cursor": "", "hub_epoch": epoch})

    def apply_pull(self, edits: Sequence[Edit], *, cursor: str, epoch: str) -> PullResult:
        """Merge a pulled page and store `cursor` and `epoch`, all in one transaction.

        Each field is merged with `sync.merge.merge_field` against the local
        value and version: the higher version becomes current, the other is
        kept in the change log (history). Documents keep fields this schema
        version does not know. Match keys follow name changes; every stamp is
        observed by the HLC, which is persisted. A change already in the log
        (same record, field and version) is not logged twice, so a page pulled
        again changes nothing.
        """
        counts = dict.fromkeys(Outcome, 0)
        recorded_at = self._iso_now()
        with self._conn.begin():
            merging = self._load_for_merge({e.record_id for e in edits})
            logged = self._logged_versions(set(merging))
            change_rows: list[tuple[Any, ...]] = []
            for edit in edits:
                self._clock.observe(edit.version.stamp)
                state = merging[edit.record_id]
                stamp = edit.version.stamp.encode()
                for path, value in edit.fields:
                    incoming = FieldState(value, edit.version, edit.bases.get(path))
                    current = (
                        FieldState(state.fields.get(path), state.versions[path])
                        if path in state.versions
                        else None
                    )
                    decision = merge_field(current, incoming)
                    counts[decision.outcome] += 1
                    if decision.outcome is Outcome.APPLIED:
                        state.fields[path] = value
                        state.versions[path] = edit.version
                        state.is_changed = True
                        state.are_names_changed |= path.startswith("names.")
                    key = (edit.record_id, path, stamp, edit.version.device_id)
                    if key in logged:
                        continue
                    logged.add(key)
                    base = edit.bases.get(path)
                    change_rows.append(
                        (
                            edit.record_id,
                            path,
                            _dumps(value),
                            stamp,
                            edit.version.device_id,
                            base.stamp.encode() if base else None,
                            base.device_id if base else None,
                            edit.operator,
                            None,
                            edit.hub_seq,
                            recorded_at,
                        )
                    )
            self._write_merged(merging)
            if change_rows:
                self._conn.exec_driver_sql(
                    "INSERT INTO changes (record_id, field, value, stamp, device_id, base_stamp,"
                    " base_device, operator, device_seq, hub_seq, recorded_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    change_rows,
                )
            self._put_meta(
                {
                    "hlc": self._clock.last.encode(),
                    "pull_cursor": cursor,
                    "hub_epoch": epoch,
                    "last_sync_at": str(self._wall_ms()),
                }
            )
        return PullResult(
            applied=counts[Outcome.APPLIED],
            superseded=counts[Outcome.SUPERSEDED],
            duplicates=counts[Outcome.DUPLICATE],
            new_records=sum(1 for s in merging.values() if s.is_new and s.is_changed),
        )

    def _iso_now(self) -> str:
        return datetime.fromtimestamp(self._wall_ms() / 1000, UTC).isoformat(timespec="seconds")

    def _load_for_merge(self, record_ids: set[str]) -> dict[str, _Merging]:
        r = db.records.c
        rows = self._conn.execute(
            sa.select(r.id, r.doc, r.versions).where(r.id.in_(sorted(record_ids)))
        ).all()
        merging = {
            row.id: _Merging(
                fields=_flatten_doc(json.loads(row.doc)),
                versions={p: Version.from_json(v) for p, v in json.loads(row.versions).items()},
                is_new=False,
            )
            for row in rows
        }
        for rid in record_ids - set(merging):
            merging[rid] = _Merging(fields={}, versions={}, is_new=True)
        return merging

    def _logged_versions(self, record_ids: set[str]) -> set[tuple[str, str, str, str]]:
        c = db.changes.c
        rows = self._conn.execute(
            sa.select(c.record_id, c.field, c.stamp, c.device_id).where(
                c.record_id.in_(sorted(record_ids))
            )
        ).all()
        return {(row[0], row[1], row[2], row[3]) for row in rows}

    def _write_merged(self, merging: Mapping[str, _Merging]) -> None:
        # One statement per kind of write for the whole page: a page of 500
        # new records is 500 rows in one executemany, not 500 round trips.
        inserts: list[dict[str, Any]] = []
        updates: list[tuple[Any, ...]] = []
        rekeyed: list[str] = []
        key_rows: set[tuple[str, str]] = set()
        for rid, state in merging.items():
            if not state.is_changed:
                continue
            row = _record_row(rid, {"id": rid, **unflatten(state.fields)}, state.versions)
            if state.is_new:
                inserts.append(row)
            else:
                updates.append((*(row[c] for c in _UPDATE_COLUMNS), rid))
            if state.is_new or state.are_names_changed:
                rekeyed.append(rid)
                key_rows.update((k, rid) for k in match_keys(_doc_names(json.loads(row["doc"]))))
        if inserts:
            self._conn.execute(sa.insert(db.records), inserts)
        if updates:
            assignments = ", ".join(f"{c} = ?" for c in _UPDATE_COLUMNS)
            self._conn.exec_driver_sql(f"UPDATE records SET {assignments} WHERE id = ?", updates)
        if rekeyed:
            self._conn.execute(
                sa.delete(db.match_keys).where(db.match_keys.c.record_id.in_(rekeyed))
            )
        if key_rows:
            self._conn.exec_driver_sql(
                "INSERT OR IGNORE INTO match_keys (key, record_id) VALUES (?, ?)", sorted(key_rows)
            )

    # -- status ----------------------------------------------------------------------------
    def status(self) -> SyncStatus:
        """Enrolment, the push position, the last contact, and the hub's verdicts so far."""
        c = db.changes.c
        own = sa.select(sa.func.count()).where(c.device_seq.is_not(None))
        with self._conn.begin():
            meta = self._meta()
            lost = self._conn.execute(own.where(c.outcome.in_(_LOST_OUTCOMES))).scalar_one()
            quarantined = self._conn.execute(
                own.where(c.outcome.startswith("quarantined:"))
            ).scalar_one()
        hub_keys = meta.get("hub_public_keys")
        return SyncStatus(
            hub_url=meta.get("hub_url"),
            hub_fingerprint=(
                PublicKeys.from_json(json.loads(hub_keys)).fingerprint() if hub_keys else None
            ),
            sites=tuple(json.loads(meta.get("sites", "[]"))),
            pushed_seq=int(meta["pushed_seq"]),
            last_seq=int(meta["device_seq"]),
            last_sync_at_ms=int(meta["last_sync_at"]) if "last_sync_at" in meta else None,
            lost_edits=lost,
            quarantined=quarantined,
            is_revoked="revoked_at" in meta,
        )
