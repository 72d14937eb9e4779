"""The field paths that sync and history work on.

A record is synchronised per field: each path below carries its own HLC stamp.
Nested objects whose parts are edited independently (names, situation) are
split one level; lists and small objects (documents, consent) are one value,
so two devices adding different documents is a conflict a person resolves,
not a silent merge.

A record may also hold paths this schema version does not know: a field an
older version had and this one retired or renamed (the hub keeps such fields
from older devices, see `other_path_error`), or a field of a newer version.
They are kept as received, never validated (only their nesting is bounded,
`kept_value_error`) nor dropped: `split_fields` sets them apart from the
fields of this version.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from schemas.record import Registration

__all__ = [
    "FIELD_PATHS",
    "KNOWN_PATHS",
    "LIST_FIELDS",
    "MAX_KEPT_DEPTH",
    "SPLIT_OBJECTS",
    "TEXT_FIELDS",
    "field_error",
    "flatten",
    "flatten_doc",
    "is_path_shaped",
    "kept_value_error",
    "other_path_error",
    "parse_date_of_birth",
    "parse_field_value",
    "split_fields",
    "unflatten",
]

SPLIT_OBJECTS = ("names", "situation")

FIELD_PATHS: tuple[str, ...] = (
    "schema_version",
    "registration",
    "names.given",
    "names.family",
    "names.given_original",
    "names.family_original",
    "names.aliases",
    "sex",
    "date_of_birth",
    "nationalities",
    "place_of_birth",
    "languages",
    "communication",
    "documents",
    "phone",
    "occupation",
    "employer",
    "situation.scenario",
    "situation.vulnerabilities",
    "situation.needs",
    "situation.intention",
    "household",
    "referrals",
    "consent",
    "notes",
    "duplicate_review",
    "merged_into",
)
KNOWN_PATHS = frozenset(FIELD_PATHS)
# A field path of any schema version: one name, or an object's name and a part
# of it (split objects are split one level).
_PATH_SHAPE = re.compile(r"[a-z][a-z0-9_]{0,31}(\.[a-z][a-z0-9_]{0,31})?")


def flatten(record: Registration) -> dict[str, Any]:
    """Return `{path: json value}` for every field path of `record` (id excluded)."""
    data = record.model_dump(mode="json", exclude={"id"})
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in SPLIT_OBJECTS:
            for sub, sub_value in value.items():
                out[f"{key}.{sub}"] = sub_value
        else:
            out[key] = value
    return out


def unflatten(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild the nested JSON document from `{path: value}`.

    Paths not known to this schema version are kept as they are (an older
    version's retired field, a newer version's field); validation decides later.
    """
    doc: dict[str, Any] = {}
    for path, value in fields.items():
        head, _, tail = path.partition(".")
        if tail and head in SPLIT_OBJECTS:
            doc.setdefault(head, {})[tail] = value
        else:
            doc[path] = value
    return doc


def flatten_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """`flatten` for a stored JSON document, which may not validate (id excluded).

    The inverse of `unflatten`: a split object's parts become `object.part`
    paths, whatever they are; every other key is a path as it is.
    """
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "id":
            continue
        if key in SPLIT_OBJECTS and isinstance(value, dict):
            out.update({f"{key}.{sub}": sub_value for sub, sub_value in value.items()})
        else:
            out[key] = value
    return out


