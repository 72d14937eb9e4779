"""Field changes: the unit that is recorded, pushed, merged and pulled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sync.hlc import Stamp

__all__ = ["FieldChange", "Version"]


@dataclass(frozen=True, order=True, slots=True)
class Version:
    """Who wrote a field value and when: compared by (stamp, device id).

    The device id breaks ties between equal stamps from two devices, so every
    replica picks the same winner.
    """

    stamp: Stamp
    device_id: str

    def to_json(self) -> list[str]:
        return [self.stamp.encode(), self.device_id]

    @classmethod
    def from_json(cls, data: Any) -> Version:
        """Parse `[stamp, device_id]`; raise ValueError on anything else."""
        if not (
            isinstance(data, list) and len(data) == 2 and all(isinstance(x, str) for x in data)
        ):
            raise ValueError(f"not a version: {data!r}")
        return cls(Stamp.decode(data[0]), data[1])


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One edit of one field of one record.

    `base` is the version of the field the editor saw when editing (None for a
    field that had no value yet): the hub compares it with its own current
    version to tell a sequential edit from a concurrent one.
    """

    record_id: str
    field: str
    value: Any
    version: Version
    base: Version | None
    operator: str
    device_seq: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "r": self.record_id,
            "f": self.field,
            "v": self.value,
            "s": self.version.stamp.encode(),
            "d": self.version.device_id,
            "o": self.operator,
        }
        if self.base is not None:
            out["b"] = self.base.to_json()
        if self.device_seq is not None:
            out["q"] = self.device_seq
        return out
