"""Merging a pulled page into the device store (the SQL side of a pull).

Every field of every pulled edit is merged with `sync.merge.merge_field`
against the local value and version; the records that changed are written
back (canonical form when this version's fields validate, with any other
field kept beside them as received; as received when not), their match
keys follow name changes, and each pulled edit is appended to the history
(`received`, one row per edit) with those of its fields not already logged.
The caller owns the transaction and stores the cursor in it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError

from field_client import db
from schemas.fields import flatten, flatten_doc, split_fields, unflatten
from schemas.names import match_keys
from schemas.record import Registration
from sync.changes import Version
from sync.hlc import Clock
from sync.merge import FieldState, Outcome, merge_field
from sync.protocol import Edit, Released

__all__ = ["PullResult", "merge_page", "release_own"]

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# Enum members are descriptors on their class: read them once, not once per field.
_APPLIED, _SUPERSEDED = Outcome.APPLIED, Outcome.SUPERSEDED
_RECORD_COLUMNS = ("site", "origin_device", "scenario", "registered_at", "doc", "versions")
_INSERT_RECEIVED = (
    "INSERT INTO received (record_id, stamp, device_id, operator, fields, bases, hub_seq,"
    " recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_WHERE_IN = " WHERE record_id IN ({marks})"


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


@dataclass
class _Merging:
    """One record while a page is merged into it."""

    fields: dict[str, Any]
    versions: dict[str, Version]
    is_new: bool
    is_changed: bool = False
    are_names_changed: bool = False


@dataclass(frozen=True)
class PullResult:
    """What one pulled page did, counted per field."""

    applied: int  # the pulled value is now the field's value
    superseded: int  # a later value stays current; the pulled one is kept in history
    duplicates: int  # this very version was here already
    new_records: int
    released: int = 0  # own changes the hub had quarantined (record.unknown) and applied since


def _record_columns(
    rid: str, fields: dict[str, Any], versions_json: str
) -> tuple[tuple[Any, ...], list[str]]:
    """The `records` columns (in `_RECORD_COLUMNS` order) and the names to index.

    A record whose fields of this schema version validate is stored in its
    canonical form, exactly like a local one, with the fields this version
    does not know (an older version's retired field, a newer version's field)
    beside them as received. One that does not validate (a record whose first
    edits have not arrived yet) is kept as it is: nothing received is dropped,
    and reads that need a `Registration` say why they cannot.
    """
    known, other = split_fields(fields)
    doc = {"id": rid, **unflatten(known)}
    try:
        record = Registration.model_validate(doc)
    except ValidationError:
        doc = {"id": rid, **unflatten(fields)}
        columns = (
            _text_at(doc, "registration", "site") or "",
            _text_at(doc, "registration", "device_id") or "",
            _text_at(doc, "situation", "scenario"),
            _text_at(doc, "registration", "registered_at") or "",
            _JSON.encode(doc),
            versions_json,
        )
        return columns, _doc_names(doc)
    columns = (
        record.registration.site,
        record.registration.device_id,
        record.situation.scenario.value,
        record.registration.registered_at.isoformat(),
        _JSON.encode({"id": rid, **unflatten({**flatten(record), **other})})
        if other
        else record.model_dump_json(),
        versions_json,
    )
    return columns, record.names.all_names()


def _in_chunks(conn: sa.Connection, select: str, ids: Sequence[str], chunk: int = 500) -> list[Any]:
    # Plain driver SQL: compiling an IN of hundreds of ids through SQLAlchemy
    # for every page costs more than the query.
    rows: list[Any] = []
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        marks = ", ".join("?" * len(part))
        rows.extend(conn.exec_driver_sql(select.format(marks=marks), tuple(part)).all())
    return rows


def _load(conn: sa.Connection, record_ids: set[str]) -> dict[str, _Merging]:
    rows = _in_chunks(
        conn, "SELECT id, doc, versions FROM records WHERE id IN ({marks})", sorted(record_ids)
    )
    merging = {
        rid: _Merging(
            fields=flatten_doc(json.loads(doc)),
            versions=db.decode_versions(versions),
            is_new=False,
        )
        for rid, doc, versions in rows
    }
    for rid in record_ids - set(merging):
        merging[rid] = _Merging(fields={}, versions={}, is_new=True)
    return merging


class _Log:
    """The fields of each (record, stamp, device) already in the history: the
    device's own changes and the received edits of the page's records.

    A received row's fields are read only when the same version comes again
    (a page merged twice): a first pull never parses them.
    """

    def __init__(self, conn: sa.Connection, record_ids: Sequence[str]) -> None:
        self._sources: dict[tuple[str, str, str], list[Any]] = {}
        ids = sorted(record_ids)
        select_own = "SELECT record_id, stamp, device_id, field FROM changes"
        for rid, stamp, device, path in _in_chunks(conn, select_own + _WHERE_IN, ids):
            self._sources.setdefault((rid, stamp, device), []).append((path,))
        select_received = "SELECT record_id, stamp, device_id, fields FROM received"
        for rid, stamp, device, fields in _in_chunks(conn, select_received + _WHERE_IN, ids):
            self._sources.setdefault((rid, stamp, device), []).append(fields)

    def paths(self, key: tuple[str, str, str]) -> set[str] | None:
        """The logged paths of this version (None: none is)."""
        sources = self._sources.get(key)
        if sources is None:
            return None
        if len(sources) == 1 and isinstance(sources[0], set):
            return sources[0]
        paths: set[str] = set()
        for source in sources:
            paths.update(json.loads(source) if isinstance(source, str) else source)
        self._sources[key] = [paths]
        return paths

    def add(self, key: tuple[str, str, str], paths: Iterable[str]) -> None:
        self._sources.setdefault(key, []).append(paths)


def _merge_edit(state: _Merging, edit: Edit) -> tuple[int, int, int]:
    """Merge each field of `edit` into `state`; (applied, superseded, duplicates)."""
    fields, versions, version = state.fields, state.versions, edit.version
    if not versions:
        # Nothing written yet (a new record): `merge_field` applies every field.
        paths = [path for path, _ in edit.fields]
        fields.update(edit.fields)
        versions.update(dict.fromkeys(paths, version))
        state.is_changed = True
        state.are_names_changed = any(path.startswith("names.") for path in paths)
        return len(paths), 0, 0
    bases = edit.bases
    applied = superseded = duplicates = 0
    for path, value in edit.fields:
        held = versions.get(path)
        if held is None:
            outcome = _APPLIED  # what `merge_field` says of a field never written
        else:
            base = bases.get(path) if bases else None
            current = FieldState(fields.get(path), held)
            outcome = merge_field(current, FieldState(value, version, base)).outcome
        if outcome is _APPLIED:
            applied += 1
            fields[path] = value
            versions[path] = version
            state.is_changed = True
            if path.startswith("names."):
                state.are_names_changed = True
        elif outcome is _SUPERSEDED:
            superseded += 1
        else:
            duplicates += 1
    return applied, superseded, duplicates


def merge_page(
    conn: sa.Connection, clock: Clock, edits: Sequence[Edit], *, recorded_at: str
) -> PullResult:
    """Merge `edits` into the store inside the caller's transaction; return the counts.

    Every stamp is observed by `clock` (the caller persists it). Each edit is
    logged as one `received` row with the fields not already in the history
    (same record, field and version), so a page merged again changes nothing.
    """
    merging = _load(conn, {e.record_id for e in edits})
    log = _Log(conn, list(merging))
    rows: list[tuple[Any, ...]] = []
    encode = _JSON.encode
    applied = superseded = duplicates = 0
    for edit in edits:
        clock.observe(edit.version.stamp)
        now_applied, now_superseded, now_duplicates = _merge_edit(merging[edit.record_id], edit)
        applied += now_applied
        superseded += now_superseded
        duplicates += now_duplicates
        version, rid, bases = edit.version, edit.record_id, edit.bases
        key = (rid, version.stamp.encode(), version.device_id)
        logged = log.paths(key)
        new = edit.fields if logged is None else [f for f in edit.fields if f[0] not in logged]
        if not new:
            continue
        log.add(key, [path for path, _ in new])
        based = {p: bases[p].to_json() for p, _ in new if p in bases} if bases else None
        rows.append(
            (
                *key,
                edit.operator,
                encode(dict(new)),
                encode(based) if based else None,
                edit.hub_seq,
                recorded_at,
            )
        )
    _write_records(conn, merging)
    if rows:
        conn.exec_driver_sql(_INSERT_RECEIVED, rows)
    return PullResult(
        applied=applied,
        superseded=superseded,
        duplicates=duplicates,
        new_records=sum(1 for s in merging.values() if s.is_new and s.is_changed),
    )


def _write_records(conn: sa.Connection, merging: Mapping[str, _Merging]) -> None:
    # One statement per kind of write for the whole page: a page of 500 new
    # records is 500 rows in one executemany, not 500 round trips.
    inserts: list[tuple[Any, ...]] = []
    updates: list[tuple[Any, ...]] = []
    rekeyed: list[str] = []
    key_rows: set[tuple[str, str]] = set()
    for rid, state in merging.items():
        if not state.is_changed:
            continue
        columns, names = _record_columns(rid, state.fields, db.encode_versions(state.versions))
        if state.is_new:
            inserts.append((rid, *columns))
        else:
            updates.append((*columns, rid))
        if state.is_new or state.are_names_changed:
            if not state.is_new:  # a new record has no keys to drop
                rekeyed.append(rid)
            key_rows.update((k, rid) for k in match_keys(names))
    if inserts:
        names_sql = ", ".join(("id", *_RECORD_COLUMNS))
        marks = ", ".join("?" * (len(_RECORD_COLUMNS) + 1))
        conn.exec_driver_sql(f"INSERT INTO records ({names_sql}) VALUES ({marks})", inserts)
    if updates:
        assignments = ", ".join(f"{c} = ?" for c in _RECORD_COLUMNS)
        conn.exec_driver_sql(f"UPDATE records SET {assignments} WHERE id = ?", updates)
    if rekeyed:
        conn.execute(sa.delete(db.match_keys).where(db.match_keys.c.record_id.in_(rekeyed)))
    if key_rows:
        conn.exec_driver_sql(
            "INSERT OR IGNORE INTO match_keys (key, record_id) VALUES (?, ?)", sorted(key_rows)
        )


# What the device records of the hub's verdict on one field of a released edit
# (the change log's outcome): the words an acknowledgement gives it.
_VERDICTS = {"superseded": "superseded", "conflict": "conflict"}
_PARKED = "quarantined:record.unknown%"


def release_own(conn: sa.Connection, released: Iterable[Released]) -> int:
    """Take the hub's verdict on own edits it had parked as `record.unknown`
    and applied since (inside the caller's transaction): each of their
    changes still marked quarantined for that reason becomes 'applied', or
    'superseded' or 'conflict' where the hub says so. A change with any other
    outcome is left as it is. Returns the changes updated."""
    updated = 0
    for item in released:
        span = (item.first_seq, item.last_seq)
        for path, outcome in item.outcomes.items():
            updated += conn.exec_driver_sql(
                "UPDATE changes SET outcome = ? WHERE device_seq BETWEEN ? AND ?"
                " AND field = ? AND outcome LIKE ?",
                (_VERDICTS.get(outcome, "applied"), *span, path, _PARKED),
            ).rowcount
        updated += conn.exec_driver_sql(
            "UPDATE changes SET outcome = 'applied' WHERE device_seq BETWEEN ? AND ?"
            " AND outcome LIKE ?",
            (*span, _PARKED),
        ).rowcount
    return updated
