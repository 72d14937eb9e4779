"""Duplicate detection: blocking keys and the explained score (schemas/matching.py)."""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter, defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.dedup_data import generate
from bench.dedup_eval import cluster_metrics, pair_metrics, score_all
from schemas import matching
from schemas.clustering import link
from schemas.matching import (
    BLOCK_BUDGET,
    MAX_BLOCK,
    OPERATING_THRESHOLD,
    PROFILE_VERSION,
    REVIEW_THRESHOLD,
    FieldAgreement,
    Match,
    candidates,
    pair_score,
    profile,
    profile_from_json,
    profile_to_json,
    record_keys,
    score,
    usable_blocks,
)


def person(given: str = "Mohamed", family: str = "Abdel Rahman", **fields: Any) -> dict[str, Any]:
    """A registration document with only what matching reads."""
    doc: dict[str, Any] = {"names": {"given": given, "family": family}}
    doc.update(fields)
    return doc


def born(value: str, precision: str = "exact") -> dict[str, str]:
    return {"value": value, "precision": precision}


def counted(*docs: dict[str, Any], carriers: int = 2) -> dict[str, int]:
    """Key counts as a small index holding these records would give them."""
    return {key: carriers for doc in docs for key in record_keys(doc)}


def field(match: Match, name: str) -> FieldAgreement:
    return next(item for item in match.explanation if item.field == name)


def test_thresholds_are_ordered() -> None:
    assert 0.0 < REVIEW_THRESHOLD < OPERATING_THRESHOLD < 1.0


LATIN = {"given": "Mohamed", "family": "Abdel Rahman"}
ARABIC = {"given_original": "محمد", "family_original": "عبد الرحمن"}


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (LATIN, {"given": "Muhammad", "family": "Abdulrahman"}),
        (LATIN, ARABIC),
        ({"given": "Mohammed", "family": "Abd al-Rahman"}, {**ARABIC, "given": "Muhammad"}),
        (LATIN, {"given": "Abdulrahman", "family": "Mohamed"}),  # swapped
    ],
)
def test_spellings_and_scripts_of_one_name_agree(a: dict[str, str], b: dict[str, str]) -> None:
    first = {"names": a, "date_of_birth": born("1990-05-04"), "sex": "male"}
    second = {"names": b, "date_of_birth": born("1990-05-04"), "sex": "male"}
    match = score(first, second, key_counts=counted(first, second))
    assert field(match, "names").outcome in ("agree", "partial")
    assert field(match, "names").weight > 0
    assert match.score >= OPERATING_THRESHOLD
    assert record_keys(first) & record_keys(second)


def test_explanation_reads_for_a_person() -> None:
    a = person("Mohamed", "Abdel Rahman", date_of_birth=born("1990-05-04"), sex="male")
    b = person("Muhammad", "Abdelrahman", date_of_birth=born("1990-05-04"), sex="male")
    match = score(a, b)
    assert [item.field for item in match.explanation] == [
        "names",
        "date_of_birth",
        "sex",
        "nationalities",
        "documents",
        "phone",
        "place_of_birth",
        "household",
    ]
    names = field(match, "names")
    assert names.detail.startswith("'Mohamed Abdel Rahman' ~ 'Muhammad Abdelrahman' (")
    assert "muhammad" in names.detail
    assert field(match, "date_of_birth").detail == "1990-05-04 vs 1990-05-04"
    assert field(match, "sex") == FieldAgreement("sex", "agree", 0.1, "both male")
    assert field(match, "documents").outcome == "missing"
    arabic = score(a, {"names": {"given_original": "محمد", "family_original": "عبد الرحمن"}})
    assert "same skeleton abdrhmn" in field(arabic, "names").detail


def test_swapped_given_and_family_is_tolerated_and_said() -> None:
    a = person("Tesfaye", "Gebremedhin", date_of_birth=born("1988-02-03"))
    b = person("Gebremedhin", "Tesfay", date_of_birth=born("1988-02-03"))
    match = score(a, b, key_counts=counted(a, b))
    assert field(match, "names").outcome == "agree"
    assert "order differs" in field(match, "names").detail
    assert match.score >= OPERATING_THRESHOLD


