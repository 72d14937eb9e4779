"""Per-field merge: last writer wins by (HLC, device id), concurrency kept as conflicts.

Pure functions, no I/O: the hub and the device call them and store what they
return. Every replica that has seen the same set of changes holds the same
winner for every field, whatever order the changes arrived in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sync.changes import Version

__all__ = ["Concurrent", "Decision", "FieldState", "Outcome", "merge_field"]


@dataclass(frozen=True, slots=True)
class FieldState:
    """A field value with the version that wrote it and the version its author saw."""

    value: Any
    version: Version
    base: Version | None = None


class Outcome(StrEnum):
    APPLIED = "applied"  # the incoming value is now the field's value
    SUPERSEDED = "superseded"  # a later write already holds the field; kept in the log only
    DUPLICATE = "duplicate"  # this very version was merged before


@dataclass(frozen=True, slots=True)
class Concurrent:
    """Two writes to one field where neither author saw the other's.

    `winner` is the provisional value (higher version); an auditor decides.
    """

    current: FieldState
    incoming: FieldState

    @property
    def winner(self) -> FieldState:
        return max(self.current, self.incoming, key=lambda s: s.version)

    @property
    def loser(self) -> FieldState:
        return min(self.current, self.incoming, key=lambda s: s.version)


@dataclass(frozen=True, slots=True)
class Decision:
    """What merging one incoming write into one field decided."""

    outcome: Outcome
    state: FieldState
    conflict: Concurrent | None = None


def _descends(child: FieldState, parent: FieldState) -> bool:
    # The author of `child` had seen `parent`: either it was the base it
    # edited, or both came from the same device, which has seen all of its own
    # earlier writes. A base merely newer than `parent` proves nothing: it may
    # come from a third write that never saw `parent`.
    if child.base == parent.version:
        return True
    same_device = child.version.device_id == parent.version.device_id
    return same_device and child.version > parent.version


def merge_field(current: FieldState | None, incoming: FieldState) -> Decision:
    """Merge `incoming` into a field whose state is `current` (None: never written).

    Returns the outcome, the field's resulting state and, when the two writes
    were concurrent with different values, the conflict to open. The winner is
    always the higher (stamp, device id), so replicas converge without
    coordination; conflict detection only decides what a person reviews.
    """
    if current is None:
        return Decision(Outcome.APPLIED, incoming)
    if incoming.version == current.version:
        return Decision(Outcome.DUPLICATE, current)
    is_newer = incoming.version > current.version
    state = incoming if is_newer else current
    outcome = Outcome.APPLIED if is_newer else Outcome.SUPERSEDED
    related = _descends(incoming, current) or _descends(current, incoming)
    if related or incoming.value == current.value:
        return Decision(outcome, state)
    return Decision(outcome, state, Concurrent(current=current, incoming=incoming))
