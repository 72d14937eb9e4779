"""Turning matched pairs into people without chaining strangers together. Pure.

Merging every matched pair blindly (union-find) chains people: A matches B
and B matches C does not make A and C one person, and one wrong pair joins
two whole families of records. `link` joins the strongest pairs first and
joins two groups only when every record of one is compatible with every
record of the other (no pair across them scores below the review threshold,
which is evidence of different people). The hub holds an operator's merge to
the same rule (`server.duplicates.merge` refuses `duplicate.strangers`); the
evaluation in `bench/dedup_eval.py` also links with the operating threshold as
the bar (every pair in a cluster a predicted match) and merges blindly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

__all__ = ["link", "union_all"]

T = TypeVar("T", bound=Hashable)


def union_all(items: Iterable[T], pairs: Iterable[tuple[T, T]]) -> dict[T, T]:
    """Every pair merged (union-find): item -> its group's representative."""
    parent = {item: item for item in items}

    def root(x: T) -> T:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[root(a)] = root(b)
    return {item: root(item) for item in parent}


def link(
    items: Iterable[T],
    pairs: Iterable[tuple[T, T, float]],
    compatible: Callable[[T, T], bool],
) -> dict[T, T]:
    """Join pairs strongest first, each only if the two groups are compatible
    record for record. Returns item -> its group's representative."""
    group = {item: item for item in items}
    members: dict[T, list[T]] = {item: [item] for item in group}
    for a, b, _ in sorted(pairs, key=lambda p: -p[2]):
        ga, gb = group[a], group[b]
        if ga == gb:
            continue
        if not all(compatible(x, y) for x in members[ga] for y in members[gb]):
            continue
        if len(members[ga]) < len(members[gb]):
            ga, gb = gb, ga
        for x in members.pop(gb):
            group[x] = ga
            members[ga].append(x)
    return group