@pytest.mark.parametrize(
    ("other", "outcome"),
    [
        (born("1990-05-04"), "agree"),
        (born("1990-01-01", "year"), "agree"),
        (born("1991-01-01", "year"), "agree"),  # year-only: within a year
        (born("1989", "year"), "agree"),
        (born("1993-01-01", "estimated"), "agree"),  # estimated: within three years
        (born("1987-06-01", "estimated"), "agree"),
        (born("1990-04-05"), "partial"),  # day and month swapped
        (born("1990-05-05"), "partial"),  # a slip of the pen
        (born("1990-09-21"), "disagree"),
        (born("1992-01-01", "year"), "partial"),
        (born("1994-01-01", "year"), "disagree"),
        (born("1999-01-01", "estimated"), "disagree"),
        (born("2005-05-04"), "disagree"),
        ("~1991", "agree"),  # the shorthand the field CLI accepts
    ],
)
def test_birth_dates_agree_within_their_precision(other: Any, outcome: str) -> None:
    a = person(date_of_birth=born("1990-05-04"))
    b = person(date_of_birth=other)
    assert field(score(a, b), "date_of_birth").outcome == outcome
    assert field(score(b, a), "date_of_birth").outcome == outcome


def test_far_apart_birth_dates_outweigh_a_shared_name() -> None:
    a = person(date_of_birth=born("1975-03-02"))
    b = person(date_of_birth=born("2001-07-12"))
    assert score(a, b, key_counts=counted(a, b)).score < REVIEW_THRESHOLD


@pytest.mark.parametrize(
    "name", ["sex", "date_of_birth", "nationalities", "documents", "phone", "place_of_birth"]
)
def test_a_missing_field_weighs_nothing(name: str) -> None:
    full = person(
        sex="male",
        date_of_birth=born("1990-05-04"),
        nationalities=["SDN"],
        documents=[{"type": "passport", "status": "held", "number": "P1234567"}],
        phone="+218 91 234 5678",
        place_of_birth="Nyala",
    )
    partial = {key: value for key, value in full.items() if key != name}
    item = field(score(full, partial), name)
    assert (item.outcome, item.weight) == ("missing", 0.0)
    assert score(partial, partial).score <= score(full, full).score


def test_records_with_almost_nothing_are_scored_not_rejected() -> None:
    nameless = {"documents": [{"type": "passport", "number": "p-123 4567"}]}
    assert score(nameless, {"documents": [{"number": "P1234567"}]}).score >= OPERATING_THRESHOLD
    assert record_keys(nameless) == {"d:P1234567"}
    assert score({}, {}).score < REVIEW_THRESHOLD
    assert record_keys({}) == set()


def test_sex_mismatch_is_strong_evidence_against() -> None:
    a = person("Nour", "Hassan", sex="female", date_of_birth=born("1995-01-01", "year"))
    b = person("Nour", "Hassan", sex="male", date_of_birth=born("1995-01-01", "year"))
    same = score(a, dict(b, sex="female"), key_counts=counted(a, b))
    different = score(a, b, key_counts=counted(a, b))
    assert field(different, "sex").outcome == "disagree"
    assert different.score < OPERATING_THRESHOLD <= same.score
    assert score(a, b).score < REVIEW_THRESHOLD  # without counts: no rarity to lean on


def test_equal_document_numbers_are_very_strong_evidence() -> None:
    a = person("Khaled", "Osman", documents=[{"type": "passport", "number": "P 0123-4567"}])
    b = person("Khalid", "Othman", documents=[{"type": "passport", "number": "p01234567"}])
    match = score(a, b)
    assert field(match, "documents").outcome == "agree"
    assert match.score >= OPERATING_THRESHOLD
    assert "d:P01234567" in record_keys(a) & record_keys(b)


def test_different_numbers_of_one_document_count_against() -> None:
    passport = {"type": "passport", "issuing_country": "SDN"}
    a = person(documents=[{**passport, "number": "P01234567"}], date_of_birth=born("1990-05-04"))
    b = person(documents=[{**passport, "number": "P07654321"}], date_of_birth=born("1990-05-04"))
    c = person(documents=[{**passport, "number": "P01234568"}], date_of_birth=born("1990-05-04"))
    assert field(score(a, b), "documents").outcome == "disagree"
    assert field(score(a, c), "documents").outcome == "partial"  # one character apart
    other_kind = person(documents=[{"type": "national_id", "number": "12345678901234"}])
    assert field(score(a, other_kind), "documents").outcome == "missing"


