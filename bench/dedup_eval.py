"""Duplicate detection on the labelled set of `bench.dedup_data`: blocking,
scoring, pair and cluster quality at the thresholds, and scoring speed.

Issue 5 targets at `OPERATING_THRESHOLD`: pair precision >= 0.95, F1 >= 0.85,
and no merged cluster larger than the largest true one. The thresholds were
chosen on seed 1; `run` reports seed 2, which they were not tuned on, and the
largest merged cluster on seeds 1-7 (one coincidence moves it).

Clusters are made three ways from the pairs at the operating threshold:
`automatic` joins two groups only when every pair across them is itself a
predicted match (complete linkage: what merging every predicted pair can
honestly make without a person deciding); `hub` joins them unless a pair
across them scores below the review threshold (what the hub lets an operator
merge); `blind` merges every pair (union-find).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bench.dedup_data import Labelled, generate
from schemas.clustering import link, union_all
from schemas.matching import (
    MAX_BLOCK,
    OPERATING_THRESHOLD,
    REVIEW_THRESHOLD,
    Profile,
    candidates,
    profile,
    score,
)

__all__ = ["Scored", "cluster_metrics", "pair_metrics", "run", "score_all"]

Pair = tuple[int, int]
Rule = Literal["automatic", "hub", "blind"]


@dataclass(frozen=True)
class Scored:
    """Every candidate pair found by blocking, with its score, and what it cost."""

    scores: dict[Pair, float]
    candidates_per_record: list[int]
    seconds: float
    truth: set[Pair]
    profiles: list[Profile]
    key_counts: dict[str, int]

    def pair_score(self, a: int, b: int) -> float:
        """The pair's score (scored now if blocking never brought them together)."""
        value = self.scores.get((a, b) if a < b else (b, a))
        if value is None:
            value = score(self.profiles[a], self.profiles[b], key_counts=self.key_counts).score
        return value


def _true_pairs(data: Sequence[Labelled]) -> set[Pair]:
    by_person: dict[int, list[int]] = defaultdict(list)
    for i, item in enumerate(data):
        by_person[item.true_person].append(i)
    return {(a, b) for ids in by_person.values() for a in ids for b in ids if a < b}


def score_all(data: Sequence[Labelled], *, max_block: int = MAX_BLOCK) -> Scored:
    """Index every record by `record_keys`, then score each record against the
    other records it shares a key with, names weighed by the index's key counts
    (what `dedup-file` does; the hub does the same per arrival)."""
    start = time.perf_counter()
    profiles = [profile(item.doc) for item in data]
    index: dict[str, list[str]] = defaultdict(list)
    for i, p in enumerate(profiles):
        for key in p.keys:
            index[key].append(str(i))
    counts = {key: len(ids) for key, ids in index.items()}
    scores: dict[Pair, float] = {}
    per_record: list[int] = []
    for i, p in enumerate(profiles):
        found = candidates(p.keys, index, max_block=max_block) - {str(i)}
        per_record.append(len(found))
        for j in (int(x) for x in found):
            if j < i:
                scores[(j, i)] = score(profiles[j], p, key_counts=counts).score
    seconds = time.perf_counter() - start
    return Scored(scores, per_record, seconds, _true_pairs(data), profiles, counts)


def _prf(predicted: set[Pair], truth: set[Pair]) -> dict[str, float]:
    hits = len(predicted & truth)
    precision = hits / len(predicted) if predicted else 1.0
    recall = hits / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def pair_metrics(scored: Scored, threshold: float) -> dict[str, float]:
    """Pair precision, recall and F1 at `threshold`; recall counts pairs blocking missed."""
    predicted = {pair for pair, value in scored.scores.items() if value >= threshold}
    return {**_prf(predicted, scored.truth), "predicted_pairs": len(predicted)}


def _closure(labels: Sequence[int]) -> tuple[set[Pair], int]:
    members: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        members[label].append(i)
    pairs = {(a, b) for ids in members.values() for a in ids for b in ids if a < b}
    return pairs, max(len(ids) for ids in members.values())


def cluster_metrics(
    scored: Scored, data: Sequence[Labelled], threshold: float, *, rule: Rule = "automatic"
) -> dict[str, float]:
    """Merge the predicted pairs by `rule` (see the module docstring) and
    compare the clusters with the truth."""
    predicted = [(a, b, v) for (a, b), v in scored.scores.items() if v >= threshold]
    items = range(len(data))
    if rule == "blind":
        groups = union_all(items, ((a, b) for a, b, _ in predicted))
    else:
        bar = threshold if rule == "automatic" else REVIEW_THRESHOLD
        groups = link(items, predicted, lambda a, b: scored.pair_score(a, b) >= bar)
    merged, largest = _closure([groups[i] for i in items])
    true_largest = _closure([item.true_person for item in data])[1]
    return {
        **_prf(merged, scored.truth),
        "largest_merged_cluster": largest,
        "largest_true_cluster": true_largest,
    }


