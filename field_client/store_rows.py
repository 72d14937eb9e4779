"""The rows `field_client.store.Store`'s write path writes: a record's `records`
row (its document, with the fields of other schema versions kept beside the
known ones, and its per-field versions), a `changes` row, and the bulk inserts
of change rows and match keys. Each function only builds or inserts rows
inside the caller's transaction: the caller decides what to write.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from field_client import db
from schemas.fields import flatten, unflatten
from schemas.record import Registration
from sync.changes import Version

__all__ = ["change_row", "dumps", "insert_changes", "insert_keys", "record_row"]


def dumps(value: Any) -> str:
    """A value as the `changes.value` column keeps it: compact JSON, text as is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _doc_json(record: Registration, other: Mapping[str, Any]) -> str:
    """The `doc` column: the canonical record, with its other fields beside it."""
    if not other:
        return record.model_dump_json()
    return dumps({"id": str(record.id), **unflatten({**flatten(record), **other})})


def record_row(
    record: Registration,
    versions: Mapping[str, Version],
    other: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `records` row of `record`, its fields at `versions`, `other` beside them."""
    return {
        "id": str(record.id),
        "site": record.registration.site,
        "origin_device": record.registration.device_id,
        "scenario": record.situation.scenario.value,
        "registered_at": record.registration.registered_at.isoformat(),
        "doc": _doc_json(record, other or {}),
        "versions": db.encode_versions(versions),
    }


def change_row(
    rid: str,
    path: str,
    value: Any,
    version: Version,
    base: Version | None,
    operator: str,
    seq: int | None,
) -> dict[str, Any]:
    """The `changes` row of one field change, recorded now."""
    return {
        "record_id": rid,
        "field": path,
        "value": dumps(value),
        "stamp": version.stamp.encode(),
        "device_id": version.device_id,
        "base_stamp": base.stamp.encode() if base else None,
        "base_device": base.device_id if base else None,
        "operator": operator,
        "device_seq": seq,
        "hub_seq": None,
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# Bulk inserts go through the driver with positional rows: for 10,000
# registrations (about 150,000 change rows) SQLAlchemy's per-row parameter
# processing costs more than SQLCipher's encryption.
def insert_changes(conn: sa.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert `changes` rows given as tuples in the column order of the statement."""
    if rows:
        conn.exec_driver_sql(
            "INSERT INTO changes (record_id, field, value, stamp, device_id, base_stamp,"
            " base_device, operator, device_seq, hub_seq, recorded_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


def insert_keys(conn: sa.Connection, rows: list[tuple[str, str]]) -> None:
    """Insert `(key, record_id)` match keys, skipping those already held."""
    if rows:
        conn.exec_driver_sql(
            "INSERT OR IGNORE INTO match_keys (key, record_id) VALUES (?, ?)", rows
        )