def household(twins: tuple[str, str]) -> list[dict[str, Any]]:
    phone = "+218 92 555 1234"
    return [
        person("Ahmed", "Hassan", sex="male", date_of_birth=born("1975-03-02"), phone=phone),
        person("Fatma", "Hassan", sex="female", date_of_birth=born("1980-01-01", "year")),
        person("Omar", "Hassan", sex="male", date_of_birth=born("2005-07-02"), phone=phone),
        person("Youssef", "Hassan", sex="male", date_of_birth=born("2008-11-30"), phone=phone),
        person("Mona", "Hassan", sex="female", date_of_birth=born("2010"), phone="0925551234"),
        # twins, with their father's name as family name: one birth date, two given names
        *(
            person(name, "Ahmed", sex="male", date_of_birth=born("2012-04-09"), phone=phone)
            for name in twins
        ),
    ]


@pytest.mark.parametrize(
    ("twins", "with_group"),
    [
        (("Ali", "Omar"), False),
        (("Ali", "Omar"), True),
        # Hassan and Hussein share the skeleton hsn (unvocalised Arabic cannot tell
        # them apart): twins so named are told apart by their household link.
        (("Hassan", "Hussein"), True),
    ],
)
def test_members_of_one_household_are_not_matched(twins: tuple[str, str], with_group: bool) -> None:
    members = household(twins)
    if with_group:
        roles = ["head", "spouse", "child", "child", "child", "child", "child"]
        for member, role in zip(members, roles, strict=True):
            member["household"] = {"group_id": "7f0c", "relationship": role}
    counts = counted(*members)
    for i, a in enumerate(members):
        for b in members[i + 1 :]:
            assert score(a, b, key_counts=counts).score < REVIEW_THRESHOLD, (a, b)


def test_rare_names_weigh_more_than_common_ones() -> None:
    a = person("Habtom", "Asmerom", date_of_birth=born("1990-01-01", "year"))
    b = person("Habtom", "Asmerom", date_of_birth=born("1990-01-01", "year"))
    rare = score(a, b, key_counts=counted(a, b, carriers=2))
    common = score(a, b, key_counts=counted(a, b, carriers=400))
    assert "carried by 2 records" in field(rare, "names").detail
    assert rare.score >= OPERATING_THRESHOLD > REVIEW_THRESHOLD > common.score


def test_keys_combine_evidence_and_skip_common_names_alone() -> None:
    keys = record_keys(
        person("Mohamed", "Ali", date_of_birth=born("1990-05-04"), phone="+218 91 234 5678")
    )
    assert keys == {"n:al+mhmt", "b:al@1990-05-04", "b:mhmt@1990-05-04", "p:12345678"}
    year_only = record_keys(person("Mohamed", "Babiker", date_of_birth=born("1990", "year")))
    assert {k for k in year_only if k.startswith("y:")} == {
        "y:bkr@1989",
        "y:bkr@1990",
        "y:bkr@1991",
    }
    assert record_keys({"names": {"given": "Mohamed"}}) == set()
    assert record_keys({"names": {"given": "Moneeruddin"}}) == {"n:mnrdn"}


def test_candidates_skip_oversized_blocks() -> None:
    index = {"n:al+mhmt": [str(i) for i in range(MAX_BLOCK + 1)], "d:P1234567": ["x"]}
    assert candidates(["n:al+mhmt", "d:P1234567", "p:00000000"], index) == {"x"}
    assert len(candidates(["n:al+mhmt"], index, max_block=10_000)) == MAX_BLOCK + 1


def test_candidates_take_the_rarest_blocks_until_the_budget_is_reached() -> None:
    index = {
        "d:P1234567": ["x"],
        "y:bkr@1990": [f"y{i}" for i in range(150)],
        "n:bkr+mhmt": [f"n{i}" for i in range(190)],
        "y:bkr@1991": [f"z{i}" for i in range(100)],
    }
    sizes = {key: len(ids) for key, ids in index.items()}
    # 1 + 100 records are below BLOCK_BUDGET, so the next block is taken; then
    # 251 are not, and the name pair's 190 more are left out.
    assert BLOCK_BUDGET == 250
    assert usable_blocks(sizes) == ["d:P1234567", "y:bkr@1991", "y:bkr@1990"]
    assert candidates(list(index), index) == {"x", *index["y:bkr@1991"], *index["y:bkr@1990"]}
    assert len(candidates(list(index), index, budget=10_000)) == 1 + 150 + 190 + 100
    # Keys of one size are taken together, whatever they are called; a record
    # always gets its rarest blocks, however large.
    assert usable_blocks({"b": 130, "a": 130, "c": 131}) == ["a", "b"]
    assert usable_blocks({"a": 180, "b": 190}, budget=100) == ["a"]
    assert usable_blocks({"a": MAX_BLOCK + 1}) == []