def _blocking(scored: Scored, n: int) -> dict[str, float]:
    per = sorted(scored.candidates_per_record)
    found = len(scored.truth & scored.scores.keys())
    return {
        "records": n,
        "true_pairs": len(scored.truth),
        "true_pairs_blocked_together": found / len(scored.truth),
        "candidate_pairs": len(scored.scores),
        "candidates_per_record_median": float(statistics.median(per)),
        "candidates_per_record_p95": float(per[int(0.95 * (len(per) - 1))]),
        "candidates_per_record_max": per[-1],
        "ms_per_record_block_and_score": 1000 * scored.seconds / n,
    }


def _sweep(scored: Scored) -> dict[str, float]:
    out: dict[str, float] = {}
    for threshold in (0.05, 0.15, 0.3, 0.5, 0.6, 0.7, 0.9):
        m = pair_metrics(scored, threshold)
        out[f"at {threshold:.2f}: precision"] = m["precision"]
        out[f"at {threshold:.2f}: recall"] = m["recall"]
    return out


def _speed(data: Sequence[Labelled], scored: Scored, pairs: int = 20_000) -> dict[str, float]:
    """Time `profile` (with its keys) per record, and `score` over blocked pairs."""
    docs = [item.doc for item in data[:2_000]]
    start = time.perf_counter()
    for doc in docs:
        profile(doc)
    profile_us = 1e6 * (time.perf_counter() - start) / len(docs)
    profiles = [profile(item.doc) for item in data]
    counts = Counter(key for p in profiles for key in p.keys)
    chosen = list(scored.scores)[:pairs]
    start = time.perf_counter()
    for a, b in chosen:
        score(profiles[a], profiles[b], key_counts=counts)
    pair_us = 1e6 * (time.perf_counter() - start) / len(chosen)
    return {
        "us_per_profile_and_keys": profile_us,
        "us_per_scored_pair": pair_us,
        "pairs_per_s": 1e6 / pair_us,
    }


def _largest_by_seed(persons: int, seeds: Sequence[int]) -> dict[str, str]:
    """The largest automatic cluster on other seeds: one coincidence of name and
    birth year moves it, so a single seed says little."""
    out: dict[str, str] = {}
    for seed in seeds:
        data = generate(persons, seed=seed)
        clusters = cluster_metrics(score_all(data), data, OPERATING_THRESHOLD)
        out[f"seed {seed}: largest merged / true"] = (
            f"{clusters['largest_merged_cluster']} / {clusters['largest_true_cluster']}"
        )
    return out


def _targets(scored: Scored, data: Sequence[Labelled]) -> dict[str, float]:
    pairs = pair_metrics(scored, OPERATING_THRESHOLD)
    clusters = cluster_metrics(scored, data, OPERATING_THRESHOLD)
    largest = clusters["largest_merged_cluster"] <= clusters["largest_true_cluster"]
    return {
        "precision >= 0.95 (1 = met)": int(pairs["precision"] >= 0.95),
        "f1 >= 0.85 (1 = met)": int(pairs["f1"] >= 0.85),
        "no over-large automatic cluster (1 = met)": int(largest),
    }


def run(persons: int = 5_000, seed: int = 2) -> dict[str, dict[str, Any]]:
    """Generate the set, block, score, and return the figures `make bench` prints."""
    data = generate(persons, seed=seed)
    scored = score_all(data)
    at = f"at OPERATING_THRESHOLD {OPERATING_THRESHOLD}"
    return {
        f"blocking ({persons:,} true persons, seed {seed})": _blocking(scored, len(data)),
        f"pairs {at}": pair_metrics(scored, OPERATING_THRESHOLD),
        f"clusters {at}, automatic (every pair in a cluster a predicted match)": (
            cluster_metrics(scored, data, OPERATING_THRESHOLD)
        ),
        f"clusters {at}, as the hub allows (no pair below REVIEW_THRESHOLD)": (
            cluster_metrics(scored, data, OPERATING_THRESHOLD, rule="hub")
        ),
        f"clusters {at}, every pair merged blindly": (
            cluster_metrics(scored, data, OPERATING_THRESHOLD, rule="blind")
        ),
        "largest automatic cluster on other seeds": _largest_by_seed(
            persons, [s for s in range(1, 8) if s != seed]
        ),
        f"pairs at REVIEW_THRESHOLD {REVIEW_THRESHOLD}": pair_metrics(scored, REVIEW_THRESHOLD),
        "pairs at other thresholds": _sweep(scored),
        "issue 5 targets": _targets(scored, data),
        "speed": _speed(data, scored),
    }
