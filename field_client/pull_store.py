"""Merging a pulled page into the device store (the SQL side of a pull).

Every field of every pulled edit is merged with `sync.merge.merge_field`
against the local value and version; the records that changed are written
back (canonical form when this version's fields validate, with any other
field kept beside them as received; as received when not), their match
keys follow name changes, and every pulled field change not already logged
is appended to the change log. The caller owns the transaction and stores
the cursor in it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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
from sync.protocol import Edit

__all__ = ["PullResult", "merge_page"]

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# Enum members are descriptors on their class: read them once, not once per field.
_APPLIED, _SUPERSEDED = Outcome.APPLIED, Outcome.SUPERSEDED
_RECORD_COLUMNS = ("site", "origin_device", "scenario", "registered_at", "doc", "versions")
_INSERT_CHANGE = (
    "INSERT INTO changes (record_id, field, value, stamp, device_id, base_stamp,"
    " base_device, operator, device_seq, hub_seq, recorded_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


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
            versions={p: Version.from_json(v) for p, v in json.loads(versions).items()},
            is_new=False,
        )
        for rid, doc, versions in rows
    }
    for rid in record_ids - set(merging):
        merging[rid] = _Merging(fields={}, versions={}, is_new=True)
    return merging


def _logged_versions(
    conn: sa.Connection, record_ids: Sequence[str]
) -> set[tuple[str, str, str, str]]:
    rows = _in_chunks(
        conn,
        "SELECT record_id, field, stamp, device_id FROM changes WHERE record_id IN ({marks})",
        sorted(record_ids),
    )
    return {(row[0], row[1], row[2], row[3]) for row in rows}


def merge_page(
    conn: sa.Connection, clock: Clock, edits: Sequence[Edit], *, recorded_at: str
) -> PullResult:
    """Merge `edits` into the store inside the caller's transaction; return the counts.

    Every stamp is observed by `clock` (the caller persists it). A change
    already in the log (same record, field and version) is not logged twice,
    so a page merged again changes nothing.
    """
    merging = _load(conn, {e.record_id for e in edits})
    logged = _logged_versions(conn, list(merging))
    change_rows: list[tuple[Any, ...]] = []
    add_row, encode = change_rows.append, _JSON.encode
    applied = superseded = duplicates = 0
    for edit in edits:
        clock.observe(edit.version.stamp)
        state = merging[edit.record_id]
        fields, versions, bases = state.fields, state.versions, edit.bases
        version, rid, operator, hub_seq = edit.version, edit.record_id, edit.operator, edit.hub_seq
        stamp, device_id = version.stamp.encode(), version.device_id
        for path, value in edit.fields:
            base = bases.get(path) if bases else None
            held = versions.get(path)
            current = None if held is None else FieldState(fields.get(path), held)
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
            key = (rid, path, stamp, device_id)
            if key in logged:
                continue
            logged.add(key)
            add_row(
                (
                    rid,
                    path,
                    encode(value),
                    stamp,
                    device_id,
                    base.stamp.encode() if base else None,
                    base.device_id if base else None,
                    operator,
                    None,
                    hub_seq,
                    recorded_at,
                )
            )
    _write_records(conn, merging)
    if change_rows:
        conn.exec_driver_sql(_INSERT_CHANGE, change_rows)
    return PullResult(
        applied=applied,
        superseded=superseded,
        duplicates=duplicates,
        new_records=sum(1 for s in merging.values() if s.is_new and s.is_changed),
    )


class _VersionsJson:
    """Writes a record's versions as the JSON object `{path: [stamp, device]}`.

    The fields of one edit share one version object and every record has the
    same few paths, so each is encoded once per page.
    """

    def __init__(self) -> None:
        self._versions: dict[int, tuple[Version, str]] = {}
        self._paths: dict[str, str] = {}

    def __call__(self, versions: Mapping[str, Version]) -> str:
        parts = []
        for path, version in versions.items():
            # By identity (hashing a version costs more than encoding it); the
            # object is kept with its text, so its id cannot be reused meanwhile.
            known = self._versions.get(id(version))
            if known is None:
                known = self._versions[id(version)] = (version, _JSON.encode(version.to_json()))
            key = self._paths.get(path)
            if key is None:
                key = self._paths[path] = _JSON.encode(path)
            parts.append(f"{key}:{known[1]}")
        return "{" + ",".join(parts) + "}"


def _write_records(conn: sa.Connection, merging: Mapping[str, _Merging]) -> None:
    # One statement per kind of write for the whole page: a page of 500 new
    # records is 500 rows in one executemany, not 500 round trips.
    inserts: list[tuple[Any, ...]] = []
    updates: list[tuple[Any, ...]] = []
    rekeyed: list[str] = []
    key_rows: set[tuple[str, str]] = set()
    versions_json = _VersionsJson()
    for rid, state in merging.items():
        if not state.is_changed:
            continue
        columns, names = _record_columns(rid, state.fields, versions_json(state.versions))
        if state.is_new:
            inserts.append((rid, *columns))
        else:
            updates.append((*columns, rid))
        if state.is_new or state.are_names_changed:
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