def split_fields(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(this version's fields, the other fields)` of a flattened record."""
    if fields.keys() <= KNOWN_PATHS:
        return dict(fields), {}
    known = {p: v for p, v in fields.items() if p in KNOWN_PATHS}
    return known, {p: v for p, v in fields.items() if p not in KNOWN_PATHS}


def is_path_shaped(path: str) -> bool:
    """Whether `path` has the shape of a field path of some schema version: one
    lower-case name, or an object's name and one of its parts (`names.given`)."""
    return _PATH_SHAPE.fullmatch(path) is not None


def other_path_error(path: str) -> str | None:
    """Why a path this schema does not know cannot be kept as an older version's
    field, or None if it can.

    It must have the shape of a field path, and must not be `id` nor the name of
    a split object (`names`, `situation`): kept under that name, it would take
    the place of the record's id or of the object its parts are rebuilt in.
    """
    if path in KNOWN_PATHS:
        return None
    if not is_path_shaped(path):
        return "not a field path (lower-case names, at most one '.')"
    if path == "id" or path in SPLIT_OBJECTS:
        return "a reserved name, not a field of any schema version"
    return None


# How deep the value of a kept field may nest: far more than any field of any
# schema version (a few levels), far less than what JSON encoders and parsers on
# the hub and the devices take (pydantic-core stops at about 250, `json` at the
# interpreter's recursion limit).
MAX_KEPT_DEPTH = 32


def kept_value_error(value: Any) -> str | None:
    """Why `value` cannot be kept as the value of another version's field, or None.

    Kept values are not validated (`field_error` knows nothing of them); only
    their nesting is bounded, so every replica can write and read them back.
    """
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:  # not recursive: the value may be as deep as its parser allowed
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_KEPT_DEPTH:
            return f"nested deeper than {MAX_KEPT_DEPTH} levels"
        pending.extend((child, depth + 1) for child in children)
    return None


LIST_FIELDS = frozenset(
    {
        "names.aliases",
        "nationalities",
        "languages",
        "situation.vulnerabilities",
        "situation.needs",
    }
)


def parse_date_of_birth(text: str) -> dict[str, str] | None:
    """Parse the short forms people type: `1990-05-02` (exact), `1990` (year only),
    `~1990` or `~1990-05-02` (estimated); empty means unknown. Raises ValueError."""
    text = text.strip()
    if not text:
        return None
    precision = "exact"
    if text.startswith("~"):
        precision, text = "estimated", text[1:].strip()
    if len(text) == 4 and text.isdigit():
        return {
            "value": f"{text}-01-01",
            "precision": "year" if precision == "exact" else precision,
        }
    return {"value": text, "precision": precision}


TEXT_FIELDS = frozenset(
    {
        "names.given",
        "names.family",
        "names.given_original",
        "names.family_original",
        "place_of_birth",
        "phone",
        "occupation",
        "employer",
        "notes",
    }
)


def parse_field_value(path: str, text: str) -> Any:
    """Turn the text of `--set path=text` into the JSON value for that field.

    Free-text fields take the text as it is; list fields take `a,b,c` or a
    JSON array; `date_of_birth` takes the short forms of
    `parse_date_of_birth`; other fields take JSON, or the text itself when it
    is not JSON (so `sex=female` works), but text opening with `{` or `[`
    must be valid JSON (ValueError says where it breaks). An empty text clears
    the field.
    """
    stripped = text.strip()
    if path == "date_of_birth" and not stripped.startswith("{"):
        return parse_date_of_birth(stripped)
    if not stripped:
        return [] if path in LIST_FIELDS else None
    if path in TEXT_FIELDS:
        return stripped
    try:
        value = json.loads(stripped)
    except ValueError as exc:
        if stripped[0] in "{[":  # meant as JSON: say where it breaks, not that it is no object
            raise ValueError(f"not valid JSON: {exc}") from None
        value = stripped
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply") from None
    if path in LIST_FIELDS and isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _field_adapters() -> dict[str, Any]:
    from typing import Annotated

    from pydantic import TypeAdapter

    from schemas.record import Names, Registration, Situation

    def adapter(model: Any, name: str) -> Any:
        info = model.model_fields[name]
        annotation: Any = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        return TypeAdapter(annotation)

    adapters: dict[str, Any] = {}
    for path in FIELD_PATHS:
        head, _, tail = path.partition(".")
        if tail:
            adapters[path] = adapter(Names if head == "names" else Situation, tail)
        else:
            adapters[path] = adapter(Registration, head)
    return adapters


_ADAPTERS: dict[str, Any] = {}


def field_error(path: str, value: Any) -> str | None:
    """Why `value` cannot be the value of field `path`, or None if it can.

    Paths this schema does not know are judged by their nesting only
    (`kept_value_error`): whether such a field is kept at all depends on who
    sends it (see `other_path_error` and the hub's ingest). Only the field
    itself is checked; rules across fields are checked on whole records.
    """
    from pydantic import ValidationError

    from schemas.validation import errors_of

    if not _ADAPTERS:
        _ADAPTERS.update(_field_adapters())
    adapter = _ADAPTERS.get(path)
    if adapter is None:
        return kept_value_error(value)
    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        return "; ".join(str(e) for e in errors_of(exc))
    return None
