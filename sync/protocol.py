"""The bodies that travel inside envelopes: edits, push batches, acknowledgements
and pull pages.

An *edit* is what one author changed in one record at one stamp: a list of
`[field, value]` pairs numbered by consecutive device sequence numbers from
`q`, with the base version of each field the author saw. Grouping field
changes this way keeps batches small on bad links (the record id, stamp and
author are written once, not once per field).

Every type here parses strictly (`from_json` raises `ProtocolError` naming
what is wrong) and writes plain JSON values (`to_json`); `dumps` gives the
canonical bytes, so equal content has an equal digest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import from_json

from sync.changes import FieldChange, Version
from sync.hlc import Stamp

__all__ = [
    "Ack",
    "Edit",
    "ProtocolError",
    "PullPage",
    "PushBatch",
    "Released",
    "batch_edits",
    "cut_batch",
    "dumps",
    "group_changes",
    "loads",
]

MAX_FIELD_PATH = 64
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_TEXT = 200
_EDIT_KEYS = frozenset({"r", "s", "d", "o", "f", "b", "q", "h"})
# One encoder for every call: `json.dumps` with options builds a new one each time.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class ProtocolError(ValueError):
    """A body or an edit that does not follow the protocol; `code` is stable."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def dumps(value: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): equal content, equal digest."""
    return _CANONICAL.encode(value).encode()


def loads(text: bytes) -> Any:
    """Parse JSON as `json.loads` does, in about three fifths of the time.

    pydantic-core's parser gives what `json.loads` gives for everything it
    accepts; what it refuses (a lone surrogate escape, a byte-order mark,
    nesting deeper than 200, any malformed text) goes to `json.loads`, so which
    text parses and how a refusal is raised stay json's; except that nesting
    too deep for `json.loads` (a `RecursionError`) is a ValueError like any
    other text that does not parse. Short strings it reads are remembered in
    its process-wide cache (that is where the time goes).
    """
    try:
        return from_json(text)
    except ValueError:
        pass
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _text(data: dict[str, Any], key: str, limit: int = MAX_TEXT) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ProtocolError(
            "edit.malformed", f"{key}: expected a non-empty string of at most {limit}"
        )
    return value


def _seq(data: dict[str, Any], key: str) -> int | None:
    seq = data.get(key)
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1):
        raise ProtocolError("edit.malformed", f"{key}: expected a positive integer")
    return seq


def _fields(pairs: Any) -> tuple[tuple[str, Any], ...]:
    if not isinstance(pairs, list) or not pairs:
        raise ProtocolError("edit.malformed", "f: expected a non-empty list of [field, value]")
    fields: dict[str, Any] = {}
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ProtocolError("edit.malformed", "f: each entry must be [field, value]")
        path = pair[0]
        if not path or len(path) > MAX_FIELD_PATH:
            raise ProtocolError("edit.malformed", "f: bad field path")
        if path in fields:
            raise ProtocolError("edit.malformed", "f: a field appears twice")
        fields[path] = pair[1]
    return tuple(fields.items())


def _bases(raw: Any) -> dict[str, Version]:
    if not isinstance(raw, dict):
        raise ProtocolError("edit.malformed", "b: expected an object")
    bases: dict[str, Version] = {}
    for path, base in raw.items():
        try:
            bases[path] = Version.from_json(base)
        except ValueError as exc:
            raise ProtocolError("edit.malformed", f"b.{path}: {exc}") from None
    return bases


