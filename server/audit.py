"""The audit log: hash-chained entries and signed checkpoints (the SQL and the hashing).

Entry `n` stores `hash = sha256(raw(prev_hash) || canonical JSON of {id, at, actor,
action, target, request_id, detail})`, where `prev_hash` is entry `n - 1`'s hash
(64 zeros for entry 1), `at` is UTC ISO 8601 to the millisecond and canonical
JSON has sorted keys, no spaces and UTF-8 text. Ids are 1, 2, 3... with no gap,
so editing, deleting or reordering a row breaks the chain.

A chain alone can be rewritten by anyone who can write the table, so the hub
also signs checkpoints with its Ed25519 key: every `checkpoint_every` entries,
or when the last checkpoint is `checkpoint_minutes` old, or at entry 1. The
signature covers `checkpoint_message(...)`: the entry's id and hash, the
checkpoint's own id (numbered 1, 2, 3... so a deleted one leaves a gap) and
its time (so the cadence cannot be shifted).

`detail` must never hold identifying values (names, documents, phone numbers,
free text about a person): the log is kept in clear and exported. Callers pass
counts, ids and codes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.db import write_lock
from server.models import AuditCheckpoint, AuditEntry
from sync.keys import KeyPairs

__all__ = [
    "CHECKPOINT_EVERY",
    "CHECKPOINT_MINUTES",
    "GENESIS_HASH",
    "Verification",
    "append",
    "checkpoint_message",
    "entry_hash",
    "export",
    "recent",
    "verify",
]

entries = AuditEntry.__table__  # type: ignore[attr-defined]
checkpoints = AuditCheckpoint.__table__  # type: ignore[attr-defined]

GENESIS_HASH = "0" * 64
CHECKPOINT_EVERY = 1000
CHECKPOINT_MINUTES = 10
_DOMAIN = b"fieldreg/audit-checkpoint/v1\0"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LIMITS = {"actor": 128, "action": 64, "target": 128, "request_id": 64}
_STREAM = {"yield_per": 5000}
# In the order `_Walk.entry` unpacks them.
_ENTRY_COLUMNS = entries.c[
    "id", "at", "actor", "action", "target", "request_id", "detail", "prev_hash", "hash"
]


_canonical = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode
_string = json.encoder.encode_basestring  # a JSON string literal, as `_canonical` writes it


def _iso_ms(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds")


def _chain(prev_hash: str, entry_id: int, at: datetime, *texts: str) -> str:
    """`texts`: actor, action, target, request_id and the detail's canonical JSON."""
    actor, action, target, request_id, detail_json = texts
    # The canonical JSON of the entry written out in sorted key order, with the
    # stored detail spliced in: several times faster than encoding a dict per
    # row, and it covers the stored detail byte for byte.
    body = (
        f'{{"action":{_string(action)},"actor":{_string(actor)},"at":"{_iso_ms(at)}",'
        f'"detail":{detail_json},"id":{entry_id},"request_id":{_string(request_id)},'
        f'"target":{_string(target)}}}'
    )
    return hashlib.sha256(bytes.fromhex(prev_hash) + body.encode()).hexdigest()


def entry_hash(
    prev_hash: str,
    *,
    id: int,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    request_id: str,
    detail: Any,
) -> str:
    """The hex SHA-256 chaining one entry to `prev_hash`: of the raw previous hash
    followed by the canonical JSON (sorted keys, no spaces, UTF-8) of {id, at
    (UTC ISO 8601, milliseconds), actor, action, target, request_id, detail}."""
    return _chain(prev_hash, id, at, actor, action, target, request_id, _canonical(detail))


def checkpoint_message(
    *, checkpoint_id: int, entry_id: int, entry_hash: str, at: datetime
) -> bytes:
    """What the hub signs: domain, entry id, entry hash, checkpoint id, time in ms."""
    at_ms = (at - _EPOCH) // timedelta(milliseconds=1)
    return (
        _DOMAIN
        + struct.pack(">q", entry_id)
        + bytes.fromhex(entry_hash)
        + struct.pack(">qq", checkpoint_id, at_ms)
    )


