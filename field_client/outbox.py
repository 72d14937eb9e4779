"""Reading the outbox: this device's own change rows after a sequence number,
grouped into whole edits as `sync.protocol.group_changes` would group them.

A push of 10,000 registrations reads about 150,000 rows, so rows go straight
from the driver (no SQLAlchemy row objects) into edits: values are decoded
one chunk at a time (one JSON array per chunk, not one parse per row) and a
version is decoded once per distinct stamp.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Sequence
from typing import Any

import sqlalchemy as sa

from sync.changes import Version
from sync.hlc import Stamp
from sync.protocol import Edit

__all__ = ["read_edits"]

_SELECT = (
    "SELECT record_id, field, value, stamp, device_id, base_stamp, base_device, operator,"
    " device_seq FROM changes WHERE device_seq > ? ORDER BY device_seq"
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


def read_edits(conn: sa.Connection, after_seq: int, chunk_rows: int) -> Generator[Edit, None, None]:
    """Whole edits after `after_seq`, in sequence order, from one query read
    `chunk_rows` rows at a time.

    Rows are fetched only as edits are taken, so a caller that stops after a
    batch leaves the rest unread. A chunk may end inside an edit: its rows
    wait for the next chunk. The caller holds the transaction and closes the
    iterator before it ends (`contextlib.closing`); nothing is written.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
    # Rows straight from the driver: SQLAlchemy's row objects cost more than reading.
    driver = conn.connection.driver_connection
    assert driver is not None, "the caller holds the transaction"
    cursor = driver.execute(_SELECT, (after_seq,))
    try:
        waiting: list[Any] = []  # the rows of an edit a chunk ended in
        while True:
            fetched = cursor.fetchmany(chunk_rows)
            rows = waiting + fetched if waiting else fetched
            if not rows:
                return
            edits = _group(rows)
            if len(fetched) == chunk_rows:  # more may follow: the last edit may go on
                last = edits.pop()
                waiting = rows[len(rows) - len(last.fields) :]
            else:
                waiting = []
            yield from edits
            if len(fetched) < chunk_rows:
                return
    finally:
        cursor.close()