@dataclass(frozen=True, slots=True)
class Edit:
    """One author's change to one record at one stamp (see module docstring)."""

    record_id: str
    version: Version
    operator: str
    fields: tuple[tuple[str, Any], ...]
    bases: dict[str, Version] = field(default_factory=dict)
    first_seq: int | None = None
    hub_seq: int | None = None

    @property
    def last_seq(self) -> int | None:
        return None if self.first_seq is None else self.first_seq + len(self.fields) - 1

    def changes(self) -> list[FieldChange]:
        """The field changes this edit groups, each with its device sequence."""
        return [
            FieldChange(
                record_id=self.record_id,
                field=path,
                value=value,
                version=self.version,
                base=self.bases.get(path),
                operator=self.operator,
                device_seq=None if self.first_seq is None else self.first_seq + i,
            )
            for i, (path, value) in enumerate(self.fields)
        ]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "r": self.record_id,
            "s": self.version.stamp.encode(),
            "d": self.version.device_id,
            "o": self.operator,
            "f": [[p, v] for p, v in self.fields],
        }
        if self.bases:
            out["b"] = {p: v.to_json() for p, v in self.bases.items()}
        if self.first_seq is not None:
            out["q"] = self.first_seq
        if self.hub_seq is not None:
            out["h"] = self.hub_seq
        return out

    @classmethod
    def from_json(cls, data: Any) -> Edit:
        """Parse one edit strictly; raise ProtocolError naming what is wrong."""
        if not isinstance(data, dict):
            raise ProtocolError("edit.malformed", "an edit must be an object")
        if not _EDIT_KEYS.issuperset(data):
            unknown = sorted(set(data) - _EDIT_KEYS)
            raise ProtocolError("edit.malformed", f"unknown keys {unknown}")
        record_id = _text(data, "r", 36)
        if not _UUID.fullmatch(record_id):
            raise ProtocolError("edit.malformed", "r: not a canonical UUID")
        try:
            version = Version(Stamp.decode(_text(data, "s", 32)), _text(data, "d", 64))
        except ValueError as exc:
            raise ProtocolError("edit.malformed", f"s: {exc}") from None
        fields = _fields(data.get("f"))
        bases = _bases(data["b"]) if "b" in data else {}
        first_seq, hub_seq = _seq(data, "q"), _seq(data, "h")
        return cls(record_id, version, _text(data, "o"), fields, bases, first_seq, hub_seq)


def group_changes(changes: Iterable[FieldChange]) -> Iterator[Edit]:
    """Group consecutive changes of one record, stamp and author into edits."""
    current: list[FieldChange] = []

    def flush() -> Iterator[Edit]:
        if current:
            head = current[0]
            yield Edit(
                record_id=head.record_id,
                version=head.version,
                operator=head.operator,
                fields=tuple((c.field, c.value) for c in current),
                bases={c.field: c.base for c in current if c.base is not None},
                first_seq=head.device_seq,
            )
            current.clear()

    for change in changes:
        if current:
            last = current[-1]
            same = (last.record_id, last.version, last.operator) == (
                change.record_id,
                change.version,
                change.operator,
            )
            consecutive = last.device_seq is None or change.device_seq == last.device_seq + 1
            if not (same and consecutive):
                yield from flush()
        current.append(change)
    yield from flush()


# -- push batches ---------------------------------------------------------------------------

_BODY_OVERHEAD = 16  # what `{"edits":[...]}` adds around the edits, rounded up


@dataclass(frozen=True)
class PushBatch:
    """Edits cut for one push with their canonical body, encoded once.

    `body` is exactly `dumps({"edits": [edit.to_json() for edit in edits]})`.
    """

    edits: list[Edit]
    body: bytes

    @property
    def first_seq(self) -> int:
        seq = self.edits[0].first_seq
        assert seq is not None, "a push batch holds numbered edits"
        return seq

    @property
    def last_seq(self) -> int:
        seq = self.edits[-1].last_seq
        assert seq is not None, "a push batch holds numbered edits"
        return seq


_quote = json.encoder.encode_basestring  # a JSON string as `_CANONICAL` writes it