# --- properties --------------------------------------------------------------------

_text = st.one_of(st.text(max_size=30), st.sampled_from(["Mohamed", "محمد", "Ali", "ተስፋዬ", ""]))
_junk = st.one_of(st.none(), st.integers(), st.booleans(), _text, st.lists(_text, max_size=2))
_documents = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["passport", "national_id", 3]),
            "number": st.one_of(_text, st.sampled_from(["P1234567", "٠١٢٣٤٥٦٧"])),
            "issuing_country": st.sampled_from(["SDN", "EGY", "", None]),
        },
    ),
    max_size=2,
)
_docs = st.fixed_dictionaries(
    {},
    optional={
        "names": st.one_of(
            _junk,
            st.fixed_dictionaries(
                {},
                optional={
                    "given": _text,
                    "family": _text,
                    "given_original": _text,
                    "family_original": _text,
                    "aliases": st.lists(_text, max_size=2),
                },
            ),
        ),
        "sex": st.one_of(st.sampled_from(["male", "female", "other", "unknown", "M"]), _junk),
        "date_of_birth": st.one_of(
            _junk,
            st.fixed_dictionaries(
                {
                    "value": st.one_of(st.dates().map(str), _text),
                    "precision": st.sampled_from(["exact", "year", "estimated", "bogus"]),
                }
            ),
        ),
        "nationalities": st.one_of(st.lists(st.sampled_from(["EGY", "SDN", "ERI"])), _junk),
        "documents": st.one_of(_documents, _junk),
        "phone": st.one_of(st.sampled_from(["+218 91 234 5678", "0912345678"]), _junk),
        "place_of_birth": _junk,
        "household": st.one_of(
            _junk,
            st.fixed_dictionaries(
                {"group_id": st.sampled_from(["g1", "g2"])},
                optional={"relationship": st.sampled_from(["head", "child"])},
            ),
        ),
    },
)


@settings(database=None, max_examples=300, deadline=None)
@given(_docs, _docs)
def test_score_is_symmetric_bounded_and_never_raises(a: dict[str, Any], b: dict[str, Any]) -> None:
    counts = counted(a, b, carriers=3)
    for key_counts in (None, counts):
        forward, backward = score(a, b, key_counts=key_counts), score(b, a, key_counts=key_counts)
        assert 0.0 <= forward.score <= 1.0
        assert forward.score == backward.score
        assert [i.weight for i in forward.explanation] == [i.weight for i in backward.explanation]
    assert all(key.isascii() and len(key) <= 80 for key in record_keys(a))


@settings(database=None, max_examples=100, deadline=None)
@given(_docs)
def test_a_record_matches_itself_as_well_as_anything(doc: dict[str, Any]) -> None:
    assert record_keys(doc) == record_keys(profile(doc))
    if record_keys(doc):
        other = person("Someone", "Else", date_of_birth=born("1950-01-02"), sex="female")
        assert score(doc, doc).score >= score(doc, other).score


# --- the labelled bench set ----------------------------------------------------------


@pytest.fixture(scope="module")
def bench_set() -> Any:
    data = generate(1_500, seed=11)
    return data, score_all(data)


def test_true_duplicates_share_a_blocking_key(bench_set: Any) -> None:
    data, scored = bench_set
    blocked = len(scored.truth & scored.scores.keys()) / len(scored.truth)
    assert blocked >= 0.95
    assert statistics.median(scored.candidates_per_record) <= 10
    by_person: dict[int, list[int]] = defaultdict(list)
    for i, item in enumerate(data):
        by_person[item.true_person].append(i)
    sizes = Counter(len(ids) for ids in by_person.values())
    assert set(sizes) == {1, 2, 3}  # the set has singletons and duplicates


