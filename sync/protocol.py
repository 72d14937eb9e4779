"""The bodies that travel inside envelopes: edits, push acknowledgements, pull pages.

An *edit* is what one author changed in one record at one stamp: a list of
`[field, value]` pairs numbered by consecutive device sequence numbers from
`q`, with the base version of each field the author saw. Grouping field
changes this way keeps batches small on bad links (the record id, stamp and
author are written once, not once per field).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sync.changes import FieldChange, Version
from sync.hlc import Stamp

__all__ = ["Edit", "ProtocolError", "batch_edits", "dumps", "group_changes"]

MAX_FIELD_PATH = 64
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_TEXT = 200


class ProtocolError(ValueError):
    """A body or an edit that does not follow the protocol; `code` is stable."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def dumps(value: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): equal content, equal digest."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _text(data: dict[str, Any], key: str, limit: int = MAX_TEXT) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ProtocolError(
            "edit.malformed", f"{key}: expected a non-empty string of at most {limit}"
        )
    return value


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
        unknown = set(data) - {"r", "s", "d", "o", "f", "b", "q", "h"}
        if unknown:
            raise ProtocolError("edit.malformed", f"unknown keys {sorted(unknown)}")
        record_id = _text(data, "r", 36)
        if not _UUID.fullmatch(record_id):
            raise ProtocolError("edit.malformed", "r: not a canonical UUID")
        try:
            version = Version(Stamp.decode(_text(data, "s", 32)), _text(data, "d", 64))
        except ValueError as exc:
            raise ProtocolError("edit.malformed", f"s: {exc}") from None
        pairs = data.get("f")
        if not isinstance(pairs, list) or not pairs:
            raise ProtocolError("edit.malformed", "f: expected a non-empty list of [field, value]")
        fields: list[tuple[str, Any]] = []
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ProtocolError("edit.malformed", "f: each entry must be [field, value]")
            if not pair[0] or len(pair[0]) > MAX_FIELD_PATH:
                raise ProtocolError("edit.malformed", "f: bad field path")
            fields.append((pair[0], pair[1]))
        if len({p for p, _ in fields}) != len(fields):
            raise ProtocolError("edit.malformed", "f: a field appears twice")
        bases: dict[str, Version] = {}
        raw_bases = data.get("b", {})
        if not isinstance(raw_bases, dict):
            raise ProtocolError("edit.malformed", "b: expected an object")
        for path, raw in raw_bases.items():
            try:
                bases[path] = Version.from_json(raw)
            except ValueError as exc:
                raise ProtocolError("edit.malformed", f"b.{path}: {exc}") from None
        seqs = [data.get(k) for k in ("q", "h")]
        for key, seq in zip(("q", "h"), seqs, strict=True):
            if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1):
                raise ProtocolError("edit.malformed", f"{key}: expected a positive integer")
        return cls(record_id, version, _text(data, "o"), tuple(fields), bases, seqs[0], seqs[1])


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


def batch_edits(edits: Iterable[Edit], max_bytes: int) -> Iterator[list[Edit]]:
    """Cut edits into batches whose JSON body stays under `max_bytes` (before
    compression). An edit larger than the limit travels alone."""
    batch: list[Edit] = []
    size = 16
    for edit in edits:
        edit_size = len(dumps(edit.to_json())) + 1
        if batch and size + edit_size > max_bytes:
            yield batch
            batch, size = [], 16
        batch.append(edit)
        size += edit_size
    if batch:
        yield batch
