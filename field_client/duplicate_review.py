"""Possible duplicates of the people of one input (`fieldreg register
--check-duplicates`): each is looked for among the store's records
(`Store.possible_duplicates`) and among the people before it in the same
input, which the store does not hold yet, and the field worker's decision is
recorded in its `duplicate_review`. Nothing here writes to the store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from field_client.store import Store
from schemas.ids import uuid7
from schemas.matching import REVIEW_THRESHOLD, Profile, profile, score, usable_blocks
from schemas.record import RegistrationCreate

__all__ = ["CANDIDATES_SHOWN", "review_all", "with_changes"]

CANDIDATES_SHOWN = 5
"""At most this many candidates are named, best first (as `Store.possible_duplicates`)."""


def with_changes(item: RegistrationCreate, **changes: Any) -> RegistrationCreate:
    """`item` with `changes` (JSON values), validated as any input is: a copy
    that was not would hold plain dicts where models belong."""
    return RegistrationCreate.model_validate(
        {**item.model_dump(mode="json", exclude_none=True), **changes}
    )


def review_all(store: Store, items: Sequence[RegistrationCreate]) -> list[RegistrationCreate]:
    """`items` in order, each that may be a person of the store or of an earlier
    item with the decision `registered_anyway` and its candidates recorded.

    An earlier item named as a candidate gets its id now (a new uuid7) if it
    had none, so the review can name it; `Store.register` keeps given ids.
    """
    earlier = _Earlier()
    reviewed: list[RegistrationCreate] = []
    for item in items:
        new = profile(item.model_dump(mode="json"))
        found = [(d.score, d.id) for d in store.possible_duplicates(item, limit=CANDIDATES_SHOWN)]
        for position, chance in earlier.matches(new):
            if reviewed[position].id is None:
                reviewed[position] = with_changes(reviewed[position], id=str(uuid7()))
            found.append((chance, str(reviewed[position].id)))
        if found:
            found.sort(key=lambda pair: (-pair[0], pair[1]))
            shown = found[:CANDIDATES_SHOWN]
            review = {
                "decision": "registered_anyway",
                "candidates": [rid for _, rid in shown],
                "best_score": shown[0][0],
            }
            item = with_changes(item, duplicate_review=review)
        reviewed.append(item)
        earlier.add(new)
    return reviewed


class _Earlier:
    """The profiles of the items read so far, filed under their blocking keys."""

    def __init__(self) -> None:
        self._profiles: list[Profile] = []
        self._index: dict[str, list[int]] = {}

    def add(self, new: Profile) -> None:
        for key in new.keys:
            self._index.setdefault(key, []).append(len(self._profiles))
        self._profiles.append(new)

    def matches(self, new: Profile) -> list[tuple[int, float]]:
        """(position, score) of the earlier items at or above the review threshold.

        Blocked and counted as `Store.possible_duplicates` does: key frequencies
        among the candidates and the new item stand in for an index's."""
        sizes = {key: len(self._index[key]) for key in new.keys if key in self._index}
        positions = sorted({p for key in usable_blocks(sizes) for p in self._index[key]})
        counts = Counter(k for p in positions for k in self._profiles[p].keys if k in new.keys)
        key_counts = {k: counts[k] + 1 for k in new.keys}
        found = []
        for position in positions:
            chance = score(new, self._profiles[position], key_counts=key_counts).score
            if chance >= REVIEW_THRESHOLD:
                found.append((position, round(chance, 2)))
        return found
