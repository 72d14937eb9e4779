"""Pull pages: the change log after a cursor, scoped to a device's sites."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass

import sqlalchemy as sa

from server.models import ChangeRow, RecordRow, ReleasedEdit
from server.problems import Problem
from server.sealing import RecordCipher
from sync.changes import Version
from sync.hlc import Stamp
from sync.protocol import Edit

__all__ = [
    "Cursor",
    "change_mark",
    "cursor_is_held",
    "decode_cursor",
    "edit_size",
    "encode_cursor",
    "read_page",
    "released_for",
]

changes = ChangeRow.__table__  # type: ignore[attr-defined]
records = RecordRow.__table__  # type: ignore[attr-defined]
released = ReleasedEdit.__table__  # type: ignore[attr-defined]

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# `{"f":F,"b":B}` (a sealed change) becomes `{"b":B,"d":D,"f":F,"h":H,"o":O,"r":R,"s":S}`
# (an edit's canonical JSON): five more keys with their quotes, colons and commas.
_ADDED_BYTES = 25
_EMPTY_BASES_BYTES = len(',"b":{}')
_MAX_SEQ = 2**63 - 1  # the largest hub sequence either database stores
_NONCE_BYTES = 12  # a sealed value starts with its random AES-GCM nonce (`server.sealing`)


@dataclass(frozen=True)
class Cursor:
    """Where a pull resumes: the last hub sequence delivered and the mark of the
    change that sequence numbered when the cursor was given out ('' for none)."""

    seq: int
    mark: str = ""


def encode_cursor(epoch: str, hub_seq: int, mark: str = "") -> str:
    """An opaque cursor: the hub epoch, the last hub sequence delivered, and the
    mark (`change_mark`) of the change at that sequence."""
    text = f"{epoch}:{hub_seq}:{mark}" if mark else f"{epoch}:{hub_seq}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, epoch: str) -> Cursor:
    """The position in `cursor` ('' is the start); `cursor.invalid` otherwise.

    The problem names the hub's `epoch`, so a device learns it from the refusal.
    A cursor without a mark (given out before marks existed) is still read.
    """
    if cursor == "":
        return Cursor(0)
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        cursor_epoch, seq, *rest = text.split(":")
        value = int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Problem(
            400, "cursor.invalid", "the cursor is not one this hub gave out", epoch=epoch
        ) from None
    if len(rest) > 1 or not 0 <= value <= _MAX_SEQ:
        raise Problem(400, "cursor.invalid", "the cursor is not one this hub gave out", epoch=epoch)
    if cursor_epoch != epoch:
        raise Problem(
            400,
            "cursor.invalid",
            "the cursor belongs to another hub epoch; pull from the start",
            epoch=epoch,
        )
    return Cursor(value, rest[0] if rest else "")


def change_mark(conn: sa.Connection, hub_seq: int) -> str:
    """A short fingerprint of the change numbered `hub_seq` ('' when there is none).

    A hub restored from an older backup numbers new changes with sequences it
    had given out before; the mark tells the change a cursor was made after
    from the one that now has its number. It covers the sealed row's random
    nonce: a device that pushes the same change again after such a restore
    may land it on the very same number, and must not pass for the original.
    """
    if hub_seq <= 0:
        return ""
    stmt = sa.select(
        changes.c.record_id, changes.c.device_id, changes.c.stamp, changes.c.sealed
    ).where(changes.c.hub_seq == hub_seq)
    row = conn.execute(stmt).first()
    if row is None:
        return ""
    nonce = bytes(row.sealed[:_NONCE_BYTES]).hex()
    text = f"{row.record_id}|{row.device_id}|{row.stamp}|{nonce}"
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()[:9]).decode()


def cursor_is_held(conn: sa.Connection, cursor: Cursor) -> bool:
    """Whether this hub holds the change log up to `cursor` as it was when the
    cursor was given out: the change at its sequence is the one it was made
    after (same mark), or, for a cursor without a mark, its sequence is not
    past the last one. False means the hub lost changes the device has seen
    (a restore from an older backup, a failover to a replica that lagged)."""
    if cursor.mark:
        return change_mark(conn, cursor.seq) == cursor.mark
    last = conn.execute(sa.select(sa.func.coalesce(sa.func.max(changes.c.hub_seq), 0))).scalar()
    return cursor.seq <= int(last or 0)


def edit_size(sealed_json: bytes, edit: Edit) -> int:
    """The length of `dumps(edit.to_json())` for an edit read from a sealed change
    whose JSON text is `sealed_json`, without encoding the edit again.

    The sealed text holds the fields and bases as `server.sealing.compact_json`
    wrote them (`server.ingest`): key order aside, which does not change a
    length, that is how the edit writes them. The one difference is a float
    written shorter (`1e-5` for `1e-05`), which no field of this schema holds
    (an older device's retired field might): the size is then a byte or two
    over, which a page's byte bound can take. Changes logged before the hub
    sealed with `compact_json` hold `json.dumps`'s text: exact.
    """
    texts = (edit.record_id, edit.version.stamp.encode(), edit.version.device_id, edit.operator)
    added = sum(len(_JSON.encode(text).encode()) for text in texts) + len(str(edit.hub_seq))
    size = len(sealed_json) + _ADDED_BYTES + added
    return size - _EMPTY_BASES_BYTES if not edit.bases else size


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

    Returns (edits, last hub sequence covered, whether more remain). The edits'
    JSON stays within `max_bytes` (one edit larger than that travels alone).
    When nothing remains, the sequence covered is the last one in the sites so
    far, so the device's own edits after its last pulled one are not scanned
    again by the next pull.
    """
    # Read before the page: every change numbered up to it has committed (the
    # write lock makes numbers follow commit order), so the page below sees it.
    scope_end = _last_seq(conn, sites)
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
        .where(
            changes.c.hub_seq > after_seq,
            changes.c.site.in_(sorted(sites)),
            changes.c.device_id != device_id,
        )
        .order_by(changes.c.hub_seq)
        .limit(max_edits + 1)
    )
    rows = conn.execute(stmt).all()
    edits: list[Edit] = []
    size, more = 0, len(rows) > max_edits
    ciphers: dict[str, RecordCipher] = {}
    for row in rows[:max_edits]:
        cipher = ciphers.get(row.record_id)
        if cipher is None:
            cipher = ciphers[row.record_id] = RecordCipher(
                master_key, row.record_id, row.wrapped_key
            )
        plain = cipher.open_json(row.sealed, "change")
        body = json.loads(plain)
        edit = Edit(
            record_id=row.record_id,
            version=Version(Stamp.decode(row.stamp), row.device_id),
            operator=row.operator,
            fields=tuple((p, v) for p, v in body["f"]),
            bases={p: Version.from_json(b) for p, b in body["b"].items()},
            hub_seq=row.hub_seq,
        )
        edit_bytes = edit_size(plain, edit)
        if edits and size + edit_bytes > max_bytes:
            more = True
            break
        edits.append(edit)
        size += edit_bytes
    last_sent = (edits[-1].hub_seq if edits else None) or after_seq
    if more:
        return edits, last_sent, True
    return edits, max(last_sent, scope_end), False