def _storable(text: str) -> str:
    # NUL and lone surrogates (PostgreSQL and UTF-8 cannot hold them) become U+FFFD
    # and "?": recording an odd batch id must not fail the action it records.
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def append(
    conn: sa.Connection,
    *,
    actor: str,
    action: str,
    target: str,
    request_id: str,
    now: datetime,
    signer: KeyPairs,
    detail: Mapping[str, Any] | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    checkpoint_minutes: int = CHECKPOINT_MINUTES,
) -> int:
    """Append one entry in the caller's transaction (and a checkpoint when due);
    return its id.

    Takes `server.db.write_lock` first, so appends are serialised with each
    other and with ingest; ids are assigned here as last id + 1 (never from the
    database sequence) so the hash can cover them. `detail` is stored as
    canonical JSON and must hold no identifying values. Raises ValueError for a
    naive `now`, an over-long field or a detail that is not plain JSON. Does not
    commit. The hub must use one cadence: `verify` checks it.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    at = now.astimezone(UTC)
    at = at.replace(microsecond=at.microsecond // 1000 * 1000)
    given = {"actor": actor, "action": action, "target": target, "request_id": request_id}
    fields = {name: _storable(value) for name, value in given.items()}
    for name, value in fields.items():
        if len(value) > _LIMITS[name]:
            raise ValueError(f"{name} is longer than {_LIMITS[name]} characters")
    detail_json = _storable(_canonical(dict(detail or {})))
    write_lock(conn)
    last = conn.execute(
        sa.select(entries.c.id, entries.c.hash).order_by(entries.c.id.desc()).limit(1)
    ).first()
    entry_id, prev_hash = (last.id + 1, last.hash) if last else (1, GENESIS_HASH)
    digest = _chain(prev_hash, entry_id, at, *fields.values(), detail_json)
    conn.execute(
        sa.insert(entries).values(
            id=entry_id, at=at, detail=detail_json, prev_hash=prev_hash, hash=digest, **fields
        )
    )
    mark = conn.execute(
        sa.select(checkpoints.c.id, checkpoints.c.entry_id, checkpoints.c.at)
        .order_by(checkpoints.c.id.desc())
        .limit(1)
    ).first()
    period = timedelta(minutes=checkpoint_minutes)
    if mark is None or entry_id >= mark.entry_id + checkpoint_every or at >= mark.at + period:
        mark_id = mark.id + 1 if mark else 1
        message = checkpoint_message(
            checkpoint_id=mark_id, entry_id=entry_id, entry_hash=digest, at=at
        )
        conn.execute(
            sa.insert(checkpoints).values(
                id=mark_id,
                entry_id=entry_id,
                entry_hash=digest,
                at=at,
                signature=signer.signing.sign(message).hex(),
            )
        )
    return entry_id


@dataclass(frozen=True)
class Verification:
    """What `verify` found. `entries` and `checkpoints` count those checked before
    any break; `first_broken_id` is the entry at which checking failed."""

    is_intact: bool
    entries: int
    checkpoints: int
    first_broken_id: int | None
    reason: str


class _Broken(Exception):
    def __init__(self, entry_id: int, reason: str) -> None:
        super().__init__(reason)
        self.entry_id, self.reason = entry_id, reason


def _signed(mark: Any, public_key: Ed25519PublicKey) -> bool:
    try:
        message = checkpoint_message(
            checkpoint_id=mark.id, entry_id=mark.entry_id, entry_hash=mark.entry_hash, at=mark.at
        )
        public_key.verify(bytes.fromhex(mark.signature), message)
    except (InvalidSignature, ValueError):
        return False
    return True


class _Walk:
    """The decisions of `verify` over rows already read, in id order."""

    def __init__(self, public_key: Ed25519PublicKey, every: int | None, minutes: int) -> None:
        self.public_key, self.every, self.period = public_key, every, timedelta(minutes=minutes)
        self.last_id, self.last_hash, self.last_mark_id = 0, GENESIS_HASH, 0
        self.entries = self.checkpoints = 0
        # Where append must write the next checkpoint: entry 1, then by cadence.
        self.due_id, self.due_at = 1, datetime.min.replace(tzinfo=UTC)
        if every is None:
            self.due_id, self.due_at = 2**63, datetime.max.replace(tzinfo=UTC)

    def entry(self, row: Any) -> None:
        """Check one entry (columns in `_ENTRY_COLUMNS` order) against the chain so far."""
        entry_id, at, actor, action, target, request_id, detail, prev_hash, digest = row
        n = self.last_id + 1
        if entry_id != n:
            raise _Broken(n, f"entry {n} is missing (deleted, or ids renumbered)")
        if prev_hash != self.last_hash:
            raise _Broken(n, f"entry {n} does not follow entry {n - 1} (reordered or replaced)")
        try:
            recomputed = _chain(prev_hash, n, at, actor, action, target, request_id, detail)
        except ValueError:  # not hex, or text that is not UTF-8
            recomputed = None
        # append stores whole milliseconds; the hash covers only those
        if recomputed != digest or at.microsecond % 1000:
            raise _Broken(n, f"entry {n} does not match its hash (edited)")
        self.last_id, self.last_hash = n, digest
        self.entries += 1

    def mark(self, row: Any, mark: Any | None) -> bool:
        """Check the checkpoint at this entry, if any; return whether `mark` was used."""
        n = row.id
        if mark is not None and mark.entry_id <= n:
            if mark.id != self.checkpoints + 1:
                raise _Broken(n, f"checkpoint #{self.checkpoints + 1} is missing (deleted)")
            if mark.entry_id != n:
                raise _Broken(n, f"checkpoint #{mark.id} names entry {mark.entry_id} out of order")
            if not _signed(mark, self.public_key):
                raise _Broken(n, f"checkpoint #{mark.id} has a bad signature (forged or edited)")
            if mark.entry_hash != row.hash:
                since = self.last_mark_id + 1
                raise _Broken(n, f"entries {since}..{n} differ from signed checkpoint #{mark.id}")
            self.last_mark_id = n
            self.checkpoints += 1
            if self.every is not None:
                self.due_id, self.due_at = n + self.every, mark.at + self.period
            return True
        if n >= self.due_id or row.at >= self.due_at:
            raise _Broken(n, f"entry {n} should carry a checkpoint and has none (deleted)")
        return False

    def end(self, mark: Any | None) -> None:
        if mark is not None:
            raise _Broken(
                self.last_id + 1,
                f"the log ends at entry {self.last_id} but checkpoint #{mark.id} vouches"
                f" for entry {mark.entry_id} (truncated)",
            )


def _stream(conn: sa.Connection, stmt: sa.Select[Any]) -> sa.CursorResult[Any]:
    # A server-side cursor on PostgreSQL: close it (`with`) even when stopping early.
    return conn.execute(stmt.execution_options(**_STREAM))


def _heads(conn: sa.Connection) -> tuple[int, int]:
    """The last entry id and last checkpoint id, read in one statement. Reading
    up to them only keeps two streams consistent under PostgreSQL's READ
    COMMITTED too: appends take ids under `write_lock` and commit in id order."""
    last_entry = sa.select(sa.func.max(entries.c.id)).scalar_subquery()
    last_mark = sa.select(sa.func.max(checkpoints.c.id)).scalar_subquery()
    row = conn.execute(sa.select(last_entry, last_mark)).one()
    return row[0] or 0, row[1] or 0


def _entries(conn: sa.Connection, start: int, last: int, *columns: Any) -> sa.CursorResult[Any]:
    where = entries.c.id.between(start, last)
    return _stream(conn, sa.select(*columns).where(where).order_by(entries.c.id))


def _checkpoints(conn: sa.Connection, start: int, last: int) -> sa.CursorResult[Any]:
    where = (checkpoints.c.entry_id >= start) & (checkpoints.c.id <= last)
    return _stream(conn, sa.select(checkpoints).where(where).order_by(checkpoints.c.id))


def verify(
    conn: sa.Connection,
    public_key: Ed25519PublicKey,
    *,
    checkpoint_every: int | None = CHECKPOINT_EVERY,
    checkpoint_minutes: int = CHECKPOINT_MINUTES,
) -> Verification:
    """Recompute the whole chain and check every checkpoint; return what was found.

    Streams both tables in id order (constant memory) and stops at the first
    break. Detects an edited entry, a deleted or inserted one, reordered rows, a
    chain rewritten up to a signed checkpoint, a checkpoint forged, edited or
    deleted, and a tail truncated below a surviving checkpoint. With the
    cadence append used (`checkpoint_every`; None skips this) it also finds a
    checkpoint deleted at the tail, and bounds a forged tail to fewer entries
    and minutes than one checkpoint period after the last genuine checkpoint.

    Cannot detect, from the database alone: the tail truncated together with
    the checkpoints that covered it (what is left is a valid shorter log; an
    empty log is intact), nor a short tail appended by someone who knows the
    format within that bound. Compare with an external archive (`export`) for
    that. Reads only; does not lock beyond what the caller's transaction does.
    """
    walk = _Walk(public_key, checkpoint_every, checkpoint_minutes)
    last_entry, last_mark = _heads(conn)
    with (
        _entries(conn, 1, last_entry, *_ENTRY_COLUMNS) as rows,
        _checkpoints(conn, 1, last_mark) as marks,
    ):
        try:
            mark = next(marks, None)
            for row in rows:
                walk.entry(row)
                if walk.mark(row, mark):
                    mark = next(marks, None)
            walk.end(mark)
        except _Broken as broken:
            return Verification(
                False, walk.entries, walk.checkpoints, broken.entry_id, broken.reason
            )
    return Verification(True, walk.entries, walk.checkpoints, None, "intact")


def _entry_json(row: Any) -> dict[str, Any]:
    try:
        detail = json.loads(row.detail)
    except ValueError:
        detail = row.detail  # keep what is there: the archive should show tampering too
    return {
        "id": row.id,
        "at": _iso_ms(row.at),
        "actor": row.actor,
        "action": row.action,
        "target": row.target,
        "request_id": row.request_id,
        "detail": detail,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }


def _checkpoint_json(row: Any) -> dict[str, Any]:
    return {
        "kind": "checkpoint",
        "id": row.id,
        "entry_id": row.entry_id,
        "entry_hash": row.entry_hash,
        "at": _iso_ms(row.at),
        "signature": row.signature,
    }


def export(conn: sa.Connection, *, since: datetime | None) -> Iterator[dict[str, Any]]:
    """JSON-able dicts for an external archive, in id order: entries (`"kind": "entry"`)
    from the first one at or after `since` (all when None) to the end, each
    followed by the checkpoint that covers it, if any. Contiguous from that
    entry on, so the archive can be chained to the previous export by `prev_hash`."""
    last_entry, last_mark = _heads(conn)
    start: int | None = 1
    if since is not None:
        start = conn.scalar(sa.select(sa.func.min(entries.c.id)).where(entries.c.at >= since))
    if start is None:
        return
    with (
        _entries(conn, start, last_entry, entries) as rows,
        _checkpoints(conn, start, last_mark) as pending,
    ):
        mark = next(pending, None)
        for row in rows:
            yield {"kind": "entry", **_entry_json(row)}
            while mark is not None and mark.entry_id <= row.id:
                yield _checkpoint_json(mark)
                mark = next(pending, None)
        if mark is not None:  # checkpoints past the last entry: the log was truncated
            yield _checkpoint_json(mark)
            yield from map(_checkpoint_json, pending)


def recent(
    conn: sa.Connection,
    *,
    limit: int,
    offset: int = 0,
    actor: str | None = None,
    action: str | None = None,
) -> list[dict[str, Any]]:
    """Entries newest first, optionally only one actor's or one action's; for the API."""
    stmt = sa.select(entries).order_by(entries.c.id.desc()).limit(limit).offset(offset)
    if actor is not None:
        stmt = stmt.where(entries.c.actor == actor)
    if action is not None:
        stmt = stmt.where(entries.c.action == action)
    return [_entry_json(row) for row in conn.execute(stmt)]
