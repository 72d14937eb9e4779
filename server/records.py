"""Records at the hub: sealed per-field state plus clear reporting columns.

A record's state is one sealed JSON object `{field: {"v", "s", "d", "b", "o"}}`
(value, stamp, device, base, operator) under the record's own data key. The
clear columns are a projection of it for statistics and scoping; they are
recomputed whenever the state changes.

The state holds every path the record's edits carried, including fields this
schema version does not know (an older device's retired fields, which ingest
keeps): sealed like the rest, merged per field, never projected in clear.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa

from schemas.record import DateOfBirth, age_band
from server.bulk import insert_rows, rows_in, update_rows
from server.models import RecordRow
from server.sealing import RecordCipher, compact_json, new_record_cipher
from sync.changes import Version
from sync.hlc import Stamp
from sync.merge import FieldState

__all__ = ["HubRecord", "load_records", "projection", "save_records"]

records = RecordRow.__table__  # type: ignore[attr-defined]

_PROJECTED = (
    "site",
    "scenario",
    "sex",
    "age_band",
    "nationalities",
    "vulnerabilities",
    "needs",
    "registered_at",
    "schema_version",
)
_SAVED = ("state", "last_hub_seq", "updated_at", *_PROJECTED)


@dataclass
class HubRecord:
    """A record being worked on inside one transaction."""

    id: str
    wrapped_key: bytes
    cipher: RecordCipher
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    is_new: bool = False
    is_dirty: bool = False
    last_hub_seq: int = 0

    @classmethod
    def new(cls, record_id: str, master_key: bytes) -> HubRecord:
        wrapped, cipher = new_record_cipher(master_key, record_id)
        return cls(record_id, wrapped, cipher, is_new=True)

    def state(self, path: str) -> FieldState | None:
        raw = self.fields.get(path)
        if raw is None:
            return None
        base = Version(Stamp.decode(raw["b"][0]), raw["b"][1]) if raw.get("b") else None
        return FieldState(raw["v"], Version(Stamp.decode(raw["s"]), raw["d"]), base)

    def set(self, path: str, state: FieldState, operator: str) -> None:
        base = state.base.to_json() if state.base else None
        version = state.version
        self.put(path, state.value, version.stamp.encode(), version.device_id, base, operator)

    def put(
        self,
        path: str,
        value: Any,
        stamp: str,
        device_id: str,
        base: list[str] | None,
        operator: str,
    ) -> None:
        """`set` with the version already encoded (the fields of one edit share it)."""
        self.fields[path] = {"v": value, "s": stamp, "d": device_id, "b": base, "o": operator}
        self.is_dirty = True

    def value(self, path: str) -> Any:
        raw = self.fields.get(path)
        return None if raw is None else raw["v"]

    @property
    def site(self) -> str | None:
        registration = self.value("registration")
        return registration.get("site") if isinstance(registration, dict) else None


_LIST_TEXTS: dict[tuple[str, ...], str] = {}  # a few hundred code lists recur in every push
_LIST_TEXTS_MAX = 4096


def _list(value: Any) -> str:
    if not value or not isinstance(value, list):
        return "[]"
    codes = tuple(sorted(v for v in value if isinstance(v, str)))
    text = _LIST_TEXTS.get(codes)
    if text is None:
        text = json.dumps(list(codes))
        if len(_LIST_TEXTS) < _LIST_TEXTS_MAX:
            _LIST_TEXTS[codes] = text
    return text


def projection(rec: HubRecord, today: date) -> dict[str, Any]:
    """The clear reporting columns of a record (tolerant: odd values become unknown)."""
    fields = rec.fields

    def value(path: str) -> Any:
        raw = fields.get(path)
        return None if raw is None else raw["v"]

    registration = value("registration")
    if not isinstance(registration, dict):
        registration = {}
    try:
        registered_at = datetime.fromisoformat(str(registration.get("registered_at")))
        if registered_at.tzinfo:
            # Stored in UTC; an offset can carry a time at either end of the
            # calendar past year 1 or 9999 there, which no column holds.
            registered_at = registered_at.astimezone(UTC)
    except (ValueError, OverflowError):
        registered_at = None
    born = value("date_of_birth")
    try:
        band = age_band(DateOfBirth.model_validate(born), today) if born else "unknown"
    except ValueError:
        band = "unknown"
    scenario, sex = value("situation.scenario"), value("sex")
    version = value("schema_version")
    return {
        "site": registration.get("site") or "",
        "scenario": scenario if isinstance(scenario, str) else None,
        "sex": sex if isinstance(sex, str) else None,
        "age_band": band,
        "nationalities": _list(value("nationalities")),
        "vulnerabilities": _list(value("situation.vulnerabilities")),
        "needs": _list(value("situation.needs")),
        "registered_at": registered_at,
        "schema_version": version if isinstance(version, int) else 1,
    }


def load_records(
    conn: sa.Connection, ids: Iterable[str], master_key: bytes
) -> dict[str, HubRecord]:
    """The stored records among `ids`, unsealed (missing ids are simply absent)."""
    sql = "SELECT id, wrapped_key, state, last_hub_seq FROM records WHERE id IN ({marks})"
    out: dict[str, HubRecord] = {}
    for rid, wrapped_key, state, last_hub_seq in rows_in(conn, sql, list(set(ids))):
        cipher = RecordCipher(master_key, rid, wrapped_key)
        out[rid] = HubRecord(
            rid, wrapped_key, cipher, cipher.open(state, "state"), last_hub_seq=last_hub_seq
        )
    return out


def save_records(conn: sa.Connection, recs: Iterable[HubRecord], *, now: datetime) -> None:
    """Insert new and update changed records: sealed state and projection."""
    today = now.astimezone(UTC).date()
    inserts: list[tuple[Any, ...]] = []
    updates: list[tuple[Any, ...]] = []
    for rec in recs:
        if not rec.is_dirty:
            continue
        clear = projection(rec, today)
        row = (
            rec.cipher.seal_json(compact_json(rec.fields), "state"),
            rec.last_hub_seq,
            now,
            *(clear[name] for name in _PROJECTED),
        )
        if rec.is_new:
            inserts.append((rec.id, rec.wrapped_key, *row))
        else:
            updates.append((*row, rec.id))
    insert_rows(conn, records, ("id", "wrapped_key", *_SAVED), inserts)
    update_rows(conn, records, "id", _SAVED, updates)
