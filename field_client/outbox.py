"""Reading the outbox: this device's own change rows after a sequence number,
grouped into whole edits as `sync.protocol.group_changes` would group them.

A push of 10,000 registrations reads about 150,000 rows, so rows go straight
from the driver (no SQLAlchemy row objects) into edits: values are decoded
one chunk at a time (one JSON array per chunk, not one parse per row) and a
version is decoded once per distinct stamp.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa

from sync.changes import Version
from sync.hlc import Stamp
from sync.protocol import Edit

__all__ = ["read_edits"]

_SELECT = (
    "SELECT record_id, field, value, stamp, device_id, base_stamp, base_device, operator,"
    " device_seq FROM changes WHERE device_seq > ? ORDER BY device_seq LIMIT ?"
)


def _group(rows: Sequence[Any]) -> list[Edit]:
    """Edits from consecutive rows of one record, version and author (sequence order)."""
    values = json.loads("[" + ",".join(row[2] for row in rows) + "]")
    versions: dict[tuple[str, str], Version] = {}

    def version(stamp: str, device_id: str) -> Version:
        found = versions.get((stamp, device_id))
        if found is None:
            found = versions[(stamp, device_id)] = Version(Stamp.decode(stamp), device_id)
        return found

    edits: list[Edit] = []
    key: tuple[str, str, str, str] | None = None
    fields: list[tuple[str, Any]] = []
    bases: dict[str, Version] = {}
    first_seq = next_seq = 0
    for row, value in zip(rows, values, strict=True):
        rid, path, _, stamp, device_id, base_stamp, base_device, operator, seq = row
        row_key = (rid, stamp, device_id, operator)
        if row_key != key or seq != next_seq:
            if key is not None:
                edits.append(
                    Edit(key[0], version(key[1], key[2]), key[3], tuple(fields), bases, first_seq)
                )
            key, fields, bases, first_seq = row_key, [], {}, seq
        fields.append((path, value))
        if base_stamp:
            bases[path] = version(base_stamp, base_device)
        next_seq = seq + 1
    if key is not None:
        edits.append(Edit(key[0], version(key[1], key[2]), key[3], tuple(fields), bases, first_seq))
    return edits


def read_edits(conn: sa.Connection, after_seq: int, chunk_rows: int) -> Iterator[Edit]:
    """Whole edits after `after_seq`, in sequence order, read `chunk_rows` rows at a time.

    A full chunk may end inside an edit: its last group is read again with the
    next chunk (or, if the chunk is one edit, with a bigger one). The caller
    holds the transaction; nothing is written.
    """
    # Rows straight from the driver: SQLAlchemy's row objects cost more than reading.
    driver = conn.connection.driver_connection
    assert driver is not None, "the caller holds the transaction"
    limit = chunk_rows
    while True:
        rows = driver.execute(_SELECT, (after_seq, limit)).fetchall()
        if not rows:
            return
        edits = _group(rows)
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
