"""Pull pages: the change log after a cursor, scoped to a device's sites."""

from __future__ import annotations

import base64
import binascii

import sqlalchemy as sa

from server.models import ChangeRow, RecordRow
from server.problems import Problem
from server.sealing import RecordCipher
from sync.changes import Version
from sync.hlc import Stamp
from sync.protocol import Edit, dumps

__all__ = ["decode_cursor", "encode_cursor", "read_page"]

changes = ChangeRow.__table__  # type: ignore[attr-defined]
records = RecordRow.__table__  # type: ignore[attr-defined]


def encode_cursor(epoch: str, hub_seq: int) -> str:
    """An opaque cursor: the hub epoch and the last hub sequence delivered."""
    return base64.urlsafe_b64encode(f"{epoch}:{hub_seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str, epoch: str) -> int:
    """The hub sequence in `cursor` ('' is the start); `cursor.invalid` otherwise."""
    if cursor == "":
        return 0
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        cursor_epoch, _, seq = text.rpartition(":")
        value = int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Problem(400, "cursor.invalid", "the cursor is not one this hub gave out") from None
    if cursor_epoch != epoch or value < 0:
        raise Problem(
            400, "cursor.invalid", "the cursor belongs to another hub epoch; pull from the start"
        )
    return value


def read_page(
    conn: sa.Connection,
    *,
    device_id: str,
    sites: frozenset[str],
    after_seq: int,
    max_edits: int,
    max_bytes: int,
    master_key: bytes,
) -> tuple[list[Edit], int, bool]:
    """Edits after `after_seq` for `sites`, other than the device's own.

    Returns (edits, last hub sequence covered, whether more remain). The last
    sequence covered can be past the last edit returned: skipped own edits
    still move the cursor.
    """
    stmt = (
        sa.select(
            changes.c.hub_seq,
            changes.c.record_id,
            changes.c.device_id,
            changes.c.stamp,
            changes.c.operator,
            changes.c.sealed,
            records.c.wrapped_key,
        )
        .join(records, records.c.id == changes.c.record_id)
        .where(changes.c.hub_seq > after_seq, changes.c.site.in_(sorted(sites)))
        .order_by(changes.c.hub_seq)
        .limit(max_edits + 1)
    )
    rows = conn.execute(stmt).all()
    edits: list[Edit] = []
    covered, size, more = after_seq, 0, len(rows) > max_edits
    ciphers: dict[str, RecordCipher] = {}
    for row in rows[:max_edits]:
        if row.device_id != device_id:
            cipher = ciphers.get(row.record_id)
            if cipher is None:
                cipher = ciphers[row.record_id] = RecordCipher(
                    master_key, row.record_id, row.wrapped_key
                )
            body = cipher.open(row.sealed, "change")
            edit = Edit(
                record_id=row.record_id,
                version=Version(Stamp.decode(row.stamp), row.device_id),
                operator=row.operator,
                fields=tuple((p, v) for p, v in body["f"]),
                bases={p: Version.from_json(b) for p, b in body["b"].items()},
                hub_seq=row.hub_seq,
            )
            edit_size = len(dumps(edit.to_json()))
            if edits and size + edit_size > max_bytes:
                more = True
                break
            edits.append(edit)
            size += edit_size
        covered = row.hub_seq
    return edits, covered, more
