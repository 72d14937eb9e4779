"""Edits the hub itself authors (conflict resolutions, merges, unmerges).

They are changes like any other: a stamp above the versions they replace (so
they win on every replica, even against a device whose clock runs ahead), the
version they were based on, a row in the change log with a hub sequence, and
devices receive them on their next pull.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from server.models import ChangeRow
from server.records import HubRecord
from sync.changes import Version
from sync.hlc import Clock, Stamp
from sync.merge import FieldState

__all__ = ["HUB_DEVICE", "hub_edit"]

HUB_DEVICE = "hub"
changes = ChangeRow.__table__  # type: ignore[attr-defined]


def _stamp_above(clock: Clock, rec: HubRecord, paths: list[str]) -> Stamp:
    # Above the clock and every version replaced; a full counter carries into
    # the next millisecond (`Stamp.successor`), so the stamp keeps its format.
    stamp = clock.now()
    for path in paths:
        held = rec.state(path)
        if held is not None and stamp <= held.version.stamp:
            stamp = held.version.stamp.successor()
    return stamp


def hub_edit(
    conn: sa.Connection,
    rec: HubRecord,
    values: Mapping[str, Any],
    *,
    actor: str,
    label: str,
    clock: Clock,
    now: datetime,
) -> int:
    """Apply `values` to `rec` as one hub-authored edit; return its hub sequence.

    The caller holds the write lock and saves `rec` (`save_records`) afterwards.
    """
    paths = list(values)
    version = Version(_stamp_above(clock, rec, paths), HUB_DEVICE)
    bases: dict[str, Any] = {}
    for path, value in values.items():
        held = rec.state(path)
        if held is not None:
            bases[path] = held.version.to_json()
        rec.set(path, FieldState(value, version, held.version if held else None), actor)
    inserted = conn.execute(
        sa.insert(changes)
        .returning(changes.c.hub_seq)
        .values(
            record_id=rec.id,
            site=rec.site or "",
            device_id=HUB_DEVICE,
            device_seq=None,
            stamp=version.stamp.encode(),
            operator=actor,
            batch_id=label,
            sealed=rec.cipher.seal(
                {"f": [[p, v] for p, v in values.items()], "b": bases}, "change"
            ),
            outcomes=json.dumps(dict.fromkeys(paths, "hub")),
            received_at=now,
        )
    )
    hub_seq = int(inserted.scalar_one())
    rec.last_hub_seq = hub_seq
    return hub_seq