def test_pair_score_is_the_score_or_none_below_its_threshold(bench_set: Any) -> None:
    _, scored = bench_set
    profiles, counts = scored.profiles, scored.key_counts
    skipped_names = by_carriers = 0
    for a, b in scored.scores:
        for key_counts in (counts, None):
            full = score(profiles[a], profiles[b], key_counts=key_counts)
            names = field(full, "names").weight
            most_names = matching._names_most(profiles[a], profiles[b], key_counts)
            assert names <= most_names  # what pair_score's shortcut relies on
            # a pair's own score as the threshold: the edge the shortcut's margin guards
            for at_least in (0.0, REVIEW_THRESHOLD, OPERATING_THRESHOLD, full.score):
                expected = full.score if full.score >= at_least else None
                got = pair_score(profiles[a], profiles[b], key_counts=key_counts, at_least=at_least)
                assert got == expected, (a, b, at_least)
            fields = [(i.field, i.outcome, i.weight, i.detail) for i in full.explanation[1:]]
            most = matching._chance([*fields, ("names", "agree", most_names, "")])
            skipped_names += most < REVIEW_THRESHOLD
            # common names: ruled out by their carriers, though 10 would have let them in
            by_carriers += (
                most < REVIEW_THRESHOLD <= matching._chance([*fields, ("names", "agree", 10.0, "")])
            )
    assert skipped_names  # the shortcut was taken, and still gave the score's answer
    assert by_carriers


def test_bench_quality_meets_the_issue_targets(bench_set: Any) -> None:
    data, scored = bench_set
    pairs = pair_metrics(scored, OPERATING_THRESHOLD)
    assert pairs["precision"] >= 0.95
    assert pairs["f1"] >= 0.85
    clusters = cluster_metrics(scored, data, OPERATING_THRESHOLD)
    assert clusters["f1"] >= 0.85
    assert pair_metrics(scored, REVIEW_THRESHOLD)["recall"] >= 0.9


def test_automatic_clusters_hold_only_predicted_pairs(
    bench_set: Any,
) -> None:
    data, scored = bench_set
    predicted = [(a, b, v) for (a, b), v in scored.scores.items() if v >= OPERATING_THRESHOLD]
    groups = link(
        range(len(data)), predicted, lambda a, b: scored.pair_score(a, b) >= OPERATING_THRESHOLD
    )
    members: dict[int, list[int]] = defaultdict(list)
    for item, group in groups.items():
        members[group].append(item)
    assert max(len(ids) for ids in members.values()) > 1
    for ids in members.values():
        assert all(
            scored.pair_score(a, b) >= OPERATING_THRESHOLD for a in ids for b in ids if a < b
        )
    sizes = {
        rule: cluster_metrics(scored, data, OPERATING_THRESHOLD, rule=rule)[
            "largest_merged_cluster"
        ]
        for rule in ("automatic", "hub", "blind")
    }
    # Linked groups lie inside the predicted graph's connected components.
    assert max(sizes["automatic"], sizes["hub"]) <= sizes["blind"]


def test_a_stored_profile_reads_back_equal_and_garbage_is_refused() -> None:
    for item in generate(300, seed=7):
        made = profile(item.doc)
        assert profile_from_json(json.loads(json.dumps(profile_to_json(made)))) == made
    garbage: Any
    for garbage in (None, [], [1, 2], {"names": []}, "profile"):
        with pytest.raises(ValueError):
            profile_from_json(garbage)


# What `profile` makes of a fixed sample, for PROFILE_VERSION. Profiles the hub
# stored are reused while their version matches: change `profile`, and this
# fails until PROFILE_VERSION is bumped and the digest below updated with it.
PROFILES_BY_VERSION = {1: "4b17615aaf388712b2a51c09d71ee7e500337f1547672c5de0532b6d302295c0"}


def test_profile_version_is_bumped_when_profiles_change() -> None:
    made = [profile_to_json(profile(item.doc)) for item in generate(200, seed=11)]
    digest = hashlib.sha256(json.dumps(made, ensure_ascii=False).encode()).hexdigest()
    assert PROFILES_BY_VERSION.get(PROFILE_VERSION) == digest, (
        "profile() reads records differently now: bump schemas.matching.PROFILE_VERSION"
        " (the hub then makes its stored profiles again) and record the new digest here"
    )
