"""The hub checks the fields of a pushed edit in one pass; `schemas.fields.field_error`
stays the rule. These tests hold the one-pass check to that rule, value by value:
it must never accept what the rule refuses (poison must still be quarantined),
nor refuse what the rule accepts."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.fields import FIELD_PATHS, field_error, flatten
from schemas.record import Registration
from server.field_checks import edit_field_error
from tests.conftest import sample_record

PROPERTY = settings(database=None, deadline=None, max_examples=300)

VALID: dict[str, Any] = flatten(
    Registration.model_validate(
        {
            **sample_record(),
            "id": "0190a5a0-1111-7000-8000-000000000001",
            "registration": {
                "site": "ras-jedir",
                "device_id": "dev-1",
                "operator": "Amina",
                "registered_at": "2026-11-01T10:00:00Z",
            },
        }
    )
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", " ", "male", "EGY", "XXX", "consent", "1990-01-01", "+218 91 2"]),
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["value", "given", "type", "site", "x"]), inner, max_size=3
        )
    ),
    max_leaves=8,
)


@st.composite
def near_valid(draw: st.DrawFn, path: str) -> Any:
    """A valid value of `path`, often with one part replaced by something else."""
    value = VALID[path]
    if draw(st.booleans()):
        return value
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        return {**value, key: draw(json_values)}
    if isinstance(value, list) and value:
        return [*value, draw(st.sampled_from([*value, None, "EGY", "zz", 7]))]
    return draw(json_values)


@st.composite
def field_values(draw: st.DrawFn) -> tuple[str, Any]:
    path = draw(st.sampled_from([*FIELD_PATHS, "shoe_size"]))
    if path in VALID and draw(st.booleans()):
        return path, draw(near_valid(path))
    return path, draw(json_values)


@PROPERTY
@given(field_values())
def test_one_field_gets_the_rules_verdict(pair: tuple[str, Any]) -> None:
    path, value = pair
    problem = field_error(path, value)
    assert edit_field_error([pair]) == (None if problem is None else (path, problem))


@PROPERTY
@given(st.lists(field_values(), max_size=6, unique_by=lambda pair: pair[0]))
def test_an_edit_gets_its_first_refused_field(pairs: list[tuple[str, Any]]) -> None:
    refused = [(p, problem) for p, v in pairs if (problem := field_error(p, v))]
    assert edit_field_error(pairs) == (refused[0] if refused else None)


def test_a_whole_valid_registration_passes_and_one_bad_field_is_named() -> None:
    fields = list(VALID.items())
    assert edit_field_error(fields) is None
    bad = [(p, "robot" if p == "sex" else v) for p, v in fields]
    path, reason = edit_field_error(bad) or ("", "")
    assert path == "sex" and "female" in reason
