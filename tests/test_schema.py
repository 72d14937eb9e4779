"""The registration schema: validation messages and round trips."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.countries import ISO3166_ALPHA3
from schemas.enums import (
    ConsentScope,
    DocumentStatus,
    DocumentType,
    Need,
    Scenario,
    Sex,
    Vulnerability,
)
from schemas.fields import FIELD_PATHS, flatten, parse_date_of_birth, parse_field_value, unflatten
from schemas.ids import uuid7
from schemas.record import DateOfBirth, Registration, RegistrationCreate, age_band
from schemas.validation import InvalidRecord, validate
from tests.conftest import sample_record


def errors(data: Any) -> list[str]:
    with pytest.raises(InvalidRecord) as info:
        validate(RegistrationCreate, data)
    return [str(e) for e in info.value.errors]


def test_sample_is_valid() -> None:
    record = validate(RegistrationCreate, sample_record())
    assert record.names.given == "Mohamed"


def test_every_bad_field_is_reported_at_once() -> None:
    bad = sample_record(
        date_of_birth={"value": "2999-01-01", "precision": "exact"},
        nationalities=["EGY", "XXX"],
        sex="robot",
        languages=["Arabic"],
        documents=[{"type": "passport", "status": "stolen", "issuing_country": "ZZZ"}],
        unknown_field=1,
    )
    found = errors(bad)
    assert "date_of_birth: in the future" in found
    assert "nationalities[1]: 'XXX' is not an ISO 3166-1 alpha-3 code" in found
    assert any(e.startswith("sex: input should be") for e in found)
    assert any(e.startswith("languages[0]:") for e in found)
    assert any(e.startswith("documents[0].status:") for e in found)
    assert "documents[0].issuing_country: 'ZZZ' is not an ISO 3166-1 alpha-3 code" in found
    assert "unknown_field: unknown field" in found
    assert len(found) == 7


def test_required_parts() -> None:
    found = errors({"names": {}})
    assert "names: at least one given or family name is required" in found
    assert "situation: required" in found
    assert "consent: required" in found


def test_consent_rules() -> None:
    found = errors(
        sample_record(consent={"given": False, "legal_basis": "consent", "recorded_by": "A"})
    )
    assert found == ["consent: legal basis 'consent' requires consent to be given"]
    ok = sample_record(
        consent={"given": False, "legal_basis": "vital_interest", "recorded_by": "A"}
    )
    assert validate(RegistrationCreate, ok).consent.given is False


def test_not_an_object() -> None:
    with pytest.raises(InvalidRecord, match="expected a JSON object"):
        validate(RegistrationCreate, [1, 2])


def test_duplicates_in_lists_refused() -> None:
    assert errors(sample_record(nationalities=["EGY", "EGY"])) == [
        "nationalities: 'EGY' is listed twice"
    ]


def test_hidden_characters_refused_right_to_left_marks_kept() -> None:
    """A NUL, an escape or a bidirectional override in a name makes a list show
    something other than what is stored; a right-to-left mark is Arabic text."""
    for bad, code in (("Amina\x00", "0000"), ("Am\x1b[2Jina", "001B"), ("Ami\u202ena", "202E")):
        record = sample_record(names={"given": bad, "family": "Yusuf"})
        assert errors(record) == [
            f"names.given: contains the invisible character U+{code}: remove it"
        ]
    kept = validate(RegistrationCreate, sample_record(names={"given": "أمينة\u200f"}))
    assert kept.names.given == "أمينة\u200f"
    notes = validate(RegistrationCreate, sample_record(notes="first line\n\tsecond line"))
    assert notes.notes == "first line\n\tsecond line"
    assert errors(sample_record(notes="bell\x07")) == [
        "notes: contains the invisible character U+0007: remove it"
    ]


def test_date_of_birth_short_forms() -> None:
    assert parse_date_of_birth("1990") == {"value": "1990-01-01", "precision": "year"}
    assert parse_date_of_birth("~1990-02-03") == {"value": "1990-02-03", "precision": "estimated"}
    assert parse_date_of_birth(" ") is None
    assert parse_field_value("situation.needs", "food, shelter") == ["food", "shelter"]
    assert parse_field_value("names.given", "007") == "007"
    assert parse_field_value("notes", "") is None


@pytest.mark.parametrize(
    "value",
    ["0", 0, 1990, 86400.0, True, "1990", "19880314", "1988-03-14T00:00:00", " 1988-03-14",
     "1988-3-14", "١٩٨٨-٠٣-١٤", datetime(1988, 3, 14)],
)  # fmt: skip
def test_a_date_is_written_yyyy_mm_dd_never_read_as_a_timestamp(value: Any) -> None:
    refused = "input should be a valid date (YYYY-MM-DD)"
    born = sample_record(date_of_birth={"value": value, "precision": "year"})
    assert errors(born) == [f"date_of_birth.value: {refused}"]
    document = {"type": "passport", "status": "held", "expiry": value}
    assert errors(sample_record(documents=[document])) == [f"documents[0].expiry: {refused}"]
    referral = {"service": "food", "referred_on": value, "updated_on": value}
    assert errors(sample_record(referrals=[referral])) == [
        f"referrals[0].referred_on: {refused}",
        f"referrals[0].updated_on: {refused}",
    ]


def test_a_date_is_still_taken_as_text_or_as_a_date() -> None:
    as_text = validate(RegistrationCreate, sample_record())
    assert as_text.date_of_birth == DateOfBirth(value=date(1988, 3, 14))
    as_json = RegistrationCreate.model_validate_json(as_text.model_dump_json())
    assert as_json == as_text
    assert errors(sample_record(date_of_birth={"value": "1987-02-30"})) == [
        "date_of_birth.value: input should be a valid date or datetime, day value is outside"
        " expected range"
    ]


def test_set_text_meant_as_json_must_be_json() -> None:
    """`--set communication={bad json` says the JSON is broken, instead of
    passing the text on to be called no valid Communication."""
    for path, text in (("communication", "{bad json"), ("nationalities", '["EGY"')):
        with pytest.raises(ValueError, match="not valid JSON"):
            parse_field_value(path, text)
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_field_value("communication", "[" * 100_000 + "]" * 100_000)
    assert parse_field_value("communication", '{"language": "ar"}') == {"language": "ar"}
    assert parse_field_value("sex", "female") == "female"
    assert parse_field_value("notes", "{braces in a note}") == "{braces in a note}"


def test_age_band() -> None:
    on = date(2026, 6, 1)
    assert age_band(None, on) == "unknown"
    assert age_band(DateOfBirth(value=date(2024, 1, 1)), on) == "0-4"
    assert age_band(DateOfBirth(value=date(2010, 7, 1)), on) == "12-17"
    assert age_band(DateOfBirth(value=date(1960, 1, 1)), on) == "60+"


def test_uuid7_is_time_ordered() -> None:
    a = uuid7(now_ms=1000)
    b = uuid7(now_ms=1001)
    assert a.version == 7 and str(a) < str(b)


def test_json_schema_names_the_vocabulary() -> None:
    schema = Registration.model_json_schema()
    assert set(schema["$defs"]["Scenario"]["enum"]) == {s.value for s in Scenario}
    assert len(schema["$defs"]["Vulnerability"]["enum"]) == len(Vulnerability)


texts = st.text(alphabet=st.characters(categories=["L"]), min_size=1, max_size=20)
records = st.fixed_dictionaries(
    {
        "names": st.fixed_dictionaries(
            {"given": texts},
            optional={
                "family": texts,
                "given_original": texts,
                "aliases": st.lists(texts, max_size=2, unique=True),
            },
        ),
        "situation": st.fixed_dictionaries(
            {"scenario": st.sampled_from([s.value for s in Scenario])},
            optional={
                "needs": st.lists(
                    st.sampled_from([n.value for n in Need]), unique=True, max_size=4
                ),
                "vulnerabilities": st.lists(
                    st.sampled_from([v.value for v in Vulnerability]), unique=True, max_size=3
                ),
            },
        ),
        "consent": st.just(
            {
                "given": True,
                "legal_basis": "consent",
                "scope": [ConsentScope.REGISTRATION.value],
                "recorded_by": "A",
            }
        ),
    },
    optional={
        "sex": st.sampled_from([s.value for s in Sex]),
        "nationalities": st.lists(st.sampled_from(sorted(ISO3166_ALPHA3)), unique=True, max_size=3),
        "date_of_birth": st.fixed_dictionaries(
            {
                "value": st.dates(min_value=date(1930, 1, 1), max_value=date(2025, 12, 31)).map(
                    str
                ),
                "precision": st.sampled_from(["exact", "year", "estimated"]),
            }
        ),
        "documents": st.lists(
            st.fixed_dictionaries(
                {
                    "type": st.sampled_from([d.value for d in DocumentType]),
                    "status": st.sampled_from([d.value for d in DocumentStatus]),
                },
                optional={"number": st.from_regex(r"[A-Z0-9]{5,9}", fullmatch=True)},
            ),
            max_size=2,
        ),
        "notes": texts,
    },
)


@settings(max_examples=150, deadline=None)
@given(records)
def test_record_round_trips_through_json_and_fields(data: dict[str, Any]) -> None:
    created = validate(RegistrationCreate, data)
    record = Registration(
        id=uuid7(),
        registration={
            "site": "s1",
            "device_id": "d",
            "operator": "o",
            "registered_at": "2026-01-01T00:00:00Z",
        },
        **created.model_dump(exclude={"id", "location"}),
    )
    assert Registration.model_validate_json(record.model_dump_json()) == record
    flat = flatten(record)
    assert set(flat) == set(FIELD_PATHS)
    rebuilt = Registration.model_validate({"id": str(record.id), **unflatten(flat)})
    assert rebuilt == record