def _edit_bytes(edit: Edit) -> bytes:
    """`dumps(edit.to_json())` without building and sorting the dict: the keys
    are written in their sorted order, the values by the same encoder. A
    quarter less time (measured on `bench hub_sync`'s records); the device
    encodes every edit it pushes, the first batch while the hub waits."""
    text = "{"
    if edit.bases:
        text += f'"b":{_CANONICAL.encode({p: v.to_json() for p, v in edit.bases.items()})},'
    text += f'"d":{_quote(edit.version.device_id)},"f":{_CANONICAL.encode(edit.fields)}'
    if edit.hub_seq is not None:
        text += f',"h":{int.__repr__(edit.hub_seq)}'
    text += f',"o":{_quote(edit.operator)}'
    if edit.first_seq is not None:
        text += f',"q":{int.__repr__(edit.first_seq)}'
    text += f',"r":{_quote(edit.record_id)},"s":{_quote(edit.version.stamp.encode())}}}'
    return text.encode()


def _encoded_batches(
    edits: Iterable[Edit], max_bytes: int
) -> Iterator[tuple[list[Edit], list[bytes]]]:
    batch: list[Edit] = []
    parts: list[bytes] = []
    size = _BODY_OVERHEAD
    for edit in edits:
        part = _edit_bytes(edit)
        if batch and size + len(part) + 1 > max_bytes:
            yield batch, parts
            batch, parts, size = [], [], _BODY_OVERHEAD
        batch.append(edit)
        parts.append(part)
        size += len(part) + 1
    if batch:
        yield batch, parts


def batch_edits(edits: Iterable[Edit], max_bytes: int) -> Iterator[list[Edit]]:
    """Cut edits into batches whose JSON body stays under `max_bytes` (before
    compression). An edit larger than the limit travels alone."""
    for batch, _ in _encoded_batches(edits, max_bytes):
        yield batch


def cut_batch(edits: Iterable[Edit], max_bytes: int) -> PushBatch | None:
    """The first batch `batch_edits` would cut, with its body; None for no edits.

    Reads `edits` only one edit past the batch, so a lazy outbox is not read
    to its end.
    """
    for batch, parts in _encoded_batches(edits, max_bytes):
        return PushBatch(batch, b'{"edits":[' + b",".join(parts) + b"]}")
    return None


# -- answers from the hub ---------------------------------------------------------------------


def _int(data: dict[str, Any], key: str, code: str) -> int:
    value = data.get(key)
    if type(value) is not int or value < 0:
        raise ProtocolError(code, f"{key}: expected a non-negative integer")
    return value


def _ints(data: dict[str, Any], key: str, code: str) -> tuple[int, ...]:
    value = data.get(key, [])
    if not (isinstance(value, list) and all(type(s) is int for s in value)):
        raise ProtocolError(code, f"{key}: expected a list of sequence numbers")
    return tuple(value)