def _last_seq(conn: sa.Connection, sites: frozenset[str]) -> int:
    """The last hub sequence in `sites` (0 for none), one index lookup per site."""
    last = 0
    for site in sorted(sites):
        stmt = sa.select(sa.func.max(changes.c.hub_seq)).where(changes.c.site == site)
        last = max(last, conn.execute(stmt).scalar() or 0)
    return last


def released_for(
    conn: sa.Connection, device_id: str, after_seq: int, up_to_seq: int
) -> list[list[object]]:
    """The device's own edits released from quarantine with hub sequences in
    (`after_seq`, `up_to_seq`] (what a pull page covers): `[first device seq,
    last device seq, {field: outcome}]` each, naming the fields that did not
    simply apply, as the change log does. Oldest first."""
    if up_to_seq <= after_seq:
        return []
    stmt = (
        sa.select(released.c.first_seq, released.c.last_seq, changes.c.outcomes)
        .join(changes, changes.c.hub_seq == released.c.hub_seq)
        .where(
            released.c.device_id == device_id,
            released.c.hub_seq > after_seq,
            released.c.hub_seq <= up_to_seq,
        )
        .order_by(released.c.hub_seq)
    )
    return [[first, last, json.loads(outcomes)] for first, last, outcomes in conn.execute(stmt)]