@dataclass(frozen=True)
class Ack:
    """The hub's acknowledgement of one push batch.

    `high_water` is the device's last sequence the hub holds; the device
    sequences listed lost to a later write (`superseded`), opened a conflict
    (`conflicts`) or were quarantined with a reason (`quarantined`). The rest
    of the batch up to `high_water` applied.
    """

    batch_id: str
    high_water: int
    is_duplicate: bool
    epoch: str
    hub_time_ms: int = 0
    superseded: tuple[int, ...] = ()
    conflicts: tuple[int, ...] = ()
    quarantined: tuple[tuple[int, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "duplicate": self.is_duplicate,
            "high_water": self.high_water,
            "hub_time_ms": self.hub_time_ms,
            "epoch": self.epoch,
            "superseded": list(self.superseded),
            "conflicts": list(self.conflicts),
            "quarantined": [[seq, reason] for seq, reason in self.quarantined],
        }

    @classmethod
    def from_json(cls, data: Any) -> Ack:
        """Parse an acknowledgement; raise ProtocolError ('ack.malformed') naming the key.

        Keys this version does not know are ignored: a newer hub may say more.
        """
        code = "ack.malformed"
        if not isinstance(data, dict):
            raise ProtocolError(code, "an acknowledgement must be an object")
        batch_id, epoch = data.get("batch_id"), data.get("epoch")
        is_duplicate = data.get("duplicate")
        if not isinstance(batch_id, str) or not batch_id:
            raise ProtocolError(code, "batch_id: expected a non-empty string")
        if not isinstance(epoch, str) or not epoch or not isinstance(is_duplicate, bool):
            raise ProtocolError(code, "epoch or duplicate missing")
        raw_quarantined = data.get("quarantined", [])
        if not isinstance(raw_quarantined, list) or not all(
            isinstance(item, list)
            and len(item) == 2
            and type(item[0]) is int
            and isinstance(item[1], str)
            for item in raw_quarantined
        ):
            raise ProtocolError(code, "quarantined: expected a list of [seq, reason]")
        return cls(
            batch_id=batch_id,
            high_water=_int(data, "high_water", code),
            is_duplicate=is_duplicate,
            epoch=epoch,
            hub_time_ms=_int(data, "hub_time_ms", code) if "hub_time_ms" in data else 0,
            superseded=_ints(data, "superseded", code),
            conflicts=_ints(data, "conflicts", code),
            quarantined=tuple((seq, reason) for seq, reason in raw_quarantined),
        )


@dataclass(frozen=True)
class PullPage:
    """One page of a pull: edits (each with its hub sequence) after the cursor
    the device sent, the cursor to send next, whether more remain, and the
    hub's epoch.

    `high_water` is the pulling device's last sequence the hub holds (as in an
    acknowledgement); a device whose pushed mark is above it learns that the
    hub lost its changes (restored from an older backup) and sends them again.
    None from a hub that does not say.

    `released` lists the pulling device's own edits that the hub had parked
    as `record.unknown` and applied once their record arrived: (first and
    last device sequence, {field: outcome} for fields that did not simply
    apply). The acknowledgement had called them quarantined.
    """

    edits: list[Edit]
    cursor: str
    more: bool
    epoch: str
    high_water: int | None = None
    released: tuple[Released, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "edits": [edit.to_json() for edit in self.edits],
            "cursor": self.cursor,
            "more": self.more,
            "epoch": self.epoch,
        }
        if self.high_water is not None:
            out["high_water"] = self.high_water
        if self.released:
            out["released"] = [[r.first_seq, r.last_seq, dict(r.outcomes)] for r in self.released]
        return out

    @classmethod
    def from_json(cls, data: Any) -> PullPage:
        """Parse a page; raise ProtocolError ('page.malformed', or the edit's code)."""
        code = "page.malformed"
        if not isinstance(data, dict):
            raise ProtocolError(code, "a pull page must be an object")
        raw_edits, cursor = data.get("edits"), data.get("cursor")
        more, epoch = data.get("more"), data.get("epoch")
        if not isinstance(raw_edits, list) or not isinstance(cursor, str):
            raise ProtocolError(code, "edits or cursor missing")
        if not isinstance(more, bool) or not isinstance(epoch, str) or not epoch:
            raise ProtocolError(code, "more or epoch missing")
        high_water = _int(data, "high_water", code) if "high_water" in data else None
        edits = [Edit.from_json(item) for item in raw_edits]
        if any(edit.hub_seq is None for edit in edits):
            raise ProtocolError(code, "an edit without its hub sequence")
        released = _released(data.get("released", []), code)
        return cls(edits, cursor, more, epoch, high_water, released)


@dataclass(frozen=True)
class Released:
    """Own edits the hub applied after parking them (see `PullPage.released`)."""

    first_seq: int
    last_seq: int
    outcomes: dict[str, str] = field(default_factory=dict)


def _released(raw: Any, code: str) -> tuple[Released, ...]:
    if not isinstance(raw, list):
        raise ProtocolError(code, "released: expected a list")
    out: list[Released] = []
    for item in raw:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and type(item[0]) is int
            and type(item[1]) is int
            and 1 <= item[0] <= item[1]
            and isinstance(item[2], dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in item[2].items())
        ):
            raise ProtocolError(code, "released: expected [first seq, last seq, {field: outcome}]")
        out.append(Released(item[0], item[1], dict(item[2])))
    return tuple(out)
